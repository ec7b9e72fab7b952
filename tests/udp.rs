//! UDP tunnels end to end on both transports: a `[[udp]]` port on the relay, each client address a
//! flow with its own upstream socket at the agent; datagrams from 1 B to the 65,507 B limit come
//! back to their sender byte for byte (on QUIC, the ones no DATAGRAM frame holds take the flow's
//! stream); flows idle out, or are kept by traffic; every limit drops and counts; a flow whose
//! agent goes away is set up again on the one that is left; PROXY protocol v2 names the client.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_agent::Transport;
use quictun_relay::config::UdpEntry;
use quictun_tests::{Harness, HarnessConfig, admin_get, metric, wait_for_metric};
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(10);

/// What the UDP servers behind the agent do with each datagram.
#[derive(Clone, Copy)]
enum Server {
    /// Send it back as it came.
    Echo,
    /// Send back the PROXY protocol v2 header's source address (as text) and the payload's length.
    ProxyV2,
    /// Send back the address the datagram came from (the agent's socket for the flow).
    Source,
}

/// A socket on 127.0.0.1 with 4 MiB buffers: 16 clients' 64 KB datagrams at once overflow the
/// default's 208 KiB, and the kernel drops what does not fit, even on loopback.
fn bind() -> UdpSocket {
    quictun_core::bind_udp(([127, 0, 0, 1], 0).into()).unwrap()
}

async fn udp_server(kind: Server) -> SocketAddr {
    let socket = bind();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 70_000];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let datagram = &buf[..len];
            let reply = match kind {
                Server::Echo => datagram.to_vec(),
                Server::Source => from.to_string().into_bytes(),
                Server::ProxyV2 => match ppp::v2::Header::try_from(datagram) {
                    Ok(header) => {
                        assert_eq!(header.protocol, ppp::v2::Protocol::Datagram);
                        let ppp::v2::Addresses::IPv4(addrs) = header.addresses else { panic!("IPv4") };
                        let source = SocketAddr::from((addrs.source_address, addrs.source_port));
                        format!("{source} {}", len - header.len()).into_bytes()
                    }
                    Err(err) => format!("no header: {err}").into_bytes(),
                },
            };
            let _ = socket.send_to(&reply, from).await;
        }
    });
    addr
}

/// A relay with one `[[udp]]` entry (group `web`) to a `kind` server, shaped by `edit`, and
/// `agent-1` connected.
async fn start(
    transport: Transport,
    kind: Server,
    edit: impl Fn(&mut UdpEntry) + Send + Sync + 'static,
) -> (Harness, SocketAddr, quictun_agent::Agent) {
    let server = udp_server(kind).await;
    let edit = Arc::new(edit);
    let config = HarnessConfig {
        transport,
        ..HarnessConfig::with_relay(move |relay| {
            let mut entry = UdpEntry::new(([127, 0, 0, 1], 0).into(), "web", server.to_string().parse().unwrap());
            edit(&mut entry);
            relay.udp = vec![entry];
        })
    };
    let h = Harness::start_with(config).await;
    let agent = h.agent("agent-1").await;
    let port = h.relay().udp_addrs()[0];
    (h, port, agent)
}

/// As [`start`], without the agent.
async fn relay_only(transport: Transport, kind: Server) -> (Harness, SocketAddr) {
    let server = udp_server(kind).await;
    let config = HarnessConfig {
        transport,
        ..HarnessConfig::with_relay(move |relay| {
            relay.udp = vec![UdpEntry::new(([127, 0, 0, 1], 0).into(), "web", server.to_string().parse().unwrap())];
        })
    };
    let h = Harness::start_with(config).await;
    let port = h.relay().udp_addrs()[0];
    (h, port)
}

async fn client(port: SocketAddr) -> UdpSocket {
    let socket = bind();
    socket.connect(port).await.unwrap();
    socket
}

/// Sends `datagram` and waits for one reply.
async fn exchange(socket: &UdpSocket, datagram: &[u8]) -> Vec<u8> {
    socket.send(datagram).await.unwrap();
    recv(socket, WAIT).await.expect("no reply")
}

async fn recv(socket: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 70_000];
    let len = tokio::time::timeout(within, socket.recv(&mut buf)).await.ok()?.unwrap();
    Some(buf[..len].to_vec())
}

