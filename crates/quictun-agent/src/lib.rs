//! The quictun agent.
//!
//! Dials the relay over QUIC, verifies it (pin or CA), registers on the control stream, and serves
//! every stream the relay opens by forwarding it to a local upstream. When the connection is lost
//! it reconnects with exponential backoff and full jitter; a wrong pin or a permanent rejection
//! (bad token) stops it with a clear error instead.
//!
//! - [`config`]: the `agent.toml` file.
//! - [`options`]: validated options (file and flags merged).
//! - [`upstreams`]: the upstream table (pushed by the relay, merged with local ones).
//! - [`forward`]: one data stream → one upstream request.
//! - [`session`]: one connection's life for any transport: register, heartbeats, config_sync, drain.
//! - [`tcp`]: TCP tunnels: connect to `host:port` and splice.
//! - [`quic`]: the QUIC transport: dial, verify, one stream per request.
//! - [`grpc`]: the gRPC transport (fallback where UDP is blocked).
//! - [`metrics`]: Prometheus metrics, served with `/healthz` and `/readyz` on `admin_listen`.
//! - [`admin`]: the agent's admin pages.

pub mod admin;
pub mod config;
pub mod diagnose;
pub mod egress;
pub mod forward;
pub mod grpc;
pub mod metrics;
pub mod options;
pub mod quic;
pub mod session;
pub mod tcp;
pub mod upstreams;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::backoff::Backoff;
use quictun_core::body::AbortOnDrop;
use quictun_core::stall::Reclaimer;
use quictun_core::tls::PinMismatch;
use quictun_core::tunnel::{CloseReason, Tunnel};
use quictun_proto::RejectCode;
use quictun_quic::endpoint::{ClientSetup, EndpointError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use uuid::Uuid;

pub use config::Transport;
pub use options::AgentOptions;

use crate::forward::Forwarder;
use crate::metrics::AgentMetrics;
use crate::session::{Attempt, RetryReason, SessionEnd};

/// Why the agent stopped for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The relay refused the registration permanently (bad token, wrong group, old version).
    #[error("relay rejected registration ({code:?}): {message}")]
    Rejected {
        /// The relay's code.
        code: RejectCode,
        /// The relay's reason.
        message: String,
    },
    /// The relay's certificate does not match the pin.
    #[error(transparent)]
    PinMismatch(#[from] PinMismatch),
    /// The relay's certificate could not be verified (CA mode), or TLS failed for good.
    #[error("TLS: {0}")]
    Tls(String),
    /// A session with this agent's own client_id and instance id took over this one's (replicas
    /// with the same client_id are other instances and never do; this is a copied instance id).
    #[error("another session of client_id {0:?} with this agent's instance id replaced this one")]
    Replaced(String),
    /// The local endpoint could not be set up.
    #[error("{0}")]
    Endpoint(String),
    /// The admin listener could not be bound.
    #[error("admin listener on {addr}: {message}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        message: String,
    },
}

impl From<EndpointError> for AgentError {
    fn from(e: EndpointError) -> Self {
        Self::Endpoint(e.to_string())
    }
}

/// What the agent is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Dialing or registering.
    Connecting,
    /// Registered and serving.
    Connected {
        /// The session id the relay assigned.
        session_id: Uuid,
        /// The relay's address.
        relay: SocketAddr,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Why the last attempt or session ended.
        reason: String,
    },
    /// Stopped (shutdown or fatal error).
    Stopped,
}

