//! QUIC endpoints: the UDP socket (with large buffers), transport tuning, server and client setup.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// Largest packet (UDP payload) to send to a peer on this host; loopback's own limit applies
    /// too. Each connection keeps a send buffer of this size for as long as it lives, so an end
    /// with many connections (the relay) may want less than the most loopback carries.
    pub loopback_packet: u16,
    /// A server's budget for the exception: how many connections from this host at a time may
    /// send packets as large as loopback carries although [`Tuning::loopback_packet`] is smaller
    /// (the first ones to come; see [`Acceptor::accept`]). A bulk transfer to such a peer costs
    /// about a fifth less CPU; each of them costs the larger send buffer.
    pub loopback_full_packet_connections: usize,
    /// A server's id for QUIC-LB connection IDs (see [`crate::ServerId`]): every ID it issues
    /// starts with it, for a load balancer in front of several relays. `None`: quinn's hashed
    /// IDs.
    pub lb_server_id: Option<crate::ServerId>,
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
            loopback_packet: MAX_UDP_PAYLOAD,
            loopback_full_packet_connections: 0,
            lb_server_id: None,
        }
    }
}

/// quinn's own upper bound for MTU discovery (its default): the packet size on other paths.
/// The round-trip time assumed before the first sample (Chrome's; quinn's default is RFC 9002's
/// 333 ms). An unanswered Initial is sent again after about 0.3 s, then 1 s and 2.3 s, rather than
/// 1 s and 3 s: an agent dialing a relay that is restarting reaches it within about a second of
/// its return, inside one 3 s handshake attempt, instead of timing out and waiting a backoff.
const INITIAL_RTT: Duration = Duration::from_millis(100);

const DEFAULT_PACKET: u16 = 1452;

/// Largest UDP payload quinn can be told to receive or to try (RFC 9000's limit for the
/// `max_udp_payload_size` transport parameter).
const MAX_UDP_PAYLOAD: u16 = 65_527;

/// True for a peer on this host (IPv4-mapped loopback included).
pub fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The largest UDP payload a loopback path carries over either IP version: the loopback
/// interface's MTU less the IPv6 and UDP headers (the larger ones, so that one configuration
/// serves IPv4 and IPv6 peers alike). `None` where the MTU cannot be read (not Linux).
fn loopback_udp_payload() -> Option<u16> {
    let mtu: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu").ok()?.trim().parse().ok()?;
    udp_payload_within(mtu)
}

/// The largest UDP payload in an IP packet of `mtu` bytes, over IPv6 and IPv4 alike (an IPv4
/// UDP datagram holds at most 65,507 bytes).
fn udp_payload_within(mtu: u32) -> Option<u16> {
    u16::try_from(mtu.checked_sub(40 + 8)?.min(65_507)).ok()
}

/// Packets quinn 0.11 batches into one GSO send at most.
const GSO_SEGMENTS: u32 = 10;

/// Loopback-sized packets a loopback connection may send before its first acknowledgement.
const INITIAL_WINDOW_PACKETS: u64 = 10;

/// Most bytes one UDP send may carry (a GSO batch is one UDP datagram to the kernel).
const MAX_UDP_SEND: u32 = 65_507;

impl Tuning {
    /// The quinn transport configuration for a peer on this host ([`is_loopback`]).
    ///
    /// Such a peer gets packets as large as loopback carries (up to
    /// [`Tuning::loopback_packet`]) from the first one: quinn's costs are per packet (building,
    /// encrypting, tracking, acknowledging, and a system call each), so 64 KB packets instead of
    /// 1,452-byte ones halve the CPU per byte of a bulk transfer. They start at that size rather
    /// than being found by MTU discovery, whose probes (a dozen packets of up to 64 KB, at every
    /// connection) cost the relay memory per session; discovery stays on to fall back if the
    /// loopback MTU shrinks. The size comes from the loopback interface's MTU (65,536 unless
    /// changed, so 65,488 bytes: what IPv6 carries, so that one size serves both versions). The
    /// initial congestion window holds ten such packets (quinn's CUBIC starts at 12,000 bytes,
    /// less than one packet, and would send nothing). Segmentation offload (GSO) stays on only
    /// when ten packets fit in one send: quinn 0.11 batches up to ten packets of the path MTU in
    /// one send, and a batch over 64 KiB is refused by the kernel (`EMSGSIZE`) and lost, which makes quinn's black-hole detection fall back to
    /// 1,200-byte packets (quinn-rs/quinn#2201); with 64 KB packets one send per packet is what
    /// GSO would have saved anyway. Where the loopback MTU cannot be read this is [`Tuning::transport_config`], which
    /// other peers get: quinn's discovery up to 1,452 bytes, with GSO.
    pub fn loopback_transport_config(&self) -> TransportConfig {
        let largest = loopback_udp_payload().map(|most| most.min(self.loopback_packet));
        let Some(packet) = largest.filter(|&p| p > DEFAULT_PACKET) else {
            return self.transport_config();
        };
        let mut t = self.transport_with_window(Some(INITIAL_WINDOW_PACKETS * u64::from(packet)));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(packet);
        let gso = u32::from(packet) * GSO_SEGMENTS <= MAX_UDP_SEND;
        t.initial_mtu(packet).mtu_discovery_config(Some(mtu)).enable_segmentation_offload(gso);
        t
    }

