//! The relay's TOML configuration (`relay.toml`), parsed with unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use quictun_core::config::ConfigError;
use quictun_core::config::{SecretSources, parse_toml};
use quictun_core::proxy_protocol::ProxyProtocol;
use std::time::Duration;

use quictun_proto::Token;
use serde::Deserialize;

/// The whole relay configuration file, as written. Values that need the file system, the
/// environment or cross references (tokens, routes, egress targets) are resolved once, when the
/// relay compiles it for use (see [`crate::Relay::start`] and [`crate::Relay::reload`]), with
/// errors that name the key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The file it was read from, for errors (`<inline>` when parsed from text without one).
    #[serde(skip)]
    pub source: PathBuf,
    /// Listeners, certificate and tuning.
    #[serde(default)]
    pub relay: RelaySection,
    /// Who may connect.
    #[serde(default)]
    pub clients: Vec<ClientEntry>,
    /// Named upstreams served by the agents of a group.
    #[serde(default)]
    pub upstreams: Vec<UpstreamEntry>,
    /// Host/path routes to upstreams; first match wins.
    #[serde(default)]
    pub routes: Vec<RouteEntry>,
    /// TCP tunnels: each accepted connection is carried to an agent of the group on its own stream.
    #[serde(default)]
    pub tcp: Vec<TcpEntry>,
    /// UDP tunnels: each client address is a flow, carried to an agent of the group.
    #[serde(default)]
    pub udp: Vec<UdpEntry>,
    /// Where requests from agents' egress listeners go, by host and path; first match wins.
    #[serde(default)]
    pub egress_routes: Vec<EgressRouteEntry>,
    /// The relay cluster this relay is part of; without it the relay stands alone.
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
}

/// The `[cluster]` section: the relay's place in a cluster of relays sharing a session
/// directory in etcd.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This relay's id, unique in the cluster.
    pub relay_id: String,
    /// etcd's client endpoints (`host:port` or `http://host:port`).
    pub etcd: Vec<String>,
    /// Where the other relays reach this one (QUIC, `host:port`).
    pub advertise: String,
    /// The prefix of the cluster's keys in etcd.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// Seconds the directory keeps this relay's sessions after it stops renewing them (it renews
    /// every third of it).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// This relay's QUIC-LB server id, in hex (1 to 7 octets, unique behind one load balancer):
    /// every QUIC connection ID it issues starts with it. Unset: ordinary connection IDs.
    #[serde(default)]
    pub server_id: Option<String>,
    /// The secret every relay of the cluster shares: a relay forwards requests only to, and
    /// takes them only from, relays that present it. Set this or `token_file`.
    #[serde(default)]
    pub token: Option<Token>,
    /// A file holding the cluster's secret (read at start).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Requests another relay may have forwarded to this one at once (its streams on the link).
    #[serde(default = "default_streams_per_peer")]
    pub max_streams_per_peer: u32,
}

fn default_streams_per_peer() -> u32 {
    1024
}

fn default_cluster_prefix() -> String {
    "/quictun/".into()
}

fn default_lease_ttl() -> u64 {
    10
}

