//! The edge's second round: each finding of the probe that re-tested the relay's edge, replayed
//! against the real binary with the probe's numbers, and what a legitimate client and a new
//! agent must still see beside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quictun_core::Trust;
use quictun_proto::{ControlMessage, GoAway, PROTOCOL_VERSION, Register, Token, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::hostile::on_own_thread;
use crate::scene::{Scene, WAIT, client, latencies, p99, privileged, request};

/// Peer-supplied strings as the probe sent them: a newline that would forge a line, a carriage
/// return that would hide one, an escape sequence and a bell for the reader's terminal, 60 KB.
fn evil_strings() -> Vec<(&'static str, String)> {
    vec![
        ("lf", "EVILlf\nFORGED INFO quictun: forged line".to_owned()),
        ("cr", "EVILcr\rFORGED".to_owned()),
        ("esc", "EVILesc\x1b[2J\x1b]0;owned\x07".to_owned()),
        ("bel", "EVILbel\x07\x07".to_owned()),
        ("60k", format!("EVIL60k{}", "x".repeat(60_000))),
    ]
}

/// A QUIC connection from 127.0.0.1 that sends `register`, then (when the relay accepts it)
/// goes away with `reason`; returns the relay's answer to the register.
async fn register_raw(relay: SocketAddr, pin: &str, register: Register, reason: &str) -> Option<ControlMessage> {
    let trust = Trust::Pin(pin.parse().unwrap());
    let (tls, _) = quictun_core::tls::client_config(&trust).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(relay, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame::encode(&ControlMessage::Register(register), 128 * 1024).unwrap()).await.unwrap();
    let answer = tokio::time::timeout(WAIT, first_frame(&mut recv)).await.ok()??;
    if matches!(answer, ControlMessage::Accepted(_)) {
        let go = ControlMessage::GoAway(GoAway { reason: reason.to_owned(), drain_ms: 0 });
        send.write_all(&frame::encode(&go, 128 * 1024).unwrap()).await.unwrap();
        let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    }
    endpoint.close(0u32.into(), b"done");
    Some(answer)
}

/// The first control message on `recv`.
async fn first_frame(recv: &mut quinn::RecvStream) -> Option<ControlMessage> {
    let mut buf = Vec::new();
    loop {
        if let Some((msg, _)) = frame::decode::<ControlMessage>(&buf, 128 * 1024).ok()? {
            return Some(msg);
        }
        let chunk = recv.read_chunk(64 * 1024, true).await.ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// One request written as raw bytes on a fresh connection; what came back before the relay
/// closed it (or 10 s passed).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    answer
}

/// Waits until the relay's log holds `count` lines containing `needle`; the log's text.
async fn log_until(scene: &Scene, needle: &str, count: usize) -> String {
    let started = Instant::now();
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(&scene.relay_log).unwrap_or_default()).into_owned();
        if text.lines().filter(|l| l.contains(needle)).count() >= count {
            return text;
        }
        let tail: String = text.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect();
        assert!(started.elapsed() < WAIT, "the relay's log never had {count} lines with {needle:?}; it ends: {tail}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chaos_capable), ignore = "needs root and nftables (network namespaces, packet loss)")]
async fn peer_strings_reach_the_text_log_escaped_bounded_and_once() {
    let _turn = privileged("peer_strings_in_the_log").await;
    let scene = Scene::start_logging(None, "127.0.0.1", "transport = \"all\"", "info").await;
    let grpc = scene.grpc.expect("the relay serves gRPC");
    let evil = evil_strings();
    let register = |client_id: &str, group: &str, version: &str| Register {
        protocol_version: PROTOCOL_VERSION,
        client_id: client_id.to_owned(),
        group: group.to_owned(),
        token: Token::new(if client_id == "agent-1" { "token-1" } else { "wrong" }),
        agent_version: version.to_owned(),
        instance_id: uuid::Uuid::new_v4(),
    };
    for (name, s) in &evil {
        // The client id of a rejected registration, over QUIC and over gRPC (the real agent).
        let answer = register_raw(scene.quic, &scene.pin, register(s, "", "1"), "").await;
        assert!(matches!(answer, Some(ControlMessage::Rejected(_))), "{name}: {answer:?}");
        let _agent = scene.agent_as(s, "wrong", grpc, "grpc");
        let rejected_on_grpc = "transport=\"grpc\"}: quictun_relay::registration: registration rejected";
        log_until(&scene, rejected_on_grpc, evil.iter().position(|(n, _)| n == name).unwrap() + 1).await;
        // The group of a known client (the rejection's reason), and a registered agent's
        // version and go-away reason.
        let answer = register_raw(scene.quic, &scene.pin, register("agent-1", s, "1"), "").await;
        assert!(matches!(answer, Some(ControlMessage::Rejected(_))), "{name}: {answer:?}");
        let answer = register_raw(scene.quic, &scene.pin, register("agent-1", "", s), s).await;
        assert!(matches!(answer, Some(ControlMessage::Accepted(_))), "{name}: {answer:?}");
        // A host, a path and a header value at the ingress.
        let bytes = s.as_bytes();
        let http = scene.http;
        let close = b"connection: close\r\n\r\n";
        let _ = raw_exchange(http, &[b"GET /", bytes, b" HTTP/1.1\r\nhost: a\r\n", close].concat()).await;
        let _ = raw_exchange(http, &[b"GET / HTTP/1.1\r\nhost: ", bytes, b"\r\n", close].concat()).await;
        let _ = raw_exchange(http, &[b"GET / HTTP/1.1\r\nhost: a\r\nx-evil: ", bytes, b"\r\n", close].concat()).await;
        let path: String = format!("/{}", s.replace(|c: char| c.is_control(), "_"));
        let request = format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        let _ = raw_exchange(http, request.as_bytes()).await;
    }
    let text = log_until(&scene, "agent going away", evil.len()).await;
    let log = std::fs::read(&scene.relay_log).unwrap();
    let lines: Vec<&[u8]> = log.split(|b| *b == b'\n').collect();
    let controls: Vec<_> = log.iter().filter(|b| matches!(**b, 0x00..=0x08 | 0x0b..=0x1f | 0x7f)).collect();
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    let forged = lines.iter().filter(|l| l.starts_with(b"FORGED")).count();
    let rejections = text.lines().filter(|l| l.contains("registration rejected")).count();
    let long_lines: Vec<_> = text.lines().filter(|l| l.contains("EVIL60k")).collect();
    eprintln!(
        "chaos: peer strings in the text log: {} lines, {rejections} rejected registrations, the longest line \
         {longest} B, {} control bytes, {forged} forged lines; the 60 KB strings on {} lines",
        lines.len(),
        controls.len(),
        long_lines.len()
    );
    assert!(controls.is_empty(), "control bytes reached the log: {:?}", &controls[..controls.len().min(8)]);
    assert_eq!(forged, 0, "a newline forged a line");
    assert!(longest <= 2048, "a line of {longest} bytes");
    assert!(rejections >= 3 * evil.len(), "{rejections} rejections logged, {} expected", 3 * evil.len());
    for line in &long_lines {
        assert_eq!(line.matches("EVIL60k").count(), 1, "a 60 KB string logged more than once: {line}");
    }
    for shown in ["EVILlf\\nFORGED", "EVILcr\\rFORGED", "EVILesc\\u{1b}[2J", "EVILbel\\u{7}\\u{7}", "EVIL60kxxxx"] {
        assert!(text.contains(shown), "{shown:?} was not logged escaped");
    }
}

/// Uploads from `from` (each on a connection of its own) with a declared length of 10 MB, that
/// send 64 KiB and then stall, cut by the client after `cut_after`.
async fn cut_uploads(http: SocketAddr, from: [u8; 4], n: usize, cut_after: Duration) {
    let uploads: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::from((from, 0))).unwrap();
                let mut stream = socket.connect(http).await.unwrap();
                let head = "POST /sink HTTP/1.1\r\nhost: app.test\r\ncontent-length: 10000000\r\n\r\n";
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(&vec![b'u'; 64 * 1024]).await.unwrap();
                tokio::time::sleep(cut_after).await;
                drop(stream);
            })
        })
        .collect();
    for upload in uploads {
        upload.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chaos_capable), ignore = "needs root and nftables (network namespaces, packet loss)")]
