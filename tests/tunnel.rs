//! End to end over real sockets: a real relay, real agents, a real upstream and a real HTTP client,
//! all on 127.0.0.1 with ports from port 0, real QUIC and real TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use quictun_agent::{Agent, AgentError, AgentState, Transport};
use quictun_proto::RejectCode;
use quictun_tests::client::{body, chunked, empty};
use quictun_tests::{Harness, HarnessConfig, pattern, sha256_hex};

const WAIT: Duration = Duration::from_secs(20);

async fn get_and_post_through_the_tunnel(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;

    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "hello");
    let request_id = reply.headers.get("x-quictun-request-id").expect("request id header");
    assert_eq!(request_id.len(), 36);

    let reply = h.client.request(Method::POST, "app.test", "/echo", body("ping through quic")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "ping through quic");

    // A wildcard route, any case, with a port in the Host header.
    let reply = h.client.get("Deep.Sub.WILD.test:8080", "/hello").await;
    assert_eq!(reply.status, StatusCode::OK);
}

async fn eight_mib_bodies_both_ways_keep_their_checksum(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let size = 8 << 20;
    let expected = sha256_hex(&pattern(size));

    let download = h.client.get("app.test", &format!("/bytes/{size}")).await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(download.body.len(), size);
    assert_eq!(sha256_hex(&download.body), expected);

    // Upload without Content-Length (chunked), hashed by the upstream as it streams in.
    let upload = h.client.request(Method::POST, "app.test", "/sha256", chunked(pattern(size))).await;
    assert_eq!(upload.status, StatusCode::OK);
    assert_eq!(upload.text(), expected);

    // Both directions at once: the upstream echoes while the client is still sending.
    let echo = h.client.request(Method::POST, "app.test", "/echo", body(pattern(size))).await;
    assert_eq!(echo.status, StatusCode::OK);
    assert_eq!(sha256_hex(&echo.body), expected);
}

async fn fifty_requests_complete_while_one_hangs(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;

    let client = h.client.clone();
    let hanging = tokio::spawn(async move { client.get("app.test", "/hang").await });
    h.upstream.wait_hanging(1).await;

    let requests: Vec<_> = (0..50)
        .map(|i| {
            let client = h.client.clone();
            tokio::spawn(async move {
                let reply = client.request(Method::POST, "app.test", "/echo", body(format!("request {i}"))).await;
                (i, reply)
            })
        })
        .collect();
    for request in requests {
        let (i, reply) = tokio::time::timeout(WAIT, request).await.expect("a request was blocked").unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.text(), format!("request {i}"));
    }
    assert!(!hanging.is_finished(), "the hanging request must still be pending");
    h.upstream.release();
    let reply = tokio::time::timeout(WAIT, hanging).await.unwrap().unwrap();
    assert_eq!(reply.text(), "released");
}

