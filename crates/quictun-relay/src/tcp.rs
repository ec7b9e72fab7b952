//! TCP tunnels on the relay: each `[[tcp]]` entry, and each TCP port an agent declared, listens
//! on a TCP port; every accepted connection is carried to an agent of the tunnel's pool on its
//! own stream ([`quictun_proto::Target::Tcp`] naming the entry's upstream, or
//! [`quictun_proto::Target::TcpPort`] naming the declared port), and spliced once the agent has
//! connected to the upstream. Each side's FIN is passed on as a half-close.
//!
//! Admission, before anything is opened: the relay's connection budget, the client address's
//! `max_requests_per_ip`, the listener's own `max_connections` and `max_connections_per_ip`, and
//! a place in the agent's bulk share of streams (`bulk_stream_percent`), so that idle tunnel
//! connections can never take the streams HTTP requests need. A connection through which nothing
//! moves for the entry's `idle_timeout_secs` is closed. A connection that cannot be carried is
//! closed at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use quictun_core::body::TunnelBody;
use quictun_core::idle::Watched;
use quictun_core::proxy_protocol::ProxyProtocol;
use quictun_core::upgrade::{FrameSender, SpliceMeters, Spliced, channel_body, splice_counted};
use quictun_proto::{RequestHead, Target};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::DropGuard;
use tracing::{Instrument, debug, info_span, warn};
use uuid::Uuid;

use crate::admission::PerKey;
use crate::balance::Choice;
use crate::config::TcpEntry;
use crate::metrics::Reject;
use crate::proxy::dispatch::{BodyChecks, Served};
use crate::proxy::forward::{self, Forward};
use crate::sessions::{Holders, Pool, StreamKind};
use crate::state::Runtime;

/// One TCP tunnel: where it listens, which agents carry its connections, and its limits.
#[derive(Debug, Clone)]
pub struct TcpTunnel {
    /// The relay's address.
    pub listen: SocketAddr,
    /// The agents that carry it.
    pub pool: Pool,
    /// What the agent connects each connection to.
    pub target: Target,
    /// Connections at once.
    pub max_connections: usize,
    /// Connections from one address at once.
    pub max_connections_per_ip: usize,
    /// How long a connection may carry nothing either way (`None`: forever).
    pub idle_timeout: Option<Duration>,
    /// The PROXY protocol header each connection's upstream receives first, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl TcpTunnel {
    /// A `[[tcp]]` entry's tunnel.
    pub fn from_entry(entry: &TcpEntry) -> Self {
        Self {
            listen: entry.listen,
            pool: Pool::Group(Arc::from(entry.group.as_str())),
            target: Target::Tcp(entry.upstream.clone()),
            max_connections: entry.max_connections,
            max_connections_per_ip: entry.max_connections_per_ip,
            idle_timeout: entry.idle_timeout(),
            proxy_protocol: entry.proxy_protocol,
        }
    }

    /// A declared port's tunnel, with a `[[tcp]]` entry's default limits.
    pub fn declared(listen: SocketAddr, pool: Pool, target: Target) -> Self {
        Self {
            listen,
            pool,
            target,
            max_connections: crate::config::TCP_MAX_CONNECTIONS,
            max_connections_per_ip: crate::config::TCP_MAX_CONNECTIONS_PER_IP,
            idle_timeout: Some(Duration::from_secs(crate::config::TCP_IDLE_TIMEOUT_SECS)),
            proxy_protocol: None,
        }
    }
}

/// Binds a port an agent declared, on `address`, and serves it through `holders` until the
/// returned guard is dropped (or the relay shuts down); the error says why it could not.
pub fn serve_declared(
    runtime: &Arc<Runtime>,
    address: IpAddr,
    response_timeout: Duration,
    port: u16,
    holders: &Arc<Holders>,
) -> Result<(SocketAddr, DropGuard), String> {
    let addr = SocketAddr::new(address, port);
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        })
        .map_err(|err| format!("cannot listen on {addr}: {err}"))?;
    let stop = runtime.shutdown.child_token();
    let tunnel = TcpTunnel::declared(addr, Pool::Holders(holders.clone()), Target::TcpPort(port));
    let serve = serve(bound, tunnel, runtime.clone(), response_timeout);
    let until = stop.clone();
    runtime.tasks.spawn(async move {
        tokio::select! {
            () = serve => {}
            () = until.cancelled() => {}
        }
    });
    tracing::info!(listen = %addr, "declared TCP tunnel listening");
    Ok((addr, stop.drop_guard()))
}

