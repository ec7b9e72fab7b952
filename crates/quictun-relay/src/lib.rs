//! The quictun relay.
//!
//! Listens for agents on QUIC, keeps a session per registered agent, and proxies HTTP requests
//! from its ingress to agents, one QUIC stream per request.
//!
//! - [`config`]: the `relay.toml` file.
//! - `state`: what the tasks share, by lifetime: settings, the live configuration (routes,
//!   clients, agent configs, compiled once), the runtime (sessions, admission, metrics, shutdown).
//! - `sessions`: client_id → session, group → sessions; `balance` chooses among them.
//! - `registration`: registration, then the relay's side of the shared control session
//!   (`quictun_core::session`), for any transport.
//! - `agents`: the agent listeners, one per transport, chosen in one place, served by one accept
//!   loop with the same admission rules (handshake rate, pending places) for every transport.
//! - `router`: host and path routing.
//! - `ingress` and `proxy`: the HTTP server and the per-request forwarding.
//! - `cluster`: the relay's sessions in the cluster's session directory (etcd), `[cluster]`.
//! - `admin` and `inspect`: the admin endpoint's pages, the dashboard and its ring of recent
//!   requests.
//! - `tcp`: TCP tunnels (`[[tcp]]`), one stream per connection.
//! - `udp`: UDP tunnels (`[[udp]]`), one flow per client address: DATAGRAM frames and a stream.
//!
//! [`Relay::start`] binds everything and returns a [`Relay`] handle; [`Relay::shutdown`] drains.

mod access;
mod admin;
mod admission;
mod agents;
mod balance;
mod body;
mod cluster;
pub mod config;
mod conn_clock;
mod declared;
mod egress;
mod error;
#[cfg(test)]
mod fake_tunnel;
mod from_peers;
mod hosts;
mod ingress;
mod inspect;
mod known_networks;
mod liveness;
mod metrics;
mod peers;
mod policies;
mod proxy;
mod registration;
mod router;
mod sessions;
mod state;
mod tcp;
mod udp;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::Pin;
use quictun_core::tls::CertKey;
use tracing::info;

pub use balance::Balance;
pub use config::{ConfigError, RelayConfig};
pub use error::RelayError;
pub use sessions::{Session, SessionManager};

use crate::agents::AgentListeners;
use crate::state::RelayState;

/// A running relay.
pub struct Relay {
    shared: Arc<RelayState>,
    agents: AgentListeners,
    ingresses: Vec<tokio::task::JoinHandle<()>>,
    addrs: Addrs,
    tcp_entries: Vec<config::TcpEntry>,
    udp_entries: Vec<config::UdpEntry>,
    cluster_entry: Option<config::ClusterSection>,
    pin: Option<Pin>,
}

/// Where a relay listens.
#[derive(Debug, Clone)]
struct Addrs {
    quic: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    http: SocketAddr,
    https: Option<SocketAddr>,
    admin: SocketAddr,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
}

/// The HTTPS ingress's TLS configuration: its own certificate when `https_cert` is set, the
/// relay's otherwise.
fn https_config(
    settings: &config::RelaySection,
    relay_cert: &CertKey,
) -> Result<Arc<rustls::ServerConfig>, RelayError> {
    let cert = match (&settings.https_cert, &settings.https_key) {
        (Some(cert), Some(key)) => CertKey::load(cert, key).map_err(RelayError::HttpsCert)?,
        _ => relay_cert.clone(),
    };
    let config = quictun_core::tls::ingress_server_config(cert).map_err(RelayError::HttpsCert)?;
    Ok(Arc::new(config))
}

fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), RelayError> {
    let err = |source| RelayError::Bind { what, addr, source };
    let listener = quictun_core::listen_tcp(addr).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

/// Every listener of a relay, bound and not yet served.
struct Bound {
    agents: AgentListeners,
    http: tokio::net::TcpListener,
    https: Option<(tokio::net::TcpListener, Arc<rustls::ServerConfig>)>,
    admin: tokio::net::TcpListener,
    tcp: Vec<(tokio::net::TcpListener, config::TcpEntry)>,
    udp: Vec<(tokio::net::UdpSocket, SocketAddr, config::UdpEntry)>,
    addrs: Addrs,
}

impl Bound {
    /// Binds every listener of `config`: agents (by transport), HTTP and HTTPS ingress, admin,
    /// TCP tunnels. Nothing is served yet.
    async fn bind(shared: &RelayState, config: &RelayConfig, cert: &CertKey) -> Result<Self, RelayError> {
        let settings = &shared.settings;
        let agents = AgentListeners::bind(shared, cert).await?;
        let (http, http_addr) = bind_tcp("HTTP", settings.http_listen)?;
        let (admin, admin_addr) = bind_tcp("admin", settings.admin_listen)?;
        let https = match settings.https_listen {
            Some(addr) => {
                let tls = https_config(settings, cert)?;
                let (listener, addr) = bind_tcp("HTTPS", addr)?;
                Some((listener, tls, addr))
            }
            None => None,
        };
        let mut tcp = Vec::with_capacity(config.tcp.len());
        for entry in &config.tcp {
            let (listener, addr) = bind_tcp("TCP tunnel", entry.listen)?;
            tcp.push((listener, entry.clone(), addr));
        }
        let mut udp = Vec::with_capacity(config.udp.len());
        for entry in &config.udp {
            let what = "UDP tunnel";
            let (socket, addr) =
                udp::bind(entry).map_err(|source| RelayError::Bind { what, addr: entry.listen, source })?;
            udp.push((socket, entry.clone(), addr));
        }
        let addrs = Addrs {
            quic: agents.quic_addr(),
            grpc: agents.grpc_addr(),
            http: http_addr,
            https: https.as_ref().map(|(_, _, addr)| *addr),
            admin: admin_addr,
            tcp: tcp.iter().map(|(_, _, addr)| *addr).collect(),
            udp: udp.iter().map(|(_, _, addr)| *addr).collect(),
        };
        let https = https.map(|(listener, tls, _)| (listener, tls));
        let tcp = tcp.into_iter().map(|(listener, entry, _)| (listener, entry)).collect();
        let udp = udp.into_iter().map(|(socket, entry, addr)| (socket, addr, entry)).collect();
        Ok(Self { agents, http, https, admin, tcp, udp, addrs })
    }

    /// Serves every listener on the relay's tasks (with the relay's background work: the
    /// stalled-reader sweep, the silence check); returns the ingress tasks, which a drain waits
    /// for.
    fn run(
        self,
        shared: &Arc<RelayState>,
        admin_token: Option<quictun_proto::Token>,
    ) -> (AgentListeners, Vec<tokio::task::JoinHandle<()>>) {
        let runtime = &shared.runtime;
        runtime.tasks.spawn(runtime.reclaimer.clone().run(runtime.stopped.clone()));
        quictun_core::spawn_cancellable(&runtime.tasks, &runtime.stopped, liveness::watch(runtime.sessions.clone()));
        runtime.tasks.spawn(runtime.known_networks.clone().keep_written(runtime.stopped.clone()));
        if let Some(cluster) = &runtime.cluster {
            let (directory, sessions) = (cluster.directory.clone(), runtime.sessions.clone());
            runtime.tasks.spawn(cluster::Cluster::run(directory, sessions, runtime.shutdown.clone()));
        }
        self.agents.run(shared);
        let mut relay_tunnels = Vec::with_capacity(self.tcp.len());
        for (listener, entry) in self.tcp {
            let timeout = Duration::from_secs(shared.settings.response_timeout_secs);
            let tunnel = tcp::TcpTunnel::from_entry(&entry);
            relay_tunnels.push((listener.local_addr().unwrap_or(entry.listen), Arc::<str>::from(entry.group.as_str())));
            runtime.tasks.spawn(tcp::serve(listener, tunnel, runtime.clone(), timeout));
        }
        for (socket, addr, entry) in self.udp {
            let timeout = Duration::from_secs(shared.settings.response_timeout_secs);
            runtime.tasks.spawn(udp::serve(socket, addr, entry, runtime.clone(), timeout));
        }
        let mut ingresses = vec![runtime.tasks.spawn(ingress::serve(self.http, shared.clone(), None))];
        if let Some((listener, tls)) = self.https {
            ingresses.push(runtime.tasks.spawn(ingress::serve(listener, shared.clone(), Some(tls))));
        }
        let pages = Arc::new(admin::RelayPages { shared: shared.clone(), tcp: relay_tunnels });
        let (stopped, tasks) = (runtime.stopped.clone(), runtime.tasks.clone());
        runtime.tasks.spawn(quictun_core::admin::serve(self.admin, pages, admin_token, stopped, tasks));
        (self.agents, ingresses)
    }
}

/// Compiles `config` as [`Relay::start`] would (tokens read, routes, upstreams and targets
/// resolved) without starting anything: an error names the key.
pub fn check_config(config: &RelayConfig) -> Result<(), ConfigError> {
    state::Live::new(config, 1).map(|_| ())
}

impl Relay {
    /// Binds every listener of `config` (agents, ingress, admin, TCP tunnels), then serves them.
    pub async fn start(config: RelayConfig, cert: CertKey) -> Result<Self, RelayError> {
        let shared = Arc::new(RelayState::new(&config, cert.pin().as_ref())?);
        let admin_token = config.admin_token()?;
        let bound = Bound::bind(&shared, &config, &cert).await?;
        let addrs = bound.addrs.clone();
        let (agents, ingresses) = bound.run(&shared, admin_token);
        let off = |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
        info!(quic_addr = %off(addrs.quic), grpc_addr = %off(addrs.grpc), http_addr = %addrs.http, https_addr = %off(addrs.https), admin_addr = %addrs.admin, "relay listening");
        Ok(Self {
            shared,
            agents,
            ingresses,
            addrs,
            tcp_entries: config.tcp.clone(),
            udp_entries: config.udp.clone(),
            cluster_entry: config.cluster.clone(),
            pin: cert.pin(),
        })
    }

    /// The bound QUIC (UDP) address, when QUIC is served.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.addrs.quic
    }

    /// The bound gRPC transport address, when gRPC is served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.addrs.grpc
    }

    /// The bound HTTP ingress address.
    pub fn http_addr(&self) -> SocketAddr {
        self.addrs.http
    }

    /// The bound HTTPS ingress address, when `https_listen` is set.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.addrs.https
    }

    /// The bound admin endpoint address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.admin
    }

    /// The bound addresses of the `[[udp]]` tunnels, in configuration order.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.addrs.udp
    }

    /// The bound addresses of the `[[tcp]]` tunnels, in configuration order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.addrs.tcp
    }

    /// The pin of the relay's certificate.
    pub fn pin(&self) -> Option<Pin> {
        self.pin
    }

    /// Applies a new configuration without dropping connections or requests in flight: routes,
    /// upstreams and clients change at once (agents get theirs by config_sync, versioned).
    /// Listeners, limits and timeouts (`[relay]`), `[[tcp]]`, `[[udp]]` and `[cluster]` are fixed at start; a
    /// change to them is reported and needs a restart. Returns the new version; a configuration
    /// that does not compile (a token file gone, a route to no upstream) changes nothing.
    pub fn reload(&self, config: &RelayConfig) -> Result<u64, ConfigError> {
        let changed = config.relay_keys_changed(&self.shared.settings);
        if !changed.is_empty() {
            let keys = changed.iter().map(|k| format!("relay.{k}")).collect::<Vec<_>>().join(", ");
            tracing::warn!(%keys, "changed keys of [relay] take effect only after a restart: {keys}");
        }
        if config.udp != self.udp_entries {
            tracing::warn!("changes to [[udp]] take effect only after a restart");
        }
        if config.tcp != self.tcp_entries {
            tracing::warn!("changes to [[tcp]] take effect only after a restart");
        }
        if config.cluster != self.cluster_entry {
            tracing::warn!("changes to [cluster] take effect only after a restart");
        }
        let version = self.shared.reload(config)?;
        info!(version, "configuration reloaded");
        Ok(version)
    }

    /// The session manager (live agents).
    pub fn sessions(&self) -> &Arc<SessionManager> {
        &self.shared.runtime.sessions
    }

    /// Graceful shutdown: stop accepting, send go-away to agents, let in-flight requests finish up
    /// to the drain timeout, then close every connection.
    pub async fn shutdown(self) {
        info!("relay shutting down");
        self.shared.runtime.shutdown.cancel();
        self.shared.runtime.tasks.close();
        // The ingress tasks end once their connections drained, or at the drain timeout.
        let drain = Duration::from_secs(self.shared.settings.drain_timeout_secs);
        let ingresses = futures_util::future::join_all(self.ingresses);
        if tokio::time::timeout(drain + Duration::from_secs(1), ingresses).await.is_err() {
            tracing::warn!("ingress did not stop after the drain timeout");
        }
        self.agents.close(quictun_proto::CloseCode::GoingAway);
        for session in self.shared.runtime.sessions.all() {
            session.tunnel.close(quictun_proto::CloseCode::GoingAway);
        }
        self.shared.runtime.stopped.cancel();
        if let Some(cluster) = &self.shared.runtime.cluster {
            cluster.peers.close();
        }
        if tokio::time::timeout(Duration::from_secs(2), self.shared.runtime.tasks.wait()).await.is_err() {
            tracing::warn!(tasks = self.shared.runtime.tasks.len(), "tasks still running after shutdown");
        }
        self.agents.wait_idle().await;
        info!("relay stopped");
    }

    /// Stops at once: every connection is closed without a drain (for tests and fatal errors).
    pub fn abort(&self) {
        self.shared.runtime.shutdown.cancel();
        self.shared.runtime.stopped.cancel();
        if let Some(cluster) = &self.shared.runtime.cluster {
            cluster.peers.close();
        }
        self.agents.close(quictun_proto::CloseCode::GoingAway);
        for session in self.shared.runtime.sessions.all() {
            session.tunnel.close(quictun_proto::CloseCode::GoingAway);
        }
    }
}