async fn chunked_responses_are_forwarded_as_they_arrive(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let response = h.client.send(Method::GET, "app.test", "/chunks", empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = tokio::time::timeout(WAIT, body.frame()).await.expect("first chunk was held back").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    h.upstream.release();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

async fn forwarding_headers_are_set_and_hop_by_hop_headers_stripped(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let req = http::Request::builder()
        .uri(format!("http://{}/headers", h.relay().http_addr()))
        .header("host", "app.test")
        .header("connection", "x-private")
        .header("x-private", "must not cross")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-kept", "yes")
        .body(empty())
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let response = client.request(req).await.unwrap();
    let request_id = response.headers().get("x-quictun-request-id").unwrap().to_str().unwrap().to_owned();
    let seen = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // The client is not a trusted proxy: what it claimed is replaced, not extended.
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(!seen.contains("203.0.113.7"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: app.test\n"), "{seen}");
    assert!(seen.contains("host: app.test\n"), "{seen}");
    assert!(seen.contains("x-kept: yes\n"), "{seen}");
    assert!(seen.contains(&format!("x-quictun-request-id: {request_id}\n")), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");
    assert!(!seen.contains("connection:"), "{seen}");
}

async fn ingress_keeps_http1_connections_alive(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let stream = tokio::net::TcpStream::connect(h.relay().http_addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        sender.ready().await.unwrap_or_else(|e| panic!("connection closed before request {i}: {e}"));
        let req = http::Request::builder().uri("/hello").header("host", "app.test").body(empty()).unwrap();
        let response =
            sender.send_request(req).await.unwrap_or_else(|e| panic!("request {i} on the same connection: {e}"));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
}

async fn error_table_no_route_no_agent_and_upstream_refused(transport: Transport) {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let h = Harness::start_with(HarnessConfig {
        app_target: Some(format!("http://{closed_port}")),
        transport,
        ..Default::default()
    })
    .await;

    let reply = h.client.get("unknown.test", "/some/path").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.text().contains("unknown.test") && reply.text().contains("/some/path"), "{}", reply.text());
    assert!(reply.headers.contains_key("x-quictun-request-id"));

    let reply = h.client.get("nobody.test", "/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(reply.text().contains("no agent"), "{}", reply.text());

    let _agent = h.agent("agent-1").await;
    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(reply.text().contains("upstream unreachable"), "{}", reply.text());
}

async fn overload_answers_503_at_once_and_slow_agents_504(transport: Transport) {
    let h = Harness::start_with(HarnessConfig {
        max_streams_per_agent: 2,
        response_timeout_secs: 2,
        transport,
        ..Default::default()
    })
    .await;
    let _agent = h.agent("agent-1").await;
    let hangs: Vec<_> = (0..2)
        .map(|_| {
            let client = h.client.clone();
            tokio::spawn(async move { client.get("app.test", "/hang").await })
        })
        .collect();
    h.upstream.wait_hanging(2).await;
    let started = std::time::Instant::now();
    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers.get("retry-after").unwrap(), "1");
    assert!(started.elapsed() < Duration::from_secs(1), "503 must not queue: {:?}", started.elapsed());
    // The two hanging requests time out at the relay.
    for hang in hangs {
        let reply = tokio::time::timeout(WAIT, hang).await.unwrap().unwrap();
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    }
    // Their slots are free again.
    h.upstream.release();
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
}

async fn a_wrong_token_is_rejected_and_the_agent_stops(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let agent = Agent::start(h.agent_options_with("agent-1", "not-the-token", &h.cert.pin.to_string())).await.unwrap();
    let result = tokio::time::timeout(WAIT, agent.wait()).await.expect("agent kept retrying a bad token");
    match result {
        Err(AgentError::Rejected { code: RejectCode::BadToken, message }) => {
            assert!(message.contains("token"), "{message}")
        }
        other => panic!("expected a bad-token rejection, got {other:?}"),
    }
    let unknown = Agent::start(h.agent_options_with("nobody", "x", &h.cert.pin.to_string())).await.unwrap();
    assert!(matches!(tokio::time::timeout(WAIT, unknown.wait()).await.unwrap(), Err(AgentError::Rejected { .. })));
    assert!(h.relay().sessions().is_empty());
}

async fn a_wrong_pin_is_refused_naming_both_fingerprints(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let wrong = quictun_core::Pin::of(b"some other certificate");
    let agent = Agent::start(h.agent_options_with("agent-1", "secret-1", &wrong.to_string())).await.unwrap();
    let result = tokio::time::timeout(WAIT, agent.wait()).await.expect("agent kept retrying a wrong pin");
    let err = result.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&wrong.to_string()) && text.contains(&h.cert.pin.to_string()), "{text}");
    assert!(matches!(err, AgentError::PinMismatch(ref m) if m.actual == h.cert.pin && m.expected == wrong));
    assert!(h.relay().sessions().is_empty());
}

/// The agent's process is killed: the relay sees what a `kill -9` shows it (nothing at all on
/// QUIC, a reset TCP connection on gRPC; see [`quictun_tests::AgentPath::kill_agent`]) and the
/// agent never says goodbye.
async fn an_agent_killed_mid_request_gives_502_and_others_go_on(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let (web, path) = h.agent_through_path("agent-1").await;
    let _api = h.agent("agent-2").await;

    let client = h.client.clone();
    let hanging = tokio::spawn(async move { client.get("app.test", "/hang").await });
    h.upstream.wait_hanging(1).await;
    // A large download through the other agent is in flight while the first one dies.
    let client = h.client.clone();
    let download = tokio::spawn(async move { client.get("api.test", &format!("/bytes/{}", 4 << 20)).await });

    path.kill_agent();
    web.abort();
    let reply = tokio::time::timeout(WAIT, hanging).await.expect("request hung after the agent died").unwrap();
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());

    let download = tokio::time::timeout(WAIT, download).await.unwrap().unwrap();
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(sha256_hex(&download.body), sha256_hex(&pattern(4 << 20)));
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_none()).await, "dead session left behind");
    assert_eq!(h.client.get("api.test", "/hello").await.status, StatusCode::OK);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::BAD_GATEWAY);
    h.upstream.release();
}

