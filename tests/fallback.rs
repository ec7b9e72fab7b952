//! `--transport auto`: QUIC first; gRPC over TCP when the QUIC handshake does not complete; back
//! to QUIC when it works again. UDP is "blocked" by a forwarder that drops every datagram.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::StatusCode;
use quictun_agent::{Agent, Transport};
use quictun_tests::{Harness, UdpProxy};

const WAIT: Duration = Duration::from_secs(20);

fn transport_of(h: &Harness, client_id: &str) -> Option<&'static str> {
    h.relay().sessions().get(client_id).map(|s| s.tunnel.transport().as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_grpc_when_udp_is_blocked_and_moves_back_to_quic() {
    let h = Harness::start().await;
    let proxy = UdpProxy::start(h.relay().quic_addr().expect("QUIC listener")).await;
    proxy.blackhole();

    let mut options = Harness::options_for(proxy.addr, "agent-1", "secret-1", &h.cert.pin.to_string());
    options.transport = Transport::Auto;
    options.grpc_relay = h.relay().grpc_addr().unwrap().into();
    options.quic_handshake_timeout = Duration::from_millis(500);
    options.quic_probe_interval = Duration::from_millis(200);
    let agent = Agent::start(options).await.unwrap();

    let first = agent.wait_connected(None, WAIT).await.expect("agent did not fall back");
    assert!(h.relay().sessions().wait_until(WAIT, |_| transport_of(&h, "agent-1") == Some("grpc")).await);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);

    // UDP works again: the background probe succeeds and the agent moves back to QUIC.
    proxy.restore();
    let second = agent.wait_connected(Some(first), WAIT).await.expect("agent did not move back to QUIC");
    assert_ne!(first, second);
    assert!(h.relay().sessions().wait_until(WAIT, |_| transport_of(&h, "agent-1") == Some("quic")).await);
    assert_eq!(h.relay().sessions().len(), 1);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_prefers_quic_when_it_works() {
    let h = Harness::start().await;
    let mut options = h.agent_options("agent-1");
    options.transport = Transport::Auto;
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(None, WAIT).await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |_| transport_of(&h, "agent-1") == Some("quic")).await);
    agent.shutdown().await.unwrap();
}
