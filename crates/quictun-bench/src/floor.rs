//! The `floor` workload: each transport's carrier alone, with the tunnel's TLS provider and
//! transport settings, doing the minimal exchange (a 1 KiB request, a 1 KiB answer) at the small
//! workload's concurrencies:
//! - QUIC: quinn alone (see [`quictun_quic::floor`]), each exchange on a fresh stream;
//! - gRPC: tonic over HTTP/2 over TLS alone (see [`quictun_grpc::floor`]), exchanges as messages
//!   on one RPC, as the gRPC transport carries them.
//!
//! The server is a process of its own (`quictun bench-floor`), the client is this process; the
//! CPU per exchange counts both. Beside the `small` rows it shows how much of the tunnel's cost is
//! the carrier's, and what each design costs before the tunnel adds anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::Trust;
use quictun_quic::Tuning;
use rustls::pki_types::ServerName;

use crate::procs::{Proc, free_port, generate_cert, own_cpu_time, wait_until};
use crate::report::Row;
use crate::{BenchOptions, Mode};

/// The size of each request and answer.
const EXCHANGE_BYTES: usize = 1024;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _left_behind = std::fs::remove_dir_all(&self.0);
    }
}

/// The floor of `mode`'s transport at each of the small workload's concurrencies: quinn alone
/// for QUIC, tonic over HTTP/2 over TLS alone for gRPC, and for `direct` the HTTP floor (two
/// plain proxies in place of relay and agent, and the same with TCP splices in their places, see
/// [`crate::http_floor`]); for QUIC also quinn's
/// single-stream rate over the large workload's size.
pub async fn floor(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let transport = match mode {
        Mode::Quic => "quic",
        Mode::Grpc => "grpc",
        Mode::Direct => return crate::http_floor::floor(opts).await,
    };
    let dir = Scratch(std::env::temp_dir().join(format!("quictun-floor-{}-{}", std::process::id(), fastrand::u64(..))));
    std::fs::create_dir_all(&dir.0)?;
    let pin: quictun_core::Pin = generate_cert(&opts.exe, &dir.0)?.parse().map_err(|e| anyhow::anyhow!("pin: {e}"))?;
    let client = FloorClient::new(mode, pin)?;
    let mut server = start_server(opts, transport, &dir.0, EXCHANGE_BYTES as u64, &client).await?;
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        server.proc.check_alive()?;
        let connection = client.connect(server.addr).await?;
        let cpu_before = both_ends_cpu(&server.proc);
        let (exchanges, elapsed) = connection.run(concurrency, opts.duration).await?;
        let cpu = cpu_before.zip(both_ends_cpu(&server.proc)).map(|(before, after)| after.saturating_sub(before));
        let rate = exchanges as f64 / elapsed.as_secs_f64();
        let cpu_us = cpu.filter(|_| exchanges > 0).map(|cpu| cpu.as_secs_f64() * 1e6 / exchanges as f64);
        rows.push(Row {
            workload: "floor".into(),
            transport: mode.name().into(),
            variant: format!("c={concurrency}"),
            requests_per_sec: Some(rate),
            requests: exchanges,
            tunnel_cpu_us_per_request: cpu_us,
            note: client.note().into(),
            ..Row::default()
        });
    }
    drop(server);
    if matches!(client, FloorClient::Quic(..)) {
        rows.push(single_stream(opts, &dir.0, &client).await?);
    }
    client.close();
    Ok(rows)
}

/// A floor server (`quictun bench-floor`) of `transport` answering `answer` bytes, ready once a
/// connection completes its handshake.
async fn start_server(
    opts: &BenchOptions,
    transport: &str,
    dir: &std::path::Path,
    answer: u64,
    client: &FloorClient,
) -> anyhow::Result<FloorServer> {
    let certs = dir.join("certs");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port(transport == "quic")?));
    let args = [
        "bench-floor".to_owned(),
        "--transport".to_owned(),
        transport.to_owned(),
        "--listen".to_owned(),
        addr.to_string(),
        "--cert".to_owned(),
        certs.join("relay.crt").to_string_lossy().into_owned(),
        "--key".to_owned(),
        certs.join("relay.key").to_string_lossy().into_owned(),
        "--answer".to_owned(),
        answer.to_string(),
    ];
    let log = dir.join(format!("floor-{answer}.log"));
    let proc = Proc::spawn(&opts.exe, &args, &log, "the floor server")?;
    wait_until("the floor server", Duration::from_secs(20), async || match client.connect(addr).await {
        Ok(FloorConnection::Quic(probe)) => {
            probe.close();
            true
        }
        Ok(FloorConnection::Grpc(_)) => true,
        Err(_) => false,
    })
    .await?;
    Ok(FloorServer { proc, addr })
}

