//! The egress listener, the tunnel's reverse direction: machines next to the agent send plain
//! HTTP requests to it (as to a forward proxy or an API gateway), each request goes to the relay as
//! an exchange of its own (a QUIC stream, or an exchange on the gRPC stream), and the relay
//! forwards it by its `[[egress_routes]]`.
//!
//! Answers follow the ingress's error table: 503 while no relay is connected (or while the relay
//! is at its limit), 502 for a lost connection or an unreachable target, 504 when the answer takes
//! longer than the response timeout; the relay's own 404 (no route) and 403 (group not allowed)
//! pass through.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quictun_core::body::{BodyError, TunnelBody};
use quictun_core::edge::forwarded::{Hop, TrustedProxies, tunnel_request_headers};
use quictun_core::edge::host::{HostError, request_authority};
use quictun_core::edge::serve::{plain_text, serve_with_drain};
use quictun_core::framing::may_have_trailers;
use quictun_core::http::headers_from_wire;
use quictun_core::tunnel::Tunnel;
use quictun_proto::{RequestHead, Target};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::error::AgentError;

/// One agent's connection to its relay, for egress: `None` while it has none.
pub type RelayTunnel = watch::Receiver<Option<Arc<dyn Tunnel>>>;

/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight egress requests get to finish when the listener stops.
const DRAIN: Duration = Duration::from_secs(5);

/// A running egress listener.
pub struct EgressServer {
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What every egress request needs.
struct Egress {
    relays: Vec<RelayTunnel>,
    response_timeout: Duration,
}

impl EgressServer {
    /// Listens on `listen` and sends each request over the first of `relays` that is connected,
    /// waiting at most `response_timeout` for the answer's head.
    pub async fn start(
        listen: SocketAddr,
        relays: Vec<RelayTunnel>,
        response_timeout: Duration,
    ) -> Result<Self, AgentError> {
        let listener = quictun_core::listen_tcp(listen).map_err(|source| AgentError::Listener {
            what: "egress",
            addr: listen,
            source,
        })?;
        let addr =
            listener.local_addr().map_err(|source| AgentError::Listener { what: "egress", addr: listen, source })?;
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let egress = Arc::new(Egress { relays, response_timeout });
        tasks.spawn(accept_loop(listener, egress, stop.clone(), tasks.clone()));
        info!(%addr, "egress listener ready");
        Ok(Self { addr, stop, tasks })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting; requests in flight get a few seconds to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(DRAIN, self.tasks.wait()).await.is_err() {
            warn!(open = self.tasks.len(), "egress requests still open after the drain");
        }
    }
}

async fn accept_loop(listener: TcpListener, egress: Arc<Egress>, stop: CancellationToken, tasks: TaskTracker) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = quictun_core::accept_tcp(&listener, "egress") => accepted,
        };
        let egress = egress.clone();
        let service = hyper::service::service_fn(move |req| {
            let egress = egress.clone();
            async move { Ok::<_, Infallible>(egress.handle(req, peer).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        let serve = serve_with_drain(conn, stop.clone().cancelled_owned(), "egress");
        tasks.spawn(serve.instrument(info_span!("egress", %peer)));
    }
}

impl Egress {
    /// Sends one request through the tunnel; never fails (errors become responses).
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<TunnelBody> {
        let request_id = Uuid::new_v4();
        let span = info_span!("egress_request", %request_id, method = %req.method(), uri = %req.uri());
        let tunnel = self.relays.iter().find_map(|relay| relay.borrow().clone());
        let Some(tunnel) = tunnel else {
            span.in_scope(|| warn!("egress request while no relay is connected"));
            return text(StatusCode::SERVICE_UNAVAILABLE, "not connected to a relay");
        };
        let head = match request_head(&req, peer, request_id) {
            Ok(head) => head,
            Err(err) => return text(StatusCode::BAD_REQUEST, &format!("bad request: {err}")),
        };
        let body = req.into_body().map_err(|e| BodyError::Closed(format!("client body: {e}"))).boxed_unsync();
        let exchange = tokio::time::timeout(self.response_timeout, tunnel.open(head, body, Some(peer.ip())));
        match exchange.instrument(span.clone()).await {
            Ok(Ok((head, body))) => {
                let Ok(headers) = headers_from_wire(head.headers) else {
                    return text(StatusCode::BAD_GATEWAY, "invalid response headers from the relay");
                };
                let mut response = Response::new(body);
                *response.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
                *response.headers_mut() = headers;
                span.in_scope(|| debug!(status = head.status, "egress answered"));
                response
            }
            Ok(Err(err)) => {
                span.in_scope(|| warn!(%err, "egress request failed"));
                let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
                text(status, &err.to_string())
            }
            Err(_) => {
                span.in_scope(|| warn!(timeout = ?self.response_timeout, "no answer to the egress request in time"));
                text(StatusCode::GATEWAY_TIMEOUT, "no answer through the relay in time")
            }
        }
    }
}

/// The head of an egress request: hop-by-hop headers dropped (`TE: trailers` kept), the one
/// Host set (see [`request_authority`]: HTTP/2 and absolute-form requests carry it in the URI),
/// `x-forwarded-for` extended.
/// The head of an egress request. Its clients are the machines next to the agent: their
/// forwarding headers are extended (as from a trusted proxy), by the ingress's own rules.
fn request_head(req: &Request<Incoming>, peer: SocketAddr, request_id: Uuid) -> Result<RequestHead, HostError> {
    let authority = request_authority(req.version(), req.uri(), req.headers())?;
    let framed_body = may_have_trailers(req.version(), req.headers());
    let hop = Hop { client: peer.ip(), proto: "http", host: authority.as_str() };
    let headers = tunnel_request_headers(&TrustedProxies::any(), req.headers(), &hop, &request_id.to_string());
    let has_body = !http_body::Body::is_end_stream(req.body());
    Ok(RequestHead {
        target: Target::Egress,
        request_id,
        method: req.method().as_str().to_owned(),
        uri: req.uri().path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
        headers,
        has_body,
        framed_body: has_body && framed_body,
    })
}

/// A plain-text answer the egress listener gives itself.
fn text(status: StatusCode, message: &str) -> Response<TunnelBody> {
    plain_text(status, message, |bytes| http_body_util::Full::new(bytes).map_err(|never| match never {}).boxed_unsync())
}
