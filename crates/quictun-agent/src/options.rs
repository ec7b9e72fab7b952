//! Validated agent options, built from `agent.toml` and command-line flags.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use quictun_core::Trust;
use quictun_core::stall::StallLimits;
use quictun_proto::{HostPort, Limits, Token};
use quictun_quic::Tuning;

use quictun_core::config::SecretSources;

use crate::config::{AgentConfigFile, ConfigError, Transport};
use crate::upstreams::{LocalTargets, Target};

/// The agent's QUIC keep-alive: a PING when it has sent nothing for this long. A restarted relay
/// answers the first packet of a connection it lost with a stateless reset, so this bounds how
/// long an idle agent takes to notice the restart. It costs an idle session 60 small PING packets a
/// minute and the relay's ACKs of them, where 5 s cost 12.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The agent's QUIC idle timeout: a connection that hears nothing for this long is dead. QUIC
/// uses the smaller of the two ends' values, so this is the relay's too. With the 1 s keep-alive
/// (the relay ACKs each PING), a live peer is heard from every second: the relay finds a dead
/// agent within 2 s; the agent, whose timer restarts on its next PING, finds a dead relay within
/// 3 s. The relay's heartbeats took 15 s.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Allow list for pushed targets.
    pub allowed_targets: Option<Vec<String>>,
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
        let invalid =
            |key: &str, message: String| ConfigError::Invalid { file: file.to_owned(), key: key.to_owned(), message };
        let a = config.agent;
        if a.relay.trim().is_empty() {
            return Err(invalid("agent.relay", "missing relay address (HOST:PORT)".into()));
        }
        let relay: HostPort =
            a.relay.parse().map_err(|e: quictun_proto::HostPortError| invalid("agent.relay", e.to_string()))?;
        let grpc_relay = match &a.grpc_relay {
            Some(text) => {
                text.parse().map_err(|e: quictun_proto::HostPortError| invalid("agent.grpc_relay", e.to_string()))?
            }
            None => relay.with_port(DEFAULT_GRPC_PORT),
        };
        if a.stream_window < 64 * 1024 || a.connection_window < a.stream_window.saturating_mul(2) {
            return Err(invalid(
                "agent.connection_window",
                "stream_window must be at least 65536 and connection_window at least twice it".into(),
            ));
        }
        if a.client_id.trim().is_empty() {
            return Err(invalid("agent.client_id", "missing client id".into()));
        }
        let trust = match (a.pin, a.ca) {
            (Some(pin), None) => {
                Trust::Pin(pin.parse().map_err(|e: quictun_core::tls::TlsError| invalid("agent.pin", e.to_string()))?)
            }
            (None, Some(ca)) => Trust::CaFile(ca),
            (Some(_), Some(_)) => return Err(invalid("agent.pin", "set pin or ca, not both".into())),
            (None, None) => return Err(invalid("agent.pin", "missing pin (sha256:…) or ca file".into())),
        };
        let sources = SecretSources {
            key: "token",
            inline: a.token.as_ref(),
            env: a.token_env.as_deref(),
            file: a.token_file.as_deref(),
        };
        let token = match sources.resolve().map_err(|e| invalid(&format!("agent.{}", e.key), e.message))? {
            Some(token) => token,
            // Nothing configured: the environment's QUICTUN_TOKEN.
            None => match std::env::var(TOKEN_ENV) {
                Ok(value) if !value.trim().is_empty() => Token::new(value.trim()),
                _ => {
                    return Err(invalid(
                        "agent.token",
                        format!("missing token (or token_env, token_file, or {TOKEN_ENV})"),
                    ));
                }
            },
        };
        let mut local_upstreams = Vec::with_capacity(config.upstreams.len());
        for (i, upstream) in config.upstreams.iter().enumerate() {
            let targets = upstream.targets.iter().map(|target| {
                Target::parse(target).map_err(|e| invalid(&format!("upstreams[{i}].targets"), e.to_string()))
            });
            local_upstreams
                .push(LocalTargets { name: upstream.name.clone(), targets: targets.collect::<Result<_, _>>()? });
        }
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
            allowed_targets: a.allowed_targets,
            connect_timeout: Duration::from_secs(a.upstream_connect_timeout_secs.max(1)),
            response_timeout: Duration::from_secs(a.upstream_response_timeout_secs.max(1)),
            drain_timeout: Duration::from_secs(a.drain_timeout_secs),
            tuning: Tuning {
                max_concurrent_streams: a.max_concurrent_streams.max(1),
                congestion: a.congestion,
                stream_window: a.stream_window,
                connection_window: a.connection_window,
                keep_alive: KEEP_ALIVE,
                idle_timeout: IDLE_TIMEOUT,
                ..Tuning::default()
            },
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
            egress_listen: a.egress_listen,
        })
    }
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
}