async fn the_agent_comes_back_after_a_relay_restart(transport: Transport) {
    let mut h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let agent = h.agent("agent-1").await;
    let first = agent.wait_connected(None, WAIT).await.unwrap();
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);

    h.restart_relay().await;
    let second = agent.wait_connected(Some(first), Duration::from_secs(40)).await.expect("agent did not come back");
    assert_ne!(first, second);
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    let reply = h.client.get("app.test", "/hello").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "hello");
}

async fn replicas_sharing_a_client_id_serve_side_by_side_up_to_the_relays_cap(transport: Transport) {
    let config = HarnessConfig::with_relay(|c| c.relay.max_instances_per_client = 2);
    let h = Harness::start_with(HarnessConfig { transport, ..config }).await;
    // Two processes of one deployment: the same client_id and token, each its own instance.
    let first = h.agent("agent-1").await;
    let second = Agent::start(h.agent_options("agent-1")).await.unwrap();
    second.wait_connected(None, WAIT).await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.instances("agent-1").len() == 2).await);
    let instances = h.relay().sessions().instances("agent-1");
    assert_ne!(instances[0].instance_id, instances[1].instance_id);
    assert_eq!(h.relay().sessions().group("web").len(), 2, "replicas are siblings in their group");
    for _ in 0..10 {
        assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    }
    let admin = quictun_tests::HttpClient::new(h.relay().admin_addr());
    let listed: serde_json::Value = serde_json::from_slice(&admin.get("admin", "/api/sessions").await.body).unwrap();
    let agent_1: Vec<_> = listed.as_array().unwrap().iter().filter(|s| s["client_id"] == "agent-1").collect();
    assert_eq!(agent_1.len(), 2, "/api/sessions shows each instance: {listed}");
    assert_ne!(agent_1[0]["instance_id"], agent_1[1]["instance_id"]);

    // A third is over the cap: refused, with the reason, and it keeps trying (it may join later).
    let third = Agent::start(h.agent_options("agent-1")).await.unwrap();
    let mut state = third.state();
    let refused = tokio::time::timeout(WAIT, state.wait_for(|s| matches!(s, AgentState::Reconnecting { .. })))
        .await
        .expect("the third instance was not refused")
        .unwrap()
        .clone();
    assert!(
        matches!(&refused, AgentState::Reconnecting { reason } if reason.contains("max_instances_per_client")),
        "{refused:?}"
    );
    assert_eq!(h.relay().sessions().instances("agent-1").len(), 2);
    third.shutdown().await.unwrap();

    // One replica stops: the other goes on serving, alone.
    second.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.instances("agent-1").len() == 1).await);
    for _ in 0..5 {
        assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    }
    assert!(matches!(*first.state().borrow(), AgentState::Connected { .. }));
}

async fn requests_rotate_over_the_agents_of_a_group_and_sessions_leave_nothing_behind(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let a = h.agent("agent-1").await;
    let b = h.agent("agent-3").await;
    assert_eq!(h.relay().sessions().group("web").len(), 2);
    for _ in 0..10 {
        assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    }
    let in_flight: u32 = h.relay().sessions().group("web").iter().map(|s| s.in_flight()).sum();
    assert_eq!(in_flight, 0);
    a.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.group("web").len() == 1).await);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    b.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await);
    assert!(h.relay().sessions().group("web").is_empty());
}

