//! Validated agent options, built from `agent.toml` and command-line flags.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use quictun_core::Trust;
use quictun_core::stall::StallLimits;
use quictun_proto::{HostPort, Limits, Token};
use quictun_quic::Tuning;

use quictun_core::config::SecretSources;

use crate::config::{AgentConfigFile, AgentSection, ConfigError, Transport};
use crate::tunnels::Tunnels;
use crate::upstreams::{LocalTargets, declared_target};

/// The environment variable consulted for the token when none is configured.
pub const TOKEN_ENV: &str = "QUICTUN_TOKEN";

/// Everything the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The relay's address (QUIC, UDP).
    pub relay: HostPort,
    /// How to reach the relay.
    pub transport: Transport,
    /// The relay's gRPC address (TCP).
    pub grpc_relay: HostPort,
    /// Longest a QUIC handshake may take (shorter in `auto` mode, to fall back quickly).
    pub quic_handshake_timeout: Duration,
    /// How often `auto` mode re-probes QUIC while on gRPC.
    pub quic_probe_interval: Duration,
    /// How the relay is verified.
    pub trust: Trust,
    /// TLS server name (host of `relay` by default).
    pub server_name: String,
    /// Identity.
    pub client_id: String,
    /// Group (empty: the relay's configured one).
    pub group: String,
    /// Secret.
    pub token: Token,
    /// Local UDP address (chosen from the relay's address family when `None`).
    pub bind: Option<SocketAddr>,
    /// The agent's own upstreams.
    pub local_upstreams: Vec<LocalTargets>,
    /// The tunnels it declares.
    pub tunnels: Tunnels,
    /// Allow list for pushed targets.
    pub allowed_targets: Option<Vec<String>>,
    /// The CAs pushed `https://` targets are verified with (the system's when `None`).
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream response-head timeout.
    pub response_timeout: Duration,
    /// Drain timeout on shutdown.
    pub drain_timeout: Duration,
    /// QUIC transport tuning.
    pub tuning: Tuning,
    /// Budgets for credit held by stalled readers.
    pub stall: StallLimits,
    /// Frame limits.
    pub limits: Limits,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// The admin endpoint's address, when it is served.
    pub admin_listen: Option<SocketAddr>,
    /// The admin endpoint's bearer token.
    pub admin_token: Option<Token>,
    /// Requests the inspector keeps (0 without an admin endpoint: nobody could look).
    pub inspect_capacity: usize,
    /// The bytes of each body the inspector keeps.
    pub inspect_body_bytes: usize,
    /// The egress listener's address, when it is served (see [`crate::egress::EgressServer`]).
    pub egress_listen: Option<SocketAddr>,
}

impl AgentOptions {
    /// Options for every relay of the configuration (`relay` and `relays`), one agent each; only
    /// the first serves the admin endpoint. `file` names the source in errors.
    pub fn for_each_relay(config: AgentConfigFile, file: &Path) -> Result<Vec<Self>, ConfigError> {
        let a = &config.agent;
        let relays: Vec<String> =
            std::iter::once(a.relay.clone()).chain(a.relays.iter().cloned()).filter(|r| !r.trim().is_empty()).collect();
        if relays.len() > 1 && a.grpc_relay.is_some() {
            let message = "set grpc_relay only with a single relay (each relay's is its host, port 4434)".into();
            return Err(ConfigError::Invalid { file: file.to_owned(), key: "agent.grpc_relay".into(), message });
        }
        if relays.len() <= 1 {
            return Ok(vec![Self::from_config(config, file)?]);
        }
        relays
            .into_iter()
            .enumerate()
            .map(|(i, relay)| {
                let mut one = config.clone();
                one.agent.relay = relay;
                one.agent.relays.clear();
                if i > 0 {
                    one.agent.admin_listen = None;
                    one.agent.egress_listen = None;
                }
                Self::from_config(one, file)
            })
            .collect()
    }

