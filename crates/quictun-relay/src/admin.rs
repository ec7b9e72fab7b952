//! The relay's admin pages, served by [`quictun_core::admin`] (loopback by default, optional
//! bearer token):
//!
//! - `GET /healthz`, `GET /readyz` (503 once the relay drains);
//! - `GET /metrics`: see [`crate::metrics`];
//! - `GET /api/sessions`: the connected agents as JSON, one entry per instance (agent process) of
//!   each client: client_id, instance id, group, session id, remote address, transport, connected
//!   since (Unix seconds), heartbeat RTT, in-flight streams;
//! - `GET /api/tunnels`: the relay's `[[tcp]]` tunnels and the tunnels agents declared, as
//!   JSON: where each comes from (`relay` or `agent`), kind, host or bound address, the group
//!   serving it, the client ids of the agents that carry it.
//! - `GET /api/routes`: the routes in the order they are tried, with their policies.
//! - `GET /api/requests[?limit=N]`: the recent requests, newest first, from the ring of
//!   `inspect_capacity` (see [`crate::inspect`]); `GET /api/requests/{id}`: one of them with its
//!   headers (credentials redacted).
//! - `GET /api/overview[?limit=N]`: what the dashboard shows, in one answer: uptime, requests by
//!   status class, sessions, routes, tunnels and the most recent requests (50 by default).
//! - `GET /api/cluster`: with `[cluster]`, this relay's id, whether etcd answers, and every
//!   agent session in the cluster's directory with the relay holding it.
//! - `GET /`: the dashboard, one self-contained page (no CDN) that polls `/api/overview`.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::StatusCode;
use quictun_core::admin::{AdminPages, AdminReply, query_param, reply};
use serde::Serialize;
use uuid::Uuid;

use crate::declared::DeclaredView;
use crate::inspect::{RequestSummary, Totals};
use crate::router::RouteView;
use crate::state::{RelayState, Runtime};

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");
/// What the dashboard may load and run: its own inline script and style, and its own origin's
/// API; nothing from elsewhere, and no frames.
const DASHBOARD_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                                connect-src 'self'; img-src data:; frame-ancestors 'none'; base-uri 'none'";
/// Requests `/api/overview` lists unless asked.
const OVERVIEW_REQUESTS: usize = 50;

/// What the dashboard shows, in one answer.
#[derive(Debug, Serialize)]
struct Overview {
    version: &'static str,
    uptime_secs: u64,
    inspect_capacity: usize,
    totals: Totals,
    sessions: Vec<SessionInfo>,
    routes: Vec<RouteView>,
    tunnels: Vec<DeclaredView>,
    requests: Vec<RequestSummary>,
}

/// One session as `/api/sessions` shows it.
#[derive(Debug, Serialize)]
pub struct SessionInfo {
    /// The agent's identity.
    pub client_id: String,
    /// The agent process, among the replicas sharing `client_id`.
    pub instance_id: String,
    /// Its group.
    pub group: String,
    /// The session id.
    pub session_id: String,
    /// The agent's address as the relay sees it.
    pub remote_addr: String,
    /// `quic` or `grpc`.
    pub transport: &'static str,
    /// Registration time, Unix seconds.
    pub connected_since: u64,
    /// Last heartbeat round-trip time in milliseconds (to the microsecond).
    pub rtt_ms: Option<f64>,
    /// Streams in flight now.
    pub in_flight: u32,
    /// How long nothing has arrived from the agent, in milliseconds, once it is suspect (over
    /// 1.25 s): the balancer leaves it out while a sibling answers. Absent while it is heard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent_ms: Option<u64>,
    /// How much longer the balancer leaves the agent out after failing exchanges in a row, in
    /// milliseconds. Absent when it is not in cooldown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cooldown_ms: Option<u64>,
}

