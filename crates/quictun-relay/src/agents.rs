//! Where agents connect: the relay's agent listeners, one per transport, chosen in one place
//! ([`AgentListeners::bind`]) and run by one accept loop whatever the transport
//! ([`accept_loop`]). Every new connection is admitted by its address first, before any
//! cryptography, by the same rules on every transport ([`Gate`]): the address's handshake rate,
//! and a place among the connections not registered yet (a fair share of the general pool for
//! its network, or the lane kept for networks agents registered from: see
//! [`crate::admission::Pending`]). Its handshake then runs in a task of its own under
//! `handshake_timeout_ms`, and registration takes the connection from there.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::tls::CertKey;
use quictun_core::transport::Transport;
use quictun_grpc::{Grpc, GrpcBindOptions, GrpcListener};
use quictun_proto::CloseCode;
use quictun_quic::{Quic, QuicBindOptions, QuicListener, Tuning};
use tracing::{Instrument, debug, info_span};

use crate::admission::{PendingRefused, PendingSlot};
use crate::error::RelayError;
use crate::metrics::Reject;
use crate::registration::serve_agent;
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

/// How often addresses that stopped connecting are forgotten by the handshake limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(10);

/// The relay's agent listeners (`relay.transport` says which are bound).
pub struct AgentListeners {
    quic: Option<Arc<QuicListener>>,
    grpc: Option<Arc<GrpcListener>>,
}

impl AgentListeners {
    /// Binds the listener of every transport the relay serves: the one place the relay chooses
    /// its transports.
    pub async fn bind(shared: &RelayState, cert: &CertKey) -> Result<Self, RelayError> {
        let settings = &shared.settings;
        let mut listeners = Self { quic: None, grpc: None };
        if settings.transport.quic() {
            listeners.quic = Some(Arc::new(Quic::bind(quic_options(shared, cert.clone())).await?));
        }
        if settings.transport.grpc() {
            listeners.grpc = Some(Arc::new(Grpc::bind(grpc_options(shared, cert.clone())?).await?));
        }
        Ok(listeners)
    }

    /// Runs the accept loop of each listener on the relay's tasks, until shutdown.
    pub fn run(&self, shared: &Arc<RelayState>) {
        let gate = Arc::new(Gate::new(shared));
        if let Some(limiter) = gate.limiter.clone() {
            let sweep = async move {
                let mut sweep = tokio::time::interval(LIMITER_SWEEP);
                loop {
                    sweep.tick().await;
                    limiter.retain_recent();
                }
            };
            quictun_core::spawn_cancellable(&shared.runtime.tasks, &shared.runtime.stopped, sweep);
        }
        if let Some(quic) = &self.quic {
            shared.runtime.tasks.spawn(accept_loop::<Quic>(quic.clone(), shared.clone(), gate.clone()));
        }
        if let Some(grpc) = &self.grpc {
            shared.runtime.tasks.spawn(accept_loop::<Grpc>(grpc.clone(), shared.clone(), gate));
        }
    }

    /// The QUIC listener's address, when QUIC is served.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_deref().map(Quic::local_addr)
    }

    /// The gRPC listener's address, when gRPC is served.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_deref().map(Grpc::local_addr)
    }

    /// Closes every listener and the connections they accepted with `code`.
    pub fn close(&self, code: CloseCode) {
        if let Some(quic) = &self.quic {
            Quic::close(quic, code);
        }
        if let Some(grpc) = &self.grpc {
            Grpc::close(grpc, code);
        }
    }

    /// Waits until the closes are delivered (QUIC's endpoint idle).
    pub async fn wait_idle(&self) {
        if let Some(quic) = &self.quic {
            quic.wait_idle().await;
        }
    }
}

/// The QUIC listener's settings.
fn quic_options(shared: &RelayState, cert: CertKey) -> QuicBindOptions {
    let settings = &shared.settings;
    let tuning = Tuning {
        // Streams an *agent* may open towards the relay: the control stream and its egress
        // requests. quinn allocates state up front for every stream the peer may open, so this
        // stays modest; the relay's own streams are limited by `max_streams_per_agent`.
        max_concurrent_streams: 1 + settings.max_egress_streams_per_agent,
        idle_timeout: Duration::from_secs(30).max(settings.heartbeat_timeout() * 2),
        keep_alive: settings.heartbeat_interval().min(Duration::from_secs(5)),
        congestion: settings.congestion,
        stream_window: settings.stream_window,
        connection_window: settings.connection_window,
        loopback_packet: LOOPBACK_PACKET,
        loopback_full_packet_connections: LOOPBACK_FULL_PACKET_AGENTS,
        lb_server_id: shared.runtime.cluster.as_ref().and_then(|c| c.server_id.clone()),
        ..Tuning::default()
    };
    QuicBindOptions {
        addr: settings.quic_listen,
        cert,
        tuning,
        limits: settings.limits,
        register_timeout: Duration::from_secs(settings.register_timeout_secs),
        stall: shared.runtime.reclaimer.clone(),
    }
}