    /// The quinn transport configuration for these settings, for a peer on another host (and,
    /// with larger packets, on this one).
    pub fn transport_config(&self) -> TransportConfig {
        self.transport_with_window(None)
    }

    /// These settings, with at least `initial_window` bytes as the congestion controller's
    /// initial window when given.
    fn transport_with_window(&self, initial_window: Option<u64>) -> TransportConfig {
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(IdleTimeout::try_from(self.idle_timeout).ok())
            .initial_rtt(INITIAL_RTT);
        match self.congestion {
            Congestion::Bbr => {
                let mut bbr = quinn::congestion::BbrConfig::default();
                if let Some(window) = initial_window {
                    bbr.initial_window(window.max(default_window(&bbr)));
                }
                t.congestion_controller_factory(Arc::new(bbr));
            }
            Congestion::Cubic => {
                if let Some(window) = initial_window {
                    let mut cubic = quinn::congestion::CubicConfig::default();
                    cubic.initial_window(window.max(default_window(&cubic)));
                    t.congestion_controller_factory(Arc::new(cubic));
                }
            }
        }
        t
    }
}

/// The initial congestion window a controller configuration starts with.
fn default_window<C: quinn::congestion::ControllerFactory + Clone>(config: &C) -> u64 {
    Arc::new(config.clone()).build(std::time::Instant::now(), 1200).window()
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
    /// Keys QUIC-LB connection IDs (their nonce and their tag).
    pub lb: ring::hmac::Key,
}

impl RestartKeys {
    /// The keys of the relay whose private key is `private_key`.
    pub fn of(private_key: &rustls::pki_types::PrivateKeyDer<'_>) -> Self {
        let reset = derived_from_key(private_key, b"stateless reset key");
        let cid = derived_from_key(private_key, b"connection id key");
        let cid = cid.as_ref().first_chunk::<8>().map_or(0, |bytes| u64::from_le_bytes(*bytes));
        let lb = derived_from_key(private_key, b"quic-lb connection id key");
        Self {
            reset: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
            cid,
            lb: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, lb.as_ref()),
        }
    }

    /// The endpoint configuration that uses them: QUIC-LB connection IDs carrying `lb_server_id`
    /// when there is one, quinn's hashed IDs otherwise.
    pub(crate) fn endpoint_config(self, lb_server_id: Option<crate::ServerId>) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(Arc::new(self.reset));
        match lb_server_id {
            Some(server_id) => {
                let key = self.lb;
                config.cid_generator(move || {
                    Box::new(crate::lb_cid::LbConnectionIds::new(server_id.clone(), key.clone()))
                });
            }
            None => {
                let cid = self.cid;
                config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid)));
            }
        }
        config
    }
}

/// Session tickets sent on each agent connection. A reconnect attempt uses one up even when it
/// fails (during a partition, say), so a few are kept for the attempt that gets through.
const TICKETS_PER_CONNECTION: usize = 4;

/// TLS sessions the relay keeps for resumption (a few hundred bytes each): the tickets of 2,048
/// agents; the oldest are dropped first. An agent whose ticket was dropped does a full handshake.
const RESUMPTION_CACHE: usize = 8192;

/// Accepts each incoming connection with the transport configuration for its path (see
/// [`Tuning::loopback_transport_config`]).
#[derive(Clone)]
pub struct Acceptor {
    /// For peers on this host; others get the endpoint's default configuration.
    loopback: Arc<quinn::ServerConfig>,
    /// Packets as large as loopback carries, for peers on this host while the budget
    /// ([`Tuning::loopback_full_packet_connections`]) has room.
    loopback_full: Option<(Arc<quinn::ServerConfig>, Arc<Semaphore>)>,
}

