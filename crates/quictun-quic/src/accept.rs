//! The relay's side of the QUIC transport: a server endpoint whose new connections are offered
//! to the relay's admission first (by address, before any cryptography), then complete their
//! handshake and open their control stream, each under a deadline, in the connection's own task.

use std::net::SocketAddr;
use std::time::Duration;

use quictun_core::stall::Reclaimer;
use quictun_core::tls::CertKey;
use quictun_core::transport::{BindError, Connection, HandshakeError};
use quictun_core::tunnel::TransportKind;
use quictun_proto::{CloseCode, Limits};

use crate::endpoint::{Acceptor, Tuning, server_endpoint};
use crate::frames::ControlChannel;
use crate::tunnel::QuicTunnel;

/// Longest a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay binds its QUIC listener with.
pub struct QuicBindOptions {
    /// The UDP address.
    pub addr: SocketAddr,
    /// The relay's identity.
    pub cert: CertKey,
    /// Transport settings (for peers on this host: see [`Tuning::loopback_transport_config`]).
    pub tuning: Tuning,
    /// Frame limits.
    pub limits: Limits,
    /// How long a new connection may take to open its control stream once its handshake has
    /// started.
    pub register_timeout: Duration,
    /// Watches bodies from agents for stalled readers.
    pub stall: Reclaimer,
}

/// The relay's QUIC listener: a server endpoint and how its connections are set up.
pub struct QuicListener {
    pub(crate) endpoint: quinn::Endpoint,
    acceptor: Acceptor,
    local_addr: SocketAddr,
    limits: Limits,
    register_timeout: Duration,
    stall: Reclaimer,
    /// What one stalled body may hold: a stream window.
    stream_window: u64,
}

/// Binds the relay's QUIC listener.
pub fn bind(options: QuicBindOptions) -> Result<QuicListener, BindError> {
    let QuicBindOptions { addr, cert, tuning, limits, register_timeout, stall } = options;
    let failed = |source: quictun_core::transport::BoxError| BindError { transport: TransportKind::Quic, addr, source };
    let (endpoint, acceptor) = server_endpoint(addr, cert, &tuning).map_err(|e| failed(e.into()))?;
    let local_addr = endpoint.local_addr().map_err(|e| failed(e.into()))?;
    let stream_window = u64::from(tuning.stream_window);
    Ok(QuicListener { endpoint, acceptor, local_addr, limits, register_timeout, stall, stream_window })
}

impl QuicListener {
    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next new connection and its peer; `None` once the endpoint is closed.
    pub(crate) async fn accept(&self) -> Option<(quinn::Incoming, SocketAddr)> {
        let incoming = self.endpoint.accept().await?;
        let remote = incoming.remote_address();
        Some((incoming, remote))
    }

    /// Handshake and control stream of an admitted connection. The connection is used before its
    /// handshake completes, so that a register the agent sent as 0-RTT data is read at once and
    /// answered in the same round trip; the relay enters the session only once the handshake
    /// completes (see `Tunnel::handshake_complete`), because 0-RTT data can be replayed. On the
    /// server side `into_0rtt` always succeeds.
    pub(crate) async fn handshake(
        &self,
        incoming: quinn::Incoming,
    ) -> Result<Connection<ControlChannel>, HandshakeError> {
        let failed = |what, source: quinn::ConnectionError| HandshakeError::Failed { what, source: source.into() };
        let accepted = self.acceptor.accept(incoming).map_err(|e| failed("QUIC connection refused", e))?;
        let (conn, handshake) = match accepted.connecting.into_0rtt() {
            Ok((conn, handshake)) => (conn, Some(handshake)),
            Err(connecting) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => (conn, None),
                Ok(Err(err)) => return Err(failed("QUIC handshake", err)),
                Err(_) => return Err(HandshakeError::TimedOut { what: "QUIC handshake", after: HANDSHAKE_TIMEOUT }),
            },
        };
        let (send, recv) = match tokio::time::timeout(self.register_timeout, conn.accept_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(err)) => return Err(failed("the connection closed before its control stream", err)),
            Err(_) => {
                crate::close(&conn, CloseCode::HandshakeTimeout);
                return Err(HandshakeError::TimedOut { what: "control stream", after: self.register_timeout });
            }
        };
        let control = ControlChannel::new(send, recv, self.limits.max_control_frame);
        let stall = self.stall.scope(self.stream_window);
        let tunnel = match handshake {
            Some(handshake) => QuicTunnel::early(conn, handshake, self.limits, stall),
            None => QuicTunnel::new(conn, self.limits, stall),
        };
        let early_data = control.is_0rtt();
        let tunnel = tunnel.holding(accepted.full_packets);
        Ok(Connection { control, tunnel: std::sync::Arc::new(tunnel), early_data })
    }

    /// Closes the endpoint and its connections with `code`.
    pub fn close(&self, code: CloseCode) {
        crate::close_endpoint(&self.endpoint, code);
    }

    /// Waits until every connection of the endpoint is gone (its close delivered).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}
