//! Registration and the life of a session, for any transport: read the register message under a
//! deadline, authenticate, answer accepted or rejected, then heartbeats, config_sync and go-away
//! until the connection ends. The session is in the session manager exactly while this runs.

use std::sync::Arc;
use std::time::Duration;

use quictun_core::framed::ControlError;
use quictun_core::heartbeat::Heartbeats;
use quictun_core::link::{AgentLink, ControlIo};
use quictun_proto::{Accepted, CloseCode, ControlMessage, GoAway, RejectCode, Rejected};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::egress::EgressHandler;
use crate::sessions::{Session, SessionCommand};
use crate::state::Shared;

/// How long a rejected agent gets to read the rejection before the connection is closed.
const REJECT_LINGER: Duration = Duration::from_secs(2);

/// The name of a control message, for logs.
pub fn kind(msg: &ControlMessage) -> &'static str {
    match msg {
        ControlMessage::Register(_) => "register",
        ControlMessage::Accepted(_) => "accepted",
        ControlMessage::Rejected(_) => "rejected",
        ControlMessage::ConfigSync(_) => "config_sync",
        ControlMessage::Heartbeat(_) => "heartbeat",
        ControlMessage::HeartbeatAck(_) => "heartbeat_ack",
        ControlMessage::GoAway(_) => "go_away",
    }
}

async fn reject<C: ControlIo>(control: &mut C, link: &dyn AgentLink, rejected: Rejected) {
    // Best effort: the agent learns why, then we close whatever it does.
    if let Err(err) = control.send(ControlMessage::Rejected(rejected)).await {
        tracing::debug!(%err, "could not deliver the rejection");
    }
    control.finish();
    let _lingered = tokio::time::timeout(REJECT_LINGER, link.closed()).await;
    link.close(CloseCode::Rejected);
}

/// Registers the agent on `control` and serves its session until the connection ends.
/// `admission` holds the connection's place among those not registered yet until then.
pub async fn serve_agent<C: ControlIo>(
    mut control: C,
    link: Arc<dyn AgentLink>,
    shared: Arc<Shared>,
    admission: Box<dyn std::any::Any + Send + Sync>,
) {
    let register_timeout = Duration::from_secs(shared.settings.register_timeout_secs);
    let register = match control.recv_within(register_timeout).await {
        Ok(ControlMessage::Register(register)) => register,
        Ok(other) => {
            link.close(CloseCode::Protocol);
            return warn!(message = kind(&other), "first control message was not register");
        }
        Err(err) => {
            let code =
                if matches!(err, ControlError::Timeout(_)) { CloseCode::HandshakeTimeout } else { CloseCode::Protocol };
            link.close(code);
            return warn!(%err, "no valid register message");
        }
    };
    let span = info_span!("session", client_id = %register.client_id, transport = link.transport());
    let live = shared.live();
    let authenticated = live.authenticate(&register);
    // Registered or refused: no longer pending either way.
    drop(admission);
    let group = match authenticated {
        Ok(group) if !shared.shutdown.is_cancelled() => group,
        Ok(_) => {
            let rejected = Rejected { code: RejectCode::ShuttingDown, message: "relay is shutting down".into() };
            return reject(&mut control, link.as_ref(), rejected).await;
        }
        Err(rejected) => {
            shared.metrics.reject(crate::metrics::Reject::registration);
            span.in_scope(|| warn!(code = ?rejected.code, reason = %rejected.message, "registration rejected"));
            return reject(&mut control, link.as_ref(), rejected).await;
        }
    };
    let (commands, command_rx) = mpsc::channel(8);
    let session = Arc::new(Session::new(
        &register.client_id,
        &group,
        link.clone(),
        shared.settings.max_streams_per_agent,
        shared.settings.heartbeat_interval(),
        commands,
    ));
    session.heard();
    let accepted = Accepted {
        session_id: session.session_id,
        heartbeat_interval_ms: shared.settings.heartbeat_interval_ms,
        config: live.agent_config(&group),
    };
    drop(live);
    async {
        if let Err(err) = control.send(ControlMessage::Accepted(accepted)).await {
            return warn!(%err, "could not send accepted");
        }
        if let Some(old) = shared.sessions.insert(session.clone()) {
            info!(old_session = %old.session_id, "replaced an older connection of this client");
        }
        info!(session_id = %session.session_id, group = %session.group, agent_version = %register.agent_version, "agent registered");
        // The agent's egress requests are served while the session lasts.
        let egress = CancellationToken::new();
        let handler = Arc::new(EgressHandler::new(shared.clone(), Arc::from(session.group.as_ref())));
        let (egress_link, tasks, cancel) = (link.clone(), shared.tasks.clone(), egress.clone());
        let serve_egress = async move { egress_link.serve_peer_requests(handler, tasks, cancel).await };
        quictun_core::spawn_cancellable(&shared.tasks, &egress, serve_egress.in_current_span());
        let reason = run_session(&mut control, &session, command_rx, &shared).await;
        egress.cancel();
        shared.sessions.remove(&session);
        info!(session_id = %session.session_id, %reason, "agent disconnected");
    }
    .instrument(span)
    .await;
}

