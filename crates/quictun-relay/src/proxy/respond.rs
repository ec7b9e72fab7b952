//! The last phases of the request path: `response_filter`, the response the client gets from the
//! agent's answer (its status and headers, with the route's response-header rewrites, and the body streamed
//! back, or the client's connection spliced to the agent's stream after a 101), and `logging`,
//! the request's metrics, its id on the response, and its access-log line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use quictun_core::http::headers_from_wire;
use quictun_core::upgrade::upgrade_headers_from_wire;
use uuid::Uuid;

use super::dispatch::Dispatched;
use super::edge::EdgeSlots;
use super::error::{BadResponse, ProxyError};
use super::{IngressBody, REQUEST_ID_HEADER};
use crate::access::{AccessEntry, Inspected};
use crate::admission::Slots;
use crate::body::Metered;
use crate::inspect::{CaptureText, Inspector};
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
    let Dispatched { head, body, served, .. } = answer;
    let status = StatusCode::from_u16(head.status).map_err(BadResponse::from)?;
    let switching = upgrade.is_some() && status == StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = if switching { upgrade_headers_from_wire(head.headers) } else { headers_from_wire(head.headers) }
        .map_err(BadResponse::from)?;
    rewrites.apply(&mut headers);
    let slots = Slots::new(served, edge.route, edge.address);
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
    time: SystemTime,
    /// The path and query as the client sent them, the host it was routed on and the headers;
    /// written only while the access log or the ring of recent requests is on (the headers only
    /// for the ring).
    text: CaptureText,
    access_log: bool,
    /// The ring the request goes to and its body bytes; `None` when it is off.
    inspect: Option<Inspected>,
    /// The upstream the route named.
    pub route: Option<Arc<str>>,
    /// The agent it was last sent to.
    pub client_id: Option<Arc<str>>,
    /// That agent's transport.
    pub transport: Option<&'static str>,
    /// From the exchange's opening to the response head, when the agent answered.
    pub head_latency: Option<Duration>,
}

impl RequestLog {
    /// The record of `request`, from `client`, under `request_id`; kept in `inspector` when it
    /// keeps requests.
    pub fn new(request: &Request<Incoming>, client: SocketAddr, request_id: Uuid, inspector: &Arc<Inspector>) -> Self {
        let access_log = tracing::enabled!(target: "quictun::access", tracing::Level::INFO);
        let inspect =
            inspector.keeps_requests().then(|| Inspected { inspector: inspector.clone(), bytes_in: Arc::default() });
        let mut text = inspector.text();
        if access_log || inspect.is_some() {
            text.set_target(request.uri().path_and_query().map_or_else(|| request.uri().path(), |pq| pq.as_str()));
        }
        if inspect.is_some() {
            text.set_request_headers(request.headers());
        }
        Self {
            request_id,
            client,
            method: request.method().clone(),
            started: std::time::Instant::now(),
            time: SystemTime::now(),
            text,
            access_log,
            inspect,
            route: None,
            client_id: None,
            transport: None,
            head_latency: None,
        }
    }

    /// The host the request is routed on (kept for the access log and the ring only).
    pub fn host(&mut self, host: &str) {
        if self.access_log || self.inspect.is_some() {
            self.text.set_host(host);
        }
    }

    /// Where the request body's bytes are counted for the ring, when it is on.
    pub fn bytes_in(&self) -> Option<Arc<AtomicU64>> {
        self.inspect.as_ref().map(|i| i.bytes_in.clone())
    }
}

/// The `logging` phase: counts the answer, puts the request id on it, and finishes its record
/// (its access-log line and its place in the ring of recent requests) now, or when a streamed
/// body ends, so that the record has the bytes sent.
pub fn logging(shared: &RelayState, mut response: Response<IngressBody>, log: RequestLog) -> Response<IngressBody> {
    let route = log.route.as_deref().unwrap_or("-");
    let status = response.status().as_u16();
    shared.runtime.metrics.request(route, status, log.head_latency);
    shared.runtime.inspector.count(status);
    if let Ok(value) = HeaderValue::from_str(&log.request_id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if log.access_log || log.inspect.is_some() {
        let mut text = log.text;
        if log.inspect.is_some() {
            text.set_response_headers(response.headers());
        }
        let entry = AccessEntry {
            request_id: log.request_id,
            client: log.client,
            method: log.method,
            text,
            status,
            client_id: log.client_id,
            transport: log.transport,
            started: log.started,
            time: log.time,
            access_log: log.access_log,
            inspect: log.inspect,
        };
        match response.body_mut() {
            IngressBody::Tunnel { access, .. } => *access = Some(Box::new(entry)),
            IngressBody::Full(bytes) => entry.finish(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
    response
}
