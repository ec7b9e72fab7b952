//! Isolation: readers that stop reading must not delay anyone else's requests, nor cost the agent
//! its session, on either transport. The stalled readers are clients that never read their
//! downloads (HTTP/1.1 with a 4 KiB receive buffer, and h2c with a zero flow-control window) and
//! an upstream that never reads uploads. Their number is chosen so that, without the
//! stalled-reader budgets, the credit they hold would be over them (`quictun_core::stall`): the
//! test sees the budgets enforced (`reclaimed_streams`) and everyone else served as before.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use quictun_tests::client::{Latencies, wait_for_metric};
use quictun_tests::raw::{H2c, endless_upload, non_reading_get};
use quictun_tests::{Harness, HarnessConfig, Transport, admin_get, metric, on_both_transports};

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
/// Requests per measurement: the p99 is the tenth slowest, so that a hiccup or two of a shared
/// machine is not what the test compares.
const SAMPLES: usize = 1000;
/// Requests measured right after the budgets first act, while the stalled bodies still move.
const FIRST_SAMPLES: usize = 100;

/// The claim of docs/isolation.md: beside the stalled readers, once the budgets have acted, everyone else's
/// p99 stays within twice its quiet value (plus one millisecond, the timer wheel's tick, which is
/// what a quiet p99 of about a millisecond can gain from one late wake-up).
fn assert_isolated(transport: Transport, quiet: Latencies, settled: Latencies) {
    assert_eq!(settled.failures, 0, "requests failed beside the stalled readers: {settled:?}");
    assert!(
        settled.p99 <= quiet.p99 * 2 + Duration::from_millis(1),
        "{transport:?}: p99 beside the stalled readers {:?}, quiet {:?} ({settled:?})",
        settled.p99,
        quiet.p99
    );
}

/// While the budgets first act, nothing waits behind the stalled readers, which would take their
/// stall timeout (1 s) or longer. On QUIC the slowest of the first requests stays under 10 ms (its
/// streams share no queue; 1-2 ms seen). On gRPC a head sent then can wait behind the stalled
/// bodies' bytes already queued on its one TCP connection: 30-90 ms seen on a busy 2-core machine,
/// for about 0.3 s (docs/isolation.md says so); bound at 150 ms.
fn assert_nothing_waited(transport: Transport, first: Latencies) {
    assert_eq!(first.failures, 0, "requests failed while the budgets acted: {first:?}");
    let allowed = if transport == Transport::Grpc { Duration::from_millis(150) } else { Duration::from_millis(10) };
    assert!(first.max <= allowed, "{transport:?}: a request waited {:?} while the budgets acted", first.max);
}

/// The quiet latencies of `h`'s `app.test`, after a warm-up (the first requests of a process pay
/// for its connection pools and allocations).
async fn quiet(h: &Harness) -> Latencies {
    h.client.latencies("app.test", "/hello", 100).await;
    h.client.latencies("app.test", "/hello", SAMPLES).await
}

/// Waits until every one of `n` stalled readers is either stalled or reclaimed, on the admin
/// endpoint `admin` (metric names after `prefix`): the budgets have done their work and the
/// stalled bodies have stopped moving.
async fn wait_settled(admin: std::net::SocketAddr, prefix: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = admin_get(admin, "/metrics", None).await.text();
        let stalled = metric(&text, &format!("{prefix}stalled_streams")).unwrap_or(0.0);
        let reclaimed = metric(&text, &format!("{prefix}reclaimed_streams_total")).unwrap_or(0.0);
        if stalled + reclaimed >= n as f64 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stalled} stalled and {reclaimed} reclaimed, never {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The three measurements of a scenario, printed and checked.
async fn measure_beside_stalled_readers(
    h: &Harness,
    transport: Transport,
    quiet: Latencies,
    admin: std::net::SocketAddr,
    prefix: &str,
    n: usize,
) {
    // Once their buffers are full the readers count as stalled, and the budgets are enforced: the
    // signal that the stall is in place.
    wait_for_metric(admin, &format!("{prefix}reclaimed_streams_total"), 1.0, WAIT).await;
    let first = h.client.latencies("app.test", "/hello", FIRST_SAMPLES).await;
    wait_settled(admin, prefix, n).await;
    let settled = h.client.latencies("app.test", "/hello", SAMPLES).await;
    eprintln!("{transport:?}: quiet {quiet:?}\n  first {first:?}\n  settled {settled:?}");
    assert_nothing_waited(transport, first);
    assert_isolated(transport, quiet, settled);
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
    let quiet = quiet(&h).await;
    let addr = h.relay().http_addr();
    let mut stalled = Vec::new();
    for _ in 0..STALLED_DOWNLOADS {
        stalled.push(non_reading_get(addr, "app.test", "/bytes/20000000").await);
    }
    measure_beside_stalled_readers(&h, transport, quiet, h.relay().admin_addr(), "quictun_", STALLED_DOWNLOADS).await;
    assert_eq!(session_of(&h), session, "the agent lost its session");
    drop(stalled);
}

async fn h2c_clients_with_a_zero_window_do_not_stall_the_tunnel(transport: Transport) {
    let _serial = SERIAL.lock().await;
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: HEARTBEAT_MS, ..Default::default() })
        .await;
    let _agent = h.agent("agent-1").await;
    let session = session_of(&h);
    let quiet = quiet(&h).await;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let mut h2 = H2c::connect_with(h.relay().http_addr(), builder).await;
    let mut held = Vec::new();
    for _ in 0..STALLED_DOWNLOADS {
        held.push(h2.start("GET", "http://app.test/bytes/20000000", &[]).await);
    }
    measure_beside_stalled_readers(&h, transport, quiet, h.relay().admin_addr(), "quictun_", STALLED_DOWNLOADS).await;
    assert_eq!(session_of(&h), session, "the agent lost its session");
    drop(held);
}

async fn an_upstream_that_does_not_read_uploads_does_not_stall_the_tunnel(transport: Transport) {
    let _serial = SERIAL.lock().await;
    let h = Harness::start_with(HarnessConfig { transport, heartbeat_interval_ms: HEARTBEAT_MS, ..Default::default() })
        .await;
    let mut options = h.agent_options("agent-1");
    options.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let agent = h.agent_with(options).await;
    let session = session_of(&h);
    let quiet = quiet(&h).await;
    let addr = h.relay().http_addr();
    let mut uploads = Vec::new();
    for _ in 0..STALLED_UPLOADS {
        uploads.push(endless_upload(addr, "app.test", "/stall").await);
    }
    // The agent, which holds the uploads' credit, enforces its connection's budget.
    let agent_admin = agent.admin_addr().unwrap();
    measure_beside_stalled_readers(&h, transport, quiet, agent_admin, "quictun_agent_", STALLED_UPLOADS).await;
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
