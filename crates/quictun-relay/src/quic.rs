//! The QUIC transport on the relay: accept loop, handshake, and the control stream. Streams the
//! agent opens (its egress requests) are served once it has registered (see
//! [`crate::egress`]); until then they wait, within the agent's stream limit.
//!
//! The handshake and the control stream each have a deadline and run in the connection's own
//! task, never in the accept loop, so a slow or hostile client cannot stall other agents.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::{PendingRefused, PendingSlot};
use quictun_core::framed::ControlChannel;
use quictun_core::quic_link::QuicLink;
use quictun_proto::CloseCode;
use tracing::{Instrument, debug, info_span};

use crate::metrics::Reject;
use crate::registration::serve_agent;
use crate::state::Shared;

/// Longest a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// New connections per address, or `None` without a limit.
type HandshakeLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

fn handshake_limiter(shared: &Shared) -> Option<HandshakeLimiter> {
    let rate = NonZeroU32::new(shared.settings.handshake_rate_per_ip)?;
    let burst = NonZeroU32::new(shared.settings.handshake_burst_per_ip).unwrap_or(rate);
    Some(governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst)))
}

/// How often addresses that stopped connecting are forgotten by the handshake limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(10);

/// A place for a new agent connection from `ip` among those not registered yet, or `None` (the
/// refusal counted) when the relay's or the client network's places are all taken.
pub fn admit_pending(shared: &Shared, ip: IpAddr) -> Option<PendingSlot> {
    match shared.pending.admit(ip) {
        Ok(slot) => Some(slot),
        Err(why) => {
            let reason = match why {
                PendingRefused::Global => Reject::pending_connections,
                PendingRefused::Network => Reject::pending_network,
            };
            shared.metrics.reject(reason);
            debug!(%ip, ?why, "new agent connection refused: too many not registered yet");
            None
        }
    }
}

/// Accepts QUIC connections until shutdown; each is served in its own tracked task. A new
/// connection over its address's handshake rate, or beyond the pending-connection caps (the
/// relay's, its network's), is refused at once, before any cryptography.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let limiter = handshake_limiter(&shared);
    let mut sweep = tokio::time::interval(LIMITER_SWEEP);
    loop {
        let incoming = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = sweep.tick() => {
                if let Some(limiter) = &limiter {
                    limiter.retain_recent();
                }
                continue;
            }
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        if limiter.as_ref().is_some_and(|l| l.check_key(&remote.ip()).is_err()) {
            shared.metrics.reject(Reject::handshake_rate);
            debug!(%remote, "new connections from this address over the handshake rate: refused");
            incoming.refuse();
            continue;
        }
        let Some(slot) = admit_pending(&shared, remote.ip()) else {
            incoming.refuse();
            continue;
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            serve_connection(incoming, slot, shared2).instrument(info_span!("agent", %remote)).await;
        });
    }
    debug!("QUIC accept loop stopped");
}

/// Handshake, control stream, then the agent's session. `slot` counts the connection as pending
/// until it has registered.
async fn serve_connection(incoming: quinn::Incoming, slot: PendingSlot, shared: Arc<Shared>) {
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
    let control = ControlChannel::new(send, recv, shared.limits.max_control_frame);
    let stall = shared.reclaimer.scope(u64::from(shared.settings.stream_window));
    serve_agent(control, Arc::new(QuicLink::new(conn, shared.limits, stall)), shared, Box::new(slot)).await;
}
