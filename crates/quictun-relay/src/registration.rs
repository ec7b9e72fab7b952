//! Registration and the life of a session, for any transport: read the register message under a
//! deadline, authenticate, answer accepted or rejected, then heartbeats, config_sync and go-away
//! until the connection ends. The session is in the session manager exactly while this runs.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use quictun_core::control::{ControlError, ControlIo, message_name};
use quictun_core::heartbeat::Heartbeats;
use quictun_core::session::{Action, Role};
use quictun_core::tunnel::{Admission, ProtocolViolation, Tunnel};
use quictun_proto::{Accepted, CloseCode, ControlMessage, GoAway, RejectCode, Rejected};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::egress::EgressHandler;
use crate::metrics::RegisterHandshake;
use crate::sessions::{Session, SessionCommand};
use crate::state::RelayState;

/// How long a rejected agent gets to read the rejection before the connection is closed.
const REJECT_LINGER: Duration = Duration::from_secs(2);

async fn reject<C: ControlIo>(control: &mut C, tunnel: &dyn Tunnel, rejected: Rejected) {
    // Best effort: the agent learns why, then we close whatever it does.
    if let Err(err) = control.send(ControlMessage::Rejected(rejected)).await {
        tracing::debug!(%err, "could not deliver the rejection");
    }
    control.finish();
    let _lingered = tokio::time::timeout(REJECT_LINGER, tunnel.closed()).await;
    tunnel.close(CloseCode::Rejected);
}