/// A running agent.
pub struct Agent {
    state: watch::Receiver<AgentState>,
    relay_tunnel: egress::RelayTunnel,
    shutdown: CancellationToken,
    endpoint: quictun_quic::Endpoint,
    task: JoinHandle<Result<(), AgentError>>,
    admin_addr: Option<SocketAddr>,
    admin_tasks: TaskTracker,
    udp_buffer: usize,
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
        let (endpoint, _) = quictun_quic::endpoint::client_endpoint(bind, &options.trust, &options.tuning)?;
        Self::start_on(options, endpoint)
    }

    /// Starts an agent on an existing QUIC endpoint (one process may hold many agents on one UDP
    /// socket). The endpoint is only used to dial; trust comes from `options`.
    pub fn start_on(options: AgentOptions, endpoint: quictun_quic::Endpoint) -> Result<Self, AgentError> {
        let quic = ClientSetup::new(&options.trust, &options.tuning)?;
        let grpc = grpc::GrpcSetup::new(&options)?;
        let reclaimer = Reclaimer::new(options.stall);
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
                let pages = Arc::new(admin::AgentPages { state: state.clone(), metrics });
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
        let udp_buffer = options.tuning.udp_buffer;
        let (link_tx, relay_tunnel) = watch::channel(None);
        let sweeper = AbortOnDrop::new(tokio::spawn(reclaimer.clone().run(shutdown.clone())));
        let dialer = Dialer {
            instance_id: Uuid::new_v4(),
            options: Arc::new(options),
            relay_tunnel: link_tx,
            endpoint: endpoint.clone(),
            quic,
            grpc,
            reclaimer,
        };
        let task = tokio::spawn(run(dialer, forwarder, state_tx, shutdown.clone()));
        Ok(Self {
            state,
            relay_tunnel,
            shutdown,
            endpoint,
            task,
            admin_addr,
            admin_tasks,
            udp_buffer,
            _sweeper: sweeper,
        })
    }

    /// The bound admin endpoint address, when it is served.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Moves the agent's QUIC endpoint to a new UDP socket bound to `bind` (a new local port or
    /// interface) without a new connection: the QUIC connection migrates, in-flight streams go
    /// on, and the relay keeps the session. Returns the new local address.
    pub fn rebind(&self, bind: SocketAddr) -> Result<SocketAddr, AgentError> {
        let socket = quictun_quic::endpoint::bind_udp(bind, self.udp_buffer)?;
        let local = socket.local_addr().map_err(|e| AgentError::Endpoint(format!("rebind to {bind}: {e}")))?;
        self.endpoint.rebind(socket).map_err(|e| AgentError::Endpoint(format!("rebind to {bind}: {e}")))?;
        info!(%local, "QUIC endpoint moved to a new socket; the connection migrates");
        Ok(local)
    }

    /// The agent's connection to the relay for egress requests (`None` while disconnected, or
    /// over a transport that carries no egress).
    pub fn relay_tunnel(&self) -> egress::RelayTunnel {
        self.relay_tunnel.clone()
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
            Err(join) => Err(AgentError::Endpoint(format!("agent task failed: {join}"))),
        };
        self.endpoint.wait_idle().await;
        let _admin_done = tokio::time::timeout(Duration::from_secs(2), self.admin_tasks.wait()).await;
        result
    }

    /// Waits until the agent stops by itself (only a fatal error stops it).
    pub async fn wait(self) -> Result<(), AgentError> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(AgentError::Endpoint(format!("agent task failed: {join}"))),
        }
    }

    /// Stops at once: the endpoint's connections are closed without a drain.
    pub fn abort(&self) {
        self.shutdown.cancel();
        quictun_quic::close_endpoint(&self.endpoint, quictun_proto::CloseCode::GoingAway);
        self.task.abort();
    }

    /// Cancelled when the agent is asked to stop (for callers that select on it).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Everything needed to reach the relay over either transport.
struct Dialer {
    options: Arc<AgentOptions>,
    /// This agent among the replicas sharing its client_id: drawn once, kept across reconnects,
    /// so that a reconnect replaces this agent's own old session and no other replica's.
    instance_id: Uuid,
    /// The connection egress requests use, while there is one.
    relay_tunnel: watch::Sender<Option<Arc<dyn Tunnel>>>,
    endpoint: quictun_quic::Endpoint,
    quic: ClientSetup,
    grpc: grpc::GrpcSetup,
    /// Watches bodies from the relay for stalled readers.
    reclaimer: Reclaimer,
}

