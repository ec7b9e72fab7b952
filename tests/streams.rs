//! Bad streams and vanished peers: a malformed head frame resets one stream and nothing else; a
//! peer that goes silent is dropped by the heartbeats, on either transport, before the transport
//! itself would notice.
//!
//! One side is always the real relay or the real agent; the other side is scripted with the same
//! wire crate, over real QUIC on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::StatusCode;
use quictun_agent::Agent;
use quictun_core::Trust;
use quictun_core::tls::GeneratedCert;
use quictun_proto::frame;
use quictun_proto::*;
use quictun_quic::Tuning;
use quictun_tests::quinn_peer::{self, Control, read_frame, scripted_agent, write_frame};
use quictun_tests::{Harness, HarnessConfig, Transport, Upstream};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn head(path: &str) -> RequestHead {
    RequestHead {
        target: Target::Http("app".into()),
        request_id: Uuid::new_v4(),
        method: "GET".into(),
        uri: path.into(),
        headers: vec![Header { name: "host".into(), value: b"app.test".to_vec() }],
        has_body: false,
        framed_body: false,
    }
}

/// Opens a stream, writes `bytes`, finishes, and returns the reset code the peer answered with.
async fn reset_code_for(conn: &quinn::Connection, bytes: &[u8]) -> Option<StreamCode> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    match tokio::time::timeout(WAIT, recv.read_to_end(1 << 20)).await.expect("peer never answered") {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => StreamCode::from_u64(code.into_inner()),
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// Frames that must each be reset with the given code.
fn bad_frames() -> Vec<(&'static str, Vec<u8>, StreamCode)> {
    let mut unknown_kind = frame::encode(&head("/hello"), 65536).unwrap();
    unknown_kind[frame::LEN_PREFIX] = 7; // the Target variant index
    // Target::Http("app") read as Target::Tcp("app"): not host:port, refused when decoded.
    let mut bad_address = frame::encode(&head("/hello"), 65536).unwrap();
    bad_address[frame::LEN_PREFIX] = 1;
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0; 10]);
    let mut too_many_headers = head("/hello");
    too_many_headers.headers = (0..1000).map(|i| Header { name: format!("x-{i}"), value: vec![] }).collect();
    vec![
        ("garbage payload", vec![0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff], StreamCode::Malformed),
        ("length over the limit", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3], StreamCode::HeadTooLarge),
        ("unknown stream kind", unknown_kind, StreamCode::Malformed),
        ("tcp target that is not host:port", bad_address, StreamCode::Malformed),
        ("truncated frame", truncated, StreamCode::Malformed),
        ("too many headers", frame::encode(&too_many_headers, 1 << 20).unwrap(), StreamCode::Malformed),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resets_malformed_streams_and_keeps_serving_the_others() {
    quictun_tests::init_logging();
    let upstream = Upstream::start().await;
    let cert = GeneratedCert::self_signed(&[]).unwrap();
    let endpoint = quinn_peer::server_endpoint("127.0.0.1:0".parse().unwrap(), cert.cert_key().unwrap());

    // The real agent, pointed at a scripted relay.
    let mut options = Harness::options_for(endpoint.local_addr().unwrap(), "agent-1", "t", &cert.pin.to_string());
    options.tuning = Tuning::default();
    let agent = Agent::start(options).await.unwrap();

    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (send, recv) = conn.accept_bi().await.unwrap();
    let mut control = Control::new(send, recv);
    assert!(matches!(control.recv().await.unwrap(), ControlMessage::Register(r) if r.client_id == "agent-1"));
    let config =
        AgentConfig { version: 1, upstreams: vec![UpstreamSpec { name: "app".into(), targets: vec![upstream.url()] }] };
    control
        .send(ControlMessage::Accepted(Accepted {
            session_id: Uuid::new_v4(),
            heartbeat_interval_ms: 1000,
            heartbeat_misses: 3,
            config,
        }))
        .await;
    let session = agent.wait_connected(None, WAIT).await.unwrap();
    // Answer the agent's heartbeats like a relay would.
    tokio::spawn(async move {
        while let Some(msg) = control.recv().await {
            if let ControlMessage::Heartbeat(hb) = msg {
                control.send(ControlMessage::HeartbeatAck(hb)).await;
            }
        }
    });

    // A request in flight before the bad streams arrive.
    let (mut long_send, mut long_recv) = conn.open_bi().await.unwrap();
    write_frame(&mut long_send, &head("/hang"), 65536).await;
    long_send.finish().unwrap();
    upstream.wait_hanging(1).await;

    for (what, bytes, code) in bad_frames() {
        assert_eq!(reset_code_for(&conn, &bytes).await, Some(code), "{what}");
    }
    // A stream for an upstream the agent does not know.
    let mut unknown = head("/hello");
    unknown.target = Target::Http("nope".into());
    assert_eq!(
        reset_code_for(&conn, &frame::encode(&unknown, 65536).unwrap()).await,
        Some(StreamCode::UnknownUpstream)
    );

    // Framed request bodies: a well-formed one (data, then trailers) is echoed; one with an
    // unknown body-frame type ends in a reset of that stream only.
    let mut framed = head("/echo");
    (framed.method, framed.has_body, framed.framed_body) = ("POST".into(), true, true);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "1".parse().unwrap());
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &framed, 65536).await;
    send.write_all(&[0, 0, 0, 0, 3]).await.unwrap();
    send.write_all(b"abc").await.unwrap();
    send.write_all(&quictun_core::framing::encode_trailers_frame(&trailers, 4096).unwrap()).await.unwrap();
    send.finish().unwrap();
    let (response, start): (ResponseHead, _) =
        tokio::time::timeout(WAIT, read_frame(&mut recv, 65536)).await.unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(body_after(start, &mut recv).await, b"abc");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &framed, 65536).await;
    send.write_all(&[9, 0, 0, 0, 1, b'x']).await.unwrap();
    send.finish().unwrap();
    let ended_in_reset = match tokio::time::timeout(WAIT, read_frame::<ResponseHead>(&mut recv, 65536)).await {
        Ok(None) => true,
        // A reset after the head (whatever of the body came with it).
        Ok(Some(_head)) => matches!(
            tokio::time::timeout(WAIT, recv.read_to_end(1024)).await.unwrap(),
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))
        ),
        Err(_) => panic!("the agent never answered a malformed framed body"),
    };
    assert!(ended_in_reset, "a malformed framed body must not end in a clean response");

    // A good stream is served next to them.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &head("/hello"), 65536).await;
    send.finish().unwrap();
    let (response, start): (ResponseHead, _) = read_frame(&mut recv, 65536).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(body_after(start, &mut recv).await, b"hello");

    // The in-flight request was never disturbed.
    upstream.release();
    let (response, start): (ResponseHead, _) =
        tokio::time::timeout(WAIT, read_frame(&mut long_recv, 65536)).await.unwrap().unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(body_after(start, &mut long_recv).await, b"released");

    assert!(conn.close_reason().is_none(), "the connection must survive bad streams");
    assert_eq!(agent.wait_connected(None, WAIT).await, Some(session));
    agent.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_resets_malformed_agent_streams_and_keeps_the_session() {
    let h = Harness::start().await;
    let _api = h.agent("agent-2").await;
    let (_endpoint, conn, session_id) = scripted_agent(&h, "agent-1", "secret-1").await;
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);

    for (what, bytes, code) in bad_frames() {
        assert_eq!(reset_code_for(&conn, &bytes).await, Some(code), "{what}");
    }
    // A well-formed stream of a kind the relay does not take from agents (egress is HTTP only).
    let mut tcp = head("/x");
    tcp.target = Target::Tcp("127.0.0.1:22".parse().unwrap());
    assert_eq!(reset_code_for(&conn, &frame::encode(&tcp, 65536).unwrap()).await, Some(StreamCode::KindUnsupported));

    assert!(conn.close_reason().is_none());
    assert_eq!(h.relay().sessions().get("agent-1").unwrap().session_id, session_id);
    assert_eq!(h.client.get("api.test", "/hello").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_control_frame_closes_only_that_connection() {
    let h = Harness::start().await;
    let _api = h.agent("agent-2").await;
    let endpoint = quinn_peer::client_endpoint("127.0.0.1:0".parse().unwrap(), &Trust::Pin(h.cert.pin));
    for bytes in [vec![0xff, 0xff, 0xff, 0xff], vec![0, 0, 0, 3, 9, 9, 9]] {
        let conn = endpoint.connect(h.relay().quic_addr().expect("QUIC listener"), "localhost").unwrap().await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(WAIT, conn.closed()).await.expect("relay kept a bad connection");
        assert_eq!(quinn_peer::peer_close_code(&reason), Some(CloseCode::Protocol), "{reason}");
    }
    assert_eq!(h.relay().sessions().len(), 1);
    assert_eq!(h.client.get("api.test", "/hello").await.status, StatusCode::OK);
}

/// How long the harness's relay lets an agent stay silent: heartbeats every 200 ms, 3 misses.
const HEARTBEAT_SILENCE: Duration = Duration::from_millis(3 * 200);

/// An agent that vanishes without a word (its path black-holed, then the process stopped: its
/// close never arrives) is found by the control session's heartbeats. The bound is twice their
/// silence limit (1.2 s): below QUIC's idle timeout (2 s) and gRPC's HTTP/2 PING timeout (1 s + 2
/// s), so only the heartbeats can meet it.
async fn a_vanished_agent_is_dropped_by_its_heartbeats_before_the_transport_notices(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    assert_eq!(h.config.heartbeat_interval_ms, 200);
    let (agent, path) = h.agent_through_path("agent-1").await;

    let client = h.client.clone();
    let hanging = tokio::spawn(async move { client.get("app.test", "/hang").await });
    h.upstream.wait_hanging(1).await;
    path.blackhole();
    agent.abort();
    let vanished = std::time::Instant::now();
    let reply = tokio::time::timeout(WAIT, hanging).await.expect("request hung on a dead agent").unwrap();
    let answered = vanished.elapsed();
    eprintln!("{transport:?}: vanished agent's request answered {} ms later", answered.as_millis());
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert!(answered <= HEARTBEAT_SILENCE * 2, "{transport:?}: the 502 came {answered:?} after the agent vanished");
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await);
    h.upstream.release();
}

