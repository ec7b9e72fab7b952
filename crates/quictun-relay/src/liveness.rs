//! Agents gone silent, found before QUIC declares them dead. Each agent sends at least a
//! keep-alive every second (acknowledgements and answers besides), so a relay that has received
//! nothing from one for `relay.silence_check_ms` (1.25 s) suspects it at once: the balancer leaves it out while a
//! sibling answers, and requests waiting on it for their answer move to a sibling where that is
//! safe (see [`crate::proxy`]); the others wait for the verdict (the 2 s idle timeout). Heard
//! again, it is chosen again.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::sessions::{Liveness, SessionManager};

/// How often every session's datagram count is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// Looks at every session's datagram count every [`LOOK_EVERY`], until cancelled by its owner.
pub async fn watch(sessions: Arc<SessionManager>) {
    let mut look = tokio::time::interval(LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        look.tick().await;
        for session in sessions.all() {
            match session.observe_datagrams() {
                Liveness::WentSilent(silent) => info!(
                    client_id = %session.client_id,
                    session_id = %session.session_id,
                    in_flight = session.in_flight(),
                    "nothing heard from the agent for {:.1} s: new requests go to its siblings until it is heard again",
                    silent.as_secs_f64()
                ),
                Liveness::HeardAgain => {
                    info!(client_id = %session.client_id, session_id = %session.session_id, "agent heard again");
                }
                Liveness::Heard | Liveness::Silent(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::fake_tunnel::{FakeTunnel, session_on};
    use crate::sessions::SILENT_AFTER;

    #[tokio::test(start_paused = true)]
    async fn an_agent_is_suspect_after_a_silence_and_chosen_again_once_heard() {
        let datagrams = Arc::new(AtomicU64::new(10));
        let session = session_on("a", "g", FakeTunnel { datagrams: Some(datagrams.clone()), ..FakeTunnel::default() });
        assert_eq!(session.observe_datagrams(), Liveness::Heard);
        tokio::time::advance(SILENT_AFTER / 2).await;
        datagrams.fetch_add(1, Ordering::Relaxed);
        assert_eq!(session.observe_datagrams(), Liveness::Heard, "a keep-alive arrived");

        let went_silent = tokio::spawn({
            let session = session.clone();
            async move { session.went_silent().await }
        });
        tokio::time::advance(SILENT_AFTER).await;
        assert_eq!(session.observe_datagrams(), Liveness::Heard, "exactly at the limit is not silent yet");
        assert!(session.is_healthy());
        tokio::time::advance(LOOK_EVERY).await;
        assert_eq!(session.observe_datagrams(), Liveness::WentSilent(SILENT_AFTER + LOOK_EVERY));
        assert!(!session.is_healthy(), "a silent agent is left out by the balancer");
        tokio::time::timeout(Duration::from_secs(1), went_silent).await.unwrap().unwrap();
        tokio::time::advance(LOOK_EVERY).await;
        assert!(matches!(session.observe_datagrams(), Liveness::Silent(_)));

        datagrams.fetch_add(1, Ordering::Relaxed);
        assert_eq!(session.observe_datagrams(), Liveness::HeardAgain);
        assert!(session.is_healthy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_transport_without_a_count_is_never_suspect() {
        let session = session_on("a", "g", FakeTunnel::default());
        for _ in 0..20 {
            assert_eq!(session.observe_datagrams(), Liveness::Heard);
            tokio::time::advance(LOOK_EVERY).await;
        }
        assert!(session.is_healthy());
    }
}
