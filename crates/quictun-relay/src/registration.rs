//! Registration and the life of a session, for any transport: read the register message under a
//! deadline, authenticate, answer accepted or rejected, then heartbeats, config_sync and go-away
//! until the connection ends. The session is in the session manager exactly while this runs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use quictun_core::control::{ControlError, ControlIo, message_name};
use quictun_core::heartbeat::Heartbeats;
use quictun_core::logsafe::Inert;
use quictun_core::session::{Action, Role};
use quictun_core::transport::Connection;
use quictun_core::tunnel::{Admission, BoxFuture, ProtocolViolation, Tunnel};
use quictun_proto::{Accepted, ClaimAnswer, CloseCode, ControlMessage, GoAway, Register, RejectCode, Rejected};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::declared::Rules;
use crate::egress::EgressHandler;
use crate::metrics::RegisterHandshake;
use crate::sessions::{Holders, Session, SessionCommand, SessionLimits};
use crate::state::RelayState;

/// How long a rejected agent gets to read the rejection before the connection is closed.
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// Answers `rejected`, lets the peer read it (bounded), and closes the connection.
async fn reject<C: ControlIo>(control: &mut C, tunnel: &dyn Tunnel, rejected: Rejected) {
    // Best effort: the agent learns why, then we close whatever it does.
    if let Err(err) = control.send(ControlMessage::Rejected(rejected)).await {
        tracing::debug!(%err, "could not deliver the rejection");
    }
    control.finish();
    let _lingered = tokio::time::timeout(REJECT_LINGER, tunnel.closed()).await;
    tunnel.close(CloseCode::Rejected);
}

/// Registers the agent of `connection` and serves its session until the connection ends.
/// `admission` holds the connection's place among those not registered yet until then.
///
/// The register message decides the path. One that came after the handshake (or on a transport
/// without early data) registers at once. One that came as QUIC 0-RTT data could be a replay by
/// whoever recorded it: it is answered at once (so that the agent is registered after one round
/// trip), but the session enters the session manager, replacing an older one of its instance,
/// only once the handshake completes; a replay never completes it (that takes the agent's keys),
/// so it changes nothing. rustls also refuses a replayed ticket's early data (see the endpoint).
///
/// A connection whose first message is a peer relay's hello is a link of the cluster instead
/// ([`crate::from_peers`]).
pub async fn serve_agent<C: ControlIo>(connection: Connection<C>, shared: Arc<RelayState>, admission: Admission) {
    let Connection { mut control, tunnel, early_data } = connection;
    let register = match read_first(&mut control, tunnel.as_ref(), &shared).await {
        Some(First::Register(register)) => register,
        Some(First::Peer(hello)) => {
            if let Err(rejected) = crate::from_peers::admit(&hello, &shared) {
                drop(admission);
                warn!(peer = %Inert(&hello.relay_id), code = ?rejected.code, reason = %rejected.message, "peer relay refused");
                return reject(&mut control, tunnel.as_ref(), rejected).await;
            }
            let connection = Connection { control, tunnel, early_data };
            return crate::from_peers::serve_peer(connection, hello, shared, admission).await;
        }
        None => return,
    };
    let mut handshake_complete = tunnel.handshake_complete();
    let arrival = match (&mut handshake_complete).now_or_never() {
        Some(true) => Arrival::Confirmed,
        Some(false) => return debug!("connection failed during registration"),
        None => Arrival::Early(handshake_complete),
    };
    let span = info_span!("session", client_id = %Inert(&register.client_id), transport = tunnel.transport().as_str());
    let handshake = if early_data { RegisterHandshake::zero_rtt } else { RegisterHandshake::complete };
    async {
        let authenticated = shared.live.current().authenticate(&register);
        // Registered or refused: no longer pending either way.
        drop(admission);
        let group = match authenticated {
            Ok(_) if shared.runtime.shutdown.is_cancelled() => {
                let rejected = Rejected { code: RejectCode::ShuttingDown, message: "relay is shutting down".into() };
                return reject(&mut control, tunnel.as_ref(), rejected).await;
            }
            Ok(group) => group,
            Err(rejected) => {
                shared.runtime.metrics.reject(crate::metrics::Reject::registration);
                warn!(code = ?rejected.code, reason = %Inert(&rejected.message), "registration rejected");
                return reject(&mut control, tunnel.as_ref(), rejected).await;
            }
        };
        let (session, accepted, commands) = new_session(&register, &group, &tunnel, &shared);
        let entered = match arrival {
            Arrival::Confirmed => enter_confirmed(&mut control, &session, accepted, &shared).await,
            Arrival::Early(handshake) => enter_early(&mut control, &session, accepted, handshake, &shared).await,
        };
        let Err(rejected) = entered else {
            shared.runtime.metrics.registered(handshake);
            shared.runtime.known_networks.note(session.remote().ip());
            let instances = shared.runtime.sessions.instances(&session.client_id).len();
            info!(session_id = %session.session_id, instance_id = %session.instance_id, instances, group = %session.group, agent_version = %Inert(&register.agent_version), ?handshake, "agent registered");
            return run_session(control, session, commands, shared).await;
        };
        if let Some(rejected) = rejected {
            reject(&mut control, tunnel.as_ref(), rejected).await;
        }
    }
    .instrument(span)
    .await;
}

