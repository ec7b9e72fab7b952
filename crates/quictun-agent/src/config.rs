//! The agent's TOML configuration (`agent.toml`), parsed with unknown keys refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use quictun_core::config::ConfigError;

use quictun_proto::Token;
use serde::Deserialize;

/// The whole agent configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// Connection and identity.
    #[serde(default)]
    pub agent: AgentSection,
    /// Upstreams declared by the agent itself; they take precedence over pushed ones.
    #[serde(default)]
    pub upstreams: Vec<LocalUpstream>,
    /// Tunnels the agent declares: hosts and ports it asks the relay to send it, within its
    /// client's `allow_hosts` and `allow_tcp_ports` at the relay.
    #[serde(default)]
    pub tunnels: Vec<TunnelEntry>,
}

/// A `[[tunnels]]` entry (or a `--http` / `--tcp` flag).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TunnelEntry {
    /// `type = "http"`: HTTP(S) requests for a host go to a local service.
    Http(HttpTunnelEntry),
    /// `type = "tcp"`: connections to the relay's `remote_port` go to `target` (`host:port`).
    Tcp(TcpTunnelEntry),
}

/// A `type = "http"` tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTunnelEntry {
    /// The public host name.
    pub host: String,
    /// The local service's base URL (`http://`, `https://` or `h2c://`).
    pub target: String,
    /// For an `https://` target: trust these CAs (PEM) instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// For an `https://` target: the name its certificate must carry, when not the target's host.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// For an `https://` target: accept any certificate (development only; warned at start).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A `type = "tcp"` tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpTunnelEntry {
    /// The relay's port.
    pub remote_port: u16,
    /// The local service's `host:port`.
    pub target: String,
}

impl TunnelEntry {
    /// Parses a `--http HOST=URL` flag.
    pub fn http_flag(flag: &str) -> Result<Self, String> {
        match flag.split_once('=') {
            Some((host, target)) => {
                Ok(Self::Http(HttpTunnelEntry { host: host.into(), target: target.into(), ..Default::default() }))
            }
            None => Err(format!("--http {flag:?}: expected HOST=URL, as app.example.com=http://127.0.0.1:3000")),
        }
    }

    /// Parses a `--tcp PORT=HOST:PORT` flag.
    pub fn tcp_flag(flag: &str) -> Result<Self, String> {
        let usage = || format!("--tcp {flag:?}: expected PORT=HOST:PORT, as 2222=127.0.0.1:22");
        let (port, target) = flag.split_once('=').ok_or_else(usage)?;
        let remote_port = port.trim().parse().map_err(|_| usage())?;
        Ok(Self::Tcp(TcpTunnelEntry { remote_port, target: target.into() }))
    }
}

/// The agent's QUIC keep-alive by default (`agent.keep_alive_ms`): a PING when it has sent
/// nothing for this long. A restarted relay answers the first packet of a connection it lost with
/// a stateless reset, so this bounds how long an idle agent takes to notice the restart. It costs
/// an idle session 60 small PING packets a minute and the relay's ACKs of them, where 5 s cost 12.
pub const DEFAULT_KEEP_ALIVE_MS: u64 = 1000;

/// The agent's QUIC idle timeout by default (`agent.idle_timeout_ms`): a connection that hears
/// nothing for this long is dead. QUIC uses the smaller of the two ends' values, so this is the
/// relay's too. With the 1 s keep-alive (the relay ACKs each PING), a live peer is heard from
/// every second: the relay finds a dead agent within 2 s; the agent, whose timer restarts on its
/// next PING, finds a dead relay within 3 s. The relay's heartbeats took 15 s.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 2000;

