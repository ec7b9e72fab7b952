//! The last phases of the request path: `response_filter`, the response the client gets from the
//! agent's answer (its status and headers, with the route's response-header rewrites, and the body streamed
//! back, or the client's connection spliced to the agent's stream after a 101), and `logging`,
//! the request's metrics, its id on the response, and its access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use quictun_core::http::headers_from_wire;
use quictun_core::upgrade::upgrade_headers_from_wire;
use uuid::Uuid;

use super::dispatch::Dispatched;
use super::edge::EdgeSlots;
use super::error::{BadResponse, ProxyError};
use super::{IngressBody, REQUEST_ID_HEADER};
use crate::access::AccessEntry;
use crate::admission::Slots;
use crate::body::Metered;
use crate::policies::HeaderEdits;
use crate::state::RelayState;
use crate::upgrade;

/// The `response_filter` phase: the client's response from the agent's answer. The stream slot,
/// the route's slot and the client address's place are held until the response body ends (or the
/// upgraded connection closes).
pub fn response_filter(
    shared: &RelayState,
    answer: Dispatched,
    upgrade: Option<upgrade::Pending>,
    edge: EdgeSlots,
    rewrites: &HeaderEdits,
) -> Result<Response<IngressBody>, ProxyError> {
    let Dispatched { head, body, agent_slot, .. } = answer;
    let status = StatusCode::from_u16(head.status).map_err(BadResponse::from)?;
    let switching = upgrade.is_some() && status == StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = if switching { upgrade_headers_from_wire(head.headers) } else { headers_from_wire(head.headers) }
        .map_err(BadResponse::from)?;
    rewrites.apply(&mut headers);
    let slots = Slots::new(agent_slot, edge.route, edge.address);
    let metrics = &shared.runtime.metrics;
    let body = match upgrade {
        Some(pending) if switching => {
            let body = Metered::new(body, metrics.bytes_from_agent.clone(), None);
            upgrade::splice_client(&shared.runtime, pending, http_body_util::BodyExt::boxed_unsync(body), slots);
            IngressBody::Full(None)
        }
        _ => {
            let body = Metered::new(body, metrics.bytes_from_agent.clone(), shared.settings.stream_idle_timeout());
            IngressBody::Tunnel { body, _slots: slots, access: None }
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// What the `logging` phase needs to know of a request, gathered while it is handled.
pub struct RequestLog {
    request_id: Uuid,
    client: SocketAddr,
    method: http::Method,
    started: std::time::Instant,
    /// The path as the client sent it; kept only while the access log is on.
    path: String,
    /// The host it was routed on; kept only while the access log is on.
    host: Option<String>,
    access_log: bool,
    /// The upstream the route named.
    pub route: Option<Arc<str>>,
    /// The agent it was last sent to.
    pub client_id: Option<Arc<str>>,
    /// From the exchange's opening to the response head, when the agent answered.
    pub head_latency: Option<Duration>,
}

impl RequestLog {
    /// The record of `request`, from `client`, under `request_id`.
    pub fn new(request: &Request<Incoming>, client: SocketAddr, request_id: Uuid) -> Self {
        let access_log = tracing::enabled!(target: "quictun::access", tracing::Level::INFO);
        Self {
            request_id,
            client,
            method: request.method().clone(),
            started: std::time::Instant::now(),
            path: if access_log { request.uri().path().to_owned() } else { String::new() },
            host: None,
            access_log,
            route: None,
            client_id: None,
            head_latency: None,
        }
    }

    /// The host the request is routed on (kept for the access log only).
    pub fn host(&mut self, host: &str) {
        if self.access_log {
            self.host = Some(host.to_owned());
        }
    }
}

/// The `logging` phase: counts the answer, puts the request id on it, and writes its access-log
/// line (now, or when a streamed body ends, so that the line has the bytes sent).
pub fn logging(shared: &RelayState, mut response: Response<IngressBody>, log: RequestLog) -> Response<IngressBody> {
    let route = log.route.as_deref().unwrap_or("-");
    shared.runtime.metrics.request(route, response.status().as_u16(), log.head_latency);
    if let Ok(value) = HeaderValue::from_str(&log.request_id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if log.access_log {
        let entry = AccessEntry {
            request_id: log.request_id,
            client: log.client,
            method: log.method,
            host: log.host,
            path: log.path,
            status: response.status().as_u16(),
            client_id: log.client_id,
            started: log.started,
        };
        match response.body_mut() {
            IngressBody::Tunnel { access, .. } => *access = Some(Box::new(entry)),
            IngressBody::Full(bytes) => entry.log(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
    response
}
