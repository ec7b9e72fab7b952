//! Limits, timeouts and the admin endpoint, end to end over real sockets: route and per-address
//! limits, body size, slow request heads (408), idle keep-alive, stalled bodies, upstream connect
//! timeouts (504), Prometheus metrics and the admin bearer token.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use quictun_agent::Agent;
use quictun_relay::config::RelaySection;
use quictun_tests::client::{body, chunked};
use quictun_tests::{Harness, HarnessConfig, Transport, admin_get, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// The harness's knobs on `transport`, with `edit` applied to the `[relay]` section.
fn with_relay(transport: Transport, edit: impl Fn(&mut RelaySection) + Send + Sync + 'static) -> HarnessConfig {
    HarnessConfig { transport, ..HarnessConfig::with_relay(move |config| edit(&mut config.relay)) }
}

/// Reads until the peer closes (or 10 s pass); returns what arrived.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "connection not closed within 10 s; got {:?}", String::from_utf8_lossy(&out));
    String::from_utf8_lossy(&out).into_owned()
}

async fn metrics_count_requests_bytes_and_agents_behind_a_bearer_token(transport: Transport) {
    let h =
        Harness::start_with(with_relay(transport, |r| r.admin_token = Some(quictun_proto::Token::new("adm-secret"))))
            .await;
    let _agent = h.agent("agent-1").await;
    let admin = h.relay().admin_addr();
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    let echo = h.client.request(Method::POST, "app.test", "/echo", body(vec![7u8; 1000])).await;
    assert_eq!(echo.body.len(), 1000);
    assert_eq!(h.client.get("unknown.test", "/").await.status, StatusCode::NOT_FOUND);

    // Probes are open; everything else needs the token.
    assert_eq!(admin_get(admin, "/healthz", None).await.status, StatusCode::OK);
    assert_eq!(admin_get(admin, "/readyz", None).await.status, StatusCode::OK);
    let denied = admin_get(admin, "/metrics", None).await;
    assert_eq!(denied.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denied.headers["www-authenticate"], "Bearer");
    assert_eq!(admin_get(admin, "/metrics", Some("wrong")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(admin_get(admin, "/api/sessions", None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(admin_get(admin, "/api/sessions", Some("adm-secret")).await.status, StatusCode::OK);

    let reply = admin_get(admin, "/metrics", Some("adm-secret")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = reply.text();
    assert_eq!(metric(&text, "quictun_requests_total{route=\"app\",status=\"200\"}"), Some(2.0), "{text}");
    assert_eq!(metric(&text, "quictun_requests_total{route=\"-\",status=\"404\"}"), Some(1.0));
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"no_route\"}"), Some(1.0));
    assert_eq!(metric(&text, "quictun_request_duration_seconds_count{route=\"app\"}"), Some(2.0));
    let label = if transport == Transport::Grpc { "grpc" } else { "quic" };
    assert_eq!(metric(&text, &format!("quictun_connected_agents{{transport=\"{label}\"}}")), Some(1.0), "{text}");
    assert_eq!(metric(&text, "quictun_active_streams"), Some(0.0));
    assert_eq!(metric(&text, "quictun_bytes_total{direction=\"to_agent\"}"), Some(1000.0));
    assert!(metric(&text, "quictun_bytes_total{direction=\"from_agent\"}").unwrap() >= 1005.0);
}

async fn the_agent_serves_health_readiness_and_metrics(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let mut options = h.agent_options("agent-1");
    options.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = Agent::start(options).await.unwrap();
    let admin = agent.admin_addr().unwrap();
    agent.wait_connected(None, WAIT).await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    assert_eq!(h.client.get("app.test", "/missing").await.status, StatusCode::NOT_FOUND);

    assert_eq!(admin_get(admin, "/healthz", None).await.status, StatusCode::OK);
    assert_eq!(admin_get(admin, "/readyz", None).await.status, StatusCode::OK);
    let text = admin_get(admin, "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_agent_requests_total{upstream=\"app\",status=\"200\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "quictun_agent_requests_total{upstream=\"app\",status=\"404\"}"), Some(1.0));
    assert_eq!(metric(&text, "quictun_agent_connected"), Some(1.0));
    assert_eq!(metric(&text, "quictun_agent_active_streams"), Some(0.0));
    assert_eq!(metric(&text, "quictun_agent_bytes_total{direction=\"from_upstream\"}"), Some(27.0));
    agent.shutdown().await.unwrap();
}

async fn a_route_at_its_in_flight_limit_answers_503_at_once(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let hanging: Vec<_> = (0..2)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { client.get("limited.test", "/hang").await })
        })
        .collect();
    h.upstream.wait_hanging(2).await;
    let refused = h.client.get("limited.test", "/hello").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "1");
    // Other routes to the same agent are not affected.
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    h.upstream.release();
    for reply in hanging {
        assert_eq!(reply.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(h.client.get("limited.test", "/hello").await.status, StatusCode::OK);
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"route_busy\"}"), Some(1.0));
}

