//! Agent connections: QUIC accept loop, registration on the control stream, heartbeats, and the
//! session's lifetime in the session manager.
//!
//! The handshake and the register message each have a deadline and run in the connection's own
//! task, never in the accept loop, so a slow or hostile client cannot stall other agents.

use std::sync::Arc;
use std::time::Duration;

use quictun_core::framed::{ControlChannel, ControlError, read_frame_within};
use quictun_core::heartbeat::Heartbeats;
use quictun_core::http_stream::{reset, stop};
use quictun_proto::{Accepted, CloseCode, ControlMessage, GoAway, Limits, RequestHead, StreamCode};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::sessions::{Session, SessionCommand};
use crate::state::Shared;

/// Longest a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a rejected agent gets to read the rejection before the connection is closed.
const REJECT_LINGER: Duration = Duration::from_secs(2);
/// Deadline for the head frame of a stream the agent opens.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts QUIC connections until shutdown; each is served in its own tracked task.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            let remote = incoming.remote_address();
            serve_connection(incoming, shared2).instrument(info_span!("agent", %remote)).await;
        });
    }
    debug!("QUIC accept loop stopped");
}

async fn serve_connection(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => return debug!(%err, "QUIC handshake failed"),
        Err(_) => return debug!("QUIC handshake timed out"),
    };
    let register_timeout = Duration::from_secs(shared.settings.register_timeout_secs);
    let (send, recv) = match tokio::time::timeout(register_timeout, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(err)) => return debug!(%err, "connection closed before the control stream"),
        Err(_) => {
            quictun_core::close(&conn, CloseCode::HandshakeTimeout);
            return debug!("no control stream in time");
        }
    };
    let mut control = ControlChannel::new(send, recv, shared.limits.max_control_frame);
    let register = match control.recv_within(register_timeout).await {
        Ok(ControlMessage::Register(register)) => register,
        Ok(other) => {
            quictun_core::close(&conn, CloseCode::Protocol);
            return warn!(message = ?kind(&other), "first control message was not register");
        }
        Err(err) => {
            let code =
                if matches!(err, ControlError::Timeout(_)) { CloseCode::HandshakeTimeout } else { CloseCode::Protocol };
            quictun_core::close(&conn, code);
            return warn!(%err, "no valid register message");
        }
    };
    let span = info_span!("session", client_id = %register.client_id);
    let live = shared.live();
    let group = match live.authenticate(&register) {
        Ok(group) => group,
        Err(rejected) => {
            warn!(parent: &span, client_id = %register.client_id, code = ?rejected.code, reason = %rejected.message, "registration rejected");
            // Best effort: the agent learns why, then we close whatever it does.
            let _unsent = control.send(ControlMessage::Rejected(rejected)).await;
            control.finish();
            let _lingered = tokio::time::timeout(REJECT_LINGER, conn.closed()).await;
            quictun_core::close(&conn, CloseCode::Rejected);
            return;
        }
    };
    if shared.shutdown.is_cancelled() {
        let rejected = quictun_proto::Rejected {
            code: quictun_proto::RejectCode::ShuttingDown,
            message: "relay is shutting down".into(),
        };
        let _unsent = control.send(ControlMessage::Rejected(rejected)).await;
        quictun_core::close(&conn, CloseCode::GoingAway);
        return;
    }
    let (commands, command_rx) = mpsc::channel(8);
    let session = Arc::new(Session::new(
        &register.client_id,
        &group,
        conn.clone(),
        shared.settings.max_streams_per_agent,
        commands,
    ));
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
        let reason = run_session(&mut control, &session, command_rx, &shared).await;
        shared.sessions.remove(&session);
        info!(session_id = %session.session_id, %reason, "agent disconnected");
    }
    .instrument(span)
    .await;
}

fn kind(msg: &ControlMessage) -> &'static str {
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

/// Runs a registered session until its connection ends; returns why it ended.
async fn run_session(
    control: &mut ControlChannel,
    session: &Arc<Session>,
    mut commands: mpsc::Receiver<SessionCommand>,
    shared: &Arc<Shared>,
) -> String {
    let conn = &session.conn;
    let mut heartbeats = Heartbeats::new(shared.settings.heartbeat_interval(), shared.settings.heartbeat_misses);
    let mut going_away = false;
    loop {
        let outgoing = tokio::select! {
            _ = shared.shutdown.cancelled(), if !going_away => {
                going_away = true;
                session.set_draining();
                let drain_ms = u32::try_from(shared.settings.drain_timeout_secs.saturating_mul(1000)).unwrap_or(u32::MAX);
                Some(ControlMessage::GoAway(GoAway { drain_ms, reason: "relay shutting down".into() }))
            }
            msg = control.recv() => match msg {
                Ok(ControlMessage::Heartbeat(hb)) => Some(heartbeats.on_heartbeat(hb)),
                Ok(ControlMessage::HeartbeatAck(hb)) => {
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
                    quictun_core::close(conn, CloseCode::Protocol);
                    return format!("protocol violation: unexpected {}", kind(&other));
                }
                Err(ControlError::Frame(err)) => {
                    quictun_core::close(conn, CloseCode::Protocol);
                    return format!("malformed control frame: {err}");
                }
                Err(err) => return conn.close_reason().map_or_else(|| err.to_string(), |r| r.to_string()),
            },
            tick = heartbeats.tick() => match tick {
                Ok(heartbeat) => Some(heartbeat),
                Err(silent) => {
                    quictun_core::close(conn, CloseCode::HeartbeatTimeout);
                    return silent.to_string();
                }
            },
            Some(cmd) = commands.recv() => match cmd {
                SessionCommand::ConfigSync(config) => Some(ControlMessage::ConfigSync(config)),
            },
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let limits = shared.limits;
                    shared.tasks.spawn(refuse_agent_stream(send, recv, limits).in_current_span());
                    None
                }
                Err(err) => return err.to_string(),
            },
        };
        if let Some(msg) = outgoing {
            match tokio::time::timeout(heartbeats.silence_limit(), control.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return format!("control stream write failed: {err}"),
                Err(_) => {
                    quictun_core::close(conn, CloseCode::HeartbeatTimeout);
                    return "control stream blocked: agent is not reading".into();
                }
            }
        }
    }
}

/// Streams opened by the agent: the head is read and checked (a malformed or oversized head is
/// reset with its own code); this relay serves no agent-initiated kind yet, so valid heads are
/// refused with [`StreamCode::KindUnsupported`]. Other streams are unaffected either way.
async fn refuse_agent_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, limits: Limits) {
    let code = match read_frame_within::<RequestHead>(&mut recv, limits.max_head_frame, HEAD_TIMEOUT).await {
        Ok(head) => match head.validate(&limits) {
            Ok(()) => {
                debug!(request_id = %head.request_id, kind = ?head.kind, "refusing agent-initiated stream");
                StreamCode::KindUnsupported
            }
            Err(err) => {
                warn!(%err, "invalid head on a stream from the agent");
                StreamCode::Malformed
            }
        },
        Err(err) => {
            warn!(%err, "bad stream from agent");
            err.stream_code()
        }
    };
    reset(&mut send, code);
    stop(&mut recv, code);
}
