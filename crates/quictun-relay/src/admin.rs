//! The admin endpoint (loopback by default): health, readiness and the live sessions.
//!
//! - `GET /healthz` — 200 while the process serves.
//! - `GET /readyz` — 200 while the relay accepts agents and requests, 503 once it drains.
//! - `GET /api/sessions` — the connected agents as JSON: client_id, group, session id, remote
//!   address, connected since (Unix seconds), heartbeat RTT, in-flight streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::state::Shared;

/// One session as `/api/sessions` shows it.
#[derive(Debug, Serialize)]
pub struct SessionInfo {
    /// The agent's identity.
    pub client_id: String,
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
    /// Last heartbeat round-trip time in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Streams in flight now.
    pub in_flight: u32,
}

fn sessions(shared: &Shared) -> Vec<SessionInfo> {
    let mut list: Vec<SessionInfo> = shared
        .sessions
        .all()
        .iter()
        .map(|s| SessionInfo {
            client_id: s.client_id.to_string(),
            group: s.group.to_string(),
            session_id: s.session_id.to_string(),
            remote_addr: s.remote().to_string(),
            transport: s.link.transport(),
            connected_since: s.connected_at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            rtt_ms: s.rtt().map(|d| d.as_secs_f64() * 1000.0),
            in_flight: s.in_flight(),
        })
        .collect();
    list.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    list
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n"),
        ("GET", "/readyz") if shared.shutdown.is_cancelled() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
        }
        ("GET", "/readyz") => reply(StatusCode::OK, "text/plain", "ready\n"),
        ("GET", "/api/sessions") => match serde_json::to_vec_pretty(&sessions(shared)) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(err) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{err}\n")),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the admin endpoint until shutdown completes (it stays up while the relay drains, so
/// `/readyz` can say so).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.stopped.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "admin accept failed");
                    continue;
                }
            },
        };
        let shared2 = shared.clone();
        let service = service_fn(move |req| {
            let response = handle(&shared2, &req);
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let stopped = shared.stopped.clone();
        shared.tasks.spawn(async move {
            tokio::select! {
                result = conn => if let Err(err) = result {
                    debug!(%err, %peer, "admin connection error");
                },
                _ = stopped.cancelled() => {}
            }
        });
    }
}