async fn uploads_the_client_cuts_or_garbles_put_no_agent_in_cooldown() {
    let _turn = privileged("client_failures_are_not_the_agents").await;
    let scene = Scene::start_logging(None, "127.0.0.1", "", "warn,quictun::access=info").await;
    let _agents = [scene.agent(1, scene.quic).await, scene.agent(2, scene.quic).await];
    // The probe's attack, three times over: five parallel uploads to an upstream that reads the
    // whole body first, cut by the client after 1.5 s.
    for _ in 0..3 {
        cut_uploads(scene.http, [127, 0, 0, 5], 5, Duration::from_millis(1500)).await;
    }
    // A malformed chunked body is the client's error: 400, five times over.
    let mut garbled = Vec::new();
    for _ in 0..5 {
        let request =
            b"POST /sink HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
        garbled.push(raw_exchange(scene.http, request).await);
    }
    let statuses: Vec<String> =
        garbled.iter().map(|a| String::from_utf8_lossy(a.get(..12).unwrap_or(a)).into_owned()).collect();
    scene.sessions_until(WAIT, "the cut uploads end", |s| s.len() == 2 && s.iter().all(|s| s["in_flight"] == 0)).await;
    let sessions = scene.sessions().await;
    let cooling: Vec<_> = sessions.iter().filter(|s| s.get("cooldown_ms").is_some()).collect();
    let client = client();
    let mut served = 0;
    for _ in 0..20 {
        if matches!(request(&client, "GET", scene.http, "/bytes/16", Bytes::new()).await, Ok((200, _))) {
            served += 1;
        }
    }
    eprintln!(
        "chaos: 15 uploads cut by their client after 1.5 s, 5 malformed chunked bodies (answered {statuses:?}): \
         {} of 2 agents in cooldown; then {served}/20 served",
        cooling.len()
    );
    assert!(cooling.is_empty(), "a client's failures put an agent in cooldown: {sessions:?}");
    assert_eq!(served, 20);
    assert!(statuses.iter().all(|s| s == "HTTP/1.1 400"), "malformed bodies answered {statuses:?}");
    // The access log tells what the client got.
    log_until(&scene, "path=/sink status=400", 5).await;
}

