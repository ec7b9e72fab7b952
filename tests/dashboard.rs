//! The relay's dashboard and its recent requests, end to end on both transports: the page loaded
//! in a real headless browser (Debian's `chromium`) shows the live session and a request just
//! made, and shows what clients send as text, never as markup; `/api/requests` lists the recent
//! requests newest first with their sizes, agent and transport, credentials redacted; the ring
//! holds `inspect_capacity` and no more; the admin token guards the page, and a browser passes it
//! as a Basic password.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use quictun_agent::Transport;
use quictun_relay::config::RelayConfig;
use quictun_tests::browser::{dump_dom, element};
use quictun_tests::client::{Reply, body, empty};
use quictun_tests::{Harness, HarnessConfig, admin_get};
use serde_json::Value;

async fn start(transport: Transport, edit: impl Fn(&mut RelayConfig) + Send + Sync + 'static) -> Harness {
    Harness::start_with(HarnessConfig { transport, ..HarnessConfig::with_relay(edit) }).await
}

fn request_id(reply: &Reply) -> String {
    reply.headers["x-quictun-request-id"].to_str().unwrap().to_owned()
}

/// The record of request `id`, once it is kept.
async fn wait_for_record(addr: SocketAddr, id: &str) -> Value {
    quictun_tests::client::admin_wait_for_json(addr, &format!("/api/requests/{id}")).await
}

async fn api(admin: SocketAddr, path: &str) -> Value {
    let reply = admin_get(admin, path, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    serde_json::from_slice(&reply.body).unwrap()
}

/// The page, in a real browser, shows the session (client, transport) and the request just made.
async fn the_dashboard_shows_the_live_session_and_a_request_just_made(transport: Transport) {
    let h = start(transport, |_| {}).await;
    let _agent = h.agent("agent-3").await;
    let marker = format!("/hello?dash={}", uuid::Uuid::new_v4().simple());
    let reply = h.client.get("app.test", &marker).await;
    assert_eq!(reply.status, StatusCode::OK);
    let admin = h.relay().admin_addr();
    wait_for_record(admin, &request_id(&reply)).await;

    let page = admin_get(admin, "/", None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"].to_str().unwrap().starts_with("text/html"));
    let policy = page.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"), "{policy}");
    assert!(
        !page.text().contains("http://") && !page.text().contains("https://"),
        "the page loads nothing from elsewhere"
    );

    let dom = dump_dom(&format!("http://{admin}/"), Duration::from_millis(2500)).await;
    let sessions = element(&dom, "tbody", "sessions");
    assert!(sessions.contains("agent-3"), "sessions: {sessions}");
    assert!(sessions.contains(&format!("<td>{}</td>", transport_name(transport))), "sessions: {sessions}");
    let requests = element(&dom, "tbody", "requests");
    assert!(requests.contains(&marker), "requests: {requests}");
    assert!(requests.contains(">200<") && requests.contains("agent-3"), "requests: {requests}");
    let routes = element(&dom, "tbody", "routes");
    assert!(routes.contains("app.test"), "routes: {routes}");
    assert!(element(&dom, "span", "live").starts_with("live"), "{}", element(&dom, "span", "live"));
    assert_eq!(element(&dom, "b", "total"), "1");
}

fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Grpc => "grpc",
        _ => "quic",
    }
}

/// What a client sends (here, markup in a header) is shown as text: the page runs no script and
/// builds no element from it.
async fn what_clients_send_is_shown_as_text_never_as_markup(transport: Transport) {
    let h = start(transport, |_| {}).await;
    let _agent = h.agent("agent-1").await;
    let evil = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>";
    let client: Client<_, quictun_tests::client::ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{}/hello", h.relay().http_addr()))
        .header("host", "app.test")
        .header("x-evil", evil)
        .body(empty())
        .unwrap();
    let response = client.request(request).await.unwrap();
    let id = response.headers()["x-quictun-request-id"].to_str().unwrap().to_owned();
    response.into_body().collect().await.unwrap();
    let admin = h.relay().admin_addr();
    wait_for_record(admin, &id).await;

    let dom = dump_dom(&format!("http://{admin}/#request={id}"), Duration::from_millis(2500)).await;
    let headers = element(&dom, "tbody", "detail-request");
    assert!(headers.contains("x-evil"), "the linked request's headers are shown: {headers}");
    assert!(headers.contains("&lt;img src=x onerror="), "as text: {headers}");
    assert!(!dom.contains("<img") && !dom.contains("pwned</title>") && !headers.contains("<script"), "{dom}");
    assert!(dom.contains("<title>quictun relay</title>"));
}

