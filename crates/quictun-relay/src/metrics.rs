//! The relay's Prometheus metrics, one registry per relay (several relays may share a process).
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `quictun_requests_total` | route, status | ingress requests answered |
//! | `quictun_request_duration_seconds` | route | request head in → response head out |
//! | `quictun_rejects_total` | reason | requests or agents refused (see [`Reject`]) |
//! | `quictun_retries_total` | reason | requests sent again to another agent (see [`Retry`]) |
//! | `quictun_bytes_total` | direction | body bytes: `to_agent` (request), `from_agent` (response) |
//! | `quictun_active_streams` | | proxied exchanges in flight |
//! | `quictun_connected_agents` | transport | registered agent sessions |
//! | `quictun_ingress_connections` | | open ingress TCP connections |
//! | `quictun_waiting_for_agent` | | requests parked just after startup until an agent registers |
//! | `quictun_config_syncs_total` | | configurations pushed to agents by a reload that changed their group's |
//! | `quictun_udp_flows` | | open UDP tunnel flows |
//! | `quictun_udp_datagrams_total`, `quictun_udp_bytes_total` | direction | UDP datagrams and payload bytes: `to_agent`, `from_agent` |
//! | `quictun_udp_drops_total` | reason | UDP datagrams dropped (see [`quictun_core::flows::DropReason`]) |
//! | `quictun_udp_oversize_total` | direction | UDP datagrams that took their flow's stream: too large for a DATAGRAM frame |

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use quictun_core::admin::{DirectionLabel, latency_histogram};
use quictun_core::tunnel::TransportKind;

use crate::sessions::SessionManager;

/// Why a request or an agent was refused.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reject {
    /// No route for the host and path (404).
    no_route,
    /// No agent of the route's group is connected (502).
    no_agent,
    /// Every stream slot of the chosen agent is taken (503).
    agent_busy,
    /// The chosen agent's share for uploads, upgrades and TCP tunnels is taken (503).
    agent_bulk_busy,
    /// The route's in-flight limit is reached (503).
    route_busy,
    /// The body is larger than the route allows (413).
    body_too_large,
    /// The client address has too many ingress connections (503).
    ip_limit,
    /// The client address has too many requests in flight (503), or TCP tunnel connections open.
    ip_requests,
    /// A `[[tcp]]` listener has `max_connections` open (the connection is closed).
    tcp_connections,
    /// A client address has a `[[tcp]]` listener's `max_connections_per_ip` open (closed).
    tcp_connections_per_ip,
    /// The relay has as many ingress connections as its budget allows (503).
    connection_limit,
    /// A request body arrived slower than `min_upload_rate` (408).
    upload_too_slow,
    /// A new connection sent nothing within the header timeout (closed).
    first_byte_timeout,
    /// The request head did not arrive within the header timeout (408).
    header_timeout,
    /// The agent did not answer within the response timeout (504).
    timeout,
    /// The request could not be routed at all: no usable host, or a refused path (400).
    bad_request,
    /// More headers than `max_header_count`, as sent or with the relay's own added (431).
    headers_too_large,
    /// A `CONNECT` at the ingress: the relay is not a forward proxy (405).
    method_not_allowed,
    /// An HTTPS request for a host other than its connection's TLS server name (421).
    misdirected,
    /// An agent's registration was refused (token, group, version).
    registration,
    /// A new QUIC connection over its address's handshake rate.
    handshake_rate,
    /// A new agent connection while too many were still handshaking or registering.
    pending_connections,
    /// A new agent connection while its network held its share of the pending places.
    pending_network,
    /// An agent connection that did not complete its handshake within `handshake_timeout_ms`.
    handshake_timeout,
    /// A register sent as 0-RTT data whose handshake never completed (a replay, or a client
    /// that vanished): nothing was registered.
    unconfirmed_0rtt,
    /// A route's `allow_ips` / `deny_ips` refused the client's address (403).
    policy_address,
    /// The client's address was over a route's `rate_limit_per_ip` (429).
    policy_rate,
    /// No credentials or wrong ones for a route's `basic_auth_file` (401).
    policy_auth,
    /// Too many failed authentications from the address (429).
    policy_auth_failures,
}