fn sessions(runtime: &Runtime) -> Vec<SessionInfo> {
    let mut list: Vec<SessionInfo> = runtime
        .sessions
        .all()
        .iter()
        .map(|s| SessionInfo {
            client_id: s.client_id.to_string(),
            instance_id: s.instance_id.to_string(),
            group: s.group.to_string(),
            session_id: s.session_id.to_string(),
            remote_addr: s.remote().to_string(),
            transport: s.tunnel.transport().as_str(),
            connected_since: s.connected_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            // Whole microseconds: 0.276, not 0.27599999999999997.
            rtt_ms: s.rtt().map(|d| (d.as_micros() as f64) / 1000.0),
            in_flight: s.in_flight(),
            silent_ms: s.silent_for().map(millis),
            cooldown_ms: s.cooldown_left().map(millis),
        })
        .collect();
    list.sort_by(|a, b| (&a.client_id, a.connected_since).cmp(&(&b.client_id, b.connected_since)));
    list
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The relay's pages on the shared admin server.
pub struct RelayPages {
    /// What the pages show.
    pub shared: Arc<RelayState>,
    /// The `[[tcp]]` tunnels: bound address and group.
    pub tcp: Vec<(std::net::SocketAddr, Arc<str>)>,
}

impl RelayPages {
    /// The relay's `[[tcp]]` tunnels (carried by every agent of their group), then the tunnels
    /// agents declared.
    fn tunnels(&self) -> Vec<DeclaredView> {
        let relay = self.tcp.iter().map(|(listen, group)| DeclaredView {
            source: "relay",
            kind: "tcp",
            host: None,
            listen: Some(listen.to_string()),
            group: group.to_string(),
            holders: self.shared.runtime.sessions.group(group).iter().map(|s| s.client_id.to_string()).collect(),
        });
        relay.chain(self.shared.runtime.declared.list()).collect()
    }
}

impl RelayPages {
    fn overview(&self, limit: usize) -> Overview {
        Overview {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.shared.runtime.started.elapsed().as_secs(),
            inspect_capacity: self.shared.settings.inspect_capacity,
            totals: self.shared.runtime.inspector.totals(),
            sessions: sessions(&self.shared.runtime),
            routes: self.shared.live.current().router.views(),
            tunnels: self.tunnels(),
            requests: self.shared.runtime.inspector.recent(limit),
        }
    }
}

impl AdminPages for RelayPages {
    fn ready(&self) -> bool {
        !self.shared.runtime.shutdown.is_cancelled()
    }

    fn metrics(&self) -> String {
        let runtime = &self.shared.runtime;
        let pending = i64::try_from(runtime.pending.count()).unwrap_or(i64::MAX);
        runtime.metrics.pending_agents.set(pending);
        if let Some(cluster) = &runtime.cluster {
            cluster.refresh_metrics();
        }
        runtime.metrics.render(&runtime.sessions)
    }

    fn private(&self, path: &str) -> bool {
        path == "/" || path == "/api/overview" || path.starts_with("/api/requests")
    }

    fn page(&self, path: &str, query: Option<&str>) -> Option<AdminReply> {
        let limit = query_param(query, "limit").and_then(|n| n.parse().ok());
        let json = match path {
            "/" => {
                let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD);
                let headers = page.headers_mut();
                headers.insert(http::header::CONTENT_SECURITY_POLICY, http::HeaderValue::from_static(DASHBOARD_POLICY));
                headers.insert(http::header::X_CONTENT_TYPE_OPTIONS, http::HeaderValue::from_static("nosniff"));
                headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
                return Some(page);
            }
            "/api/sessions" => serde_json::to_vec_pretty(&sessions(&self.shared.runtime)),
            "/api/tunnels" => serde_json::to_vec_pretty(&self.tunnels()),
            "/api/routes" => serde_json::to_vec_pretty(&self.shared.live.current().router.views()),
            "/api/requests" => {
                serde_json::to_vec_pretty(&self.shared.runtime.inspector.recent(limit.unwrap_or(usize::MAX)))
            }
            "/api/overview" => serde_json::to_vec(&self.overview(limit.unwrap_or(OVERVIEW_REQUESTS))),
            "/api/cluster" => {
                let cluster = self.shared.runtime.cluster.as_ref()?;
                let directory = &cluster.directory;
                serde_json::to_vec_pretty(&serde_json::json!({
                    "relay_id": directory.relay_id(),
                    "etcd_up": directory.is_up(),
                    "sessions": directory.holders(),
                }))
            }
            _ => {
                let id = path.strip_prefix("/api/requests/")?;
                let Ok(id) = Uuid::parse_str(id) else {
                    return Some(reply(StatusCode::BAD_REQUEST, "text/plain", "not a request id\n"));
                };
                match self.shared.runtime.inspector.find(id) {
                    Some(record) => serde_json::to_vec_pretty(&record),
                    None => return Some(reply(StatusCode::NOT_FOUND, "text/plain", "no such request in the ring\n")),
                }
            }
        };
        Some(match json {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(err) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{err}\n")),
        })
    }
}
