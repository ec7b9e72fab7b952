//! One tunnel to the relay, for any transport: register, then run the control session (the loop
//! shared with the relay, [`quictun_core::session`]) while the tunnel serves the relay's requests,
//! until the tunnel ends or the agent stops or switches transport (both drain first).

use std::sync::Arc;
use std::time::Duration;

use quictun_core::body::TunnelBody;
use quictun_core::control::{ControlError, ControlIo, message_name};
use quictun_core::heartbeat::Heartbeats;
use quictun_core::logsafe::Inert;
use quictun_core::session::{Action, Role};
use quictun_core::transport::{Connection, DialError};
use quictun_core::tunnel::{Answer, BoxFuture, CloseReason, ProtocolViolation, RequestHandler, TransportKind, Tunnel};
use quictun_proto::{
    AgentConfig, ClaimAnswer, CloseCode, ControlMessage, GoAway, Limits, Register, RequestHead, Target,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::AgentOptions;
use crate::error::AgentError;
use crate::forward::Forwarder;
use crate::state::AgentState;
use crate::tunnels::Tunnels;
use crate::udp::UdpFlows;
use crate::upstreams::UpstreamTable;

/// Longest the relay may take to answer the register message.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// How a registered session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent was asked to stop and drained.
    Shutdown,
    /// A better transport became available; this session drained and closed.
    Switched,
    /// The relay closed the session because a session with this agent's client_id and instance id
    /// registered after it.
    Replaced,
    /// The tunnel ended; reconnect.
    Lost(CloseReason),
}

/// Why an attempt to reach and register with the relay failed, when another attempt may work.
#[derive(Debug, thiserror::Error)]
pub enum RetryReason {
    /// Dialing over a transport failed.
    #[error("{}: {source}", transport_name(*transport))]
    Dial {
        /// The transport dialed.
        transport: TransportKind,
        /// Why it failed.
        #[source]
        source: DialError,
    },
    /// No QUIC handshake completed, and TCP probes say why.
    #[error("QUIC: {0}")]
    QuicSilent(#[from] crate::diagnose::QuicSilence),
    /// The register exchange failed (the channel failed or timed out).
    #[error("registering: {0}")]
    Register(#[from] ControlError),
    /// The relay refused the session for now (it is shutting down, or at a limit).
    #[error("relay refused the session: {}", Inert(.0))]
    Refused(String),
    /// The relay answered register with something else.
    #[error("relay answered register with an unexpected {0} message")]
    Unexpected(&'static str),
}

/// A transport's name as a user reads it.
pub fn transport_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Quic => "QUIC",
        TransportKind::Grpc => "gRPC",
    }
}

/// Why an attempt failed before a session was established.
#[derive(Debug)]
pub enum Attempt {
    /// Try again after a backoff.
    Retry(RetryReason),
    /// Stop the agent.
    Fatal(AgentError),
}

impl<E: Into<RetryReason>> From<E> for Attempt {
    fn from(err: E) -> Self {
        Self::Retry(err.into())
    }
}

/// The register message this agent process presents to the relay.
pub fn register_message(options: &AgentOptions, instance_id: uuid::Uuid) -> ControlMessage {
    ControlMessage::Register(Register {
        protocol_version: quictun_proto::PROTOCOL_VERSION,
        client_id: options.client_id.clone(),
        group: options.group.clone(),
        token: options.token.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        instance_id,
    })
}

/// Waits for the relay's answer to the register message the dial sent on `connection`'s
/// control channel (see [`register_message`]), then serves its tunnel until it ends or the agent
/// is asked to stop.
pub async fn register_and_serve<C: ControlIo>(
    options: &AgentOptions,
    connection: Connection<C>,
    forwarder: &Arc<Forwarder>,
    state: &watch::Sender<AgentState>,
    stop: &Stop,
) -> Result<SessionEnd, Attempt> {
    let Connection { mut control, tunnel, .. } = connection;
    let accepted = match control.recv_within(REGISTER_TIMEOUT).await? {
        ControlMessage::Accepted(accepted) => accepted,
        ControlMessage::Rejected(rejected) => {
            tunnel.close(CloseCode::Rejected);
            if rejected.code.is_permanent() {
                return Err(Attempt::Fatal(AgentError::Rejected { code: rejected.code, message: rejected.message }));
            }
            return Err(RetryReason::Refused(rejected.message).into());
        }
        other => {
            tunnel.close(CloseCode::Protocol);
            return Err(RetryReason::Unexpected(message_name(&other)).into());
        }
    };
    let tunnels = forwarder.tunnels.subscribe();
    forwarder.install_fresh(upstream_table(options, &accepted.config, &tunnels.borrow()));
    let span = info_span!("session", client_id = %options.client_id, session_id = %accepted.session_id);
    span.in_scope(|| {
        let table = forwarder.upstreams();
        let upstreams = table.names().collect::<Vec<_>>().join(", ");
        info!(relay = %tunnel.remote_addr(), config_version = accepted.config.version, %upstreams, "registered with relay");
    });
    let (session_id, relay, transport) =
        (accepted.session_id, tunnel.remote_addr(), transport_name(tunnel.transport()));
    state.send_replace(AgentState::Connected { session_id, relay, transport });
    let interval = Duration::from_millis(u64::from(accepted.heartbeat_interval_ms.max(50)));
    let heartbeats = Heartbeats::new(interval, accepted.heartbeat_misses.max(1));
    let role = AgentRole::new(options, forwarder, stop, tunnels, accepted.config);
    Ok(serve(options, &mut control, &tunnel, forwarder, heartbeats, role).instrument(span).await)
}

/// The upstreams the agent serves: the relay's `pushed` ones, its own, and its HTTP tunnels.
fn upstream_table(options: &AgentOptions, pushed: &AgentConfig, tunnels: &Tunnels) -> UpstreamTable {
    let local: Vec<_> = options.local_upstreams.iter().cloned().chain(tunnels.upstreams()).collect();
    UpstreamTable::build(pushed, &local, options.allowed_targets.as_deref(), options.upstream_ca_file.as_deref())
}

/// What ends a session on the agent's own initiative (both drain first).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The agent is shutting down.
    pub shutdown: CancellationToken,
    /// Another transport should take over.
    pub switch: CancellationToken,
}