/// How the register message arrived.
enum Arrival<'a> {
    /// After the handshake: it is the agent's.
    Confirmed,
    /// As 0-RTT data: it is the agent's once this resolves true.
    Early(BoxFuture<'a, bool>),
}

/// What a connection's first control message says it is.
enum First {
    /// An agent.
    Register(Register),
    /// A relay of the cluster.
    Peer(quictun_proto::PeerHello),
}

/// The first control message, which must be register or a peer relay's hello (under the
/// registration deadline); the connection is closed otherwise.
async fn read_first<C: ControlIo>(control: &mut C, tunnel: &dyn Tunnel, shared: &RelayState) -> Option<First> {
    let register_timeout = Duration::from_secs(shared.settings.register_timeout_secs);
    match control.recv_within(register_timeout).await {
        Ok(ControlMessage::Register(register)) => Some(First::Register(register)),
        Ok(ControlMessage::PeerHello(hello)) => Some(First::Peer(hello)),
        Ok(other) => {
            tunnel.close(CloseCode::Protocol);
            warn!(message = message_name(&other), "first control message was not register");
            None
        }
        Err(err) => {
            let timed_out = matches!(err, ControlError::Timeout(_));
            tunnel.close(if timed_out { CloseCode::HandshakeTimeout } else { CloseCode::Protocol });
            warn!(%err, "no valid register message");
            None
        }
    }
}

/// The session a register creates, the answer it gets, and its command channel.
fn new_session(
    register: &Register,
    group: &str,
    tunnel: &Arc<dyn Tunnel>,
    shared: &RelayState,
) -> (Arc<Session>, Accepted, mpsc::Receiver<SessionCommand>) {
    let (commands, command_rx) = mpsc::channel(8);
    let settings = &shared.settings;
    let limits = SessionLimits {
        max_streams: settings.max_streams_per_agent,
        max_bulk_streams: settings.max_bulk_streams(),
        heartbeat_interval: settings.heartbeat_interval(),
        silent_after: settings.silence_check(),
    };
    let session =
        Arc::new(Session::new(&register.client_id, register.instance_id, group, tunnel.clone(), limits, commands));
    session.heard();
    let accepted = Accepted {
        session_id: session.session_id,
        heartbeat_interval_ms: settings.heartbeat_interval_ms,
        heartbeat_misses: settings.heartbeat_misses,
        config: shared.live.current().agent_config(group),
    };
    (session, accepted, command_rx)
}

/// Why a session did not enter: the rejection to send, or nothing (the connection is already
/// closed or failed).
type NotEntered = Option<Rejected>;

