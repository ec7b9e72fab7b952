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
//! - `quic`: admission rules for QUIC agents, handed to `quictun_quic::accept`. The gRPC
//!   transport (`quictun-grpc`) feeds the same registration from its own listener.
//! - `router`: host and path routing.
//! - `ingress` and `proxy`: the HTTP server and the per-request forwarding.
//! - `tcp`: TCP tunnels (`[[tcp]]`), one stream per connection.
//!
//! [`Relay::start`] binds everything and returns a [`Relay`] handle; [`Relay::shutdown`] drains.

mod access;
mod admin;
mod admission;
mod balance;
mod body;
pub mod config;
mod conn_clock;
mod egress;
#[cfg(test)]
mod fake_tunnel;
mod ingress;
mod liveness;
mod metrics;
mod proxy;
mod quic;
mod registration;
mod router;
mod sessions;
mod state;
mod tcp;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::Pin;
use quictun_core::tls::CertKey;
use quictun_quic::Tuning;
use tracing::{Instrument, info};

pub use balance::Balance;
pub use config::{ConfigError, RelayConfig};
pub use sessions::{Session, SessionManager};

use crate::state::RelayState;

/// The largest packet the relay sends to an agent on its own host. quinn keeps a send buffer of
/// the packet size for each connection: at 16 KiB an idle session costs what it did with
/// 1,452-byte packets, where 64 KiB packets added about 50 KiB per session (`quictun bench
/// --workloads many`). Agents, with one connection each, send packets as large as loopback
/// carries: a download (agent to relay) gets the most of it.
const LOOPBACK_PACKET: u16 = 16 * 1024;

/// Agents on the relay's host that get packets as large as loopback carries all the same, the
/// first ones to connect (at most 16 × 48 KiB more send buffer): an upload to such an agent (relay
/// to agent) costs about a fifth less CPU per GiB than with [`LOOPBACK_PACKET`].
const LOOPBACK_FULL_PACKET_AGENTS: usize = 16;

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The QUIC endpoint could not be set up.
    #[error("QUIC listener: {0}")]
    Quic(#[from] quictun_quic::endpoint::EndpointError),
    /// A TCP listener could not be bound.
    #[error("{what} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration did not compile (a token, a route, a target).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTPS ingress's certificate could not be loaded or used.
    #[error("HTTPS ingress certificate: {0}")]
    HttpsCert(quictun_core::tls::TlsError),
}