/// A connection [`Acceptor::accept`] took.
pub struct Accepted {
    /// Its handshake.
    pub(crate) connecting: quinn::Connecting,
    /// Its share of the full-size packet budget, when it got one: to be held for as long as the
    /// connection lives (dropping it early lets one connection more have the larger buffer).
    pub full_packets: Option<OwnedSemaphorePermit>,
}

impl Acceptor {
    /// Accepts `incoming` (its handshake then runs in `connecting`): a peer on this host gets
    /// loopback-sized packets, full-size while the budget has room.
    pub(crate) fn accept(&self, incoming: quinn::Incoming) -> Result<Accepted, quinn::ConnectionError> {
        if !is_loopback(incoming.remote_address()) {
            return Ok(Accepted { connecting: incoming.accept()?, full_packets: None });
        }
        let full = self.loopback_full.as_ref().and_then(|(config, budget)| {
            budget.clone().try_acquire_owned().ok().map(|permit| (config.clone(), permit))
        });
        let (config, full_packets) = match full {
            Some((config, permit)) => (config, Some(permit)),
            None => (self.loopback.clone(), None),
        };
        Ok(Accepted { connecting: incoming.accept_with(config)?, full_packets })
    }
}

/// An endpoint that accepts UDP payloads of any size quinn allows, so that a peer may use the
/// largest its path carries (the value is announced to peers, and sizes the receive buffer).
fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    // Within quinn's range by construction: the call cannot fail.
    let _in_range = config.max_udp_payload_size(MAX_UDP_PAYLOAD);
    config
}

/// A QUIC server endpoint on `addr` with the relay's certificate, and [`RestartKeys`] derived
/// from its private key; connections are to be accepted through the returned [`Acceptor`].
pub(crate) fn server_endpoint(
    addr: SocketAddr,
    cert: CertKey,
    tuning: &Tuning,
) -> Result<(quinn::Endpoint, Acceptor), EndpointError> {
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
    let mut loopback = config.clone();
    loopback.transport_config(Arc::new(tuning.loopback_transport_config()));
    let loopback_full =
        (tuning.loopback_full_packet_connections > 0 && tuning.loopback_packet < MAX_UDP_PAYLOAD).then(|| {
            let mut full = config.clone();
            let full_tuning = Tuning { loopback_packet: MAX_UDP_PAYLOAD, ..tuning.clone() };
            full.transport_config(Arc::new(full_tuning.loopback_transport_config()));
            (Arc::new(full), Arc::new(Semaphore::new(tuning.loopback_full_packet_connections)))
        });
    let socket = bind_udp(addr, tuning.udp_buffer)?;
    let endpoint_config = endpoint_config(restart_keys.endpoint_config(tuning.lb_server_id.clone()));
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime::default_runtime_or_err()?)
        .map_err(|source| EndpointError::Socket { addr, source })?;
    Ok((endpoint, Acceptor { loopback: Arc::new(loopback), loopback_full }))
}

/// A QUIC client endpoint bound to `bind`, and the client configuration to dial the relay with.
pub(crate) fn client_endpoint(
    bind: SocketAddr,
    trust: &Trust,
    tuning: &Tuning,
) -> Result<(quinn::Endpoint, ClientSetup), EndpointError> {
    let setup = ClientSetup::new(trust, tuning)?;
    let mut endpoint = dialing_endpoint(bind, tuning)?;
    endpoint.set_default_client_config(setup.config.clone());
    Ok((endpoint, setup))
}

/// A QUIC endpoint bound to `bind` that only dials (each dial names its configuration).
pub(crate) fn dialing_endpoint(bind: SocketAddr, tuning: &Tuning) -> Result<quinn::Endpoint, EndpointError> {
    let socket = bind_udp(bind, tuning.udp_buffer)?;
    let config = endpoint_config(quinn::EndpointConfig::default());
    quinn::Endpoint::new(config, None, socket, runtime::default_runtime_or_err()?)
        .map_err(|source| EndpointError::Socket { addr: bind, source })
}

/// What a client needs to dial: the quinn configurations and, when pinning, the verifier that can
/// explain a mismatch.
#[derive(Clone)]
pub struct ClientSetup {
    /// The quinn client configuration for a relay on another host.
    pub(crate) config: quinn::ClientConfig,
    /// The same, for a relay on this host (see [`Tuning::loopback_transport_config`]).
    loopback: quinn::ClientConfig,
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
        let mut loopback = config.clone();
        loopback.transport_config(Arc::new(tuning.loopback_transport_config()));
        Ok(Self { config, loopback, pin_verifier })
    }

    /// The configuration to dial the relay at `addr` with.
    pub(crate) fn config_for(&self, addr: SocketAddr) -> quinn::ClientConfig {
        if is_loopback(addr) { self.loopback.clone() } else { self.config.clone() }
    }
}

