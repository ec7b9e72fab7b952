//! Per-address budgets, end to end: requests in flight per client address, the minimum upload
//! pace (408), agent connections not registered yet per network, and the first-byte timeout of a
//! new ingress connection, on both transports. The hostile clients come from 127.0.0.1 (or
//! 127.0.2.0/24); the well-behaved ones from another address (127.0.1.1, or 127.0.0.1 for the real
//! agent), as a different client would.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use quictun_agent::Agent;
use quictun_core::Trust;
use quictun_relay::config::RelaySection;
use quictun_tests::client::wait_for_metric;
use quictun_tests::raw::RawReply;
use quictun_tests::{Harness, HarnessConfig, Transport, admin_get, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// The harness's knobs on `transport`, with `edit` applied to the `[relay]` section.
fn with_relay(transport: Transport, edit: impl Fn(&mut RelaySection) + Send + Sync + 'static) -> HarnessConfig {
    HarnessConfig { transport, ..HarnessConfig::with_relay(move |config| edit(&mut config.relay)) }
}

/// A TCP connection to `addr` from `source` (any 127.x address works on loopback).
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `GET path` for `app.test` from `source` on a fresh connection; reads to the close.
async fn get_from(source: &str, addr: SocketAddr, path: &str) -> RawReply {
    let mut stream = connect_from(source, addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await.expect("no answer").unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    RawReply { status: text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), text }
}

async fn one_address_cannot_take_every_stream_of_an_agent(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        r.max_requests_per_ip = 4;
        r.min_upload_rate = 0;
    }))
    .await;
    let _agent = h.agent("agent-1").await;
    let addr = h.relay().http_addr();
    // Slow uploads from one address: 4 are taken, the rest refused at once.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut stream = connect_from("127.0.0.1", addr).await;
        stream.write_all(b"POST /echo HTTP/1.1\r\nhost: app.test\r\ncontent-length: 100000\r\n\r\nx").await.unwrap();
        held.push(stream);
    }
    let admin = h.relay().admin_addr();
    let refused = wait_for_metric(admin, "quictun_rejects_total{reason=\"ip_requests\"}", 6.0, WAIT).await;
    assert_eq!(refused, 6.0);
    // Another address is served as usual.
    let reply = get_from("127.0.1.1", addr, "/hello").await;
    assert_eq!((reply.status, reply.body()), (200, "hello"), "{}", reply.text);
    // The refused ones were told so; the taken ones are being echoed. Which is which depends on
    // the order the relay read them in, not the order they connected in.
    let mut answers = Vec::new();
    for stream in &mut held {
        let mut answer = vec![0u8; 512];
        let n = tokio::time::timeout(WAIT, stream.read(&mut answer)).await.unwrap().unwrap();
        answers.push(String::from_utf8_lossy(&answer[..n]).into_owned());
    }
    let refusals = answers.iter().filter(|a| a.starts_with("HTTP/1.1 503") && a.contains("retry-after: 1")).count();
    let echoed = answers.iter().filter(|a| a.starts_with("HTTP/1.1 200")).count();
    assert_eq!((refusals, echoed), (6, 4), "{answers:#?}");
}

async fn an_upload_slower_than_the_minimum_pace_gets_408(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| r.min_upload_rate = 1000)).await;
    let _agent = h.agent("agent-1").await;
    let mut stream = connect_from("127.0.0.1", h.relay().http_addr()).await;
    stream.write_all(b"POST /sha256 HTTP/1.1\r\nhost: app.test\r\ncontent-length: 100000\r\n\r\n").await.unwrap();
    // One byte a second, against a minimum of 1000: cut after one 10 s window.
    let trickle = async {
        loop {
            if stream.write_all(b"x").await.is_err() {
                return;
            }
            let mut peek = [0u8; 1];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), stream.peek(&mut peek)).await
                && n > 0
            {
                return;
            }
        }
    };
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), trickle).await.expect("the slow upload was never cut");
    let mut answer = String::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"upload_too_slow\"}"), Some(1.0), "{text}");
}

async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        r.header_read_timeout_secs = 1;
        r.keep_alive_timeout_secs = 75;
    }))
    .await;
    let mut silent = connect_from("127.0.0.1", h.relay().http_addr()).await;
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0))), "not closed quietly: {read:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "held {:?}", started.elapsed());
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"first_byte_timeout\"}"), Some(1.0), "{text}");
}

