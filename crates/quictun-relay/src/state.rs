//! What the relay's tasks share, split by lifetime: [`Settings`] (fixed at start), [`LiveConfig`]
//! (swapped whole on reload), [`Runtime`] (sessions, admission, metrics, shutdown).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use quictun_core::logsafe::Inert;
use quictun_core::stall::Reclaimer;
use quictun_core::tls::Pin;
use quictun_core::upstream_http::UpstreamHttp;
use quictun_proto::{AgentConfig, Limits, Register, RejectCode, Rejected, UpstreamSpec};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Pending, PerKey, connection_budget};
use crate::config::{ConfigError, RelayConfig, RelaySection};
use crate::declared::{Allowances, Declared};
use crate::known_networks::KnownNetworks;
use crate::metrics::RelayMetrics;
use crate::router::{EgressRouter, HostMatch, Router};
use crate::sessions::{SessionCommand, SessionManager};

/// How long the relay tries to connect to an egress target (then 504).
const EGRESS_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A client allowed to connect, with its token kept only as a SHA-256 digest.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    group: String,
    token_digest: [u8; 32],
    allowances: Allowances,
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The parts of the configuration that may change at run time, swapped as a whole.
#[derive(Debug)]
pub struct Live {
    /// The configuration version (1 at start, +1 per reload); agents ignore older ones.
    pub version: u64,
    /// The routing table.
    pub router: Router,
    /// Where agents' egress requests go.
    pub egress: EgressRouter,
    clients: HashMap<String, ClientAuth>,
    configs: HashMap<String, AgentConfig>,
}

impl Live {
    /// Compiles `config` into the live view (tokens read, routes and targets resolved); `version`
    /// numbers the agent configs. Anything that does not resolve is an error naming its key:
    /// nothing is left out silently, at start or on reload.
    pub fn new(config: &RelayConfig, version: u64) -> Result<Self, ConfigError> {
        // A configuration built in code (not read from a file) is held to the file's rules too.
        config.validate(&config.source)?;
        let mut clients = HashMap::with_capacity(config.clients.len());
        for (i, c) in config.clients.iter().enumerate() {
            let token = config.client_token(i)?;
            let allowances = Allowances {
                hosts: c.allow_hosts.iter().map(|pattern| HostMatch::parse(pattern)).collect(),
                // Checked by `validate` above.
                ports: c.allow_tcp_ports.iter().filter_map(|ports| ports.ports().ok()).collect(),
            };
            let token_digest = digest(token.expose());
            clients.insert(c.id.clone(), ClientAuth { group: c.group.clone(), token_digest, allowances });
        }
        let mut configs: HashMap<String, AgentConfig> = HashMap::new();
        for u in &config.upstreams {
            let entry = configs.entry(u.group.clone()).or_insert_with(|| AgentConfig { version, upstreams: vec![] });
            entry.upstreams.push(UpstreamSpec { name: u.name.clone(), targets: u.targets.clone() });
        }
        let (router, egress) = (Router::new(config)?, EgressRouter::new(config)?);
        Ok(Self { version, router, egress, clients, configs })
    }

    /// Checks a registration: known client, right token (constant time), right group and protocol
    /// version. Returns the group the session serves.
    pub fn authenticate(&self, register: &Register) -> Result<String, Rejected> {
        let reject = |code, message: &str| Rejected { code, message: message.to_owned() };
        if register.protocol_version != quictun_proto::PROTOCOL_VERSION {
            return Err(reject(
                RejectCode::VersionMismatch,
                &format!(
                    "protocol version {} not supported (relay speaks {})",
                    register.protocol_version,
                    quictun_proto::PROTOCOL_VERSION
                ),
            ));
        }
        let offered = digest(register.token.expose());
        // Compare against a dummy for unknown ids so timing does not tell which ids exist.
        let (client, expected) = match self.clients.get(&register.client_id) {
            Some(c) => (Some(c), c.token_digest),
            None => (None, digest("\0unknown-client")),
        };
        let token_ok: bool = offered.ct_eq(&expected).into();
        let Some(client) = client.filter(|_| token_ok) else {
            return Err(reject(RejectCode::BadToken, "unknown client_id or wrong token"));
        };
        if !register.group.is_empty() && register.group != client.group {
            return Err(reject(
                RejectCode::GroupMismatch,
                &format!("this client belongs to group {:?}, not {:?}", client.group, Inert(&register.group)),
            ));
        }
        Ok(client.group.clone())
    }

    /// The group `client_id` belongs to, when it may connect.
    pub fn group_of(&self, client_id: &str) -> Option<&str> {
        self.clients.get(client_id).map(|c| c.group.as_str())
    }

    /// What `client_id` may declare, when it may connect.
    pub fn allowances(&self, client_id: &str) -> Option<&Allowances> {
        self.clients.get(client_id).map(|c| &c.allowances)
    }

