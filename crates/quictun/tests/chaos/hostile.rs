//! Hostile clients: what the relay must shrug off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::Trust;
use quictun_proto::{ControlMessage, PROTOCOL_VERSION, Register, Token, frame};
use quictun_quic::Tuning;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

const CONNECTIONS_PER_KIND: usize = 250;

/// Runs an attack on its own thread and runtime: the attacker must not share the well-behaved
/// client's runtime, or the measurement would show the attacker's own CPU bursts, not the relay.
pub fn on_own_thread<T: Send + 'static>(
    attack: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(attack)
    })
}
const AT_ONCE: usize = 50;

/// One hostile QUIC connection.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// TLS with ALPN `h3`: the handshake must fail.
    WrongAlpn,
    /// A control stream whose first frame claims 4 GiB.
    HugeLength,
    /// A registration for a real client id with a wrong token.
    BadToken,
    /// Streams opened, a byte written, then left alone until the connection is dropped.
    Abandoned,
}

/// Runs one hostile connection; false when the relay refused it before the handshake.
async fn hostile_connection(
    kind: Kind,
    endpoint: quinn::Endpoint,
    wrong_alpn: quinn::ClientConfig,
    relay: SocketAddr,
) -> bool {
    let connecting = match kind {
        Kind::WrongAlpn => endpoint.connect_with(wrong_alpn, relay, "localhost"),
        _ => endpoint.connect(relay, "localhost"),
    };
    let connecting = connecting.unwrap();
    let conn = match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(quinn::ConnectionError::ConnectionClosed(close)))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return false;
        }
        // A failed handshake (the wrong ALPN) got as far as the cryptography.
        Ok(Err(_)) | Err(_) => return true,
    };
    match kind {
        Kind::WrongAlpn => panic!("the relay accepted ALPN h3"),
        Kind::HugeLength => {
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
                let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                assert!(closed.is_ok(), "a 4 GiB length prefix did not close the connection");
            }
        }
        Kind::BadToken => {
            let register = ControlMessage::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                client_id: "agent-1".into(),
                group: String::new(),
                token: Token::new("not-the-token"),
                agent_version: "hostile".into(),
                instance_id: uuid::Uuid::new_v4(),
            });
            if let Ok((mut send, mut recv)) = conn.open_bi().await {
                let _ = send.write_all(&frame::encode(&register, 64 * 1024).unwrap()).await;
                let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64 * 1024)).await;
                let rejected = answer
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|bytes| frame::decode::<ControlMessage>(&bytes, 64 * 1024).ok().flatten())
                    .is_some_and(|(msg, _)| matches!(msg, ControlMessage::Rejected(_)));
                assert!(rejected, "a bad token was not rejected");
            }
        }
        Kind::Abandoned => {
            let mut streams = Vec::new();
            for _ in 0..8 {
                if let Ok((mut send, recv)) = conn.open_bi().await {
                    let _ = send.write_all(&[0]).await;
                    streams.push((send, recv));
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(streams);
        }
    }
    true
}

/// 1,000 hostile QUIC connections (250 of each [`Kind`], 50 at a time), 5,000 random datagrams at
/// the QUIC port and 100 connections of random bytes at the ingress. Returns a summary.
pub async fn attack(relay: SocketAddr, http: SocketAddr, pin: String) -> String {
    let trust = Trust::Pin(pin.parse().unwrap());
    let (endpoint, _) =
        quictun_quic::endpoint::client_endpoint("127.0.0.1:0".parse().unwrap(), &trust, &Tuning::default()).unwrap();
    let (h3, _) = quictun_core::tls::client_config_with_alpn(&trust, b"h3").unwrap();
    let wrong_alpn = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(h3).unwrap()));
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS_PER_KIND * 4 {
        let kind = [Kind::WrongAlpn, Kind::HugeLength, Kind::BadToken, Kind::Abandoned][i % 4];
        let slot = slots.clone().acquire_owned().await.unwrap();
        let (endpoint, wrong_alpn) = (endpoint.clone(), wrong_alpn.clone());
        tasks.push(tokio::spawn(async move {
            let through = hostile_connection(kind, endpoint, wrong_alpn, relay).await;
            drop(slot);
            through
        }));
    }
    let noise = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..5000 {
        let datagram: Vec<u8> = (0..fastrand::usize(1..1400)).map(|_| fastrand::u8(..)).collect();
        let _ = noise.send_to(&datagram, relay).await;
    }
    for _ in 0..100 {
        if let Ok(mut stream) = TcpStream::connect(http).await {
            let junk: Vec<u8> = (0..4096).map(|_| fastrand::u8(..)).collect();
            let _ = stream.write_all(&junk).await;
        }
    }
    let mut through = 0;
    for task in tasks {
        through += usize::from(task.await.unwrap());
    }
    endpoint.close(0u32.into(), b"done");
    format!(
        "1000 QUIC connections, 50 at a time: 250 wrong ALPN, 250 4 GiB length prefixes, 250 bad tokens, 250 with 8 \
         abandoned streams each; {through} reached the handshake, {} refused by the per-address handshake rate; 5000 \
         random datagrams; 100 ingress connections of random bytes",
        1000 - through
    )
}

/// How the slowloris connections ended.
#[derive(Debug, Default)]
pub struct SlowlorisOutcome {
    /// Answered `408 Request Timeout`.
    pub timed_out: usize,
    /// Closed without a 408.
    pub closed: usize,
}

/// `n` connections (from 127.0.0.2 and 127.0.0.3, so the per-address limit does not refuse them)
/// that each send one byte of a request head per second, until the relay gives up on them.
pub async fn slowloris(http: SocketAddr, n: usize) -> SlowlorisOutcome {
    let head =
        b"GET / HTTP/1.1\r\nhost: app.test\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(async move {
                let socket = TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::from(([127, 0, 0, 2 + (i % 2) as u8], 0))).unwrap();
                let mut stream = socket.connect(http).await.unwrap();
                let mut answer = Vec::new();
                let mut buf = [0u8; 256];
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                for byte in head.iter().cycle() {
                    tokio::select! {
                        read = stream.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => answer.extend_from_slice(&buf[..n]),
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if stream.write_all(&[*byte]).await.is_err() {
                                break;
                            }
                        }
                    }
                    assert!(tokio::time::Instant::now() < deadline, "a slowloris connection was never cut");
                }
                answer.starts_with(b"HTTP/1.1 408")
            })
        })
        .collect();
    let mut outcome = SlowlorisOutcome::default();
    for task in tasks {
        if task.await.unwrap() {
            outcome.timed_out += 1;
        } else {
            outcome.closed += 1;
        }
    }
    outcome
}
