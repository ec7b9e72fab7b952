//! Command-line definitions (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// quictun: a QUIC-native reverse tunnel. Publish a private web service through a public relay;
/// every proxied request gets its own QUIC stream.
#[derive(Debug, Parser)]
#[command(name = "quictun", version, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr as text (coloured on a terminal, unless NO_COLOR is set) or as JSON,
    /// one object per line [default: the configuration file's log_format, else text].
    #[arg(long, global = true, value_enum, env = "QUICTUN_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for journald, Loki, Elasticsearch…).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay: QUIC listener for agents, HTTP ingress for the public.
    Relay(RelayArgs),
    /// Run an agent next to a private service; it dials the relay and serves its requests.
    Agent(AgentArgs),
    /// Generate certificates or print their pins.
    Cert {
        /// The certificate command.
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Relay, agent and a small upstream on loopback in one process; prints a curl line that works.
    Demo(DemoArgs),
    /// Serve the demo's upstream alone (for benchmarks): GET /, GET /headers, GET /bytes/N,
    /// GET /delay/MS, POST /echo, POST /sink.
    Upstream(UpstreamArgs),
    /// Compare the QUIC and gRPC transports (and no tunnel) with real processes; writes JSON,
    /// Markdown and SVG charts.
    Bench(BenchArgs),
    /// Print a shell completion script: `quictun completions bash > /etc/bash_completion.d/quictun`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff): `quictun man | man -l -`; `quictun man relay` (any
    /// subcommand) for its own, `quictun man config` for every configuration key.
    Man {
        /// A subcommand, or `config`.
        page: Option<String>,
    },
    /// Run many agents in one process (used by `bench`).
    #[command(hide = true)]
    BenchAgents(BenchAgentsArgs),
    /// Serve the minimal exchange of one transport alone (quinn, or tonic over TLS): the floor
    /// under the tunnel (used by `bench`).
    #[command(hide = true)]
    BenchFloor(BenchFloorArgs),
    /// Serve as a plain HTTP reverse proxy to one upstream: the HTTP floor under relay and agent
    /// (used by `bench`).
    #[command(hide = true)]
    BenchProxy(BenchProxyArgs),
}

/// Flags of `quictun bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Output folder for results.json, results.md and the SVG charts.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,
    /// Transports to compare (quic, grpc, direct), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "quic,grpc,direct")]
    pub transports: Vec<quictun_bench::Mode>,
    /// Workloads (small, floor, large, slow-mix, many, lossy, wan, grpc, egress, slow-clients,
    /// udp, cluster), comma-separated; `cluster` (not in the default set) needs `etcd`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "small,floor,slow-mix,large,many,lossy,wan,grpc,egress,slow-clients,udp"
    )]
    pub workloads: Vec<quictun_bench::Workload>,
    /// Length of each timed run, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Concurrency levels of the small workload, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    pub concurrency: Vec<usize>,
    /// Body size of the large workload, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub large_mib: u64,
    /// Agent sessions of the many workload.
    #[arg(long, default_value_t = 1000)]
    pub many_agents: usize,
    /// Concurrent streams of the many workload.
    #[arg(long, default_value_t = 10_000)]
    pub many_streams: usize,
    /// Loss percentages of the lossy workload, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,5")]
    pub loss: Vec<u32>,
    /// Body size of the wan workload's transfers, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 64)]
    pub wan_mib: u64,
    /// Non-reading clients of the slow-clients workload, comma-separated (one row each).
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    pub slow_clients: Vec<usize>,
    /// Fixed total request rate (requests/s, open loop) instead of as fast as possible.
    #[arg(long, value_name = "REQ_PER_SEC")]
    pub rate: Option<u64>,
    /// Apply the lossy workload's loss on every leg, not only between relay and agent.
    #[arg(long)]
    pub loss_everywhere: bool,
    /// Datagrams per second the udp workload sends (16 flows together), at no loss and at each
    /// --loss on the tunnel leg.
    #[arg(long, value_name = "PER_SEC", default_value_t = 10_000)]
    pub udp_rate: u64,
    /// A line added to the relay's `[relay]` section (repeatable), for an A/B of a setting:
    /// `--relay-toml 'inspect_capacity = 0'`.
    #[arg(long, value_name = "TOML")]
    pub relay_toml: Vec<String>,
    /// A line added to the benchmark's route (repeatable), for the cost of a policy:
    /// `--route-toml 'allow_ips = ["127.0.0.0/8"]'`.
    #[arg(long, value_name = "TOML")]
    pub route_toml: Vec<String>,
    /// A header every request of the load carries (repeatable), `NAME: VALUE`.
    #[arg(long, value_name = "HEADER")]
    pub header: Vec<String>,
}

/// Flags of `quictun bench-agents`.
#[derive(Debug, Args)]
pub struct BenchAgentsArgs {
    /// How many agents (client ids bench-0 … bench-N-1, token bench-token).
    #[arg(long)]
    pub count: usize,
    /// The relay's QUIC HOST:PORT.
    #[arg(long)]
    pub relay: String,
    /// The relay's gRPC HOST:PORT.
    #[arg(long)]
    pub grpc_relay: String,
    /// The relay's pin.
    #[arg(long)]
    pub pin: String,
    /// quic or grpc.
    #[arg(long)]
    pub transport: quictun_agent::Transport,
    /// Also serve egress requests on ADDR, sent through the first agent's connection.
    #[arg(long, value_name = "ADDR")]
    pub egress_listen: Option<std::net::SocketAddr>,
}

/// The transport whose bare exchange `quictun bench-floor` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorTransport {
    /// quinn alone, on UDP.
    Quic,
    /// tonic over HTTP/2 over TLS alone, on TCP.
    Grpc,
}