quictun_tests::on_both_transports!(a_vanished_agent_is_dropped_by_its_heartbeats_before_the_transport_notices);

/// The agent's QUIC keep-alive and idle timeout are its own to set, and QUIC uses the smaller
/// idle timeout of the two ends: an agent set to 800 ms is found dead by the relay within 1.5
/// times that, with the heartbeats (5 s) and the relay's silence check out of the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_own_idle_timeout_is_the_connections() {
    const IDLE: Duration = Duration::from_millis(800);
    let config = HarnessConfig {
        heartbeat_interval_ms: 5000,
        ..HarnessConfig::with_relay(|config| config.relay.silence_check_ms = 0)
    };
    let h = Harness::start_with(config).await;
    let path = quictun_tests::AgentPath::start(Transport::Quic, h.relay().quic_addr().expect("QUIC listener")).await;
    let mut options = Harness::options_for(path.addr(), "agent-1", "secret-1", &h.cert.pin.to_string());
    (options.tuning.keep_alive, options.tuning.idle_timeout) = (Duration::from_millis(200), IDLE);
    let agent = h.agent_with(options).await;
    path.blackhole();
    let cut = std::time::Instant::now();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await);
    let dropped = cut.elapsed();
    eprintln!(
        "the relay dropped an agent with a {IDLE:?} idle timeout {} ms after its path went silent",
        dropped.as_millis()
    );
    assert!(dropped <= IDLE * 3 / 2, "dropped after {dropped:?}");
    agent.abort();
}

/// The body of a stream whose head was read: the bytes read with the head, then the rest.
async fn body_after(start: bytes::Bytes, recv: &mut quinn::RecvStream) -> Vec<u8> {
    let mut body = start.to_vec();
    body.extend(tokio::time::timeout(WAIT, recv.read_to_end(1024)).await.unwrap().unwrap());
    body
}
