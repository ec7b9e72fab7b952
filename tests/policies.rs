//! Route policies end to end, through a real relay and agent, on both transports: basic auth from
//! an htpasswd file (bcrypt), address rules (also behind a trusted proxy), a per-address rate
//! limit, request and response header rewrites. A refused request never reaches the upstream;
//! every refusal is counted; bad values are refused at load with the key named.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use quictun_agent::Transport;
use quictun_relay::config::{RelayConfig, RouteEntry};
use quictun_tests::client::{Reply, empty};
use quictun_tests::{Harness, HarnessConfig, admin_get, metric};

/// A route `guarded.test` → `app`, shaped by `edit`, beside the harness's own.
fn guarded(
    edit: impl Fn(&mut RouteEntry) + Send + Sync + 'static,
) -> impl Fn(&mut RelayConfig) + Send + Sync + 'static {
    move |config: &mut RelayConfig| {
        let mut route = quictun_tests::harness::route("guarded.test", "/", "app");
        edit(&mut route);
        config.routes.insert(0, route);
    }
}

async fn start(
    transport: Transport,
    edit: impl Fn(&mut RelayConfig) + Send + Sync + 'static,
) -> (Harness, quictun_agent::Agent) {
    let h = Harness::start_with(HarnessConfig { transport, ..HarnessConfig::with_relay(edit) }).await;
    let agent = h.agent("agent-1").await;
    (h, agent)
}

/// `GET http://relay{path}` for `host` with extra `headers`.
async fn get(h: &Harness, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let client: Client<_, quictun_tests::client::ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::get(format!("http://{}{path}", h.relay().http_addr())).header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request.body(empty()).unwrap()))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

fn basic(user_pass: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass))
}

