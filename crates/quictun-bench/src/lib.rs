//! `quictun bench`: the QUIC transport against the gRPC transport it replaces (and `direct`, no
//! tunnel, the limit), on the same relay, agent and upstream binaries run as separate processes.
//!
//! - [`procs`]: starting and watching the processes (peak RSS, CPU time).
//! - [`load`]: the load generator (keep-alive HTTP/1.1 workers, HdrHistogram).
//! - [`workloads`]: small, large, slow-mix, many, lossy, wan, grpc, egress, slow-clients, udp.
//! - [`cluster`]: two relays of a cluster on a real etcd, through the holding and a forwarding one.
//! - [`udp_load`]: the `udp` workload's datagrams, paced, stamped and counted.
//! - [`floor`]: each carrier alone doing the minimal exchange, the floor under its tunnel rows.
//! - [`http_floor`]: two plain HTTP proxies in place of relay and agent, the floor under both.
//! - [`netem`]: random packet loss with nftables.
//! - [`wan`]: an emulated WAN link (network namespace, TUN devices, a userspace forwarder).
//! - [`report`] and [`svg`]: JSON, Markdown and SVG output.

pub mod cluster;
pub mod floor;
pub mod grpc_echo;
pub mod http_floor;
pub mod load;
pub mod netem;
pub mod procs;
pub mod report;
pub mod svg;
pub mod udp_load;
pub mod wan;
pub mod workloads;

use std::path::PathBuf;
use std::time::Duration;

pub use procs::Mode;

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 1 KiB GETs at several concurrencies.
    Small,
    /// A large download and upload.
    Large,
    /// 10% slow requests among instant ones.
    SlowMix,
    /// Many agent sessions and many concurrent streams.
    Many,
    /// Small requests under packet loss on the tunnel leg.
    Lossy,
    /// Small and bulk over an emulated 50 ms / 1% loss / 100 Mbit/s link.
    Wan,
    /// gRPC unary calls (HTTP/2 in, trailers out) at several concurrencies.
    Grpc,
    /// 1 KiB GETs the other way round: from the agent's egress listener to an upstream the
    /// relay reaches.
    Egress,
    /// Small requests beside clients that never read their downloads.
    SlowClients,
    /// UDP datagrams through a `[[udp]]` tunnel at a fixed rate, without and with loss on the
    /// tunnel leg.
    Udp,
    /// 1 KiB GETs through two relays of a cluster (a real etcd, started by the run): to the
    /// relay holding the agent, and to one that forwards to it.
    Cluster,
    /// Each carrier alone doing the minimal exchange (quinn, tonic), and two plain HTTP proxies
    /// in place of relay and agent (`direct`): the floors under the tunnel rows.
    Floor,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "small" => Ok(Self::Small),
            "large" => Ok(Self::Large),
            "slow-mix" => Ok(Self::SlowMix),
            "many" => Ok(Self::Many),
            "lossy" => Ok(Self::Lossy),
            "wan" => Ok(Self::Wan),
            "grpc" => Ok(Self::Grpc),
            "egress" => Ok(Self::Egress),
            "slow-clients" => Ok(Self::SlowClients),
            "udp" => Ok(Self::Udp),
            "floor" => Ok(Self::Floor),
            "cluster" => Ok(Self::Cluster),
            other => Err(format!(
                "unknown workload {other:?} (small, floor, large, slow-mix, many, lossy, wan, grpc, egress, slow-clients, udp, cluster)"
            )),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `quictun` binary to run as upstream, relay and agent.
    pub exe: PathBuf,
    /// Where results go.
    pub out: PathBuf,
    /// Transports.
    pub modes: Vec<Mode>,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Length of each timed run.
    pub duration: Duration,
    /// Concurrency levels of `small`.
    pub concurrency: Vec<usize>,
    /// Body size of `large`.
    pub large_bytes: u64,
    /// Agent sessions of `many`.
    pub many_agents: usize,
    /// Concurrent streams of `many`.
    pub many_streams: usize,
    /// Loss percentages of `lossy`.
    pub loss: Vec<u32>,
    /// Body size of the bulk transfers of `wan`.
    pub wan_bytes: u64,
    /// How many non-reading clients `slow-clients` opens, one row each (and one with none).
    pub slow_clients: Vec<usize>,
    /// Total requests per second for the timed workloads (open loop), instead of as fast as the
    /// workers can go.
    pub rate: Option<u64>,
    /// `lossy` drops packets on every leg (client ↔ relay, relay ↔ agent, agent ↔ upstream), not
    /// only on the tunnel's.
    pub loss_everywhere: bool,
    /// Datagrams a second the `udp` workload offers (all flows together).
    pub udp_rate: u64,
    /// What the run's relays and load get besides the defaults (for A/B runs of a setting).
    pub settings: Settings,
    /// The command line, for the report.
    pub command: String,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| l.strip_prefix("model name")?.split(':').nth(1).map(|s| s.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        })
        .unwrap_or(0);
    format!(
        "{} cores ({cpu}), {:.0} GiB RAM, Linux {}; all processes and the load generator share the cores",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Extra settings of a run, for A/B comparisons of one relay setting or route policy: lines added
/// to the relay's `[relay]` section and to its route, and headers on every request of the load.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// TOML lines for `[relay]`.
    pub relay_toml: String,
    /// TOML lines for the `[[routes]]` entry.
    pub route_toml: String,
    /// Headers each request carries.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// The settings of the run in progress (one run per process: `quictun bench`).
static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();

/// The run's extra settings (none outside a run).
pub(crate) fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

/// Runs every workload for every transport and writes the report; returns it.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<report::Report> {
    if SETTINGS.set(opts.settings.clone()).is_err() && settings().relay_toml != opts.settings.relay_toml {
        anyhow::bail!("one benchmark run per process");
    }
    let mut rows = Vec::new();
    for &workload in &opts.workloads {
        for &mode in &opts.modes {
            let result = match workload {
                Workload::Small => workloads::small(opts, mode).await,
                Workload::Large => workloads::large(opts, mode).await,
                Workload::SlowMix => workloads::slow_mix(opts, mode).await,
                Workload::Many => workloads::many(opts, mode).await,
                Workload::Lossy => workloads::lossy(opts, mode).await,
                Workload::Wan => workloads::wan(opts, mode).await,
                Workload::Grpc => workloads::grpc(opts, mode).await,
                Workload::Egress => workloads::egress(opts, mode).await,
                Workload::SlowClients => workloads::slow_clients(opts, mode).await,
                Workload::Udp => workloads::udp(opts, mode).await,
                Workload::Floor => floor::floor(opts, mode).await,
                Workload::Cluster => cluster::cluster(opts, mode).await,
            };
            match result {
                Ok(mut r) => rows.append(&mut r),
                Err(err) => anyhow::bail!("{workload:?} over {}: {err:#}", mode.name()),
            }
        }
    }
    let report = report::Report { machine: machine(), date: utc_now(), command: opts.command.clone(), rows };
    report.write(&opts.out)?;
    Ok(report)
}
