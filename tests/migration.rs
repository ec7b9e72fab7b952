//! Connection migration: the agent's QUIC endpoint moves to a new UDP socket (a new local port,
//! as after a NAT rebinding or an interface change) in the middle of a 256 MiB download through
//! the tunnel. The download completes intact, the relay sees the agent's new address, and the
//! session is never re-registered.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use quictun_agent::{Agent, AgentState};
use quictun_tests::client::empty;
use quictun_tests::{Harness, sha256_hex};

const WAIT: Duration = Duration::from_secs(20);
const SIZE: usize = 256 << 20;

/// SHA-256 of the upstream's `/bytes/N` pattern (byte `i` is `i % 251`), computed in pieces.
fn expected_sha256(len: usize) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let period: Vec<u8> = (0..251u32 * 4096).map(|i| (i % 251) as u8).collect();
    let mut left = len;
    while left > 0 {
        let n = left.min(period.len());
        ctx.update(&period[..n]);
        left -= n;
    }
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_survives_the_agent_moving_to_a_new_socket() {
    let h = Harness::start().await;
    let mut options = h.agent_options("agent-1");
    options.bind = Some("127.0.0.1:0".parse().unwrap());
    let agent = Agent::start(options).await.unwrap();
    let session_id = agent.wait_connected(None, WAIT).await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    let before = h.relay().sessions().get("agent-1").unwrap();
    let old_local = agent.local_addr().unwrap();
    assert_eq!(before.remote(), old_local);
    let mut state = agent.state();
    state.borrow_and_update();

    let response = h.client.send(Method::GET, "app.test", &format!("/bytes/{SIZE}"), empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut received = 0usize;
    let mut new_local = None;
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.expect("download stalled") {
        let data = frame.expect("download failed").into_data().unwrap_or_default();
        ctx.update(&data);
        received += data.len();
        if new_local.is_none() && received >= SIZE / 4 {
            new_local = Some(agent.rebind("127.0.0.1:0".parse().unwrap()).unwrap());
        }
    }
    let new_local = new_local.expect("rebound mid-download");
    assert_ne!(new_local, old_local);
    assert_eq!(received, SIZE);
    let digest: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, expected_sha256(SIZE));

    // Same session, same registration; the relay now sees the new address.
    let after = h.relay().sessions().get("agent-1").unwrap();
    assert_eq!(after.session_id, before.session_id);
    assert_eq!(after.remote(), new_local, "the relay did not follow the migration");
    assert!(!state.has_changed().unwrap(), "agent state changed: {:?}", *state.borrow());
    assert!(matches!(*agent.state().borrow(), AgentState::Connected { session_id: id, .. } if id == session_id));
    // And the tunnel keeps working on the new path.
    let small = h.client.get("app.test", "/bytes/1000").await;
    assert_eq!(sha256_hex(&small.body), sha256_hex(&quictun_tests::pattern(1000)));
    agent.shutdown().await.unwrap();
}