/// Why a request was sent again, to another agent of its group.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Retry {
    /// Its stream could not be opened on the first agent: nothing was sent.
    not_opened,
    /// The first agent's tunnel was lost before it answered (an idempotent request, whose body
    /// no transport had read).
    lost,
    /// The first agent went silent while the request waited for its answer (the same kind of
    /// request), before the transport declared it dead.
    silent,
}

/// How an agent's register reached the relay.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RegisterHandshake {
    /// After the handshake (a full one, or a resumed one without early data).
    complete,
    /// As 0-RTT data in a resumed TLS session, answered in the same round trip.
    zero_rtt,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabel {
    handshake: RegisterHandshake,
}

/// Labels of one answered request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The upstream the route named, or `-` when none matched.
    pub route: String,
    /// The status answered.
    pub status: u16,
}

/// The route label alone.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// The upstream name.
    pub route: String,
}

/// Labels of one egress request: where it went and how it ended.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    target: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Reject,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    reason: Retry,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

/// Every metric of one relay and the registry that exposes them.
#[derive(Debug)]
pub struct RelayMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    rejects: Family<ReasonLabel, Counter>,
    retries: Family<RetryLabel, Counter>,
    registrations: Family<HandshakeLabel, Counter>,
    egress: Family<EgressLabels, Counter>,
    active_streams: Gauge,
    agents: Family<TransportLabel, Gauge>,
    /// Open ingress connections (kept up to date by the ingress).
    pub ingress_connections: Gauge,
    /// Requests waiting for an agent of their group during the startup grace.
    pub waiting_for_agent: Gauge,
    /// Agent connections handshaking or not registered yet (set when rendered).
    pub pending_agents: Gauge,
    /// Request body bytes sent to agents.
    pub bytes_to_agent: Counter,
    /// Response body bytes received from agents.
    pub bytes_from_agent: Counter,
    /// Configurations pushed to agents (config_sync) by reloads.
    pub config_syncs: Counter,
    /// UDP tunnels' flows, datagrams and drops (`udp_*`; direction `to_agent`/`from_agent`).
    pub udp: std::sync::Arc<quictun_core::flows::UdpMetrics>,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayMetrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("quictun");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Ingress requests answered, by route and status", requests.clone());
        let latency = Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("request_duration_seconds", "Request head in to response head out", latency.clone());
        let rejects = Family::<ReasonLabel, Counter>::default();
        registry.register("rejects", "Requests and registrations refused, by reason", rejects.clone());
        let retries = Family::<RetryLabel, Counter>::default();
        registry.register("retries", "Requests sent again to another agent, by why", retries.clone());
        let registrations = Family::<HandshakeLabel, Counter>::default();
        registry.register(
            "registrations",
            "Agent sessions registered, by how the register arrived (after the handshake, or as 0-RTT data)",
            registrations.clone(),
        );
        let egress = Family::<EgressLabels, Counter>::default();
        registry.register(
            "egress_requests",
            "Agents' egress requests, by target and status (or failure)",
            egress.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register("bytes", "Body bytes proxied (to_agent: requests, from_agent: responses)", bytes.clone());
        let active_streams = Gauge::default();
        registry.register("active_streams", "Proxied exchanges in flight", active_streams.clone());
        let agents = Family::<TransportLabel, Gauge>::default();
        registry.register("connected_agents", "Registered agent sessions, by transport", agents.clone());
        let ingress_connections = Gauge::default();
        registry.register("ingress_connections", "Open ingress TCP connections", ingress_connections.clone());
        let waiting_for_agent = Gauge::default();
        registry.register(
            "waiting_for_agent",
            "Requests waiting for an agent after startup",
            waiting_for_agent.clone(),
        );
        let pending_agents = Gauge::default();
        registry.register(
            "pending_agent_connections",
            "Agent connections handshaking or not registered yet",
            pending_agents.clone(),
        );
        let config_syncs = Counter::default();
        registry.register(
            "config_syncs",
            "Configurations pushed to agents by a reload that changed their group's",
            config_syncs.clone(),
        );
        let udp = quictun_core::flows::UdpMetrics::new("to_agent", "from_agent");
        udp.register(&mut registry);
        let bytes_to_agent = bytes.get_or_create(&DirectionLabel { direction: "to_agent" }).clone();
        let bytes_from_agent = bytes.get_or_create(&DirectionLabel { direction: "from_agent" }).clone();
        for transport in TransportKind::ALL {
            agents.get_or_create(&TransportLabel { transport: transport.as_str() }).set(0);
        }
        Self {
            registry,
            requests,
            latency,
            rejects,
            retries,
            registrations,
            egress,
            active_streams,
            agents,
            ingress_connections,
            waiting_for_agent,
            pending_agents,
            bytes_to_agent,
            bytes_from_agent,
            config_syncs,
            udp,
        }
    }

    /// The registry, for metrics registered by a part the relay may not run (the cluster).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Adds the stalled-reader metrics of `stall`.
    pub fn register_stall(&mut self, stall: quictun_core::stall::StallMetrics) {
        stall.register(&mut self.registry);
    }

    /// Counts one answered request and, when it reached an agent, its time to the response head.
    pub fn request(&self, route: &str, status: u16, head_latency: Option<std::time::Duration>) {
        self.requests.get_or_create(&RequestLabels { route: route.to_owned(), status }).inc();
        if let Some(latency) = head_latency {
            self.latency.get_or_create(&RouteLabel { route: route.to_owned() }).observe(latency.as_secs_f64());
        }
    }

    /// Counts one egress request: its target (`-` when no route matched) and its status or the
    /// failure it was reset for.
    pub fn egress(&self, target: &str, outcome: &str) {
        self.egress.get_or_create(&EgressLabels { target: target.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    /// Counts one refusal.
    pub fn reject(&self, reason: Reject) {
        self.rejects.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts one request sent again to another agent.
    pub fn retry(&self, reason: Retry) {
        self.retries.get_or_create(&RetryLabel { reason }).inc();
    }

    /// Counts one registered session.
    pub fn registered(&self, handshake: RegisterHandshake) {
        self.registrations.get_or_create(&HandshakeLabel { handshake }).inc();
    }

    /// How many refusals of one kind so far.
    #[cfg(test)]
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejects.get_or_create(&ReasonLabel { reason }).get()
    }

    /// The registry in the OpenMetrics text format, with the session gauges refreshed first.
    pub fn render(&self, sessions: &SessionManager) -> String {
        let all = sessions.all();
        for transport in TransportKind::ALL {
            let count = all.iter().filter(|s| s.tunnel.transport() == transport).count();
            let label = TransportLabel { transport: transport.as_str() };
            self.agents.get_or_create(&label).set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let streams: u64 = all.iter().map(|s| u64::from(s.in_flight())).sum();
        self.active_streams.set(i64::try_from(streams).unwrap_or(i64::MAX));
        quictun_core::admin::encode_metrics(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_rejects_and_histograms() {
        let metrics = RelayMetrics::new();
        metrics.request("app", 200, Some(std::time::Duration::from_millis(3)));
        metrics.request("-", 404, None);
        metrics.reject(Reject::no_route);
        metrics.bytes_to_agent.inc_by(10);
        let text = metrics.render(&SessionManager::new());
        for line in [
            "quictun_requests_total{route=\"app\",status=\"200\"} 1",
            "quictun_requests_total{route=\"-\",status=\"404\"} 1",
            "quictun_rejects_total{reason=\"no_route\"} 1",
            "quictun_bytes_total{direction=\"to_agent\"} 10",
            "quictun_request_duration_seconds_count{route=\"app\"} 1",
            "quictun_connected_agents{transport=\"quic\"} 0",
            "quictun_active_streams 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(metrics.rejected(Reject::no_route), 1);
    }
}
