//! UDP tunnels on the relay: each `[[udp]]` entry listens on a UDP port, and each client address
//! that sends to it is a flow, carried to an agent of the entry's group
//! ([`quictun_proto::Target::Udp`]), which keeps one upstream socket per flow so that replies go
//! back to the client that sent what they answer.
//!
//! A flow's exchange sets it up and ends it, and carries its first datagrams (they must not
//! overtake the setup) and any too large for a DATAGRAM frame; once the agent has answered, the
//! rest cross as DATAGRAM frames (QUIC), or stay on the exchange (gRPC). See
//! [`quictun_core::flows`].
//!
//! Nothing waits on a flow: the listener's socket reader hands each datagram to its flow's
//! bounded queue, and a datagram that finds it full, or would open a flow past `max_flows` or
//! the chosen agent's `max_flows_per_agent`, is dropped and counted (`udp_drops_total`). A flow
//! through which nothing moved either way for `idle_timeout_secs` ends. When its agent is lost,
//! the flow is set up again on another agent (or the same one, reconnected) with the datagrams
//! that waited meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use quictun_core::body::TunnelBody;
use quictun_core::datagram::{FlowBudget, FlowSlot};
use quictun_core::flows::{Deliver, DropReason, FlowLink, Registered, UdpMetrics, read_stream};
use quictun_core::idle::Activity;
use quictun_core::upgrade::channel_body_of;
use quictun_proto::datagram::MAX_UDP_PAYLOAD;
use quictun_proto::{RequestHead, Target, UdpFlow};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span};
use uuid::Uuid;

use crate::balance::Choice;
use crate::config::UdpEntry;
use crate::sessions::{Pool, Session, StreamKind, StreamPermit};
use crate::state::Runtime;

/// Times in a row a flow is set up again after losing its agent without a datagram from the new
/// one in between, before it ends.
const MAX_SETUPS_WITHOUT_REPLY: u32 = 3;

/// One `[[udp]]` listener: its socket, its flows and their budgets.
struct Listener {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    entry: UdpEntry,
    pool: Pool,
    flows: DashMap<SocketAddr, ClientFlow>,
    budget: Arc<FlowBudget>,
    per_agent: DashMap<Uuid, Arc<FlowBudget>>,
    runtime: Arc<Runtime>,
    response_timeout: Duration,
    next_key: AtomicU64,
}

/// A flow's identity: its request id (in every log line and in its exchanges' heads), its
/// client, and its key in the listener's table.
struct Flow {
    id: Uuid,
    client: SocketAddr,
    key: u64,
}

/// A client address's open flow, as the socket reader sees it.
struct ClientFlow {
    key: u64,
    queue: mpsc::Sender<Bytes>,
}

/// Binds a `[[udp]]` entry's socket; its address.
pub fn bind(entry: &UdpEntry) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let socket = quictun_core::bind_udp(entry.listen)?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// Serves one `[[udp]]` listener until the relay stops.
pub async fn serve(
    socket: UdpSocket,
    local: SocketAddr,
    entry: UdpEntry,
    runtime: Arc<Runtime>,
    response_timeout: Duration,
) {
    let this = Arc::new(Listener {
        socket: Arc::new(socket),
        local,
        pool: Pool::Group(Arc::from(entry.group.as_str())),
        budget: FlowBudget::new(entry.max_flows),
        entry,
        flows: DashMap::new(),
        per_agent: DashMap::new(),
        runtime: runtime.clone(),
        response_timeout,
        next_key: AtomicU64::new(0),
    });
    // One byte over the largest payload, to tell a datagram that is too large from one that fits.
    let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
    loop {
        let (len, client) = tokio::select! {
            () = runtime.stopped.cancelled() => break,
            received = this.socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(err) => {
                    // ICMP errors from earlier sends show up here on some systems: not fatal.
                    debug!(listen = %this.local, %err, "UDP receive failed");
                    continue;
                }
            },
        };
        if len > MAX_UDP_PAYLOAD {
            this.metrics().drop_one(DropReason::too_large);
            continue;
        }
        this.take(client, Bytes::copy_from_slice(&buf[..len]));
    }
}

impl Listener {
    fn metrics(&self) -> &Arc<UdpMetrics> {
        &self.runtime.metrics.udp
    }