/// Flags of `quictun bench-floor`.
#[derive(Debug, Args)]
pub struct BenchFloorArgs {
    /// Address to serve on (UDP for quic, TCP for grpc).
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Which transport's floor to serve.
    #[arg(long, value_enum, default_value_t = FloorTransport::Quic)]
    pub transport: FloorTransport,
    /// The server certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Bytes in each answer (QUIC: streamed in 64 KiB chunks, any size; gRPC: one message, at
    /// most 64 KiB).
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub answer: u64,
}

/// Flags of `quictun bench-proxy`.
#[derive(Debug, Args)]
pub struct BenchProxyArgs {
    /// TCP address to serve on.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The HTTP/1 upstream every request goes to.
    #[arg(long, value_name = "ADDR")]
    pub upstream: SocketAddr,
    /// Copy each connection's bytes to a fresh upstream connection instead of proxying HTTP.
    #[arg(long)]
    pub splice: bool,
}

/// Flags of `quictun upstream`.
#[derive(Debug, Args)]
pub struct UpstreamArgs {
    /// TCP address to serve on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM), with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also echo UDP datagrams on this address (each back to its sender): an upstream for a
    /// `[[udp]]` tunnel.
    #[arg(long, value_name = "ADDR")]
    pub udp_echo: Option<SocketAddr>,
}

/// Flags of `quictun relay`; they override the configuration file.
#[derive(Debug, Args)]
#[command(override_usage = "quictun relay [--config <FILE>] [OPTIONS]")]
pub struct RelayArgs {
    /// Configuration file (TOML, see config/relay.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address for QUIC [default: 0.0.0.0:4433].
    #[arg(long, value_name = "ADDR")]
    pub quic_listen: Option<SocketAddr>,
    /// TCP address of the HTTP ingress [default: 0.0.0.0:8080].
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// TCP address of the HTTPS ingress (HTTP/2 and HTTP/1.1 over TLS) [default: off].
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Option<SocketAddr>,
    /// TCP address of the admin endpoint [default: 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// TCP address of the gRPC transport [default: 0.0.0.0:4434].
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// Transports to serve: all, quic or grpc [default: all].
    #[arg(long, value_name = "TRANSPORT")]
    pub transport: Option<quictun_relay::config::TransportChoice>,
    /// PEM certificate [default: certs/relay.crt]; generated with the key when both are missing.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// PEM private key [default: certs/relay.key].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// Flags of `quictun agent`; they override the configuration file.
#[derive(Debug, Clone, Args)]
#[command(override_usage = "quictun agent [--config <FILE>] [OPTIONS]")]
pub struct AgentArgs {
    /// Configuration file (TOML, see config/agent.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The relay's HOST:PORT (UDP); repeat it to keep a connection to each of several relays.
    #[arg(long, value_name = "HOST:PORT")]
    pub relay: Vec<String>,
    /// auto (QUIC, falling back to gRPC over TCP), quic or grpc [default: auto].
    #[arg(long, value_name = "TRANSPORT")]
    pub transport: Option<quictun_agent::Transport>,
    /// The relay's gRPC HOST:PORT (TCP) [default: the relay's host, port 4434].
    #[arg(long, value_name = "HOST:PORT")]
    pub grpc_relay: Option<String>,
    /// The relay certificate's pin: sha256:<64 hex digits>.
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "ca")]
    pub pin: Option<String>,
    /// Trust the relay by this CA bundle (PEM) instead of a pin.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This agent's client id.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// The group whose routes this agent serves.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// The client's token (prefer the QUICTUN_TOKEN environment variable: flags show in `ps`).
    #[arg(long, value_name = "TOKEN", env = "QUICTUN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve /healthz, /readyz and /metrics on this TCP address (off by default).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Take HTTP requests on this TCP address and send them out through the relay, which
    /// forwards them by its [[egress_routes]] (off by default).
    #[arg(long, value_name = "ADDR")]
    pub egress_listen: Option<SocketAddr>,
    /// Expose an HTTP service at a host name: HOST=URL, as app.example.com=http://127.0.0.1:3000
    /// (repeatable; the relay must allow the host in the client's allow_hosts).
    #[arg(long = "http", value_name = "HOST=URL")]
    pub http: Vec<String>,
    /// Expose a TCP service at a port of the relay: PORT=HOST:PORT, as 2222=127.0.0.1:22
    /// (repeatable; the relay must allow the port in the client's allow_tcp_ports).
    #[arg(long = "tcp", value_name = "PORT=HOST:PORT")]
    pub tcp: Vec<String>,
}

/// Certificate commands.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Write DIR/NAME.crt and DIR/NAME.key (self-signed) and print the pin.
    Gen(CertGenArgs),
    /// Print the pin of a PEM certificate.
    Pin(CertPinArgs),
}

/// Flags of `quictun cert gen`.
#[derive(Debug, Args)]
pub struct CertGenArgs {
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// File name stem.
    #[arg(long, value_name = "NAME", default_value = "relay")]
    pub name: String,
    /// Subject alternative name (DNS name or IP); repeatable [default: localhost, 127.0.0.1].
    #[arg(long = "san", value_name = "HOST")]
    pub sans: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `quictun cert pin`.
#[derive(Debug, Args)]
pub struct CertPinArgs {
    /// The PEM certificate.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

/// Flags of `quictun demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// TCP address of the demo's HTTP ingress (another free port is used if this one is taken).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// UDP address of the demo relay's QUIC listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub quic_listen: SocketAddr,
    /// TCP address of the built-in upstream.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub upstream_listen: SocketAddr,
}