/// `/api/requests` lists requests newest first with sizes, agent, transport and address;
/// `/api/requests/{id}` adds the headers, with every credential redacted.
async fn the_api_lists_recent_requests_with_credentials_redacted(transport: Transport) {
    let h = start(transport, |config| {
        config.routes[0].response_headers_set.insert("set-cookie".into(), "sid=from-the-relay-secret".into());
    })
    .await;
    let _agent = h.agent("agent-1").await;
    let first = h.client.get("app.test", "/hello").await;
    // The ring is in the order requests end: the GET's is kept before the POST is sent.
    let admin = h.relay().admin_addr();
    wait_for_record(admin, &request_id(&first)).await;
    let client: Client<_, quictun_tests::client::ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("http://{}/echo?x=1", h.relay().http_addr()))
        .header("host", "app.test")
        .header("authorization", "Bearer bearer-secret")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("cookie", "sid=cookie-secret")
        .header("x-kept", "visible")
        .body(body(vec![7u8; 1000]))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let id = response.headers()["x-quictun-request-id"].to_str().unwrap().to_owned();
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes().len(), 1000);
    let record = wait_for_record(admin, &id).await;

    let list = api(admin, "/api/requests").await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], id.as_str(), "newest first");
    assert_eq!(list[1]["id"], request_id(&first).as_str());
    let post = &list[0];
    assert_eq!(
        (post["method"].as_str(), post["host"].as_str(), post["path"].as_str()),
        (Some("POST"), Some("app.test"), Some("/echo?x=1"))
    );
    assert_eq!(
        (post["status"].as_u64(), post["bytes_in"].as_u64(), post["bytes_out"].as_u64()),
        (Some(200), Some(1000), Some(1000))
    );
    assert_eq!(post["client_id"], "agent-1");
    assert_eq!(post["transport"], transport_name(transport));
    assert!(post["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{post}");
    assert!(post["duration_ms"].as_f64().unwrap() > 0.0 && post["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(api(admin, "/api/requests?limit=1").await.as_array().unwrap().len(), 1);

    let header = |list: &Value, name: &str| {
        list.as_array().unwrap().iter().find(|h| h[0] == name).map(|h| h[1].as_str().unwrap().to_owned())
    };
    for name in ["authorization", "proxy-authorization", "cookie"] {
        assert_eq!(header(&record["request_headers"], name).as_deref(), Some("[redacted]"), "{name}");
    }
    assert_eq!(header(&record["request_headers"], "x-kept").as_deref(), Some("visible"));
    assert_eq!(header(&record["response_headers"], "set-cookie").as_deref(), Some("[redacted]"));
    let text = record.to_string();
    for secret in ["bearer-secret", "cHJveHk6c2VjcmV0", "cookie-secret", "from-the-relay-secret"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(admin_get(admin, "/api/requests/not-an-id", None).await.status, StatusCode::BAD_REQUEST);
    let unknown = format!("/api/requests/{}", uuid::Uuid::new_v4());
    assert_eq!(admin_get(admin, &unknown, None).await.status, StatusCode::NOT_FOUND);
}

/// The ring keeps `inspect_capacity` requests, the newest; every request is still counted; 0
/// keeps none.
async fn the_ring_holds_its_capacity_and_counts_every_request(transport: Transport) {
    let h = start(transport, |config| config.relay.inspect_capacity = 5).await;
    let _agent = h.agent("agent-1").await;
    let admin = h.relay().admin_addr();
    let mut ids = Vec::new();
    for i in 0..12 {
        let reply = h.client.get("app.test", &format!("/hello?n={i}")).await;
        ids.push(request_id(&reply));
        wait_for_record(admin, ids.last().unwrap()).await;
    }
    let list = api(admin, "/api/requests").await;
    let kept: Vec<&str> = list.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    let newest: Vec<&str> = ids.iter().rev().take(5).map(String::as_str).collect();
    assert_eq!(kept, newest);
    assert_eq!(admin_get(admin, &format!("/api/requests/{}", ids[0]), None).await.status, StatusCode::NOT_FOUND);
    let overview = api(admin, "/api/overview").await;
    assert_eq!(overview["totals"]["requests"], 12);
    assert_eq!(overview["totals"]["status_2xx"], 12);
    assert_eq!(overview["inspect_capacity"], 5);
    assert_eq!(overview["sessions"][0]["client_id"], "agent-1");
    assert_eq!(overview["routes"][0]["host"], "app.test");

    let off = start(transport, |config| config.relay.inspect_capacity = 0).await;
    let _agent = off.agent("agent-1").await;
    assert_eq!(off.client.get("app.test", "/hello").await.status, StatusCode::OK);
    assert_eq!(off.client.get("nowhere.test", "/").await.status, StatusCode::NOT_FOUND);
    let admin = off.relay().admin_addr();
    assert_eq!(api(admin, "/api/requests").await, serde_json::json!([]));
    let totals = &api(admin, "/api/overview").await["totals"];
    assert_eq!((totals["requests"].as_u64(), totals["status_4xx"].as_u64()), (Some(2), Some(1)));
}

/// With an admin token, the page and its API need it; a browser passes it as the Basic password
/// (the 401 asks for one), and the page then loads its data.
async fn the_admin_token_guards_the_dashboard(transport: Transport) {
    let h = start(transport, |config| config.relay.admin_token = Some(quictun_proto::Token::new("adm-secret"))).await;
    let _agent = h.agent("agent-3").await;
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    let admin = h.relay().admin_addr();
    for path in ["/", "/api/requests", "/api/overview"] {
        let denied = admin_get(admin, path, None).await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{path}");
        let challenges: Vec<&str> =
            denied.headers.get_all("www-authenticate").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(challenges, ["Bearer", "Basic realm=\"quictun admin\""]);
        assert_eq!(admin_get(admin, path, Some("adm-secret")).await.status, StatusCode::OK, "{path}");
    }
    let denied = dump_dom(&format!("http://{admin}/"), Duration::from_millis(1000)).await;
    assert!(!denied.contains("agent-3"), "{denied}");
    let dom = dump_dom(&format!("http://admin:adm-secret@{admin}/"), Duration::from_millis(2500)).await;
    assert!(element(&dom, "tbody", "sessions").contains("agent-3"), "{dom}");
    let wrong = dump_dom(&format!("http://admin:wrong@{admin}/"), Duration::from_millis(1000)).await;
    assert!(!wrong.contains("agent-3"), "{wrong}");
}

/// Without a token, the traffic pages answer only to a client that named the endpoint by its
/// address or `localhost` (a web page whose name was rebound to 127.0.0.1 gets nothing); the
/// metrics and sessions answer as before; only GET (and POST for actions) is served.
async fn the_dashboard_refuses_rebound_names_and_other_methods(transport: Transport) {
    let h = start(transport, |_| {}).await;
    let admin = h.relay().admin_addr();
    let client: Client<_, quictun_tests::client::ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let send = |method: Method, path: &str, host: String| {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"))
            .header("host", host)
            .body(empty())
            .unwrap();
        client.request(request)
    };
    let port = admin.port();
    for path in ["/", "/api/requests", "/api/overview"] {
        let rebound = send(Method::GET, path, format!("evil.example:{port}")).await.unwrap();
        assert_eq!(rebound.status(), StatusCode::FORBIDDEN, "{path}");
        for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            assert_eq!(send(Method::GET, path, host.clone()).await.unwrap().status(), StatusCode::OK, "{path} {host}");
        }
    }
    for path in ["/metrics", "/api/sessions"] {
        assert_eq!(send(Method::GET, path, format!("relay.internal:{port}")).await.unwrap().status(), StatusCode::OK);
    }
    let delete = send(Method::DELETE, "/api/requests", format!("127.0.0.1:{port}")).await.unwrap();
    assert_eq!(delete.status(), StatusCode::METHOD_NOT_ALLOWED);
    let post = send(Method::POST, "/api/requests", format!("127.0.0.1:{port}")).await.unwrap();
    assert_eq!(post.status(), StatusCode::NOT_FOUND, "the relay has no actions");
}

quictun_tests::on_both_transports!(
    #[cfg_attr(not(browser_capable), ignore = "needs a headless browser: apt-get install chromium")]
    the_dashboard_shows_the_live_session_and_a_request_just_made,
    #[cfg_attr(not(browser_capable), ignore = "needs a headless browser: apt-get install chromium")]
    what_clients_send_is_shown_as_text_never_as_markup,
    the_api_lists_recent_requests_with_credentials_redacted,
    the_ring_holds_its_capacity_and_counts_every_request,
    #[cfg_attr(not(browser_capable), ignore = "needs a headless browser: apt-get install chromium")]
    the_admin_token_guards_the_dashboard,
    the_dashboard_refuses_rebound_names_and_other_methods,
);
