//! The QUIC transport on the relay: the admission rules (handshake rate, pending caps) and the
//! hand-over of each accepted agent to registration. Streams the agent opens (its egress
//! requests) are served once it has registered (see [`crate::egress`]); until then they wait,
//! within the agent's stream limit.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::tunnel::{Admission, Admit};
use quictun_quic::accept::{Listener, OnAgent};
use tracing::{Instrument, debug};

use crate::admission::{PendingRefused, PendingSlot};

use crate::metrics::{RegisterHandshake, Reject};
use crate::registration::serve_agent;
use crate::state::RelayState;

/// New connections per address, or `None` without a limit.
type HandshakeLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

fn handshake_limiter(shared: &RelayState) -> Option<HandshakeLimiter> {
    let rate = NonZeroU32::new(shared.settings.handshake_rate_per_ip)?;
    let burst = NonZeroU32::new(shared.settings.handshake_burst_per_ip).unwrap_or(rate);
    Some(governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst)))
}

/// How often addresses that stopped connecting are forgotten by the handshake limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(10);

/// A place for a new agent connection from `ip` among those not registered yet, or `None` (the
/// refusal counted) when the relay's or the client network's places are all taken.
pub fn admit_pending(shared: &RelayState, ip: IpAddr) -> Option<PendingSlot> {
    match shared.runtime.pending.admit(ip) {
        Ok(slot) => Some(slot),
        Err(why) => {
            let reason = match why {
                PendingRefused::Global => Reject::pending_connections,
                PendingRefused::Network => Reject::pending_network,
            };
            shared.runtime.metrics.reject(reason);
            debug!(%ip, ?why, "new agent connection refused: too many not registered yet");
            None
        }
    }
}

/// Accepts QUIC connections until shutdown (see [`quictun_quic::accept`]). A new connection
/// over its address's handshake rate, or beyond the pending-connection caps (the relay's, its
/// network's), is refused at once, before any cryptography; the others are accepted through
/// `acceptor` (transport settings by path).
pub async fn accept_loop(
    endpoint: quictun_quic::Endpoint,
    acceptor: quictun_quic::endpoint::Acceptor,
    shared: Arc<RelayState>,
) {
    let limiter = handshake_limiter(&shared).map(Arc::new);
    if let Some(limiter) = limiter.clone() {
        // Addresses that stopped connecting are forgotten.
        let sweep = async move {
            let mut sweep = tokio::time::interval(LIMITER_SWEEP);
            loop {
                sweep.tick().await;
                limiter.retain_recent();
            }
        };
        quictun_core::spawn_cancellable(&shared.runtime.tasks, &shared.runtime.stopped, sweep);
    }
    let admit_shared = shared.clone();
    let admit: Admit = Arc::new(move |remote: SocketAddr| {
        if limiter.as_ref().is_some_and(|l| l.check_key(&remote.ip()).is_err()) {
            admit_shared.runtime.metrics.reject(Reject::handshake_rate);
            debug!(%remote, "new connections from this address over the handshake rate: refused");
            return None;
        }
        let slot = admit_pending(&admit_shared, remote.ip())?;
        Some(Box::new(slot) as Admission)
    });
    let agent_shared = shared.clone();
    let on_agent: OnAgent = Arc::new(move |control, tunnel, admission| {
        let handshake = if control.is_0rtt() { RegisterHandshake::zero_rtt } else { RegisterHandshake::complete };
        let serve = serve_agent(control, tunnel, agent_shared.clone(), admission, handshake);
        agent_shared.runtime.tasks.spawn(serve.in_current_span());
    });
    let listener = Listener {
        admit,
        on_agent,
        limits: shared.settings.limits,
        register_timeout: Duration::from_secs(shared.settings.register_timeout_secs),
        stall: shared.runtime.reclaimer.clone(),
        stream_window: u64::from(shared.settings.stream_window),
        acceptor,
    };
    quictun_quic::accept::serve(
        endpoint,
        Arc::new(listener),
        shared.runtime.shutdown.clone(),
        shared.runtime.tasks.clone(),
    )
    .await;
}