/// Registers the agent on `control` and serves its session until the connection ends.
/// `admission` holds the connection's place among those not registered yet until then;
/// `handshake` says how the register came (for the metrics).
pub async fn serve_agent<C: ControlIo>(
    mut control: C,
    tunnel: Arc<dyn Tunnel>,
    shared: Arc<RelayState>,
    admission: Admission,
    handshake: RegisterHandshake,
) {
    let register_timeout = Duration::from_secs(shared.settings.register_timeout_secs);
    let register = match control.recv_within(register_timeout).await {
        Ok(ControlMessage::Register(register)) => register,
        Ok(other) => {
            tunnel.close(CloseCode::Protocol);
            return warn!(message = message_name(&other), "first control message was not register");
        }
        Err(err) => {
            let code =
                if matches!(err, ControlError::Timeout(_)) { CloseCode::HandshakeTimeout } else { CloseCode::Protocol };
            tunnel.close(code);
            return warn!(%err, "no valid register message");
        }
    };
    // A register that came as QUIC 0-RTT data can be replayed by whoever recorded it. While the
    // handshake is not complete it is answered at once (so that the agent is registered after one
    // round trip), but a session enters the session manager, replacing an older one, only once
    // the handshake completes: a replay never completes it (that takes the agent's keys), so it
    // changes nothing. rustls also refuses a replayed ticket's early data (see the endpoint).
    let mut handshake_complete = tunnel.handshake_complete();
    let early = match (&mut handshake_complete).now_or_never() {
        Some(true) => false,
        Some(false) => return debug!("connection failed during registration"),
        None => true,
    };
    let span = info_span!("session", client_id = %register.client_id, transport = tunnel.transport().as_str());
    let live = shared.live.current();
    let authenticated = live.authenticate(&register);
    // Registered or refused: no longer pending either way.
    drop(admission);
    let group = match authenticated {
        Ok(group) if !shared.runtime.shutdown.is_cancelled() => group,
        Ok(_) => {
            let rejected = Rejected { code: RejectCode::ShuttingDown, message: "relay is shutting down".into() };
            return reject(&mut control, tunnel.as_ref(), rejected).await;
        }
        Err(rejected) => {
            shared.runtime.metrics.reject(crate::metrics::Reject::registration);
            span.in_scope(|| warn!(code = ?rejected.code, reason = %rejected.message, "registration rejected"));
            return reject(&mut control, tunnel.as_ref(), rejected).await;
        }
    };
    let (commands, command_rx) = mpsc::channel(8);
    let session = Arc::new(Session::new(
        &register.client_id,
        register.instance_id,
        &group,
        tunnel.clone(),
        shared.settings.max_streams_per_agent,
        shared.settings.heartbeat_interval(),
        commands,
    ));
    session.heard();
    let accepted = Accepted {
        session_id: session.session_id,
        heartbeat_interval_ms: shared.settings.heartbeat_interval_ms,
        heartbeat_misses: shared.settings.heartbeat_misses,
        config: live.agent_config(&group),
    };
    drop(live);
    async {
        let max_instances = shared.settings.max_instances_per_client;
        let too_many = |connected: usize| {
            shared.runtime.metrics.reject(crate::metrics::Reject::registration);
            let message = format!(
                "client {} has {connected} instances connected, the most this relay allows (max_instances_per_client)",
                register.client_id
            );
            warn!(instance_id = %register.instance_id, "{message}");
            Rejected { code: RejectCode::TooManyInstances, message }
        };
        if early {
            let sessions = &shared.runtime.sessions;
            let connected = sessions.instances(&session.client_id).len();
            if connected >= max_instances && !sessions.has_instance(&session.client_id, session.instance_id) {
                return reject(&mut control, tunnel.as_ref(), too_many(connected)).await;
            }
            if let Err(err) = control.send(ControlMessage::Accepted(accepted.clone())).await {
                return warn!(%err, "could not send accepted");
            }
        }
        if early && !matches!(tokio::time::timeout(register_timeout, handshake_complete).await, Ok(true)) {
            shared.runtime.metrics.reject(crate::metrics::Reject::unconfirmed_0rtt);
            tunnel.close(CloseCode::HandshakeTimeout);
            return warn!("0-RTT register whose handshake never completed: not registered (a replay, or the agent vanished)");
        }
        match shared.runtime.sessions.insert(session.clone(), max_instances) {
            Ok(Some(old)) => info!(old_session = %old.session_id, "replaced this instance's older connection"),
            Ok(None) => {}
            Err(full) => return reject(&mut control, tunnel.as_ref(), too_many(full.connected)).await,
        }
        if !early && let Err(err) = control.send(ControlMessage::Accepted(accepted)).await {
            shared.runtime.sessions.remove(&session);
            return warn!(%err, "could not send accepted");
        }
        shared.runtime.metrics.registered(handshake);
        let instances = shared.runtime.sessions.instances(&session.client_id).len();
        info!(session_id = %session.session_id, instance_id = %session.instance_id, instances, group = %session.group, agent_version = %register.agent_version, ?handshake, "agent registered");
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
            RelayRole { session: &session, shared: &shared, commands: command_rx, going_away: false, agent_left: false };
        let ended = quictun_core::session::run(&mut control, tunnel.as_ref(), &mut heartbeats, &mut role).await;
        let reason = match ended {
            Err(reason) => reason,
            Ok(never) => match never {},
        };
        egress.cancel();
        shared.runtime.sessions.remove(&session);
        let said_goodbye = role.agent_left || matches!(reason.peer_code(), Some(CloseCode::GoingAway | CloseCode::Normal));
        if said_goodbye {
            // A deploy, Ctrl-C: the agent drained before closing.
            info!(session_id = %session.session_id, %reason, "agent stopped gracefully");
        } else {
            info!(session_id = %session.session_id, %reason, "agent connection lost");
        }
    }
    .instrument(span)
    .await;
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
                info!(reason = %go.reason, drain_ms = go.drain_ms, "agent going away");
                self.agent_left = true;
                self.session.set_draining();
                self.shared.runtime.sessions.remove(self.session);
                Ok(())
            }
            other => Err(ProtocolViolation::Unexpected(message_name(&other))),
        }
    }

    async fn next(&mut self) -> Action<Infallible> {
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
            },
            else => std::future::pending().await,
        }
    }
}
