//! The admin HTTP endpoint the relay and the agent both serve (loopback by default).
//!
//! - `GET /healthz`: 200 while the process serves; never needs a token (for probes).
//! - `GET /readyz`: 200 when ready, 503 while starting or draining; never needs a token.
//! - `GET /metrics`: Prometheus metrics in the OpenMetrics text format.
//! - anything else the process adds through [`AdminPages::page`] (the relay's `/api/sessions`).
//!
//! With a token configured, every path but the two probes needs `Authorization: Bearer <token>`
//! (compared in constant time); without one the endpoint is open, so keep it on loopback.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quictun_proto::Token;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, warn};

/// A complete admin response.
pub type AdminReply = Response<Full<Bytes>>;

/// The OpenMetrics text content type Prometheus negotiates.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Admin connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long an admin client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a process shows on its admin endpoint.
pub trait AdminPages: Send + Sync + 'static {
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
    /// The metrics in the OpenMetrics text format (gauges refreshed first).
    fn metrics(&self) -> String;
    /// Answers a `GET` for any other path; `None` is a 404.
    fn page(&self, path: &str) -> Option<AdminReply>;
}

/// Builds a response with a content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminReply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A latency histogram in seconds, 250 µs to about 65 s in doubling buckets.
pub fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    Histogram::new(exponential_buckets(0.000_25, 2.0, 19))
}

/// The label of a byte counter: which way the bytes went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DirectionLabel {
    /// `to_agent`, `from_upstream`, …
    pub direction: &'static str,
}

/// Encodes a registry in the OpenMetrics text format.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut text, registry) {
        warn!(%err, "could not encode metrics");
    }
    text
}

/// True when the request carries `Authorization: Bearer <token>` (or no token is required).
fn authorized(token: Option<&Token>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else { return true };
    let offered = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials)
        .unwrap_or("");
    offered.len() == token.expose().len() && bool::from(offered.as_bytes().ct_eq(token.expose().as_bytes()))
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer_credentials(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim_start())
}

fn answer(pages: &dyn AdminPages, token: Option<&Token>, req: &Request<Incoming>) -> AdminReply {
    let path = req.uri().path();
    if req.method() != http::Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match path {
        "/healthz" => return reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if pages.ready() => return reply(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => {}
    }
    if !authorized(token, req) {
        let mut response = reply(StatusCode::UNAUTHORIZED, "text/plain", "missing or wrong bearer token\n");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    match path {
        "/metrics" => reply(StatusCode::OK, METRICS_CONTENT_TYPE, pages.metrics()),
        _ => pages.page(path).unwrap_or_else(|| reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")),
    }
}

/// Serves the admin endpoint until `stop` fires; connections are tracked by `tasks`.
pub async fn serve(
    listener: TcpListener,
    pages: Arc<dyn AdminPages>,
    token: Option<Token>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let token = token.map(Arc::new);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = crate::accept_tcp(&listener, "admin") => accepted,
        };
        let (pages, token) = (pages.clone(), token.clone());
        let service = service_fn(move |req| {
            let response = answer(&*pages, token.as_deref(), &req);
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let stop = stop.clone();
        let serve = async move {
            let _slot = slot;
            crate::edge::serve::serve_with_drain(conn, stop.cancelled_owned(), "admin").await;
        };
        tasks.spawn(serve.instrument(tracing::debug_span!("admin", %peer)));
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_credentials;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer abc", "bearer abc", "BEARER  abc"] {
            assert_eq!(bearer_credentials(header), Some("abc"), "{header}");
        }
        assert_eq!(bearer_credentials("Basic abc"), None);
        assert_eq!(bearer_credentials("Bearer"), None);
    }
}
