//! One connection to the relay: dial, verify, register, then serve until the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::endpoint::ClientSetup;
use quictun_core::framed::ControlChannel;
use quictun_core::heartbeat::Heartbeats;
use quictun_proto::{CloseCode, ControlMessage, GoAway, Register};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::forward::Forwarder;
use crate::upstreams::UpstreamTable;
use crate::{AgentError, AgentOptions, AgentState};

/// Longest a QUIC handshake may take before the attempt is retried.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the relay may take to answer the register message.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals of silence after which the relay is considered gone.
const HEARTBEAT_MISSES: u32 = 3;

/// How a connected session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The agent was asked to stop and drained.
    Shutdown,
    /// The relay closed the session because another agent registered with the same client_id.
    Replaced,
    /// The connection ended; reconnect.
    Lost {
        /// Whether registration had succeeded (resets the backoff).
        registered: bool,
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

async fn resolve(relay: &str) -> Result<SocketAddr, Attempt> {
    let mut addrs =
        tokio::net::lookup_host(relay).await.map_err(|e| Attempt::Retry(format!("resolving {relay}: {e}")))?;
    addrs.next().ok_or_else(|| Attempt::Retry(format!("{relay} resolved to no address")))
}

async fn dial(
    options: &AgentOptions,
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
) -> Result<quinn::Connection, Attempt> {
    let addr = resolve(&options.relay).await?;
    let connecting = endpoint
        .connect_with(setup.config.clone(), addr, &options.server_name)
        .map_err(|e| Attempt::Fatal(AgentError::Endpoint(format!("cannot dial {addr}: {e}"))))?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => {
            if let Some(mismatch) = setup.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
                return Err(Attempt::Fatal(AgentError::PinMismatch(mismatch)));
            }
            let text = err.to_string();
            if text.contains("certificate") {
                return Err(Attempt::Fatal(AgentError::Tls(text)));
            }
            Err(Attempt::Retry(format!("QUIC handshake with {addr}: {text}")))
        }
        Err(_) => Err(Attempt::Retry(format!("QUIC handshake with {addr} timed out after {HANDSHAKE_TIMEOUT:?}"))),
    }
}

/// Dials, registers and serves one connection.
pub async fn run_once(
    options: &AgentOptions,
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    forwarder: &Arc<Forwarder>,
    state: &watch::Sender<AgentState>,
    shutdown: &CancellationToken,
) -> Result<Outcome, Attempt> {
    let conn = tokio::select! {
        conn = dial(options, endpoint, setup) => conn?,
        _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
    };
    let retry = |what: &str, e: &dyn std::fmt::Display| Attempt::Retry(format!("{what}: {e}"));
    let (send, recv) = conn.open_bi().await.map_err(|e| retry("opening the control stream", &e))?;
    let mut control = ControlChannel::new(send, recv, options.limits.max_control_frame);
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
            quictun_core::close(&conn, CloseCode::Rejected);
            if rejected.code.is_permanent() {
                return Err(Attempt::Fatal(AgentError::Rejected { code: rejected.code, message: rejected.message }));
            }
            return Err(Attempt::Retry(format!("relay refused the session: {}", rejected.message)));
        }
        Ok(_) => {
            quictun_core::close(&conn, CloseCode::Protocol);
            return Err(Attempt::Retry("relay answered register with an unexpected message".into()));
        }
        Err(err) => {
            let reason = conn.close_reason().map_or_else(|| err.to_string(), |r| r.to_string());
            return Err(Attempt::Retry(format!("registering: {reason}")));
        }
    };
    forwarder.install_fresh(UpstreamTable::build(
        &accepted.config,
        &options.local_upstreams,
        options.allowed_targets.as_deref(),
    ));
    let span = info_span!("session", client_id = %options.client_id, session_id = %accepted.session_id);
    span.in_scope(|| {
        let upstreams: Vec<String> = forwarder.upstreams().names().map(str::to_owned).collect();
        info!(relay = %conn.remote_address(), config_version = accepted.config.version, ?upstreams, "registered with relay");
    });
    state.send_replace(AgentState::Connected { session_id: accepted.session_id, relay: conn.remote_address() });
    let interval = Duration::from_millis(u64::from(accepted.heartbeat_interval_ms.max(50)));
    let serve = Serve { options, conn: &conn, forwarder, interval };
    Ok(serve.run(&mut control, shutdown).instrument(span).await)
}

