//! Hostile clients: what the relay must shrug off.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::Trust;
use quictun_proto::{CloseCode, ControlMessage, PROTOCOL_VERSION, Register, Token, frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

const CONNECTIONS_PER_KIND: usize = 250;
/// Networks the hostile connections come from (`127.1.N.1`): each sends 20 of them, within the
/// relay's per-address handshake burst, and holds fewer unregistered connections than its
/// per-network budget, so that every one reaches the code it attacks.
const NETWORKS: usize = 50;
/// Connections attempted at once from one more address, to show the handshake limiter at work.
const FLOOD: usize = 100;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

const KINDS: [Kind; 4] = [Kind::WrongAlpn, Kind::HugeLength, Kind::BadToken, Kind::Abandoned];

/// How one hostile connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Turned away before the handshake (`CONNECTION_REFUSED`: a per-address or pending limit).
    Refused,
    /// Met the defence it was sent against: the handshake failed for the wrong ALPN, the
    /// connection was closed for the huge length, the token was rejected, the abandoned streams
    /// were accepted and the connection kept until the client left.
    Stopped,
    /// Anything else (reported with the kind).
    Other,
}

/// Runs one hostile connection of `kind` from `endpoint`.
async fn hostile_connection(
    kind: Kind,
    endpoint: quinn::Endpoint,
    wrong_alpn: quinn::ClientConfig,
    relay: SocketAddr,
) -> Outcome {
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
            return Outcome::Refused;
        }
        // TLS alert 120, no_application_protocol: the relay speaks only its own ALPN.
        Ok(Err(quinn::ConnectionError::ConnectionClosed(close)))
            if kind == Kind::WrongAlpn && close.error_code == quinn::TransportErrorCode::crypto(120) =>
        {
            return Outcome::Stopped;
        }
        Ok(Err(_)) | Err(_) => return Outcome::Other,
    };
    let stopped = match kind {
        Kind::WrongAlpn => false,
        Kind::HugeLength => match conn.open_bi().await {
            Ok((mut send, _recv)) => {
                let _ = send.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
                let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
                closed.is_ok_and(|reason| peer_close_code(&reason) == Some(CloseCode::Protocol))
            }
            Err(_) => false,
        },
        Kind::BadToken => {
            let register = ControlMessage::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                client_id: "agent-1".into(),
                group: String::new(),
                token: Token::new("not-the-token"),
                agent_version: "hostile".into(),
                instance_id: uuid::Uuid::new_v4(),
            });
            match conn.open_bi().await {
                Ok((mut send, mut recv)) => {
                    let _ = send.write_all(&frame::encode(&register, 64 * 1024).unwrap()).await;
                    let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(64 * 1024)).await;
                    answer
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|bytes| frame::decode::<ControlMessage>(&bytes, 64 * 1024).ok().flatten())
                        .is_some_and(|(msg, _)| matches!(msg, ControlMessage::Rejected(_)))
                }
                Err(_) => false,
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
            let kept = streams.len() == 8 && conn.close_reason().is_none();
            drop(streams);
            kept
        }
    };
    if stopped { Outcome::Stopped } else { Outcome::Other }
}

/// A quinn client endpoint on `bind` that verifies the relay by `trust` with the agent's TLS
/// configuration (ALPN `quictun/1`): hostile clients are written with quinn itself.
fn quinn_client(bind: SocketAddr, trust: &Trust) -> quinn::Endpoint {
    let (tls, _) = quictun_core::tls::client_config(trust).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client(bind).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// The quictun close code a peer closed with, when it did.
fn peer_close_code(err: &quinn::ConnectionError) -> Option<CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => CloseCode::from_u64(close.error_code.into_inner()),
        _ => None,
    }
}

/// What the attack saw, per kind.
#[derive(Debug, Default)]
pub struct Report {
    /// `(kind, stopped by its defence, refused before the handshake, anything else)`.
    kinds: Vec<(String, usize, usize, usize)>,
    /// Of the flood from one address: refused by the handshake rate, and let through.
    pub flood_refused: usize,
    flood_through: usize,
}

