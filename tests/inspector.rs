//! The agent's traffic inspector, end to end on both transports: the requests the agent forwarded,
//! with headers and the first bytes of each body, under the relay's request id; a replay sends
//! one to the upstream again and is recorded as a new entry marked as a replay; a body over the
//! limit is kept in part and cannot be replayed; a cross-site POST and a rebound host name are
//! refused; the page, in a real headless browser, shows a request just made.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use quictun_agent::{Agent, Transport};
use quictun_tests::browser::{dump_dom, element};
use quictun_tests::client::{ClientBody, Reply, body, empty};
use quictun_tests::{Harness, HarnessConfig, admin_get};
use serde_json::Value;

async fn start(transport: Transport, capacity: usize, body_bytes: usize) -> (Harness, Agent, SocketAddr) {
    let h = Harness::start_with(HarnessConfig { transport, ..HarnessConfig::default() }).await;
    let mut options = h.agent_options("agent-1");
    options.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    options.inspect_capacity = capacity;
    options.inspect_body_bytes = body_bytes;
    let agent = h.agent_with(options).await;
    let admin = agent.admin_addr().unwrap();
    (h, agent, admin)
}

/// An admin request with extra headers, answered whole.
async fn admin(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let client: Client<_, ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request.body(empty()).unwrap()))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
}

/// The record of request `id`, once it is kept.
async fn wait_for_record(addr: SocketAddr, id: &str) -> Value {
    quictun_tests::client::admin_wait_for_json(addr, &format!("/api/requests/{id}")).await
}

async fn post_echo(h: &Harness, payload: Vec<u8>) -> String {
    let client: Client<_, ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::post(format!("http://{}/echo?from=test", h.relay().http_addr()))
        .header("host", "app.test")
        .header("x-test", "inspected")
        .body(body(payload))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.headers()["x-quictun-request-id"].to_str().unwrap().to_owned();
    response.into_body().collect().await.unwrap();
    id
}

fn header(list: &Value, name: &str) -> Option<String> {
    list.as_array()?.iter().find(|h| h[0] == name).map(|h| h[1].as_str().unwrap().to_owned())
}

async fn the_inspector_keeps_requests_with_their_bodies_and_replays_one(transport: Transport) {
    let (h, _agent, addr) = start(transport, 100, 64 * 1024).await;
    let get = h.client.get("app.test", "/hello").await;
    let get_id = get.headers["x-quictun-request-id"].to_str().unwrap().to_owned();
    // The ring is in the order requests end: the GET's is kept before the POST is sent.
    wait_for_record(addr, &get_id).await;
    let id = post_echo(&h, b"hello replay".to_vec()).await;
    let record = wait_for_record(addr, &id).await;

    assert_eq!((record["method"].as_str(), record["uri"].as_str()), (Some("POST"), Some("/echo?from=test")));
    assert_eq!((record["upstream"].as_str(), record["status"].as_u64()), (Some("app"), Some(200)));
    assert_eq!(record["request_body"]["text"], "hello replay");
    assert_eq!(record["response_body"]["text"], "hello replay");
    assert_eq!((record["request_bytes"].as_u64(), record["response_bytes"].as_u64()), (Some(12), Some(12)));
    assert_eq!(record["replayable"], true);
    assert_eq!(header(&record["request_headers"], "x-test").as_deref(), Some("inspected"));
    assert_eq!(
        header(&record["request_headers"], "x-quictun-request-id").as_deref(),
        Some(id.as_str()),
        "the relay's id"
    );
    let list = serde_json::from_slice::<Value>(&admin_get(addr, "/api/requests", None).await.body).unwrap();
    let ids: Vec<&str> = list["requests"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id.as_str(), get_id.as_str()], "newest first");
    let detailed =
        serde_json::from_slice::<Value>(&admin_get(addr, "/api/requests?detail=1", None).await.body).unwrap();
    assert_eq!(detailed["requests"][0]["request_body"]["text"], "hello replay", "the list with bodies");
    assert!(list["requests"][0].get("request_body").is_none(), "the plain list is summaries");

    let before = h.upstream.requests();
    let replay = admin(addr, Method::POST, &format!("/api/requests/{id}/replay"), &[]).await;
    assert_eq!(replay.status, StatusCode::OK, "{}", replay.text());
    let answer: Value = serde_json::from_slice(&replay.body).unwrap();
    assert_eq!((answer["status"].as_u64(), answer["replay_of"].as_str()), (Some(200), Some(id.as_str())));
    assert_eq!(h.upstream.requests(), before + 1, "the upstream got it again");
    let new_id = answer["id"].as_str().unwrap();
    assert_ne!(new_id, id);
    let replayed = wait_for_record(addr, new_id).await;
    assert_eq!(replayed["replay_of"], id.as_str());
    assert_eq!(replayed["response_body"]["text"], "hello replay", "the upstream echoed the same body");
    assert_eq!(header(&replayed["request_headers"], "x-test").as_deref(), Some("inspected"));
    let replay_id = header(&replayed["request_headers"], "x-quictun-request-id");
    assert_eq!(replay_id.as_deref(), Some(new_id), "the upstream sees the replay's own id");
    let list = serde_json::from_slice::<Value>(&admin_get(addr, "/api/requests?limit=1", None).await.body).unwrap();
    assert_eq!(list["requests"][0]["id"], new_id, "the replay is the newest entry");
    assert_eq!(list["requests"].as_array().unwrap().len(), 1);
}

