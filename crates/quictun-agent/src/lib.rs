//! The quictun agent.
//!
//! Dials the relay (QUIC, or gRPC where UDP is blocked), verifies it (pin or CA), registers on
//! the control channel, and serves every exchange the relay opens by forwarding it to a local
//! upstream. When the connection is lost it reconnects with exponential backoff and full jitter;
//! a wrong pin or a permanent rejection (bad token) stops it with a clear error instead.
//!
//! - [`config`]: the `agent.toml` file.
//! - `options`: validated options (file and flags merged): [`AgentOptions`].
//! - `connect`: keeping a session: dial, fall back and move back, reconnect.
//! - `dial`: each transport's dialer, and one dial that sorts failures into fatal and retryable.
//! - `diagnose`: why no QUIC handshake completed (a wrong port, blocked UDP, a dead relay).
//! - `session`: one connection's life for any transport: register, heartbeats, config_sync, drain.
//! - `upstreams`: the upstream table (pushed by the relay, merged with local ones).
//! - `tunnels`: the tunnels the agent declares ([`Tunnels`]), claimed at the relay.
//! - `forward`: one exchange → one upstream request; `tcp`: TCP targets, spliced.
//! - `egress`: the egress listener ([`EgressServer`]).
//! - `metrics` and `admin`: Prometheus metrics, `/healthz` and `/readyz` on `admin_listen`;
//!   `inspect`: the traffic inspector there (recent requests, their bodies' first bytes, replay).
//! - `error` and `state`: [`AgentError`] and [`AgentState`].

mod admin;
pub mod config;
mod connect;
mod diagnose;
mod dial;
mod egress;
mod error;
mod forward;
mod inspect;
mod metrics;
mod options;
mod session;
mod state;
mod tcp;
mod tunnels;
mod udp;
mod upstreams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::body::AbortOnDrop;
use quictun_core::stall::Reclaimer;
use quictun_quic::QuicEndpoint;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;
use uuid::Uuid;

pub use config::Transport;
pub use egress::{EgressServer, RelayTunnel};
pub use error::AgentError;
pub use options::{AgentOptions, DEFAULT_GRPC_PORT, default_bind};
pub use state::AgentState;
pub use tunnels::{HttpTunnel, TcpTunnel, Tunnels};
pub use upstreams::{LocalTargets, Target};

use crate::connect::Connector;
use crate::dial::Dialers;
use crate::forward::Forwarder;
use crate::metrics::AgentMetrics;

/// A running agent.
pub struct Agent {
    state: watch::Receiver<AgentState>,
    relay_tunnel: RelayTunnel,
    shutdown: CancellationToken,
    endpoint: QuicEndpoint,
    task: JoinHandle<Result<(), AgentError>>,
    admin_addr: Option<SocketAddr>,
    admin_tasks: TaskTracker,
    forwarder: Arc<Forwarder>,
    /// Enforces the stalled-reader budgets while the agent lives.
    _sweeper: AbortOnDrop,
}

impl Agent {
    /// Binds the local endpoint and starts connecting in the background.
    pub async fn start(options: AgentOptions) -> Result<Self, AgentError> {
        let bind = match options.bind {
            Some(bind) => bind,
            None => options::default_bind(&options.relay).await,
        };
        let endpoint = QuicEndpoint::bind(bind, &options.tuning)?;
        Self::start_on(options, endpoint)
    }

