//! An emulated wide-area link for the tunnel's own packets, built without `tc netem` (not in this
//! kernel): the agent side lives in a network namespace, joined to the root namespace by two TUN
//! devices, and a userspace forwarder moves every IP packet between them with a one-way delay,
//! random loss, a rate limit (serialization delay) and a bounded queue (tail drop), per direction.
//!
//! ```text
//!  root namespace                                   namespace qtb-agent
//!  relay, load generator ── qtb0 10.201.0.1 ⇄ forwarder ⇄ qtb1 10.201.0.2 ── agent, upstream
//! ```
//!
//! Needs root, the `ip` command and `/dev/net/tun`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

/// The namespace holding the agent side.
pub const NETNS: &str = "qtb-agent";
/// The relay side's address (root namespace).
pub const RELAY_IP: &str = "10.201.0.1";
/// The agent side's address (inside [`NETNS`]).
pub const AGENT_IP: &str = "10.201.0.2";

/// How the link misbehaves, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// One-way delay (half the added round-trip time).
    pub delay: Duration,
    /// Percent of packets dropped at random.
    pub loss_percent: f64,
    /// Link rate in bits per second.
    pub rate_bps: u64,
    /// Bytes that may wait for the link before packets are dropped at the tail.
    pub queue_bytes: u64,
}

impl Impairment {
    /// 50 ms RTT, 1% loss each way, 100 Mbit/s, a queue of one bandwidth-delay product.
    pub fn wan() -> Self {
        Self { delay: Duration::from_millis(25), loss_percent: 1.0, rate_bps: 100_000_000, queue_bytes: 625_000 }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether the link can be built here; the reason when not.
pub fn available() -> Result<(), String> {
    crate::netem::available()?;
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err("needs /dev/net/tun: skipped".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("needs the ip command (iproute2): skipped".into()),
    }
}

/// The running link; dropping it stops the forwarder and removes the namespace, and
/// [`WanLink::close`] waits until its TUN devices are gone too (the next link can then create
/// them again at once).
pub struct WanLink {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for WanLink {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _gone = ip(&["netns", "del", NETNS]);
    }
}

fn tun_config(name: &str, address: &str, peer: &str) -> tun::Configuration {
    let mut config = tun::Configuration::default();
    config.tun_name(name).address(address).destination(peer).netmask("255.255.255.255").mtu(1500).up();
    config
}

impl WanLink {
    /// Stops the forwarder and waits until its tasks, which hold the TUN devices, are gone; then
    /// removes the namespace.
    pub async fn close(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _cancelled = task.await;
        }
    }

    /// Builds the namespace, the two TUN devices and starts forwarding.
    pub fn start(impairment: Impairment) -> anyhow::Result<Self> {
        let _stale = ip(&["netns", "del", NETNS]);
        ip(&["netns", "add", NETNS])?;
        ip(&["netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])?;
        let outer = tun::create_as_async(&tun_config("qtb0", RELAY_IP, AGENT_IP)).context("creating qtb0")?;
        // A TUN device belongs to the namespace of the thread that creates it.
        let inner = std::thread::spawn(|| -> anyhow::Result<tun::Device> {
            let netns = std::fs::File::open(format!("/var/run/netns/{NETNS}"))?;
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(tun::create(&tun_config("qtb1", AGENT_IP, RELAY_IP))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("TUN thread panicked"))??;
        let inner = tun::AsyncDevice::new(inner).context("registering qtb1")?;
        let (outer, inner) = (Arc::new(outer), Arc::new(inner));
        let mut tasks = Vec::new();
        for (from, to) in [(outer.clone(), inner.clone()), (inner, outer)] {
            let (tx, rx) = tokio::sync::mpsc::channel(65_536);
            tasks.push(tokio::spawn(impair(from, tx, impairment)));
            tasks.push(tokio::spawn(deliver(to, rx)));
        }
        Ok(Self { tasks })
    }
}

/// Reads packets, drops some, and timestamps the rest for delivery after their turn on the link
/// and the propagation delay.
async fn impair(from: Arc<tun::AsyncDevice>, to: tokio::sync::mpsc::Sender<(Instant, Vec<u8>)>, link: Impairment) {
    let mut buf = vec![0u8; 65_536];
    let mut link_free_at = Instant::now();
    loop {
        let n = match from.recv(&mut buf).await {
            Ok(n) => n,
            Err(_) => return,
        };
        if fastrand::f64() * 100.0 < link.loss_percent {
            continue;
        }
        let now = Instant::now();
        let start = link_free_at.max(now);
        let backlog_bytes = (start - now).as_secs_f64() * link.rate_bps as f64 / 8.0;
        if backlog_bytes > link.queue_bytes as f64 {
            continue; // tail drop: the router's queue is full
        }
        link_free_at = start + Duration::from_secs_f64(n as f64 * 8.0 / link.rate_bps as f64);
        if to.send((link_free_at + link.delay, buf[..n].to_vec())).await.is_err() {
            return;
        }
    }
}

/// Writes packets out when their time has come (times never decrease, so FIFO order holds).
async fn deliver(to: Arc<tun::AsyncDevice>, mut packets: tokio::sync::mpsc::Receiver<(Instant, Vec<u8>)>) {
    while let Some((at, packet)) = packets.recv().await {
        tokio::time::sleep_until(at).await;
        if to.send(&packet).await.is_err() {
            return;
        }
    }
}
