//! Egress, the reverse direction, on both transports: an HTTP client next to the agent sends
//! requests to the agent's egress listener; each goes to the relay as an exchange the agent opens
//! (its own QUIC stream, or an agent-numbered exchange on the gRPC stream), and the relay forwards
//! it by its `[[egress_routes]]`. Covered: plain and streamed bodies, a tonic client (trailers),
//! the error table (404 no route, 403 group not allowed, 502 unreachable target, 503 no relay).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use quictun_agent::EgressServer;
use quictun_agent::{Agent, Transport};
use quictun_relay::config::EgressRouteEntry;
use quictun_tests::client::chunked;
use quictun_tests::grpc_echo::{EchoClient, EchoServer, Msg};
use quictun_tests::harness::egress_route;
use quictun_tests::raw::assert_paths_are_canonical;
use quictun_tests::{Harness, HarnessConfig, HttpClient, pattern, sha256_hex};

const WAIT: Duration = Duration::from_secs(20);

/// A harness whose relay routes egress for `partner.test` (group web only) to the harness
/// upstream, `grpc.test` to `grpc_target`, `down.test` to a closed port, and `files.test` under
/// `/public` only to the harness upstream.
async fn harness(transport: Transport, grpc_target: &str) -> Harness {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let routes = [
        egress_route("partner.test", &h.upstream.url(), &["web"]),
        egress_route("grpc.test", grpc_target, &[]),
        egress_route("down.test", &format!("http://{closed}"), &[]),
        EgressRouteEntry { path_prefix: "/public".into(), ..egress_route("files.test", &h.upstream.url(), &[]) },
    ];
    h.config.edit = Arc::new(move |config| config.egress_routes.extend(routes.iter().cloned()));
    h.restart_relay().await;
    h
}

async fn egress_for(agent: &Agent) -> (EgressServer, HttpClient) {
    let server = EgressServer::start("127.0.0.1:0".parse().unwrap(), vec![agent.relay_tunnel()], WAIT).await.unwrap();
    let client = HttpClient::new(server.local_addr());
    (server, client)
}

async fn egress_requests_reach_the_relays_targets_with_the_ingress_error_table(transport: Transport) {
    let echo = EchoServer::start().await;
    let h = harness(transport, &format!("h2c://{}", echo.addr())).await;
    let web = h.agent("agent-1").await;
    let (egress, client) = egress_for(&web).await;

    let reply = client.get("partner.test", "/hello").await;
    assert_eq!((reply.status, reply.text().as_str()), (StatusCode::OK, "hello"));
    let seen = client.get("partner.test", "/headers").await.text();
    assert!(seen.contains("host: partner.test\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");

    // A streamed 4 MiB body, sent chunked, comes back whole.
    let data = pattern(4 << 20);
    let reply = client.request(Method::POST, "partner.test", "/sha256", chunked(data.clone())).await;
    assert_eq!((reply.status, reply.text()), (StatusCode::OK, sha256_hex(&data)));

    // gRPC through egress: trailers (the status) come back too.
    let mut grpc = EchoClient::connect(egress.local_addr(), "grpc.test", None).await;
    let reply = grpc.unary(Msg { text: "out".into(), count: 0, blob: vec![] }).await.unwrap();
    assert_eq!(reply.text, "OUT");
    let status = grpc.unary(Msg { text: "fail".into(), count: 0, blob: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let (messages, end) = grpc.countdown(Msg { text: "fail".into(), count: 2, blob: vec![] }).await;
    assert_eq!((messages.len(), end.unwrap_err().code()), (2, tonic::Code::Aborted));

    // The error table.
    assert_eq!(client.get("nowhere.test", "/").await.status, StatusCode::NOT_FOUND);
    assert_eq!(client.get("down.test", "/").await.status, StatusCode::BAD_GATEWAY);
    let api = h.agent("agent-2").await;
    let (api_egress, api_client) = egress_for(&api).await;
    assert_eq!(api_client.get("partner.test", "/hello").await.status, StatusCode::FORBIDDEN);

    // The relay counted them.
    let metrics = quictun_tests::admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    let ok = format!(
        "quictun_egress_requests_total{{target=\"{}\",outcome=\"200\"}}",
        h.upstream.url().trim_start_matches("http://")
    );
    assert_eq!(quictun_tests::metric(&metrics, &ok), Some(3.0), "{metrics}");
    api_egress.shutdown().await;
    egress.shutdown().await;
}

async fn egress_without_a_relay_connection_answers_503(transport: Transport) {
    let mut h = harness(transport, "http://127.0.0.1:1").await;
    let web = h.agent("agent-1").await;
    let (egress, client) = egress_for(&web).await;
    assert_eq!(client.get("partner.test", "/hello").await.status, StatusCode::OK);
    h.take_relay().abort();
    let mut link = web.relay_tunnel();
    tokio::time::timeout(WAIT, link.wait_for(Option::is_none)).await.expect("link never dropped").unwrap();
    let reply = client.get("partner.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    egress.shutdown().await;
    web.abort();
}

/// Egress routes are matched on the canonical path, as ingress routes are: a dot-segment cannot
/// climb out of `/public`, one hidden behind an encoded separator is refused, and the target
/// receives the path the route matched.
async fn egress_paths_are_canonical_before_routing(transport: Transport) {
    let h = harness(transport, "http://127.0.0.1:1").await;
    let web = h.agent("agent-1").await;
    let (egress, _client) = egress_for(&web).await;
    assert_paths_are_canonical(egress.local_addr()).await;
    egress.shutdown().await;
}

quictun_tests::on_both_transports!(
    egress_requests_reach_the_relays_targets_with_the_ingress_error_table,
    egress_without_a_relay_connection_answers_503,
    egress_paths_are_canonical_before_routing,
);