    /// Hands a client's datagram to its flow, opening one when it has none. Never waits.
    fn take(self: &Arc<Self>, client: SocketAddr, datagram: Bytes) {
        let queued = match self.flows.get(&client) {
            Some(flow) => flow.queue.try_send(datagram),
            None => Err(mpsc::error::TrySendError::Closed(datagram)),
        };
        let datagram = match queued {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => return self.metrics().drop_one(DropReason::queue_full),
            // No flow, or one that is ending: this datagram starts the next one.
            Err(mpsc::error::TrySendError::Closed(datagram)) => datagram,
        };
        let Some(slot) = self.budget.admit() else {
            debug!(%client, listen = %self.local, "UDP flow refused: the listener's max_flows are open");
            return self.metrics().drop_one(DropReason::listener_flows);
        };
        let (queue, waiting) = mpsc::channel(self.entry.queue_datagrams);
        let _ = queue.try_send(datagram);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        self.flows.insert(client, ClientFlow { key, queue });
        let id = Uuid::new_v4();
        let span = info_span!("udp", request_id = %id, %client, client_id = tracing::field::Empty);
        let this = self.clone();
        self.runtime.tasks.spawn(
            async move {
                this.run_flow(Flow { id, client, key }, waiting, slot).await;
            }
            .instrument(span),
        );
    }

    /// Runs one client's flow until it idles out, cannot be carried, or the relay stops; then
    /// writes its access-log line.
    async fn run_flow(self: Arc<Self>, flow: Flow, mut waiting: mpsc::Receiver<Bytes>, slot: FlowSlot) {
        let Flow { id, client, key } = flow;
        let metrics = self.metrics().clone();
        metrics.flows.inc();
        let started = std::time::Instant::now();
        let activity = Activity::new();
        let moved = Arc::new(Moved::default());
        let mut agent: Option<Arc<str>> = None;
        let mut setups_without_reply = 0;
        let end = loop {
            let replies_before = moved.from_agent.load(Ordering::Relaxed);
            let carried = match self.set_up((id, client), &mut waiting, &activity, &moved).await {
                Ok(carried) => carried,
                Err(NotSetUp(reason, why)) => break FlowEnd::NotSetUp(reason, why),
            };
            tracing::Span::current().record("client_id", &*carried.session.client_id);
            agent = Some(carried.session.client_id.clone());
            match self.carry(&mut waiting, carried, &activity, &moved).await {
                FlowEnd::Lost(why) => {
                    let replied = moved.from_agent.load(Ordering::Relaxed) > replies_before;
                    setups_without_reply = if replied { 0 } else { setups_without_reply + 1 };
                    if setups_without_reply >= MAX_SETUPS_WITHOUT_REPLY {
                        break FlowEnd::Lost(why);
                    }
                    debug!(why, "UDP flow lost its agent: setting it up again");
                }
                end => break end,
            }
        };
        self.flows.remove_if(&client, |_, flow| flow.key == key);
        waiting.close();
        let reason = match end {
            FlowEnd::NotSetUp(reason, _) => reason,
            _ => DropReason::closed,
        };
        while waiting.try_recv().is_ok() {
            metrics.drop_one(reason);
        }
        drop(slot);
        metrics.flows.dec();
        if agent.is_none() {
            // Never reached an agent (none connected, say): one line per datagram would let a
            // flood of them write the log.
            return debug!(%client, end = %end, "UDP flow not carried");
        }
        tracing::info!(
            target: "quictun::access",
            request_id = %id,
            client = %client,
            listen = %self.local,
            client_id = %agent.as_deref().unwrap_or("-"),
            datagrams_to_agent = moved.to_agent.load(Ordering::Relaxed),
            datagrams_from_agent = moved.from_agent.load(Ordering::Relaxed),
            duration_ms = started.elapsed().as_micros() as f64 / 1000.0,
            end = %end,
            "UDP {}",
            self.local.port()
        );
    }

