//! Tunnels that agents declare (cloudflared's ingress rules, frpc's proxies): an agent claims
//! HTTP hosts and TCP ports on its control channel ([`Claim`]), and the relay checks each claim
//! against its client's allowances (`allow_hosts`, `allow_tcp_ports`) and what others hold.
//!
//! - A host the relay's own routes name (exactly or by a wildcard) stays the relay's.
//! - Agents of one group that claim the same host or port share it ([`Holders`], balanced as a
//!   group); another group's claim on a held one is refused, and the holder keeps it.
//! - A TCP port is bound (on `relay.declared_tcp_address`) when its first holder claims it and
//!   released when its last holder withdraws it or leaves; a port the system will not bind is
//!   refused with the system's error.
//!
//! An agent sends its whole set each time; what it no longer claims is withdrawn.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};

use quictun_core::logsafe::Inert;
use quictun_proto::Claim;
use quictun_proto::ClaimAnswer;
use quictun_proto::limits::MAX_CLAIMS;
use serde::Serialize;
use tokio_util::sync::DropGuard;
use tracing::{info, warn};
use uuid::Uuid;

use crate::hosts::{HostMatch, host_name};
use crate::router::{Route, Router};
use crate::sessions::{Holders, Session};

/// What a client may declare, from its `[[clients]]` entry.
#[derive(Debug, Clone, Default)]
pub struct Allowances {
    /// `allow_hosts`.
    pub hosts: Vec<HostMatch>,
    /// `allow_tcp_ports`.
    pub ports: Vec<std::ops::RangeInclusive<u16>>,
}

/// A declared port being served: its bound address, and its listener's life (it stops when
/// this is dropped).
pub type OpenPort = (SocketAddr, DropGuard);

/// Binds a declared port and serves it through its holders; the error says why it could not.
pub type OpenPortFn<'a> = dyn Fn(u16, &Arc<Holders>) -> Result<OpenPort, String> + 'a;

/// What a claim is checked against, and how a port is opened.
pub struct Rules<'a> {
    /// The claiming client's allowances.
    pub allowed: &'a Allowances,
    /// The relay's own routes (a host they name stays the relay's).
    pub router: &'a Router,
    /// Binds a declared port and serves it through its holders until the guard is dropped;
    /// returns the bound address, or why it could not.
    pub open_port: &'a OpenPortFn<'a>,
}

/// Whether a client with `allowed` may make `claim` beside the relay's own routes.
fn permitted(claim: &Claim, allowed: &Allowances, router: &Router) -> Result<(), String> {
    match claim {
        Claim::Http { host } => {
            host_name(host)?;
            if !allowed.hosts.iter().any(|pattern| pattern.matches(host)) {
                return Err("not in this client's allow_hosts".into());
            }
            if router.names_host(host) {
                return Err("the relay's own routes serve this host".into());
            }
        }
        Claim::Tcp { port } => {
            if !allowed.ports.iter().any(|ports| ports.contains(port)) {
                return Err("not in this client's allow_tcp_ports".into());
            }
        }
    }
    Ok(())
}

/// A held claim.
struct Held {
    group: Arc<str>,
    holders: Arc<Holders>,
    /// A TCP port's listener.
    listener: Option<OpenPort>,
}

#[derive(Default)]
struct Table {
    held: HashMap<Claim, Held>,
    /// The declared hosts' routes, for the request path.
    hosts: HashMap<String, Arc<Route>>,
    /// What each session holds.
    by_session: HashMap<Uuid, BTreeSet<Claim>>,
}

/// Every declared tunnel held, and by whom.
#[derive(Default)]
pub struct Declared {
    table: RwLock<Table>,
}

impl std::fmt::Debug for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Declared").field("held", &self.read().held.len()).finish()
    }
}

/// One tunnel as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeclaredView {
    /// `agent` (declared) or `relay` (a `[[tcp]]` entry).
    pub source: &'static str,
    /// `http` or `tcp`.
    pub kind: &'static str,
    /// The host, for HTTP.
    pub host: Option<String>,
    /// The bound address, for TCP.
    pub listen: Option<String>,
    /// The group holding it.
    pub group: String,
    /// The client ids of its holders, in claim order.
    pub holders: Vec<String>,
}

impl Declared {
    /// The route of the HTTP tunnel declared for `host` (any case, port ignored), while held.
    pub fn route(&self, host: &str) -> Option<Arc<Route>> {
        let table = self.read();
        if table.hosts.is_empty() {
            return None;
        }
        table.hosts.get(&crate::router::normalize_host(host)).cloned()
    }

    /// Applies `claims`, the whole set `session` now declares, and answers each in order. What
    /// the session held and no longer claims is withdrawn first.
    pub fn claim(&self, rules: &Rules<'_>, session: &Arc<Session>, claims: Vec<Claim>) -> Vec<ClaimAnswer> {
        let wanted: BTreeSet<Claim> = claims.iter().take(MAX_CLAIMS).cloned().collect();
        let mut table = self.write();
        let held_now = table.by_session.remove(&session.session_id).unwrap_or_default();
        for gone in held_now.difference(&wanted) {
            table.withdraw(gone, session);
        }
        let mut holds = BTreeSet::new();
        let answers = claims
            .into_iter()
            .enumerate()
            .map(|(i, claim)| {
                let refused = if i >= MAX_CLAIMS {
                    Some(format!("more than {MAX_CLAIMS} tunnels declared"))
                } else {
                    table.take(rules, session, &claim).err()
                };
                match &refused {
                    None => {
                        if !held_now.contains(&claim) {
                            info!(%claim, group = %session.group, "declared tunnel accepted");
                        }
                        holds.insert(claim.clone());
                    }
                    Some(why) => {
                        warn!(claim = %Inert(&claim.to_string()), why, "declared tunnel refused");
                        if held_now.contains(&claim) {
                            table.withdraw(&claim, session);
                        }
                    }
                }
                ClaimAnswer { claim, refused }
            })
            .collect();
        if !holds.is_empty() {
            table.by_session.insert(session.session_id, holds);
        }
        answers
    }

