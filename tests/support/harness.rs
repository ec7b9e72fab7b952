//! Starts a real relay (QUIC on 127.0.0.1:0, ingress on 127.0.0.1:0) with generated certificates,
//! and real agents that connect to it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quictun_agent::config::{AgentConfigFile, AgentSection};
use quictun_agent::{Agent, AgentOptions, Transport};
use quictun_core::tls::GeneratedCert;
use quictun_proto::Token;
use quictun_relay::config::{ClientEntry, EgressRouteEntry, RouteEntry, TcpEntry, UpstreamEntry};
use quictun_relay::{Balance, Relay, RelayConfig};

use crate::AgentPath;
use crate::client::HttpClient;
use crate::upstream::Upstream;

/// Clients known to the harness relay: `(client_id, token, group)`.
pub const CLIENTS: [(&str, &str, &str); 3] =
    [("agent-1", "secret-1", "web"), ("agent-2", "secret-2", "api"), ("agent-3", "secret-3", "web")];

/// An edit of the typed relay configuration the harness builds (limits, extra routes, egress
/// routes): the way a test changes what it needs, with the compiler checking the keys.
pub type RelayEdit = Arc<dyn Fn(&mut RelayConfig) + Send + Sync>;

/// Knobs of the harness relay.
#[derive(Clone)]
pub struct HarnessConfig {
    pub max_streams_per_agent: u32,
    pub response_timeout_secs: u64,
    pub heartbeat_interval_ms: u32,
    /// Overrides the target of the `app` upstream (for example: a closed port).
    pub app_target: Option<String>,
    /// The transport the harness's agents use.
    pub transport: Transport,
    /// `host:port` targets of `[[tcp]]` tunnels (group `web`, listening on 127.0.0.1:0).
    pub tcp_upstreams: Vec<String>,
    /// Applied last to the configuration the harness built.
    pub edit: RelayEdit,
}

impl Default for HarnessConfig {
    fn default() -> Self {
        Self {
            max_streams_per_agent: 1024,
            response_timeout_secs: 30,
            heartbeat_interval_ms: 200,
            app_target: None,
            transport: Transport::Quic,
            tcp_upstreams: Vec::new(),
            edit: Arc::new(|_| {}),
        }
    }
}

impl HarnessConfig {
    /// The default knobs, with `edit` applied to the relay configuration.
    pub fn with_relay(edit: impl Fn(&mut RelayConfig) + Send + Sync + 'static) -> Self {
        Self { edit: Arc::new(edit), ..Self::default() }
    }
}

/// A relay, an upstream, and helpers to start agents.
pub struct Harness {
    relay: Option<Relay>,
    pub upstream: Upstream,
    pub cert: GeneratedCert,
    pub client: HttpClient,
    pub config: HarnessConfig,
}

/// The relay configuration: routes `app.test` and `*.wild.test` → `app` (group web), `api.test` →
/// `api` (group api), `nobody.test` → `ghost` (group with no agents), `limited.test` → `app` with
/// at most 2 requests in flight and 4096-byte bodies.
pub fn relay_config(quic: SocketAddr, upstream: &str, cfg: &HarnessConfig) -> RelayConfig {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    relay_config_on(Listen { quic, grpc: any, http: any }, upstream, cfg)
}

