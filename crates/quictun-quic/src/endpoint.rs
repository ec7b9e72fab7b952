//! QUIC endpoints: the UDP socket (with large buffers), transport tuning, server and client setup.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use quictun_core::tls::{self, CertKey, PinVerifier, TlsError, Trust};

/// Errors while setting up an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Binding or configuring the UDP socket failed.
    #[error("UDP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// quinn refused the TLS configuration (for example: no TLS 1.3 cipher suite).
    #[error("QUIC crypto configuration: {0}")]
    Crypto(String),
}

/// Congestion controller choice.
///
/// BBR is the default: random loss on a real path is not congestion, and a loss-based controller
/// (CUBIC, NewReno) backs off on every lost packet. Measured here over 50 ms RTT with 1% loss:
/// CUBIC moved under 0.5 MB/s of a 12.5 MB/s link, BBR 9–11 MB/s; on loopback with 5% loss, BBR
/// kept p99 at 2.6 ms where CUBIC reached 30 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC, quinn's own default.
    Cubic,
    /// BBR.
    #[default]
    Bbr,
}

/// QUIC transport settings shared by relay and agent.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Concurrent bidirectional streams the *peer* may open towards us.
    pub max_concurrent_streams: u32,
    /// Flow-control window of one stream: what one stream may have in flight unread. A stream
    /// moves at most this much per round trip (4 MiB at 50 ms: 80 MB/s).
    pub stream_window: u32,
    /// Flow-control window of the whole connection: what all streams together may have unread.
    /// Large by default, as HTTP/2 servers set theirs, so that readers that stop reading can never
    /// hold up the other streams and the control stream: what they may hold is bounded by the
    /// stalled-reader budgets instead (see [`quictun_core::stall`]), and by stream count × stream window.
    pub connection_window: u32,
    /// Unacknowledged bytes we may have in flight.
    pub send_window: u64,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Send a keep-alive PING when idle this long (must be under `idle_timeout`).
    pub keep_alive: Duration,
    /// Requested UDP receive and send buffer size.
    pub udp_buffer: usize,
    /// Congestion controller.
    pub congestion: Congestion,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 1024,
            stream_window: 4 << 20,
            connection_window: 1 << 30,
            send_window: 16 << 20,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            udp_buffer: 4 << 20,
            congestion: Congestion::Cubic,
        }
    }
}

impl Tuning {
    /// The quinn transport configuration for these settings.
    pub fn transport_config(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok());
        if self.congestion == Congestion::Bbr {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        t
    }
}

/// Binds a UDP socket with the requested buffer sizes and logs what the kernel granted (Linux caps
/// them at `net.core.rmem_max` / `wmem_max`).
pub fn bind_udp(addr: SocketAddr, buffer: usize) -> Result<UdpSocket, EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| EndpointError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped addresses too on a `[::]` bind; failure only means v6-only.
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(%e, "could not clear IPV6_V6ONLY");
        }
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        tracing::warn!(%e, buffer, "could not set UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        tracing::warn!(%e, buffer, "could not set UDP send buffer");
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    let granted_recv = socket.recv_buffer_size().unwrap_or(0);
    let granted_send = socket.send_buffer_size().unwrap_or(0);
    // Linux reports twice the usable size.
    if granted_recv < buffer {
        tracing::warn!(
            requested = buffer,
            granted_recv,
            "UDP receive buffer smaller than requested; raise net.core.rmem_max for bulk throughput"
        );
    } else {
        tracing::debug!(granted_recv, granted_send, "UDP socket buffers");
    }
    Ok(socket.into())
}

/// 32 bytes derived from a relay's private key for one `purpose`: stable across restarts of the
/// same relay, and secret as that key is. HKDF-SHA256 (RFC 5869) with one block of output,
/// written with HMAC so that nothing can fail: extract, then expand `purpose` with counter 1.
fn derived_from_key(private_key: &rustls::pki_types::PrivateKeyDer<'_>, purpose: &[u8]) -> ring::hmac::Tag {
    use ring::hmac::{HMAC_SHA256, Key, sign};
    let prk = sign(&Key::new(HMAC_SHA256, b"quictun relay key derivation v1"), private_key.secret_der());
    sign(&Key::new(HMAC_SHA256, prk.as_ref()), &[purpose, &[1]].concat())
}

/// What lets a restarted relay end the connections it lost at once, derived from its private
/// key so that they survive the restart: the key that signs its stateless resets (RFC 9000,
/// 10.3), and the key its connection IDs are made with. quinn's defaults are random per process:
/// a restarted relay then finds an old connection's IDs invalid and stays silent (and a reset it
/// sent could not be verified), and the agent waited for its idle timeout. With these, the
/// agent's next packet draws a reset it verifies, and it reconnects at once.
#[derive(Debug)]
pub struct RestartKeys {
    /// Signs stateless resets.
    pub reset: ring::hmac::Key,
    /// Keys the connection-ID generator (IDs carry a hash checked on arrival).
    pub cid: u64,
}