    /// Withdraws everything `session` held (it ended).
    pub fn release(&self, session: &Session) {
        let mut table = self.write();
        if let Some(held) = table.by_session.remove(&session.session_id) {
            for claim in &held {
                table.withdraw(claim, session);
            }
        }
    }

    /// After a reload: withdraws each claim its holder may no longer make (its client's
    /// allowances changed, or the relay's routes now name the host), and returns each with the
    /// session that held it and the reason, for the agent.
    pub fn recheck(
        &self,
        allowed: impl Fn(&str) -> Option<Allowances>,
        router: &Router,
    ) -> Vec<(Arc<Session>, ClaimAnswer)> {
        let mut table = self.write();
        let holdings: Vec<(Claim, Vec<Arc<Session>>)> =
            table.held.iter().map(|(claim, held)| (claim.clone(), held.holders.sessions())).collect();
        let mut revoked = Vec::new();
        for (claim, sessions) in holdings {
            for session in sessions {
                let Err(why) = permitted(&claim, &allowed(&session.client_id).unwrap_or_default(), router) else {
                    continue;
                };
                warn!(%claim, client_id = %session.client_id, why, "declared tunnel revoked by the reload");
                table.withdraw(&claim, &session);
                if let Some(held) = table.by_session.get_mut(&session.session_id) {
                    held.remove(&claim);
                }
                revoked.push((session, ClaimAnswer { claim: claim.clone(), refused: Some(why) }));
            }
        }
        revoked
    }

    /// Every declared tunnel and its holders, HTTP hosts first, each kind in order.
    pub fn list(&self) -> Vec<DeclaredView> {
        let table = self.read();
        let mut claims: Vec<_> = table.held.iter().collect();
        claims.sort_by(|a, b| a.0.cmp(b.0));
        claims
            .into_iter()
            .map(|(claim, held)| {
                let (kind, host) = match claim {
                    Claim::Http { host } => ("http", Some(host.clone())),
                    Claim::Tcp { .. } => ("tcp", None),
                };
                DeclaredView {
                    source: "agent",
                    kind,
                    host,
                    listen: held.listener.as_ref().map(|(addr, _)| addr.to_string()),
                    group: held.group.to_string(),
                    holders: held.holders.client_ids().iter().map(|id| id.to_string()).collect(),
                }
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table {
    /// Makes `session` a holder of `claim`, or says why not.
    fn take(&mut self, rules: &Rules<'_>, session: &Arc<Session>, claim: &Claim) -> Result<(), String> {
        permitted(claim, rules.allowed, rules.router)?;
        if let Some(held) = self.held.get(claim) {
            if held.group != session.group {
                return Err("another group holds it".into());
            }
            held.holders.join(session);
            return Ok(());
        }
        let holders = Arc::new(Holders::new(claim.to_string()));
        let listener = match claim {
            Claim::Http { host } => {
                self.hosts.insert(host.clone(), Arc::new(Route::declared(host, holders.clone())));
                None
            }
            Claim::Tcp { port } => Some((rules.open_port)(*port, &holders)?),
        };
        holders.join(session);
        self.held.insert(claim.clone(), Held { group: session.group.clone(), holders, listener });
        Ok(())
    }

    /// Takes `session` off `claim`'s holders; the last one out frees the host or the port.
    fn withdraw(&mut self, claim: &Claim, session: &Session) {
        let Some(held) = self.held.get(claim) else { return };
        if !held.holders.leave(session.session_id) {
            return;
        }
        self.held.remove(claim);
        if let Claim::Http { host } = claim {
            self.hosts.remove(host);
        }
        info!(%claim, "declared tunnel released: its last holder left");
    }
}

#[cfg(test)]
mod tests {
    use crate::config::PortSpec;
    use crate::hosts::{HostMatch, host_name};

    #[test]
    fn declared_hosts_are_lower_case_names_and_ports_are_ports_or_ranges() {
        assert!(host_name("app.dev.example.com").is_ok());
        assert!(host_name("a-1.example").is_ok());
        for bad in ["", "App.example.com", "a..b", "-a.b", "a.b-", "a b", "a:80", "*.b", &"a".repeat(64)] {
            assert!(host_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(PortSpec::One(2222).ports(), Ok(2222..=2222));
        assert_eq!(PortSpec::Range("7000-7099".into()).ports(), Ok(7000..=7099));
        assert_eq!(PortSpec::Range("80".into()).ports(), Ok(80..=80));
        for bad in ["7099-7000", "0-10", "a-b", "70000", ""] {
            assert!(PortSpec::Range(bad.into()).ports().is_err(), "{bad:?}");
        }
        assert!(PortSpec::One(0).ports().is_err());
        assert!(HostMatch::parse_pattern("*").is_err(), "a client may not be allowed every host");
        assert!(HostMatch::parse_pattern("*.dev.example.com").unwrap().matches("app.dev.example.com"));
    }
}