struct Serve<'a> {
    options: &'a AgentOptions,
    conn: &'a quinn::Connection,
    forwarder: &'a Arc<Forwarder>,
    interval: Duration,
}

impl Serve<'_> {
    async fn run(self, control: &mut ControlChannel, shutdown: &CancellationToken) -> Outcome {
        let streams = TaskTracker::new();
        let cancel_streams = CancellationToken::new();
        let outcome = self.serve(control, shutdown, &streams, &cancel_streams).await;
        streams.close();
        if matches!(outcome, Outcome::Shutdown) {
            info!(in_flight = streams.len(), drain = ?self.options.drain_timeout, "draining");
            if tokio::time::timeout(self.options.drain_timeout, streams.wait()).await.is_err() {
                warn!(in_flight = streams.len(), "drain timeout: cancelling remaining streams");
            }
            quictun_core::close(self.conn, CloseCode::GoingAway);
        }
        cancel_streams.cancel();
        outcome
    }

    async fn serve(
        &self,
        control: &mut ControlChannel,
        shutdown: &CancellationToken,
        streams: &TaskTracker,
        cancel_streams: &CancellationToken,
    ) -> Outcome {
        let lost = |reason: String| match self.conn.close_reason() {
            Some(err) if quictun_core::peer_close_code(&err) == Some(CloseCode::Replaced) => Outcome::Replaced,
            _ => Outcome::Lost { registered: true, reason },
        };
        let mut heartbeats = Heartbeats::new(self.interval, HEARTBEAT_MISSES);
        loop {
            let outgoing = tokio::select! {
                _ = shutdown.cancelled() => {
                    let drain_ms = u32::try_from(self.options.drain_timeout.as_millis()).unwrap_or(u32::MAX);
                    let go_away = ControlMessage::GoAway(GoAway { drain_ms, reason: "agent shutting down".into() });
                    if let Err(err) = tokio::time::timeout(self.interval, control.send(go_away)).await {
                        debug!(%err, "could not send go-away");
                    }
                    return Outcome::Shutdown;
                }
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
                        quictun_core::close(self.conn, CloseCode::Protocol);
                        return lost("relay sent an unexpected control message".into());
                    }
                    Err(err) => {
                        return lost(self.conn.close_reason().map_or_else(|| err.to_string(), |r| r.to_string()));
                    }
                },
                tick = heartbeats.tick() => match tick {
                    Ok(heartbeat) => Some(heartbeat),
                    Err(silent) => {
                        quictun_core::close(self.conn, CloseCode::HeartbeatTimeout);
                        return lost(format!("relay {silent}"));
                    }
                },
                stream = self.conn.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let forwarder = self.forwarder.clone();
                        let cancel = cancel_streams.clone();
                        streams.spawn(async move {
                            tokio::select! {
                                _ = forwarder.serve_stream(send, recv) => {}
                                _ = cancel.cancelled() => {}
                            }
                        }.in_current_span());
                        None
                    }
                    Err(err) => return lost(err.to_string()),
                },
            };
            if let Some(msg) = outgoing {
                match tokio::time::timeout(heartbeats.silence_limit(), control.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => return lost(format!("control stream write failed: {err}")),
                    Err(_) => {
                        quictun_core::close(self.conn, CloseCode::HeartbeatTimeout);
                        return lost("control stream blocked: relay is not reading".into());
                    }
                }
            }
        }
    }
}
