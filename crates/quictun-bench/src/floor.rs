//! The `floor` workload: quinn alone (see [`quictun_quic::floor`]), with the tunnel's TLS
//! provider and transport settings, doing the minimal exchange at the small workload's
//! concurrencies: a 1 KiB request on a fresh stream, a 1 KiB answer. The server is a process of
//! its own (`quictun bench-floor`), the client is this process; the CPU per exchange counts both.
//! Beside the `small` rows it shows how much of the tunnel's cost is quinn's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use quictun_core::Trust;
use quictun_quic::Tuning;

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

/// quinn's floor at each of the small workload's concurrencies (QUIC only: for the other
/// transports there are no rows).
pub async fn floor(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    if mode != Mode::Quic {
        return Ok(Vec::new());
    }
    let dir = Scratch(std::env::temp_dir().join(format!("quictun-floor-{}-{}", std::process::id(), fastrand::u64(..))));
    std::fs::create_dir_all(&dir.0)?;
    let pin: quictun_core::Pin = generate_cert(&opts.exe, &dir.0)?.parse().map_err(|e| anyhow::anyhow!("pin: {e}"))?;
    let certs = dir.0.join("certs");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
    let args = [
        "bench-floor".to_owned(),
        "--listen".to_owned(),
        addr.to_string(),
        "--cert".to_owned(),
        certs.join("relay.crt").to_string_lossy().into_owned(),
        "--key".to_owned(),
        certs.join("relay.key").to_string_lossy().into_owned(),
        "--answer".to_owned(),
        EXCHANGE_BYTES.to_string(),
    ];
    let mut server = Proc::spawn(&opts.exe, &args, &dir.0.join("floor.log"), "the floor server")?;
    let (endpoint, setup) =
        quictun_quic::endpoint::client_endpoint("127.0.0.1:0".parse()?, &Trust::Pin(pin), &Tuning::default())?;
    // Ready once a handshake completes.
    wait_until("the floor server", Duration::from_secs(20), async || {
        match quictun_quic::floor::connect(&endpoint, &setup, addr, "localhost").await {
            Ok(conn) => {
                quictun_quic::close(&conn, quictun_proto::CloseCode::Normal);
                true
            }
            Err(_) => false,
        }
    })
    .await?;
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        server.check_alive()?;
        let conn = quictun_quic::floor::connect(&endpoint, &setup, addr, "localhost").await?;
        let cpu_before = (server.cpu_time(), own_cpu_time());
        let run = quictun_quic::floor::run(conn, EXCHANGE_BYTES, concurrency, opts.duration).await?;
        let cpu = match (cpu_before, (server.cpu_time(), own_cpu_time())) {
            ((Some(s0), Some(c0)), (Some(s1), Some(c1))) => Some((s1 - s0) + (c1 - c0)),
            _ => None,
        };
        let rate = run.exchanges as f64 / run.elapsed.as_secs_f64();
        let cpu_us = cpu.filter(|_| run.exchanges > 0).map(|cpu| cpu.as_secs_f64() * 1e6 / run.exchanges as f64);
        rows.push(Row {
            workload: "floor".into(),
            transport: mode.name().into(),
            variant: format!("c={concurrency}"),
            requests_per_sec: Some(rate),
            requests: run.exchanges,
            tunnel_cpu_us_per_request: cpu_us,
            note: "quinn alone: 1 KiB each way on a fresh stream; CPU of both ends".into(),
            ..Row::default()
        });
    }
    quictun_quic::close_endpoint(&endpoint, quictun_proto::CloseCode::Normal);
    Ok(rows)
}
