//! The relay's HTTP edge, end to end over real sockets: canonical paths (no dot-segment escapes a
//! route's prefix), the one host (absolute form, `:authority`, duplicate `Host`), the header
//! budget (431, not 502, the same on HTTP/1.1 and h2), `CONNECT` (405), an HTTPS host that is not
//! its connection's SNI (421), the forwarding-header policy and trusted proxies, over HTTP/1.1 written
//! byte for byte and over h2c.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use quictun_core::Trust;
use quictun_core::edge::forwarded::TrustedProxies;
use quictun_proto::Token;
use quictun_tests::harness::route;
use quictun_tests::raw::{H2c, assert_paths_are_canonical, raw_get, raw_request, raw_request_tls};
use quictun_tests::{Harness, HarnessConfig, Transport, admin_get, metric};

/// `files.test` serves only `/public` (of the `app` upstream); everything else there is 404.
fn files_route() -> HarnessConfig {
    HarnessConfig::with_relay(|config| config.routes.push(route("files.test", "/public", "app")))
}

/// The header lines the upstream's `/headers` page saw, by name (values of repeated ones joined
/// with `|`).
fn seen(page: &str, name: &str) -> Option<String> {
    let values: Vec<&str> = page.lines().filter_map(|line| line.strip_prefix(&format!("{name}: "))).collect();
    (!values.is_empty()).then(|| values.join("|"))
}

async fn dot_segments_cannot_escape_a_routes_prefix(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..files_route() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    assert_paths_are_canonical(addr).await;

    // The same over h2c.
    let mut h2 = H2c::connect(addr).await;
    assert_eq!(h2.request("GET", "http://files.test/public/../secret", &[]).await.status, 404);
    assert_eq!(h2.request("GET", "http://files.test/public/%2e%2e/secret", &[]).await.status, 404);
    assert_eq!(h2.request("GET", "http://files.test/public/..%2fsecret", &[]).await.status, 400);
    let reply = h2.request("GET", "http://files.test/public/x/../y", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "/public/y"));
}