impl ClusterSection {
    fn check(&self) -> Result<(), Invalid> {
        let id_ok = |id: &str| {
            !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !id_ok(&self.relay_id) {
            return Err(("cluster.relay_id".into(), "1 to 64 letters, digits, '-', '_' or '.'".into()));
        }
        if self.etcd.is_empty() {
            return Err(("cluster.etcd".into(), "needs at least one endpoint".into()));
        }
        if let Err(err) = quictun_cluster::Etcd::new(&self.etcd, std::time::Duration::from_secs(1)) {
            return Err(("cluster.etcd".into(), err.to_string()));
        }
        if self.advertise.parse::<quictun_proto::HostPort>().is_err() {
            return Err(("cluster.advertise".into(), format!("{:?} is not host:port", self.advertise)));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(("cluster.prefix".into(), "must start and end with '/'".into()));
        }
        if !(3..=3600).contains(&self.lease_ttl_secs) {
            return Err(("cluster.lease_ttl_secs".into(), "from 3 to 3600".into()));
        }
        if let Some(Err(why)) = self.server_id.as_deref().map(quictun_quic::ServerId::parse) {
            return Err(("cluster.server_id".into(), why));
        }
        match (&self.token, &self.token_file) {
            (None, None) => return Err(("cluster.token".into(), "set token or token_file".into())),
            (Some(_), Some(_)) => return Err(("cluster.token".into(), "set one of token, token_file".into())),
            (Some(token), None) if token.expose().len() < 16 => {
                return Err(("cluster.token".into(), "at least 16 characters".into()));
            }
            _ => {}
        }
        if !(1..=65_536).contains(&self.max_streams_per_peer) {
            return Err(("cluster.max_streams_per_peer".into(), "from 1 to 65536".into()));
        }
        Ok(())
    }
}

/// An `[[egress_routes]]` entry: requests an agent sends through the tunnel for `host` (and
/// `path_prefix`) are forwarded by the relay to `target`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRouteEntry {
    /// Exact host, `*.example.com`, or `*` for any host.
    pub host: String,
    /// Path prefix; `/` matches everything.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// `http://host:port[/base]` (or `h2c://` for HTTP/2) as the relay reaches it.
    pub target: String,
    /// The groups whose agents may use this route (default: every group).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A `[[tcp]]` entry: a TCP port on the relay tunnelled to `upstream` as the agents of `group`
/// reach it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpEntry {
    /// The relay's TCP listen address.
    pub listen: SocketAddr,
    /// The group whose agents serve it.
    pub group: String,
    /// `host:port` as the agent sees it.
    pub upstream: quictun_proto::HostPort,
    /// Connections this listener carries at once; more are closed at once.
    #[serde(default = "default_tcp_max_connections")]
    pub max_connections: usize,
    /// Connections one client address may have open on this listener at once.
    #[serde(default = "default_tcp_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// A connection through which no byte has moved either way for this long is closed
    /// (0: never).
    #[serde(default = "default_tcp_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// A PROXY protocol header (`"v1"` or `"v2"`) the upstream receives first, naming the
    /// client's address; none by default.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A `[[udp]]` entry: a UDP port on the relay whose datagrams go to `upstream` as the agents of
/// `group` reach it. Each client address is a flow, with its own socket at the agent so that
/// replies go back to it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpEntry {
    /// The relay's UDP listen address.
    pub listen: SocketAddr,
    /// The group whose agents serve it.
    pub group: String,
    /// `host:port` as the agent sees it.
    pub upstream: quictun_proto::HostPort,
    /// A flow through which nothing has moved either way for this long ends.
    #[serde(default = "default_udp_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Flows this listener carries at once; a datagram that would start one more is dropped.
    #[serde(default = "default_udp_max_flows")]
    pub max_flows: usize,
    /// Flows of this listener one agent carries at once.
    #[serde(default = "default_udp_max_flows_per_agent")]
    pub max_flows_per_agent: usize,
    /// Datagrams one flow may have waiting for its stream (before its agent has answered, or too
    /// large for a DATAGRAM frame, or all of them on the gRPC transport); more are dropped.
    #[serde(default = "default_udp_queue_datagrams")]
    pub queue_datagrams: usize,
    /// `"v2"`: every datagram reaches the upstream after a PROXY protocol v2 header naming the
    /// client's address; none by default.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A `[[udp]]` flow's idle timeout by default: a minute.
pub const UDP_IDLE_TIMEOUT_SECS: u64 = 60;
/// A `[[udp]]` listener's flows at once, by default.
pub const UDP_MAX_FLOWS: usize = 1024;
/// A `[[udp]]` listener's flows on one agent at once, by default.
pub const UDP_MAX_FLOWS_PER_AGENT: usize = 256;
/// Datagrams queued per flow, by default.
pub const UDP_QUEUE_DATAGRAMS: usize = 64;

fn default_udp_idle_timeout_secs() -> u64 {
    UDP_IDLE_TIMEOUT_SECS
}

fn default_udp_max_flows() -> usize {
    UDP_MAX_FLOWS
}

fn default_udp_max_flows_per_agent() -> usize {
    UDP_MAX_FLOWS_PER_AGENT
}

fn default_udp_queue_datagrams() -> usize {
    UDP_QUEUE_DATAGRAMS
}

impl UdpEntry {
    /// An entry with the default limits.
    pub fn new(listen: SocketAddr, group: impl Into<String>, upstream: quictun_proto::HostPort) -> Self {
        Self {
            listen,
            group: group.into(),
            upstream,
            idle_timeout_secs: UDP_IDLE_TIMEOUT_SECS,
            max_flows: UDP_MAX_FLOWS,
            max_flows_per_agent: UDP_MAX_FLOWS_PER_AGENT,
            queue_datagrams: UDP_QUEUE_DATAGRAMS,
            proxy_protocol: None,
        }
    }
}

/// A `[[tcp]]` listener's connections at once, by default: half of an agent's streams.
pub const TCP_MAX_CONNECTIONS: usize = 512;
/// A `[[tcp]]` listener's connections from one address at once, by default.
pub const TCP_MAX_CONNECTIONS_PER_IP: usize = 64;
/// A `[[tcp]]` connection's idle timeout by default: ten minutes, as nginx's stream proxy.
pub const TCP_IDLE_TIMEOUT_SECS: u64 = 600;

fn default_tcp_max_connections() -> usize {
    TCP_MAX_CONNECTIONS
}

fn default_tcp_max_connections_per_ip() -> usize {
    TCP_MAX_CONNECTIONS_PER_IP
}

fn default_tcp_idle_timeout_secs() -> u64 {
    TCP_IDLE_TIMEOUT_SECS
}

impl TcpEntry {
    /// An entry with the default limits.
    pub fn new(listen: SocketAddr, group: impl Into<String>, upstream: quictun_proto::HostPort) -> Self {
        Self {
            listen,
            group: group.into(),
            upstream,
            max_connections: TCP_MAX_CONNECTIONS,
            max_connections_per_ip: TCP_MAX_CONNECTIONS_PER_IP,
            idle_timeout_secs: TCP_IDLE_TIMEOUT_SECS,
            proxy_protocol: None,
        }
    }

    /// The idle timeout (`None`: never).
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_secs > 0).then(|| Duration::from_secs(self.idle_timeout_secs))
    }
}