    /// Chooses an agent and sets the flow up on it: the datagrams that arrive meanwhile go on
    /// the flow's stream, behind the setup.
    async fn set_up(
        &self,
        (request_id, client): (Uuid, SocketAddr),
        waiting: &mut mpsc::Receiver<Bytes>,
        activity: &Activity,
        moved: &Arc<Moved>,
    ) -> Result<Carried, NotSetUp> {
        let not_set_up = |why: String| NotSetUp(DropReason::not_set_up, why);
        let runtime = &self.runtime;
        let session = runtime
            .sessions
            .choose_in(&self.pool, &Choice::default())
            .ok_or_else(|| not_set_up(format!("no agent of {} is connected", self.pool.name())))?;
        let budget = self
            .per_agent
            .entry(session.session_id)
            .or_insert_with(|| FlowBudget::new(self.entry.max_flows_per_agent))
            .clone();
        let Some(agent_slot) = budget.admit() else {
            let why = format!("{} has the listener's max_flows_per_agent open", session.client_id);
            return Err(NotSetUp(DropReason::agent_flows, why));
        };
        let permit = session.try_stream_permit(StreamKind::Bulk).map_err(|full| not_set_up(full.to_string()))?;
        let table = session.flow_table(self.metrics(), &runtime.tasks);
        let flow = table.next_flow_id();
        let deliver = self.deliver_to(client, activity.clone(), moved.clone());
        let registered = table.register(flow, deliver.clone()).ok_or_else(|| not_set_up("flow id in use".into()))?;
        let (stream, body) = channel_body_of(self.entry.queue_datagrams);
        let mut link = FlowLink::new(flow, stream, self.metrics().clone());
        let head = RequestHead {
            target: Target::Udp(Box::new(UdpFlow {
                upstream: self.entry.upstream.clone(),
                flow,
                proxy_v2: self.entry.proxy_protocol.map(|_| (client, self.local)),
            })),
            request_id,
            method: "CONNECT".into(),
            uri: "/".into(),
            headers: vec![quictun_proto::Header {
                name: "x-forwarded-for".into(),
                value: client.ip().to_string().into(),
            }],
            has_body: true,
            framed_body: false,
        };
        let open = session.tunnel.open(head, body, Some(client.ip()));
        let answer = tokio::time::timeout(self.response_timeout, async {
            tokio::pin!(open);
            loop {
                tokio::select! {
                    answer = &mut open => break answer,
                    Some(datagram) = waiting.recv() => {
                        moved.to_agent.fetch_add(1, Ordering::Relaxed);
                        link.send(datagram);
                    }
                }
            }
        })
        .await;
        let from_agent = match answer {
            Ok(Ok((head, body))) if head.status == 200 => body,
            Ok(Ok((head, _))) => return Err(not_set_up(format!("the agent answered {}", head.status))),
            Ok(Err(err)) => return Err(not_set_up(format!("the agent could not set the flow up: {err}"))),
            Err(_) => {
                return Err(not_set_up(format!(
                    "the agent did not set the flow up within {:?}",
                    self.response_timeout
                )));
            }
        };
        link.use_datagrams(&session.tunnel);
        Ok(Carried { session, link, from_agent, deliver, held: (registered, permit, agent_slot, budget) })
    }

    /// Sends a datagram from the tunnel to the client. Never waits.
    fn deliver_to(&self, client: SocketAddr, activity: Activity, moved: Arc<Moved>) -> Deliver {
        let (socket, metrics) = (self.socket.clone(), self.metrics().clone());
        Arc::new(move |datagram: Bytes| {
            activity.touch();
            moved.from_agent.fetch_add(1, Ordering::Relaxed);
            if quictun_core::send_datagram_now(&socket, &datagram, Some(client)).is_err() {
                metrics.drop_one(DropReason::socket);
            }
        })
    }

    /// Moves the flow's datagrams until it idles out, its agent is lost, or the relay stops.
    async fn carry(
        &self,
        waiting: &mut mpsc::Receiver<Bytes>,
        carried: Carried,
        activity: &Activity,
        moved: &Moved,
    ) -> FlowEnd {
        let Carried { link, from_agent, deliver, session, held } = carried;
        let idle = Duration::from_secs(self.entry.idle_timeout_secs);
        let replies = read_stream(from_agent, &deliver, self.metrics());
        tokio::pin!(replies);
        let end = loop {
            tokio::select! {
                Some(datagram) = waiting.recv() => {
                    activity.touch();
                    moved.to_agent.fetch_add(1, Ordering::Relaxed);
                    link.send(datagram);
                }
                ended = &mut replies => break match ended {
                    Ok(()) => FlowEnd::Lost("the agent ended the flow".into()),
                    Err(err) => FlowEnd::Lost(err.to_string()),
                },
                () = activity.idle(idle) => break FlowEnd::Idle,
                () = self.runtime.stopped.cancelled() => break FlowEnd::Shutdown,
            }
        };
        drop(held);
        self.per_agent.remove_if(&session.session_id, |_, budget| budget.open() == 0);
        end
    }
}

/// What a flow moved, for its access-log line (and to tell a working agent from a failing one).
#[derive(Debug, Default)]
struct Moved {
    to_agent: AtomicU64,
    from_agent: AtomicU64,
}

/// A flow set up on an agent.
struct Carried {
    session: Arc<Session>,
    link: FlowLink,
    from_agent: TunnelBody,
    deliver: Deliver,
    /// Its id in the session's flow table, its stream place, its place among the agent's flows
    /// (given back when the flow leaves the agent).
    held: (Registered, StreamPermit, FlowSlot, Arc<FlowBudget>),
}

/// Why a flow could not be set up: what its datagrams count as dropped for, and why.
struct NotSetUp(DropReason, String);

/// How a flow ended, for its access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FlowEnd {
    /// Nothing moved for the idle timeout.
    Idle,
    /// Its agent's stream ended or failed (and setting it up again did not help).
    Lost(String),
    /// It could not be set up: what its datagrams count as dropped for, and why.
    NotSetUp(DropReason, String),
    /// The relay shut down.
    Shutdown,
}

impl std::fmt::Display for FlowEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => f.write_str("idle timeout"),
            Self::Lost(why) => write!(f, "lost: {why}"),
            Self::NotSetUp(_, why) => write!(f, "not set up: {why}"),
            Self::Shutdown => f.write_str("relay shutdown"),
        }
    }
}
