//! Sending one tunnelled request to an HTTP upstream with a pooled hyper client. The agent does it
//! for requests from the relay's ingress; the relay does it for requests from an agent's egress.
//!
//! Requests go over HTTP/1.1, or over HTTP/2 with prior knowledge for an `h2c://` target and for
//! gRPC requests (gRPC needs HTTP/2); an `https://` target over TLS (see
//! [`crate::upstream_tls`]), HTTP/2 when ALPN agrees or the request is gRPC. A framed response
//! body carries the upstream's trailers. Failures are the [`StreamCode`] to reset the exchange
//! with, which the other side maps to a status: connect refused → 502, a certificate refused →
//! 502, connect or answer too slow → 504, a broken answer → 502.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_proto::{RequestHead, ResponseHead, StreamCode};
use tracing::{debug, warn};

use crate::body::{BodyError, TunnelBody, empty_body};
use crate::framing::may_have_trailers;
use crate::http::{headers_from_wire, headers_to_wire, strip_hop_by_hop};
use crate::tls::TlsError;
use crate::upgrade::{spawn_splice, upgrade_headers_from_wire};
use crate::upstream_tls::{UpstreamTls, is_certificate_error};

/// One upstream target: authority, an optional base path, whether it speaks HTTP/2, and how its
/// TLS is verified when it is `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    authority: Authority,
    base_path: String,
    http2: bool,
    tls: Option<UpstreamTls>,
}

/// Why a target string is unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream target {target:?}: {reason}")]
pub struct InvalidTarget {
    /// The target as given.
    pub target: String,
    /// Why.
    pub reason: &'static str,
}

impl Target {
    /// Parses `http://host:port[/base]`, `h2c://host:port[/base]` for an upstream that speaks
    /// HTTP/2 without TLS (prior knowledge, as Caddy spells it), or `https://host:port[/base]`
    /// (verified against the system's roots until [`Target::with_tls`] says otherwise).
    pub fn parse(target: &str) -> Result<Self, InvalidTarget> {
        let invalid = |reason| InvalidTarget { target: target.to_owned(), reason };
        let uri: Uri = target.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri.scheme_str().ok_or_else(|| invalid("missing scheme"))?;
        let (http2, tls) = match scheme {
            "http" => (false, None),
            "h2c" => (true, None),
            "https" => (false, Some(UpstreamTls::default())),
            _ => return Err(invalid("only http://, https:// and h2c:// targets are supported")),
        };
        let authority = uri.authority().cloned().ok_or_else(|| invalid("missing host"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self { authority, base_path, http2, tls })
    }

    /// The `https://` target with its TLS verified as `tls` says; an `http://` or `h2c://`
    /// target, which has no TLS to set, comes back as the error, unchanged.
    pub fn with_tls(mut self, tls: UpstreamTls) -> Result<Self, Self> {
        match self.tls.as_mut() {
            Some(slot) => {
                *slot = tls;
                Ok(self)
            }
            None => Err(self),
        }
    }

    /// How the target's TLS is verified, for an `https://` target.
    pub fn tls(&self) -> Option<&UpstreamTls> {
        self.tls.as_ref()
    }

    /// The full URI for a request path (origin form, starting with `/`).
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(if self.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP })
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path_and_query))
            .build()
    }

    /// The host name or address.
    pub fn host(&self) -> &str {
        self.authority.host()
    }

    /// `host:port` (port 80, or 443 for `https://`, when the target names none).
    pub fn host_port(&self) -> String {
        let default = if self.tls.is_some() { 443 } else { 80 };
        format!("{}:{}", self.authority.host(), self.authority.port_u16().unwrap_or(default))
    }

    /// True for an `h2c://` target: every request goes over HTTP/2.
    pub fn http2(&self) -> bool {
        self.http2
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match (&self.tls, self.http2) {
            (Some(_), _) => "https",
            (None, true) => "h2c",
            (None, false) => "http",
        };
        write!(f, "{scheme}://{}{}", self.authority, self.base_path)
    }
}

/// Pooled HTTP clients for upstream requests, with their timeouts.
#[derive(Debug)]
pub struct UpstreamHttp {
    http1: Client<HttpConnector, TunnelBody>,
    /// HTTP/2 with prior knowledge, for `h2c://` targets and gRPC requests.
    http2: Client<HttpConnector, TunnelBody>,
    /// The `https://` clients, one pair per way of verifying (made on first use).
    https: Mutex<HashMap<UpstreamTls, Arc<TlsClients>>>,
    /// What every client is built from: the TCP connector and the pool's settings.
    connector: HttpConnector,
    builder: hyper_util::client::legacy::Builder,
    response_timeout: Duration,
}

/// The clients for `https://` targets verified one way: HTTP/1.1 or HTTP/2 as ALPN agrees, and
/// HTTP/2 only (for gRPC).
#[derive(Debug)]
struct TlsClients {
    any: Client<HttpsConnector<HttpConnector>, TunnelBody>,
    http2: Client<HttpsConnector<HttpConnector>, TunnelBody>,
}