async fn the_upstream_sees_the_host_the_relay_routed_on(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    // Absolute form wins over Host, and Host is rewritten to match.
    let reply = raw_get(addr, "http://app.test/headers", &["host: other.test"]).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(seen(reply.body(), "host").as_deref(), Some("app.test"), "{}", reply.text);
    assert_eq!(seen(reply.body(), "x-forwarded-host").as_deref(), Some("app.test"));
    // Two Host headers: refused, never routed on the first.
    let reply = raw_get(addr, "/headers", &["host: app.test", "host: other.test"]).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    // A Host with user info is not a host.
    assert_eq!(raw_get(addr, "/headers", &["host: evil@app.test"]).await.status, 400);
    // `Connection: host` cannot strip the Host the upstream needs.
    let reply = raw_get(addr, "/headers", &["host: app.test", "connection: host, close"]).await;
    assert_eq!(seen(reply.body(), "host").as_deref(), Some("app.test"), "{}", reply.text);

    // h2c: :authority names the host; a Host naming another one is refused.
    let mut h2 = H2c::connect(addr).await;
    let reply = h2.request("GET", "http://app.test/headers", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(seen(&reply.body, "host").as_deref(), Some("app.test"), "{}", reply.body);
    assert_eq!(h2.request("GET", "http://app.test/headers", &[("host", "other.test")]).await.status, 400);
    assert_eq!(h2.request("GET", "http://app.test/headers", &[("host", "app.test")]).await.status, 200);
}

async fn a_request_with_the_most_headers_the_ingress_takes_fits_the_tunnel(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    // 128 header lines in all (Host, Connection and 126 more): the ingress's limit. The relay adds
    // its own on top; the tunnel carries them (this was a 502 `malformed head frame`).
    let lines: Vec<String> = (0..126).map(|i| format!("x-h{i}: {i}")).collect();
    let mut headers: Vec<&str> = lines.iter().map(String::as_str).collect();
    headers.push("host: app.test");
    let reply = raw_get(addr, "/headers", &headers).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(seen(reply.body(), "x-h125").as_deref(), Some("125"));
    // One more is over the ingress's limit.
    let lines: Vec<String> = (0..127).map(|i| format!("x-h{i}: {i}")).collect();
    let mut headers: Vec<&str> = lines.iter().map(String::as_str).collect();
    headers.push("host: app.test");
    assert_eq!(raw_get(addr, "/headers", &headers).await.status, 431);
    // HTTP/2 is held to the same count (its host is `:authority`, not a header): 128 fit, 129 do
    // not (they did up to 140, where the tunnel's own limit stopped them).
    let mut h2 = H2c::connect(addr).await;
    for (count, status) in [(128, 200), (129, 431), (200, 431)] {
        let many: Vec<(String, String)> = (0..count).map(|i| (format!("x-h{i}"), i.to_string())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(h2.request("GET", "http://app.test/headers", &many).await.status, status, "{count} headers");
    }
}

async fn connect_is_refused_with_405_and_counted_as_such(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    let reply =
        raw_request(addr, "CONNECT app.test:443 HTTP/1.1\r\nhost: app.test:443\r\nconnection: close\r\n\r\n").await;
    assert_eq!(reply.status, 405, "{}", reply.text);
    assert!(reply.text.to_ascii_lowercase().contains("\r\nallow: get, head, post"), "{}", reply.text);
    let metrics = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&metrics, "quictun_rejects_total{reason=\"method_not_allowed\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, "quictun_requests_total{route=\"-\",status=\"405\"}"), Some(1.0), "{metrics}");
}

async fn an_https_request_for_another_host_than_its_sni_is_misdirected(transport: Transport) {
    let config = HarnessConfig::with_relay(|config| config.relay.https_listen = Some("127.0.0.1:0".parse().unwrap()));
    let h = Harness::start_with(HarnessConfig { transport, ..config }).await;
    let _agent = h.agent("agent-1").await;
    let https = h.relay().https_addr().expect("HTTPS ingress");
    let tls = || quictun_core::tls::client_config_with_alpn(&Trust::Pin(h.cert.pin), b"http/1.1").unwrap().0;
    let request = "GET /hello HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n";
    let reply = raw_request_tls(https, "app.test", tls(), request).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let reply = raw_request_tls(https, "other.test", tls(), request).await;
    assert_eq!(reply.status, 421, "{}", reply.text);
    assert!(reply.text.contains("opened for \"other.test\", not \"app.test\""), "{}", reply.text);
    // The host's case and port do not matter; the name does.
    let request = "GET /hello HTTP/1.1\r\nhost: APP.test:443\r\nconnection: close\r\n\r\n";
    assert_eq!(raw_request_tls(https, "app.test", tls(), request).await.status, 200);
}

async fn forwarding_headers_from_clients_are_replaced(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    let spoofed = [
        "host: app.test",
        "x-forwarded-for: 1.2.3.4",
        "x-forwarded-for: 5.6.7.8",
        "x-real-ip: 9.9.9.9",
        "forwarded: for=6.6.6.6",
        "x-forwarded-port: 1",
        "x-forwarded-proto: gopher",
    ];
    let reply = raw_get(addr, "/headers", &spoofed).await;
    let page = reply.body();
    assert_eq!(seen(page, "x-forwarded-for").as_deref(), Some("127.0.0.1"), "{page}");
    assert_eq!(seen(page, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(seen(page, "x-forwarded-host").as_deref(), Some("app.test"));
    for dropped in ["x-real-ip", "x-forwarded-port", "forwarded"] {
        assert_eq!(seen(page, dropped), None, "{dropped} from an untrusted client reached the upstream: {page}");
    }
}

async fn a_trusted_proxy_keeps_its_forwarding_chain(transport: Transport) {
    let config = HarnessConfig::with_relay(|config| {
        config.relay.trusted_proxies = TrustedProxies::new(vec!["127.0.0.0/8".parse().unwrap()]);
    });
    let h = Harness::start_with(HarnessConfig { transport, ..config }).await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    let headers = [
        "host: app.test",
        "x-forwarded-for: 203.0.113.9",
        "x-forwarded-for: 127.0.0.5",
        "x-forwarded-proto: https",
        "x-real-ip: 203.0.113.9",
        "forwarded: for=203.0.113.9;proto=https",
    ];
    let reply = raw_get(addr, "/headers", &headers).await;
    let page = reply.body();
    assert_eq!(seen(page, "x-forwarded-for").as_deref(), Some("203.0.113.9, 127.0.0.5, 127.0.0.1"), "{page}");
    assert_eq!(seen(page, "x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(seen(page, "x-forwarded-host").as_deref(), Some("app.test"));
    assert_eq!(seen(page, "x-real-ip").as_deref(), Some("203.0.113.9"));
    assert_eq!(seen(page, "forwarded").as_deref(), Some("for=203.0.113.9;proto=https"));
}

async fn the_admin_bearer_scheme_is_case_insensitive(transport: Transport) {
    let config = HarnessConfig::with_relay(|config| config.relay.admin_token = Some(Token::new("adm")));
    let h = Harness::start_with(HarnessConfig { transport, ..config }).await;
    let admin = h.relay().admin_addr();
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let line = format!("authorization: {scheme} adm");
        let reply = raw_get(admin, "/metrics", &[line.as_str(), "host: admin"]).await;
        assert_eq!(reply.status, 200, "{scheme}: {}", reply.text);
    }
    assert_eq!(admin_get(admin, "/metrics", None).await.status, http::StatusCode::UNAUTHORIZED);
}

quictun_tests::on_both_transports!(
    dot_segments_cannot_escape_a_routes_prefix,
    the_upstream_sees_the_host_the_relay_routed_on,
    a_request_with_the_most_headers_the_ingress_takes_fits_the_tunnel,
    connect_is_refused_with_405_and_counted_as_such,
    an_https_request_for_another_host_than_its_sni_is_misdirected,
    forwarding_headers_from_clients_are_replaced,
    a_trusted_proxy_keeps_its_forwarding_chain,
    the_admin_bearer_scheme_is_case_insensitive,
);
