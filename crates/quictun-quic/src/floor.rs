//! The floor under the QUIC tunnel: quinn alone, with the tunnel's TLS provider and transport
//! settings, doing the minimal exchange (a request on a fresh bidirectional stream, then an
//! answer of the same size) and nothing else: no HTTP, no heads, no routing. `quictun bench`
//! runs it beside the tunnel (`--workloads floor`) so that every microsecond the tunnel adds on
//! top has an owner.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quictun_proto::CloseCode;
use tokio::task::JoinSet;

use quictun_core::Trust;
use quictun_core::tls::CertKey;

use crate::endpoint::{ClientSetup, EndpointError, Tuning};

/// The largest request the floor server reads.
pub const MAX_REQUEST: usize = 1 << 20;

/// Answers larger than this are written in chunks of this size (a 1 GiB answer is streamed from
/// one 64 KiB buffer, as the tunnel streams bodies).
const ANSWER_CHUNK: usize = 64 * 1024;

/// A floor server: a QUIC endpoint with the relay's transport setup that answers the minimal
/// exchange.
pub struct FloorServer {
    endpoint: quinn::Endpoint,
    acceptor: crate::endpoint::Acceptor,
}

impl FloorServer {
    /// Binds the server on `addr` with `cert`.
    pub fn bind(addr: SocketAddr, cert: CertKey, tuning: &Tuning) -> Result<Self, EndpointError> {
        let (endpoint, acceptor) = crate::endpoint::server_endpoint(addr, cert, tuning)?;
        Ok(Self { endpoint, acceptor })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves until the endpoint closes: each request is read to its end and answered with
    /// `answer` bytes. Each connection and each exchange runs in a task owned by this function
    /// (they end with it).
    pub async fn serve(self, answer: u64) {
        let chunk = Bytes::from(vec![b'x'; usize::try_from(answer).unwrap_or(usize::MAX).min(ANSWER_CHUNK)]);
        let mut connections = JoinSet::new();
        while let Some(incoming) = self.endpoint.accept().await {
            let (chunk, acceptor) = (chunk.clone(), self.acceptor.clone());
            connections.spawn(async move {
                let Ok(accepted) = acceptor.accept(incoming) else { return };
                let Ok(conn) = accepted.connecting.await else { return };
                serve_connection(conn, chunk, answer).await;
            });
            while connections.try_join_next().is_some() {}
        }
    }
}

/// Answers every exchange of one connection.
async fn serve_connection(conn: quinn::Connection, chunk: Bytes, answer: u64) {
    let mut exchanges = JoinSet::new();
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let chunk = chunk.clone();
        exchanges.spawn(async move {
            if recv.read_to_end(MAX_REQUEST).await.is_err() {
                return;
            }
            let mut left = answer;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                if send.write_chunk(chunk.slice(..n)).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _already_finished = send.finish();
        });
        // Reap what finished, so the set holds only exchanges in flight.
        while exchanges.try_join_next().is_some() {}
    }
}

/// The client end of the floor: an endpoint and what it verifies the server with.
pub struct FloorDialer {
    endpoint: quinn::Endpoint,
    setup: ClientSetup,
}

impl FloorDialer {
    /// A client endpoint on `bind` trusting the server by `trust`.
    pub fn new(bind: SocketAddr, trust: &Trust, tuning: &Tuning) -> Result<Self, EndpointError> {
        let (endpoint, setup) = crate::endpoint::client_endpoint(bind, trust, tuning)?;
        Ok(Self { endpoint, setup })
    }

    /// Connects to the floor server at `addr`.
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<FloorClient, FloorError> {
        connect(&self.endpoint, &self.setup, addr, server_name).await
    }

    /// Closes the endpoint's connections.
    pub fn close(&self) {
        crate::close_endpoint(&self.endpoint, CloseCode::Normal);
    }
}

/// Why a floor run failed.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// The handshake with the floor server failed.
    #[error("connecting to the floor server at {addr}: {why}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// quinn's words.
        why: String,
    },
    /// An exchange failed (the run counts on every exchange succeeding).
    #[error("exchange failed: {0}")]
    Exchange(String),
}

/// What a floor run measured.
#[derive(Debug, Clone, Copy)]
pub struct FloorRun {
    /// Exchanges completed.
    pub exchanges: u64,
    /// How long the run took.
    pub elapsed: Duration,
}

/// A connection to the floor server.
#[derive(Debug)]
pub struct FloorClient {
    conn: quinn::Connection,
}