    /// Starts an agent on an existing QUIC endpoint (one process may hold many agents on one UDP
    /// socket). The endpoint is only used to dial; trust comes from `options`.
    pub fn start_on(options: AgentOptions, endpoint: QuicEndpoint) -> Result<Self, AgentError> {
        options.tunnels.warn_insecure();
        for upstream in &options.local_upstreams {
            for target in upstream.targets.iter().filter(|t| t.tls().is_some_and(|tls| tls.insecure_skip_verify)) {
                tracing::warn!(upstream = %upstream.name, %target, "insecure_skip_verify: the upstream's certificate is not verified");
            }
        }
        let reclaimer = Reclaimer::new(options.stall);
        let dialers = Dialers::new(&options, endpoint.clone(), &reclaimer)?;
        let mut metrics = AgentMetrics::new();
        metrics.register_stall(reclaimer.metrics());
        let metrics = Arc::new(metrics);
        let forwarder = Arc::new(Forwarder::new(&options, metrics.clone()));
        let (state_tx, state) = watch::channel(AgentState::Connecting);
        let shutdown = CancellationToken::new();
        let admin_tasks = TaskTracker::new();
        let admin_addr = match options.admin_listen {
            Some(addr) => {
                let (listener, bound) = admin::bind(addr)?;
                let pages = Arc::new(admin::AgentPages { state: state.clone(), metrics, forwarder: forwarder.clone() });
                let token = options.admin_token.clone();
                admin_tasks.spawn(quictun_core::admin::serve(
                    listener,
                    pages,
                    token,
                    shutdown.clone(),
                    admin_tasks.clone(),
                ));
                info!(admin = %bound, "agent admin endpoint listening");
                Some(bound)
            }
            None => None,
        };
        admin_tasks.close();
        let (link_tx, relay_tunnel) = watch::channel(None);
        let sweeper = AbortOnDrop::new(tokio::spawn(reclaimer.clone().run(shutdown.clone())));
        let connector = Connector {
            instance_id: Uuid::new_v4(),
            options: Arc::new(options),
            relay_tunnel: link_tx,
            dialers,
            quic_silent: Default::default(),
        };
        let task = tokio::spawn(connect::run(connector, forwarder.clone(), state_tx, shutdown.clone()));
        Ok(Self {
            state,
            relay_tunnel,
            shutdown,
            endpoint,
            task,
            admin_addr,
            admin_tasks,
            forwarder,
            _sweeper: sweeper,
        })
    }

    /// The bound admin endpoint address, when it is served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Moves the agent's QUIC endpoint to a new UDP socket bound to `bind` (a new local port or
    /// interface) without a new connection: the QUIC connection migrates, in-flight streams go
    /// on, and the relay keeps the session. Returns the new local address.
    pub fn rebind(&self, bind: SocketAddr) -> Result<SocketAddr, AgentError> {
        let local = self.endpoint.rebind(bind)?;
        info!(%local, "QUIC endpoint moved to a new socket; the connection migrates");
        Ok(local)
    }

    /// The agent's connection to the relay for egress requests (`None` while disconnected, or
    /// over a transport that carries no egress).
    pub fn relay_tunnel(&self) -> RelayTunnel {
        self.relay_tunnel.clone()
    }

    /// Replaces the tunnels the agent declares (a reload): the session claims the new set at
    /// once, without reconnecting; what is gone is withdrawn.
    pub fn set_tunnels(&self, tunnels: Tunnels) {
        tunnels.warn_insecure();
        self.forwarder.tunnels.send_if_modified(|now| {
            let changed = **now != tunnels;
            *now = Arc::new(tunnels);
            changed
        });
    }

    /// Watches the relay's answers to the agent's claims (one per declared tunnel, in order).
    pub fn tunnel_answers(&self) -> watch::Receiver<Vec<quictun_proto::ClaimAnswer>> {
        self.forwarder.answers.subscribe()
    }

    /// Watches the agent's state.
    pub fn state(&self) -> watch::Receiver<AgentState> {
        self.state.clone()
    }

    /// Waits until the agent is registered (a new session different from `previous`, when given);
    /// returns the session id, or `None` on timeout or when the agent stopped.
    pub async fn wait_connected(&self, previous: Option<Uuid>, timeout: Duration) -> Option<Uuid> {
        let mut state = self.state.clone();
        let connected = tokio::time::timeout(
            timeout,
            state.wait_for(|s| match s {
                AgentState::Connected { session_id, .. } => Some(*session_id) != previous,
                AgentState::Stopped => true,
                _ => false,
            }),
        )
        .await
        .ok()?
        .ok()?
        .clone();
        match connected {
            AgentState::Connected { session_id, .. } => Some(session_id),
            _ => None,
        }
    }

    /// Graceful stop: go-away to the relay, in-flight streams finish (up to the drain timeout).
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        let result = match self.task.await {
            Ok(result) => result,
            Err(join) => Err(AgentError::Task(join)),
        };
        self.endpoint.wait_idle().await;
        let _admin_done = tokio::time::timeout(Duration::from_secs(2), self.admin_tasks.wait()).await;
        result
    }

    /// Waits until the agent stops by itself (only a fatal error stops it).
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(AgentError::Task(join)),
        }
    }

    /// Stops at once: the endpoint's connections are closed without a drain.
    pub fn abort(&self) {
        self.shutdown.cancel();
        self.endpoint.close(quictun_proto::CloseCode::GoingAway);
        self.task.abort();
    }

    /// Cancelled when the agent is asked to stop (for callers that select on it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}
