//! Why a relay could not start.

use std::net::SocketAddr;

use crate::config::ConfigError;

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// An agent listener (QUIC or gRPC) could not be bound.
    #[error(transparent)]
    Listener(#[from] quictun_core::transport::BindError),
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
    /// The relay's certificate could not be used for TLS.
    #[error("relay certificate: {0}")]
    Tls(quictun_core::tls::TlsError),
    /// The HTTPS ingress's certificate could not be loaded or used.
    #[error("HTTPS ingress certificate: {0}")]
    HttpsCert(quictun_core::tls::TlsError),
}