/// One TCP tunnel's listener and its own budgets.
struct Listener {
    tunnel: TcpTunnel,
    connections: Arc<Semaphore>,
    per_ip: Arc<PerKey<IpAddr>>,
}

/// Accepts connections on one TCP tunnel's listener until shutdown.
pub async fn serve(listener: TcpListener, tunnel: TcpTunnel, runtime: Arc<Runtime>, response_timeout: Duration) {
    let this = Arc::new(Listener {
        connections: Arc::new(Semaphore::new(tunnel.max_connections)),
        per_ip: PerKey::new(tunnel.max_connections_per_ip),
        tunnel,
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = runtime.shutdown.cancelled() => break,
            accepted = quictun_core::accept_tcp(&listener, "TCP tunnel") => accepted,
        };
        let Some(slots) = this.admit(&runtime, peer) else { continue };
        let (runtime2, this2) = (runtime.clone(), this.clone());
        let id = Uuid::new_v4();
        let span =
            info_span!("tcp", request_id = %id, %peer, target = %this.tunnel.target, client_id = tracing::field::Empty);
        runtime.tasks.spawn(
            async move {
                carry(stream, peer, id, &this2.tunnel, runtime2, response_timeout).await;
                drop(slots);
            }
            .instrument(span),
        );
    }
}

impl Listener {
    /// The places a new connection from `peer` holds until it ends, or `None` (the refusal
    /// counted and logged) when one of its budgets is full.
    fn admit(&self, runtime: &Runtime, peer: SocketAddr) -> Option<impl Send + use<>> {
        match self.places(runtime, peer.ip()) {
            Ok(places) => Some(places),
            Err((reason, why)) => {
                runtime.metrics.reject(reason);
                debug!(%peer, listen = %self.tunnel.listen, "TCP connection refused: {why}");
                None
            }
        }
    }

    /// The relay's connection budget, the address's requests, the listener's connections and
    /// the address's connections on it, in that order; the first that is full says why.
    fn places(&self, runtime: &Runtime, ip: IpAddr) -> Result<impl Send + use<>, (Reject, &'static str)> {
        let full = |reason, why| move |_| (reason, why);
        let budget = runtime
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(full(Reject::connection_limit, "the relay's connection budget is exhausted"))?;
        let address =
            runtime.requests_per_ip.admit(ip).ok_or((Reject::ip_requests, "too many requests from this address"))?;
        let listener = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(full(Reject::tcp_connections, "the listener's max_connections are open"))?;
        let listener_address = self
            .per_ip
            .admit(ip)
            .ok_or((Reject::tcp_connections_per_ip, "this address has max_connections_per_ip open"))?;
        Ok((budget, address, listener, listener_address))
    }
}

/// How a tunnelled TCP connection ended, for its access-log line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TcpEnd {
    /// Both directions ended cleanly.
    Closed,
    /// A direction failed: the client's connection, or the agent's side.
    Reset(&'static str),
    /// Nothing moved for the tunnel's idle timeout.
    Idle,
    /// The relay shut down.
    Shutdown,
    /// It was never carried: why.
    Refused(String),
}

impl std::fmt::Display for TcpEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            Self::Reset(side) => write!(f, "reset by the {side}"),
            Self::Idle => f.write_str("idle timeout"),
            Self::Shutdown => f.write_str("relay shutdown"),
            Self::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Carries one accepted connection through an agent of the tunnel's pool, then writes its
/// access-log line (client, port, agent, bytes each way, duration, how it ended).
async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    request_id: Uuid,
    tunnel: &TcpTunnel,
    runtime: Arc<Runtime>,
    response_timeout: Duration,
) {
    let started = std::time::Instant::now();
    let mut agent = None;
    let local = stream.local_addr().unwrap_or(tunnel.listen);
    let (end, spliced) = match connect((peer, local), request_id, tunnel, &runtime, response_timeout, &mut agent).await
    {
        Ok((from_agent, to_agent, _served)) => splice_until_end(stream, from_agent, to_agent, tunnel, &runtime).await,
        Err(why) => (TcpEnd::Refused(why), Spliced::default()),
    };
    if let TcpEnd::Refused(why) = &end {
        warn!(why, "TCP connection not carried");
    }
    tracing::info!(
        target: "quictun::access",
        request_id = %request_id,
        client = %peer,
        listen = %tunnel.listen,
        client_id = %agent.as_deref().unwrap_or("-"),
        bytes_to_agent = spliced.from_io,
        bytes_from_agent = spliced.to_io,
        duration_ms = started.elapsed().as_micros() as f64 / 1000.0,
        end = %end,
        "TCP {}",
        tunnel.listen.port()
    );
}