/// Connects to the floor server at `addr` (verified by `setup`).
async fn connect(
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    addr: SocketAddr,
    server_name: &str,
) -> Result<FloorClient, FloorError> {
    let failed = |why: String| FloorError::Connect { addr, why };
    let connecting =
        endpoint.connect_with(setup.config_for(addr), addr, server_name).map_err(|e| failed(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => Ok(FloorClient { conn }),
        Ok(Err(err)) => Err(failed(err.to_string())),
        Err(_) => Err(failed("no handshake within 5 s".into())),
    }
}

impl FloorClient {
    /// Closes the connection.
    pub fn close(self) {
        crate::close(&self.conn, CloseCode::Normal);
    }

    /// Runs `concurrency` exchanges at a time of `size`-byte requests for `duration`, each on a
    /// fresh stream, and closes the connection.
    pub async fn run(self, size: usize, concurrency: usize, duration: Duration) -> Result<FloorRun, FloorError> {
        run(self.conn, size, concurrency, duration).await
    }

    /// One exchange whose answer is read to its end as fast as it comes, on one stream (quinn's
    /// single-stream rate, the floor under the tunnel's large transfers); closes the connection.
    /// Returns the bytes received and the time taken.
    pub async fn download(self) -> Result<(u64, Duration), FloorError> {
        let failed = |e: &dyn std::fmt::Display| FloorError::Exchange(e.to_string());
        let started = Instant::now();
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| failed(&e))?;
        send.write_chunk(Bytes::from_static(b"q")).await.map_err(|e| failed(&e))?;
        let _already_finished = send.finish();
        let mut received = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.map_err(|e| failed(&e))? {
            received += chunk.bytes.len() as u64;
        }
        let elapsed = started.elapsed();
        crate::close(&self.conn, CloseCode::Normal);
        Ok((received, elapsed))
    }
}

async fn run(
    conn: quinn::Connection,
    size: usize,
    concurrency: usize,
    duration: Duration,
) -> Result<FloorRun, FloorError> {
    let request = Bytes::from(vec![b'q'; size]);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (conn, request, done) = (conn.clone(), request.clone(), done.clone());
        workers.spawn(async move {
            while Instant::now() < deadline {
                let (mut send, mut recv) = conn.open_bi().await.map_err(|e| FloorError::Exchange(e.to_string()))?;
                send.write_chunk(request.clone()).await.map_err(|e| FloorError::Exchange(e.to_string()))?;
                let _already_finished = send.finish();
                recv.read_to_end(MAX_REQUEST).await.map_err(|e| FloorError::Exchange(e.to_string()))?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), FloorError>(())
        });
    }
    let mut failure = None;
    while let Some(worker) = workers.join_next().await {
        match worker {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = Some(err),
            Err(join) => failure = Some(FloorError::Exchange(join.to_string())),
        }
    }
    let elapsed = started.elapsed();
    crate::close(&conn, CloseCode::Normal);
    match failure {
        Some(err) => Err(err),
        None => Ok(FloorRun { exchanges: done.load(Ordering::Relaxed), elapsed }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_core::tls::GeneratedCert;

    /// A floor server answering `answer` bytes, with its address and its task.
    fn floor_server(cert: &GeneratedCert, answer: u64) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let any = "127.0.0.1:0".parse().unwrap();
        let server = FloorServer::bind(any, cert.cert_key().unwrap(), &Tuning::default()).unwrap();
        let addr = server.local_addr().unwrap();
        (addr, tokio::spawn(server.serve(answer)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_floor_exchanges_over_real_quic() {
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let trust = Trust::Pin(cert.pin);
        let client = FloorDialer::new("127.0.0.1:0".parse().unwrap(), &trust, &Tuning::default()).unwrap();

        let (addr, serving) = floor_server(&cert, 1024);
        let floor = client.connect(addr, "localhost").await.unwrap();
        let run = floor.run(1024, 8, Duration::from_millis(300)).await.unwrap();
        assert!(run.exchanges > 0, "{run:?}");
        serving.abort();

        // A large answer is streamed whole.
        let (addr, serving) = floor_server(&cert, 3 * ANSWER_CHUNK as u64 + 5);
        let floor = client.connect(addr, "localhost").await.unwrap();
        let (bytes, _) = floor.download().await.unwrap();
        assert_eq!(bytes, 3 * ANSWER_CHUNK as u64 + 5);
        serving.abort();
        client.close();
    }
}
