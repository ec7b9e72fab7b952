//! Admission: what one client address (or network) may hold at once, and the relay's own budget
//! of connections, so that no single network can take what everyone else needs.
//!
//! - [`PerKey`]: a count per key (an address, a network) under a cap; each admitted unit is a
//!   [`Held`] guard that gives its place back when dropped.
//! - [`network_of`]: the network an address is counted in (IPv4 /24, IPv6 /64).
//! - [`Pending`]: places for agent connections that have not registered yet (QUIC handshakes and
//!   gRPC connections), a global cap and one per network.
//! - [`connection_budget`]: how many ingress connections the relay takes at once, from its file
//!   descriptor limit, so the admin endpoint and the agents always have descriptors left.

use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A count per key under a cap (0: no cap).
#[derive(Debug)]
pub struct PerKey<K: Eq + Hash + Clone> {
    held: DashMap<K, usize>,
    max: usize,
}

/// One admitted unit of a [`PerKey`]; gives its place back when dropped.
#[derive(Debug)]
pub struct Held<K: Eq + Hash + Clone> {
    table: Arc<PerKey<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> PerKey<K> {
    /// A table allowing `max` units per key (0: any number).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { held: DashMap::new(), max })
    }

    /// One more unit for `key`, or `None` at its cap.
    pub fn admit(self: &Arc<Self>, key: K) -> Option<Held<K>> {
        let mut held = self.held.entry(key.clone()).or_insert(0);
        if self.max != 0 && *held >= self.max {
            return None;
        }
        *held += 1;
        Some(Held { table: self.clone(), key })
    }

    /// Units held for `key` now.
    #[cfg(test)]
    pub fn held(&self, key: &K) -> usize {
        self.held.get(key).map_or(0, |n| *n)
    }
}

impl<K: Eq + Hash + Clone> Drop for Held<K> {
    fn drop(&mut self) {
        let _gone = self.table.held.remove_if_mut(&self.key, |_, held| {
            *held -= 1;
            *held == 0
        });
    }
}

/// The network `ip` is counted in: its /24 for IPv4 (and IPv4-mapped IPv6), its /64 for IPv6.
pub fn network_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
    }
}

/// Places for agent connections that have not registered yet.
#[derive(Debug, Clone)]
pub struct Pending {
    max: usize,
    global: Arc<Semaphore>,
    per_network: Arc<PerKey<IpAddr>>,
}

/// Why a new agent connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefused {
    /// Every pending place of the relay is taken.
    Global,
    /// The places of the client's network are taken.
    Network,
}

/// A connection's place among the pending ones, held until it registers (or fails to).
#[derive(Debug)]
pub struct PendingSlot {
    _global: OwnedSemaphorePermit,
    _network: Held<IpAddr>,
}

impl Pending {
    /// `max` pending connections in all, `max_per_network` from one network (0: no cap).
    pub fn new(max: usize, max_per_network: usize) -> Self {
        let max = max.max(1);
        Self { max, global: Arc::new(Semaphore::new(max)), per_network: PerKey::new(max_per_network) }
    }

    /// Connections holding a place now (handshaking, or not registered yet).
    pub fn count(&self) -> usize {
        self.max.saturating_sub(self.global.available_permits())
    }

    /// A place for a new connection from `ip`.
    pub fn admit(&self, ip: IpAddr) -> Result<PendingSlot, PendingRefused> {
        let network = self.per_network.admit(network_of(ip)).ok_or(PendingRefused::Network)?;
        let global = self.global.clone().try_acquire_owned().map_err(|_| PendingRefused::Global)?;
        Ok(PendingSlot { _global: global, _network: network })
    }
}

/// Descriptors kept out of the ingress connection budget, at least: the admin endpoint, agents'
/// gRPC connections, connections to egress targets, files.
const RESERVED_DESCRIPTORS: u64 = 64;

/// How many ingress connections (HTTP, HTTPS, TCP tunnels) the relay takes at once: `configured`,
/// or with 0 three quarters of the process's file descriptor limit (`soft_limit`), so that the
/// rest is always there for the admin endpoint, the agents and the upstreams.
pub fn connection_budget(configured: usize, soft_limit: Option<u64>) -> usize {
    if configured != 0 {
        return configured;
    }
    let Some(limit) = soft_limit else { return usize::MAX >> 4 };
    let budget = (limit / 4 * 3).min(limit.saturating_sub(RESERVED_DESCRIPTORS)).max(16);
    usize::try_from(budget).unwrap_or(usize::MAX >> 4)
}

/// The slots one exchange holds until its response body ends (or its upgraded connection
/// closes): its stream on the agent, its place on the route and under its client's cap.
pub struct Slots {
    _agent: crate::sessions::StreamPermit,
    _route: Option<tokio::sync::OwnedSemaphorePermit>,
    _address: Held<std::net::IpAddr>,
}

impl Slots {
    /// Holds the stream slot on the agent's connection, the route's slot (when the route is
    /// limited) and the client address's place.
    pub fn new(
        agent: crate::sessions::StreamPermit,
        route: Option<tokio::sync::OwnedSemaphorePermit>,
        address: Held<std::net::IpAddr>,
    ) -> Self {
        Self { _agent: agent, _route: route, _address: address }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_up_to_its_cap_and_gets_places_back() {
        let table = PerKey::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = table.admit(ip).unwrap();
        let _second = table.admit(ip).unwrap();
        assert!(table.admit(ip).is_none());
        assert!(table.admit("192.0.2.2".parse().unwrap()).is_some(), "other keys are not affected");
        drop(first);
        assert!(table.admit(ip).is_some());
        let unlimited = PerKey::new(0);
        let held: Vec<_> = (0..100).map(|_| unlimited.admit(1u8).unwrap()).collect();
        assert_eq!(unlimited.held(&1), 100);
        drop(held);
        assert_eq!(unlimited.held(&1), 0);
    }

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        let net = |s: &str| network_of(s.parse().unwrap()).to_string();
        assert_eq!(net("192.0.2.77"), "192.0.2.0");
        assert_eq!(net("::ffff:192.0.2.77"), "192.0.2.0");
        assert_eq!(net("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
    }

    #[test]
    fn one_network_cannot_take_every_pending_place() {
        let pending = Pending::new(10, 3);
        let held: Vec<_> =
            (1..=3).map(|i| pending.admit(format!("198.51.100.{i}").parse().unwrap()).unwrap()).collect();
        assert_eq!(pending.admit("198.51.100.200".parse().unwrap()).unwrap_err(), PendingRefused::Network);
        assert!(pending.admit("203.0.113.1".parse().unwrap()).is_ok(), "another network still gets in");
        assert_eq!(pending.count(), 3, "the refused and the dropped hold nothing");
        drop(held);
        assert_eq!(pending.count(), 0);
        let mut more = Vec::new();
        for i in 0..10 {
            if let Ok(slot) = pending.admit(format!("10.{i}.0.1").parse().unwrap()) {
                more.push(slot);
            }
        }
        assert_eq!(more.len(), 10);
        assert_eq!(pending.admit("10.99.0.1".parse().unwrap()).unwrap_err(), PendingRefused::Global);
    }

    #[test]
    fn the_connection_budget_leaves_descriptors_over() {
        assert_eq!(connection_budget(500, Some(100)), 500, "a configured budget wins");
        assert_eq!(connection_budget(0, Some(1024)), 768);
        assert_eq!(connection_budget(0, Some(200)), 136);
        assert_eq!(connection_budget(0, Some(10)), 16);
    }
}
