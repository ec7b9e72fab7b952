//! The admin HTTP endpoint the relay and the agent both serve (loopback by default).
//!
//! - `GET /healthz`: 200 while the process serves; never needs a token (for probes).
//! - `GET /readyz`: 200 when ready, 503 while starting or draining; never needs a token.
//! - `GET /metrics`: Prometheus metrics in the OpenMetrics text format.
//! - anything else the process adds through [`AdminPages::page`] (the relay's `/api/sessions`).
//!
//! With a token configured, every path but the two probes needs `Authorization: Bearer <token>`,
//! or Basic credentials with the token as the password (what a browser sends after asking its
//! user), compared in constant time; without one the endpoint is open, so keep it on loopback.

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

use crate::tunnel::BoxFuture;

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
    /// Answers a `GET` for any other path, with its query string; `None` is a 404.
    fn page(&self, path: &str, query: Option<&str>) -> Option<AdminReply>;
    /// Answers a `POST` for `path` (an action, such as a replay; the request's body is not
    /// read); `None` is a 404.
    fn post(&self, _path: &str) -> Option<BoxFuture<'static, AdminReply>> {
        None
    }
    /// Whether `path` shows traffic (requests, their headers and bodies): without a token, only
    /// a client that named the endpoint by an address or `localhost` gets it, so a web page
    /// whose name was rebound to 127.0.0.1 (DNS rebinding) cannot read it.
    fn private(&self, _path: &str) -> bool {
        false
    }
}

/// Builds a response with a content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminReply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The value of `key` in a query string (`limit=50&detail=1`), when it is there.
pub fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
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

/// True when the request carries `Authorization: Bearer <token>`, or (for a browser, which asks
/// its user) `Basic` credentials whose password is the token; or when no token is required.
fn authorized(token: Option<&Token>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else { return true };
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let offered = match bearer_credentials(authorization) {
        Some(bearer) => bearer.as_bytes().to_vec(),
        None => basic_password(authorization).unwrap_or_default(),
    };
    offered.len() == token.expose().len() && bool::from(offered.as_slice().ct_eq(token.expose().as_bytes()))
}

/// The password of `Basic` credentials (any user name), when they decode.
fn basic_password(authorization: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let (scheme, credentials) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || credentials.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(credentials.trim()).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer_credentials(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim_start())
}

/// True when the request's `Host` names an IP address or `localhost` (what a browser sends for
/// `http://127.0.0.1:9090/`), not a DNS name that could have been rebound.
fn named_by_address(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()) else { return true };
    let Ok(authority) = host.parse::<http::uri::Authority>() else { return false };
    let name = authority.host().trim_start_matches('[').trim_end_matches(']');
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
}

/// True when a browser says the request comes from another site's page (`Origin` present and not
/// this endpoint): such a `POST` is refused (cross-site request forgery).
fn cross_origin(req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return false };
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    !origin_authority.eq_ignore_ascii_case(host)
}

/// An admin answer: ready now, or (an action) once its future resolves.
enum Answer {
    Now(AdminReply),
    Later(BoxFuture<'static, AdminReply>),
}

fn answer(pages: &dyn AdminPages, token: Option<&Token>, req: &Request<Incoming>) -> Answer {
    let path = req.uri().path();
    let post = req.method() == http::Method::POST;
    if req.method() != http::Method::GET && !post {
        return Answer::Now(reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and POST\n"));
    }
    if post && cross_origin(req) {
        return Answer::Now(reply(StatusCode::FORBIDDEN, "text/plain", "a cross-origin POST is refused\n"));
    }
    match (post, pages_answer(pages, token, req, path)) {
        (true, None) => match pages.post(path) {
            Some(action) => Answer::Later(action),
            None => Answer::Now(reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")),
        },
        (_, Some(reply)) => Answer::Now(reply),
        (false, None) => Answer::Now(
            pages
                .page(path, req.uri().query())
                .unwrap_or_else(|| reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")),
        ),
    }
}

/// The answers that do not depend on the page: the probes, the metrics, and the refusals (no
/// token, a rebound name); `None` when the page must answer.
fn pages_answer(
    pages: &dyn AdminPages,
    token: Option<&Token>,
    req: &Request<Incoming>,
    path: &str,
) -> Option<AdminReply> {
    let get = req.method() == http::Method::GET;
    match path {
        "/healthz" if get => return Some(reply(StatusCode::OK, "text/plain", "ok\n")),
        "/readyz" if get && pages.ready() => return Some(reply(StatusCode::OK, "text/plain", "ready\n")),
        "/readyz" if get => return Some(reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")),
        _ => {}
    }
    if !authorized(token, req) {
        let mut response = reply(StatusCode::UNAUTHORIZED, "text/plain", "missing or wrong bearer token\n");
        let challenges = response.headers_mut();
        challenges.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        // A browser asks its user for Basic credentials: the token is the password.
        challenges.append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"quictun admin\""));
        return Some(response);
    }
    if token.is_none() && pages.private(path) && !named_by_address(req) {
        let why = "without an admin token, traffic is shown only to http://<address>/ or http://localhost/\n";
        return Some(reply(StatusCode::FORBIDDEN, "text/plain", why));
    }
    (get && path == "/metrics").then(|| reply(StatusCode::OK, METRICS_CONTENT_TYPE, pages.metrics()))
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
            let answer = answer(&*pages, token.as_deref(), &req);
            async move {
                Ok::<_, Infallible>(match answer {
                    Answer::Now(reply) => reply,
                    Answer::Later(action) => action.await,
                })
            }
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
    use super::{basic_password, bearer_credentials, query_param};

    #[test]
    fn query_params_are_found_by_their_whole_key() {
        assert_eq!(query_param(Some("limit=5&detail=1"), "detail"), Some("1"));
        assert_eq!(query_param(Some("limits=5"), "limit"), None);
        assert_eq!(query_param(None, "limit"), None);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for header in ["Bearer abc", "bearer abc", "BEARER  abc"] {
            assert_eq!(bearer_credentials(header), Some("abc"), "{header}");
        }
        assert_eq!(bearer_credentials("Basic abc"), None);
        assert_eq!(bearer_credentials("Bearer"), None);
    }

    #[test]
    fn a_browser_gives_the_token_as_a_basic_password() {
        // "admin:adm-secret" and ":adm-secret"
        assert_eq!(basic_password("Basic YWRtaW46YWRtLXNlY3JldA==").as_deref(), Some(&b"adm-secret"[..]));
        assert_eq!(basic_password("basic OmFkbS1zZWNyZXQ=").as_deref(), Some(&b"adm-secret"[..]));
        assert_eq!(basic_password("Basic !!!"), None);
        assert_eq!(basic_password("Basic bm9jb2xvbg=="), None, "no colon");
        assert_eq!(basic_password("Bearer YWRtaW46YWRtLXNlY3JldA=="), None);
    }
}
