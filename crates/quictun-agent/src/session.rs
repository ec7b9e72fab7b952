//! One connection to the relay, for any transport: register, then serve until the connection ends
//! (heartbeats, config_sync, go-away, and the transport's own request serving).

use std::sync::Arc;
use std::time::Duration;

use quictun_core::heartbeat::Heartbeats;
use quictun_core::link::{ControlIo, RelayConnection};
use quictun_proto::{CloseCode, ControlMessage, GoAway, Register};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward::Forwarder;
use crate::upstreams::UpstreamTable;
use crate::{AgentError, AgentOptions, AgentState};

/// Longest the relay may take to answer the register message.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals of silence after which the relay is considered gone.
const HEARTBEAT_MISSES: u32 = 3;

/// How a connected session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The agent was asked to stop and drained.
    Shutdown,
    /// A better transport became available; this session drained and closed.
    Switched,
    /// The relay closed the session because another agent registered with the same client_id.
    Replaced,
    /// The connection ended; reconnect.
    Lost {
        /// Why.
        reason: String,
    },
}

/// Why an attempt failed before a session was established.
#[derive(Debug)]
pub enum Attempt {
    /// Try again after a backoff.
    Retry(String),
    /// Stop the agent.
    Fatal(AgentError),
}

/// Registers on `control` and serves `conn` until it ends or the agent is asked to stop.
pub async fn register_and_serve<C: ControlIo, R: RelayConnection>(
    options: &AgentOptions,
    mut control: C,
    conn: R,
    forwarder: &Arc<Forwarder>,
    state: &watch::Sender<AgentState>,
    stop: &Stop,
) -> Result<Outcome, Attempt> {
    let retry = |what: &str, e: &dyn std::fmt::Display| Attempt::Retry(format!("{what}: {e}"));
    let register = Register {
        protocol_version: quictun_proto::PROTOCOL_VERSION,
        client_id: options.client_id.clone(),
        group: options.group.clone(),
        token: options.token.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    control.send(ControlMessage::Register(register)).await.map_err(|e| retry("sending register", &e))?;
    let accepted = match control.recv_within(REGISTER_TIMEOUT).await {
        Ok(ControlMessage::Accepted(accepted)) => accepted,
        Ok(ControlMessage::Rejected(rejected)) => {
            conn.close(CloseCode::Rejected);
            if rejected.code.is_permanent() {
                return Err(Attempt::Fatal(AgentError::Rejected { code: rejected.code, message: rejected.message }));
            }
            return Err(Attempt::Retry(format!("relay refused the session: {}", rejected.message)));
        }
        Ok(_) => {
            conn.close(CloseCode::Protocol);
            return Err(Attempt::Retry("relay answered register with an unexpected message".into()));
        }
        Err(err) => return Err(retry("registering", &err)),
    };
    forwarder.install_fresh(UpstreamTable::build(
        &accepted.config,
        &options.local_upstreams,
        options.allowed_targets.as_deref(),
    ));
    let span = info_span!("session", client_id = %options.client_id, session_id = %accepted.session_id);
    span.in_scope(|| {
        let upstreams: Vec<String> = forwarder.upstreams().names().map(str::to_owned).collect();
        info!(relay = %conn.remote_addr(), config_version = accepted.config.version, ?upstreams, "registered with relay");
    });
    state.send_replace(AgentState::Connected { session_id: accepted.session_id, relay: conn.remote_addr() });
    let interval = Duration::from_millis(u64::from(accepted.heartbeat_interval_ms.max(50)));
    let serve = Serve { options, conn: &conn, forwarder, interval };
    Ok(serve.run(&mut control, stop).instrument(span).await)
}

/// What ends a session on the agent's own initiative (both drain first).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The agent is shutting down.
    pub shutdown: CancellationToken,
    /// Another transport should take over.
    pub switch: CancellationToken,
}

struct Serve<'a, R> {
    options: &'a AgentOptions,
    conn: &'a R,
    forwarder: &'a Arc<Forwarder>,
    interval: Duration,
}

