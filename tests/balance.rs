//! Load balancing over the agents of a group, end to end: sticky consistent hashing on a header,
//! an agent whose requests fail repeatedly is taken out (cooldown) while a healthy one serves,
//! and an agent gone silent is left out before QUIC declares it dead (gRPC: declared dead by its
//! HTTP/2 PINGs), on both transports.
//!
//! The two agents of group `web` reach different upstream paths, so the answer tells which agent
//! served: agent-1 maps `app` to `/bytes` (`/5` → 200 with 5 bytes), agent-3 uses the relay's
//! target (`/5` → 404 from the upstream).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use quictun_agent::{Agent, AgentState};
use quictun_agent::{LocalTargets, Target};
use quictun_tests::client::{admin_get, body, empty};
use quictun_tests::{Harness, HarnessConfig, Transport};

const WAIT: Duration = Duration::from_secs(20);

async fn agent_with_app_at(h: &Harness, client_id: &str, target: String) -> Agent {
    let mut options = h.agent_options(client_id);
    options.local_upstreams = vec![LocalTargets { name: "app".into(), targets: vec![Target::parse(&target).unwrap()] }];
    h.agent_with(options).await
}

async fn hash_balancing_keeps_each_user_on_one_agent(transport: Transport) {
    let config = HarnessConfig::with_relay(|config| {
        let app = config.upstreams.iter_mut().find(|u| u.name == "app").unwrap();
        app.balance = quictun_relay::Balance::Hash;
        app.hash_header = Some("x-user".into());
    });
    let h = Harness::start_with(HarnessConfig { transport, ..config }).await;
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

async fn an_agent_failing_repeatedly_is_cooled_down(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
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

/// `silent_ms` of `client_id`'s session in the relay's `/api/sessions`, when it has one.
async fn silent_ms(h: &Harness, client_id: &str) -> Option<Option<u64>> {
    let page = admin_get(h.relay().admin_addr(), "/api/sessions", None).await;
    let sessions: Vec<serde_json::Value> = serde_json::from_str(&page.text()).unwrap();
    let session = sessions.iter().find(|s| s["client_id"] == client_id)?;
    Some(session["silent_ms"].as_u64())
}

/// How long the relay waits, with nothing heard from a QUIC agent (which PINGs every idle second),
/// before it suspects it (`quictun_relay`'s `SILENT_AFTER`).
const SUSPECT_AFTER_MS: u64 = 1250;
/// QUIC's idle timeout: nothing heard for this long and the connection is dead.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC's HTTP/2 PINGs: one after a second of silence, two seconds to answer it.
const GRPC_PING_DEADLINE: Duration = Duration::from_secs(3);

/// An agent whose path goes silent (nothing more arrives from it, nothing tells the relay), with a
/// sibling in its group and the default heartbeats (every 5 s, 3 misses: 15 s), so that only the
/// transport can notice within seconds.
///
/// QUIC: the relay suspects it after 1.25 s without a datagram, while its session is still
/// listed, and the balancer sends new requests to the sibling from then on (POSTs, which are never
/// retried elsewhere: one sent to the silent agent would fail); QUIC's idle timeout declares it
/// dead at 2 s. gRPC has no such early suspicion (its TCP connection tells the relay nothing
/// per packet): HTTP/2 PINGs declare the agent dead within 3 s, and from then the sibling serves.
async fn a_silent_agent_is_left_out_then_declared_dead(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: 5000, ..Default::default() }).await;
    let (silent, path) = h.agent_through_path("agent-1").await;
    let _sibling = h.agent("agent-3").await;
    assert_eq!(silent_ms(&h, "agent-1").await, Some(None), "a live agent is not suspect");

    path.blackhole();
    let cut = tokio::time::Instant::now();
    if transport == Transport::Quic {
        let suspected = async {
            let mut look = tokio::time::interval(Duration::from_millis(50));
            loop {
                look.tick().await;
                match silent_ms(&h, "agent-1").await {
                    Some(Some(ms)) => return ms,
                    Some(None) => {}
                    None => panic!("agent-1 was declared dead before it was suspected"),
                }
            }
        };
        let silent_ms = tokio::time::timeout(WAIT, suspected).await.expect("agent-1 was never suspected");
        assert!(silent_ms >= SUSPECT_AFTER_MS, "suspected after {silent_ms} ms of silence");
        for i in 0..10 {
            let reply = h.client.request(Method::POST, "app.test", "/echo", body(format!("request {i}"))).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(reply.text(), format!("request {i}"));
        }
        // The POSTs went to the sibling while agent-1 was suspect, not after it was gone.
        assert!(
            h.relay().sessions().get("agent-1").is_some(),
            "agent-1 was declared dead before the POSTs were sent ({:?} after the cut): nothing was shown",
            cut.elapsed()
        );
    }
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_none()).await, "agent-1 never declared dead");
    let dead_after = cut.elapsed();
    // The agent finds the silent relay too: QUIC's idle timer, which restarts on the agent's own
    // next PING (up to a second later), or gRPC's PINGs.
    let mut state = silent.state();
    tokio::time::timeout(WAIT, state.wait_for(|s| matches!(s, AgentState::Reconnecting { .. })))
        .await
        .expect("the agent never noticed the silent path")
        .unwrap();
    let agent_noticed = cut.elapsed();
    eprintln!(
        "{transport:?}: silent agent declared dead {} ms after its path went silent; the agent noticed after {} ms",
        dead_after.as_millis(),
        agent_noticed.as_millis()
    );
    let deadline = if transport == Transport::Quic { QUIC_IDLE_TIMEOUT } else { GRPC_PING_DEADLINE };
    assert!(
        dead_after <= deadline * 3 / 2,
        "declared dead {dead_after:?} after the cut (the transport's deadline: {deadline:?})"
    );
    let agent_deadline =
        if transport == Transport::Quic { QUIC_IDLE_TIMEOUT + Duration::from_secs(1) } else { deadline };
    assert!(
        agent_noticed <= agent_deadline * 3 / 2,
        "the agent noticed after {agent_noticed:?} (allowed: {agent_deadline:?})"
    );
    for i in 0..10 {
        let reply = h.client.request(Method::POST, "app.test", "/echo", body(format!("after {i}"))).await;
        assert_eq!((reply.status, reply.text()), (StatusCode::OK, format!("after {i}")));
    }
    silent.abort();
}

quictun_tests::on_both_transports!(
    hash_balancing_keeps_each_user_on_one_agent,
    an_agent_failing_repeatedly_is_cooled_down,
    a_silent_agent_is_left_out_then_declared_dead,
);
