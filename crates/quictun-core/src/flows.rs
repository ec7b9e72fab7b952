//! UDP flows over a tunnel, the same code at both ends (the relay's `[[udp]]` listeners, the
//! agent's upstream sockets).
//!
//! A flow is one client address's datagrams. Its exchange ([`quictun_proto::Target::Udp`]) sets it
//! up and ends it reliably, and carries the datagrams that must not be lost or that do not fit a
//! packet, framed ([`quictun_proto::datagram::frame_for_stream`]). Every other datagram crosses as
//! a DATAGRAM frame tagged with the flow's id, where the tunnel has them
//! ([`DatagramSupport::Native`]): a lost one stays lost and none waits behind another.
//!
//! - [`FlowTable`]: a tunnel's open flows and the one reader of its DATAGRAM frames, which hands
//!   each to its flow's [`Deliver`] (unknown flows and malformed datagrams are dropped and counted;
//!   the connection stays).
//! - [`FlowLink`]: how one end sends a flow's datagrams: a DATAGRAM frame when allowed and it
//!   fits, else the flow's stream behind a bounded queue. Never waits; every drop is counted.
//! - [`read_stream`]: the datagrams the peer sent on the flow's stream.
//! - [`UdpMetrics`]: what both ends count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use http_body::Frame;
use http_body_util::BodyExt;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use quictun_proto::datagram::{FlowId, MAX_UDP_PAYLOAD, StreamDecoder, frame_for_stream};
use tokio::sync::mpsc::error::TrySendError;

use crate::admin::DirectionLabel;
use crate::body::TunnelBody;
use crate::tunnel::{DatagramError, DatagramSupport, Tunnel};
use crate::upgrade::FrameSender;

/// Why a datagram was dropped (the `reason` of `udp_drops_total`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// The flow's queue (in front of its stream) was full.
    queue_full,
    /// The transport's queue of DATAGRAM frames was full.
    tunnel_full,
    /// Over the 65,507 bytes a UDP datagram can hold.
    too_large,
    /// A new flow while the listener had `max_flows` open.
    listener_flows,
    /// A new flow while the chosen agent had the listener's `max_flows_per_agent` open.
    agent_flows,
    /// A new flow that could not be set up: no agent of the group, no stream, or the agent
    /// refused it.
    not_set_up,
    /// A DATAGRAM frame for a flow that is not open (ended, or never set up).
    unknown_flow,
    /// A DATAGRAM frame without a whole flow id, or a flow stream frame over the limit.
    malformed,
    /// Its flow or tunnel ended before it could be sent.
    closed,
    /// The UDP socket did not take it.
    socket,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: DropReason,
}

/// What one end counts of its UDP flows.
#[derive(Debug)]
pub struct UdpMetrics {
    /// Flows open now.
    pub flows: Gauge,
    datagrams: Family<DirectionLabel, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    drops: Family<DropLabel, Counter>,
    oversize: Family<DirectionLabel, Counter>,
    sent: &'static str,
    received: &'static str,
}

impl UdpMetrics {
    /// Metrics whose `direction` label is `sent` for what this end sends into the tunnel and
    /// `received` for what comes out of it (`to_agent`/`from_agent` on the relay).
    pub fn new(sent: &'static str, received: &'static str) -> Arc<Self> {
        Arc::new(Self {
            flows: Gauge::default(),
            datagrams: Family::default(),
            bytes: Family::default(),
            drops: Family::default(),
            oversize: Family::default(),
            sent,
            received,
        })
    }

    /// Registers `udp_flows`, `udp_datagrams_total`, `udp_bytes_total`, `udp_drops_total` and
    /// `udp_oversize_total` (datagrams that took the flow's stream because they did not fit a
    /// DATAGRAM frame).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("udp_flows", "UDP flows open", self.flows.clone());
        registry.register("udp_datagrams", "UDP datagrams through the tunnel, by direction", self.datagrams.clone());
        registry.register("udp_bytes", "UDP payload bytes through the tunnel, by direction", self.bytes.clone());
        registry.register("udp_drops", "UDP datagrams dropped, by reason", self.drops.clone());
        registry.register(
            "udp_oversize",
            "UDP datagrams sent on their flow's stream because no DATAGRAM frame could hold them",
            self.oversize.clone(),
        );
    }

    /// Counts one dropped datagram.
    pub fn drop_one(&self, reason: DropReason) {
        self.drops.get_or_create(&DropLabel { reason }).inc();
    }

    /// Datagrams dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops.get_or_create(&DropLabel { reason }).get()
    }

    /// Datagrams that took a flow's stream for their size so far.
    pub fn oversized(&self) -> u64 {
        self.oversize.get_or_create(&DirectionLabel { direction: self.sent }).get()
    }

    fn count(&self, direction: &'static str, len: usize) {
        let label = DirectionLabel { direction };
        self.datagrams.get_or_create(&label).inc();
        self.bytes.get_or_create(&label).inc_by(len as u64);
    }
}

/// Hands one datagram from the tunnel to this end's socket. Must not wait.
pub type Deliver = Arc<dyn Fn(Bytes) + Send + Sync>;

/// A tunnel's open flows, and the one reader of its DATAGRAM frames.
pub struct FlowTable {
    tunnel: Arc<dyn Tunnel>,
    flows: DashMap<FlowId, Deliver>,
    next: AtomicU64,
    metrics: Arc<UdpMetrics>,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable").field("flows", &self.flows.len()).finish_non_exhaustive()
    }
}

