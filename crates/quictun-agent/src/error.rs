//! Why the agent stopped for good (what `Agent::wait` and `Agent::shutdown` return).

use std::net::SocketAddr;

use quictun_core::logsafe::Inert;
use quictun_core::tls::PinMismatch;
use quictun_core::transport::DialError;
use quictun_proto::RejectCode;

/// Why the agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The relay refused the registration permanently (bad token, wrong group, old version).
    #[error("relay rejected registration ({code:?}): {}", Inert(message))]
    Rejected {
        /// The relay's code.
        code: RejectCode,
        /// The relay's reason.
        message: String,
    },
    /// The relay's certificate does not match the pin.
    #[error(transparent)]
    PinMismatch(#[from] PinMismatch),
    /// The relay's certificate could not be verified (CA mode), or the relay cannot be dialed
    /// at all from this host: another attempt would fail the same way.
    #[error("TLS: {0}")]
    Tls(#[source] DialError),
    /// A session with this agent's own client_id and instance id took over this one's (replicas
    /// with the same client_id are other instances and never do; this is a copied instance id).
    #[error("another session of client_id {0:?} with this agent's instance id replaced this one")]
    Replaced(String),
    /// The agent's QUIC endpoint (its UDP socket) could not be set up or moved.
    #[error(transparent)]
    Endpoint(#[from] quictun_quic::EndpointError),
    /// The agent's TLS configuration for the relay could not be built.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] quictun_core::tls::TlsError),
    /// A local listener (admin, egress) could not be bound.
    #[error("{what} listener on {addr}: {source}")]
    Listener {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent's task ended without its result (it panicked or was aborted).
    #[error("agent task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