/// The `[relay]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySection {
    /// UDP address for QUIC.
    pub quic_listen: SocketAddr,
    /// TCP address of the HTTP ingress.
    pub http_listen: SocketAddr,
    /// TCP address of the HTTPS ingress (TLS 1.3/1.2, ALPN `h2` and `http/1.1`); off when unset.
    pub https_listen: Option<SocketAddr>,
    /// PEM certificate chain the HTTPS ingress presents; defaults to `cert`.
    pub https_cert: Option<PathBuf>,
    /// PEM private key of `https_cert`; defaults to `key`.
    pub https_key: Option<PathBuf>,
    /// TCP address of the admin endpoint.
    pub admin_listen: SocketAddr,
    /// TCP address of the gRPC transport (TLS with the same certificate).
    pub grpc_listen: SocketAddr,
    /// Which transports agents may use: `all` (default), `quic` or `grpc`.
    pub transport: TransportChoice,
    /// QUIC congestion controller: `bbr` (default) or `cubic`.
    pub congestion: quictun_quic::Congestion,
    /// How the relay writes its log lines: `text` or `json`.
    pub log_format: quictun_core::config::LogFormat,
    /// The name (or address) agents reach this relay at, for the agent command it prints; by
    /// default the machine's host name.
    pub public_name: Option<String>,
    /// PEM certificate; generated when missing.
    pub cert: PathBuf,
    /// PEM private key; generated when missing.
    pub key: PathBuf,
    /// True when `cert` or `key` was named (in the file, or by a flag): then a missing file is an
    /// error, never a reason to make a new identity that pinned agents would refuse.
    #[serde(skip)]
    pub identity_named: bool,
    /// Heartbeat interval sent to agents, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// A peer silent for this many heartbeat intervals is dropped.
    pub heartbeat_misses: u32,
    /// A QUIC agent from which nothing has arrived for this many milliseconds is suspected: the
    /// balancer leaves it out while a sibling answers, and requests waiting on it move. It must
    /// be above the agents' keep-alive (`agent.keep_alive_ms`, 1000), or idle agents would be
    /// suspected between their PINGs. `0`: off.
    pub silence_check_ms: u64,
    /// Concurrent streams (in-flight requests) per agent connection.
    pub max_streams_per_agent: u32,
    /// The share of an agent's streams, in percent, that requests with a body, upgrades
    /// (WebSocket) and TCP tunnel connections may hold at once; the rest is kept for requests
    /// without a body, so that slow uploads or idle tunnels cannot starve them.
    pub bulk_stream_percent: u32,
    /// Agent processes (instances) one client may have connected at once: replicas of one
    /// deployment sharing a client_id and token serve side by side; one more is refused with a
    /// clear error until another leaves.
    pub max_instances_per_client: usize,
    /// Concurrent egress requests an agent may send through its connection (QUIC streams it
    /// opens); more wait for a free one.
    pub max_egress_streams_per_agent: u32,
    /// QUIC flow-control window of one stream, in bytes: what one response may have in flight
    /// unread. One stream moves at most this much per round trip.
    pub stream_window: u32,
    /// QUIC flow-control window of an agent connection, in bytes; stalled readers may hold half.
    pub connection_window: u32,
    /// A client that has not read for this long (while data waits for it) is stalled, in ms.
    pub stall_timeout_ms: u64,
    /// The most credit all stalled readers may hold, in bytes; beyond it the longest-stalled are
    /// reset.
    pub max_stalled_bytes: u64,
    /// The most credit the stalled readers of one client address may hold, in bytes (0: no limit).
    pub max_stalled_bytes_per_ip: u64,
    /// Seconds to wait for an agent's response head before answering 504.
    pub response_timeout_secs: u64,
    /// Seconds to wait for a new agent's register message.
    pub register_timeout_secs: u64,
    /// Largest request head accepted on the ingress, in bytes.
    pub max_header_bytes: usize,
    /// Most request headers accepted on the ingress.
    pub max_header_count: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    pub drain_timeout_secs: u64,
    /// Seconds an ingress client may take to send a request head (slowloris); answered 408.
    pub header_read_timeout_secs: u64,
    /// Seconds an idle keep-alive ingress connection stays open.
    pub keep_alive_timeout_secs: u64,
    /// Seconds a proxied body may make no progress before the exchange is reset (0: never).
    pub stream_idle_timeout_secs: u64,
    /// Open ingress connections allowed per client IP address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Ingress connections (HTTP, HTTPS, TCP tunnels) the relay takes at once; 0: three quarters
    /// of its file descriptor limit, so the admin endpoint and the agents always have some left.
    pub max_connections: usize,
    /// Requests (and TCP tunnel connections) in flight per client IP address (0: no limit).
    pub max_requests_per_ip: usize,
    /// The slowest a request body may arrive, in bytes per second of the time the relay waits
    /// for it, measured over 10 s windows; slower is answered 408 (0: no minimum).
    pub min_upload_rate: u64,
    /// New QUIC connections accepted per second from one IP address, sustained (0: no limit);
    /// more are refused before any cryptography is done.
    pub handshake_rate_per_ip: u32,
    /// How many new QUIC connections one IP address may open in a burst.
    pub handshake_burst_per_ip: u32,
    /// Agent connections (QUIC or gRPC) that have not registered yet, at once; more are refused.
    /// A quarter of them is kept for networks agents registered from; of the rest, each network
    /// gets a fair share.
    pub max_pending_connections: usize,
    /// Agent connections not registered yet from one network (IPv4 /24, IPv6 /48); 0: only the
    /// fair share.
    pub max_pending_per_network: usize,
    /// How long a new agent connection (QUIC or gRPC) has, from its first packet, to complete
    /// its TLS handshake and open its control channel; then it is closed.
    pub handshake_timeout_ms: u64,
    /// Where the networks agents registered from are kept across restarts (see
    /// `max_pending_connections`); when loaded from a file, `agent-networks` beside the
    /// certificate by default. `None`: in memory only.
    pub agent_networks_file: Option<PathBuf>,
    /// The address TCP tunnels that agents declare are bound on (their ports are the agents').
    pub declared_tcp_address: std::net::IpAddr,
    /// For this many seconds after the relay starts, a request for a group with no agent waits
    /// (up to the end of that window) for one to register instead of failing: agents reconnect
    /// after a restart. 0 turns it off.
    pub startup_grace_secs: u64,
    /// Bearer token required by the admin endpoint (except `/healthz` and `/readyz`).
    pub admin_token: Option<Token>,
    /// A file holding the admin bearer token.
    pub admin_token_file: Option<PathBuf>,
    /// Client addresses (and networks) of proxies in front of the relay whose forwarding headers
    /// are kept (see [`quictun_core::edge::forwarded`]); from anyone else they are replaced.
    pub trusted_proxies: quictun_core::edge::forwarded::TrustedProxies,
    /// How many recent requests the admin endpoint's dashboard and `/api/requests` keep (with
    /// their headers, credentials redacted); 0 keeps none.
    pub inspect_capacity: usize,
}

