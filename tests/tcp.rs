//! TCP tunnels end to end on both transports: a `[[tcp]]` port on the relay, one stream per
//! accepted connection, bytes both ways, and half-close carried in each direction (one side's FIN
//! does not cut the other direction); the listener's idle timeout and per-address cap; PROXY
//! protocol v1 and v2 headers that name the client.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use quictun_agent::Transport;
use quictun_tests::{Harness, HarnessConfig, pattern, sha256_hex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// Test servers behind the agent, chosen by the first byte a client sends:
/// - `e`: echo every byte as it arrives;
/// - `r`: read until the client's FIN, then send everything back and close (FIN client → server,
///   then data server → client after it);
/// - otherwise the server spoke first: `greeting` then its FIN, then it reads until the client's
///   FIN and reports the byte count on `reports`.
async fn byte_server() -> (SocketAddr, mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reports, received) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let reports = reports.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await.unwrap_or(0) == 0 {
                    return;
                }
                match first[0] {
                    b'e' => {
                        let (mut rd, mut wr) = stream.split();
                        let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    }
                    b'r' => {
                        let mut all = Vec::new();
                        stream.read_to_end(&mut all).await.unwrap();
                        stream.write_all(&all).await.unwrap();
                        stream.shutdown().await.unwrap();
                    }
                    _ => {
                        stream.write_all(b"greeting").await.unwrap();
                        stream.shutdown().await.unwrap();
                        let mut all = Vec::new();
                        stream.read_to_end(&mut all).await.unwrap();
                        let _ = reports.send(all.len()).await;
                    }
                }
            });
        }
    });
    (addr, received)
}

async fn start(transport: Transport) -> (Harness, SocketAddr, mpsc::Receiver<usize>, quictun_agent::Agent) {
    let (server, reports) = byte_server().await;
    let config = HarnessConfig { transport, tcp_upstreams: vec![server.to_string()], ..Default::default() };
    let h = Harness::start_with(config).await;
    let agent = h.agent("agent-1").await;
    let port = h.relay().tcp_addrs()[0];
    (h, port, reports, agent)
}

async fn tcp_echo_and_a_large_transfer_after_the_clients_fin(transport: Transport) {
    let (h, port, _reports, _agent) = start(transport).await;
    // The tunnel is listed with the agents that carry it.
    let tunnels: serde_json::Value =
        serde_json::from_str(&quictun_tests::admin_get(h.relay().admin_addr(), "/api/tunnels", None).await.text())
            .unwrap();
    assert_eq!(tunnels[0]["source"], "relay", "{tunnels}");
    assert_eq!(tunnels[0]["listen"], port.to_string(), "{tunnels}");
    assert_eq!(tunnels[0]["holders"], serde_json::json!(["agent-1"]), "{tunnels}");
    // Interactive echo.
    let mut echo = TcpStream::connect(port).await.unwrap();
    for round in 0..3 {
        let message = format!("e-ping-{round}");
        echo.write_all(message.as_bytes()).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(WAIT, echo.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, message.as_bytes());
    }
    // 16 MiB up, FIN, then the same 16 MiB back down the half-open connection.
    let mut stream = TcpStream::connect(port).await.unwrap();
    let mut data = pattern(16 << 20);
    data[0] = b'r';
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_all(&data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let receive = async { tokio::time::timeout(WAIT, rd.read_to_end(&mut back)).await.unwrap().unwrap() };
    tokio::join!(send, receive);
    assert_eq!(back.len(), data.len());
    assert_eq!(sha256_hex(&back), sha256_hex(&data));
}

async fn the_servers_fin_does_not_cut_the_client_direction(transport: Transport) {
    let (_h, port, mut reports, _agent) = start(transport).await;
    let mut stream = TcpStream::connect(port).await.unwrap();
    stream.write_all(b"g").await.unwrap();
    let mut greeting = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, b"greeting", "the server's FIN arrives as our end of stream");
    // The server's side is closed; ours still carries a megabyte.
    stream.write_all(&pattern(1 << 20)).await.unwrap();
    stream.shutdown().await.unwrap();
    let received = tokio::time::timeout(WAIT, reports.recv()).await.unwrap().unwrap();
    assert_eq!(received, 1 + (1 << 20));
}

async fn a_tcp_connection_without_an_agent_is_closed(transport: Transport) {
    let (h, port, _reports, agent) = start(transport).await;
    agent.shutdown().await.unwrap();
    assert!(h.relay().sessions().wait_until(WAIT, |s| s.is_empty()).await);
    let mut stream = TcpStream::connect(port).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await.unwrap();
    assert!(read.is_err() || buf.is_empty(), "got {buf:?}");
}

