//! The agent's side of the QUIC transport: dialing the relay, with every failure typed as fatal
//! (a wrong pin or certificate: retrying cannot help) or worth a retry.

use std::net::SocketAddr;
use std::time::Duration;

use quictun_core::control::ControlIo;
use quictun_core::stall::StallScope;
use quictun_core::tls::PinMismatch;
use quictun_proto::{CloseCode, ControlMessage, Limits};
use tracing::debug;

use crate::endpoint::ClientSetup;
use crate::frames::ControlChannel;
use crate::tunnel::QuicTunnel;

/// Why dialing the relay failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// The relay's name did not resolve.
    #[error(transparent)]
    Resolve(#[from] quictun_core::ResolveError),
    /// The relay's certificate does not match the pin.
    #[error(transparent)]
    PinMismatch(PinMismatch),
    /// The relay's certificate was refused (CA mode: not valid for the name, or not signed by the CA).
    #[error("the relay's certificate was refused: {0}")]
    Certificate(String),
    /// No handshake in time: nothing answers on that UDP port, or UDP is blocked.
    #[error("no QUIC handshake with {addr} after {:.1} s", after.as_secs_f64())]
    TimedOut {
        /// The relay's address.
        addr: SocketAddr,
        /// How long it waited.
        after: Duration,
    },
    /// The relay refused the connection (it is at a limit, or shutting down).
    #[error("the relay at {0} refused the connection")]
    Refused(SocketAddr),
    /// The handshake failed otherwise.
    #[error("QUIC handshake with {addr}: {why}")]
    Handshake {
        /// The relay's address.
        addr: SocketAddr,
        /// quinn's words.
        why: String,
    },
    /// The local endpoint cannot dial that address.
    #[error("cannot dial {addr}: {why}")]
    Endpoint {
        /// The relay's address.
        addr: SocketAddr,
        /// quinn's words.
        why: String,
    },
    /// The control stream could not be opened.
    #[error("opening the control stream: {0}")]
    ControlStream(String),
}

impl DialError {
    /// True when retrying cannot help (a wrong pin or certificate, an address the endpoint
    /// cannot dial).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::PinMismatch(_) | Self::Certificate(_) | Self::Endpoint { .. })
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
        quinn::ConnectionError::TransportError(e) if is_certificate_alert(e.code) => {
            DialError::Certificate(e.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            DialError::Refused(addr)
        }
        quinn::ConnectionError::TimedOut => DialError::TimedOut { addr, after: waited },
        other => DialError::Handshake { addr, why: other.to_string() },
    }
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
        .map_err(|e| DialError::Endpoint { addr, why: e.to_string() })
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
        Err(_) => Err(DialError::TimedOut { addr, after: timeout }),
    }
}

/// How a dial reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// A full or resumed handshake; the first message went after it.
    Complete,
    /// A resumed TLS session: the first message went as 0-RTT data, with the ClientHello.
    ZeroRtt,
}

/// A dialed relay: the control stream (its first message sent), the tunnel, and how.
pub struct Dialed {
    /// The control stream.
    pub control: ControlChannel,
    /// The tunnel.
    pub tunnel: QuicTunnel,
    /// How the handshake went.
    pub handshake: Handshake,
}

/// Opens the control stream on `conn` and sends `first` on it.
async fn open_control(
    conn: &quinn::Connection,
    first: ControlMessage,
    max_frame: usize,
) -> Result<ControlChannel, DialError> {
    let (send, recv) = conn.open_bi().await.map_err(|e| DialError::ControlStream(e.to_string()))?;
    let mut control = ControlChannel::new(send, recv, max_frame);
    control.send(first).await.map_err(|e| DialError::ControlStream(e.to_string()))?;
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
pub async fn dial(
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
                Err(_) => return Err(DialError::TimedOut { addr, after: timeout }),
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

/// Whether a QUIC handshake with the relay at `addr` completes now (the connection is closed at
/// once).
pub async fn probe(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> bool {
    let Ok(connecting) = connect(endpoint, setup, addr, server_name) else { return false };
    match handshake(connecting, setup, addr, timeout).await {
        Ok(conn) => {
            crate::close(&conn, CloseCode::Normal);
            true
        }
        Err(_) => false,
    }
}
