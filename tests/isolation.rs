//! Isolation: readers that stop reading must not delay anyone else's requests, nor cost the agent
//! its session, on either transport. The stalled readers are clients that never read their
//! downloads (HTTP/1.1 with a 4 KiB receive buffer, and h2c with a zero flow-control window) and
//! an upstream that never reads uploads. Their number is chosen so that, without the
//! stalled-reader budgets, the credit they hold would be over them (`quictun_core::stall`): the
//! test sees the budgets enforced (`reclaimed_streams`) and everyone else served as before.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use quictun_agent::Agent;
use quictun_tests::client::{Latencies, wait_for_metric};
use quictun_tests::raw::{H2c, endless_upload, non_reading_get};
use quictun_tests::{Harness, HarnessConfig, Transport, on_both_transports};

/// One scenario at a time: the latencies compared are those of a quiet machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stalled downloads, all from one address: more than its budget (16 MiB) holds on QUIC (4 MiB a
/// stream) and on gRPC (2 MiB an exchange).
const STALLED_DOWNLOADS: usize = 20;
/// Stalled uploads: more than an agent connection's budget (64 MiB) holds on QUIC, and more than
/// gRPC's once the flow-control window of each is counted.
const STALLED_UPLOADS: usize = 40;
const WAIT: Duration = Duration::from_secs(20);
/// Heartbeats every second (a 3 s timeout, five times stricter than the default 15 s): with the
/// harness's 200 ms (0.6 s timeout), the two cores busy moving the stalled bodies sometimes
/// delayed a heartbeat past it, and the session was dropped for a scheduling hiccup rather
/// than for a stalled tunnel.
const HEARTBEAT_MS: u32 = 1000;
const SAMPLES: usize = 200;

/// p99 under twice the quiet one plus the transport's slack (see [`slack`]), and nothing failed.
/// What this guards against is requests that wait behind the stalled ones, which is seconds (until
/// the stalled readers' credit is reclaimed, after a 1 s stall timeout), and a session lost to
/// heartbeats that could not get through.
fn assert_isolated(transport: Transport, quiet: Latencies, loaded: Latencies) {
    assert_eq!(loaded.failures, 0, "requests failed beside the stalled readers: {loaded:?}");
    assert!(
        loaded.p99 <= quiet.p99 * 2 + slack(transport),
        "p99 beside the stalled readers {:?}, quiet {:?} ({loaded:?})",
        loaded.p99,
        quiet.p99
    );
}

/// What millisecond latencies may gain beside the stalled readers on a shared 2-core test machine
/// without anything waiting behind them.
///
/// QUIC: scheduler noise (a CI run saw p99 21.7 ms beside a quiet 5.4 ms, max 49 ms, with 5 ms of
/// slack). gRPC, in addition, its one TCP connection: the load is measured as soon as the first
/// stalled reader is reclaimed, while the other stalled uploads' windows are still crossing the
/// connection, and a request head sent then waits behind the bytes already below the transport's
/// priority lane (HTTP/2 and kernel send buffers). With a busy loop on one core that came to 30-90
/// ms, for the first 50 requests (about 0.3 s) only; the next 150 were back at the quiet p99, and
/// a CI run without the busy loop saw 74 ms once. The README's isolation section says this limit.
fn slack(transport: Transport) -> Duration {
    if matches!(transport, Transport::Grpc) { Duration::from_millis(150) } else { Duration::from_millis(25) }
}

fn session_of(h: &Harness) -> uuid::Uuid {
    h.relay().sessions().get("agent-1").expect("agent-1 is registered").session_id
}

async fn non_reading_downloads_do_not_stall_the_tunnel(transport: Transport) {
    let _serial = SERIAL.lock().await;
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: HEARTBEAT_MS, ..Default::default() })
        .await;
    let _agent = h.agent("agent-1").await;
    let session = session_of(&h);
    let quiet = h.client.latencies("app.test", "/hello", SAMPLES).await;
    let addr = h.relay().http_addr();
    let mut stalled = Vec::new();
    for _ in 0..STALLED_DOWNLOADS {
        stalled.push(non_reading_get(addr, "app.test", "/bytes/20000000").await);
    }
    // Once their buffers are full the readers count as stalled, and the budget of their address
    // is enforced: the signal that the stall is in place.
    wait_for_metric(h.relay().admin_addr(), "quictun_reclaimed_streams_total", 1.0, WAIT).await;
    let loaded = h.client.latencies("app.test", "/hello", SAMPLES).await;
    assert_isolated(transport, quiet, loaded);
    assert_eq!(session_of(&h), session, "the agent lost its session");
    drop(stalled);
}

async fn h2c_clients_with_a_zero_window_do_not_stall_the_tunnel(transport: Transport) {
    let _serial = SERIAL.lock().await;
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: HEARTBEAT_MS, ..Default::default() })
        .await;
    let _agent = h.agent("agent-1").await;
    let session = session_of(&h);
    let quiet = h.client.latencies("app.test", "/hello", SAMPLES).await;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let mut h2 = H2c::connect_with(h.relay().http_addr(), builder).await;
    let mut held = Vec::new();
    for _ in 0..STALLED_DOWNLOADS {
        held.push(h2.start("GET", "http://app.test/bytes/20000000", &[]).await);
    }
    wait_for_metric(h.relay().admin_addr(), "quictun_reclaimed_streams_total", 1.0, WAIT).await;
    let loaded = h.client.latencies("app.test", "/hello", SAMPLES).await;
    assert_isolated(transport, quiet, loaded);
    assert_eq!(session_of(&h), session, "the agent lost its session");
    drop(held);
}

async fn an_upstream_that_does_not_read_uploads_does_not_stall_the_tunnel(transport: Transport) {
    let _serial = SERIAL.lock().await;
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: HEARTBEAT_MS, ..Default::default() })
        .await;
    let mut options = h.agent_options("agent-1");
    options.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = Agent::start(options).await.unwrap();
    agent.wait_connected(None, WAIT).await.expect("agent connected");
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    let session = session_of(&h);
    let quiet = h.client.latencies("app.test", "/hello", SAMPLES).await;
    let addr = h.relay().http_addr();
    let mut uploads = Vec::new();
    for _ in 0..STALLED_UPLOADS {
        uploads.push(endless_upload(addr, "app.test", "/stall").await);
    }
    // The agent, which holds the uploads' credit, enforces its connection's budget.
    let agent_admin = agent.admin_addr().unwrap();
    wait_for_metric(agent_admin, "quictun_agent_reclaimed_streams_total", 1.0, WAIT).await;
    let loaded = h.client.latencies("app.test", "/hello", SAMPLES).await;
    assert_isolated(transport, quiet, loaded);
    assert_eq!(session_of(&h), session, "the agent lost its session");
    for upload in uploads {
        upload.abort();
    }
    h.upstream.release();
    agent.shutdown().await.unwrap();
}

on_both_transports!(
    non_reading_downloads_do_not_stall_the_tunnel,
    h2c_clients_with_a_zero_window_do_not_stall_the_tunnel,
    an_upstream_that_does_not_read_uploads_does_not_stall_the_tunnel,
);