async fn a_body_over_the_limit_is_kept_in_part_and_not_replayed(transport: Transport) {
    let (h, _agent, addr) = start(transport, 100, 16).await;
    let id = post_echo(&h, vec![b'z'; 100]).await;
    let record = wait_for_record(addr, &id).await;
    assert_eq!(record["request_body"]["text"], "z".repeat(16));
    assert_eq!(
        (record["request_body"]["truncated"].as_bool(), record["replayable"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(record["request_bytes"], 100);
    let before = h.upstream.requests();
    let refused = admin(addr, Method::POST, &format!("/api/requests/{id}/replay"), &[]).await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{}", refused.text());
    let unknown = admin(addr, Method::POST, &format!("/api/requests/{}/replay", uuid::Uuid::new_v4()), &[]).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(admin(addr, Method::POST, "/api/requests/nope/replay", &[]).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.upstream.requests(), before, "nothing was sent");
}

async fn cross_site_posts_and_rebound_names_are_refused(transport: Transport) {
    let (h, _agent, addr) = start(transport, 100, 1024).await;
    let id = post_echo(&h, b"x".to_vec()).await;
    wait_for_record(addr, &id).await;
    let before = h.upstream.requests();
    let path = format!("/api/requests/{id}/replay");
    let forged = admin(addr, Method::POST, &path, &[("origin", "http://evil.example")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let rebound =
        admin(addr, Method::GET, "/api/requests", &[("host", &format!("evil.example:{}", addr.port()))]).await;
    assert_eq!(rebound.status, StatusCode::FORBIDDEN);
    assert_eq!(h.upstream.requests(), before);
    let own = format!("http://{addr}");
    let same_site = admin(addr, Method::POST, &path, &[("origin", &own)]).await;
    assert_eq!(same_site.status, StatusCode::OK, "{}", same_site.text());
    let local = admin(addr, Method::GET, "/api/requests", &[("host", &format!("localhost:{}", addr.port()))]).await;
    assert_eq!(local.status, StatusCode::OK);
}

async fn the_ring_keeps_its_capacity(transport: Transport) {
    let (h, _agent, addr) = start(transport, 3, 1024).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(post_echo(&h, b"a".to_vec()).await);
        wait_for_record(addr, ids.last().unwrap()).await;
    }
    let list = serde_json::from_slice::<Value>(&admin_get(addr, "/api/requests", None).await.body).unwrap();
    let kept: Vec<&str> = list["requests"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(kept, [ids[4].as_str(), ids[3].as_str(), ids[2].as_str()]);
}

async fn the_inspector_page_shows_a_request_just_made(transport: Transport) {
    let (h, _agent, addr) = start(transport, 100, 1024).await;
    let id = post_echo(&h, b"shown in the browser".to_vec()).await;
    wait_for_record(addr, &id).await;
    let dom = dump_dom(&format!("http://{addr}/#request={id}"), Duration::from_millis(2500)).await;
    let requests = element(&dom, "tbody", "requests");
    assert!(requests.contains("/echo?from=test") && requests.contains(">200<"), "{requests}");
    assert_eq!(element(&dom, "pre", "detail-request-body"), "shown in the browser");
    assert!(element(&dom, "tbody", "detail-request-headers").contains("inspected"));
}

quictun_tests::on_both_transports!(
    the_inspector_keeps_requests_with_their_bodies_and_replays_one,
    a_body_over_the_limit_is_kept_in_part_and_not_replayed,
    cross_site_posts_and_rebound_names_are_refused,
    the_ring_keeps_its_capacity,
    #[cfg_attr(not(browser_capable), ignore = "needs a headless browser: apt-get install chromium")]
    the_inspector_page_shows_a_request_just_made,
);