async fn an_idle_connection_is_closed_after_the_listeners_idle_timeout(transport: Transport) {
    let (server, _reports) = byte_server().await;
    let edit = |config: &mut quictun_relay::config::RelayConfig| {
        config.tcp[0].idle_timeout_secs = 1;
        config.tcp[0].max_connections_per_ip = 2;
    };
    let config =
        HarnessConfig { transport, tcp_upstreams: vec![server.to_string()], ..HarnessConfig::with_relay(edit) };
    let h = Harness::start_with(config).await;
    let _agent = h.agent("agent-1").await;
    let port = h.relay().tcp_addrs()[0];
    let mut idle = TcpStream::connect(port).await.unwrap();
    let mut busy = TcpStream::connect(port).await.unwrap();
    // A third from the same address is over max_connections_per_ip: closed at once.
    let mut third = TcpStream::connect(port).await.unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(tokio::time::timeout(WAIT, third.read(&mut byte)).await.unwrap().unwrap_or(0), 0);
    // One that talks every 400 ms outlives the idle one, which is closed about 1 s after its
    // last byte.
    idle.write_all(b"e").await.unwrap();
    tokio::time::timeout(WAIT, idle.read_exact(&mut byte)).await.unwrap().unwrap();
    let last_byte = tokio::time::Instant::now();
    let closed = tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = idle.read_to_end(&mut rest).await;
        last_byte.elapsed()
    });
    for _ in 0..6 {
        busy.write_all(b"e").await.unwrap();
        tokio::time::timeout(WAIT, busy.read_exact(&mut byte)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let idle_for = tokio::time::timeout(WAIT, closed).await.unwrap().unwrap();
    // Counted here from when the echo arrived, a little after the relay saw its last byte (and
    // the relay keeps that moment to the millisecond, rounded down): 999.9 ms was seen.
    let about_a_second = Duration::from_millis(950)..Duration::from_secs(2);
    assert!(about_a_second.contains(&idle_for), "closed after {idle_for:?}");
    busy.write_all(b"e").await.unwrap();
    tokio::time::timeout(WAIT, busy.read_exact(&mut byte)).await.unwrap().unwrap();
}

/// A server that reads a PROXY protocol header (v1 or v2, parsed by the `ppp` crate), then the
/// client's bytes until its FIN, and answers `<source address> <version> <bytes after the header>`.
async fn proxy_protocol_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                stream.read_to_end(&mut all).await.unwrap();
                let answer = match ppp::HeaderResult::parse(&all) {
                    ppp::HeaderResult::V1(Ok(header)) => {
                        let ppp::v1::Addresses::Tcp4(a) = header.addresses else { panic!("TCP4") };
                        let source = SocketAddr::from((a.source_address, a.source_port));
                        format!("{source} v1 {}", all.len() - header.header.len())
                    }
                    ppp::HeaderResult::V2(Ok(header)) => {
                        assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
                        let ppp::v2::Addresses::IPv4(a) = header.addresses else { panic!("IPv4") };
                        let source = SocketAddr::from((a.source_address, a.source_port));
                        format!("{source} v2 {}", all.len() - header.len())
                    }
                    other => format!("no header: {other:?}"),
                };
                stream.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

async fn the_upstream_learns_the_client_from_a_proxy_protocol_header(transport: Transport) {
    use quictun_core::proxy_protocol::ProxyProtocol;
    for (protocol, version) in [(ProxyProtocol::V1, "v1"), (ProxyProtocol::V2, "v2")] {
        let server = proxy_protocol_server().await;
        let edit = move |config: &mut quictun_relay::config::RelayConfig| config.tcp[0].proxy_protocol = Some(protocol);
        let config =
            HarnessConfig { transport, tcp_upstreams: vec![server.to_string()], ..HarnessConfig::with_relay(edit) };
        let h = Harness::start_with(config).await;
        let _agent = h.agent("agent-1").await;
        let mut stream = TcpStream::connect(h.relay().tcp_addrs()[0]).await.unwrap();
        let me = stream.local_addr().unwrap();
        stream.write_all(&pattern(100_000)).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut answer)).await.unwrap().unwrap();
        assert_eq!(answer, format!("{me} {version} 100000"));
    }
}

quictun_tests::on_both_transports!(
    the_upstream_learns_the_client_from_a_proxy_protocol_header,
    an_idle_connection_is_closed_after_the_listeners_idle_timeout,
    tcp_echo_and_a_large_transfer_after_the_clients_fin,
    the_servers_fin_does_not_cut_the_client_direction,
    a_tcp_connection_without_an_agent_is_closed,
);
