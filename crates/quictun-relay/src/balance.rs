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

/// Chooses among `members` (in group order) with `cursor` for rotation: a healthy usable member
/// if there is one, else any usable one.
///
/// Per request this must not cost in proportion to the group (a group may hold thousands of
/// agents): round-robin looks at the member whose turn it is and, when it is out, at a few random
/// ones ([`in_turn`]); least-in-flight and hash read one counter or hash per member but check
/// availability and health only of a member that would win.
pub fn choose<C: Candidate>(members: &[Arc<C>], cursor: usize, choice: &Choice<'_>) -> Option<Arc<C>> {
    let rotation = || rotation(members, cursor);
    let usable = |s: &C| s.is_available() && Some(s.id()) != choice.exclude;
    let healthy = |s: &C| usable(s) && s.is_healthy();
    let chosen = match (choice.balance, choice.key) {
        (Balance::Hash, Some(key)) => {
            let score = |s: &C| std::cmp::Reverse(rendezvous(key, s));
            lowest(rotation(), score, healthy).or_else(|| lowest(rotation(), score, usable))
        }
        (Balance::LeastInFlight, _) => {
            lowest(rotation(), C::in_flight, healthy).or_else(|| lowest(rotation(), C::in_flight, usable))
        }
        _ => in_turn(members, cursor, healthy).or_else(|| in_turn(members, cursor, usable)),
    };
    chosen.cloned()
}

/// Every member once, from the one whose turn `cursor` says on.
fn rotation<C>(members: &[Arc<C>], cursor: usize) -> impl Iterator<Item = &Arc<C>> {
    let n = members.len();
    (0..n).map(move |i| &members[cursor.wrapping_add(i) % n])
}

/// Random members tried when the one whose turn it is does not fit, before all are tried in order.
const RANDOM_PROBES: usize = 4;

/// The member whose turn it is when it `fit`s; else a random one that fits, so that the turns of a
/// member that is out spread evenly over the others (passing them to the next in line would give
/// that one a double share); else the first that fits after it.
fn in_turn<C>(members: &[Arc<C>], cursor: usize, fit: impl Fn(&C) -> bool) -> Option<&Arc<C>> {
    let mut in_order = rotation(members, cursor);
    let at = in_order.next()?;
    if fit(at) {
        return Some(at);
    }
    (0..RANDOM_PROBES)
        .map(|_| &members[fastrand::usize(..members.len())])
        .find(|s| fit(s))
        .or_else(|| in_order.find(|s| fit(s)))
}

/// The first member of `rotation` with the lowest `score` among those that `fit`; `fit` is asked
/// only of a member that scores lower than the best so far.
fn lowest<'a, C, K: Ord>(
    rotation: impl Iterator<Item = &'a Arc<C>>,
    score: impl Fn(&C) -> K,
    fit: impl Fn(&C) -> bool,
) -> Option<&'a Arc<C>> {
    let mut best: Option<(K, &Arc<C>)> = None;
    for member in rotation {
        let k = score(member);
        if best.as_ref().is_none_or(|(b, _)| k < *b) && fit(member) {
            best = Some((k, member));
        }
    }
    best.map(|(_, member)| member)
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
        let permit = |m: &Session| m.try_stream_permit(crate::sessions::StreamKind::Request).ok();
        let _busy: Vec<_> = (0..3).filter_map(|_| permit(&members[0])).collect();
        let _one = permit(&members[2]);
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

    /// A candidate that counts how often its state is looked at.
    #[derive(Default)]
    struct Counted {
        id: Uuid,
        available: bool,
        healthy: bool,
        in_flight: u32,
        looks: std::sync::atomic::AtomicU32,
    }

    impl Counted {
        fn new(available: bool, healthy: bool, in_flight: u32) -> Arc<Self> {
            Arc::new(Self { id: Uuid::new_v4(), available, healthy, in_flight, ..Self::default() })
        }
        fn look(&self) {
            self.looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Candidate for Counted {
        fn id(&self) -> Uuid {
            self.id
        }
        fn name(&self) -> &str {
            "counted"
        }
        fn instance(&self) -> Uuid {
            self.id
        }
        fn is_available(&self) -> bool {
            self.look();
            self.available
        }
        fn is_healthy(&self) -> bool {
            self.look();
            self.healthy
        }
        fn in_flight(&self) -> u32 {
            self.in_flight
        }
    }

    fn looks(members: &[Arc<Counted>]) -> u32 {
        members.iter().map(|m| m.looks.swap(0, std::sync::atomic::Ordering::Relaxed)).sum()
    }

    #[test]
    fn a_choice_in_a_large_group_looks_at_few_members() {
        let members: Vec<_> = (0..1000).map(|_| Counted::new(true, true, 5)).collect();
        for balance in [Balance::RoundRobin, Balance::LeastInFlight] {
            let choice = Choice { balance, ..Choice::default() };
            let chosen = choose(&members, 417, &choice).unwrap();
            assert_eq!(chosen.id, members[417].id, "{balance:?}: the cursor's member");
            assert!(looks(&members) <= 2, "{balance:?} looked at more than the chosen member");
        }
        let choice = Choice { balance: Balance::Hash, key: Some(b"user-1"), exclude: None };
        let first = choose(&members, 0, &choice).unwrap();
        assert!(looks(&members) < 100, "hash checked the health of most members");
        assert_eq!(choose(&members, 999, &choice).unwrap().id, first.id);
    }

    #[test]
    fn round_robin_spreads_the_turns_of_members_that_are_out_evenly_and_falls_back_to_unhealthy_ones() {
        let members = vec![
            Counted::new(true, true, 0),
            Counted::new(false, true, 0),
            Counted::new(true, false, 0),
            Counted::new(true, true, 0),
            Counted::new(true, true, 0),
        ];
        let rr = Choice::default();
        let mut picks = std::collections::HashMap::new();
        for cursor in 0..5000 {
            *picks.entry(choose(&members, cursor, &rr).unwrap().id).or_insert(0) += 1;
        }
        assert_eq!(picks.len(), 3, "only the healthy usable members: {picks:?}");
        for id in [members[0].id, members[3].id, members[4].id] {
            // 1,000 turns each, and a third of the 2,000 turns of the two that are out.
            let share = picks[&id];
            assert!((1_500..=1_834).contains(&share), "uneven: {share} of 5,000");
        }
        let excluded = Choice { exclude: Some(members[3].id), ..rr };
        for cursor in 0..50 {
            assert_ne!(choose(&members, cursor, &excluded).unwrap().id, members[3].id);
        }
        let sick = vec![Counted::new(false, true, 0), Counted::new(true, false, 7), Counted::new(true, false, 3)];
        assert_ne!(choose(&sick, 0, &rr).unwrap().id, sick[0].id, "an unhealthy agent rather than none");
        let least = Choice { balance: Balance::LeastInFlight, ..rr };
        assert_eq!(choose(&sick, 0, &least).unwrap().id, sick[2].id);
        assert!(choose(&[Counted::new(false, true, 0)], 0, &rr).is_none());
        assert!(choose::<Counted>(&[], 0, &rr).is_none());
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