/// Connections from `from` (each address opens `per_address`) to `addr` that send nothing;
/// returns those the relay kept open (held until dropped) and how many it closed at once.
async fn idle_connections(addr: SocketAddr, from: Vec<[u8; 4]>, per_address: usize) -> (Vec<TcpStream>, usize) {
    let tasks: Vec<_> = from
        .iter()
        .flat_map(|ip| std::iter::repeat_n(*ip, per_address))
        .map(|ip| {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::from((ip, 0))).unwrap();
                let mut stream = socket.connect(addr).await.ok()?;
                let mut byte = [0u8];
                // Closed by the relay at once, or kept.
                match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await {
                    Err(_) => Some(stream),
                    Ok(_) => None,
                }
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut closed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Some(stream) => held.push(stream),
            None => closed += 1,
        }
    }
    (held, closed)
}

/// Chunked uploads from `from` (`per_address` from each) that send one byte a second; counts
/// how each ended: `(answered 408, answered 503, anything else)`.
async fn trickling_uploads(http: SocketAddr, from: Vec<[u8; 4]>, per_address: usize) -> (usize, usize, usize) {
    let tasks: Vec<_> = from
        .iter()
        .flat_map(|ip| std::iter::repeat_n(*ip, per_address))
        .map(|ip| {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::from((ip, 0))).unwrap();
                let Ok(mut stream) = socket.connect(http).await else { return 0 };
                let head = "POST /sink HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return 0;
                }
                let mut answer = [0u8; 12];
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    tokio::select! {
                        read = stream.read(&mut answer) => {
                            return match read {
                                Ok(n) if n >= 12 => String::from_utf8_lossy(&answer[9..12]).parse().unwrap_or(0),
                                _ => 0,
                            };
                        }
                        () = tokio::time::sleep(Duration::from_secs(1)) => {
                            if stream.write_all(b"1\r\nu\r\n").await.is_err() {
                                return 0;
                            }
                        }
                    }
                }
                0
            })
        })
        .collect();
    let mut counts = (0, 0, 0);
    for task in tasks {
        match task.await.unwrap() {
            408 => counts.0 += 1,
            503 => counts.1 += 1,
            _ => counts.2 += 1,
        }
    }
    counts
}