/// Why the agent ends a session itself.
#[derive(Debug, Clone, Copy)]
enum OwnEnd {
    Shutdown,
    Switched,
}

/// What the agent does in a session beyond heartbeats: applies config_sync, claims its declared
/// tunnels (at once, and again when they change) and reports the relay's answers, notes the
/// relay's go-away, and says go-away itself when it stops or switches.
struct AgentRole<'a> {
    options: &'a AgentOptions,
    forwarder: &'a Forwarder,
    stop: &'a Stop,
    tunnels: watch::Receiver<Arc<Tunnels>>,
    /// The relay's configuration for the agent, as last pushed.
    pushed: AgentConfig,
}

impl<'a> AgentRole<'a> {
    fn new(
        options: &'a AgentOptions,
        forwarder: &'a Forwarder,
        stop: &'a Stop,
        mut tunnels: watch::Receiver<Arc<Tunnels>>,
        pushed: AgentConfig,
    ) -> Self {
        // An agent that declares nothing sends no claims (a relay of an older version would not
        // know the message); one that does claims them first thing.
        if !tunnels.borrow_and_update().is_empty() {
            tunnels.mark_changed();
        }
        Self { options, forwarder, stop, tunnels, pushed }
    }

    /// Logs and counts the relay's answers to the agent's claims.
    fn answered(&self, answers: Vec<ClaimAnswer>) {
        let tunnels = self.tunnels.borrow().clone();
        for answer in &answers {
            let target = tunnels.target_of(&answer.claim).unwrap_or_default();
            match &answer.refused {
                None => info!(claim = %answer.claim, %target, "tunnel accepted by the relay"),
                Some(why) => {
                    self.forwarder.metrics().tunnels_refused.inc();
                    warn!(claim = %answer.claim, %target, why = %Inert(why), "tunnel refused by the relay");
                }
            }
        }
        self.forwarder.answers.send_replace(answers);
    }

    fn go_away(&self, reason: &str) -> ControlMessage {
        let drain_ms = u32::try_from(self.options.drain_timeout.as_millis()).unwrap_or(u32::MAX);
        ControlMessage::GoAway(GoAway { drain_ms, reason: reason.into() })
    }
}