async fn relay_metrics(h: &Harness) -> String {
    admin_get(h.relay().admin_addr(), "/metrics", None).await.text()
}

fn drops(metrics: &str, reason: &str) -> f64 {
    metric(metrics, &format!("quictun_udp_drops_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

async fn datagrams_of_every_size_come_back_to_their_sender(transport: Transport) {
    let (h, port, _agent) = start(transport, Server::Echo, |_| {}).await;
    let sizes = [1usize, 2, 100, 1_200, 1_420, 1_500, 4_096, 9_000, 16_000, 32_768, 60_000, 65_507];
    let clients: Vec<_> = futures_util::future::join_all((0..16).map(|_| client(port))).await;
    let rounds = clients.iter().enumerate().map(|(c, socket)| async move {
        for (i, size) in sizes.iter().enumerate() {
            // Each datagram is its client's and its size's own.
            let datagram: Vec<u8> = (0..*size).map(|b| (b as u8) ^ (c as u8) ^ (i as u8 * 7)).collect();
            let back = exchange(socket, &datagram).await;
            assert!(back == datagram, "client {c}: {size} B came back as {} B or changed", back.len());
        }
    });
    futures_util::future::join_all(rounds).await;
    let metrics = relay_metrics(&h).await;
    let sent = 16.0 * sizes.len() as f64;
    let to_agent = metric(&metrics, "quictun_udp_datagrams_total{direction=\"to_agent\"}").unwrap();
    let from_agent = metric(&metrics, "quictun_udp_datagrams_total{direction=\"from_agent\"}").unwrap();
    assert_eq!((to_agent, from_agent), (sent, sent), "{metrics}");
    let total: usize = sizes.iter().sum();
    let bytes = metric(&metrics, "quictun_udp_bytes_total{direction=\"to_agent\"}").unwrap();
    assert_eq!(bytes, 16.0 * total as f64);
    assert_eq!(metric(&metrics, "quictun_udp_flows"), Some(16.0), "{metrics}");
    if transport == Transport::Quic {
        // 65,507 B fits no packet: it took the flow's stream, each way.
        let oversize = metric(&metrics, "quictun_udp_oversize_total{direction=\"to_agent\"}").unwrap_or(0.0);
        assert!(oversize >= 16.0, "{metrics}");
    }
}

async fn a_flow_idles_out_unless_traffic_keeps_it(transport: Transport) {
    let (h, port, _agent) = start(transport, Server::Source, |entry| entry.idle_timeout_secs = 1).await;
    let socket = client(port).await;
    // Kept: a datagram every 300 ms for 2.5 s keeps one flow, so one upstream socket.
    let first = exchange(&socket, b"x").await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(exchange(&socket, b"x").await, first, "the flow (and its upstream socket) was kept");
    }
    // Left alone, it ends after its second of silence.
    let admin = h.relay().admin_addr();
    let started = std::time::Instant::now();
    wait_for_flows(admin, 0, Duration::from_secs(5)).await;
    let idle = started.elapsed();
    assert!(idle >= Duration::from_millis(900) && idle < Duration::from_millis(2_500), "{idle:?}");
    // The next datagram sets up a new flow, with a new upstream socket.
    assert_ne!(exchange(&socket, b"x").await, first);
}

async fn wait_for_flows(admin: SocketAddr, flows: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = admin_get(admin, "/metrics", None).await.text();
        if metric(&text, "quictun_udp_flows") == Some(flows as f64) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "flows never reached {flows}: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn every_limit_drops_and_counts(transport: Transport) {
    // max_flows: the listener carries two flows; a third client's datagram is dropped.
    let (h, port, _agent) = start(transport, Server::Echo, |entry| entry.max_flows = 2).await;
    let (a, b, c) = (client(port).await, client(port).await, client(port).await);
    exchange(&a, b"a").await;
    exchange(&b, b"b").await;
    c.send(b"c").await.unwrap();
    assert_eq!(recv(&c, Duration::from_millis(500)).await, None);
    assert_eq!(drops(&relay_metrics(&h).await, "listener_flows"), 1.0);
    drop(h);

    // max_flows_per_agent: one flow on the only agent; the second client's is dropped.
    let (h, port, _agent) = start(transport, Server::Echo, |entry| entry.max_flows_per_agent = 1).await;
    let (a, b) = (client(port).await, client(port).await);
    exchange(&a, b"a").await;
    b.send(b"b").await.unwrap();
    assert_eq!(recv(&b, Duration::from_millis(500)).await, None);
    wait_for_metric(h.relay().admin_addr(), "quictun_udp_drops_total{reason=\"agent_flows\"}", 1.0, WAIT).await;
    drop(h);

    // queue_datagrams: a burst of 300 into a new flow whose queue holds 4. What does not fit is
    // dropped and counted; everything else comes back: nothing is lost uncounted.
    let (h, port, _agent) = start(transport, Server::Echo, |entry| entry.queue_datagrams = 4).await;
    let socket = client(port).await;
    for i in 0..300u16 {
        socket.send(&i.to_be_bytes()).await.unwrap();
    }
    let mut replies = 0;
    while recv(&socket, Duration::from_millis(1_000)).await.is_some() {
        replies += 1;
    }
    let metrics = relay_metrics(&h).await;
    let dropped: f64 = ["queue_full", "tunnel_full", "socket", "closed"].iter().map(|r| drops(&metrics, r)).sum();
    assert!(drops(&metrics, "queue_full") >= 1.0, "a burst into a queue of 4 drops some: {metrics}");
    assert!(replies >= 4, "{replies}");
    assert_eq!(replies as f64 + dropped, 300.0, "every datagram came back or was counted: {metrics}");
}

async fn a_flow_moves_to_the_agent_that_is_left(transport: Transport) {
    let (h, port, first) = start(transport, Server::Source, |_| {}).await;
    let second = h.agent("agent-3").await;
    let socket = client(port).await;
    let before = exchange(&socket, b"x").await;
    // The flow is on one of the two; stop that one (its flow's stream ends with its session).
    let sessions = h.relay().sessions();
    let on_first = sessions.get("agent-1").is_some_and(|s| s.udp_flows() > 0);
    let (gone, left) = if on_first { (first, second) } else { (second, first) };
    gone.shutdown().await.unwrap();
    // The same client keeps sending; the flow is set up again on the agent that is left.
    let started = std::time::Instant::now();
    let after = loop {
        socket.send(b"x").await.unwrap();
        if let Some(reply) = recv(&socket, Duration::from_millis(200)).await {
            break reply;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the flow never came back");
    };
    assert_ne!(after, before, "a new upstream socket, at the other agent");
    assert_eq!(exchange(&socket, b"x").await, after, "and the flow stays there");
    drop(left);
}

async fn a_client_is_answered_again_once_its_agent_has_reconnected(transport: Transport) {
    let (h, port) = relay_only(transport, Server::Source).await;
    let (_agent, path) = h.agent_through_path("agent-1").await;
    let socket = client(port).await;
    exchange(&socket, b"x").await;
    let session = h.relay().sessions().get("agent-1").unwrap().session_id;
    // The agent's connection dies (kill -9 on QUIC's path, a reset on gRPC's) and the relay lets
    // the session go; then the agent can reach it again.
    path.kill_agent();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_none()).await);
    path.restore();
    // The client changed nothing and is answered again, through the reconnected session.
    let started = std::time::Instant::now();
    loop {
        socket.send(b"x").await.unwrap();
        if recv(&socket, Duration::from_millis(200)).await.is_some() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never answered again");
    }
    assert_ne!(h.relay().sessions().get("agent-1").unwrap().session_id, session);
}

async fn proxy_protocol_v2_names_the_client(transport: Transport) {
    let (_h, port, _agent) = start(transport, Server::ProxyV2, |entry| {
        entry.proxy_protocol = Some(quictun_core::proxy_protocol::ProxyProtocol::V2)
    })
    .await;
    let socket = client(port).await;
    let me = socket.local_addr().unwrap();
    for size in [1usize, 1_000, 5_000] {
        let reply = String::from_utf8(exchange(&socket, &vec![7u8; size]).await).unwrap();
        assert_eq!(
            reply,
            format!("{me} {size}"),
            "the upstream saw the client's address and the payload after the header"
        );
    }
}

quictun_tests::on_both_transports!(
    datagrams_of_every_size_come_back_to_their_sender,
    a_flow_idles_out_unless_traffic_keeps_it,
    every_limit_drops_and_counts,
    a_flow_moves_to_the_agent_that_is_left,
    proxy_protocol_v2_names_the_client,
    a_real_dns_client_resolves_through_the_tunnel,
    a_client_is_answered_again_once_its_agent_has_reconnected,
);

/// A scripted agent (quinn itself) sends what the real agent never would: DATAGRAM frames for a
/// flow that does not exist, without a whole flow id, and a flow-stream frame over the 65,507-byte
/// limit. Each is dropped and counted; the flow with the bad frame ends; the connection stays,
/// and a good datagram still reaches its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datagrams_from_an_agent_are_dropped_and_counted() {
    use quictun_proto::datagram;
    use quictun_proto::{RequestHead, ResponseHead, Target};
    use quictun_tests::quinn_peer::{read_frame, scripted_agent, write_frame};

    let server = udp_server(Server::Echo).await;
    let config = HarnessConfig::with_relay(move |relay| {
        relay.udp = vec![UdpEntry::new(([127, 0, 0, 1], 0).into(), "web", server.to_string().parse().unwrap())];
    });
    let h = Harness::start_with(config).await;
    let (_endpoint, conn, _) = scripted_agent(&h, "agent-1", "secret-1").await;
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await);
    let socket = client(h.relay().udp_addrs()[0]).await;
    socket.send(b"hello").await.unwrap();

    // The relay sets the flow up on a stream, with the first datagram behind the head.
    let (mut send, mut flow_stream) = tokio::time::timeout(WAIT, conn.accept_bi()).await.unwrap().unwrap();
    let (head, mut rest): (RequestHead, bytes::Bytes) = read_frame(&mut flow_stream, 65_536).await.unwrap();
    let Target::Udp(flow) = head.target else { panic!("{:?}", head.target) };
    while rest.len() < 7 {
        let chunk = flow_stream.read_chunk(65_536, true).await.unwrap().unwrap();
        rest = [rest, chunk.bytes].concat().into();
    }
    assert_eq!(&rest[..], b"\x00\x05hello");
    write_frame(&mut send, &ResponseHead { status: 200, headers: vec![], framed_body: false }, 65_536).await;

    let metrics = h.relay().admin_addr();
    conn.send_datagram(datagram::encode(flow.flow + 1_000, b"nobody").unwrap()).unwrap();
    conn.send_datagram(bytes::Bytes::from_static(&[0x40])).unwrap();
    conn.send_datagram(bytes::Bytes::from_static(&[0xc0, 0, 0])).unwrap();
    conn.send_datagram(datagram::encode(flow.flow, b"reply").unwrap()).unwrap();
    assert_eq!(recv(&socket, WAIT).await.unwrap(), b"reply", "a good datagram still arrives");
    wait_for_metric(metrics, "quictun_udp_drops_total{reason=\"unknown_flow\"}", 1.0, WAIT).await;
    wait_for_metric(metrics, "quictun_udp_drops_total{reason=\"malformed\"}", 2.0, WAIT).await;

    // A length over the limit on the flow's stream ends that flow, and only it: the relay sets
    // the client's flow up again, under a new id, on the same connection.
    send.write_all(&[0xff, 0xff, 0]).await.unwrap();
    wait_for_metric(metrics, "quictun_udp_drops_total{reason=\"malformed\"}", 3.0, WAIT).await;
    let (_send, mut again) = tokio::time::timeout(WAIT, conn.accept_bi()).await.unwrap().unwrap();
    let (head, _): (RequestHead, bytes::Bytes) = read_frame(&mut again, 65_536).await.unwrap();
    assert!(matches!(head.target, Target::Udp(ref next) if next.flow != flow.flow), "{:?}", head.target);
    conn.send_datagram(datagram::encode(flow.flow, b"late").unwrap()).unwrap();
    wait_for_metric(metrics, "quictun_udp_drops_total{reason=\"unknown_flow\"}", 2.0, WAIT).await;
    assert!(conn.close_reason().is_none(), "the connection stays");
}