async fn an_agent_can_trust_the_relay_by_a_ca_file(transport: Transport) {
    use quictun_core::tls::CertKey;
    use quictun_relay::Relay;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    // A CA, and a relay certificate for "localhost" signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let cert = CertKey {
        chain: vec![CertificateDer::from(leaf.der().to_vec())],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    };
    let config = quictun_tests::harness::relay_config(
        "127.0.0.1:0".parse().unwrap(),
        &h.upstream.url(),
        &HarnessConfig::default(),
    );
    let relay = Relay::start(config, cert).await.unwrap();

    let dir = std::env::temp_dir().join(format!("quictun-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let mut options =
        Harness::options_for(relay.quic_addr().expect("QUIC listener"), "agent-1", "secret-1", &h.cert.pin.to_string());
    options.trust = quictun_core::Trust::CaFile(ca_file.clone());
    options.server_name = "localhost".into();
    options.transport = transport;
    options.grpc_relay = relay.grpc_addr().unwrap().into();
    let agent = Agent::start(options.clone()).await.unwrap();
    assert!(agent.wait_connected(None, WAIT).await.is_some(), "CA-verified agent did not connect");
    let client = quictun_tests::HttpClient::new(relay.http_addr());
    assert_eq!(client.get("app.test", "/hello").await.text(), "hello");
    agent.shutdown().await.unwrap();

    // A name the certificate does not cover is a TLS error, not a retry loop.
    options.server_name = "other.example".into();
    let agent = Agent::start(options).await.unwrap();
    let err = tokio::time::timeout(WAIT, agent.wait()).await.unwrap().unwrap_err();
    assert!(matches!(err, AgentError::Tls(_)), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    relay.shutdown().await;
}

async fn the_admin_endpoint_reports_health_and_live_sessions(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let admin = quictun_tests::HttpClient::new(h.relay().admin_addr());
    assert_eq!(admin.get("admin", "/healthz").await.status, StatusCode::OK);
    assert_eq!(admin.get("admin", "/readyz").await.status, StatusCode::OK);
    let sessions: serde_json::Value = serde_json::from_slice(&admin.get("admin", "/api/sessions").await.body).unwrap();
    assert_eq!(sessions, serde_json::json!([]));

    let agent = h.agent("agent-1").await;
    let _api = h.agent("agent-2").await;
    let session_id = agent.wait_connected(None, WAIT).await.unwrap().to_string();
    let reply = admin.get("admin", "/api/sessions").await;
    assert_eq!(reply.headers.get("content-type").unwrap(), "application/json");
    let sessions: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    let list = sessions.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["client_id"], "agent-1");
    assert_eq!(list[0]["group"], "web");
    assert_eq!(list[0]["session_id"], session_id.as_str());
    assert_eq!(list[0]["in_flight"], 0);
    assert!(list[0]["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(list[1]["client_id"], "agent-2");

    agent.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.len() == 1).await);
    let sessions: serde_json::Value = serde_json::from_slice(&admin.get("admin", "/api/sessions").await.body).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    assert_eq!(admin.get("admin", "/nope").await.status, StatusCode::NOT_FOUND);
}

/// Sends raw bytes to the ingress and returns the status line of the answer.
async fn raw_status_line(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned()
}

async fn oversized_request_heads_get_431_and_the_ingress_goes_on(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    let mut big = b"GET /hello HTTP/1.1\r\nHost: app.test\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 70_000));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw_status_line(addr, &big).await, "HTTP/1.1 431 Request Header Fields Too Large");
    let mut many = b"GET /hello HTTP/1.1\r\nHost: app.test\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(raw_status_line(addr, &many).await, "HTTP/1.1 431 Request Header Fields Too Large");
    assert_eq!(raw_status_line(addr, b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n").await, "HTTP/1.1 200 OK");
}

// Every scenario runs against both transports.

quictun_tests::on_both_transports!(
    get_and_post_through_the_tunnel,
    eight_mib_bodies_both_ways_keep_their_checksum,
    fifty_requests_complete_while_one_hangs,
    chunked_responses_are_forwarded_as_they_arrive,
    forwarding_headers_are_set_and_hop_by_hop_headers_stripped,
    ingress_keeps_http1_connections_alive,
    error_table_no_route_no_agent_and_upstream_refused,
    overload_answers_503_at_once_and_slow_agents_504,
    a_wrong_token_is_rejected_and_the_agent_stops,
    a_wrong_pin_is_refused_naming_both_fingerprints,
    an_agent_killed_mid_request_gives_502_and_others_go_on,
    the_agent_comes_back_after_a_relay_restart,
    replicas_sharing_a_client_id_serve_side_by_side_up_to_the_relays_cap,
    requests_rotate_over_the_agents_of_a_group_and_sessions_leave_nothing_behind,
    an_agent_can_trust_the_relay_by_a_ca_file,
    the_admin_endpoint_reports_health_and_live_sessions,
    oversized_request_heads_get_431_and_the_ingress_goes_on,
);