impl Default for RelaySection {
    fn default() -> Self {
        Self {
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            https_listen: None,
            https_cert: None,
            https_key: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            grpc_listen: SocketAddr::from(([0, 0, 0, 0], 4434)),
            transport: TransportChoice::All,
            congestion: quictun_quic::Congestion::Bbr,
            log_format: quictun_core::config::LogFormat::Text,
            public_name: None,
            cert: PathBuf::from("certs/relay.crt"),
            key: PathBuf::from("certs/relay.key"),
            identity_named: false,
            heartbeat_interval_ms: 5_000,
            heartbeat_misses: 3,
            silence_check_ms: 1250,
            max_streams_per_agent: 1024,
            bulk_stream_percent: 75,
            max_instances_per_client: 16,
            max_egress_streams_per_agent: 16,
            stream_window: quictun_quic::Tuning::default().stream_window,
            connection_window: quictun_quic::Tuning::default().connection_window,
            stall_timeout_ms: 1000,
            max_stalled_bytes: quictun_core::stall::StallLimits::default().total,
            max_stalled_bytes_per_ip: quictun_core::stall::StallLimits::default().per_client,
            response_timeout_secs: 60,
            register_timeout_secs: 10,
            max_header_bytes: quictun_proto::limits::CLIENT_MAX_HEAD_BYTES,
            max_header_count: quictun_proto::limits::CLIENT_MAX_HEADERS,
            drain_timeout_secs: 30,
            header_read_timeout_secs: 10,
            keep_alive_timeout_secs: 75,
            stream_idle_timeout_secs: 300,
            max_connections_per_ip: 256,
            max_connections: 0,
            max_requests_per_ip: 128,
            min_upload_rate: 1024,
            handshake_rate_per_ip: 10,
            handshake_burst_per_ip: 20,
            max_pending_connections: 512,
            max_pending_per_network: 32,
            handshake_timeout_ms: 3000,
            agent_networks_file: None,
            declared_tcp_address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            startup_grace_secs: 10,
            admin_token: None,
            admin_token_file: None,
            trusted_proxies: Default::default(),
            inspect_capacity: 1000,
        }
    }
}

/// The transports a relay listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC and gRPC.
    All,
    /// QUIC only.
    Quic,
    /// gRPC only.
    Grpc,
}

impl TransportChoice {
    /// Whether QUIC agents are served.
    pub fn quic(self) -> bool {
        self != Self::Grpc
    }

    /// Whether gRPC agents are served.
    pub fn grpc(self) -> bool {
        self != Self::Quic
    }
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "quic" => Ok(Self::Quic),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!("unknown transport {other:?} (all, quic, grpc)")),
        }
    }
}

/// A configuration key and what is wrong with its value.
type Invalid = (String, String);

impl RelaySection {
    /// Checks the `[relay]` section's values against each other and the tunnel's limits.
    fn check(&self) -> Result<(), Invalid> {
        let invalid = |key: &str, message: String| Err((format!("relay.{key}"), message));
        if self.heartbeat_interval_ms < 50 {
            return invalid("heartbeat_interval_ms", "must be at least 50".into());
        }
        if self.header_read_timeout_secs == 0 || self.keep_alive_timeout_secs == 0 {
            return invalid("header_read_timeout_secs", "timeouts must be at least 1 second".into());
        }
        if self.inspect_capacity > crate::inspect::MAX_CAPACITY {
            let why =
                format!("{} is over the most the relay keeps, {}", self.inspect_capacity, crate::inspect::MAX_CAPACITY);
            return invalid("inspect_capacity", why);
        }
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            return invalid("admin_token", "set one of admin_token, admin_token_file".into());
        }
        if self.https_cert.is_some() != self.https_key.is_some() {
            return invalid("https_cert", "set both https_cert and https_key, or neither".into());
        }
        let (max_count, max_bytes) =
            (quictun_proto::limits::CLIENT_MAX_HEADERS, quictun_proto::limits::CLIENT_MAX_HEAD_BYTES);
        if self.max_header_count > max_count {
            let why =
                format!("must be at most {max_count}: the tunnel carries that many plus the headers the relay adds");
            return invalid("max_header_count", why);
        }
        if self.max_header_bytes > max_bytes {
            let why = format!(
                "must be at most {max_bytes}: the tunnel carries heads that large plus the headers the relay adds"
            );
            return invalid("max_header_bytes", why);
        }
        if self.stream_window < 64 * 1024 || self.connection_window < self.stream_window.saturating_mul(2) {
            let why = "stream_window must be at least 65536 and connection_window at least twice it";
            return invalid("connection_window", why.into());
        }
        if self.stall_timeout_ms < 100 {
            return invalid("stall_timeout_ms", "must be at least 100".into());
        }
        if self.silence_check_ms != 0 && self.silence_check_ms < 250 {
            return invalid("silence_check_ms", "must be 0 (off) or at least 250: the check looks every 250 ms".into());
        }
        if self.max_instances_per_client == 0 {
            return invalid("max_instances_per_client", "must be at least 1".into());
        }
        if self.max_streams_per_agent == 0 {
            return invalid("max_streams_per_agent", "must be at least 1".into());
        }
        if self.handshake_timeout_ms < 100 {
            return invalid("handshake_timeout_ms", "must be at least 100".into());
        }
        if !(1..=100).contains(&self.bulk_stream_percent) {
            return invalid("bulk_stream_percent", "must be 1 to 100".into());
        }
        Ok(())
    }

    /// Streams of an agent that bulk exchanges may hold (see `bulk_stream_percent`), at least 1.
    pub fn max_bulk_streams(&self) -> u32 {
        let share = u64::from(self.max_streams_per_agent) * u64::from(self.bulk_stream_percent) / 100;
        u32::try_from(share).unwrap_or(u32::MAX).max(1)
    }

    /// How long a new agent connection has to complete its handshake.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.heartbeat_interval_ms))
    }

    /// How long a peer may stay silent before it is dropped.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_interval() * self.heartbeat_misses.max(1)
    }

    /// How long a QUIC agent may say nothing before it is suspected (`None`: never).
    pub fn silence_check(&self) -> Option<Duration> {
        (self.silence_check_ms > 0).then(|| Duration::from_millis(self.silence_check_ms))
    }

    /// The budgets for credit held by stalled readers.
    pub fn stall_limits(&self) -> quictun_core::stall::StallLimits {
        quictun_core::stall::StallLimits {
            stall_after: Duration::from_millis(self.stall_timeout_ms),
            per_connection: u64::from(self.connection_window / 2)
                .min(quictun_core::stall::StallLimits::default().per_connection),
            per_client: self.max_stalled_bytes_per_ip,
            total: self.max_stalled_bytes,
        }
    }
}