/// A small DNS server: `A` queries get 192.0.2.1; `TXT` queries get fifteen 250-byte strings
/// (an answer of about 4 KB, as EDNS allows); the query's OPT record is answered with one
/// offering 4,096 bytes.
async fn dns_server() -> SocketAddr {
    let socket = bind();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4_096];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            if let Some(answer) = dns_answer(&buf[..len]) {
                let _ = socket.send_to(&answer, from).await;
            }
        }
    });
    addr
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    let question = &query[12..end + 5];
    let mut records: Vec<Vec<u8>> = Vec::new();
    let record = |rtype: u16, data: &[u8]| {
        let mut rr = vec![0xc0, 0x0c];
        rr.extend_from_slice(&rtype.to_be_bytes());
        rr.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        rr.extend_from_slice(&(data.len() as u16).to_be_bytes());
        rr.extend_from_slice(data);
        rr
    };
    match qtype {
        1 => records.push(record(1, &[192, 0, 2, 1])),
        16 => {
            for i in 0..15u8 {
                let mut text = vec![250u8];
                text.extend(std::iter::repeat_n(b'a' + i, 250));
                records.push(record(16, &text));
            }
        }
        _ => {}
    }
    let mut answer = query[..2].to_vec();
    answer.extend_from_slice(&[0x84, 0x00, 0, 1]);
    answer.extend_from_slice(&(records.len() as u16).to_be_bytes());
    answer.extend_from_slice(&[0, 0, 0, 1]);
    answer.extend_from_slice(question);
    for rr in records {
        answer.extend_from_slice(&rr);
    }
    answer.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    Some(answer)
}

