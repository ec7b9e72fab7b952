//! The agent's side of the QUIC transport: its endpoint (a UDP socket several agents may share,
//! which can move to a new one), and dialing the relay with every failure typed (see
//! [`quictun_core::transport::DialError`]).

use std::net::SocketAddr;
use std::time::Duration;

use quictun_core::Trust;
use quictun_core::control::ControlIo;
use quictun_core::stall::{Reclaimer, StallScope};
use quictun_core::transport::{Connection, DialError};
use quictun_core::tunnel::TransportKind;
use quictun_proto::{CloseCode, ControlMessage, HostPort, Limits};
use tracing::debug;

use crate::endpoint::{ClientSetup, EndpointError, Tuning, bind_udp, dialing_endpoint};
use crate::frames::ControlChannel;
use crate::tunnel::QuicTunnel;

/// The agent's QUIC endpoint: the UDP socket its dials go from. It can move to a new socket (a
/// new port or interface) without dropping its connections, and several agents of one process
/// may share it.
#[derive(Debug, Clone)]
pub struct QuicEndpoint {
    endpoint: quinn::Endpoint,
    udp_buffer: usize,
}

impl QuicEndpoint {
    /// A client endpoint bound to `bind`.
    pub fn bind(bind: SocketAddr, tuning: &Tuning) -> Result<Self, EndpointError> {
        Ok(Self { endpoint: dialing_endpoint(bind, tuning)?, udp_buffer: tuning.udp_buffer })
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Moves the endpoint to a new UDP socket bound to `bind`: its connections migrate, streams
    /// in flight go on. Returns the new local address.
    pub fn rebind(&self, bind: SocketAddr) -> Result<SocketAddr, EndpointError> {
        let socket = bind_udp(bind, self.udp_buffer)?;
        let failed = |source| EndpointError::Socket { addr: bind, source };
        let local = socket.local_addr().map_err(failed)?;
        self.endpoint.rebind(socket).map_err(failed)?;
        Ok(local)
    }

    /// Closes every connection of the endpoint with `code`, at once.
    pub fn close(&self, code: CloseCode) {
        crate::close_endpoint(&self.endpoint, code);
    }

    /// Waits until every connection of the endpoint is gone (its close delivered).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

/// What the agent dials the relay over QUIC with.
pub struct QuicDialOptions {
    /// The endpoint the dials go from.
    pub endpoint: QuicEndpoint,
    /// How the relay is verified.
    pub trust: Trust,
    /// Transport settings.
    pub tuning: Tuning,
    /// The relay's QUIC address.
    pub relay: HostPort,
    /// The TLS server name.
    pub server_name: String,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
    /// Frame limits.
    pub limits: Limits,
    /// Watches bodies from the relay for stalled readers.
    pub stall: Reclaimer,
}

/// The agent's QUIC dialer.
pub struct QuicDialer {
    endpoint: QuicEndpoint,
    setup: ClientSetup,
    relay: HostPort,
    server_name: String,
    timeout: Duration,
    limits: Limits,
    stall: Reclaimer,
    stream_window: u64,
}

impl QuicDialer {
    /// A dialer with `options`' trust and settings.
    pub fn new(options: QuicDialOptions) -> Result<Self, EndpointError> {
        let QuicDialOptions { endpoint, trust, tuning, relay, server_name, handshake_timeout, limits, stall } = options;
        let setup = ClientSetup::new(&trust, &tuning)?;
        let stream_window = u64::from(tuning.stream_window);
        Ok(Self { endpoint, setup, relay, server_name, timeout: handshake_timeout, limits, stall, stream_window })
    }

    /// The endpoint it dials from.
    pub fn endpoint(&self) -> &QuicEndpoint {
        &self.endpoint
    }

    /// Whether a QUIC handshake with the relay completes now (the connection is closed at once).
    pub async fn probe(&self) -> bool {
        let Ok(addr) = quictun_core::resolve(&self.relay).await else { return false };
        let Ok(connecting) = connect(&self.endpoint.endpoint, &self.setup, addr, &self.server_name) else {
            return false;
        };
        match handshake(connecting, &self.setup, addr, self.timeout).await {
            Ok(conn) => {
                crate::close(&conn, CloseCode::Normal);
                true
            }
            Err(_) => false,
        }
    }

    /// Resolves the relay and dials it (see [`dial`]).
    pub(crate) async fn dial(&self, first: ControlMessage) -> Result<Connection<ControlChannel>, DialError> {
        let addr = quictun_core::resolve(&self.relay).await?;
        let stall = self.stall.scope(self.stream_window);
        let target = (addr, self.server_name.as_str());
        let dialed =
            dial(&self.endpoint.endpoint, &self.setup, target, self.timeout, self.limits, stall, first).await?;
        debug!(handshake = ?dialed.handshake, "reached the relay");
        let early_data = dialed.handshake == Handshake::ZeroRtt;
        Ok(Connection { control: dialed.control, tunnel: std::sync::Arc::new(dialed.tunnel), early_data })
    }
}

/// TLS alerts that say the certificate was refused (RFC 8446 §6.2: bad_certificate through
/// access_denied, and decrypt_error for a signature that does not verify).
fn is_certificate_alert(code: quinn::TransportErrorCode) -> bool {
    let alert = u64::from(code);
    (0x100 + 42..=0x100 + 49).contains(&alert) || alert == 0x100 + 51
}

/// Why the handshake with the relay at `addr` failed, from quinn's error and the pin verifier;
/// `waited` is how long it had tried.
fn handshake_error(setup: &ClientSetup, addr: SocketAddr, err: quinn::ConnectionError, waited: Duration) -> DialError {
    if let Some(mismatch) = setup.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
        return DialError::PinMismatch(mismatch);
    }
    match err {
        quinn::ConnectionError::TransportError(e) if is_certificate_alert(e.code) => DialError::Certificate(e.into()),
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            DialError::Refused(addr)
        }
        quinn::ConnectionError::TimedOut => timed_out(addr, waited),
        other => DialError::Failed { what: "QUIC handshake", addr, source: other.into() },
    }
}