/// A `[[clients]]` entry: an agent identity allowed to connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientEntry {
    /// The agent's client_id.
    pub id: String,
    /// The token, inline.
    #[serde(default)]
    pub token: Option<Token>,
    /// The name of an environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file holding the token (surrounding whitespace is ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The group the client serves.
    pub group: String,
    /// Host patterns (`app.example.com`, `*.dev.example.com`) the client's agents may declare
    /// HTTP tunnels for; none: the client declares no HTTP tunnel.
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    /// Relay ports (`2222`, or `"7000-7099"`) the client's agents may declare TCP tunnels on;
    /// none: the client declares no TCP tunnel.
    #[serde(default)]
    pub allow_tcp_ports: Vec<PortSpec>,
}

/// A port or a range of ports, as `allow_tcp_ports` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    One(u16),
    /// `"A-B"` (both included), or one port as a string.
    Range(String),
}

impl PortSpec {
    /// The ports, or why this is not a port or a range of them.
    pub fn ports(&self) -> Result<std::ops::RangeInclusive<u16>, String> {
        let port = |text: &str| match text.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{text:?} is not a port (1-65535)")),
            Ok(port) => Ok(port),
        };
        match self {
            Self::One(0) => Err("0 is not a port (1-65535)".into()),
            Self::One(p) => Ok(*p..=*p),
            Self::Range(text) => match text.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (port(a)?, port(b)?);
                    if a > b {
                        return Err(format!("{text:?} ends before it starts"));
                    }
                    Ok(a..=b)
                }
                None => port(text).map(|p| p..=p),
            },
        }
    }
}

/// An `[[upstreams]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// Name used by routes and data streams.
    pub name: String,
    /// The group whose agents serve it.
    pub group: String,
    /// Base URLs as the agent sees them.
    pub targets: Vec<String>,
    /// How requests are spread over the group's agents: `round_robin` (default),
    /// `least_in_flight` or `hash` (sticky, on `hash_header`).
    #[serde(default)]
    pub balance: crate::balance::Balance,
    /// The request header whose value `hash` balancing hashes (for example a session cookie name
    /// or `x-user-id`).
    #[serde(default)]
    pub hash_header: Option<String>,
}

/// A `[[routes]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// Exact host, `*.example.com`, or `*` for any host.
    pub host: String,
    /// Path prefix; `/` matches everything.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// The upstream name.
    pub upstream: String,
    /// Requests in flight on this route at once; more are answered 503 (default: no limit).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Largest request body in bytes; larger ones are answered 413 (default: no limit).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// An htpasswd file of bcrypt entries (`htpasswd -B`): requests must carry one of its users
    /// (401 otherwise); re-read on reload.
    #[serde(default)]
    pub basic_auth_file: Option<PathBuf>,
    /// The realm of the `WWW-Authenticate` challenge (default `quictun`).
    #[serde(default)]
    pub basic_auth_realm: Option<String>,
    /// Only these addresses and networks may use the route (403 otherwise).
    #[serde(default)]
    pub allow_ips: Vec<String>,
    /// These may not (403), whatever `allow_ips` says.
    #[serde(default)]
    pub deny_ips: Vec<String>,
    /// Requests a second one client address may send on the route (429 beyond).
    #[serde(default)]
    pub rate_limit_per_ip: Option<f64>,
    /// Requests one address may send at once above the rate (default: one second's worth).
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    /// Headers set on the request to the upstream, replacing the client's (`{ "x-env" = "prod" }`).
    #[serde(default)]
    pub request_headers_set: std::collections::BTreeMap<String, String>,
    /// Headers removed from the request to the upstream.
    #[serde(default)]
    pub request_headers_remove: Vec<String>,
    /// Headers set on the response to the client, replacing the upstream's.
    #[serde(default)]
    pub response_headers_set: std::collections::BTreeMap<String, String>,
    /// Headers removed from the response to the client.
    #[serde(default)]
    pub response_headers_remove: Vec<String>,
}

fn default_prefix() -> String {
    "/".to_owned()
}

