//! Several relays: one agent configuration with two relays keeps a connection to each; when one
//! relay goes down the service stays reachable through the other.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use quictun_agent::config::{AgentConfigFile, AgentSection};
use quictun_agent::{Agent, AgentOptions, AgentState, Transport};
use quictun_proto::Token;
use quictun_relay::Relay;
use quictun_tests::harness::relay_config;
use quictun_tests::{Harness, HarnessConfig, HttpClient};

const WAIT: Duration = Duration::from_secs(20);

async fn one_relay_down_the_other_still_serves(transport: Transport) {
    let mut h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let any = "127.0.0.1:0".parse().unwrap();
    let second =
        Relay::start(relay_config(any, &h.upstream.url(), &h.config), h.cert.cert_key().unwrap()).await.unwrap();
    let file = AgentConfigFile {
        agent: AgentSection {
            relay: h.relay().quic_addr().expect("QUIC listener").to_string(),
            relays: vec![second.quic_addr().expect("QUIC listener").to_string()],
            transport,
            pin: Some(h.cert.pin.to_string()),
            client_id: "agent-1".into(),
            token: Some(Token::new("secret-1")),
            ..AgentSection::default()
        },
        upstreams: vec![],
        tunnels: vec![],
    };
    let mut options = AgentOptions::for_each_relay(file, Path::new("<test>")).unwrap();
    assert_eq!(options.len(), 2);
    // Each relay's gRPC listener is on a port of its own here (the configuration's default is the
    // relay's host, port 4434).
    for (options, relay) in options.iter_mut().zip([h.relay(), &second]) {
        options.grpc_relay = relay.grpc_addr().unwrap().into();
    }
    let mut agents = Vec::new();
    for options in options {
        let agent = Agent::start(options).await.unwrap();
        agent.wait_connected(None, WAIT).await.expect("agent did not connect");
        agents.push(agent);
    }
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    assert!(second.sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    for relay in [h.relay(), &second] {
        let session = relay.sessions().get("agent-1").unwrap();
        assert_eq!(session.tunnel.transport().as_str(), if transport == Transport::Grpc { "grpc" } else { "quic" });
    }
    let through_second = HttpClient::new(second.http_addr());
    assert_eq!(h.client.get("app.test", "/hello").await.text(), "hello");
    assert_eq!(through_second.get("app.test", "/hello").await.text(), "hello");

    // The first relay dies; the second keeps serving, and the agent keeps trying the first.
    h.take_relay().abort();
    let mut first_state = agents[0].state();
    tokio::time::timeout(WAIT, first_state.wait_for(|s| matches!(s, AgentState::Reconnecting { .. })))
        .await
        .expect("the agent did not notice the first relay going away")
        .unwrap();
    for _ in 0..10 {
        assert_eq!(through_second.get("app.test", "/hello").await.status, StatusCode::OK);
    }
    assert!(matches!(*agents[1].state().borrow(), AgentState::Connected { .. }));
    for agent in agents {
        agent.abort();
    }
}

quictun_tests::on_both_transports!(one_relay_down_the_other_still_serves);

#[test]
fn a_shared_grpc_relay_with_several_relays_is_refused() {
    let file = AgentConfigFile {
        agent: AgentSection {
            relay: "a.example:4433".into(),
            relays: vec!["b.example:4433".into()],
            grpc_relay: Some("a.example:4434".into()),
            pin: Some(format!("sha256:{}", "ab".repeat(32))),
            client_id: "x".into(),
            token: Some(Token::new("t")),
            ..AgentSection::default()
        },
        upstreams: vec![],
        tunnels: vec![],
    };
    let err = AgentOptions::for_each_relay(file, Path::new("a.toml")).unwrap_err().to_string();
    assert!(err.contains("agent.grpc_relay"), "{err}");
}
