//! `quictun demo`: a relay, an agent and a small upstream on loopback, in one process, over a real
//! QUIC tunnel with a fresh certificate.

use std::path::Path;
use std::time::Duration;

use anyhow::anyhow;
use quictun_agent::config::{AgentConfigFile, AgentSection};
use quictun_agent::{Agent, AgentOptions};
use quictun_core::tls::GeneratedCert;
use quictun_proto::Token;
use quictun_relay::{Relay, RelayConfig};
use tokio_util::sync::CancellationToken;

use crate::Failure;
use crate::cli::DemoArgs;
use crate::demo_upstream;

fn relay_config(
    args: &DemoArgs,
    http_listen: std::net::SocketAddr,
    upstream: std::net::SocketAddr,
    token: &str,
) -> Result<RelayConfig, Failure> {
    let text = format!(
        "[relay]\nquic_listen = \"{quic}\"\nhttp_listen = \"{http_listen}\"\nadmin_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\ntransport = \"quic\"\ndrain_timeout_secs = 2\n\
         [[clients]]\nid = \"demo\"\ntoken = \"{token}\"\ngroup = \"demo\"\n\
         [[upstreams]]\nname = \"demo\"\ngroup = \"demo\"\ntargets = [\"http://{upstream}\"]\n\
         [[routes]]\nhost = \"*\"\npath_prefix = \"/\"\nupstream = \"demo\"\n",
        quic = args.quic_listen,
    );
    RelayConfig::parse(&text, Path::new("<demo>")).map_err(Failure::runtime)
}

/// A free address: `wanted` if it can be bound, else the same IP with port 0.
async fn free_http_addr(wanted: std::net::SocketAddr) -> std::net::SocketAddr {
    match tokio::net::TcpListener::bind(wanted).await {
        Ok(listener) => listener.local_addr().unwrap_or(wanted),
        Err(_) => std::net::SocketAddr::new(wanted.ip(), 0),
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let stop = CancellationToken::new();
    let upstream_listener = demo_upstream::bind(args.upstream_listen).await.map_err(Failure::runtime)?;
    let upstream_addr = upstream_listener.local_addr().map_err(Failure::runtime)?;
    tokio::spawn(demo_upstream::serve(upstream_listener, None, stop.clone()));

    let token = format!("demo-{:016x}", fastrand::u64(..));
    let http_listen = free_http_addr(args.http_listen).await;
    let config = relay_config(&args, http_listen, upstream_addr, &token)?;
    let cert = GeneratedCert::self_signed(&[]).map_err(Failure::runtime)?;
    let relay = Relay::start(config, cert.cert_key().map_err(Failure::runtime)?).await.map_err(Failure::runtime)?;

    let quic = relay.quic_addr().ok_or_else(|| Failure::runtime(anyhow!("the demo relay serves no QUIC")))?;
    let agent_file = AgentConfigFile {
        agent: AgentSection {
            relay: quic.to_string(),
            pin: Some(cert.pin.to_string()),
            client_id: "demo".into(),
            token: Some(Token::new(token)),
            ..AgentSection::default()
        },
        upstreams: vec![],
        tunnels: vec![],
    };
    let options = AgentOptions::from_config(agent_file, Path::new("<demo>")).map_err(Failure::runtime)?;
    let agent = Agent::start(options).await.map_err(Failure::runtime)?;
    if agent.wait_connected(None, Duration::from_secs(10)).await.is_none() {
        return Err(Failure::runtime(anyhow!("the demo agent did not connect to the demo relay")));
    }
    let http = relay.http_addr();
    println!("quictun demo: relay, agent and upstream are running on loopback.");
    println!("  relay   QUIC udp://{quic}  HTTP http://{http}  pin {}", cert.pin);
    println!("  admin   http://{}/api/sessions", relay.admin_addr());
    println!("  agent   connected over QUIC, serving group \"demo\"");
    println!("  upstream http://{upstream_addr} (the agent's side of the tunnel)");
    println!();
    println!("Try it (the request crosses the QUIC tunnel):");
    println!("  curl -i http://{http}/");
    println!("  curl -s http://{http}/bytes/1048576 | wc -c");
    println!("  curl -s --data-binary @/etc/hostname http://{http}/echo");
    println!();
    println!("Press Ctrl-C to stop.");
    crate::signal::shutdown().await;
    agent.shutdown().await.map_err(Failure::runtime)?;
    relay.shutdown().await;
    stop.cancel();
    Ok(())
}