    /// Validates a merged configuration for its `relay`; `file` names the source in errors.
    pub fn from_config(config: AgentConfigFile, file: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::invalid(file, key, message);
        let a = &config.agent;
        let (relay, grpc_relay) = relay_addresses(a).map_err(|(key, message)| invalid(key, message))?;
        let tuning = tuning(a).map_err(|(key, message)| invalid(key, message))?;
        if a.client_id.trim().is_empty() {
            return Err(invalid("agent.client_id", "missing client id".into()));
        }
        if a.inspect_capacity > crate::inspect::MAX_CAPACITY {
            return Err(invalid("agent.inspect_capacity", format!("at most {}", crate::inspect::MAX_CAPACITY)));
        }
        if a.inspect_body_bytes > crate::inspect::MAX_BODY_BYTES {
            return Err(invalid("agent.inspect_body_bytes", format!("at most {}", crate::inspect::MAX_BODY_BYTES)));
        }
        let trust = trust(a).map_err(|(key, message)| invalid(key, message))?;
        let token = token(a).map_err(|(key, message)| invalid(&key, message))?;
        let local_upstreams = local_upstreams(&config).map_err(|(key, message)| invalid(&key, message))?;
        let tunnels = Tunnels::from_entries(&config.tunnels).map_err(|(key, message)| invalid(&key, message))?;
        let a = config.agent;
        let server_name = a.server_name.unwrap_or_else(|| relay.host().to_owned());
        Ok(Self {
            relay,
            transport: a.transport,
            grpc_relay,
            quic_handshake_timeout: match a.transport {
                Transport::Auto => Duration::from_secs(3),
                _ => Duration::from_secs(10),
            },
            quic_probe_interval: Duration::from_secs(30),
            trust,
            server_name,
            client_id: a.client_id,
            group: a.group,
            token,
            bind: a.bind,
            local_upstreams,
            tunnels,
            allowed_targets: a.allowed_targets,
            upstream_ca_file: a.upstream_ca_file,
            connect_timeout: Duration::from_secs(a.upstream_connect_timeout_secs.max(1)),
            response_timeout: Duration::from_secs(a.upstream_response_timeout_secs.max(1)),
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
            tuning,
            stall: StallLimits {
                per_connection: u64::from(a.connection_window / 2).min(StallLimits::default().per_connection),
                total: a.max_stalled_bytes,
                ..StallLimits::default()
            },
            limits: Limits::default(),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            admin_listen: a.admin_listen,
            admin_token: a.admin_token,
            inspect_capacity: if a.admin_listen.is_some() { a.inspect_capacity } else { 0 },
            inspect_body_bytes: a.inspect_body_bytes,
            egress_listen: a.egress_listen,
        })
    }
}

/// A configuration key and what is wrong with its value.
type Invalid<K = &'static str> = (K, String);

/// The relay's QUIC address and its gRPC one (by default the relay's host, port 4434).
fn relay_addresses(a: &AgentSection) -> Result<(HostPort, HostPort), Invalid> {
    if a.relay.trim().is_empty() {
        return Err(("agent.relay", "missing relay address (HOST:PORT)".into()));
    }
    let relay: HostPort = a.relay.parse().map_err(|e: quictun_proto::HostPortError| ("agent.relay", e.to_string()))?;
    let grpc_relay = match &a.grpc_relay {
        Some(text) => text.parse().map_err(|e: quictun_proto::HostPortError| ("agent.grpc_relay", e.to_string()))?,
        None => relay.with_port(DEFAULT_GRPC_PORT),
    };
    Ok((relay, grpc_relay))
}