mod runtime {
    use super::*;

    /// quinn's tokio runtime with deferred drivers ([`crate::deferred`]), or an error when called
    /// outside a tokio runtime.
    pub(crate) fn default_runtime_or_err() -> Result<Arc<dyn quinn::Runtime>, EndpointError> {
        tokio::runtime::Handle::try_current().map(|_| crate::deferred::DeferringRuntime::shared()).map_err(|_| {
            EndpointError::Socket {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source: std::io::Error::other("no async runtime found (call from within tokio)"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_core::tls::GeneratedCert;

    #[test]
    fn loopback_is_recognised_in_every_spelling() {
        for peer in ["127.0.0.1:4433", "127.3.2.1:1", "[::1]:4433", "[::ffff:127.0.0.1]:4433"] {
            assert!(is_loopback(peer.parse().unwrap()), "{peer}");
        }
        for peer in ["10.0.0.1:4433", "[2001:db8::1]:4433", "[::ffff:10.0.0.1]:4433", "0.0.0.0:4433"] {
            assert!(!is_loopback(peer.parse().unwrap()), "{peer}");
        }
        assert_eq!(udp_payload_within(65_536), Some(65_488));
        assert_eq!(udp_payload_within(9_000), Some(8_952));
        assert_eq!(udp_payload_within(1_000_000), Some(65_507));
        assert_eq!(udp_payload_within(40), None);
    }

    /// Sends 32 MiB from a client with `tuning` to a server on this host, both bound to `local`;
    /// returns the sender's path statistics.
    async fn path_after_a_bulk_send(local: &str, tuning: Tuning) -> quinn::PathStats {
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let any: SocketAddr = local.parse().unwrap();
        let (server, acceptor) = server_endpoint(any, cert.cert_key().unwrap(), &Tuning::default()).unwrap();
        let (client, setup) = client_endpoint(any, &Trust::Pin(cert.pin), &tuning).unwrap();
        let addr = server.local_addr().unwrap();
        let received = tokio::spawn(async move {
            let conn = acceptor.accept(server.accept().await.unwrap()).unwrap().connecting.await.unwrap();
            let (_send, mut recv) = conn.accept_bi().await.unwrap();
            let mut total = 0;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
                total += chunk.bytes.len();
            }
            total
        });
        let conn = client.connect_with(setup.config_for(addr), addr, "localhost").unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..32 {
            send.write_chunk(chunk.clone()).await.unwrap();
        }
        send.finish().unwrap();
        assert_eq!(received.await.unwrap(), 32 << 20);
        conn.stats().path
    }

    /// With a QUIC-LB server id, every packet the client sends after the handshake (short
    /// header) is addressed to a connection ID that starts with the config rotation and length
    /// octet and the server id, as a load balancer reads it on the wire.
    #[tokio::test]
    async fn every_short_header_packet_carries_the_relays_server_id() {
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server_id = crate::ServerId::parse("0x0a0b").unwrap();
        let tuning = Tuning { lb_server_id: Some(server_id.clone()), ..Tuning::default() };
        let (server, acceptor) = server_endpoint(any, cert.cert_key().unwrap(), &tuning).unwrap();
        let server_addr = server.local_addr().unwrap();
        // A forwarder between client and server that notes the destination connection ID of
        // every short-header packet from the client (1 octet of flags, then the ID: 15 octets).
        let outer = tokio::net::UdpSocket::bind(any).await.unwrap();
        let inner = tokio::net::UdpSocket::bind(any).await.unwrap();
        inner.connect(server_addr).await.unwrap();
        let proxy = outer.local_addr().unwrap();
        // Bounded: a handshake and one echo are a few dozen packets; more are not needed.
        let (ids_tx, mut ids) = tokio::sync::mpsc::channel::<Vec<u8>>(1024);
        let forward = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = outer.recv_from(&mut up) => {
                        client = Some(from);
                        if up[0] & 0x80 == 0 {
                            let _ = ids_tx.try_send(up[1..16].to_vec());
                        }
                        let _ = inner.send(&up[..n]).await;
                    }
                    Ok(n) = inner.recv(&mut down) => {
                        if let Some(client) = client {
                            let _ = outer.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        });
        let served = tokio::spawn(async move {
            let conn = acceptor.accept(server.accept().await.unwrap()).unwrap().connecting.await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let got = recv.read_to_end(1024).await.unwrap();
            send.write_all(&got).await.unwrap();
            send.finish().unwrap();
            conn.closed().await;
        });
        let (client, setup) = client_endpoint(any, &Trust::Pin(cert.pin), &Tuning::default()).unwrap();
        let conn = client.connect_with(setup.config_for(proxy), proxy, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"routed").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(1024).await.unwrap(), b"routed");
        conn.close(0u32.into(), b"done");
        client.wait_idle().await;
        let _ = served.await;
        forward.abort();
        let mut seen = 0;
        while let Ok(id) = ids.try_recv() {
            assert_eq!(id[0], 14, "config rotation 0 and the ID's length less one: {id:?}");
            assert_eq!(crate::server_id_of(&id, 2), Some(server_id.as_bytes()), "{id:?}");
            seen += 1;
        }
        assert!(seen >= 2, "only {seen} short-header packets seen");
    }

    /// On this host, packets start as large as loopback carries and stay so through a bulk
    /// transfer: no send the kernel refuses, so no black hole detected.
    #[tokio::test]
    async fn a_loopback_peer_gets_packets_as_large_as_loopback_carries() {
        let most = loopback_udp_payload().expect("Linux: the loopback MTU is readable");
        for congestion in [Congestion::Cubic, Congestion::Bbr] {
            let path = path_after_a_bulk_send("127.0.0.1:0", Tuning { congestion, ..Tuning::default() }).await;
            assert_eq!(path.current_mtu, most, "{congestion:?}: {path:?}");
            assert_eq!(path.black_holes_detected, 0, "{congestion:?}: {path:?}");
            assert_eq!(path.sent_plpmtud_probes, 0, "{congestion:?}: no probing needed: {path:?}");
        }

        let capped =
            path_after_a_bulk_send("127.0.0.1:0", Tuning { loopback_packet: 16 * 1024, ..Tuning::default() }).await;
        assert_eq!(capped.current_mtu, most.min(16 * 1024), "{capped:?}");
        assert_eq!(capped.black_holes_detected, 0, "{capped:?}");

        // The same size over IPv6, whose headers are larger, where the host has its loopback (CI's
        // machines have: there a missing one fails the test).
        match std::net::UdpSocket::bind("[::1]:0") {
            Ok(_) => {
                let v6 = path_after_a_bulk_send("[::1]:0", Tuning::default()).await;
                assert_eq!(v6.current_mtu, most, "{v6:?}");
                assert_eq!(v6.black_holes_detected, 0, "{v6:?}");
            }
            Err(err) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(!ci, "no IPv6 loopback under CI: {err}");
                eprintln!("the IPv6 half skipped: cannot bind [::1]: {err}");
            }
        }
    }

    /// A server that caps loopback packets at 16 KiB and may give full-size ones to one
    /// connection at a time: the first connection gets them, the next the cap, and once the first
    /// one's share is dropped the one after gets them again.
    #[tokio::test]
    async fn full_size_loopback_packets_go_to_as_many_connections_as_the_budget_holds() {
        let most = loopback_udp_payload().expect("Linux: the loopback MTU is readable");
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let tuning = Tuning { loopback_packet: 16 * 1024, loopback_full_packet_connections: 1, ..Tuning::default() };
        let (server, acceptor) = server_endpoint(any, cert.cert_key().unwrap(), &tuning).unwrap();
        let (client, setup) = client_endpoint(any, &Trust::Pin(cert.pin), &Tuning::default()).unwrap();
        let addr = server.local_addr().unwrap();
        // One connection: the server's end, the packet size it sends, its share of the budget.
        let connect = async || {
            let dialled = client.connect_with(setup.config_for(addr), addr, "localhost").unwrap();
            let accepted = acceptor.accept(server.accept().await.unwrap()).unwrap();
            let (_client_end, conn) = tokio::join!(dialled, accepted.connecting);
            let conn = conn.unwrap();
            let mtu = conn.stats().path.current_mtu;
            (conn, mtu, accepted.full_packets)
        };
        let (_first, first_mtu, first_share) = connect().await;
        assert_eq!((first_mtu, first_share.is_some()), (most, true));
        let (_second, second_mtu, second_share) = connect().await;
        assert_eq!((second_mtu, second_share.is_some()), (most.min(16 * 1024), false));
        drop(first_share);
        let (_third, third_mtu, third_share) = connect().await;
        assert_eq!((third_mtu, third_share.is_some()), (most, true));
    }

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