impl RestartKeys {
    /// The keys of the relay whose private key is `private_key`.
    pub fn of(private_key: &rustls::pki_types::PrivateKeyDer<'_>) -> Self {
        let reset = derived_from_key(private_key, b"stateless reset key");
        let cid = derived_from_key(private_key, b"connection id key");
        let cid = cid.as_ref().first_chunk::<8>().map_or(0, |bytes| u64::from_le_bytes(*bytes));
        Self { reset: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()), cid }
    }

    /// The endpoint configuration that uses them.
    pub fn endpoint_config(self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(Arc::new(self.reset));
        let cid = self.cid;
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
        config
    }
}

/// Session tickets sent on each agent connection. A reconnect attempt uses one up even when it
/// fails (during a partition, say), so a few are kept for the attempt that gets through.
const TICKETS_PER_CONNECTION: usize = 4;

/// TLS sessions the relay keeps for resumption (a few hundred bytes each): the tickets of 2,048
/// agents; the oldest are dropped first. An agent whose ticket was dropped does a full handshake.
const RESUMPTION_CACHE: usize = 8192;

/// A QUIC server endpoint on `addr` with the relay's certificate, and [`RestartKeys`] derived
/// from its private key.
pub fn server_endpoint(addr: SocketAddr, cert: CertKey, tuning: &Tuning) -> Result<quinn::Endpoint, EndpointError> {
    let restart_keys = RestartKeys::of(&cert.key);
    let mut tls = tls::server_config(cert)?;
    // Resumption and 0-RTT for reconnecting agents. rustls accepts early data only with tickets
    // kept here (stateful resumption), each taken once: a replayed ClientHello finds its ticket
    // gone and its 0-RTT data is refused. Such tickets do not survive a restart, so an agent's
    // first reconnect to a restarted relay is a full handshake (its pin checked again).
    tls.max_early_data_size = u32::MAX;
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(RESUMPTION_CACHE);
    tls.send_tls13_tickets = TICKETS_PER_CONNECTION;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Crypto(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(tuning.transport_config()));
    let socket = bind_udp(addr, tuning.udp_buffer)?;
    let endpoint_config = restart_keys.endpoint_config();
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime::default_runtime_or_err()?)
        .map_err(|source| EndpointError::Socket { addr, source })
}

/// A QUIC client endpoint bound to `bind`, and the client configuration to dial the relay with.
pub fn client_endpoint(
    bind: SocketAddr,
    trust: &Trust,
    tuning: &Tuning,
) -> Result<(quinn::Endpoint, ClientSetup), EndpointError> {
    let setup = ClientSetup::new(trust, tuning)?;
    let socket = bind_udp(bind, tuning.udp_buffer)?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime::default_runtime_or_err()?)
            .map_err(|source| EndpointError::Socket { addr: bind, source })?;
    endpoint.set_default_client_config(setup.config.clone());
    Ok((endpoint, setup))
}

/// What a client needs to dial: the quinn configuration and, when pinning, the verifier that can
/// explain a mismatch.
#[derive(Clone)]
pub struct ClientSetup {
    /// The quinn client configuration.
    pub config: quinn::ClientConfig,
    /// The pin verifier, when trust is by pin.
    pub pin_verifier: Option<Arc<PinVerifier>>,
}

impl ClientSetup {
    /// Builds the client configuration for `trust`.
    pub fn new(trust: &Trust, tuning: &Tuning) -> Result<Self, EndpointError> {
        let (mut rustls_config, pin_verifier) = tls::client_config(trust)?;
        // A reconnect to a relay this process reached before resumes its TLS session (no
        // certificate to send or check) and sends its register as 0-RTT data. The tickets are
        // kept in memory (rustls' default cache), per relay name.
        rustls_config.enable_early_data = true;
        let crypto = QuicClientConfig::try_from(rustls_config).map_err(|e| EndpointError::Crypto(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(tuning.transport_config()));
        Ok(Self { config, pin_verifier })
    }
}

mod runtime {
    use super::*;

    /// quinn's tokio runtime, or an error when called outside one.
    pub fn default_runtime_or_err() -> Result<Arc<dyn quinn::Runtime>, EndpointError> {
        quinn::default_runtime().ok_or_else(|| EndpointError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source: std::io::Error::other("no async runtime found (call from within tokio)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_core::tls::GeneratedCert;

    #[test]
    fn restart_keys_are_the_same_for_the_same_private_key_and_differ_across_keys() {
        let (one, other) = (GeneratedCert::self_signed(&[]).unwrap(), GeneratedCert::self_signed(&[]).unwrap());
        let key = |cert: &GeneratedCert| RestartKeys::of(&cert.cert_key().unwrap().key);
        let (first, again, different) = (key(&one), key(&one), key(&other));
        let sign = |keys: &RestartKeys| ring::hmac::sign(&keys.reset, b"connection id").as_ref().to_vec();
        assert_eq!(sign(&first), sign(&again), "a restarted relay must sign resets as before");
        assert_eq!(first.cid, again.cid, "a restarted relay must accept its old connection IDs");
        assert_ne!(sign(&first), sign(&different));
        assert_ne!(first.cid, different.cid);
    }
}