fn timed_out(addr: SocketAddr, after: Duration) -> DialError {
    DialError::TimedOut { transport: TransportKind::Quic, addr, after }
}

/// Starts a connection to the relay at `addr`.
fn connect(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connecting, DialError> {
    endpoint
        .connect_with(setup.config_for(addr), addr, server_name)
        .map_err(|e| DialError::Unreachable { addr, source: e.into() })
}

/// Completes a QUIC handshake with the relay at `addr` within `timeout`.
async fn handshake(
    connecting: quinn::Connecting,
    setup: &ClientSetup,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, DialError> {
    let started = tokio::time::Instant::now();
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(handshake_error(setup, addr, err, started.elapsed())),
        Err(_) => Err(timed_out(addr, timeout)),
    }
}

/// How a dial reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// A full or resumed handshake; the first message went after it.
    Complete,
    /// A resumed TLS session: the first message went as 0-RTT data, with the ClientHello.
    ZeroRtt,
}

/// A dialed relay: the control stream (its first message sent), the tunnel, and how.
struct Dialed {
    /// The control stream.
    control: ControlChannel,
    /// The tunnel.
    tunnel: QuicTunnel,
    /// How the handshake went.
    handshake: Handshake,
}

/// Opens the control stream on `conn` and sends `first` on it.
async fn open_control(
    conn: &quinn::Connection,
    first: ControlMessage,
    max_frame: usize,
) -> Result<ControlChannel, DialError> {
    let failed = |source: quictun_core::transport::BoxError| DialError::Failed {
        what: "opening the control stream",
        addr: conn.remote_address(),
        source,
    };
    let (send, recv) = conn.open_bi().await.map_err(|e| failed(e.into()))?;
    let mut control = ControlChannel::new(send, recv, max_frame);
    control.send(first).await.map_err(|e| failed(e.into()))?;
    Ok(control)
}

/// Dials the relay at `addr`, verifies it (`setup`'s pin or CA), opens the control stream and
/// sends `first` (the register message) on it, all within `timeout`.
///
/// When this process reached the relay before and holds one of its session tickets, the TLS
/// session is resumed and `first` goes as 0-RTT data with the ClientHello, so that the relay
/// can answer it within one round trip. The relay acts on it only once the handshake completes
/// (0-RTT data can be replayed). When the relay refuses the 0-RTT data (it restarted, or dropped
/// the ticket), `first` is sent again on a new stream once the handshake completes.
async fn dial(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    target: (SocketAddr, &str),
    timeout: Duration,
    limits: Limits,
    stall: StallScope,
    first: ControlMessage,
) -> Result<Dialed, DialError> {
    let (addr, server_name) = target;
    let max_frame = limits.max_control_frame;
    let started = tokio::time::Instant::now();
    let (conn, control, handshake_kind) = match connect(endpoint, setup, addr, server_name)?.into_0rtt() {
        Ok((conn, accepted)) => {
            let early = tokio::time::timeout(timeout, async {
                let control = open_control(&conn, first.clone(), max_frame).await;
                (control, accepted.await)
            });
            match early.await {
                Err(_) => return Err(timed_out(addr, timeout)),
                Ok((Ok(control), true)) => (conn, control, Handshake::ZeroRtt),
                Ok((_, _)) => {
                    if let Some(err) = conn.close_reason() {
                        return Err(handshake_error(setup, addr, err, started.elapsed()));
                    }
                    // 0-RTT refused, handshake complete: the early stream is gone; again in 1-RTT.
                    debug!(%addr, "the relay refused 0-RTT data; registering after the handshake");
                    let control = open_control(&conn, first, max_frame).await?;
                    (conn, control, Handshake::Complete)
                }
            }
        }
        Err(connecting) => {
            let conn = handshake(connecting, setup, addr, timeout).await?;
            let control = open_control(&conn, first, max_frame).await?;
            (conn, control, Handshake::Complete)
        }
    };
    Ok(Dialed { control, tunnel: QuicTunnel::new(conn, limits, stall), handshake: handshake_kind })
}
