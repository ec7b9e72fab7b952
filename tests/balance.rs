//! Load balancing over the agents of a group, end to end: sticky consistent hashing on a header,
//! and an agent whose requests fail repeatedly is taken out (cooldown) while a healthy one serves.
//!
//! The two agents of group `web` reach different upstream paths, so the answer tells which agent
//! served: agent-1 maps `app` to `/bytes` (`/5` → 200 with 5 bytes), agent-3 uses the relay's
//! target (`/5` → 404 from the upstream).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use quictun_agent::Agent;
use quictun_agent::upstreams::{LocalTargets, Target};
use quictun_tests::client::empty;
use quictun_tests::{Harness, HarnessConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn agent_with_app_at(h: &Harness, client_id: &str, target: String) -> Agent {
    let mut options = h.agent_options(client_id);
    options.local_upstreams = vec![LocalTargets { name: "app".into(), targets: vec![Target::parse(&target).unwrap()] }];
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(None, WAIT).await.unwrap();
    let id = client_id.to_owned();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get(&id).is_some()).await);
    agent
}

#[tokio::test]
async fn hash_balancing_keeps_each_user_on_one_agent() {
    let config = HarnessConfig::with_relay(|config| {
        let app = config.upstreams.iter_mut().find(|u| u.name == "app").unwrap();
        app.balance = quictun_relay::Balance::Hash;
        app.hash_header = Some("x-user".into());
    });
    let h = Harness::start_with(config).await;
    let _a = agent_with_app_at(&h, "agent-1", format!("{}/bytes", h.upstream.url())).await;
    let _b = h.agent("agent-3").await;
    let mut per_agent = [0usize; 2];
    for user in 0..20 {
        let mut seen = Vec::new();
        for _ in 0..5 {
            let req = http::Request::builder()
                .method(Method::GET)
                .uri(format!("http://{}/5", h.relay().http_addr()))
                .header("host", "app.test")
                .header("x-user", format!("user-{user}"))
                .body(empty())
                .unwrap();
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
            seen.push(client.request(req).await.unwrap().status());
        }
        assert!(seen.iter().all(|s| *s == seen[0]), "user-{user} moved between agents: {seen:?}");
        per_agent[usize::from(seen[0] == StatusCode::OK)] += 1;
    }
    assert!(per_agent[0] > 0 && per_agent[1] > 0, "20 users all hashed to one agent: {per_agent:?}");
}

#[tokio::test]
async fn an_agent_failing_repeatedly_is_cooled_down() {
    let h = Harness::start().await;
    // agent-1's upstream refuses connections; agent-3's works.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let _failing = agent_with_app_at(&h, "agent-1", format!("http://{closed}")).await;
    let _healthy = h.agent("agent-3").await;
    let mut statuses = Vec::new();
    for _ in 0..16 {
        statuses.push(h.client.get("app.test", "/hello").await.status);
    }
    let failures = statuses.iter().filter(|s| **s == StatusCode::BAD_GATEWAY).count();
    assert!(failures <= 3, "the failing agent kept getting requests: {statuses:?}");
    assert!(statuses[8..].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
}