impl RelayConfig {
    /// Reads and validates a configuration file. Relative paths in it (`cert`, `key`,
    /// `https_cert`, `https_key`, `admin_token_file`, a client's `token_file`, and the default
    /// `certs/relay.crt` and `certs/relay.key`) are taken against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
        let mut config: Self = parse_toml(&text, path)?;
        let table: toml::Table = parse_toml(&text, path)?;
        let relay = table.get("relay").and_then(toml::Value::as_table);
        config.relay.identity_named = relay.is_some_and(|r| r.contains_key("cert") || r.contains_key("key"));
        config.resolve_paths(path);
        config.source = path.to_owned();
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, file: &Path) {
        use quictun_core::config::resolve_in_place;
        let r = &mut self.relay;
        for path in [&mut r.cert, &mut r.key] {
            resolve_in_place(file, path);
        }
        for path in [&mut r.https_cert, &mut r.https_key, &mut r.admin_token_file, &mut r.agent_networks_file]
            .into_iter()
            .flatten()
        {
            resolve_in_place(file, path);
        }
        if r.agent_networks_file.is_none() {
            r.agent_networks_file = Some(r.cert.with_file_name("agent-networks"));
        }
        for path in self.clients.iter_mut().filter_map(|c| c.token_file.as_mut()) {
            resolve_in_place(file, path);
        }
        for path in self.routes.iter_mut().filter_map(|r| r.basic_auth_file.as_mut()) {
            resolve_in_place(file, path);
        }
        if let Some(path) = self.cluster.as_mut().and_then(|c| c.token_file.as_mut()) {
            resolve_in_place(file, path);
        }
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = parse_toml(text, file)?;
        config.source = file.to_owned();
        config.validate(file)?;
        Ok(config)
    }

    /// Checks what the file alone decides: ranges, pairs of keys, unique ids and names. What
    /// needs more (tokens, targets, route references) is checked when the configuration is
    /// compiled, once.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let checks = [
            self.relay.check(),
            self.check_clients(),
            self.check_upstreams(),
            self.check_routes(),
            self.check_tcp(),
            self.check_udp(),
            self.cluster.as_ref().map_or(Ok(()), ClusterSection::check),
        ];
        match checks.into_iter().find_map(Result::err) {
            Some((key, message)) => Err(ConfigError::invalid(file, key, message)),
            None => Ok(()),
        }
    }

    fn check_clients(&self) -> Result<(), Invalid> {
        for (i, client) in self.clients.iter().enumerate() {
            if self.clients[..i].iter().any(|c| c.id == client.id) {
                return Err((format!("clients[{i}].id"), format!("duplicate client id {:?}", client.id)));
            }
            for (j, pattern) in client.allow_hosts.iter().enumerate() {
                if let Err(err) = crate::hosts::HostMatch::parse_pattern(pattern) {
                    return Err((format!("clients[{i}].allow_hosts[{j}]"), err));
                }
            }
            for (j, ports) in client.allow_tcp_ports.iter().enumerate() {
                if let Err(err) = ports.ports() {
                    return Err((format!("clients[{i}].allow_tcp_ports[{j}]"), err));
                }
            }
        }
        Ok(())
    }

    /// Upstreams: unique names, and targets the agents can use (`http://` or `h2c://`), checked
    /// here so that a bad one is refused at start and on reload, not found by the agent.
    fn check_upstreams(&self) -> Result<(), Invalid> {
        for (i, upstream) in self.upstreams.iter().enumerate() {
            if self.upstreams[..i].iter().any(|u| u.name == upstream.name) {
                return Err((format!("upstreams[{i}].name"), format!("duplicate upstream {:?}", upstream.name)));
            }
            if upstream.targets.is_empty() {
                return Err((format!("upstreams[{i}].targets"), "needs at least one target".into()));
            }
            for (j, target) in upstream.targets.iter().enumerate() {
                if let Err(err) = quictun_core::upstream_http::Target::parse(target) {
                    return Err((format!("upstreams[{i}].targets[{j}]"), err.to_string()));
                }
            }
        }
        Ok(())
    }

    fn check_tcp(&self) -> Result<(), Invalid> {
        for (i, entry) in self.tcp.iter().enumerate() {
            if entry.max_connections == 0 {
                return Err((format!("tcp[{i}].max_connections"), "must be at least 1".into()));
            }
            if entry.max_connections_per_ip == 0 {
                return Err((format!("tcp[{i}].max_connections_per_ip"), "must be at least 1".into()));
            }
        }
        Ok(())
    }

    fn check_udp(&self) -> Result<(), Invalid> {
        for (i, entry) in self.udp.iter().enumerate() {
            let at_least_one = [
                ("idle_timeout_secs", entry.idle_timeout_secs as usize),
                ("max_flows", entry.max_flows),
                ("max_flows_per_agent", entry.max_flows_per_agent),
                ("queue_datagrams", entry.queue_datagrams),
            ];
            if let Some((key, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
                return Err((format!("udp[{i}].{key}"), "must be at least 1".into()));
            }
            if entry.proxy_protocol == Some(ProxyProtocol::V1) {
                return Err((format!("udp[{i}].proxy_protocol"), "UDP takes \"v2\" only (v1 names TCP)".into()));
            }
        }
        Ok(())
    }

    fn check_routes(&self) -> Result<(), Invalid> {
        for (i, route) in self.egress_routes.iter().enumerate() {
            if route.host.trim().is_empty() {
                return Err((format!("egress_routes[{i}].host"), "must not be empty".into()));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.max_in_flight == Some(0) {
                return Err((format!("routes[{i}].max_in_flight"), "must be at least 1".into()));
            }
            if !route.path_prefix.starts_with('/') {
                return Err((format!("routes[{i}].path_prefix"), "must start with /".into()));
            }
        }
        Ok(())
    }

    /// The admin endpoint's bearer token, inline or from its file (read now).
    pub fn admin_token(&self) -> Result<Option<Token>, ConfigError> {
        let sources = SecretSources {
            key: "admin_token",
            inline: self.relay.admin_token.as_ref(),
            env: None,
            file: self.relay.admin_token_file.as_deref(),
        };
        sources.resolve().map_err(|e| ConfigError::invalid(&self.source, format!("relay.{}", e.key), e.message))
    }

    /// The cluster's secret, inline or from its file (read now), when the relay is in a cluster.
    pub fn cluster_token(&self) -> Result<Option<Token>, ConfigError> {
        let Some(cluster) = &self.cluster else { return Ok(None) };
        let sources = SecretSources {
            key: "token",
            inline: cluster.token.as_ref(),
            env: None,
            file: cluster.token_file.as_deref(),
        };
        let invalid =
            |key: &str, message: String| ConfigError::invalid(&self.source, format!("cluster.{key}"), message);
        match sources.resolve() {
            Ok(Some(token)) if token.expose().len() >= 16 => Ok(Some(token)),
            Ok(Some(_)) => Err(invalid("token_file", "the secret needs at least 16 characters".into())),
            Ok(None) => Err(invalid("token", "set token or token_file".into())),
            Err(e) => Err(invalid(&e.key, e.message)),
        }
    }

    /// The token of client `i`: inline, from its environment variable, or from its file (read
    /// now); exactly one must be set.
    pub fn client_token(&self, i: usize) -> Result<Token, ConfigError> {
        let client = &self.clients[i];
        let sources = SecretSources {
            key: "token",
            inline: client.token.as_ref(),
            env: client.token_env.as_deref(),
            file: client.token_file.as_deref(),
        };
        let invalid =
            |key: &str, message: String| ConfigError::invalid(&self.source, format!("clients[{i}].{key}"), message);
        match sources.resolve() {
            Ok(Some(token)) => Ok(token),
            Ok(None) => Err(invalid("token", "missing token, token_env or token_file".into())),
            Err(e) => Err(invalid(&e.key, e.message)),
        }
    }

    /// The `[relay]` keys whose values differ from `running`'s (they take effect only after a
    /// restart), in the file's order of fields.
    pub fn relay_keys_changed(&self, running: &RelaySection) -> Vec<String> {
        let mut changed = changed_fields(&format!("{running:#?}"), &format!("{:#?}", self.relay));
        let token = |t: &Option<Token>| t.as_ref().map(|t| t.expose().to_owned());
        if token(&running.admin_token) != token(&self.relay.admin_token) && !changed.iter().any(|k| k == "admin_token")
        {
            changed.push("admin_token".into());
        }
        changed
    }

    /// An error about `key` of this configuration's file.
    pub fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::invalid(&self.source, key, message)
    }
}

