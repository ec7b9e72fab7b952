//! The `cluster` workload: two relays of one cluster on a real etcd (started here; Debian's
//! `etcd-server`), one agent connected to the first. 1 KiB GETs go to the relay that holds the
//! agent, then to the one that forwards them over its link to the first: the difference is what
//! the hop costs (rate, p99, and the CPU per request of both relays and the agent).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::BenchOptions;
use crate::procs::{ClusterJoin, Mode, Stack, free_port, tcp_ready, wait_until};
use crate::report::Row;
use crate::workloads::{RowSpec, small_requests_to};

/// A one-member etcd on loopback; killed on drop.
struct Etcd {
    child: Child,
    endpoint: String,
}

impl Etcd {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let (client, peer) = (free_port(false)?, free_port(false)?);
        let (client_url, peer_url) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
        let log = std::fs::File::create(dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("the cluster workload needs etcd (Debian: apt-get install etcd-server)")?;
        let endpoint = format!("127.0.0.1:{client}");
        let etcd = Self { child, endpoint };
        let addr = etcd.endpoint.parse()?;
        wait_until("etcd", Duration::from_secs(30), async || tcp_ready(addr).await).await?;
        Ok(etcd)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1 KiB GETs through the relay that holds the agent and through one that forwards, at the
/// small workload's concurrencies.
pub async fn cluster(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    if mode == Mode::Direct {
        return Ok(Vec::new());
    }
    let dir = std::env::temp_dir().join(format!("quictun-bench-etcd-{}-{}", std::process::id(), free_port(false)?));
    std::fs::create_dir_all(&dir)?;
    let etcd = Etcd::start(&dir).await?;
    let join = ClusterJoin { etcd: etcd.endpoint.clone(), token: "the-bench-cluster-secret".into() };
    let mut stack = Stack::start_in_cluster(&opts.exe, mode, join).await?;
    let forwarding = stack.start_peer_relay(&opts.exe).await?;
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        for (target, via) in [(stack.target, "holding relay"), (forwarding, "forwarding relay")] {
            let note = "CPU: both relays and the agent".to_owned();
            let row = RowSpec { target, workload: "cluster", variant: format!("{via} c={concurrency}"), note };
            rows.push(small_requests_to(opts, &mut stack, concurrency, row).await?);
        }
    }
    drop(stack);
    drop(etcd);
    let _left_behind = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
