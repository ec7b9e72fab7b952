//! Keeping a session with the relay: dial (QUIC, gRPC, or QUIC with a fallback to gRPC and a
//! way back), register and serve, and when the session ends reconnect with exponential backoff
//! and full jitter; a wrong pin or a permanent rejection stops the agent instead.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quictun_core::backoff::Backoff;
use quictun_core::transport::{Connection, Transport};
use quictun_core::tunnel::{CloseReason, Tunnel};
use quictun_grpc::Grpc;
use quictun_quic::Quic;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::AgentOptions;
use crate::config::Transport as Choice;
use crate::dial::{Dialers, dial};
use crate::error::AgentError;
use crate::forward::Forwarder;
use crate::session::{self, Attempt, RetryReason, SessionEnd};
use crate::state::AgentState;

/// QUIC attempts in a row that got no answer while the relay's gRPC port answered, before `auto`
/// falls back to gRPC: one such attempt is as likely a relay restarting as UDP being blocked.
const SILENT_ATTEMPTS_BEFORE_FALLBACK: u32 = 2;

/// The first re-probe of QUIC after a fallback to gRPC; each next one waits twice as long, up to
/// `quic_probe_interval`.
const FIRST_QUIC_PROBE: Duration = Duration::from_secs(1);

/// How long the reconnects of a restarted relay's agents are spread over.
const RESTARTED_RELAY_SPREAD: Duration = Duration::from_millis(250);

/// Everything needed to reach the relay over either transport.
pub struct Connector {
    /// The agent's options.
    pub options: Arc<AgentOptions>,
    /// This agent among the replicas sharing its client_id: drawn once, kept across reconnects,
    /// so that a reconnect replaces this agent's own old session and no other replica's.
    pub instance_id: Uuid,
    /// The tunnel egress requests use, while there is one.
    pub relay_tunnel: watch::Sender<Option<Arc<dyn Tunnel>>>,
    /// Each transport's dialer.
    pub dialers: Dialers,
    /// QUIC attempts in a row that got no answer while gRPC did (`auto` only).
    pub quic_silent: std::sync::atomic::AtomicU32,
}

impl Connector {
    /// Registers and serves on what `dial` connects, unless asked to stop first.
    async fn serve_dialed<C: quictun_core::control::ControlIo>(
        &self,
        dial: impl std::future::Future<Output = Result<Connection<C>, Attempt>>,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt> {
        let connection = tokio::select! {
            dialed = dial => dialed?,
            _ = stop.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        // Egress requests go over this tunnel while it lasts (the relay serves them once it has
        // registered the agent).
        self.relay_tunnel.send_replace(Some(connection.tunnel.clone()));
        let served = session::register_and_serve(&self.options, connection, forwarder, state, stop).await;
        self.relay_tunnel.send_replace(None);
        served
    }

    /// One session over transport `T`.
    async fn over<T: Transport>(
        &self,
        dialer: &T::Dialer,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt> {
        let register = session::register_message(&self.options, self.instance_id);
        self.serve_dialed(dial::<T>(dialer, register, &self.options), forwarder, state, stop).await
    }

    /// gRPC while QUIC is probed in the background; a successful probe drains the gRPC session
    /// and ends it with [`SessionEnd::Switched`].
    async fn over_grpc_probing_quic(
        &self,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, Attempt> {
        let stop = session::Stop { shutdown: shutdown.clone(), switch: CancellationToken::new() };
        let probe = async {
            let mut wait = FIRST_QUIC_PROBE.min(self.options.quic_probe_interval);
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(self.options.quic_probe_interval);
                if self.dialers.quic.probe().await {
                    info!("QUIC reachable again: moving back from gRPC");
                    stop.switch.cancel();
                    return std::future::pending::<std::convert::Infallible>().await;
                }
                tracing::debug!("QUIC still unreachable");
            }
        };
        tokio::select! {
            outcome = self.over::<Grpc>(&self.dialers.grpc, forwarder, state, &stop) => outcome,
            never = probe => match never {},
        }
    }

    /// One session over the transport the options choose: QUIC, gRPC, or QUIC falling back to
    /// gRPC (probing QUIC from there) when no QUIC session can be had.
    async fn session(
        &self,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt> {
        let quic = &self.dialers.quic;
        match self.options.transport {
            Choice::Quic => self.over::<Quic>(quic, forwarder, state, stop).await,
            Choice::Grpc => self.over::<Grpc>(&self.dialers.grpc, forwarder, state, stop).await,
            Choice::Auto => {
                let outcome = self.over::<Quic>(quic, forwarder, state, stop).await;
                let Err(Attempt::Retry(RetryReason::QuicSilent(silence))) = &outcome else {
                    self.quic_silent.store(0, Ordering::Relaxed);
                    return outcome;
                };
                if !silence.calls_for_grpc() {
                    self.quic_silent.store(0, Ordering::Relaxed);
                    return outcome;
                }
                let times = self.quic_silent.fetch_add(1, Ordering::Relaxed) + 1;
                if times < SILENT_ATTEMPTS_BEFORE_FALLBACK {
                    // Tried again after the usual backoff: a relay restarting answers by then.
                    return outcome;
                }
                self.quic_silent.store(0, Ordering::Relaxed);
                let timeout = self.options.quic_handshake_timeout;
                let reason = format!(
                    "{silence} (no QUIC answer in {:.0} s, {times} times in a row, while gRPC answered): using gRPC over TCP, and probing QUIC again",
                    timeout.as_secs_f64()
                );
                warn!(%reason, "falling back to gRPC over TCP");
                state.send_replace(AgentState::FallingBack { reason });
                self.over_grpc_probing_quic(forwarder, state, &stop.shutdown).await
            }
        }
    }
}

/// Keeps a session with the relay until the agent is stopped (`Ok`) or a failure stops it for
/// good (`Err`).
pub async fn run(
    connector: Connector,
    forwarder: Arc<Forwarder>,
    state: watch::Sender<AgentState>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let options = connector.options.clone();
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_cap);
    let stop = session::Stop { shutdown: shutdown.clone(), switch: CancellationToken::new() };
    let result = loop {
        state.send_replace(AgentState::Connecting);
        let attempt_started = tokio::time::Instant::now();
        let (reason, delay) = match connector.session(&forwarder, &state, &stop).await {
            Ok(SessionEnd::Shutdown) => break Ok(()),
            Ok(SessionEnd::Switched) => continue,
            Ok(SessionEnd::Replaced) => break Err(AgentError::Replaced(options.client_id.clone())),
            Ok(SessionEnd::Lost(reason)) => {
                backoff.reset();
                info!(%reason, "connection to relay ended");
                // A relay that answered with a reset is up again: reconnect at once, spread over
                // a moment so that its agents do not all handshake in the same millisecond.
                let delay = match reason {
                    CloseReason::PeerRestarted => RESTARTED_RELAY_SPREAD.mul_f64(fastrand::f64()),
                    _ => backoff.next_delay(),
                };
                (reason.to_string(), delay)
            }
            Err(Attempt::Fatal(err)) => break Err(err),
            Err(Attempt::Retry(reason)) => {
                warn!(%reason, "could not connect to relay");
                // The backoff counts from the start of the attempt: one that waited out its
                // handshake timeout for an answer has waited already.
                (reason.to_string(), backoff.next_delay().saturating_sub(attempt_started.elapsed()))
            }
        };
        info!(delay_ms = delay.as_millis(), "reconnecting");
        state.send_replace(AgentState::Reconnecting { reason });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    state.send_replace(AgentState::Stopped);
    result
}