/// The addresses a relay listens on.
#[derive(Debug, Clone, Copy)]
pub struct Listen {
    pub quic: SocketAddr,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

/// [`relay_config`] on the given listeners.
pub fn relay_config_on(listen: Listen, upstream: &str, cfg: &HarnessConfig) -> RelayConfig {
    let Listen { quic, grpc, http } = listen;
    let app = cfg.app_target.clone().unwrap_or_else(|| upstream.to_owned());
    let mut config = RelayConfig::default();
    let relay = &mut config.relay;
    relay.quic_listen = quic;
    relay.http_listen = http;
    relay.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    relay.grpc_listen = grpc;
    relay.heartbeat_interval_ms = cfg.heartbeat_interval_ms;
    relay.max_streams_per_agent = cfg.max_streams_per_agent;
    relay.response_timeout_secs = cfg.response_timeout_secs;
    relay.drain_timeout_secs = 5;
    // Tests expect 502 at once when no agent is connected.
    relay.startup_grace_secs = 0;
    config.clients = CLIENTS
        .iter()
        .map(|(id, token, group)| ClientEntry {
            id: (*id).to_owned(),
            token: Some(Token::new(*token)),
            token_env: None,
            token_file: None,
            group: (*group).to_owned(),
            allow_hosts: vec![],
            allow_tcp_ports: vec![],
        })
        .collect();
    let upstream_entry = |name: &str, group: &str, target: &str| UpstreamEntry {
        name: name.to_owned(),
        group: group.to_owned(),
        targets: vec![target.to_owned()],
        balance: Balance::default(),
        hash_header: None,
    };
    config.upstreams = vec![
        upstream_entry("app", "web", &app),
        upstream_entry("api", "api", upstream),
        upstream_entry("ghost", "nobody", upstream),
    ];
    config.routes = vec![
        route("app.test", "/", "app"),
        route("*.wild.test", "/", "app"),
        route("api.test", "/", "api"),
        route("nobody.test", "/", "ghost"),
        RouteEntry { max_in_flight: Some(2), max_body_bytes: Some(4096), ..route("limited.test", "/", "app") },
    ];
    config.tcp = cfg
        .tcp_upstreams
        .iter()
        .map(|upstream| {
            let upstream = upstream.parse().expect("tcp upstream is host:port");
            TcpEntry::new(SocketAddr::from(([127, 0, 0, 1], 0)), "web", upstream)
        })
        .collect();
    (cfg.edit)(&mut config);
    config.source = "<test>".into();
    config.validate(Path::new("<test>")).expect("harness configuration is valid");
    config
}

/// A route for `host` and `path_prefix` to `upstream`, without limits.
pub fn route(host: &str, path_prefix: &str, upstream: &str) -> RouteEntry {
    RouteEntry {
        host: host.to_owned(),
        path_prefix: path_prefix.to_owned(),
        upstream: upstream.to_owned(),
        ..RouteEntry::default()
    }
}

/// An egress route for `host` to `target`, for `groups` (every group when empty).
pub fn egress_route(host: &str, target: &str, groups: &[&str]) -> EgressRouteEntry {
    EgressRouteEntry {
        host: host.to_owned(),
        path_prefix: "/".into(),
        target: target.to_owned(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

impl Harness {
    /// A relay with default knobs and no agents.
    pub async fn start() -> Self {
        Self::start_with(HarnessConfig::default()).await
    }

    /// A relay with the given knobs and no agents.
    pub async fn start_with(config: HarnessConfig) -> Self {
        crate::init_logging();
        let upstream = Upstream::start().await;
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let relay = Self::start_relay(&cert, &upstream, &config, SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let client = HttpClient::new(relay.http_addr());
        Self { relay: Some(relay), upstream, cert, client, config }
    }

    async fn start_relay(cert: &GeneratedCert, upstream: &Upstream, config: &HarnessConfig, quic: SocketAddr) -> Relay {
        Relay::start(relay_config(quic, &upstream.url(), config), cert.cert_key().unwrap()).await.unwrap()
    }

    /// The address agents of the harness's transport dial.
    pub fn agent_target(&self) -> SocketAddr {
        match self.config.transport {
            Transport::Grpc => self.relay().grpc_addr().expect("gRPC listener"),
            _ => self.relay().quic_addr().expect("QUIC listener"),
        }
    }

    /// The running relay.
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay is running")
    }

    /// Stops the relay (graceful drain) and starts a new one on the same ports with the same
    /// certificate.
    pub async fn restart_relay(&mut self) {
        let old = self.take_relay();
        let listen = Self::listeners_of(&old);
        old.shutdown().await;
        self.start_relay_on(listen).await;
    }

    /// Takes the running relay out of the harness (to shut it down or abort it).
    pub fn take_relay(&mut self) -> Relay {
        self.relay.take().expect("relay is running")
    }

    /// The listeners of a relay, to start its successor on.
    pub fn listeners_of(relay: &Relay) -> Listen {
        Listen {
            quic: relay.quic_addr().expect("QUIC listener"),
            grpc: relay.grpc_addr().expect("gRPC listener"),
            http: relay.http_addr(),
        }
    }

    /// Starts a relay on `listen` (after the previous one stopped) and points the client at it.
    pub async fn start_relay_on(&mut self, listen: Listen) {
        // quinn releases the UDP socket when its endpoint driver task next runs, just after the
        // last handle is dropped: give the runtime turns until the port is free (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let relay = loop {
            let config = relay_config_on(listen, &self.upstream.url(), &self.config);
            match Relay::start(config, self.cert.cert_key().unwrap()).await {
                Ok(relay) => break relay,
                Err(err) if std::time::Instant::now() < deadline && err.to_string().contains("in use") => {
                    tokio::task::yield_now().await;
                }
                Err(err) => panic!("relay restart on {listen:?}: {err}"),
            }
        };
        self.client = HttpClient::new(relay.http_addr());
        self.relay = Some(relay);
    }

    /// Options for an agent of [`CLIENTS`] with the right pin.
    pub fn agent_options(&self, client_id: &str) -> AgentOptions {
        let token = CLIENTS.iter().find(|c| c.0 == client_id).map_or("unknown", |c| c.1);
        self.agent_options_with(client_id, token, &self.cert.pin.to_string())
    }

    /// Options for any identity, token and pin, on the harness's transport.
    pub fn agent_options_with(&self, client_id: &str, token: &str, pin: &str) -> AgentOptions {
        let mut options = Self::options_for(self.relay().quic_addr().expect("QUIC listener"), client_id, token, pin);
        options.transport = self.config.transport;
        if let Some(grpc) = self.relay().grpc_addr() {
            options.grpc_relay = grpc.into();
        }
        options
    }

    /// Options for a QUIC agent dialing `relay`.
    pub fn options_for(relay: SocketAddr, client_id: &str, token: &str, pin: &str) -> AgentOptions {
        let file = AgentConfigFile {
            agent: AgentSection {
                relay: relay.to_string(),
                transport: Transport::Quic,
                pin: Some(pin.to_owned()),
                client_id: client_id.to_owned(),
                token: Some(Token::new(token)),
                ..AgentSection::default()
            },
            upstreams: vec![],
            tunnels: vec![],
        };
        let mut options = AgentOptions::from_config(file, Path::new("<test>")).unwrap();
        options.drain_timeout = Duration::from_secs(5);
        options
    }

    /// Starts an agent and waits until the relay has registered it.
    pub async fn agent(&self, client_id: &str) -> Agent {
        self.agent_with(self.agent_options(client_id)).await
    }

    /// Starts an agent with `options` and waits until the relay has registered it.
    pub async fn agent_with(&self, options: AgentOptions) -> Agent {
        let client_id = options.client_id.clone();
        let agent = Agent::start(options).await.unwrap();
        agent.wait_connected(None, Duration::from_secs(20)).await.expect("agent did not connect");
        assert!(
            self.relay().sessions().wait_until(Duration::from_secs(20), |s| s.get(&client_id).is_some()).await,
            "relay never registered {client_id}"
        );
        agent
    }

    /// Starts an agent (on the harness's transport) whose path to the relay goes through a
    /// forwarder the test controls, and waits until the relay has registered it.
    pub async fn agent_through_path(&self, client_id: &str) -> (Agent, AgentPath) {
        let path = AgentPath::start(self.config.transport, self.agent_target()).await;
        let mut options = self.agent_options(client_id);
        match self.config.transport {
            Transport::Grpc => options.grpc_relay = path.addr().into(),
            _ => options.relay = path.addr().into(),
        }
        (self.agent_with(options).await, path)
    }
}
