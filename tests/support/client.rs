//! A real HTTP client (hyper) for the ingress.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A request body.
pub type ClientBody = BoxBody<Bytes, std::io::Error>;

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A pooled HTTP/1.1 client aimed at one ingress address.
#[derive(Clone)]
pub struct HttpClient {
    base: String,
    client: Client<HttpConnector, ClientBody>,
}

/// A body from bytes.
pub fn body(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// No body.
pub fn empty() -> ClientBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body streamed in 64 KiB chunks without a Content-Length (chunked encoding).
pub fn chunked(bytes: Vec<u8>) -> ClientBody {
    let bytes = Bytes::from(bytes);
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..bytes.len())
        .step_by(64 * 1024)
        .map(|i| Ok(Frame::data(bytes.slice(i..(i + 64 * 1024).min(bytes.len())))))
        .collect();
    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

impl HttpClient {
    /// A client for `http://{addr}`.
    pub fn new(addr: std::net::SocketAddr) -> Self {
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(64).build_http();
        Self { base: format!("http://{addr}"), client }
    }

    /// Sends a request with an explicit Host header; returns the head and a streaming body.
    pub async fn send(
        &self,
        method: Method,
        host: &str,
        path: &str,
        body: ClientBody,
    ) -> hyper::Response<hyper::body::Incoming> {
        self.try_send(method, host, path, body).await.expect("request failed at the HTTP level")
    }

    /// Like [`Self::send`], returning transport errors.
    pub async fn try_send(
        &self,
        method: Method,
        host: &str,
        path: &str,
        body: ClientBody,
    ) -> Result<hyper::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("host", host)
            .body(body)
            .unwrap();
        self.client.request(req).await
    }

    /// Sends a request and reads the whole answer (under a 60 s deadline).
    pub async fn request(&self, method: Method, host: &str, path: &str, body: ClientBody) -> Reply {
        tokio::time::timeout(Duration::from_secs(60), async {
            let response = self.send(method, host, path, body).await;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("response body failed").to_bytes();
            Reply { status: parts.status, headers: parts.headers, body }
        })
        .await
        .expect("request timed out")
    }

    /// `GET host path`.
    pub async fn get(&self, host: &str, path: &str) -> Reply {
        self.request(Method::GET, host, path, empty()).await
    }
}

/// `GET http://{addr}{path}` on an admin endpoint, with a bearer token when given.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Reply {
    let client: Client<HttpConnector, ClientBody> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(req.body(empty()).unwrap()))
        .await
        .expect("admin request timed out")
        .expect("admin request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("admin body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// The value of one sample (`name{labels} value`) in a metrics text, when present.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Probes `GET /metrics` on an admin endpoint every 20 ms until `sample` is at least `min`
/// (under `timeout`); returns its value.
pub async fn wait_for_metric(addr: std::net::SocketAddr, sample: &str, min: f64, timeout: Duration) -> f64 {
    let mut probe = tokio::time::interval(Duration::from_millis(20));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        probe.tick().await;
        let value = metric(&admin_get(addr, "/metrics", None).await.text(), sample);
        match value {
            Some(v) if v >= min => return v,
            _ => assert!(tokio::time::Instant::now() < deadline, "{sample} stayed at {value:?}, below {min}"),
        }
    }
}

/// Latencies of sequential requests.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// Requests that failed or were not answered 200 within 10 s.
    pub failures: usize,
}

impl HttpClient {
    /// `n` sequential `GET host path` requests (each under 10 s): their latencies.
    pub async fn latencies(&self, host: &str, path: &str, n: usize) -> Latencies {
        let mut times = Vec::with_capacity(n);
        let mut failures = 0;
        for _ in 0..n {
            let started = tokio::time::Instant::now();
            let answer = tokio::time::timeout(Duration::from_secs(10), async {
                let response = self.try_send(Method::GET, host, path, empty()).await.ok()?;
                let status = response.status();
                response.into_body().collect().await.ok()?;
                Some(status)
            })
            .await;
            times.push(started.elapsed());
            if !matches!(answer, Ok(Some(StatusCode::OK))) {
                failures += 1;
            }
        }
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        Latencies { p50: at(0.5), p99: at(0.99), max: at(1.0), failures }
    }
}

/// Waits (probing every 20 ms, under 10 s) until `GET path` on an admin endpoint answers 200
/// (a 404 means not yet: a request reaches an inspector's ring when its answer's body ends, just
/// after the client has it); returns the JSON.
pub async fn admin_wait_for_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = admin_get(addr, path, None).await;
        if reply.status == http::StatusCode::OK {
            return serde_json::from_slice(&reply.body).unwrap();
        }
        assert_eq!(reply.status, http::StatusCode::NOT_FOUND, "{path}: {}", reply.text());
        assert!(tokio::time::Instant::now() < deadline, "{path} never answered within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