/// `n` addresses of one /24 each: `127.{network}.{i}.1`.
fn addresses(network: u8, n: u8) -> Vec<[u8; 4]> {
    (1..=n).map(|i| [127, network, i, 1]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chaos_capable), ignore = "needs root and nftables (network namespaces, packet loss)")]
async fn idle_tcp_tunnel_connections_leave_http_its_share_of_the_agent() {
    let _turn = privileged("idle_tcp_tunnel_connections").await;
    let tunnel = "[[tcp]]\nlisten = \"127.0.0.1:0\"\ngroup = \"web\"\nupstream = \"{upstream}\"\n";
    let scene = Scene::start(None, "127.0.0.1", tunnel).await;
    let _agent = scene.agent(1, scene.quic).await;
    let tcp = scene.tcp[0];
    let quiet = p99(&latencies(scene.http, "/", 2000, 4).await);
    // The probe's attack: 1,024 connections to the tunnel from 8 addresses, sending nothing.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let attack = on_own_thread(async move {
        let (held, closed) = idle_connections(tcp, addresses(3, 8), 128).await;
        let counts = (held.len(), closed);
        let _ = stopped.await;
        counts
    });
    let streams = |n: u64| move |s: &[serde_json::Value]| s.iter().any(|s| s["in_flight"].as_u64() >= Some(n));
    scene.sessions_until(WAIT, "the tunnel connections hold their streams", streams(512)).await;
    let during = latencies(scene.http, "/", 2000, 4).await;
    let busy = p99(&during);
    let (_agent3, registered) = registers(&scene, 3, "quic").await;
    let _ = stop.send(());
    let (held, closed) = attack.join().unwrap();
    let metrics = crate::scene::get(scene.admin, "/metrics").await.unwrap().1;
    let metrics = String::from_utf8_lossy(&metrics);
    eprintln!(
        "chaos: 1024 idle TCP-tunnel connections from 8 addresses: {held} held, {closed} closed at once; \
         {} HTTP requests beside them, p99 {busy:.1?} (quiet {quiet:.1?}); a new agent registered in {registered:.1?}",
        during.len()
    );
    assert_eq!(held + closed, 1024);
    assert!(held <= 512, "the listener's max_connections (512) held {held}");
    assert!(metrics.contains("reason=\"tcp_connections_per_ip\""), "{metrics}");
    assert!(busy <= quiet * 2 + crate::TIMER_SLACK, "p99 {busy:?} vs quiet {quiet:?}");
    assert!(registered <= Duration::from_secs(5), "a new agent took {registered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chaos_capable), ignore = "needs root and nftables (network namespaces, packet loss)")]
async fn chunked_trickles_from_nine_addresses_are_cut_and_leave_http_its_share() {
    let _turn = privileged("chunked_trickles").await;
    let scene = Scene::start(None, "127.0.0.1", "").await;
    let _agent = scene.agent(1, scene.quic).await;
    let quiet = p99(&latencies(scene.http, "/", 2000, 4).await);
    // The probe's attack: chunked uploads at 1 B/s, 128 (max_requests_per_ip) from each of 9
    // addresses: 1,152, more than the agent's 1,024 streams.
    let started = Instant::now();
    let attack = on_own_thread(trickling_uploads(scene.http, addresses(4, 9), 128));
    let bulk = |s: &[serde_json::Value]| s.iter().any(|s| s["in_flight"].as_u64() >= Some(768));
    scene.sessions_until(WAIT, "the trickles fill the agent's bulk share", bulk).await;
    let during = latencies(scene.http, "/", 2000, 4).await;
    let busy = p99(&during);
    let (_agent3, registered) = registers(&scene, 3, "quic").await;
    let (cut, refused, other) = attack.join().unwrap();
    let over = started.elapsed();
    eprintln!(
        "chaos: 1152 chunked uploads at 1 B/s from 9 addresses: {cut} cut by the upload-rate floor (408), \
         {refused} refused at the agent's bulk share (503), {other} other, all over in {over:.1?}; {} HTTP requests \
         beside them, p99 {busy:.1?} (quiet {quiet:.1?}); a new agent registered in {registered:.1?}",
        during.len()
    );
    assert_eq!(other, 0, "every trickle was answered 408 or 503");
    assert!(cut >= 700, "{cut} trickles cut by the floor");
    assert!(busy <= quiet * 2 + crate::TIMER_SLACK, "p99 {busy:?} vs quiet {quiet:?}");
    assert!(registered <= Duration::from_secs(5), "a new agent took {registered:?}");
}

/// Plain TCP connections to `addr` that never start TLS, `per_network` from each of `networks`
/// /24s (`127.5.N.1`, `127.5.N.2`, …), each reopened as soon as the relay closes it (half a
/// second later when it was closed at once), until `stop` changes. Returns how many were opened
/// and how many of those the relay closed at once.
async fn silent_tcp_flood(
    addr: SocketAddr,
    networks: u8,
    per_network: u8,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (usize, usize) {
    let tasks: Vec<_> = (0..networks)
        .flat_map(|n| (1..=per_network).map(move |host| [127, 5, n, host]))
        .map(|ip| {
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let (mut opened, mut refused) = (0, 0);
                while !*stop.borrow() {
                    let socket = TcpSocket::new_v4().unwrap();
                    socket.set_reuseaddr(true).unwrap();
                    socket.bind(SocketAddr::from((ip, 0))).unwrap();
                    let pause = match socket.connect(addr).await {
                        Ok(mut stream) => {
                            opened += 1;
                            let held = Instant::now();
                            let mut byte = [0u8];
                            tokio::select! {
                                _ = stream.read(&mut byte) => {}
                                _ = stop.changed() => break,
                            }
                            let at_once = held.elapsed() < Duration::from_millis(100);
                            refused += usize::from(at_once);
                            if at_once { Duration::from_millis(500) } else { Duration::ZERO }
                        }
                        Err(_) => Duration::from_millis(500),
                    };
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => break,
                    }
                }
                (opened, refused)
            })
        })
        .collect();
    let mut totals = (0, 0);
    for task in tasks {
        let (opened, refused) = task.await.unwrap();
        totals = (totals.0 + opened, totals.1 + refused);
    }
    totals
}