/// A flow's place in its [`FlowTable`], removed when dropped.
#[derive(Debug)]
pub struct Registered {
    table: Arc<FlowTable>,
    flow: FlowId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.flows.remove(&self.flow);
    }
}

impl FlowTable {
    /// The flow table of `tunnel`. Its reader is [`FlowTable::read_datagrams`].
    pub fn new(tunnel: Arc<dyn Tunnel>, metrics: Arc<UdpMetrics>) -> Arc<Self> {
        Arc::new(Self { tunnel, flows: DashMap::new(), next: AtomicU64::new(0), metrics })
    }

    /// The tunnel the flows cross.
    pub fn tunnel(&self) -> &Arc<dyn Tunnel> {
        &self.tunnel
    }

    /// An id no flow of this table has had (for the end that sets flows up).
    pub fn next_flow_id(&self) -> FlowId {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Flows open now.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow is open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Opens `flow`, whose datagrams go to `deliver`; `None` when the id is in use.
    pub fn register(self: &Arc<Self>, flow: FlowId, deliver: Deliver) -> Option<Registered> {
        match self.flows.entry(flow) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(place) => {
                place.insert(deliver);
                Some(Registered { table: self.clone(), flow })
            }
        }
    }

    /// Reads the tunnel's DATAGRAM frames until it closes, handing each to its flow.
    pub async fn read_datagrams(self: Arc<Self>) {
        loop {
            match self.tunnel.recv_datagram().await {
                Ok((flow, payload)) => {
                    // Clone the handler out: the map's lock is not held while it runs.
                    let deliver = self.flows.get(&flow).map(|entry| entry.value().clone());
                    match deliver {
                        Some(deliver) => {
                            self.metrics.count(self.metrics.received, payload.len());
                            deliver(payload);
                        }
                        None => self.metrics.drop_one(DropReason::unknown_flow),
                    }
                }
                Err(DatagramError::Truncated(_)) => self.metrics.drop_one(DropReason::malformed),
                Err(_) => return,
            }
        }
    }
}

/// How one end sends one flow's datagrams.
#[derive(Debug)]
pub struct FlowLink {
    flow: FlowId,
    stream: FrameSender,
    native: Option<Arc<dyn Tunnel>>,
    metrics: Arc<UdpMetrics>,
}

impl FlowLink {
    /// A link that sends on the flow's stream (`stream`, a bounded queue) until
    /// [`FlowLink::use_datagrams`].
    pub fn new(flow: FlowId, stream: FrameSender, metrics: Arc<UdpMetrics>) -> Self {
        Self { flow, stream, native: None, metrics }
    }

    /// Sends the datagrams that fit as DATAGRAM frames from now on, where `tunnel` has them
    /// (once the peer knows the flow: a DATAGRAM frame of a flow it does not know is dropped).
    pub fn use_datagrams(&mut self, tunnel: &Arc<dyn Tunnel>) {
        if matches!(tunnel.datagram_support(), DatagramSupport::Native { .. }) {
            self.native = Some(tunnel.clone());
        }
    }

    /// Sends one datagram; never waits. What cannot be sent is dropped and counted.
    pub fn send(&self, payload: Bytes) {
        let len = payload.len();
        if len > MAX_UDP_PAYLOAD {
            return self.metrics.drop_one(DropReason::too_large);
        }
        if let Some(tunnel) = &self.native {
            match tunnel.send_datagram(self.flow, payload.clone()) {
                Ok(()) => return self.metrics.count(self.metrics.sent, len),
                Err(DatagramError::TooLarge { .. }) => {
                    self.metrics.oversize.get_or_create(&DirectionLabel { direction: self.metrics.sent }).inc();
                }
                Err(DatagramError::Full) => return self.metrics.drop_one(DropReason::tunnel_full),
                Err(_) => return self.metrics.drop_one(DropReason::closed),
            }
        }
        let Ok(framed) = frame_for_stream(&payload) else {
            return self.metrics.drop_one(DropReason::too_large);
        };
        match self.stream.try_send(Ok(Frame::data(framed))) {
            Ok(()) => self.metrics.count(self.metrics.sent, len),
            Err(TrySendError::Full(_)) => self.metrics.drop_one(DropReason::queue_full),
            Err(TrySendError::Closed(_)) => self.metrics.drop_one(DropReason::closed),
        }
    }
}

/// Why a flow's stream ended other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum FlowStreamError {
    /// The stream failed (reset, or its tunnel lost).
    #[error("the flow's stream failed: {0}")]
    Failed(#[from] crate::body::BodyError),
    /// A frame's length was over the limit.
    #[error(transparent)]
    Malformed(#[from] quictun_proto::datagram::DatagramTooLarge),
    /// It ended in the middle of a datagram.
    #[error("the flow's stream ended inside a datagram")]
    Truncated,
}

/// Reads the datagrams the peer sent on a flow's stream, handing each to `deliver`, until the
/// stream ends (`Ok`) or fails.
pub async fn read_stream(mut body: TunnelBody, deliver: &Deliver, metrics: &UdpMetrics) -> Result<(), FlowStreamError> {
    let mut decoder = StreamDecoder::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        decoder.push(&data);
        while let Some(datagram) = decoder.next_datagram().inspect_err(|_| metrics.drop_one(DropReason::malformed))? {
            metrics.count(metrics.received, datagram.len());
            deliver(datagram);
        }
    }
    if decoder.partial() > 0 {
        return Err(FlowStreamError::Truncated);
    }
    Ok(())
}