/// A confirmed register: the session enters the manager (within the instance cap), then the
/// agent is told.
async fn enter_confirmed<C: ControlIo>(
    control: &mut C,
    session: &Arc<Session>,
    accepted: Accepted,
    shared: &RelayState,
) -> Result<(), NotEntered> {
    insert(session, shared)?;
    if let Err(err) = control.send(ControlMessage::Accepted(accepted)).await {
        shared.runtime.sessions.remove(session);
        warn!(%err, "could not send accepted");
        return Err(None);
    }
    Ok(())
}

/// A 0-RTT register: answered at once (when the instance cap allows it), entered once the
/// handshake completes; a handshake that never does (a replay, or an agent that vanished)
/// registers nothing.
async fn enter_early<C: ControlIo>(
    control: &mut C,
    session: &Arc<Session>,
    accepted: Accepted,
    handshake: BoxFuture<'_, bool>,
    shared: &RelayState,
) -> Result<(), NotEntered> {
    let sessions = &shared.runtime.sessions;
    let connected = sessions.instances(&session.client_id).len();
    if connected >= shared.settings.max_instances_per_client
        && !sessions.has_instance(&session.client_id, session.instance_id)
    {
        return Err(Some(too_many_instances(session, connected, shared)));
    }
    if let Err(err) = control.send(ControlMessage::Accepted(accepted)).await {
        warn!(%err, "could not send accepted");
        return Err(None);
    }
    let register_timeout = Duration::from_secs(shared.settings.register_timeout_secs);
    if !matches!(tokio::time::timeout(register_timeout, handshake).await, Ok(true)) {
        shared.runtime.metrics.reject(crate::metrics::Reject::unconfirmed_0rtt);
        session.tunnel.close(CloseCode::HandshakeTimeout);
        warn!("0-RTT register whose handshake never completed: not registered (a replay, or the agent vanished)");
        return Err(None);
    }
    insert(session, shared)
}

/// Enters `session` in the manager, replacing an older one of its instance, within the
/// instance cap.
fn insert(session: &Arc<Session>, shared: &RelayState) -> Result<(), NotEntered> {
    match shared.runtime.sessions.insert(session.clone(), shared.settings.max_instances_per_client) {
        Ok(Some(old)) => info!(old_session = %old.session_id, "replaced this instance's older connection"),
        Ok(None) => {}
        Err(full) => return Err(Some(too_many_instances(session, full.connected, shared))),
    }
    Ok(())
}

/// The rejection of one instance more than `max_instances_per_client` (counted and logged).
fn too_many_instances(session: &Session, connected: usize, shared: &RelayState) -> Rejected {
    shared.runtime.metrics.reject(crate::metrics::Reject::registration);
    let message = format!(
        "client {} has {connected} instances connected, the most this relay allows (max_instances_per_client)",
        session.client_id
    );
    warn!(instance_id = %session.instance_id, "{}", Inert(&message));
    Rejected { code: RejectCode::TooManyInstances, message }
}

/// Serves a registered session (its egress requests, heartbeats, config_sync, go-away) until
/// the connection ends, then removes it.
async fn run_session<C: ControlIo>(
    mut control: C,
    session: Arc<Session>,
    commands: mpsc::Receiver<SessionCommand>,
    shared: Arc<RelayState>,
) {
    let tunnel = session.tunnel.clone();
    // The agent's egress requests are served while the session lasts.
    let egress = CancellationToken::new();
    let handler = Arc::new(EgressHandler::new(shared.clone(), Arc::from(session.group.as_ref())));
    let (egress_tunnel, tasks, cancel) = (tunnel.clone(), shared.runtime.tasks.clone(), egress.clone());
    let serve_egress = async move {
        egress_tunnel.serve(handler, tasks, cancel).await;
    };
    quictun_core::spawn_cancellable(&shared.runtime.tasks, &egress, serve_egress.in_current_span());
    let mut heartbeats = Heartbeats::new(shared.settings.heartbeat_interval(), shared.settings.heartbeat_misses);
    let mut role =
        RelayRole { session: &session, shared: &shared, commands, going_away: false, agent_left: false, answers: None };
    let reason = match quictun_core::session::run(&mut control, tunnel.as_ref(), &mut heartbeats, &mut role).await {
        Err(reason) => reason,
        Ok(never) => match never {},
    };
    egress.cancel();
    shared.runtime.sessions.remove(&session);
    shared.runtime.declared.release(&session);
    let said_goodbye = role.agent_left || matches!(reason.peer_code(), Some(CloseCode::GoingAway | CloseCode::Normal));
    if said_goodbye {
        // A deploy, Ctrl-C: the agent drained before closing.
        info!(session_id = %session.session_id, %reason, "agent stopped gracefully");
    } else {
        info!(session_id = %session.session_id, %reason, "agent connection lost");
    }
}