impl Dialer {
    /// Registers and serves on whatever `dial` connects, unless asked to stop first.
    async fn serve_dialed<C, T>(
        &self,
        dial: impl std::future::Future<Output = Result<(C, Arc<T>), Attempt>>,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt>
    where
        C: quictun_core::control::ControlIo,
        T: Tunnel,
    {
        let (control, tunnel) = tokio::select! {
            dialed = dial => dialed?,
            _ = stop.shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let tunnel: Arc<dyn Tunnel> = tunnel;
        // Egress requests go over this tunnel while it lasts (the relay serves them once it has
        // registered the agent).
        self.relay_tunnel.send_replace(Some(tunnel.clone()));
        let served = session::register_and_serve(&self.options, control, tunnel, forwarder, state, stop).await;
        self.relay_tunnel.send_replace(None);
        served
    }

    async fn over_quic(
        &self,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt> {
        let register = session::register_message(&self.options, self.instance_id);
        let dial = quic::dial(&self.options, &self.endpoint, &self.quic, &self.reclaimer, register);
        self.serve_dialed(dial, forwarder, state, stop).await
    }

    async fn over_grpc(
        &self,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        stop: &session::Stop,
    ) -> Result<SessionEnd, Attempt> {
        let register = session::register_message(&self.options, self.instance_id);
        self.serve_dialed(grpc::dial(&self.options, &self.grpc, &self.reclaimer, register), forwarder, state, stop)
            .await
    }

    /// gRPC while QUIC is probed in the background; a successful probe drains the gRPC session
    /// and ends it with [`SessionEnd::Switched`].
    async fn over_grpc_probing_quic(
        &self,
        forwarder: &Arc<Forwarder>,
        state: &watch::Sender<AgentState>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, Attempt> {
        let stop = session::Stop { shutdown: shutdown.clone(), switch: CancellationToken::new() };
        let probe = async {
            loop {
                tokio::time::sleep(self.options.quic_probe_interval).await;
                if quic::probe(&self.options, &self.endpoint, &self.quic).await {
                    info!("QUIC reachable again: moving back from gRPC");
                    stop.switch.cancel();
                    return std::future::pending::<std::convert::Infallible>().await;
                }
                tracing::debug!("QUIC still unreachable");
            }
        };
        tokio::select! {
            outcome = self.over_grpc(forwarder, state, &stop) => outcome,
            never = probe => match never {},
        }
    }
}

/// How long the reconnects of a restarted relay's agents are spread over.
const RESTARTED_RELAY_SPREAD: Duration = Duration::from_millis(250);

async fn run(
    dialer: Dialer,
    forwarder: Arc<Forwarder>,
    state: watch::Sender<AgentState>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let options = dialer.options.clone();
    let mut backoff = Backoff::new(options.backoff_base, options.backoff_cap);
    let stop = session::Stop { shutdown: shutdown.clone(), switch: CancellationToken::new() };
    let result = loop {
        state.send_replace(AgentState::Connecting);
        let attempt = match options.transport {
            Transport::Quic => dialer.over_quic(&forwarder, &state, &stop).await,
            Transport::Grpc => dialer.over_grpc(&forwarder, &state, &stop).await,
            Transport::Auto => match dialer.over_quic(&forwarder, &state, &stop).await {
                Err(Attempt::Retry(reason)) => {
                    let grpc_relay = &options.grpc_relay;
                    if matches!(&reason, RetryReason::QuicSilent(silence) if silence.calls_for_grpc()) {
                        warn!(%reason, %grpc_relay, "falling back to gRPC over TCP");
                    } else {
                        warn!(%reason, %grpc_relay, "no QUIC session; trying gRPC over TCP as well");
                    }
                    dialer.over_grpc_probing_quic(&forwarder, &state, &shutdown).await
                }
                other => other,
            },
        };
        let (reason, delay) = match attempt {
            Ok(SessionEnd::Shutdown) => break Ok(()),
            Ok(SessionEnd::Switched) => continue,
            Ok(SessionEnd::Replaced) => break Err(AgentError::Replaced(options.client_id.clone())),
            Ok(SessionEnd::Lost(reason)) => {
                backoff.reset();
                info!(%reason, "connection to relay ended");
                // A relay that answered with a reset is up again: reconnect at once, spread over
                // a moment so that its agents do not all handshake in the same millisecond.
                let delay = match reason {
                    CloseReason::PeerRestarted => RESTARTED_RELAY_SPREAD.mul_f64(fastrand::f64()),
                    _ => backoff.next_delay(),
                };
                (reason.to_string(), delay)
            }
            Err(Attempt::Fatal(err)) => break Err(err),
            Err(Attempt::Retry(reason)) => {
                warn!(%reason, "could not connect to relay");
                (reason.to_string(), backoff.next_delay())
            }
        };
        info!(delay_ms = delay.as_millis(), "reconnecting");
        state.send_replace(AgentState::Reconnecting { reason });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    state.send_replace(AgentState::Stopped);
    result
}