/// The gRPC listener's settings: TLS with the relay's certificate and ALPN `h2`.
fn grpc_options(shared: &RelayState, cert: CertKey) -> Result<GrpcBindOptions, RelayError> {
    let settings = &shared.settings;
    let tls = quictun_core::tls::server_config_with_alpn(cert, b"h2").map_err(RelayError::Tls)?;
    Ok(GrpcBindOptions {
        addr: settings.grpc_listen,
        tls: Arc::new(tls),
        limits: settings.limits,
        stall: shared.runtime.reclaimer.clone(),
        tasks: shared.runtime.tasks.clone(),
        shutdown: shared.runtime.shutdown.clone(),
    })
}

/// New connections per address, by the handshake rate.
type HandshakeLimiter = governor::DefaultKeyedRateLimiter<IpAddr>;

/// The admission rules every new agent connection meets, whatever its transport.
pub struct Gate {
    limiter: Option<Arc<HandshakeLimiter>>,
}

impl Gate {
    fn new(shared: &RelayState) -> Self {
        let settings = &shared.settings;
        let limiter = NonZeroU32::new(settings.handshake_rate_per_ip).map(|rate| {
            let burst = NonZeroU32::new(settings.handshake_burst_per_ip).unwrap_or(rate);
            Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst)))
        });
        Self { limiter }
    }

    /// A place for a new connection from `peer`, or `None` (the refusal counted): over its
    /// address's handshake rate, or no place left for it among the connections not registered
    /// yet (the relay's, or its network's).
    fn admit(&self, shared: &RelayState, peer: SocketAddr) -> Option<PendingSlot> {
        if self.limiter.as_ref().is_some_and(|l| l.check_key(&peer.ip()).is_err()) {
            shared.runtime.metrics.reject(Reject::handshake_rate);
            debug!(%peer, "new connections from this address over the handshake rate: refused");
            return None;
        }
        let known = shared.runtime.known_networks.contains(peer.ip());
        match shared.runtime.pending.admit(peer.ip(), known) {
            Ok(slot) => Some(slot),
            Err(why) => {
                let reason = match why {
                    PendingRefused::Global => Reject::pending_connections,
                    PendingRefused::Network => Reject::pending_network,
                };
                shared.runtime.metrics.reject(reason);
                debug!(%peer, ?why, "new agent connection refused: too many not registered yet");
                None
            }
        }
    }
}

/// Accepts connections on `listener` until shutdown: each is admitted by [`Gate`] (or refused
/// before any cryptography), then completes its handshake and registers in a task of its own, so
/// that a slow or hostile client cannot hold up the others.
async fn accept_loop<T: Transport>(listener: Arc<T::Listener>, shared: Arc<RelayState>, gate: Arc<Gate>) {
    loop {
        let next = tokio::select! {
            _ = shared.runtime.shutdown.cancelled() => break,
            next = T::accept(&listener) => next,
        };
        let Some((incoming, peer)) = next else { break };
        let Some(admission) = gate.admit(&shared, peer) else {
            T::refuse(incoming);
            continue;
        };
        let (listener, shared2) = (listener.clone(), shared.clone());
        let deadline = shared.settings.handshake_timeout();
        let connect = async move {
            match tokio::time::timeout(deadline, T::handshake(&listener, incoming)).await {
                Ok(Ok(connection)) => serve_agent(connection, shared2, Box::new(admission)).await,
                Ok(Err(err)) => debug!(%err, "agent connection dropped before registering"),
                Err(_) => {
                    shared2.runtime.metrics.reject(Reject::handshake_timeout);
                    debug!(?deadline, "agent connection closed: no handshake within handshake_timeout_ms");
                }
            }
        };
        shared.runtime.tasks.spawn(connect.instrument(info_span!("agent", transport = %T::KIND, %peer)));
    }
    debug!(transport = %T::KIND, "accept loop stopped");
}
