//! TLS session resumption and 0-RTT on the agent's reconnect, and why a replay of it is harmless:
//! real relay, real agent, real QUIC, with a UDP forwarder between them that can cut the path
//! and record what the agent sent.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::StatusCode;
use quictun_agent::Agent;
use quictun_tests::client::{admin_get, wait_for_metric};
use quictun_tests::{Harness, UdpProxy, metric};

const WAIT: Duration = Duration::from_secs(20);
const FULL: &str = "quictun_registrations_total{handshake=\"complete\"}";
const ZERO_RTT: &str = "quictun_registrations_total{handshake=\"zero_rtt\"}";
const PENDING: &str = "quictun_pending_agent_connections";
const UNCONFIRMED: &str = "quictun_rejects_total{reason=\"unconfirmed_0rtt\"}";

/// True when a datagram starts with a QUIC Initial packet (long header, type 0).
fn starts_with_initial(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|first| first & 0x80 != 0 && (first >> 4) & 0x03 == 0)
}

/// Cuts the path between `agent` and the relay until both ends have given the connection up.
async fn cut_until_lost(h: &Harness, proxy: &UdpProxy, agent: &Agent) {
    proxy.blackhole();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await, "the relay kept the lost session");
    let mut state = agent.state();
    let lost = state.wait_for(|s| !matches!(s, quictun_agent::AgentState::Connected { .. }));
    tokio::time::timeout(WAIT, lost).await.expect("the agent never noticed").unwrap();
}

/// A harness relay and agent-1 reaching it through a forwarder; returns them with its session.
async fn agent_through_a_forwarder() -> (Harness, UdpProxy, Agent, uuid::Uuid) {
    let h = Harness::start().await;
    let proxy = UdpProxy::start(h.relay().quic_addr().expect("QUIC listener")).await;
    let options = Harness::options_for(proxy.addr, "agent-1", "secret-1", &h.cert.pin.to_string());
    let agent = Agent::start(options).await.unwrap();
    let first = agent.wait_connected(None, WAIT).await.expect("agent did not connect");
    (h, proxy, agent, first)
}

async fn relay_metric(h: &Harness, sample: &str) -> Option<f64> {
    metric(&admin_get(h.relay().admin_addr(), "/metrics", None).await.text(), sample)
}

/// Waits until `sample` is at most `max`.
async fn wait_metric_at_most(h: &Harness, sample: &str, max: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut probe = tokio::time::interval(Duration::from_millis(20));
    loop {
        probe.tick().await;
        let value = relay_metric(h, sample).await;
        if value.is_some_and(|v| v <= max) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sample} stayed at {value:?}, above {max}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_registers_in_0rtt_and_a_replay_of_it_registers_nothing() {
    let (h, proxy, agent, first) = agent_through_a_forwarder().await;
    assert_eq!(relay_metric(&h, FULL).await, Some(1.0), "the first connection is a full handshake");

    // Cut the path until both ends have given the connection up, then heal it.
    cut_until_lost(&h, &proxy, &agent).await;
    proxy.record();
    proxy.restore();

    // The agent resumes its TLS session and sends register as 0-RTT data.
    agent.wait_connected(Some(first), WAIT).await.expect("agent did not reconnect");
    wait_for_metric(h.relay().admin_addr(), ZERO_RTT, 1.0, WAIT).await;
    assert_eq!(relay_metric(&h, FULL).await, Some(1.0), "the reconnect was a full handshake");
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);

    // An attacker on the path recorded the ClientHello and the 0-RTT register, and replays them
    // from elsewhere once that connection is gone (while it lives, the relay routes them to it).
    agent.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await);
    let replay: Vec<Vec<u8>> = proxy.recorded().into_iter().filter(|d| starts_with_initial(d)).collect();
    assert!(!replay.is_empty(), "the reconnect's Initial packets were not recorded");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // The relay takes the replayed connection in, and drops it when its handshake never completes.
    let mut resend = tokio::time::interval(Duration::from_millis(50));
    let taken_in = async {
        loop {
            resend.tick().await;
            for datagram in &replay {
                attacker.send_to(datagram, h.relay().quic_addr().expect("QUIC listener")).await.unwrap();
            }
            if relay_metric(&h, PENDING).await.is_some_and(|v| v >= 1.0) {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, taken_in).await.expect("the relay never took the replayed connection in");
    wait_metric_at_most(&h, PENDING, 0.0).await;

    // Nothing was registered: the replay did not bring the agent's session back.
    assert!(h.relay().sessions().instances("agent-1").is_empty(), "a replay registered a session");
    assert_eq!(relay_metric(&h, ZERO_RTT).await, Some(1.0));
    assert_eq!(relay_metric(&h, FULL).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intercepted_0rtt_register_played_first_by_an_attacker_registers_nothing() {
    let (h, proxy, agent, first) = agent_through_a_forwarder().await;
    cut_until_lost(&h, &proxy, &agent).await;

    // The attacker intercepts the agent's reconnect (it never reaches the relay) and plays its
    // ClientHello and 0-RTT register to the relay first, from its own address. The ticket is
    // fresh, so rustls accepts the early data and the relay reads the register: it must not
    // register anything, because the attacker cannot complete the handshake.
    proxy.record();
    let intercepted = async {
        let mut probe = tokio::time::interval(Duration::from_millis(20));
        loop {
            probe.tick().await;
            let initial: Vec<Vec<u8>> = proxy.recorded().into_iter().filter(|d| starts_with_initial(d)).collect();
            if !initial.is_empty() {
                return initial;
            }
        }
    };
    let replay = tokio::time::timeout(WAIT, intercepted).await.expect("the agent did not try to reconnect");
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for datagram in &replay {
        attacker.send_to(datagram, h.relay().quic_addr().expect("QUIC listener")).await.unwrap();
    }
    wait_for_metric(h.relay().admin_addr(), UNCONFIRMED, 1.0, WAIT).await;
    assert!(h.relay().sessions().instances("agent-1").is_empty(), "the attacker's replay registered a session");
    assert_eq!(relay_metric(&h, ZERO_RTT).await, None);

    // The path heals: the agent's own reconnect finds its ticket used, so its 0-RTT data is
    // refused and it registers again after the handshake.
    proxy.restore();
    agent.wait_connected(Some(first), WAIT).await.expect("agent did not reconnect");
    // (After a 0-RTT register the agent is answered half a round trip before the relay, which
    // waits for the handshake to complete, enters the session.)
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.instances("agent-1").len() == 1).await);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    agent.shutdown().await.unwrap();
}
