//! A real QUIC connection on 127.0.0.1 for unit tests.

use std::net::SocketAddr;

use quictun_core::Trust;
use quictun_core::tls::GeneratedCert;

use crate::Tuning;

/// Both ends of one connection, with the endpoints that drive them.
pub struct Pair {
    /// The end that connected.
    pub(crate) client: quinn::Connection,
    /// The end that accepted.
    pub(crate) server: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
}

/// Connects a client endpoint to a server endpoint, both on 127.0.0.1 with default tuning.
pub async fn connected() -> Pair {
    let cert = GeneratedCert::self_signed(&[]).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (server, _) = crate::endpoint::server_endpoint(any, cert.cert_key().unwrap(), &Tuning::default()).unwrap();
    let (client, setup) = crate::endpoint::client_endpoint(any, &Trust::Pin(cert.pin), &Tuning::default()).unwrap();
    let addr = server.local_addr().unwrap();
    let connecting = client.connect_with(setup.config, addr, "localhost").unwrap();
    let (conn, accepted) = tokio::join!(connecting, async { server.accept().await.unwrap().await.unwrap() });
    Pair { client: conn.unwrap(), server: accepted, _endpoints: (client, server) }
}
