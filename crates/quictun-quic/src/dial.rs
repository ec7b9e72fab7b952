//! The agent's side of the QUIC transport: dialing the relay, with every failure typed as fatal
//! (a wrong pin or certificate: retrying cannot help) or worth a retry.

use std::net::SocketAddr;
use std::time::Duration;

use quictun_core::stall::StallScope;
use quictun_core::tls::PinMismatch;
use quictun_proto::{CloseCode, Limits};

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
    /// No handshake within the timeout: nothing answers on that UDP port, or UDP is blocked.
    #[error("no QUIC handshake with {addr} within {after:?}")]
    TimedOut {
        /// The relay's address.
        addr: SocketAddr,
        /// The timeout.
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

/// Completes a QUIC handshake with the relay at `addr` within `timeout`.
async fn handshake(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<quinn::Connection, DialError> {
    let connecting = endpoint
        .connect_with(setup.config.clone(), addr, server_name)
        .map_err(|e| DialError::Endpoint { addr, why: e.to_string() })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => {
            if let Some(mismatch) = setup.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
                return Err(DialError::PinMismatch(mismatch));
            }
            Err(match err {
                quinn::ConnectionError::TransportError(e) if is_certificate_alert(e.code) => {
                    DialError::Certificate(e.to_string())
                }
                quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    DialError::Refused(addr)
                }
                quinn::ConnectionError::TimedOut => DialError::TimedOut { addr, after: timeout },
                other => DialError::Handshake { addr, why: other.to_string() },
            })
        }
        Err(_) => Err(DialError::TimedOut { addr, after: timeout }),
    }
}

/// Dials the relay at `addr`, verifies it (`setup`'s pin or CA), and opens the control stream.
pub async fn dial(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
    limits: Limits,
    stall: StallScope,
) -> Result<(ControlChannel, QuicTunnel), DialError> {
    let conn = handshake(endpoint, setup, addr, server_name, timeout).await?;
    let (send, recv) = conn.open_bi().await.map_err(|e| DialError::ControlStream(e.to_string()))?;
    Ok((ControlChannel::new(send, recv, limits.max_control_frame), QuicTunnel::new(conn, limits, stall)))
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
    match handshake(endpoint, setup, addr, server_name, timeout).await {
        Ok(conn) => {
            crate::close(&conn, CloseCode::Normal);
            true
        }
        Err(_) => false,
    }
}