/// Runs a registered session until its connection ends; returns why it ended.
async fn run_session<C: ControlIo>(
    control: &mut C,
    session: &Arc<Session>,
    mut commands: mpsc::Receiver<SessionCommand>,
    shared: &Arc<Shared>,
) -> String {
    let link = &session.link;
    let mut heartbeats = Heartbeats::new(shared.settings.heartbeat_interval(), shared.settings.heartbeat_misses);
    let mut going_away = false;
    let closed = link.closed();
    tokio::pin!(closed);
    loop {
        let outgoing = tokio::select! {
            reason = &mut closed => return reason,
            _ = shared.shutdown.cancelled(), if !going_away => {
                // The session stays in use: requests the ingress accepted before the signal still
                // need it while the relay drains. The agent learns to expect the close.
                going_away = true;
                let drain_ms = u32::try_from(shared.settings.drain_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
                Some(ControlMessage::GoAway(GoAway { drain_ms, reason: "relay shutting down".into() }))
            }
            msg = control.recv() => match msg {
                Ok(ControlMessage::Heartbeat(hb)) => {
                    session.heard();
                    Some(heartbeats.on_heartbeat(hb))
                }
                Ok(ControlMessage::HeartbeatAck(hb)) => {
                    session.heard();
                    session.set_rtt(heartbeats.on_ack(hb));
                    None
                }
                Ok(ControlMessage::GoAway(go)) => {
                    info!(reason = %go.reason, drain_ms = go.drain_ms, "agent going away");
                    heartbeats.heard();
                    session.set_draining();
                    shared.sessions.remove(session);
                    None
                }
                Ok(other) => {
                    link.close(CloseCode::Protocol);
                    return format!("protocol violation: unexpected {}", kind(&other));
                }
                Err(ControlError::Frame(err)) => {
                    link.close(CloseCode::Protocol);
                    return format!("malformed control frame: {err}");
                }
                Err(err) => return err.to_string(),
            },
            tick = heartbeats.tick() => match tick {
                Ok(heartbeat) => Some(heartbeat),
                Err(silent) => {
                    link.close(CloseCode::HeartbeatTimeout);
                    return silent.to_string();
                }
            },
            Some(cmd) = commands.recv() => match cmd {
                SessionCommand::ConfigSync(config) => Some(ControlMessage::ConfigSync(config)),
            },
        };
        if let Some(msg) = outgoing {
            match tokio::time::timeout(heartbeats.silence_limit(), control.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return format!("control stream write failed: {err}"),
                Err(_) => {
                    link.close(CloseCode::HeartbeatTimeout);
                    return "control stream blocked: agent is not reading".into();
                }
            }
        }
    }
}