impl Role for AgentRole<'_> {
    type End = OwnEnd;

    fn round_trip(&mut self, rtt: Duration) {
        debug!(?rtt, "heartbeat");
    }

    fn on_message(&mut self, msg: ControlMessage) -> Result<(), ProtocolViolation> {
        match msg {
            ControlMessage::ConfigSync(config) => {
                let version = config.version;
                let table = upstream_table(self.options, &config, &self.tunnels.borrow());
                self.pushed = config;
                if self.forwarder.install(table) {
                    info!(version, "applied config_sync");
                } else {
                    debug!(version, "ignored stale config_sync");
                }
                Ok(())
            }
            ControlMessage::GoAway(go) => {
                info!(reason = %Inert(&go.reason), drain_ms = go.drain_ms, "relay going away");
                Ok(())
            }
            ControlMessage::ClaimAnswers(answers) => {
                self.answered(answers);
                Ok(())
            }
            other => Err(ProtocolViolation::Unexpected(message_name(&other))),
        }
    }

    async fn next(&mut self) -> Action<OwnEnd> {
        tokio::select! {
            _ = self.stop.shutdown.cancelled() => Action::SendThenEnd(self.go_away("agent shutting down"), OwnEnd::Shutdown),
            _ = self.stop.switch.cancelled() => Action::SendThenEnd(self.go_away("agent switching transport"), OwnEnd::Switched),
            Ok(()) = self.tunnels.changed() => {
                let tunnels = self.tunnels.borrow_and_update().clone();
                self.forwarder.install_fresh(upstream_table(self.options, &self.pushed, &tunnels));
                Action::Send(ControlMessage::Claims(tunnels.claims()))
            }
        }
    }
}

/// Serves the relay's requests on `tunnel` while the control session runs; drains when the agent
/// ends the session itself.
async fn serve<C: ControlIo>(
    options: &AgentOptions,
    control: &mut C,
    tunnel: &Arc<dyn Tunnel>,
    forwarder: &Arc<Forwarder>,
    mut heartbeats: Heartbeats,
    mut role: AgentRole<'_>,
) -> SessionEnd {
    let streams = TaskTracker::new();
    let cancel_streams = CancellationToken::new();
    let udp = UdpFlows::new(
        tunnel.clone(),
        forwarder.metrics().udp.clone(),
        options.allowed_targets.clone(),
        options.connect_timeout,
    );
    // The DATAGRAM reader ends with the tunnel, or with this function (never part of the drain).
    let datagrams = udp.table().clone().read_datagrams();
    tokio::spawn(quictun_core::until_cancelled(datagrams, cancel_streams.clone()).in_current_span());
    let handler = Arc::new(SessionHandler { forwarder: forwarder.clone(), udp: udp.clone() });
    let tunnel = tunnel.as_ref();
    let ended = {
        let requests = tunnel.serve(handler, streams.clone(), cancel_streams.clone());
        let session = quictun_core::session::run(control, tunnel, &mut heartbeats, &mut role);
        tokio::select! {
            reason = requests => Err(reason),
            ended = session => ended,
        }
    };
    streams.close();
    let end = match ended {
        Ok(own) => {
            udp.end_all();
            info!(in_flight = streams.len(), drain = ?options.drain_timeout, "draining");
            if tokio::time::timeout(options.drain_timeout, streams.wait()).await.is_err() {
                warn!(in_flight = streams.len(), "drain timeout: cancelling remaining streams");
            }
            tunnel.close(CloseCode::GoingAway);
            tunnel.flush_close().await;
            match own {
                OwnEnd::Shutdown => SessionEnd::Shutdown,
                OwnEnd::Switched => SessionEnd::Switched,
            }
        }
        Err(reason) if reason.peer_code() == Some(CloseCode::Replaced) => SessionEnd::Replaced,
        Err(reason) => SessionEnd::Lost(reason),
    };
    cancel_streams.cancel();
    end
}

/// What serves one session's exchanges: a UDP flow belongs to the session (its DATAGRAM frames
/// cross this tunnel), everything else goes to the agent's forwarder.
struct SessionHandler {
    forwarder: Arc<Forwarder>,
    udp: Arc<UdpFlows>,
}

impl RequestHandler for SessionHandler {
    fn handle(&self, head: RequestHead, body: TunnelBody) -> BoxFuture<'_, Answer> {
        match head.target {
            Target::Udp(flow) => Box::pin(async move { self.udp.open(&flow, body).await }),
            _ => self.forwarder.handle(head, body),
        }
    }

    fn limits(&self) -> Limits {
        self.forwarder.limits()
    }
}