/// A connection to the relay's agent listener of `transport`, from `source`, that never
/// registers: a QUIC handshake completed and nothing sent (QUIC), a TCP connection that starts no
/// TLS (gRPC: the relay admits connections as it accepts them). `None` when the relay refused it
/// (QUIC: before any cryptography; gRPC: closed at once).
async fn unregistered_connection(transport: Transport, source: &str, h: &Harness) -> Option<Unregistered> {
    if transport == Transport::Grpc {
        let mut stream = connect_from(source, h.agent_target()).await;
        // A refused connection is closed at once; an admitted one is held (handshake_timeout_ms).
        let mut byte = [0u8; 1];
        return match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut byte)).await {
            Ok(_) => None,
            Err(_) => Some(Unregistered::Tcp(stream)),
        };
    }
    let bind: SocketAddr = format!("{source}:0").parse().unwrap();
    let endpoint = quictun_tests::quinn_peer::client_endpoint(bind, &Trust::Pin(h.cert.pin));
    let connecting = endpoint.connect(h.agent_target(), "localhost").unwrap();
    tokio::time::timeout(WAIT, connecting).await.expect("handshake hung").ok().map(Unregistered::Quic)
}

/// A held [`unregistered_connection`].
#[allow(dead_code)]
enum Unregistered {
    Quic(quinn::Connection),
    Tcp(TcpStream),
}

async fn one_network_cannot_fill_the_slots_of_unregistered_connections(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        // 9 general places (and 3 kept for known agent networks): one network alone gets 4.
        r.max_pending_connections = 12;
        r.max_pending_per_network = 4;
        r.handshake_rate_per_ip = 0;
        r.register_timeout_secs = 30;
        r.handshake_timeout_ms = 30_000;
    }))
    .await;
    // Four connections from 127.0.2.0/24 that never register hold that network's places…
    let mut held = Vec::new();
    for i in 2..6 {
        held.push(unregistered_connection(transport, &format!("127.0.2.{i}"), &h).await.expect("admitted"));
    }
    // …so a fifth from the same network is refused (QUIC: before any cryptography).
    assert!(unregistered_connection(transport, "127.0.2.9", &h).await.is_none(), "a fifth from one network admitted");
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"pending_network\"}"), Some(1.0), "{text}");
    // A real agent from another network (127.0.0.1) registers while they are still pending.
    let agent = Agent::start(h.agent_options("agent-1")).await.unwrap();
    assert!(agent.wait_connected(None, WAIT).await.is_some(), "the real agent was kept out");
    drop(held);
    agent.shutdown().await.unwrap();
}

/// A connection that does not complete its handshake and open its control channel within
/// `handshake_timeout_ms` is closed, and its place given back.
async fn a_silent_agent_connection_is_closed_at_the_handshake_deadline(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        // Longer than the 500 ms in which `unregistered_connection` tells admitted from refused.
        r.handshake_timeout_ms = 1500;
        r.register_timeout_secs = 30;
    }))
    .await;
    let started = tokio::time::Instant::now();
    match unregistered_connection(transport, "127.0.2.40", &h).await.expect("admitted") {
        Unregistered::Quic(conn) => {
            tokio::time::timeout(WAIT, conn.closed()).await.expect("never closed");
        }
        Unregistered::Tcp(mut stream) => {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(WAIT, stream.read(&mut byte)).await.expect("never closed");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
    }
    let closed_after = started.elapsed();
    let deadline = Duration::from_millis(1500);
    assert!(
        closed_after >= deadline && closed_after < deadline * 2,
        "closed after {closed_after:?}, the deadline is 1.5 s"
    );
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    assert_eq!(metric(&text, "quictun_rejects_total{reason=\"handshake_timeout\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "quictun_pending_agent_connections"), Some(0.0), "{text}");
}

/// New connections from one address beyond its handshake rate are refused before any
/// cryptography, on either transport (a burst of 2, then 1 a second).
async fn new_connections_from_one_address_are_held_to_its_handshake_rate(transport: Transport) {
    let h = Harness::start_with(with_relay(transport, |r| {
        r.handshake_rate_per_ip = 1;
        r.handshake_burst_per_ip = 2;
        r.register_timeout_secs = 30;
        r.handshake_timeout_ms = 30_000;
    }))
    .await;
    let mut admitted = Vec::new();
    for _ in 0..6 {
        admitted.push(unregistered_connection(transport, "127.0.2.77", &h).await);
    }
    let through = admitted.iter().filter(|c| c.is_some()).count();
    assert!((2..=3).contains(&through), "{through} of 6 connections got through a burst of 2 at 1 a second");
    let text = admin_get(h.relay().admin_addr(), "/metrics", None).await.text();
    let refused = metric(&text, "quictun_rejects_total{reason=\"handshake_rate\"}").unwrap_or(0.0);
    assert_eq!(refused as usize, 6 - through, "{text}");
    // Another address is not affected.
    assert!(unregistered_connection(transport, "127.0.3.1", &h).await.is_some());
}

quictun_tests::on_both_transports!(
    a_silent_agent_connection_is_closed_at_the_handshake_deadline,
    new_connections_from_one_address_are_held_to_its_handshake_rate,
    one_address_cannot_take_every_stream_of_an_agent,
    an_upload_slower_than_the_minimum_pace_gets_408,
    a_connection_that_sends_nothing_is_closed_after_the_header_timeout,
    one_network_cannot_fill_the_slots_of_unregistered_connections,
);