impl Report {
    /// Each kind's connections that met their defence, out of [`CONNECTIONS_PER_KIND`].
    pub fn stopped(&self) -> Vec<(String, usize)> {
        self.kinds.iter().map(|(kind, stopped, ..)| (kind.clone(), *stopped)).collect()
    }

    /// Connections per kind.
    pub const PER_KIND: usize = CONNECTIONS_PER_KIND;
    /// Connections in the one-address flood.
    pub const FLOOD: usize = FLOOD;
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} QUIC connections from {NETWORKS} networks, {AT_ONCE} at a time:", 4 * CONNECTIONS_PER_KIND)?;
        for (kind, stopped, refused, other) in &self.kinds {
            write!(f, " {kind}: {stopped} stopped, {refused} refused, {other} other;")?;
        }
        write!(
            f,
            " {FLOOD} at once from one address: {} refused by the handshake rate, {} through; 5000 random datagrams; \
             100 ingress connections of random bytes",
            self.flood_refused, self.flood_through
        )
    }
}

/// 1,000 hostile QUIC connections (250 of each [`Kind`], from [`NETWORKS`] networks, 50 at a
/// time), a flood of [`FLOOD`] handshakes from one address, 5,000 random datagrams at the QUIC
/// port and 100 connections of random bytes at the ingress.
pub async fn attack(relay: SocketAddr, http: SocketAddr, pin: String) -> Report {
    let trust = Trust::Pin(pin.parse().unwrap());
    let endpoint_at = |ip: [u8; 4]| quinn_client(SocketAddr::from((ip, 0)), &trust);
    let endpoints: Vec<quinn::Endpoint> = (0..NETWORKS).map(|n| endpoint_at([127, 1, n as u8, 1])).collect();
    let (h3, _) = quictun_core::tls::client_config_with_alpn(&trust, b"h3").unwrap();
    let wrong_alpn = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(h3).unwrap()));
    let slots = Arc::new(Semaphore::new(AT_ONCE));
    let mut tasks = Vec::new();
    for i in 0..CONNECTIONS_PER_KIND * 4 {
        let kind = KINDS[i % 4];
        let slot = slots.clone().acquire_owned().await.unwrap();
        let (endpoint, wrong_alpn) = (endpoints[(i / 4) % NETWORKS].clone(), wrong_alpn.clone());
        tasks.push(tokio::spawn(async move {
            let outcome = hostile_connection(kind, endpoint, wrong_alpn, relay).await;
            drop(slot);
            (kind, outcome)
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
    let mut report = Report { kinds: KINDS.iter().map(|k| (format!("{k:?}"), 0, 0, 0)).collect(), ..Report::default() };
    for task in tasks {
        let (kind, outcome) = task.await.unwrap();
        let counts = &mut report.kinds[KINDS.iter().position(|k| *k == kind).unwrap()];
        match outcome {
            Outcome::Stopped => counts.1 += 1,
            Outcome::Refused => counts.2 += 1,
            Outcome::Other => counts.3 += 1,
        }
    }
    // The same kind of connection, all at once from one address: the per-address handshake rate
    // (a burst of 20, then 10 a second) turns most away before any cryptography.
    let flooder = endpoint_at([127, 1, 255, 1]);
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (endpoint, wrong_alpn) = (flooder.clone(), wrong_alpn.clone());
            tokio::spawn(async move { hostile_connection(Kind::HugeLength, endpoint, wrong_alpn, relay).await })
        })
        .collect();
    for task in flood {
        match task.await.unwrap() {
            Outcome::Refused => report.flood_refused += 1,
            _ => report.flood_through += 1,
        }
    }
    for endpoint in endpoints.iter().chain([&flooder]) {
        endpoint.close(0u32.into(), b"done");
    }
    report
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
