//! Admission: what one client address (or network) may hold at once, and the relay's own budget
//! of connections, so that no single network can take what everyone else needs.
//!
//! - [`PerKey`]: a count per key (an address, a network) under a cap; each admitted unit is a
//!   [`Held`] guard that gives its place back when dropped.
//! - [`network_of`]: the network an address is counted in (IPv4 /24, IPv6 /48).
//! - [`Pending`]: places for agent connections that have not registered yet (QUIC handshakes and
//!   gRPC connections): a general pool in which each network gets a fair share, and a lane kept
//!   for the networks agents registered from (see [`crate::known_networks`]), so that after a
//!   restart under attack the fleet comes back.
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
        self.admit_under(key, self.max)
    }

    /// One more unit for `key`, or `None` once it holds `cap` (0: no cap) or the table's own.
    pub fn admit_under(self: &Arc<Self>, key: K, cap: usize) -> Option<Held<K>> {
        let mut held = self.held.entry(key.clone()).or_insert(0);
        if (self.max != 0 && *held >= self.max) || (cap != 0 && *held >= cap) {
            return None;
        }
        *held += 1;
        Some(Held { table: self.clone(), key })
    }

    /// Units held for `key` now.
    pub fn held(&self, key: &K) -> usize {
        self.held.get(key).map_or(0, |n| *n)
    }

    /// Keys holding at least one unit now.
    pub fn keys(&self) -> usize {
        self.held.len()
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

/// The network `ip` is counted in: its /24 for IPv4 (and IPv4-mapped IPv6), its /48 for IPv6
/// (what one site is commonly given: a /64 per address would let one site count as 65,536
/// networks).
pub fn network_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4) & 0xffff_ff00)),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 80) - 1))),
    }
}

/// Places for agent connections that have not registered yet.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The pool every network draws on, a fair share each.
    general: Lane,
    /// Kept for the networks agents registered from.
    reserved: Lane,
    max_per_network: usize,
}

/// One pool of pending places and what each network holds of it.
#[derive(Debug, Clone)]
struct Lane {
    size: usize,
    places: Arc<Semaphore>,
    per_network: Arc<PerKey<IpAddr>>,
}

impl Lane {
    fn new(size: usize) -> Self {
        Self { size, places: Arc::new(Semaphore::new(size)), per_network: PerKey::new(0) }
    }

    fn admit(&self, network: IpAddr, cap: usize) -> Result<PendingSlot, PendingRefused> {
        let network = self.per_network.admit_under(network, cap).ok_or(PendingRefused::Network)?;
        let global = self.places.clone().try_acquire_owned().map_err(|_| PendingRefused::Global)?;
        Ok(PendingSlot { _global: global, _network: network })
    }

    fn in_use(&self) -> usize {
        self.size.saturating_sub(self.places.available_permits())
    }
}

/// Why a new agent connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefused {
    /// Every pending place open to it is taken.
    Global,
    /// Its network holds its share of the places.
    Network,
}

/// A connection's place among the pending ones, held until it registers (or fails to).
#[derive(Debug)]
pub struct PendingSlot {
    _global: OwnedSemaphorePermit,
    _network: Held<IpAddr>,
}

impl Pending {
    /// `max` pending connections in all (a quarter of them kept for known agent networks), at
    /// most `max_per_network` from one network (0: no cap of its own, only the fair share).
    pub fn new(max: usize, max_per_network: usize) -> Self {
        let max = max.max(2);
        let reserved = max / 4;
        Self { general: Lane::new(max - reserved), reserved: Lane::new(reserved), max_per_network }
    }

    /// Connections holding a place now (handshaking, or not registered yet).
    pub fn count(&self) -> usize {
        self.general.in_use() + self.reserved.in_use()
    }