/// A running relay.
pub struct Relay {
    shared: Arc<RelayState>,
    endpoint: quictun_quic::Endpoint,
    ingresses: Vec<tokio::task::JoinHandle<()>>,
    quic_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    tcp_addrs: Vec<SocketAddr>,
    tcp_entries: Vec<config::TcpEntry>,
    pin: Option<Pin>,
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

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), RelayError> {
    let err = |source| RelayError::Bind { what, addr, source };
    let listener = quictun_core::listen_tcp(addr).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

impl Relay {
    /// Binds the QUIC endpoint and the HTTP ingress and starts serving.
    pub async fn start(config: RelayConfig, cert: CertKey) -> Result<Self, RelayError> {
        let pin = cert.pin();
        let cert_for_https = cert.clone();
        let shared = Arc::new(RelayState::new(&config)?);
        let admin_token = config.admin_token()?;
        let settings = &shared.settings;
        let tuning = Tuning {
            // Streams an *agent* may open towards the relay: the control stream and its egress
            // requests. quinn allocates state up front for every stream the peer may open, so
            // this stays modest; the relay's own streams are limited by `max_streams_per_agent`.
            max_concurrent_streams: 1 + settings.max_egress_streams_per_agent,
            idle_timeout: Duration::from_secs(30).max(settings.heartbeat_timeout() * 2),
            keep_alive: settings.heartbeat_interval().min(Duration::from_secs(5)),
            congestion: settings.congestion,
            stream_window: settings.stream_window,
            connection_window: settings.connection_window,
            loopback_packet: LOOPBACK_PACKET,
            loopback_full_packet_connections: LOOPBACK_FULL_PACKET_AGENTS,
            ..Tuning::default()
        };
        let grpc_tls = quictun_core::tls::server_config_with_alpn(cert.clone(), b"h2")
            .map_err(quictun_quic::endpoint::EndpointError::from)?;
        let (endpoint, acceptor) = quictun_quic::endpoint::server_endpoint(settings.quic_listen, cert, &tuning)?;
        let quic_addr = endpoint.local_addr().map_err(|source| RelayError::Bind {
            what: "QUIC",
            addr: settings.quic_listen,
            source,
        })?;
        let (http_listener, http_addr) = bind_tcp("HTTP", settings.http_listen).await?;
        let (admin_listener, admin_addr) = bind_tcp("admin", settings.admin_listen).await?;
        shared.runtime.tasks.spawn(shared.runtime.reclaimer.clone().run(shared.runtime.stopped.clone()));
        let watch_silence = liveness::watch(shared.runtime.sessions.clone());
        quictun_core::spawn_cancellable(&shared.runtime.tasks, &shared.runtime.stopped, watch_silence);
        if settings.transport.quic() {
            shared.runtime.tasks.spawn(quic::accept_loop(endpoint.clone(), acceptor, shared.clone()));
        }
        let grpc_addr = if settings.transport.grpc() {
            let (listener, addr) = bind_tcp("gRPC", settings.grpc_listen).await?;
            let on_agent_shared = shared.clone();
            let on_agent: quictun_grpc::server::OnAgent = Arc::new(move |control, tunnel, admission| {
                let shared = on_agent_shared.clone();
                let handshake = metrics::RegisterHandshake::complete;
                let serve = registration::serve_agent(control, tunnel, shared, admission, handshake);
                on_agent_shared.runtime.tasks.spawn(serve.in_current_span());
            });
            let admit_shared = shared.clone();
            let admit: quictun_core::tunnel::Admit = Arc::new(move |peer| {
                let slot = quic::admit_pending(&admit_shared, peer.ip())?;
                Some(Box::new(slot) as quictun_core::tunnel::Admission)
            });
            let setup = quictun_grpc::server::Listener {
                tls: Arc::new(grpc_tls),
                limits: shared.settings.limits,
                on_agent,
                admit,
                stall: shared.runtime.reclaimer.clone(),
            };
            shared.runtime.tasks.spawn(quictun_grpc::server::serve(
                listener,
                Arc::new(setup),
                shared.runtime.stopped.clone(),
                shared.runtime.tasks.clone(),
            ));
            Some(addr)
        } else {
            None
        };
        let mut tcp_addrs = Vec::with_capacity(config.tcp.len());
        for entry in &config.tcp {
            let (listener, addr) = bind_tcp("TCP tunnel", entry.listen).await?;
            tcp_addrs.push(addr);
            let timeout = Duration::from_secs(settings.response_timeout_secs);
            shared.runtime.tasks.spawn(tcp::serve(listener, entry.clone(), shared.runtime.clone(), timeout));
        }
        let mut ingresses = vec![shared.runtime.tasks.spawn(ingress::serve(http_listener, shared.clone(), None))];
        let https_addr = match settings.https_listen {
            Some(addr) => {
                let tls = https_config(settings, &cert_for_https)?;
                let (listener, addr) = bind_tcp("HTTPS", addr).await?;
                ingresses.push(shared.runtime.tasks.spawn(ingress::serve(listener, shared.clone(), Some(tls))));
                Some(addr)
            }
            None => None,
        };
        shared.runtime.tasks.spawn(quictun_core::admin::serve(
            admin_listener,
            Arc::new(admin::RelayPages(shared.runtime.clone())),
            admin_token,
            shared.runtime.stopped.clone(),
            shared.runtime.tasks.clone(),
        ));
        let off = || "off".to_owned();
        let (grpc, https) =
            (grpc_addr.map_or_else(off, |a| a.to_string()), https_addr.map_or_else(off, |a| a.to_string()));
        info!(%quic_addr, grpc_addr = %grpc, %http_addr, https_addr = %https, %admin_addr, "relay listening");
        let tcp_entries = config.tcp.clone();
        Ok(Self {
            shared,
            endpoint,
            ingresses,
            quic_addr,
            grpc_addr,
            http_addr,
            https_addr,
            admin_addr,
            tcp_addrs,
            tcp_entries,
            pin,
        })
    }

    /// The bound QUIC (UDP) address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound gRPC transport address, when gRPC is served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The bound HTTP ingress address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound HTTPS ingress address, when `https_listen` is set.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The bound admin endpoint address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The bound addresses of the `[[tcp]]` tunnels, in configuration order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// The pin of the relay's certificate.
    pub fn pin(&self) -> Option<Pin> {
        self.pin
    }

    /// Applies a new configuration without dropping connections or requests in flight: routes,
    /// upstreams and clients change at once (agents get theirs by config_sync, versioned).
    /// Listeners, limits and timeouts (`[relay]`) and `[[tcp]]` entries are fixed at start; a
    /// change to them is reported and needs a restart. Returns the new version; a configuration
    /// that does not compile (a token file gone, a route to no upstream) changes nothing.
    pub fn reload(&self, config: &RelayConfig) -> Result<u64, ConfigError> {
        if config.relay != **self.shared.settings {
            tracing::warn!("changes to [relay] take effect only after a restart");
        }
        if config.tcp != self.tcp_entries {
            tracing::warn!("changes to [[tcp]] take effect only after a restart");
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
        quictun_quic::close_endpoint(&self.endpoint, quictun_proto::CloseCode::GoingAway);
        for session in self.shared.runtime.sessions.all() {
            session.tunnel.close(quictun_proto::CloseCode::GoingAway);
        }
        self.shared.runtime.stopped.cancel();
        if tokio::time::timeout(Duration::from_secs(2), self.shared.runtime.tasks.wait()).await.is_err() {
            tracing::warn!(tasks = self.shared.runtime.tasks.len(), "tasks still running after shutdown");
        }
        self.endpoint.wait_idle().await;
        info!("relay stopped");
    }

    /// Stops at once: every connection is closed without a drain (for tests and fatal errors).
    pub fn abort(&self) {
        self.shared.runtime.shutdown.cancel();
        self.shared.runtime.stopped.cancel();
        quictun_quic::close_endpoint(&self.endpoint, quictun_proto::CloseCode::GoingAway);
        for session in self.shared.runtime.sessions.all() {
            session.tunnel.close(quictun_proto::CloseCode::GoingAway);
        }
    }
}