impl UpstreamHttp {
    /// Clients that give up connecting after `connect_timeout` and waiting for an answer after
    /// `response_timeout`.
    pub fn new(connect_timeout: Duration, response_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256);
        let http1 = builder.build(connector.clone());
        let http2 = builder.clone().http2_only(true).build(connector.clone());
        Self { http1, http2, https: Mutex::default(), connector, builder, response_timeout }
    }

    /// The clients for `https://` targets verified as `tls` says.
    fn tls_clients(&self, target: &Target, tls: &UpstreamTls) -> Result<Arc<TlsClients>, TlsError> {
        let mut https = self.https.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(clients) = https.get(tls) {
            return Ok(clients.clone());
        }
        let config = tls.client_config()?;
        let name = tls.server_name(target.host())?;
        let mut connector = self.connector.clone();
        connector.enforce_http(false);
        let base = || {
            HttpsConnectorBuilder::new()
                .with_tls_config(config.clone())
                .https_only()
                .with_server_name_resolver(FixedServerNameResolver::new(name.clone()))
        };
        let clients = Arc::new(TlsClients {
            any: self.builder.build(base().enable_all_versions().wrap_connector(connector.clone())),
            http2: self.builder.clone().http2_only(true).build(base().enable_http2().wrap_connector(connector)),
        });
        https.insert(tls.clone(), clients.clone());
        Ok(clients)
    }

    /// Sends one request (head already validated) to `target` and returns the upstream's response
    /// head and body. For an upgrade (WebSocket) the request goes without a body; when the
    /// upstream answers 101, `body` (the client's bytes) is spliced to the upstream's connection
    /// and the returned body carries the upstream's bytes.
    pub async fn send(
        &self,
        target: &Target,
        head: RequestHead,
        body: TunnelBody,
    ) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let upgrade = matches!(head.target, quictun_proto::Target::Upgrade(_));
        let (request_body, from_peer) = if upgrade { (empty_body(), Some(body)) } else { (body, None) };
        let uri = target.uri_for(&head.uri).map_err(|_| StreamCode::Malformed)?;
        let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| StreamCode::Malformed)?;
        let headers = if upgrade { upgrade_headers_from_wire(head.headers) } else { headers_from_wire(head.headers) };
        let headers = headers.map_err(|_| StreamCode::Malformed)?;
        let http2 = !upgrade && (target.http2() || is_grpc(&headers));
        let mut request = Request::new(request_body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let answer = match target.tls() {
            None if http2 => self.http2.request(request),
            None => self.http1.request(request),
            Some(tls) => {
                let clients = self.tls_clients(target, tls).map_err(|err| {
                    warn!(%err, target = %target, "cannot set up TLS to the upstream");
                    StreamCode::UpstreamCertificate
                })?;
                if http2 { clients.http2.request(request) } else { clients.any.request(request) }
            }
        };
        let response = match tokio::time::timeout(self.response_timeout, answer).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let code = match () {
                    () if err.is_connect() && is_certificate_error(&err) => StreamCode::UpstreamCertificate,
                    () if err.is_connect() && is_timeout(&err) => StreamCode::UpstreamTimeout,
                    () if err.is_connect() => StreamCode::UpstreamConnect,
                    () => StreamCode::UpstreamFailed,
                };
                warn!(err = %crate::error_chain(&err), %target, ?code, "upstream request failed");
                return Err(code);
            }
            Err(_) => {
                warn!(timeout = ?self.response_timeout, "upstream did not answer in time");
                return Err(StreamCode::UpstreamTimeout);
            }
        };
        if let Some(from_peer) = from_peer
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            // The Connection and Upgrade headers are the answer itself: kept.
            let head = ResponseHead { status: 101, headers: headers_to_wire(response.headers()), framed_body: false };
            return Ok((head, splice_upstream(response, from_peer)));
        }
        let (mut parts, body) = response.into_parts();
        let framed_body = may_have_trailers(parts.version, &parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        let body = body.map_err(|e| BodyError::Closed(format!("upstream body: {e}"))).boxed_unsync();
        let head =
            ResponseHead { status: parts.status.as_u16(), headers: headers_to_wire(&parts.headers), framed_body };
        Ok((head, body))
    }
}

/// Splices the peer's stream to the upstream's upgraded connection; returns the upstream's bytes.
fn splice_upstream(mut response: hyper::Response<Incoming>, from_peer: TunnelBody) -> TunnelBody {
    let on_upgrade = hyper::upgrade::on(&mut response);
    let upgraded = async move {
        match on_upgrade.await {
            Ok(upgraded) => Some(TokioIo::new(upgraded)),
            Err(err) => {
                debug!(%err, "upstream connection was not upgraded");
                None
            }
        }
    };
    spawn_splice(upgraded, from_peer)
}

/// True for a gRPC request (not gRPC-Web, which HTTP/1.1 carries): gRPC needs HTTP/2.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.strip_prefix("application/grpc").is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
    })
}

/// True when a connect error was a timeout (answered 504 rather than 502).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::causes(err)
        .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_build_uris() {
        let t = Target::parse("http://127.0.0.1:3000/base/").unwrap();
        assert_eq!(t.uri_for("/x?y=1").unwrap().to_string(), "http://127.0.0.1:3000/base/x?y=1");
        assert!(Target::parse("ftp://x").is_err());
        assert!(Target::parse("not a url").is_err());
        assert_eq!(Target::parse("http://h").unwrap().host_port(), "h:80");
        let h2 = Target::parse("h2c://127.0.0.1:50051").unwrap();
        assert!(h2.http2() && !t.http2());
        assert_eq!(h2.uri_for("/svc/M").unwrap().to_string(), "http://127.0.0.1:50051/svc/M");
    }

    #[test]
    fn grpc_is_recognised_by_its_content_type() {
        let with = |ct: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc") && with("application/grpc+proto") && with("application/grpc;x=1"));
        assert!(!with("application/grpc-web") && !with("application/json"));
    }
}
