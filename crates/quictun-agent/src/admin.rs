//! The agent's admin endpoint (`admin_listen`), on the shared server of [`quictun_core::admin`]:
//!
//! - `/healthz`, `/readyz` (200 while registered with the relay) and `/metrics`;
//! - `GET /`: the traffic inspector, one self-contained page (no CDN);
//! - `GET /api/requests[?limit=N][&detail=1]`: the HTTP requests this agent forwarded, newest
//!   first (with `detail=1`, each with its headers and bodies); `GET /api/requests/{id}`: one with
//!   its headers and the first `inspect_body_bytes` of each body (see [`crate::inspect`]);
//! - `POST /api/requests/{id}/replay`: sends it to the upstream again (when its request body was
//!   captured whole), recorded as a new entry marked as a replay; answers the new id and status.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, StatusCode, header};
use quictun_core::admin::{AdminPages, AdminReply, query_param, reply};
use quictun_core::tunnel::BoxFuture;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::AgentError;
use crate::forward::{Forwarder, ReplayError};
use crate::metrics::AgentMetrics;
use crate::state::AgentState;

/// The inspector page.
const INSPECTOR: &str = include_str!("inspector.html");
/// What the page may load and run: its own inline script and style, its own origin's API.
const INSPECTOR_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                                connect-src 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The agent's admin pages: ready while registered, metrics, the inspector.
pub struct AgentPages {
    /// The agent's state (ready while connected).
    pub state: watch::Receiver<AgentState>,
    /// Its metrics.
    pub metrics: Arc<AgentMetrics>,
    /// What forwards requests, and records them.
    pub forwarder: Arc<Forwarder>,
}

impl AgentPages {
    fn connected(&self) -> bool {
        matches!(*self.state.borrow(), AgentState::Connected { .. })
    }
}

/// A JSON answer, or a 500 naming why it could not be encoded.
fn json(status: StatusCode, value: &impl serde::Serialize) -> AdminReply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(err) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{err}\n")),
    }
}

impl AdminPages for AgentPages {
    fn ready(&self) -> bool {
        self.connected()
    }

    fn metrics(&self) -> String {
        self.metrics.render(self.connected())
    }

    fn private(&self, path: &str) -> bool {
        path == "/" || path.starts_with("/api/requests")
    }

    fn page(&self, path: &str, query: Option<&str>) -> Option<AdminReply> {
        let inspector = &self.forwarder.inspector;
        match path {
            "/" => {
                let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", INSPECTOR);
                let headers = page.headers_mut();
                headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(INSPECTOR_POLICY));
                headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                Some(page)
            }
            "/api/requests" => {
                let limit = query_param(query, "limit").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
                let (capacity, body_bytes) = inspector.settings();
                let requests = if query_param(query, "detail") == Some("1") {
                    let records = inspector.recent_records(limit);
                    serde_json::to_value(records.iter().map(|r| &**r).collect::<Vec<_>>())
                } else {
                    serde_json::to_value(inspector.recent(limit))
                };
                let list = serde_json::json!({
                    "inspect_capacity": capacity,
                    "inspect_body_bytes": body_bytes,
                    "requests": requests.unwrap_or_default(),
                });
                Some(json(StatusCode::OK, &list))
            }
            _ => {
                let id = path.strip_prefix("/api/requests/")?;
                let Ok(id) = Uuid::parse_str(id) else {
                    return Some(reply(StatusCode::BAD_REQUEST, "text/plain", "not a request id\n"));
                };
                Some(match inspector.find(id) {
                    Some(record) => json(StatusCode::OK, &*record),
                    None => reply(StatusCode::NOT_FOUND, "text/plain", "no such request in the inspector\n"),
                })
            }
        }
    }

    fn post(&self, path: &str) -> Option<BoxFuture<'static, AdminReply>> {
        let id = path.strip_prefix("/api/requests/")?.strip_suffix("/replay")?;
        let id = Uuid::parse_str(id);
        let forwarder = self.forwarder.clone();
        Some(Box::pin(async move {
            let Ok(id) = id else { return reply(StatusCode::BAD_REQUEST, "text/plain", "not a request id\n") };
            match forwarder.replay(id).await {
                Ok((new_id, head)) => {
                    json(StatusCode::OK, &serde_json::json!({ "id": new_id, "replay_of": id, "status": head.status }))
                }
                Err(err) => {
                    let status = match err {
                        ReplayError::NotFound => StatusCode::NOT_FOUND,
                        ReplayError::BodyNotWhole => StatusCode::CONFLICT,
                        ReplayError::Failed(_) => StatusCode::BAD_GATEWAY,
                    };
                    reply(status, "text/plain", format!("{err}\n"))
                }
            }
        }))
    }
}

/// Binds the admin listener (synchronously, so [`crate::Agent::start_on`] stays synchronous).
pub fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), AgentError> {
    let err = |source: std::io::Error| AgentError::Listener { what: "admin", addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((tokio::net::TcpListener::from_std(listener).map_err(err)?, bound))
}
