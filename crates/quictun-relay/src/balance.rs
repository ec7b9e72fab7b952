//! Choosing the agent of a group for a request, per upstream:
//!
//! - `round_robin` (default): each healthy agent in turn;
//! - `least_in_flight`: the healthy agent with the fewest streams in flight;
//! - `hash`: a consistent (rendezvous) hash of the `hash_header` value, so a client sticks to one
//!   agent while the group does not change, and only its share moves when an agent comes or
//!   goes; requests without the header go round-robin.
//!
//! An agent is unhealthy while in cooldown after repeated failures, or while its heartbeats lag
//! ([`Candidate::is_healthy`]); unhealthy agents are used only when no healthy one is left.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Deserialize;
use uuid::Uuid;

/// How an upstream's requests are spread over the agents of its group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each agent in turn.
    #[default]
    RoundRobin,
    /// The agent with the fewest streams in flight.
    LeastInFlight,
    /// A consistent hash of a request header.
    Hash,
}

/// What one choice is made with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Choice<'a> {
    /// The upstream's policy.
    pub balance: Balance,
    /// The value hashed by [`Balance::Hash`].
    pub key: Option<&'a [u8]>,
    /// A session not to choose (the one a retry moves away from).
    pub exclude: Option<Uuid>,
}

/// What the balancer needs to know of an agent (a session, in the relay).
pub trait Candidate {
    /// Identifies this connection of the agent.
    fn id(&self) -> Uuid;
    /// The agent's stable name, hashed by [`Balance::Hash`].
    fn name(&self) -> &str;
    /// The agent process among the replicas sharing `name`, hashed with it (so that a key's
    /// requests spread over replicas too, and stay on one while it lives).
    fn instance(&self) -> Uuid;
    /// False while it takes no new requests (closed, or draining).
    fn is_available(&self) -> bool;
    /// False while in cooldown or while its heartbeats lag.
    fn is_healthy(&self) -> bool;
    /// Requests in flight on it.
    fn in_flight(&self) -> u32;
}

fn rendezvous(key: &[u8], candidate: &impl Candidate) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    candidate.name().hash(&mut hasher);
    candidate.instance().hash(&mut hasher);
    hasher.finish()
}

/// Chooses among `members` (in group order) with `cursor` for rotation.
pub fn choose<C: Candidate>(members: &[Arc<C>], cursor: usize, choice: &Choice<'_>) -> Option<Arc<C>> {
    let usable: Vec<&Arc<C>> = members.iter().filter(|s| s.is_available() && Some(s.id()) != choice.exclude).collect();
    let healthy: Vec<&Arc<C>> = usable.iter().copied().filter(|s| s.is_healthy()).collect();
    let pool = if healthy.is_empty() { usable } else { healthy };
    if pool.is_empty() {
        return None;
    }
    let n = pool.len();
    let chosen = match (choice.balance, choice.key) {
        (Balance::Hash, Some(key)) => pool.iter().max_by_key(|s| rendezvous(key, s.as_ref())).copied(),
        (Balance::LeastInFlight, _) => (0..n).map(|i| pool[(cursor + i) % n]).min_by_key(|s| s.in_flight()),
        _ => Some(pool[cursor % n]),
    };
    chosen.cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_tunnel::{FakeTunnel, session_on};
    use crate::sessions::Session;

    fn session(id: &str) -> Arc<Session> {
        session_on(id, "g", FakeTunnel::default())
    }

    #[tokio::test]
    async fn least_in_flight_picks_the_idlest_and_skips_cooled_down_agents() {
        let members = vec![session("a"), session("b"), session("c")];
        let _busy: Vec<_> = (0..3).filter_map(|_| members[0].try_stream_permit()).collect();
        let _one = members[2].try_stream_permit();
        let choice = Choice { balance: Balance::LeastInFlight, ..Choice::default() };
        for cursor in 0..6 {
            assert_eq!(&*choose(&members, cursor, &choice).unwrap().client_id, "b");
        }
        for _ in 0..crate::sessions::FAILURES_BEFORE_COOLDOWN {
            members[1].record_failure();
        }
        assert_eq!(&*choose(&members, 0, &choice).unwrap().client_id, "c", "b is cooling down");
        let exclude = Choice { exclude: Some(members[2].session_id), ..choice };
        assert_eq!(&*choose(&members, 0, &exclude).unwrap().client_id, "a");
    }

    #[tokio::test]
    async fn hashing_is_sticky_and_moves_only_the_keys_of_a_leaving_agent() {
        let members = vec![session("a"), session("b"), session("c")];
        let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
        let pick = |members: &[Arc<Session>], key: &str| {
            let choice = Choice { balance: Balance::Hash, key: Some(key.as_bytes()), exclude: None };
            choose(members, fastrand::usize(..), &choice).unwrap().client_id.to_string()
        };
        let before: Vec<String> = keys.iter().map(|k| pick(&members, k)).collect();
        assert!(keys.iter().zip(&before).all(|(k, b)| pick(&members, k) == *b), "not sticky");
        let without_b: Vec<Arc<Session>> = members.iter().filter(|s| &*s.client_id != "b").cloned().collect();
        for (key, was) in keys.iter().zip(&before) {
            let now = pick(&without_b, key);
            if was != "b" {
                assert_eq!(&now, was, "{key} moved although its agent stayed");
            }
        }
        assert!(before.iter().any(|b| b == "a") && before.iter().any(|b| b == "c"));
    }
}
