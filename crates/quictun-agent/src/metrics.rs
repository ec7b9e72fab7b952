//! The agent's Prometheus metrics (served on its optional admin endpoint).
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `quictun_agent_requests_total` | upstream, status | requests forwarded; `status` is the upstream's HTTP status or the stream code the request failed with (`upstream_connect`, `upstream_timeout`, …) |
//! | `quictun_agent_upstream_duration_seconds` | upstream | request sent → upstream response head |
//! | `quictun_agent_active_streams` | | requests being forwarded (until their response body ends) |
//! | `quictun_agent_bytes_total` | direction | body bytes `to_upstream` and `from_upstream` |
//! | `quictun_agent_connected` | | 1 while registered with the relay |
//! | `quictun_agent_tunnels_refused_total` | | declared tunnels the relay refused (each answer counts) |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use quictun_core::admin::{DirectionLabel, latency_histogram};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabel {
    upstream: String,
}

/// Every metric of one agent.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<UpstreamLabel, Histogram, fn() -> Histogram>,
    /// Requests being forwarded.
    pub active_streams: Gauge,
    /// Request body bytes sent to upstreams.
    pub bytes_to_upstream: Counter,
    /// Response body bytes received from upstreams.
    pub bytes_from_upstream: Counter,
    connected: Gauge,
    /// Declared tunnels the relay refused.
    pub tunnels_refused: Counter,
    /// UDP flows, datagrams and drops (`udp_*`; direction `to_relay`/`from_relay`).
    pub udp: std::sync::Arc<quictun_core::flows::UdpMetrics>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("quictun_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests forwarded, by upstream and status or failure", requests.clone());
        let latency = Family::<UpstreamLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("upstream_duration_seconds", "Request sent to upstream response head", latency.clone());
        let active_streams = Gauge::default();
        registry.register("active_streams", "Requests being forwarded", active_streams.clone());
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("bytes", "Body bytes to and from upstreams", bytes.clone());
        let bytes_to_upstream = bytes.get_or_create(&DirectionLabel { direction: "to_upstream" }).clone();
        let bytes_from_upstream = bytes.get_or_create(&DirectionLabel { direction: "from_upstream" }).clone();
        let connected = Gauge::default();
        registry.register("connected", "1 while registered with the relay", connected.clone());
        let tunnels_refused = Counter::default();
        registry.register("tunnels_refused", "Declared tunnels the relay refused", tunnels_refused.clone());
        let udp = quictun_core::flows::UdpMetrics::new("to_relay", "from_relay");
        udp.register(&mut registry);
        Self {
            registry,
            requests,
            latency,
            active_streams,
            bytes_to_upstream,
            bytes_from_upstream,
            connected,
            tunnels_refused,
            udp,
        }
    }

    /// Adds the stalled-reader metrics of `stall`.
    pub fn register_stall(&mut self, stall: quictun_core::stall::StallMetrics) {
        stall.register(&mut self.registry);
    }

    /// Counts one forwarded request: its status (or failure) and, when answered, its latency.
    pub fn request(&self, upstream: &str, status: &str, latency: Option<Duration>) {
        self.requests.get_or_create(&RequestLabels { upstream: upstream.to_owned(), status: status.to_owned() }).inc();
        if let Some(latency) = latency {
            self.latency.get_or_create(&UpstreamLabel { upstream: upstream.to_owned() }).observe(latency.as_secs_f64());
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn render(&self, connected: bool) -> String {
        self.connected.set(i64::from(connected));
        quictun_core::admin::encode_metrics(&self.registry)
    }
}

/// Holds one request in `active_streams` until dropped (with the response body).
#[derive(Debug)]
pub struct ActiveStream(Gauge);

impl ActiveStream {
    /// Counts a request as active.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}
