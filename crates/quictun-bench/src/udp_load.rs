//! The load of the `udp` workload: several flows (a socket each) send datagrams at a fixed total
//! rate to a UDP echo (through a `[[udp]]` tunnel, or straight to it), each stamped with its
//! send time; every reply's round trip is recorded, and what never came back is the loss.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// What one run offers.
#[derive(Debug, Clone, Copy)]
pub struct UdpSpec {
    /// Where the datagrams go.
    pub target: SocketAddr,
    /// Client sockets (flows).
    pub flows: usize,
    /// Datagrams per second, all flows together.
    pub rate: u64,
    /// Bytes per datagram (at least 16: a sequence number and a timestamp).
    pub size: usize,
    /// How long to send.
    pub duration: Duration,
}

/// What came back.
#[derive(Debug)]
pub struct UdpResult {
    /// Datagrams sent.
    pub sent: u64,
    /// Replies received (each datagram's first).
    pub received: u64,
    /// Round trips, in microseconds.
    pub latency: Histogram<u64>,
}

impl UdpResult {
    /// The share of datagrams never answered, in percent.
    pub fn lost_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        100.0 * (1.0 - self.received as f64 / self.sent as f64)
    }
}

/// How long replies are waited for after the last datagram is sent.
const STRAGGLERS: Duration = Duration::from_secs(2);

/// Runs `spec` and gathers the replies.
pub async fn run(spec: UdpSpec) -> anyhow::Result<UdpResult> {
    let size = spec.size.max(16);
    let per_flow = (spec.rate / spec.flows.max(1) as u64).max(1);
    let origin = Instant::now();
    let mut flows = Vec::with_capacity(spec.flows);
    for _ in 0..spec.flows.max(1) {
        let socket = Arc::new(quictun_core::bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)))?);
        socket.connect(spec.target).await?;
        let receiver = tokio::spawn(receive(socket.clone(), origin, origin + spec.duration));
        let sender = tokio::spawn(send(socket, per_flow, size, spec.duration, origin));
        flows.push((sender, receiver));
    }
    let mut result = UdpResult { sent: 0, received: 0, latency: crate::load::new_histogram() };
    for (sender, receiver) in flows {
        result.sent += sender.await??;
        let (received, latency) = receiver.await?;
        result.received += received;
        result.latency.add(&latency)?;
    }
    Ok(result)
}

/// Sends `rate` datagrams a second for `duration`; how many it sent.
async fn send(
    socket: Arc<UdpSocket>,
    rate: u64,
    size: usize,
    duration: Duration,
    origin: Instant,
) -> anyhow::Result<u64> {
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut datagram = vec![0u8; size];
    let end = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < end {
        pace.tick().await;
        datagram[..8].copy_from_slice(&sent.to_be_bytes());
        let at = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
        datagram[8..16].copy_from_slice(&at.to_be_bytes());
        // A full socket buffer is the load generator's limit, not the tunnel's loss.
        socket.send(&datagram).await?;
        sent += 1;
    }
    Ok(sent)
}

/// Receives replies until none has come for [`STRAGGLERS`] after the sending ended at
/// `sending_ends`; each sequence number counts once.
async fn receive(socket: Arc<UdpSocket>, origin: Instant, sending_ends: Instant) -> (u64, Histogram<u64>) {
    let mut latency = crate::load::new_histogram();
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut deadline = sending_ends + STRAGGLERS;
    while let Ok(Ok(len)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        deadline = deadline.max(Instant::now() + STRAGGLERS);
        if len < 16 {
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        let at = u64::from_be_bytes(buf[8..16].try_into().unwrap_or_default());
        if seen.insert(seq) {
            let now = u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = latency.record(now.saturating_sub(at).max(1));
        }
    }
    (seen.len() as u64, latency)
}