    /// The configuration pushed to agents of `group`.
    pub fn agent_config(&self, group: &str) -> AgentConfig {
        self.configs.get(group).cloned().unwrap_or_default()
    }
}

/// What is fixed at start: the `[relay]` section (read through `Deref`) and the tunnel's frame
/// limits.
#[derive(Debug)]
pub struct Settings {
    relay: RelaySection,
    /// Frame limits on the tunnel, the same at every agent: the ingress's own (at most the
    /// client's ceiling, see `RelayConfig::validate`) plus the headers the relay adds.
    pub limits: Limits,
}

impl std::ops::Deref for Settings {
    type Target = RelaySection;

    fn deref(&self) -> &RelaySection {
        &self.relay
    }
}

impl Settings {
    /// How long a proxied body may make no progress (`None`: no limit).
    pub fn stream_idle_timeout(&self) -> Option<std::time::Duration> {
        match self.relay.stream_idle_timeout_secs {
            0 => None,
            secs => Some(std::time::Duration::from_secs(secs)),
        }
    }
}

/// The live configuration (routes, clients, agent configs, egress routes), swapped whole on
/// reload: a request takes the current one and keeps it to its end.
#[derive(Debug)]
pub struct LiveConfig(RwLock<Arc<Live>>);

impl LiveConfig {
    /// The current live configuration.
    pub fn current(&self) -> Arc<Live> {
        match self.0.read() {
            Ok(live) => live.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Compiles `config` as the next version and swaps it in; nothing changes when it does not
    /// compile.
    /// Swaps in `config`; returns the configuration it replaced and the new one.
    fn replace(&self, config: &RelayConfig) -> Result<(Arc<Live>, Arc<Live>), ConfigError> {
        let mut slot = self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let live = Arc::new(Live::new(config, slot.version + 1)?);
        let previous = std::mem::replace(&mut *slot, live.clone());
        Ok((previous, live))
    }
}

/// What lives as long as the relay process: sessions, admission tables, metrics, tasks and the
/// shutdown signals.
#[derive(Debug)]
pub struct Runtime {
    /// Live sessions.
    pub sessions: Arc<SessionManager>,
    /// Cancelled when the relay starts shutting down (stop accepting, go-away, drain).
    pub shutdown: CancellationToken,
    /// Cancelled when the drain is over: everything still running stops.
    pub stopped: CancellationToken,
    /// Owns every task the relay spawns.
    pub tasks: TaskTracker,
    /// The relay's metrics.
    pub metrics: RelayMetrics,
    /// When the relay started.
    pub started: tokio::time::Instant,
    /// The client agents' egress requests are forwarded with.
    pub egress_http: UpstreamHttp,
    /// Watches every body from an agent for stalled readers (see [`quictun_core::stall`]).
    pub reclaimer: Reclaimer,
    /// Ingress connections the relay may still take (see [`crate::admission::connection_budget`]).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Requests in flight per client address.
    pub requests_per_ip: Arc<PerKey<std::net::IpAddr>>,
    /// Agent connections not registered yet.
    pub pending: Pending,
    /// The networks agents registered from (their lane among the pending places).
    pub known_networks: Arc<KnownNetworks>,
    /// The tunnels agents declared, and their holders.
    pub declared: Declared,
    /// The recent requests, and the count of every request by status class.
    pub inspector: Arc<crate::inspect::Inspector>,
    /// The cluster this relay is part of (`[cluster]`).
    pub cluster: Option<crate::cluster::Cluster>,
}

/// What the relay's tasks share, split by lifetime.
#[derive(Debug)]
pub struct RelayState {
    /// Fixed at start.
    pub settings: Arc<Settings>,
    /// Swapped whole on reload.
    pub live: LiveConfig,
    /// As long as the process.
    pub runtime: Arc<Runtime>,
}

impl RelayState {
    /// The state of a relay for `config`, compiled (see [`Live::new`]).
    /// `cert_pin` is the fingerprint of the relay's certificate (published to its cluster).
    pub fn new(config: &RelayConfig, cert_pin: Option<&Pin>) -> Result<Self, ConfigError> {
        let live = Live::new(config, 1)?;
        let reclaimer = Reclaimer::new(config.relay.stall_limits());
        let mut metrics = RelayMetrics::new();
        metrics.register_stall(reclaimer.metrics());
        let (shutdown, stopped, tasks) = (CancellationToken::new(), CancellationToken::new(), TaskTracker::new());
        let cluster = match (&config.cluster, config.cluster_token()?) {
            (Some(section), Some(token)) => {
                let joining = crate::cluster::Joining {
                    token,
                    pin: cert_pin.map(ToString::to_string).unwrap_or_default(),
                    limits: Limits::default(),
                    stall: reclaimer.clone(),
                    tasks: tasks.clone(),
                    stop: stopped.clone(),
                    registry: metrics.registry_mut(),
                };
                Some(
                    crate::cluster::Cluster::new(section, joining)
                        .map_err(|err| config.invalid("cluster.etcd", err.to_string()))?,
                )
            }
            _ => None,
        };
        let runtime = Runtime {
            sessions: Arc::new(SessionManager::new()),
            shutdown,
            stopped,
            tasks,
            metrics,
            started: tokio::time::Instant::now(),
            egress_http: UpstreamHttp::new(
                EGRESS_CONNECT_TIMEOUT,
                std::time::Duration::from_secs(config.relay.response_timeout_secs),
            ),
            reclaimer,
            connections: Arc::new(tokio::sync::Semaphore::new(connection_budget(
                config.relay.max_connections,
                rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft),
            ))),
            requests_per_ip: PerKey::new(config.relay.max_requests_per_ip),
            pending: Pending::new(config.relay.max_pending_connections, config.relay.max_pending_per_network),
            known_networks: KnownNetworks::load(config.relay.agent_networks_file.clone()),
            declared: Declared::default(),
            inspector: Arc::new(crate::inspect::Inspector::new(config.relay.inspect_capacity)),
            cluster,
        };
        Ok(Self {
            settings: Arc::new(Settings { relay: config.relay.clone(), limits: Limits::default() }),
            live: LiveConfig(RwLock::new(Arc::new(live))),
            runtime: Arc::new(runtime),
        })
    }

    /// Swaps in the routes, upstreams and clients of `config` as one new version, atomically for
    /// every later request (requests in flight keep the route they were given). Each connected
    /// agent whose group's configuration changed is pushed the new one (an agent whose group's
    /// did not is left alone: a reload of an unchanged file sends nothing); an agent whose client
    /// was removed, or moved to another group, is disconnected; a tunnel an agent declared that
    /// its client may no longer declare is revoked, and the agent told. Returns the new version; a
    /// configuration that does not compile changes nothing.
    pub fn reload(&self, config: &RelayConfig) -> Result<u64, ConfigError> {
        let (previous, live) = self.live.replace(config)?;
        for session in self.runtime.sessions.all() {
            if live.group_of(&session.client_id) != Some(&*session.group) {
                tracing::info!(client_id = %session.client_id, "client removed or regrouped by the reload: disconnecting");
                session.tunnel.close(quictun_proto::CloseCode::Rejected);
                self.runtime.sessions.remove(&session);
                continue;
            }
            let config = live.agent_config(&session.group);
            if config.upstreams == previous.agent_config(&session.group).upstreams {
                continue;
            }
            if session.command(SessionCommand::ConfigSync(config)) {
                self.runtime.metrics.config_syncs.inc();
            } else {
                tracing::warn!(client_id = %session.client_id, "could not queue config_sync; the agent gets it on reconnect");
            }
        }
        let revoked = self.runtime.declared.recheck(|client| live.allowances(client).cloned(), &live.router);
        for (session, answer) in revoked {
            session.command(SessionCommand::ClaimAnswers(vec![answer]));
        }
        Ok(live.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_proto::Token;
    use std::path::Path;

    fn live() -> Live {
        let text = "[[clients]]\nid = \"a\"\ntoken = \"secret\"\ngroup = \"web\"\n\
                    [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"http://127.0.0.1:1\"]\n";
        Live::new(&RelayConfig::parse(text, Path::new("t.toml")).unwrap(), 1).unwrap()
    }

    fn register(id: &str, token: &str, group: &str) -> Register {
        Register {
            protocol_version: quictun_proto::PROTOCOL_VERSION,
            client_id: id.into(),
            group: group.into(),
            token: Token::new(token),
            agent_version: "test".into(),
            instance_id: uuid::Uuid::nil(),
        }
    }

    #[test]
    fn authentication_outcomes() {
        let live = live();
        assert_eq!(live.authenticate(&register("a", "secret", "web")).unwrap(), "web");
        assert_eq!(live.authenticate(&register("a", "secret", "")).unwrap(), "web");
        assert_eq!(live.authenticate(&register("a", "wrong", "web")).unwrap_err().code, RejectCode::BadToken);
        assert_eq!(live.authenticate(&register("b", "secret", "web")).unwrap_err().code, RejectCode::BadToken);
        assert_eq!(live.authenticate(&register("a", "secret", "other")).unwrap_err().code, RejectCode::GroupMismatch);
        let mut old = register("a", "secret", "web");
        old.protocol_version = 0;
        assert_eq!(live.authenticate(&old).unwrap_err().code, RejectCode::VersionMismatch);
    }

    #[test]
    fn agent_config_holds_the_groups_upstreams() {
        let config = live().agent_config("web");
        assert_eq!(config.version, 1);
        assert_eq!(config.upstreams[0].name, "app");
        assert!(live().agent_config("none").upstreams.is_empty());
    }
}