    /// A place for a new connection from `ip`; `known` when its network is one agents registered
    /// from. In the general pool a network gets at most a fair share, the pool divided by the
    /// networks holding places (its own counted) plus one; and a network that already holds
    /// places takes one more only while more than a share stays free, so that a network holding
    /// none always finds one, even just after a burst from others. A known network that finds
    /// no place there takes one in the reserved lane.
    pub fn admit(&self, ip: IpAddr, known: bool) -> Result<PendingSlot, PendingRefused> {
        let network = network_of(ip);
        let table = &self.general.per_network;
        let holds = table.held(&network);
        let networks = table.keys() + usize::from(holds == 0);
        let share = (self.general.size / (networks + 1)).max(1);
        let cap = if self.max_per_network == 0 { share } else { share.min(self.max_per_network) };
        let headroom = holds == 0 || self.general.places.available_permits() > share;
        let general = if headroom { self.general.admit(network, cap) } else { Err(PendingRefused::Network) };
        match general {
            Err(_) if known && self.reserved.size > 0 => self.reserved.admit(network, self.max_per_network),
            admitted => admitted,
        }
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
/// closes): `A`, its stream on the agent (or its peer relay's link), its place on the route and
/// under its client's cap.
pub struct Slots<A> {
    _agent: A,
    _route: Option<tokio::sync::OwnedSemaphorePermit>,
    _address: Held<std::net::IpAddr>,
}

impl<A> Slots<A> {
    /// Holds the stream slot on the agent's connection (or the peer relay's link), the route's
    /// slot (when the route is limited) and the client address's place.
    pub fn new(agent: A, route: Option<tokio::sync::OwnedSemaphorePermit>, address: Held<std::net::IpAddr>) -> Self {
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
    fn networks_are_slash_24_and_slash_48() {
        let net = |s: &str| network_of(s.parse().unwrap()).to_string();
        assert_eq!(net("192.0.2.77"), "192.0.2.0");
        assert_eq!(net("::ffff:192.0.2.77"), "192.0.2.0");
        assert_eq!(net("2001:db8:1:2:3:4:5:6"), "2001:db8:1::");
    }

    #[test]
    fn one_network_cannot_take_every_pending_place() {
        let pending = Pending::new(16, 3);
        let held: Vec<_> =
            (1..=3).map(|i| pending.admit(format!("198.51.100.{i}").parse().unwrap(), false).unwrap()).collect();
        assert_eq!(pending.admit("198.51.100.200".parse().unwrap(), false).unwrap_err(), PendingRefused::Network);
        assert!(pending.admit("203.0.113.1".parse().unwrap(), false).is_ok(), "another network still gets in");
        assert_eq!(pending.count(), 3, "the refused and the dropped hold nothing");
        drop(held);
        assert_eq!(pending.count(), 0);
    }

    #[test]
    fn networks_share_the_general_pool_fairly_and_known_ones_have_a_lane() {
        // 400 places: 300 general, 100 kept for known networks; no cap per network but the share.
        let pending = Pending::new(400, 0);
        let attack: Vec<IpAddr> = (0..20).map(|n| format!("10.0.{n}.1").parse().unwrap()).collect();
        let mut held = Vec::new();
        for _ in 0..30 {
            for ip in &attack {
                if let Ok(slot) = pending.admit(*ip, false) {
                    held.push(slot);
                }
            }
        }
        // Each of the 20 got at most about 300 / 21, and a share's worth of places stays free.
        assert!(held.len() <= 20 * (300 / 21) && held.len() >= 250, "{} held", held.len());
        // Networks arriving one after another, each as fast as it can (the probe's attack at
        // the default settings): a network with nothing still finds a place.
        let defaults = Pending::new(512, 32);
        let burst: Vec<_> = (0..20)
            .flat_map(|n| (0..30).map(move |h| format!("10.9.{n}.{h}").parse::<IpAddr>().unwrap()))
            .filter_map(|ip| defaults.admit(ip, false).ok())
            .collect();
        assert!(defaults.admit("192.0.2.1".parse().unwrap(), false).is_ok(), "{} held by the burst", burst.len());
        let newcomer = pending.admit("192.0.2.1".parse().unwrap(), false);
        assert!(newcomer.is_ok(), "a network holding nothing still finds a place: {:?}", newcomer.err());
        // The general pool filled by many more networks: a known network takes its lane.
        let more: Vec<_> = (0..1000)
            .filter_map(|n| pending.admit(format!("10.{}.{}.1", 1 + n / 250, n % 250).parse().unwrap(), false).ok())
            .collect();
        assert_eq!(pending.count(), 300, "the general pool is full: {} more", more.len());
        assert!(pending.admit("192.0.2.99".parse().unwrap(), false).is_err());
        let known: Vec<_> = (0..5).map(|_| pending.admit("198.51.100.7".parse().unwrap(), true).unwrap()).collect();
        assert_eq!(pending.count(), 305);
        drop((held, more, known, newcomer, burst));
        assert_eq!(pending.count(), 0);
    }

    #[test]
    fn the_connection_budget_leaves_descriptors_over() {
        assert_eq!(connection_budget(500, Some(100)), 500, "a configured budget wins");
        assert_eq!(connection_budget(0, Some(1024)), 768);
        assert_eq!(connection_budget(0, Some(200)), 136);
        assert_eq!(connection_budget(0, Some(10)), 16);
    }
}