/// A running floor server.
struct FloorServer {
    proc: Proc,
    addr: SocketAddr,
}

/// quinn's single-stream rate: one answer of the large workload's size on one stream, read as it
/// comes (the floor under the `large` rows).
async fn single_stream(opts: &BenchOptions, dir: &std::path::Path, client: &FloorClient) -> anyhow::Result<Row> {
    let mut server = start_server(opts, "quic", dir, opts.large_bytes, client).await?;
    server.proc.check_alive()?;
    let FloorConnection::Quic(connection) = client.connect(server.addr).await? else {
        anyhow::bail!("the single-stream floor is QUIC's");
    };
    let cpu_before = both_ends_cpu(&server.proc);
    let (bytes, elapsed) = connection.download().await?;
    let cpu = cpu_before.zip(both_ends_cpu(&server.proc)).map(|(before, after)| after.saturating_sub(before));
    anyhow::ensure!(bytes == opts.large_bytes, "the floor server sent {bytes} of {} bytes", opts.large_bytes);
    let cpu_note = cpu.map_or_else(String::new, |cpu| format!("; CPU of both ends {:.2} s", cpu.as_secs_f64()));
    Ok(Row {
        workload: "floor".into(),
        transport: "quic".into(),
        variant: format!("download {} MiB", opts.large_bytes >> 20),
        mb_per_sec: Some(bytes as f64 / elapsed.as_secs_f64() / 1e6),
        requests: 1,
        note: format!("quinn alone: one stream, the answer read as it comes{cpu_note}"),
        ..Row::default()
    })
}

/// CPU time of the floor server and of this process (the client end) together.
fn both_ends_cpu(server: &Proc) -> Option<Duration> {
    Some(server.cpu_time()? + own_cpu_time()?)
}

/// The client end of one transport's floor.
enum FloorClient {
    /// quinn: a client endpoint and its configuration.
    Quic(Box<quictun_quic::floor::FloorDialer>),
    /// tonic: the TLS configuration (ALPN `h2`).
    Grpc(Arc<rustls::ClientConfig>),
}

/// One connection to a floor server.
enum FloorConnection {
    Quic(quictun_quic::floor::FloorClient),
    Grpc(Box<quictun_grpc::floor::FloorClient>),
}

impl FloorClient {
    /// The client end for `mode` (QUIC or gRPC), trusting the server by `pin`.
    fn new(mode: Mode, pin: quictun_core::Pin) -> anyhow::Result<Self> {
        let trust = Trust::Pin(pin);
        Ok(match mode {
            Mode::Grpc => {
                let (tls, _) = quictun_core::tls::client_config_with_alpn(&trust, b"h2")?;
                Self::Grpc(Arc::new(tls))
            }
            _ => Self::Quic(Box::new(quictun_quic::floor::FloorDialer::new(
                "127.0.0.1:0".parse()?,
                &trust,
                &Tuning::default(),
            )?)),
        })
    }

    /// What the rows measure.
    fn note(&self) -> &'static str {
        match self {
            Self::Quic(_) => "quinn alone: 1 KiB each way on a fresh stream; CPU of both ends",
            Self::Grpc(_) => "tonic over TLS alone: 1 KiB messages each way on one RPC; CPU of both ends",
        }
    }

    /// A fresh connection to the server at `addr`.
    async fn connect(&self, addr: SocketAddr) -> anyhow::Result<FloorConnection> {
        Ok(match self {
            Self::Quic(dialer) => FloorConnection::Quic(dialer.connect(addr, "localhost").await?),
            Self::Grpc(tls) => {
                let name = ServerName::try_from("localhost")?;
                FloorConnection::Grpc(Box::new(quictun_grpc::floor::connect(addr, name, tls.clone()).await?))
            }
        })
    }

    /// Closes the client's endpoint, if it has one.
    fn close(&self) {
        if let Self::Quic(dialer) = self {
            dialer.close();
        }
    }
}

impl FloorConnection {
    /// Runs `concurrency` exchanges at a time for `duration`; returns how many completed and in
    /// what time.
    async fn run(self, concurrency: usize, duration: Duration) -> anyhow::Result<(u64, Duration)> {
        Ok(match self {
            Self::Quic(client) => {
                let run = client.run(EXCHANGE_BYTES, concurrency, duration).await?;
                (run.exchanges, run.elapsed)
            }
            Self::Grpc(client) => {
                let run = client.run(EXCHANGE_BYTES, concurrency, duration).await?;
                (run.exchanges, run.elapsed)
            }
        })
    }
}