/// The top-level fields whose values differ between two pretty `Debug` renderings of one
/// struct (a field is the line at the first indentation and the deeper lines after it).
fn changed_fields(old: &str, new: &str) -> Vec<String> {
    fn fields(text: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in text.lines() {
            let top = line.strip_prefix("    ").filter(|l| !l.starts_with(' '));
            match (top.and_then(|l| l.split_once(": ")), out.last_mut()) {
                (Some((name, value)), _) => out.push((name.to_owned(), value.to_owned())),
                (None, Some((_, value))) => value.push_str(line),
                (None, None) => {}
            }
        }
        out
    }
    let old = fields(old);
    fields(new).into_iter().filter(|field| !old.contains(field)).map(|(name, _)| name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_names_the_relay_keys_that_need_a_restart() {
        let parse = |text: &str| RelayConfig::parse(text, Path::new("r.toml")).unwrap();
        let running = parse("[relay]\nhttp_listen = \"127.0.0.1:8080\"\n").relay;
        assert!(parse("[relay]\nhttp_listen = \"127.0.0.1:8080\"\n").relay_keys_changed(&running).is_empty());
        let new = parse(
            "[relay]\nhttp_listen = \"127.0.0.1:8081\"\nmax_streams_per_agent = 7\nadmin_token = \"t\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n",
        );
        let mut changed = new.relay_keys_changed(&running);
        changed.sort();
        assert_eq!(changed, ["admin_token", "http_listen", "max_streams_per_agent", "trusted_proxies"]);
    }

    #[test]
    fn tokens_come_from_exactly_one_source_including_a_file() {
        let dir = std::env::temp_dir().join(format!("quictun-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let text = format!("[[clients]]\nid = \"a\"\ngroup = \"g\"\ntoken_file = \"{}\"\n", file.display());
        let token = |text: &str| RelayConfig::parse(text, Path::new("r.toml")).unwrap().client_token(0);
        assert_eq!(token(&text).unwrap().expose(), "from-a-file");
        let both = format!("{text}token = \"x\"\n");
        assert!(token(&both).unwrap_err().to_string().contains("one of"));
        let missing = "[[clients]]\nid = \"a\"\ngroup = \"g\"\ntoken_file = \"/nonexistent/token\"\n";
        assert!(token(missing).unwrap_err().to_string().contains("clients[0].token_file"));
        let none = "[[clients]]\nid = \"a\"\ngroup = \"g\"\n";
        assert!(token(none).unwrap_err().to_string().contains("clients[0].token"));
        std::fs::write(&file, "  \n").unwrap();
        assert!(token(&text).unwrap_err().to_string().contains("empty"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_example_config_parses() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/relay.toml"));
        let config = RelayConfig::load(path).unwrap();
        assert!(!config.routes.is_empty());
        // The identity lives beside the file, wherever the relay is started from.
        assert_eq!(config.relay.cert, path.parent().unwrap().join("certs/relay.crt"));
        assert!(!config.relay.identity_named, "the example leaves the identity to be generated");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = RelayConfig::parse("[relay]\nquic_listn = \"0.0.0.0:1\"\n", Path::new("r.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("r.toml") && text.contains("quic_listn"), "{text}");
    }

    #[test]
    fn header_limits_beyond_what_the_tunnel_carries_are_refused() {
        let err = RelayConfig::parse("[relay]\nmax_header_count = 500\n", Path::new("r.toml")).unwrap_err();
        assert!(err.to_string().contains("relay.max_header_count"), "{err}");
        let err = RelayConfig::parse("[relay]\nmax_header_bytes = 1000000\n", Path::new("r.toml")).unwrap_err();
        assert!(err.to_string().contains("relay.max_header_bytes"), "{err}");
    }

    #[test]
    fn a_cluster_section_is_checked_key_by_key() {
        let ok = "[cluster]\nrelay_id = \"relay-1\"\netcd = [\"127.0.0.1:2379\"]\nadvertise = \"relay-1.example:4433\"\n\
                  token = \"0123456789abcdef\"\n";
        let config = RelayConfig::parse(ok, Path::new("r.toml")).unwrap();
        assert_eq!(config.cluster_token().unwrap().map(|t| t.expose().to_owned()).as_deref(), Some("0123456789abcdef"));
        let cluster = config.cluster.unwrap();
        assert_eq!((cluster.prefix.as_str(), cluster.lease_ttl_secs), ("/quictun/", 10));
        assert_eq!(cluster.max_streams_per_peer, 1024);
        for (edit, key) in [
            (ok.replace("relay-1\"\netcd", "relay 1\"\netcd"), "cluster.relay_id"),
            (ok.replace("[\"127.0.0.1:2379\"]", "[]"), "cluster.etcd"),
            (ok.replace("relay-1.example:4433", "no-port"), "cluster.advertise"),
            (format!("{ok}lease_ttl_secs = 1\n"), "cluster.lease_ttl_secs"),
            (format!("{ok}prefix = \"quictun\"\n"), "cluster.prefix"),
            (format!("{ok}server_id = \"0x0102030405060708\"\n"), "cluster.server_id"),
            (ok.replace("token = \"0123456789abcdef\"\n", ""), "cluster.token"),
            (ok.replace("0123456789abcdef", "short"), "cluster.token"),
            (format!("{ok}token_file = \"secret\"\n"), "cluster.token"),
            (format!("{ok}max_streams_per_peer = 0\n"), "cluster.max_streams_per_peer"),
        ] {
            let err = RelayConfig::parse(&edit, Path::new("r.toml")).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let config =
            RelayConfig::parse("[relay]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\"]\n", Path::new("r.toml"))
                .unwrap();
        assert!(config.relay.trusted_proxies.contains("10.2.3.4".parse().unwrap()));
        assert!(!config.relay.trusted_proxies.contains("192.0.2.2".parse().unwrap()));
        let err = RelayConfig::parse("[relay]\ntrusted_proxies = [\"nope\"]\n", Path::new("r.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("trusted_proxies") && text.contains("nope"), "{text}");
    }

    #[test]
    fn dangling_route_is_named() {
        let text = "[[routes]]\nhost = \"a\"\nupstream = \"nope\"\n";
        let config = RelayConfig::parse(text, Path::new("r.toml")).unwrap();
        let err = crate::router::Router::new(&config).unwrap_err().to_string();
        assert!(err.contains("routes[0].upstream"), "{err}");
    }

    #[test]
    fn upstream_targets_and_the_silence_check_are_checked_where_they_are_written() {
        let validate = |text: &str| {
            let config = RelayConfig::parse(text, Path::new("r.toml"))?;
            config.validate(Path::new("r.toml"))
        };
        let upstream = |target: &str| {
            format!("[[upstreams]]\nname = \"app\"\ngroup = \"g\"\ntargets = [\"http://ok:1\", \"{target}\"]\n")
        };
        for bad in ["wss://app.internal:443", "app.internal:80", "ftp://x"] {
            let err = validate(&upstream(bad)).unwrap_err().to_string();
            assert!(err.contains("upstreams[0].targets[1]"), "{bad}: {err}");
        }
        assert!(validate(&upstream("h2c://grpc.internal:50051")).is_ok());
        assert!(validate(&upstream("https://app.internal:8443")).is_ok());
        let err = validate("[relay]\nsilence_check_ms = 100\n").unwrap_err().to_string();
        assert!(err.contains("relay.silence_check_ms") && err.contains("250 ms"), "{err}");
        let off = RelayConfig::parse("[relay]\nsilence_check_ms = 0\n", Path::new("r.toml")).unwrap();
        assert_eq!(off.relay.silence_check(), None);
    }

    #[test]
    fn stream_budgets_and_tcp_limits_have_defaults_and_are_checked() {
        let parse = |text: &str| RelayConfig::parse(text, Path::new("r.toml"));
        let defaults = parse("").unwrap();
        assert_eq!(defaults.relay.max_bulk_streams(), 768, "three quarters of 1024");
        let tcp = "[[tcp]]\nlisten = \"127.0.0.1:0\"\ngroup = \"g\"\nupstream = \"db:5432\"\n";
        let entry = parse(tcp).unwrap().tcp.remove(0);
        assert_eq!((entry.max_connections, entry.max_connections_per_ip), (512, 64));
        assert_eq!(entry.idle_timeout(), Some(Duration::from_secs(600)));
        let never = parse(&format!("{tcp}idle_timeout_secs = 0\n")).unwrap().tcp.remove(0);
        assert_eq!(never.idle_timeout(), None);
        let err = parse(&format!("{tcp}max_connections_per_ip = 0\n")).unwrap_err().to_string();
        assert!(err.contains("tcp[0].max_connections_per_ip"), "{err}");
        let err = parse("[relay]\nbulk_stream_percent = 0\n").unwrap_err().to_string();
        assert!(err.contains("relay.bulk_stream_percent"), "{err}");
        let all = parse("[relay]\nbulk_stream_percent = 100\nmax_streams_per_agent = 3\n").unwrap();
        assert_eq!(all.relay.max_bulk_streams(), 3);
    }
}