async fn bodies_over_the_route_limit_get_413(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let declared = h.client.request(Method::POST, "limited.test", "/echo", body(vec![1u8; 8192])).await;
    assert_eq!(declared.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", declared.text());
    let streamed = h.client.request(Method::POST, "limited.test", "/sha256", chunked(vec![1u8; 200_000])).await;
    assert_eq!(streamed.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", streamed.text());
    let small = h.client.request(Method::POST, "limited.test", "/echo", body(vec![1u8; 4096])).await;
    assert_eq!((small.status, small.body.len()), (StatusCode::OK, 4096));
    // No limit on other routes.
    let big = h.client.request(Method::POST, "app.test", "/echo", body(vec![1u8; 200_000])).await;
    assert_eq!((big.status, big.body.len()), (StatusCode::OK, 200_000));
}

async fn connections_per_address_are_limited(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| r.max_connections_per_ip = 3)).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let answer = read_to_close(&mut fourth).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    // One closes: a new client gets in (the relay notices the close asynchronously, so retry).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match HttpClientOnce::get(addr, "app.test", "/hello").await {
            Some(200) => break,
            other => assert!(tokio::time::Instant::now() < deadline, "still refused: {other:?}"),
        }
    }
}

/// One HTTP/1.1 request on a fresh connection (the pooled client would reuse connections).
struct HttpClientOnce;

impl HttpClientOnce {
    async fn get(addr: std::net::SocketAddr, host: &str, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let answer = read_to_close(&mut stream).await;
        answer.get(9..12)?.parse().ok()
    }
}

async fn slow_request_heads_get_408_and_idle_connections_close(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        r.header_read_timeout_secs = 1;
        r.keep_alive_timeout_secs = 2;
    }))
    .await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();

    // Slowloris: half a head, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nhost: app.test\r\nx-slow: ").await.unwrap();
    let started = tokio::time::Instant::now();
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Keep-alive: one request answered, then the idle connection is closed by the relay.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nhost: app.test\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");

    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"header_timeout\"}"), Some(1.0), "{text}");
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
}

async fn a_stalled_response_body_is_cut_after_the_stream_idle_timeout(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| r.stream_idle_timeout_secs = 1)).await;
    let _agent = h.agent("agent-1").await;
    let response = h.client.send(Method::GET, "app.test", "/chunks", quictun_tests::client::empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.expect("body not cut");
    assert!(rest.is_err(), "a stalled body must end with an error, not a clean end");
    h.upstream.release();
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
}

/// A listener whose accept queue is full: new connections hang in SYN-SENT.
async fn unresponsive_listener() -> (tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            _ => return (listener, fillers),
        }
    }
    panic!("the accept queue never filled");
}

async fn an_upstream_that_does_not_accept_gets_504(transport: Transport) {
    let (listener, _fillers) = unresponsive_listener().await;
    let target = format!("http://{}", listener.local_addr().unwrap());
    let h = Harness::start_with(HarnessConfig { transport, app_target: Some(target), ..Default::default() }).await;
    let mut options = h.agent_options("agent-1");
    options.connect_timeout = Duration::from_secs(1);
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(None, WAIT).await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    let started = tokio::time::Instant::now();
    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert!(reply.text().contains("timed out"), "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    agent.shutdown().await.unwrap();
}

async fn just_after_startup_a_request_waits_for_its_agent_to_register(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| r.startup_grace_secs = 30)).await;
    let client = h.client.clone();
    let early = tokio::spawn(async move { client.get("app.test", "/hello").await });
    // The request is parked on the relay (no agent yet)…
    let admin = h.relay().admin_addr();
    while metric(&admin_get(admin, "/metrics", None).await.text(), "quictun_waiting_for_agent") != Some(1.0) {
        assert!(!early.is_finished(), "the early request was answered without an agent");
        tokio::task::yield_now().await;
    }
    // …until the agent registers.
    let _agent = h.agent("agent-1").await;
    let reply = tokio::time::timeout(WAIT, early).await.expect("the early request hung").unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (StatusCode::OK, "hello"));
}

async fn a_request_that_waited_out_the_startup_grace_says_it_waited(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| r.startup_grace_secs = 1)).await;
    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.text().contains("waited") && reply.text().contains("startup_grace_secs"), "{}", reply.text());
}

quictun_tests::on_both_transports!(
    metrics_count_requests_bytes_and_agents_behind_a_bearer_token,
    the_agent_serves_health_readiness_and_metrics,
    a_route_at_its_in_flight_limit_answers_503_at_once,
    bodies_over_the_route_limit_get_413,
    connections_per_address_are_limited,
    slow_request_heads_get_408_and_idle_connections_close,
    a_stalled_response_body_is_cut_after_the_stream_idle_timeout,
    an_upstream_that_does_not_accept_gets_504,
    just_after_startup_a_request_waits_for_its_agent_to_register,
    a_request_that_waited_out_the_startup_grace_says_it_waited,
);