/// `dig` (Debian's dnsutils) at `port`: its output.
async fn dig(port: SocketAddr, args: &[&str]) -> String {
    let output = tokio::process::Command::new("dig")
        .args([format!("@{}", port.ip()), "-p".into(), port.port().to_string()])
        .args(["+tries=1", "+time=5"])
        .args(args)
        .output()
        .await
        .expect("dig (Debian's dnsutils) runs");
    assert!(output.status.success(), "dig failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

async fn a_real_dns_client_resolves_through_the_tunnel(transport: Transport) {
    let dns = dns_server().await;
    let config = HarnessConfig {
        transport,
        ..HarnessConfig::with_relay(move |relay| {
            relay.udp = vec![UdpEntry::new(([127, 0, 0, 1], 0).into(), "web", dns.to_string().parse().unwrap())];
        })
    };
    let h = Harness::start_with(config).await;
    let _agent = h.agent("agent-1").await;
    let port = h.relay().udp_addrs()[0];
    assert_eq!(dig(port, &["example.test", "A", "+short"]).await.trim(), "192.0.2.1");
    // An EDNS answer of about 4 KB arrives whole, without truncation.
    let big = dig(port, &["big.test", "TXT", "+bufsize=4096"]).await;
    let records = big.lines().filter(|line| line.contains("\tTXT\t")).count();
    let size: usize = big
        .lines()
        .find_map(|line| line.strip_prefix(";; MSG SIZE  rcvd: "))
        .and_then(|size| size.trim().parse().ok())
        .unwrap_or_else(|| panic!("{big}"));
    assert_eq!(records, 15, "{big}");
    assert!(size > 3_900, "{big}");
    assert!(!big.contains("flags: qr tc") && !big.contains(" tc "), "not truncated: {big}");
}

/// Connection migration: the agent's QUIC endpoint moves to a new socket in the middle of a flow.
/// The flow goes on, on the same session and the same upstream socket: nothing is set up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_survives_the_agent_moving_to_a_new_socket() {
    let (h, port) = relay_only(Transport::Quic, Server::Source).await;
    let mut options = h.agent_options("agent-1");
    options.bind = Some("127.0.0.1:0".parse().unwrap());
    let agent = h.agent_with(options).await;
    let session = h.relay().sessions().get("agent-1").unwrap().session_id;
    let socket = client(port).await;
    let before = exchange(&socket, b"x").await;
    let old_local = agent.local_addr().unwrap();
    let new_local = agent.rebind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_ne!(new_local, old_local);
    for _ in 0..20 {
        assert_eq!(exchange(&socket, b"x").await, before, "the same flow, the same upstream socket");
    }
    let relay_sees = h.relay().sessions().get("agent-1").unwrap();
    assert_eq!((relay_sees.session_id, relay_sees.remote()), (session, new_local));
}
