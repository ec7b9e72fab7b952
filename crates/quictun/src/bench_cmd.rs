//! `quictun bench` and its helper `quictun bench-agents`.

use std::path::Path;
use std::time::Duration;

use quictun_agent::EgressServer;
use quictun_agent::config::{AgentConfigFile, AgentSection};
use quictun_agent::{Agent, AgentOptions};
use quictun_proto::Token;

use crate::Failure;
use crate::cli::{BenchAgentsArgs, BenchArgs, BenchFloorArgs, BenchProxyArgs, FloorTransport};

/// How long a benchmark egress request may wait for its answer's head.
const EGRESS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the benchmark and prints the Markdown table.
pub async fn run(args: BenchArgs) -> Result<(), Failure> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(Failure::usage(anyhow::anyhow!("--duration must be a positive number of seconds")));
    }
    let exe = std::env::current_exe().map_err(Failure::runtime)?;
    let mut headers = Vec::with_capacity(args.header.len());
    for header in &args.header {
        let parsed = header.split_once(':').and_then(|(name, value)| {
            let name = http::HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
            Some((name, http::HeaderValue::from_str(value.trim()).ok()?))
        });
        headers.push(parsed.ok_or_else(|| Failure::usage(anyhow::anyhow!("--header {header:?}: not NAME: VALUE")))?);
    }
    let options = quictun_bench::BenchOptions {
        exe,
        out: args.out.clone(),
        modes: args.transports,
        workloads: args.workloads,
        duration: Duration::from_secs_f64(args.duration),
        concurrency: args.concurrency,
        large_bytes: args.large_mib << 20,
        many_agents: args.many_agents.max(1),
        many_streams: args.many_streams.max(1),
        loss: args.loss,
        wan_bytes: args.wan_mib << 20,
        slow_clients: args.slow_clients,
        rate: args.rate,
        loss_everywhere: args.loss_everywhere,
        udp_rate: args.udp_rate.max(1),
        settings: quictun_bench::Settings {
            relay_toml: args.relay_toml.join("\n"),
            route_toml: args.route_toml.join("\n"),
            headers,
        },
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let report = quictun_bench::run(&options).await.map_err(Failure::runtime)?;
    println!("{}", report.markdown());
    println!("written to {}", args.out.display());
    Ok(())
}

/// Runs `count` agents in this process, on one shared QUIC endpoint, until Ctrl-C or SIGTERM.
pub async fn agents(args: BenchAgentsArgs) -> Result<(), Failure> {
    let mut agents = Vec::with_capacity(args.count);
    let mut endpoint = None;
    for i in 0..args.count {
        let file = AgentConfigFile {
            agent: AgentSection {
                relay: args.relay.clone(),
                grpc_relay: Some(args.grpc_relay.clone()),
                transport: args.transport,
                pin: Some(args.pin.clone()),
                client_id: format!("bench-{i}"),
                token: Some(Token::new("bench-token")),
                drain_timeout_secs: 1,
                ..AgentSection::default()
            },
            upstreams: vec![],
            tunnels: vec![],
        };
        let options = AgentOptions::from_config(file, Path::new("<bench-agents>")).map_err(Failure::usage)?;
        let shared = match &endpoint {
            Some(endpoint) => endpoint,
            None => {
                let bind = quictun_agent::default_bind(&options.relay).await;
                let created = quictun_quic::QuicEndpoint::bind(bind, &options.tuning).map_err(Failure::runtime)?;
                endpoint.insert(created)
            }
        };
        agents.push(Agent::start_on(options, shared.clone()).map_err(Failure::runtime)?);
    }
    let egress = match args.egress_listen {
        Some(listen) => {
            let relays = agents.iter().take(1).map(Agent::relay_tunnel).collect();
            Some(EgressServer::start(listen, relays, EGRESS_RESPONSE_TIMEOUT).await.map_err(Failure::runtime)?)
        }
        None => None,
    };
    crate::signal::shutdown().await;
    if let Some(egress) = egress {
        egress.shutdown().await;
    }
    for agent in agents {
        agent.abort();
    }
    Ok(())
}

/// Serves one transport's minimal exchange alone (see [`quictun_quic::floor`] and
/// [`quictun_grpc::floor`]) with the tunnel's TLS and transport settings until the process is
/// stopped.
pub async fn floor(args: BenchFloorArgs) -> Result<(), Failure> {
    let cert = quictun_core::tls::CertKey::load(&args.cert, &args.key).map_err(Failure::usage)?;
    match args.transport {
        FloorTransport::Grpc => {
            let answer = usize::try_from(args.answer)
                .ok()
                .filter(|&n| n <= quictun_grpc::messages::MAX_CHUNK)
                .ok_or_else(|| Failure::usage(anyhow::anyhow!("--answer: at most 65536 bytes for the gRPC floor")))?;
            let tls = quictun_core::tls::server_config_with_alpn(cert, b"h2").map_err(Failure::usage)?;
            let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(Failure::runtime)?;
            quictun_grpc::floor::serve(listener, std::sync::Arc::new(tls), answer).await;
        }
        FloorTransport::Quic => {
            let server = quictun_quic::floor::FloorServer::bind(args.listen, cert, &quictun_quic::Tuning::default())
                .map_err(Failure::runtime)?;
            server.serve(args.answer).await;
        }
    }
    Ok(())
}

/// Serves as a plain HTTP reverse proxy, or with `--splice` as a TCP splice, to one upstream (see
/// [`quictun_bench::http_floor`]) until the process is stopped.
pub async fn proxy(args: BenchProxyArgs) -> Result<(), Failure> {
    // The listen queue the relay's ingress has, as the proxy stands in its place.
    let listener = quictun_core::listen_tcp(args.listen).map_err(Failure::runtime)?;
    if args.splice {
        quictun_bench::http_floor::serve_splice(listener, args.upstream).await
    }
    quictun_bench::http_floor::serve_proxy(listener, args.upstream).await.map_err(Failure::usage)
}