/// The `[agent]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// The relay's `HOST:PORT` (UDP).
    pub relay: String,
    /// More relays (`HOST:PORT`); the agent keeps a connection to each, so one relay can go down
    /// without the service going dark.
    pub relays: Vec<String>,
    /// `auto` (QUIC, falling back to gRPC over TCP), `quic` or `grpc`.
    pub transport: Transport,
    /// The relay's gRPC `HOST:PORT` (TCP); by default the relay's host, port 4434.
    pub grpc_relay: Option<String>,
    /// QUIC congestion controller: `bbr` (default) or `cubic`.
    pub congestion: quictun_quic::Congestion,
    /// The relay certificate's pin, `sha256:<hex>`.
    pub pin: Option<String>,
    /// A CA bundle to verify the relay with, instead of a pin.
    pub ca: Option<PathBuf>,
    /// The TLS server name to verify (defaults to the host of `relay`).
    pub server_name: Option<String>,
    /// The agent's identity.
    pub client_id: String,
    /// The group to serve (empty: the one configured on the relay).
    pub group: String,
    /// The token, inline.
    pub token: Option<Token>,
    /// The name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// A file holding the token (surrounding whitespace is ignored).
    pub token_file: Option<PathBuf>,
    /// How the agent writes its log lines: `text` or `json`.
    pub log_format: quictun_core::config::LogFormat,
    /// The local UDP address to dial from (a wildcard of the relay's address family by default).
    pub bind: Option<SocketAddr>,
    /// When set, targets pushed by the relay are used only if their `host:port` is listed here
    /// (`"127.0.0.1:3000"`, or `"app.internal:*"` for any port). Local upstreams are always allowed.
    pub allowed_targets: Option<Vec<String>>,
    /// The CAs (PEM) `https://` targets pushed by the relay are verified with, instead of the
    /// system's.
    pub upstream_ca_file: Option<PathBuf>,
    /// Seconds to connect to an upstream.
    pub upstream_connect_timeout_secs: u64,
    /// Seconds to wait for an upstream's response head.
    pub upstream_response_timeout_secs: u64,
    /// Streams the relay may have open on this agent at once.
    pub max_concurrent_streams: u32,
    /// QUIC flow-control window of one stream, in bytes (what one request body may have in
    /// flight unread).
    pub stream_window: u32,
    /// QUIC flow-control window of the connection, in bytes; stalled readers may hold half of it.
    pub connection_window: u32,
    /// The most credit all stalled readers (upstreams that stopped reading an upload, egress
    /// clients that stopped reading an answer) may hold, in bytes; beyond it the longest-stalled
    /// are reset.
    pub max_stalled_bytes: u64,
    /// Seconds in-flight requests get to finish on shutdown.
    pub drain_timeout_secs: u64,
    /// A QUIC PING after this many milliseconds of sending nothing: the relay's silence check
    /// (`relay.silence_check_ms`) expects to hear from a live agent at least this often, and a
    /// restarted relay's stateless reset answers the first one.
    pub keep_alive_ms: u64,
    /// A QUIC connection that hears nothing for this many milliseconds is dead (QUIC uses the
    /// smaller of both ends' values, so this is the relay's too). Above `keep_alive_ms`.
    pub idle_timeout_ms: u64,
    /// TCP address of the agent's admin endpoint (`/healthz`, `/readyz`, `/metrics`, the
    /// traffic inspector at `/`); off when unset.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token required by the admin endpoint (all but `/healthz` and `/readyz`).
    pub admin_token: Option<Token>,
    /// HTTP requests the inspector keeps (while the admin endpoint is served); 0 keeps none.
    pub inspect_capacity: usize,
    /// The first bytes of each request and response body the inspector keeps; 0 keeps
    /// headers only (and replays only requests without a body).
    pub inspect_body_bytes: usize,
    /// TCP address of the egress listener: HTTP requests sent to it go through the relay, which
    /// forwards them by its `[[egress_routes]]` (QUIC transport); off when unset.
    pub egress_listen: Option<SocketAddr>,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            relay: String::new(),
            relays: Vec::new(),
            transport: Transport::Auto,
            grpc_relay: None,
            congestion: quictun_quic::Congestion::Bbr,
            pin: None,
            ca: None,
            server_name: None,
            client_id: String::new(),
            group: String::new(),
            token: None,
            token_env: None,
            token_file: None,
            log_format: quictun_core::config::LogFormat::Text,
            bind: None,
            allowed_targets: None,
            upstream_ca_file: None,
            upstream_connect_timeout_secs: 5,
            upstream_response_timeout_secs: 60,
            max_concurrent_streams: 1024,
            stream_window: quictun_quic::Tuning::default().stream_window,
            connection_window: quictun_quic::Tuning::default().connection_window,
            max_stalled_bytes: quictun_core::stall::StallLimits::default().total,
            drain_timeout_secs: 30,
            keep_alive_ms: DEFAULT_KEEP_ALIVE_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            admin_listen: None,
            admin_token: None,
            inspect_capacity: 100,
            inspect_body_bytes: 64 * 1024,
            egress_listen: None,
        }
    }
}

/// How the agent reaches the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QUIC; when its handshake does not complete in a few seconds, gRPC over TCP, re-probing QUIC
    /// in the background and moving back when it works.
    Auto,
    /// QUIC only.
    Quic,
    /// gRPC over TCP only.
    Grpc,
}

impl std::str::FromStr for Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!("unknown transport {other:?} (auto, quic, grpc)")),
        }
    }
}

/// An `[[upstreams]]` entry of the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalUpstream {
    /// The name routes refer to.
    pub name: String,
    /// Base URLs, tried in rotation.
    pub targets: Vec<String>,
    /// For `https://` targets: trust these CAs (PEM) instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// For `https://` targets: the name their certificates must carry, when not their hosts.
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// For `https://` targets: accept any certificate (development only; warned at start).
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl AgentConfigFile {
    /// Reads and parses a configuration file (validation happens once flags are merged).
    /// Relative paths in it (`ca`, `token_file`, `upstream_ca_file`, each `ca_file`) are taken
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
        let mut config: Self = quictun_core::config::parse_toml(&text, path)?;
        let tunnels = config.tunnels.iter_mut().filter_map(|t| match t {
            TunnelEntry::Http(http) => http.ca_file.as_mut(),
            TunnelEntry::Tcp(_) => None,
        });
        let upstreams = config.upstreams.iter_mut().filter_map(|u| u.ca_file.as_mut());
        let agent = [&mut config.agent.ca, &mut config.agent.token_file, &mut config.agent.upstream_ca_file];
        for file in agent.into_iter().flatten().chain(tunnels).chain(upstreams) {
            quictun_core::config::resolve_in_place(path, file);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_read_against_the_files_directory() {
        let dir = std::env::temp_dir().join(format!("quictun-agent-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        let text = "[agent]\nrelay = \"h:1\"\nclient_id = \"c\"\nca = \"ca.pem\"\ntoken_file = \"/abs/token\"\n";
        std::fs::write(&file, text).unwrap();
        let config = AgentConfigFile::load(&file).unwrap();
        assert_eq!(config.agent.ca, Some(dir.join("ca.pem")));
        assert_eq!(config.agent.token_file, Some(PathBuf::from("/abs/token")), "absolute paths stay");
        let _ = std::fs::remove_dir_all(dir);
    }
}