async fn rejects(h: &Harness, reason: &str) -> f64 {
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    metric(&text, &format!("quictun_rejects_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// The upstream's count of `/headers` requests, read through an unguarded route.
async fn upstream_saw(h: &Harness) -> usize {
    h.upstream.requests()
}

fn htpasswd(dir: &std::path::Path) -> PathBuf {
    let file = dir.join("users");
    // Cost 4 keeps the test quick; the relay takes whatever cost the file has.
    std::fs::write(&file, format!("# test users\nalice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    file
}

async fn basic_auth_guards_the_route_and_the_credentials_stay_at_the_relay(transport: Transport) {
    let dir = tempdir();
    let file = htpasswd(&dir);
    let (h, _agent) = start(transport, guarded(move |r| r.basic_auth_file = Some(file.clone()))).await;
    let before = upstream_saw(&h).await;
    let none = get(&h, "guarded.test", "/headers", &[]).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers["www-authenticate"], "Basic realm=\"quictun\", charset=\"UTF-8\"");
    let ten_kb = basic(&format!("alice:{}", "x".repeat(10_000)));
    for bad in [basic("alice:wrong"), basic("mallory:s3cret"), "Basic !!!".into(), "Bearer token".into(), ten_kb] {
        assert_eq!(
            get(&h, "guarded.test", "/headers", &[("authorization", &bad)]).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(upstream_saw(&h).await, before, "no refused request reached the upstream");
    assert!(rejects(&h, "policy_auth").await >= 6.0);
    let ok = get(&h, "guarded.test", "/headers", &[("authorization", &basic("alice:s3cret"))]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(!ok.text().to_lowercase().contains("authorization"), "credentials removed: {}", ok.text());
    // Remembered: the second request does not pay bcrypt again (checked in the unit test), and works.
    let again = get(&h, "guarded.test", "/hello", &[("authorization", &basic("alice:s3cret"))]).await;
    assert_eq!(again.status, StatusCode::OK);

    // The file is read again on reload: alice is gone (her remembered credentials with her), bob
    // comes in.
    std::fs::write(dir.join("users"), format!("bob:{}\n", bcrypt::hash("b0b", 4).unwrap())).unwrap();
    let config =
        quictun_tests::harness::relay_config_on(Harness::listeners_of(h.relay()), &h.upstream.url(), &h.config);
    assert_eq!(h.relay().reload(&config).unwrap(), 2);
    let alice = get(&h, "guarded.test", "/hello", &[("authorization", &basic("alice:s3cret"))]).await;
    assert_eq!(alice.status, StatusCode::UNAUTHORIZED);
    let bob = get(&h, "guarded.test", "/hello", &[("authorization", &basic("bob:b0b"))]).await;
    assert_eq!(bob.status, StatusCode::OK);
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn address_rules_and_a_trusted_proxys_forwarded_address(transport: Transport) {
    let (h, _agent) = start(transport, |config: &mut RelayConfig| {
        guarded(|r| r.deny_ips = vec!["127.0.0.0/8".into()])(config);
        let mut allowed = quictun_tests::harness::route("allowed.test", "/", "app");
        allowed.allow_ips = vec!["127.0.0.1".into(), "::1".into()];
        config.routes.insert(0, allowed);
        let mut proxied = quictun_tests::harness::route("proxied.test", "/", "app");
        proxied.deny_ips = vec!["203.0.113.0/24".into()];
        config.routes.insert(0, proxied);
        config.relay.trusted_proxies = quictun_core::edge::forwarded::TrustedProxies::new(vec![
            quictun_core::edge::forwarded::TrustedProxies::parse_network("127.0.0.1").unwrap(),
        ]);
    })
    .await;
    assert_eq!(get(&h, "allowed.test", "/hello", &[]).await.status, StatusCode::OK);
    assert_eq!(get(&h, "guarded.test", "/hello", &[]).await.status, StatusCode::FORBIDDEN);
    // Behind the trusted proxy (127.0.0.1), the address it saw is judged.
    let via = |xff: &'static str| [("x-forwarded-for", xff)];
    assert_eq!(get(&h, "proxied.test", "/hello", &via("203.0.113.7")).await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(&h, "proxied.test", "/hello", &via("203.0.113.7, 198.51.100.1")).await.status, StatusCode::OK);
    assert_eq!(
        get(&h, "proxied.test", "/hello", &via("198.51.100.1, 203.0.113.7")).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(rejects(&h, "policy_address").await, 3.0);
}

async fn a_rate_limit_answers_429_with_retry_after(transport: Transport) {
    let (h, _agent) = start(
        transport,
        guarded(|r| {
            r.rate_limit_per_ip = Some(0.5);
            r.rate_limit_burst = Some(3);
        }),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get(&h, "guarded.test", "/hello", &[]).await.status, StatusCode::OK);
    }
    let limited = get(&h, "guarded.test", "/hello", &[]).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Other routes are not limited.
    assert_eq!(get(&h, "app.test", "/hello", &[]).await.status, StatusCode::OK);
    assert_eq!(rejects(&h, "policy_rate").await, 1.0);
}

async fn headers_are_rewritten_both_ways(transport: Transport) {
    let (h, _agent) = start(
        transport,
        guarded(|r| {
            r.request_headers_set = [("x-env".to_owned(), "prod".to_owned())].into();
            r.request_headers_remove = vec!["x-secret".into()];
            r.response_headers_set = [("x-frame-options".to_owned(), "DENY".to_owned())].into();
            r.response_headers_remove = vec!["content-type".into()];
        }),
    )
    .await;
    let reply = get(&h, "guarded.test", "/headers", &[("x-secret", "hush"), ("x-env", "dev")]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = reply.text();
    assert!(seen.contains("x-env: prod\n") && !seen.contains("x-env: dev"), "{seen}");
    assert!(!seen.contains("x-secret"), "{seen}");
    assert_eq!(reply.headers["x-frame-options"], "DENY");
    assert!(!reply.headers.contains_key("content-type"));
}

quictun_tests::on_both_transports!(
    basic_auth_guards_the_route_and_the_credentials_stay_at_the_relay,
    address_rules_and_a_trusted_proxys_forwarded_address,
    a_rate_limit_answers_429_with_retry_after,
    headers_are_rewritten_both_ways,
);

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("quictun-policies-{}-{}", std::process::id(), fastrand_u64()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fastrand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

/// Bad values are refused when the file is read, with the key named.
#[test]
fn bad_policy_values_are_refused_with_the_key_named() {
    let dir = tempdir();
    let broken = dir.join("broken");
    std::fs::write(&broken, "alice:$2y$04$tooshort\n").unwrap();
    let base = "[[clients]]\nid = \"a\"\ntoken = \"t\"\ngroup = \"g\"\n[[upstreams]]\nname = \"u\"\ngroup = \"g\"\ntargets = [\"http://127.0.0.1:1\"]\n[[routes]]\nhost = \"x.test\"\nupstream = \"u\"\n";
    for (extra, key) in [
        ("allow_ips = [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n", "routes[0].allow_ips[1]"),
        ("deny_ips = [\"nope\"]\n", "routes[0].deny_ips[0]"),
        ("rate_limit_per_ip = 0\n", "routes[0].rate_limit_per_ip"),
        ("rate_limit_burst = 5\n", "routes[0].rate_limit_burst"),
        ("request_headers_set = { \"x-env\" = \"bad\\nvalue\" }\n", "routes[0].request_headers_set.x-env"),
        ("response_headers_remove = [\"content-length\"]\n", "routes[0].response_headers_remove[0]"),
        (&format!("basic_auth_file = {:?}\n", broken.display().to_string()), "routes[0].basic_auth_file"),
        ("basic_auth_file = \"/nonexistent/users\"\n", "routes[0].basic_auth_file"),
    ] {
        let config = RelayConfig::parse(&format!("{base}{extra}"), std::path::Path::new("r.toml")).unwrap();
        let err = quictun_relay::check_config(&config).expect_err(extra).to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
    let err = quictun_relay::check_config(
        &RelayConfig::parse(
            &format!("{base}basic_auth_file = {:?}\n", broken.display().to_string()),
            std::path::Path::new("r.toml"),
        )
        .unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 1"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