/// A sample of the relay's metrics (0 when absent).
async fn metric(scene: &Scene, sample: &str) -> f64 {
    let text = crate::scene::get(scene.admin, "/metrics").await.map(|(_, body)| body).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    text.lines().find_map(|line| line.strip_prefix(sample)?.trim().parse().ok()).unwrap_or(0.0)
}

/// Starts `agent-{n}` over `transport` and returns how long it took to register.
async fn registers(scene: &Scene, n: usize, transport: &str) -> (crate::scene::Proc, Duration) {
    let started = Instant::now();
    let relay = if transport == "grpc" { scene.grpc.unwrap() } else { scene.quic };
    let mut agent = scene.agent_as(&format!("agent-{n}"), &format!("token-{n}"), relay, transport);
    agent.line_with("connected to").await;
    (agent, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(chaos_capable), ignore = "needs root and nftables (network namespaces, packet loss)")]
async fn silent_tcp_on_the_grpc_port_locks_no_agent_out_even_across_a_restart() {
    let _turn = privileged("silent_tcp_on_the_grpc_port").await;
    let mut scene = Scene::start(None, "127.0.0.1", "transport = \"all\"").await;
    let grpc = scene.grpc.unwrap();
    // The probe's attack: 600 plain TCP connections to the gRPC port, no TLS, from 20 /24s.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let attack = on_own_thread(silent_tcp_flood(grpc, 20, 30, stopped));
    let pending = "quictun_pending_agent_connections ";
    let started = Instant::now();
    while metric(&scene, pending).await < 300.0 {
        assert!(started.elapsed() < WAIT, "the attack never held 300 pending places");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = metric(&scene, pending).await;
    // Fresh agents, from a network no agent has registered from yet.
    let (mut grpc_agent, grpc_took) = registers(&scene, 1, "grpc").await;
    let (mut quic_agent, quic_took) = registers(&scene, 2, "quic").await;
    let during = latencies(scene.http, "/", 2000, 4).await;
    let busy = p99(&during);
    // The relay remembers the agents' network: killed and restarted under the attack, it lets
    // them back through their lane.
    let file = scene.dir.0.join("certs/agent-networks");
    let known = Instant::now();
    while !std::fs::read_to_string(&file).unwrap_or_default().contains("127.0.0.0") {
        assert!(known.elapsed() < WAIT, "the agents' network was never written to {}", file.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = Instant::now();
    scene.kill_and_restart_relay().await;
    grpc_agent.line_with("connected to").await;
    let grpc_back = killed.elapsed();
    quic_agent.line_with("connected to").await;
    let quic_back = killed.elapsed();
    // The silent connections are closed by the handshake deadline (3 s) and come back.
    let deadline_met = "quictun_rejects_total{reason=\"handshake_timeout\"} ";
    let restarted = Instant::now();
    while metric(&scene, deadline_met).await < 100.0 {
        assert!(restarted.elapsed() < WAIT, "the handshake deadline closed no connection");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let timed_out = metric(&scene, deadline_met).await;
    let deadline_after = restarted.elapsed();
    stop.send(true).unwrap();
    let (opened, refused) = attack.join().unwrap();
    let quiet = p99(&latencies(scene.http, "/", 2000, 4).await);
    eprintln!(
        "chaos: plain TCP at the gRPC port from 20 /24s, 600 at a time ({opened} opened, {refused} refused at once): \
         {held} pending places held; new agents registered in {grpc_took:.1?} (gRPC) and {quic_took:.1?} (QUIC); \
         after a kill -9 and restart under the attack, back in {grpc_back:.1?} and {quic_back:.1?}; \
         {timed_out} closed by the handshake deadline {deadline_after:.1?} after; {} HTTP requests, p99 {busy:.1?} (quiet {quiet:.1?})",
        during.len()
    );
    assert!(held <= 512.0 * 3.0 / 4.0, "the attack took {held} places, more than the general pool");
    for took in [grpc_took, quic_took, grpc_back, quic_back] {
        assert!(took <= Duration::from_secs(5), "an agent took {took:?} to register");
    }
    assert!(busy <= quiet * 2 + crate::TIMER_SLACK, "p99 {busy:?} vs quiet {quiet:?}");
}