/// What the relay does in a session beyond heartbeats: tracks the agent's health, takes its
/// go-away, and sends config_sync and its own go-away.
struct RelayRole<'a> {
    session: &'a Arc<Session>,
    shared: &'a RelayState,
    commands: mpsc::Receiver<SessionCommand>,
    going_away: bool,
    /// The agent said go-away: it is stopping (a deploy, Ctrl-C) and drains first.
    agent_left: bool,
    /// The answers to the agent's last claims, not sent yet.
    answers: Option<Vec<ClaimAnswer>>,
}

impl Role for RelayRole<'_> {
    /// The relay never ends a session by itself: it ends when the tunnel closes.
    type End = Infallible;

    fn heard(&mut self) {
        self.session.heard();
    }

    fn round_trip(&mut self, rtt: Duration) {
        self.session.set_rtt(rtt);
    }

    fn on_message(&mut self, msg: ControlMessage) -> Result<(), ProtocolViolation> {
        match msg {
            ControlMessage::GoAway(go) => {
                info!(reason = %Inert(&go.reason), drain_ms = go.drain_ms, "agent going away");
                self.agent_left = true;
                self.session.set_draining();
                self.shared.runtime.sessions.remove(self.session);
                self.shared.runtime.declared.release(self.session);
                Ok(())
            }
            ControlMessage::Claims(claims) if !self.agent_left => {
                let (shared, live) = (self.shared, self.shared.live.current());
                let allowed = live.allowances(&self.session.client_id).cloned().unwrap_or_default();
                let timeout = Duration::from_secs(shared.settings.response_timeout_secs);
                let open_port = |port, holders: &Arc<Holders>| {
                    let address = shared.settings.declared_tcp_address;
                    crate::tcp::serve_declared(&shared.runtime, address, timeout, port, holders)
                };
                let rules = Rules { allowed: &allowed, router: &live.router, open_port: &open_port };
                self.answers = Some(shared.runtime.declared.claim(&rules, self.session, claims));
                Ok(())
            }
            ControlMessage::Claims(_) => Ok(()),
            other => Err(ProtocolViolation::Unexpected(message_name(&other))),
        }
    }

    async fn next(&mut self) -> Action<Infallible> {
        if let Some(answers) = self.answers.take() {
            return Action::Send(ControlMessage::ClaimAnswers(answers));
        }
        tokio::select! {
            _ = self.shared.runtime.shutdown.cancelled(), if !self.going_away => {
                // The session stays in use: requests the ingress accepted before the signal still
                // need it while the relay drains. The agent learns to expect the close.
                self.going_away = true;
                let drain_ms = u32::try_from(self.shared.settings.drain_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
                Action::Send(ControlMessage::GoAway(GoAway { drain_ms, reason: "relay shutting down".into() }))
            }
            Some(command) = self.commands.recv() => match command {
                SessionCommand::ConfigSync(config) => Action::Send(ControlMessage::ConfigSync(config)),
                SessionCommand::ClaimAnswers(answers) => Action::Send(ControlMessage::ClaimAnswers(answers)),
            },
            else => std::future::pending().await,
        }
    }
}
