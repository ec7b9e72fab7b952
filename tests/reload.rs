//! Live reload on both transports: routes and upstreams change without dropping connections or
//! requests in flight; agents get the new configuration by config_sync (versioned); a removed
//! client is disconnected; an agent whose group's configuration did not change is sent nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::StatusCode;
use quictun_agent::Transport;
use quictun_relay::config::RouteEntry;
use quictun_tests::harness::relay_config_on;
use quictun_tests::{Harness, HarnessConfig, admin_get, metric};

const WAIT: Duration = Duration::from_secs(20);

async fn routes_and_upstreams_change_without_dropping_anything(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let _other = h.agent("agent-3").await;
    let session = h.relay().sessions().get("agent-1").unwrap().session_id;
    let client = h.client.clone();
    let in_flight = tokio::spawn(async move { client.get("app.test", "/hang").await });
    h.upstream.wait_hanging(1).await;
    assert_eq!(h.client.get("fresh.test", "/hello").await.status, StatusCode::NOT_FOUND);

    // New: a route for fresh.test, the app upstream moved under /bytes, agent-3 removed.
    let mut config = relay_config_on(Harness::listeners_of(h.relay()), &h.upstream.url(), &h.config);
    config.routes.insert(
        0,
        RouteEntry {
            host: "fresh.test".into(),
            path_prefix: "/".into(),
            upstream: "app".into(),
            ..RouteEntry::default()
        },
    );
    let app = config.upstreams.iter_mut().find(|u| u.name == "app").unwrap();
    app.targets = vec![format!("{}/bytes", h.upstream.url())];
    config.clients.retain(|c| c.id != "agent-3");
    assert_eq!(h.relay().reload(&config).unwrap(), 2);

    // The agent applies version 2 when its config_sync arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let reply = h.client.get("fresh.test", "/7").await;
        if reply.status == StatusCode::OK && reply.body.len() == 7 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "new config not applied: {} {}", reply.status, reply.text());
    }
    assert_eq!(h.client.get("app.test", "/3").await.body.len(), 3);
    // The request in flight across the reload finishes on the old configuration.
    h.upstream.release();
    let reply = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (StatusCode::OK, "released"));
    // Same connection for the kept client; the removed one is gone.
    assert_eq!(h.relay().sessions().get("agent-1").unwrap().session_id, session);
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-3").is_none()).await);
}

quictun_tests::on_both_transports!(routes_and_upstreams_change_without_dropping_anything);

/// A reload whose configuration no longer resolves (here a client's token file is gone) is
/// refused as a whole, naming the key: no client is dropped silently, and the running
/// configuration keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_does_not_resolve_changes_nothing_and_names_the_key() {
    let h = Harness::start().await;
    let _agent = h.agent("agent-1").await;
    let session = h.relay().sessions().get("agent-1").unwrap().session_id;
    let dir = std::env::temp_dir().join(format!("quictun-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("agent-1.token");
    std::fs::write(&token_file, "secret-1\n").unwrap();
    let mut config = relay_config_on(Harness::listeners_of(h.relay()), &h.upstream.url(), &h.config);
    let index = config.clients.iter().position(|c| c.id == "agent-1").unwrap();
    config.clients[index].token = None;
    config.clients[index].token_file = Some(token_file.clone());
    assert_eq!(h.relay().reload(&config).unwrap(), 2);

    std::fs::remove_file(&token_file).unwrap();
    let err = h.relay().reload(&config).unwrap_err().to_string();
    assert!(err.contains(&format!("clients[{index}].token_file")), "{err}");
    assert_eq!(h.relay().sessions().get("agent-1").unwrap().session_id, session);
    assert_eq!(h.client.get("app.test", "/hello").await.status, StatusCode::OK);
    let _ = std::fs::remove_dir_all(dir);
}

/// An upstream target the agents could not use (`wss://`, no scheme) is refused at the relay,
/// on reload as at start, naming the key: it is never pushed to an agent to fail there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_target_agents_cannot_use_is_refused_naming_the_key() {
    let h = Harness::start().await;
    let _agent = h.agent("agent-1").await;
    let mut config = relay_config_on(Harness::listeners_of(h.relay()), &h.upstream.url(), &h.config);
    let index = config.upstreams.iter().position(|u| u.name == "app").unwrap();
    config.upstreams[index].targets = vec!["wss://app.internal:443".into()];
    let err = h.relay().reload(&config).unwrap_err().to_string();
    assert!(err.contains(&format!("upstreams[{index}].targets[0]")), "{err}");
    assert_eq!(h.client.get("app.test", "/hello").await.text(), "hello", "the running configuration stays");
    let cert = quictun_core::tls::GeneratedCert::self_signed(&[]).unwrap();
    let refused = quictun_relay::Relay::start(config, cert.cert_key().unwrap()).await.err().unwrap().to_string();
    assert!(refused.contains(&format!("upstreams[{index}].targets[0]")), "{refused}");
}

/// A reload pushes config_sync only to agents whose group's configuration changed: the same file
/// again, or a change to routes alone, sends nothing; a changed upstream reaches its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_sync_goes_only_where_the_configuration_changed() {
    let h = Harness::start().await;
    // agent-1 and agent-3 serve group web (the app upstream), agent-2 group api.
    let _agents = [h.agent("agent-1").await, h.agent("agent-2").await, h.agent("agent-3").await];
    let syncs = || async {
        let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
        metric(&text, "quictun_config_syncs_total").unwrap_or_else(|| panic!("no config_syncs metric: {text}"))
    };
    let mut config = relay_config_on(Harness::listeners_of(h.relay()), &h.upstream.url(), &h.config);
    assert_eq!(h.relay().reload(&config).unwrap(), 2);
    assert_eq!(syncs().await, 0.0, "an unchanged file pushed config_sync");
    config.routes.push(quictun_tests::harness::route("more.test", "/", "app"));
    assert_eq!(h.relay().reload(&config).unwrap(), 3);
    assert_eq!(syncs().await, 0.0, "a change to routes alone pushed config_sync");
    let app = config.upstreams.iter_mut().find(|u| u.name == "app").unwrap();
    app.targets = vec![format!("{}/bytes", h.upstream.url())];
    assert_eq!(h.relay().reload(&config).unwrap(), 4);
    assert_eq!(syncs().await, 2.0, "the two agents of the app's group get the new targets, the api's nothing");
    let reply = h.client.get("more.test", "/5").await;
    assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 5));
}