/// The QUIC settings: windows, stream count, congestion controller, keep-alive and idle
/// timeout. A setting that cannot work is refused with the reason.
fn tuning(a: &AgentSection) -> Result<Tuning, Invalid> {
    if a.stream_window < 64 * 1024 || a.connection_window < a.stream_window.saturating_mul(2) {
        return Err((
            "agent.connection_window",
            "stream_window must be at least 65536 and connection_window at least twice it".into(),
        ));
    }
    if a.keep_alive_ms < 100 {
        return Err(("agent.keep_alive_ms", "must be at least 100".into()));
    }
    if a.keep_alive_ms >= a.idle_timeout_ms {
        return Err((
            "agent.keep_alive_ms",
            format!(
                "must be below idle_timeout_ms ({}): a keep-alive at or above the idle timeout lets an idle connection die",
                a.idle_timeout_ms
            ),
        ));
    }
    Ok(Tuning {
        max_concurrent_streams: a.max_concurrent_streams.max(1),
        congestion: a.congestion,
        stream_window: a.stream_window,
        connection_window: a.connection_window,
        keep_alive: Duration::from_millis(a.keep_alive_ms),
        idle_timeout: Duration::from_millis(a.idle_timeout_ms),
        ..Tuning::default()
    })
}

/// How the relay is verified: a pin or a CA file, one of them.
fn trust(a: &AgentSection) -> Result<Trust, Invalid> {
    match (&a.pin, &a.ca) {
        (Some(pin), None) => {
            Ok(Trust::Pin(pin.parse().map_err(|e: quictun_core::tls::TlsError| ("agent.pin", e.to_string()))?))
        }
        (None, Some(ca)) => Ok(Trust::CaFile(ca.clone())),
        (Some(_), Some(_)) => Err(("agent.pin", "set pin or ca, not both".into())),
        (None, None) => Err(("agent.pin", "missing pin (sha256:…) or ca file".into())),
    }
}

/// The token: inline, from an environment variable or a file, else `QUICTUN_TOKEN`.
fn token(a: &AgentSection) -> Result<Token, Invalid<String>> {
    let sources = SecretSources {
        key: "token",
        inline: a.token.as_ref(),
        env: a.token_env.as_deref(),
        file: a.token_file.as_deref(),
    };
    match sources.resolve().map_err(|e| (format!("agent.{}", e.key), e.message))? {
        Some(token) => Ok(token),
        // Nothing configured: the environment's QUICTUN_TOKEN.
        None => match std::env::var(TOKEN_ENV) {
            Ok(value) if !value.trim().is_empty() => Ok(Token::new(value.trim())),
            _ => Err(("agent.token".into(), format!("missing token (or token_env, token_file, or {TOKEN_ENV})"))),
        },
    }
}

/// The agent's own upstreams, their targets parsed (with their TLS keys).
fn local_upstreams(config: &AgentConfigFile) -> Result<Vec<LocalTargets>, Invalid<String>> {
    let mut local = Vec::with_capacity(config.upstreams.len());
    for (i, u) in config.upstreams.iter().enumerate() {
        let targets = u.targets.iter().map(|target| {
            let (ca, name) = (u.ca_file.as_deref(), u.tls_server_name.as_deref());
            declared_target(target, ca, name, u.insecure_skip_verify)
                .map_err(|(key, message)| (format!("upstreams[{i}].{key}"), message))
        });
        local.push(LocalTargets { name: u.name.clone(), targets: targets.collect::<Result<_, _>>()? });
    }
    Ok(local)
}

/// The relay's gRPC port when `grpc_relay` is not set.
pub const DEFAULT_GRPC_PORT: u16 = 4434;