impl<R: RelayConnection> Serve<'_, R> {
    async fn run<C: ControlIo>(self, control: &mut C, stop: &Stop) -> Outcome {
        let streams = TaskTracker::new();
        let cancel_streams = CancellationToken::new();
        let outcome = self.serve(control, stop, &streams, &cancel_streams).await;
        streams.close();
        if matches!(outcome, Outcome::Shutdown | Outcome::Switched) {
            info!(in_flight = streams.len(), drain = ?self.options.drain_timeout, "draining");
            if tokio::time::timeout(self.options.drain_timeout, streams.wait()).await.is_err() {
                warn!(in_flight = streams.len(), "drain timeout: cancelling remaining streams");
            }
            self.conn.close(CloseCode::GoingAway);
            self.conn.finish().await;
        }
        cancel_streams.cancel();
        outcome
    }

    async fn go_away<C: ControlIo>(&self, control: &mut C, reason: &str) {
        let drain_ms = u32::try_from(self.options.drain_timeout.as_millis()).unwrap_or(u32::MAX);
        let go_away = ControlMessage::GoAway(GoAway { drain_ms, reason: reason.into() });
        match tokio::time::timeout(self.interval, control.send(go_away)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => debug!(%err, "could not send go-away"),
            Err(_) => debug!("go-away not sent in time"),
        }
    }

    fn lost(&self, reason: String) -> Outcome {
        match self.conn.peer_close_code() {
            Some(CloseCode::Replaced) => Outcome::Replaced,
            _ => Outcome::Lost { reason },
        }
    }

    async fn serve<C: ControlIo>(
        &self,
        control: &mut C,
        stop: &Stop,
        streams: &TaskTracker,
        cancel_streams: &CancellationToken,
    ) -> Outcome {
        let mut heartbeats = Heartbeats::new(self.interval, HEARTBEAT_MISSES);
        let requests = self.conn.serve_requests(self.forwarder.clone(), streams.clone(), cancel_streams.clone());
        tokio::pin!(requests);
        loop {
            let outgoing = tokio::select! {
                _ = stop.shutdown.cancelled() => {
                    self.go_away(control, "agent shutting down").await;
                    return Outcome::Shutdown;
                }
                _ = stop.switch.cancelled() => {
                    self.go_away(control, "agent switching transport").await;
                    return Outcome::Switched;
                }
                reason = &mut requests => return self.lost(reason),
                msg = control.recv() => match msg {
                    Ok(ControlMessage::Heartbeat(hb)) => Some(heartbeats.on_heartbeat(hb)),
                    Ok(ControlMessage::HeartbeatAck(hb)) => {
                        let rtt = heartbeats.on_ack(hb);
                        debug!(?rtt, "heartbeat");
                        None
                    }
                    Ok(ControlMessage::ConfigSync(config)) => {
                        heartbeats.heard();
                        let version = config.version;
                        let table = UpstreamTable::build(&config, &self.options.local_upstreams, self.options.allowed_targets.as_deref());
                        if self.forwarder.install(table) {
                            info!(version, "applied config_sync");
                        } else {
                            debug!(version, "ignored stale config_sync");
                        }
                        None
                    }
                    Ok(ControlMessage::GoAway(go)) => {
                        info!(reason = %go.reason, drain_ms = go.drain_ms, "relay going away");
                        heartbeats.heard();
                        None
                    }
                    Ok(_) => {
                        self.conn.close(CloseCode::Protocol);
                        return self.lost("relay sent an unexpected control message".into());
                    }
                    Err(err) => return self.lost(err.to_string()),
                },
                tick = heartbeats.tick() => match tick {
                    Ok(heartbeat) => Some(heartbeat),
                    Err(silent) => {
                        self.conn.close(CloseCode::HeartbeatTimeout);
                        return self.lost(format!("relay {silent}"));
                    }
                },
            };
            if let Some(msg) = outgoing {
                match tokio::time::timeout(heartbeats.silence_limit(), control.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return self.lost(format!("control stream write failed: {err}")),
                    Err(_) => {
                        self.conn.close(CloseCode::HeartbeatTimeout);
                        return self.lost("control stream blocked: relay is not reading".into());
                    }
                }
            }
        }
    }
}