/// Chooses an agent, takes a place in its bulk share and has it connect the target; the
/// connection's two bodies and who carries it (held while it lasts), or why it cannot be
/// carried. In a cluster, a group with no agent here goes to a relay that holds one. `agent`
/// learns who was chosen. `addrs` are the client's and the relay's ends of its connection.
async fn connect(
    (peer, local): (SocketAddr, SocketAddr),
    request_id: Uuid,
    tunnel: &TcpTunnel,
    runtime: &Runtime,
    response_timeout: Duration,
    agent: &mut Option<Arc<str>>,
) -> Result<(TunnelBody, FrameSender, Served), String> {
    let head = RequestHead {
        target: tunnel.target.clone(),
        request_id,
        method: "CONNECT".into(),
        uri: "/".into(),
        headers: vec![quictun_proto::Header { name: "x-forwarded-for".into(), value: peer.ip().to_string().into() }],
        has_body: true,
        framed_body: false,
    };
    let (to_agent, body) = channel_body();
    if let Some(protocol) = tunnel.proxy_protocol {
        // Goes ahead of the client's bytes, and is not counted as theirs.
        let header = quictun_core::proxy_protocol::for_tcp(protocol, peer, local);
        let _ = to_agent.try_send(Ok(http_body::Frame::data(header)));
    }
    let Some(session) = runtime.sessions.choose_in(&tunnel.pool, &Choice::default()) else {
        if let Pool::Group(group) = &tunnel.pool
            && let Some(relays) = forward::holders(runtime, group)
        {
            let checks = BodyChecks::default();
            let request =
                Forward { group, head, body, client: Some(peer.ip()), hash_key: None, idempotent: false, checks };
            let answered = forward::to_peer(runtime, response_timeout, relays, request).await;
            return match answered {
                Ok(answered) => {
                    *agent = Some(answered.served.client_id());
                    match answered.head.status {
                        200 => Ok((answered.body, to_agent, answered.served)),
                        status => Err(format!("the peer relay answered {status}")),
                    }
                }
                Err(undelivered) => {
                    *agent = undelivered.agent;
                    Err(undelivered.error.to_string())
                }
            };
        }
        runtime.metrics.reject(Reject::no_agent);
        return Err(format!("no agent of {} is connected", tunnel.pool.name()));
    };
    tracing::Span::current().record("client_id", &*session.client_id);
    *agent = Some(session.client_id.clone());
    let slot = session.try_stream_permit(StreamKind::Bulk).map_err(|full| {
        runtime.metrics.reject(Reject::agent_bulk_busy);
        full.to_string()
    })?;
    match tokio::time::timeout(response_timeout, session.tunnel.open(head, body, Some(peer.ip()))).await {
        Ok(Ok((head, from_agent))) if head.status == 200 => {
            Ok((from_agent, to_agent, Served::Agent { session, _slot: slot }))
        }
        Ok(Ok((head, _))) => Err(format!("the agent answered {}", head.status)),
        Ok(Err(err)) => Err(format!("the agent could not connect the target: {err}")),
        Err(_) => Err(format!("the agent did not connect the target within {response_timeout:?}")),
    }
}

/// Splices the client's connection to the agent's stream until both end, the connection idles
/// out or the relay stops; the bytes count in `quictun_bytes_total` as they move.
async fn splice_until_end(
    stream: TcpStream,
    from_agent: TunnelBody,
    to_agent: FrameSender,
    tunnel: &TcpTunnel,
    runtime: &Runtime,
) -> (TcpEnd, Spliced) {
    let stream = Watched::new(stream);
    let activity = stream.activity();
    let idle = async {
        match tunnel.idle_timeout {
            Some(timeout) => activity.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    let metrics = &runtime.metrics;
    let (to_client, from_client) = (Counter::default(), Counter::default());
    let meters = SpliceMeters {
        to_io: vec![metrics.bytes_from_agent.clone(), to_client.clone()],
        from_io: vec![metrics.bytes_to_agent.clone(), from_client.clone()],
    };
    let so_far = || Spliced { to_io: to_client.get(), from_io: from_client.get(), ..Spliced::default() };
    tokio::select! {
        spliced = splice_counted(stream, from_agent, to_agent, &meters) => {
            let end = match (spliced.io_ended_cleanly, spliced.peer_ended_cleanly) {
                (true, true) => TcpEnd::Closed,
                (false, _) => TcpEnd::Reset("client"),
                (true, false) => TcpEnd::Reset("agent"),
            };
            (end, spliced)
        }
        () = idle => (TcpEnd::Idle, so_far()),
        () = runtime.stopped.cancelled() => (TcpEnd::Shutdown, so_far()),
    }
}