/// A wildcard bind address in the relay's address family (IPv4 when it cannot be resolved yet).
pub async fn default_bind(relay: &HostPort) -> SocketAddr {
    let v6 = matches!(quictun_core::resolve(relay).await, Ok(SocketAddr::V6(_)));
    if v6 { SocketAddr::from(([0u16; 8], 0)) } else { SocketAddr::from(([0, 0, 0, 0], 0)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses_and_validates() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/agent.toml"));
        let mut file = AgentConfigFile::load(path).unwrap();
        // The pin is given on the command line (it is known once the relay has a certificate).
        file.agent.pin = Some(quictun_core::Pin::of(b"relay").to_string());
        let options = AgentOptions::from_config(file, path).unwrap();
        assert_eq!(options.server_name, "127.0.0.1");
    }

    #[test]
    fn missing_and_bad_values_name_the_key() {
        let parse = |text: &str| {
            let file: AgentConfigFile = toml::from_str(text).unwrap();
            AgentOptions::from_config(file, Path::new("a.toml")).unwrap_err().to_string()
        };
        let base = "relay = \"h:1\"\nclient_id = \"c\"\ntoken = \"t\"\n";
        assert!(parse(&format!("[agent]\n{base}")).contains("agent.pin"));
        assert!(parse(&format!("[agent]\n{base}pin = \"sha256:12\"\n")).contains("agent.pin"));
        assert!(parse("[agent]\nclient_id = \"c\"\n").contains("agent.relay"));
    }

    #[test]
    fn the_token_may_come_from_a_file() {
        let path = std::env::temp_dir().join(format!("quictun-agent-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let text = format!(
            "[agent]\nrelay = \"h:1\"\nclient_id = \"c\"\npin = \"{}\"\ntoken_file = \"{}\"\n",
            quictun_core::Pin::of(b"x"),
            path.display()
        );
        let file: AgentConfigFile = toml::from_str(&text).unwrap();
        assert_eq!(AgentOptions::from_config(file, Path::new("a.toml")).unwrap().token.expose(), "s3cret");
        let _ = std::fs::remove_file(&path);
        let file: AgentConfigFile = toml::from_str(&text).unwrap();
        let err = AgentOptions::from_config(file, Path::new("a.toml")).unwrap_err().to_string();
        assert!(err.contains("agent.token_file"), "{err}");
    }

    #[test]
    fn the_grpc_address_and_server_name_follow_the_relay_host() {
        for (relay, host, grpc) in [
            ("relay.example.com:4433", "relay.example.com", "relay.example.com:4434"),
            ("[::1]:4433", "::1", "[::1]:4434"),
        ] {
            let pin = quictun_core::Pin::of(b"x");
            let text = format!("[agent]\nrelay = \"{relay}\"\nclient_id = \"c\"\ntoken = \"t\"\npin = \"{pin}\"\n");
            let options = AgentOptions::from_config(toml::from_str(&text).unwrap(), Path::new("a.toml")).unwrap();
            assert_eq!((options.server_name.as_str(), options.grpc_relay.to_string()), (host, grpc.to_owned()));
        }
        let pin = quictun_core::Pin::of(b"x");
        let text = format!("[agent]\nrelay = \"relay\"\nclient_id = \"c\"\ntoken = \"t\"\npin = \"{pin}\"\n");
        let err = AgentOptions::from_config(toml::from_str(&text).unwrap(), Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("agent.relay"), "{err}");
    }

    #[test]
    fn the_keep_alive_and_the_idle_timeout_are_set_and_checked_against_each_other() {
        let pin = quictun_core::Pin::of(b"x");
        let options = |extra: &str| {
            let text = format!("[agent]\nrelay = \"h:1\"\nclient_id = \"c\"\ntoken = \"t\"\npin = \"{pin}\"\n{extra}");
            AgentOptions::from_config(toml::from_str(&text).unwrap(), Path::new("a.toml"))
        };
        let defaults = options("").unwrap().tuning;
        assert_eq!((defaults.keep_alive, defaults.idle_timeout), (Duration::from_secs(1), Duration::from_secs(2)));
        let set = options("keep_alive_ms = 300\nidle_timeout_ms = 900\n").unwrap().tuning;
        assert_eq!((set.keep_alive, set.idle_timeout), (Duration::from_millis(300), Duration::from_millis(900)));
        let err = options("keep_alive_ms = 2000\n").unwrap_err().to_string();
        assert!(err.contains("agent.keep_alive_ms") && err.contains("idle_timeout_ms (2000)"), "{err}");
        assert!(options("keep_alive_ms = 50\n").unwrap_err().to_string().contains("at least 100"));
    }
}
