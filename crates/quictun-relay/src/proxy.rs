//! One proxied request: route it, pick an agent, open a QUIC stream, stream the bodies.
//!
//! The relay opens the stream itself (no extra round trip), writes the request head, streams the
//! request body in a task owned by the response, and waits for the response head under a deadline.
//! Every failure maps to the error table of the contract (404, 502, 503, 504).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use quictun_core::body::{BodyError, TunnelBody};
use quictun_core::edge::forwarded::{Hop, tunnel_request_headers};
use quictun_core::edge::host::{HostError, request_authority};
use quictun_core::edge::path::{self, PathError};
use quictun_core::edge::serve::plain_text;
use quictun_core::framing::may_have_trailers;
use quictun_core::http::headers_from_wire;
use quictun_core::tunnel::ExchangeError;
use quictun_proto::{Header, RequestHead, ResponseHead, StreamCode, Target};
use tokio::time::Instant;
use tracing::{Instrument, debug, field, info_span, warn};
use uuid::Uuid;

use crate::access::AccessEntry;
use crate::admission::Slots;
use crate::balance::Choice;
use crate::body::{BodySlot, Metered, Tripped};
use crate::metrics::{Reject, Retry};
use crate::sessions::Session;
use crate::state::RelayState;
use crate::upgrade;
use quictun_core::upgrade::{channel_body, is_upgrade_request, upgrade_headers_from_wire};

/// The header carrying the relay's request id, on every response.
pub use quictun_core::edge::forwarded::REQUEST_ID_HEADER;

/// Why a request could not be proxied, and so which status it gets.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request has no usable host (missing, duplicate, conflicting, invalid).
    #[error("bad request: {0}")]
    BadHost(#[from] HostError),
    /// The request path is refused (see [`quictun_core::edge::path`]).
    #[error("bad request: {0}")]
    BadPath(#[from] PathError),
    /// More headers than the tunnel carries once the relay's own are added.
    #[error("too many request headers: {count} with the relay's own, the limit is {max}")]
    TooManyHeaders {
        /// Headers the request would carry.
        count: usize,
        /// The tunnel's limit.
        max: usize,
    },
    /// No route matches.
    #[error("no route for host {host:?} and path {path:?}")]
    NoRoute {
        /// The request host.
        host: String,
        /// The request path.
        path: String,
    },
    /// The route's group has no connected agent.
    #[error("no agent of group {0:?} is connected")]
    NoAgent(Arc<str>),
    /// The route's group had no connected agent, and none registered during the relay's
    /// startup grace (`startup_grace_secs`), which the request waited through.
    #[error(
        "no agent of group {group:?} is connected (waited {:.1} s for one to register after the relay started: startup_grace_secs)",
        waited.as_secs_f64()
    )]
    NoAgentAfterWaiting {
        /// The group.
        group: Arc<str>,
        /// How long the request waited.
        waited: Duration,
    },
    /// The exchange with the agent failed before a response head arrived.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The agent sent an unusable response head.
    #[error("invalid response from agent: {0}")]
    BadResponse(String),
    /// No response head within the deadline.
    #[error("no response from the agent within {0:?}")]
    Timeout(Duration),
    /// The route's in-flight limit is reached.
    #[error("route {0:?} has too many requests in flight")]
    RouteBusy(Arc<str>),
    /// The request body is larger than the route allows.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The request body arrived slower than `min_upload_rate`.
    #[error("request body arrived slower than {0} bytes per second")]
    UploadTooSlow(u64),
    /// The client's address has `max_requests_per_ip` requests in flight.
    #[error("too many requests in flight from your address")]
    AddressBusy,
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadHost(_) | Self::BadPath(_) => StatusCode::BAD_REQUEST,
            Self::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RouteBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UploadTooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            Self::AddressBusy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Exchange(err) => StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
            Self::NoAgent(_) | Self::NoAgentAfterWaiting { .. } | Self::BadResponse(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The metrics reason this refusal counts under, when it is one.
    pub fn reject_reason(&self) -> Option<Reject> {
        Some(match self {
            Self::BadHost(_) | Self::BadPath(_) => Reject::bad_request,
            Self::TooManyHeaders { .. } | Self::Exchange(ExchangeError::HeadTooLarge(_)) => Reject::headers_too_large,
            Self::NoRoute { .. } => Reject::no_route,
            Self::NoAgent(_) | Self::NoAgentAfterWaiting { .. } => Reject::no_agent,
            Self::Exchange(ExchangeError::Busy) => Reject::agent_busy,
            Self::RouteBusy(_) => Reject::route_busy,
            Self::BodyTooLarge(_) => Reject::body_too_large,
            Self::UploadTooSlow(_) => Reject::upload_too_slow,
            Self::AddressBusy => Reject::ip_requests,
            Self::Timeout(_) => Reject::timeout,
            Self::Exchange(_) | Self::BadResponse(_) => return None,
        })
    }

    fn into_response(self) -> Response<IngressBody> {
        plain_text(self.status(), &self.to_string(), |bytes| IngressBody::Full(Some(bytes)))
    }
}

/// The body of an ingress response: a short error text, or the agent's stream.
pub enum IngressBody {
    /// A complete body (errors).
    Full(Option<Bytes>),
    /// The response body streamed from the agent.
    Tunnel {
        /// The body, from whichever transport, counted and watched for progress.
        body: Metered<TunnelBody>,
        /// The stream slot on the agent's connection and on the route, held until the body ends.
        _slots: Slots,
        /// The access-log line, written when the body ends or is dropped.
        access: Option<Box<AccessEntry>>,
    },
}

impl Drop for IngressBody {
    fn drop(&mut self) {
        if let Self::Tunnel { body, access: Some(entry), .. } = self {
            entry.log(body.bytes_seen());
        }
    }
}

/// Whether an ingress speaks plain HTTP or HTTPS (told to upstreams in `x-forwarded-proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP/1.1, and HTTP/2 with prior knowledge (h2c).
    Http,
    /// TLS with ALPN `h2` or `http/1.1`.
    Https,
}

impl Scheme {
    /// The scheme's name, as in `x-forwarded-proto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// What a request body is checked for on its way, known once it failed.
#[derive(Default)]
struct BodyChecks {
    /// Over the route's `max_body_bytes` (the limit, and whether it was hit).
    too_large: Option<(u64, Tripped)>,
    /// Under `min_upload_rate` (the rate, and whether it was).
    too_slow: Option<(u64, Tripped)>,
}

impl BodyChecks {
    /// The error a failed check answers with.
    fn failed(&self) -> Option<ProxyError> {
        match (&self.too_large, &self.too_slow) {
            (Some((max, tripped)), _) if tripped.is_set() => Some(ProxyError::BodyTooLarge(*max)),
            (_, Some((rate, tripped))) if tripped.is_set() => Some(ProxyError::UploadTooSlow(*rate)),
            _ => None,
        }
    }
}

/// The request body as it goes to the agent: counted, reset after `stream_idle_timeout` without
/// progress, cut over the route's `max_body_bytes`, and, when it has a declared length, cut when
/// it arrives slower than `min_upload_rate`. A body of no declared length (chunked, HTTP/2 without
/// `Content-Length`, gRPC streams) may pause as long as it likes within the idle timeout:
/// streaming uploads are paced by their application.
fn request_body(shared: &RelayState, body: Incoming, max_body: Option<u64>) -> (TunnelBody, BodyChecks) {
    let declared = body.size_hint().exact().is_some_and(|len| len > 0);
    let mut body =
        Metered::new(body, shared.runtime.metrics.bytes_to_agent.clone(), shared.settings.stream_idle_timeout());
    let mut checks = BodyChecks::default();
    if let Some(max) = max_body {
        let tripped;
        (body, tripped) = body.with_limit(max);
        checks.too_large = Some((max, tripped));
    }
    let rate = shared.settings.min_upload_rate;
    if rate > 0 && declared {
        let tripped;
        (body, tripped) = body.with_min_pace(rate);
        checks.too_slow = Some((rate, tripped));
    }
    (body.boxed_unsync(), checks)
}

impl Body for IngressBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Tunnel { body, .. } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Tunnel { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            Self::Tunnel { .. } => SizeHint::default(),
        }
    }
}

/// The client of an ingress request: its address and how it reached the relay.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Plain HTTP or HTTPS.
    pub scheme: Scheme,
}

/// What a request's metrics and access-log line need to know after it was answered.
#[derive(Default)]
struct RequestMetrics {
    route: Option<Arc<str>>,
    head_latency: Option<Duration>,
    /// Whether the access log is on: the host is kept for it only then.
    access_log: bool,
    host: Option<String>,
    client_id: Option<Arc<str>>,
}

/// Answers one ingress request; never fails (errors become responses).
pub async fn handle(shared: Arc<RelayState>, req: Request<Incoming>, peer: Peer) -> Response<IngressBody> {
    let request_id = Uuid::new_v4();
    let span =
        info_span!("request", %request_id, method = %req.method(), path = %req.uri().path(), client_id = field::Empty);
    let access_log = tracing::enabled!(target: "quictun::access", tracing::Level::INFO);
    let (started, method) = (std::time::Instant::now(), req.method().clone());
    let path = if access_log { req.uri().path().to_owned() } else { String::new() };
    let mut outcome = RequestMetrics { access_log, ..RequestMetrics::default() };
    let mut response = match forward(&shared, req, peer, request_id, &mut outcome).instrument(span.clone()).await {
        Ok(response) => response,
        Err(err) => {
            span.in_scope(|| match &err {
                ProxyError::NoRoute { .. } | ProxyError::BadHost(_) | ProxyError::BadPath(_) => {
                    debug!(%err, "request refused")
                }
                _ => warn!(%err, status = err.status().as_u16(), "request failed"),
            });
            if let Some(reason) = err.reject_reason() {
                shared.runtime.metrics.reject(reason);
            }
            err.into_response()
        }
    };
    let route = outcome.route.as_deref().unwrap_or("-");
    shared.runtime.metrics.request(route, response.status().as_u16(), outcome.head_latency);
    if let Ok(value) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if access_log {
        let entry = AccessEntry {
            request_id,
            client: peer.addr,
            method,
            host: outcome.host,
            path,
            status: response.status().as_u16(),
            client_id: outcome.client_id,
            started,
        };
        match response.body_mut() {
            IngressBody::Tunnel { access, .. } => *access = Some(Box::new(entry)),
            IngressBody::Full(bytes) => entry.log(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
    response
}

/// The headers sent to the agent, built in one pass: hop-by-hop headers (and those the
/// `Connection` header names) dropped, `Host` set to the host the request was routed on, the
/// forwarding headers set by the policy of [`quictun_core::edge::forwarded`], the request id set.
fn forwarded_headers(
    shared: &RelayState,
    req: &Request<Incoming>,
    host: &str,
    peer: Peer,
    request_id: Uuid,
) -> Vec<Header> {
    let hop = Hop { client: peer.addr.ip(), proto: peer.scheme.as_str(), host };
    tunnel_request_headers(&shared.settings.trusted_proxies, req.headers(), &hop, &request_id.to_string())
}

/// Failures that say the agent (or what is behind it) is unwell, as opposed to the request.
fn counts_against_the_agent(err: &ExchangeError) -> bool {
    match err {
        ExchangeError::NotOpened | ExchangeError::Lost | ExchangeError::Protocol(_) => true,
        ExchangeError::Reset(code) => matches!(code, StreamCode::UpstreamConnect | StreamCode::UpstreamFailed),
        ExchangeError::Busy | ExchangeError::HeadTooLarge(_) => false,
    }
}

/// Just after the relay started, agents are still reconnecting: wait (up to the end of the
/// startup grace) for one of `group` to register rather than failing at once.
async fn agent_after_startup(shared: &RelayState, group: &Arc<str>) -> Result<Arc<Session>, ProxyError> {
    let grace = Duration::from_secs(shared.settings.startup_grace_secs);
    let left = grace.saturating_sub(shared.runtime.started.elapsed());
    if left.is_zero() || shared.runtime.shutdown.is_cancelled() {
        return shared
            .runtime
            .sessions
            .choose(group, &Choice::default())
            .ok_or_else(|| ProxyError::NoAgent(group.clone()));
    }
    debug!(left_ms = left.as_millis(), %group, "no agent yet: waiting for one to register");
    let waiting = Instant::now();
    shared.runtime.metrics.waiting_for_agent.inc();
    shared.runtime.sessions.wait_until(left, |sessions| sessions.choose(group, &Choice::default()).is_some()).await;
    shared.runtime.metrics.waiting_for_agent.dec();
    shared
        .runtime
        .sessions
        .choose(group, &Choice::default())
        .ok_or_else(|| ProxyError::NoAgentAfterWaiting { group: group.clone(), waited: waiting.elapsed() })
}

/// The answer to `exchange`, or [`Silenced`] when the agent goes silent first (see
/// [`crate::liveness`]) while no transport has read any of the request body: the request can then
/// move to a sibling at once, rather than wait for the agent to be declared dead. Once part of
/// the body has gone, the answer is awaited.
async fn answer_or_silence<F>(exchange: F, session: &Session, body: &BodySlot) -> Result<F::Output, Silenced>
where
    F: Future<Output = Result<(ResponseHead, TunnelBody), ExchangeError>>,
{
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        answer = &mut exchange => return Ok(answer),
        () = session.went_silent() => {}
    }
    if body.untouched() {
        return Err(Silenced);
    }
    Ok(exchange.await)
}

/// The agent went silent before it answered, and none of the request had gone to it.
struct Silenced;

async fn forward(
    shared: &RelayState,
    mut req: Request<Incoming>,
    peer: Peer,
    request_id: Uuid,
    outcome: &mut RequestMetrics,
) -> Result<Response<IngressBody>, ProxyError> {
    let authority = request_authority(req.version(), req.uri(), req.headers())?;
    let host = authority.as_str();
    if outcome.access_log {
        outcome.host = Some(host.to_owned());
    }
    // Routed and forwarded in its canonical form: the upstream sees the path the route matched.
    let target = path::normalize(req.uri().path_and_query().map_or("/", |pq| pq.as_str()))?.into_owned();
    let path = target.split('?').next().unwrap_or("/");
    let live = shared.live.current();
    let route = live
        .router
        .route(host, path)
        .ok_or_else(|| ProxyError::NoRoute { host: host.to_owned(), path: path.to_owned() })?;
    outcome.route = Some(route.upstream.clone());
    if let (Some(max), Some(length)) = (route.max_body_bytes, req.body().size_hint().exact())
        && length > max
    {
        return Err(ProxyError::BodyTooLarge(max));
    }
    let address_slot = shared.runtime.requests_per_ip.admit(peer.addr.ip()).ok_or(ProxyError::AddressBusy)?;
    let route_slot = match &route.in_flight {
        Some(slots) => {
            Some(slots.clone().try_acquire_owned().map_err(|_| ProxyError::RouteBusy(route.upstream.clone()))?)
        }
        None => None,
    };
    let hash_key = route.hash_header.as_ref().and_then(|h| req.headers().get(h)).map(|v| v.as_bytes().to_vec());
    let (group, balance) = (route.group.clone(), route.balance);
    let choice = |exclude| Choice { balance, key: hash_key.as_deref(), exclude };
    let session = match shared.runtime.sessions.choose(&group, &choice(None)) {
        Some(session) => session,
        None => agent_after_startup(shared, &group).await?,
    };
    tracing::Span::current().record("client_id", &*session.client_id);
    outcome.client_id = Some(session.client_id.clone());
    let agent_slot = session.try_stream_permit().ok_or(ProxyError::Exchange(ExchangeError::Busy))?;
    let is_upgrade = is_upgrade_request(req.version(), req.headers());
    // May run twice (RFC 9110, 9.2.2), should the agent die under it.
    let idempotent = req.method().is_idempotent();
    let mut headers = forwarded_headers(shared, &req, host, peer, request_id);
    if is_upgrade {
        headers.extend(upgrade::upgrade_headers(req.headers()));
    }
    if headers.len() > shared.settings.limits.max_header_count {
        return Err(ProxyError::TooManyHeaders { count: headers.len(), max: shared.settings.limits.max_header_count });
    }
    let head = RequestHead {
        target: if is_upgrade {
            Target::Upgrade(route.upstream.to_string())
        } else {
            Target::Http(route.upstream.to_string())
        },
        request_id,
        method: req.method().as_str().to_owned(),
        uri: target,
        headers,
        has_body: is_upgrade || !req.body().is_end_stream(),
        framed_body: !is_upgrade && may_have_trailers(req.version(), req.headers()),
    };
    let max_body = route.max_body_bytes;
    drop(live);
    // An upgrade's "body" is the client's bytes after the 101; it has no idle timeout.
    let (upgrade, body, checks) = if is_upgrade {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let (to_agent, body) = channel_body();
        let body = Metered::new(body, shared.runtime.metrics.bytes_to_agent.clone(), None);
        (Some(upgrade::Pending { on_upgrade, to_agent }), body.boxed_unsync(), BodyChecks::default())
    } else {
        let (body, checks) = request_body(shared, req.into_body(), max_body);
        (None, body, checks)
    };
    let deadline = Duration::from_secs(shared.settings.response_timeout_secs);
    let started = Instant::now();
    let body = BodySlot::new(body);
    let (mut session, mut agent_slot) = (session, agent_slot);
    // Kept for a retry only where another agent could take it (not on the common single-agent path).
    let retry_head = (shared.runtime.sessions.group_len(&group) > 1).then(|| head.clone());
    let client = Some(peer.addr.ip());
    let first = session.tunnel.open(head, body.body(), client);
    let (mut attempt, silenced) = if retry_head.is_some() && idempotent {
        match tokio::time::timeout(deadline, answer_or_silence(first, &session, &body)).await {
            Ok(Ok(answer)) => (Ok(answer), false),
            Ok(Err(Silenced)) => (Ok(Err(ExchangeError::Lost)), true),
            Err(elapsed) => (Err(elapsed), false),
        }
    } else {
        (tokio::time::timeout(deadline, first).await, false)
    };
    // The request goes once to another agent when that is safe: a stream that could not be opened
    // sent nothing, and an idempotent request (RFC 9110, 9.2.2) whose body no transport has read
    // may run again where the agent died under it (its tunnel was lost before an answer, or it
    // went silent while the request waited for one).
    let retry = match &attempt {
        Ok(Err(ExchangeError::NotOpened)) => Some(Retry::not_opened),
        Ok(Err(ExchangeError::Lost)) if idempotent => Some(if silenced { Retry::silent } else { Retry::lost }),
        _ => None,
    };
    if let Some(head) = retry_head
        && let Some(reason) = retry
        && body.untouched()
    {
        let other = shared.runtime.sessions.choose(&group, &choice(Some(session.session_id)));
        if let Some((other, permit)) = other.and_then(|o| o.try_stream_permit().map(|p| (o, p))) {
            session.record_failure();
            shared.runtime.metrics.retry(reason);
            warn!(from = %session.client_id, to = %other.client_id, ?reason, "agent unreachable before it answered: retrying on another agent");
            (session, agent_slot) = (other, permit);
            tracing::Span::current().record("client_id", &*session.client_id);
            outcome.client_id = Some(session.client_id.clone());
            attempt = tokio::time::timeout(deadline, session.tunnel.open(head, body.body(), client)).await;
        }
    }
    let (response_head, body) = match attempt {
        Ok(Ok(exchanged)) => {
            session.record_success();
            exchanged
        }
        Ok(Err(err)) => {
            // The request body's own failure (too large, too slow) is the cause, not the agent.
            if let Some(failed) = checks.failed() {
                return Err(failed);
            }
            if counts_against_the_agent(&err) {
                session.record_failure();
            }
            return Err(err.into());
        }
        Err(_) => return Err(ProxyError::Timeout(deadline)),
    };
    outcome.head_latency = Some(started.elapsed());
    if let Some(failed) = checks.failed() {
        return Err(failed);
    }
    let status = StatusCode::from_u16(response_head.status).map_err(|e| ProxyError::BadResponse(e.to_string()))?;
    let switching = upgrade.is_some() && status == StatusCode::SWITCHING_PROTOCOLS;
    let headers = if switching {
        upgrade_headers_from_wire(response_head.headers)
    } else {
        headers_from_wire(response_head.headers)
    };
    let headers = headers.map_err(|e| ProxyError::BadResponse(e.to_string()))?;
    let slots = Slots::new(agent_slot, route_slot, address_slot);
    if let Some(pending) = upgrade
        && switching
    {
        let body = Metered::new(body, shared.runtime.metrics.bytes_from_agent.clone(), None).boxed_unsync();
        upgrade::splice_client(&shared.runtime, pending, body, slots);
        let mut response = Response::new(IngressBody::Full(None));
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        return Ok(response);
    }
    let body =
        Metered::new(body, shared.runtime.metrics.bytes_from_agent.clone(), shared.settings.stream_idle_timeout());
    let mut response = Response::new(IngressBody::Tunnel { body, _slots: slots, access: None });
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use http_body_util::BodyExt;
    use quictun_core::body::empty_body;

    use super::*;
    use crate::fake_tunnel::{FakeTunnel, session_on};
    use crate::sessions::SILENT_AFTER;

    fn silent_session() -> Arc<Session> {
        let datagrams = Some(Arc::new(AtomicU64::new(1)));
        let session = session_on("a", "g", FakeTunnel { datagrams, ..FakeTunnel::default() });
        session.observe_datagrams();
        session
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_body_is_untouched_leaves_an_agent_that_goes_silent() {
        let session = silent_session();
        let body = BodySlot::new(empty_body());
        let never_answered = std::future::pending();
        let waiting = answer_or_silence(never_answered, &session, &body);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        tokio::time::advance(SILENT_AFTER + Duration::from_millis(1)).await;
        session.observe_datagrams();
        assert!(matches!(waiting.await, Err(Silenced)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_body_went_out_waits_for_its_answer() {
        let session = silent_session();
        let body = BodySlot::new(empty_body());
        // The transport took the body: the request may have reached the agent.
        let _taken = body.body().frame().await;
        assert!(!body.untouched());
        let answer = async {
            tokio::time::sleep(SILENT_AFTER * 2).await;
            Err(ExchangeError::Reset(StreamCode::UpstreamFailed))
        };
        let waiting = answer_or_silence(answer, &session, &body);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        tokio::time::advance(SILENT_AFTER + Duration::from_millis(1)).await;
        session.observe_datagrams();
        assert!(session.silent_for().is_some());
        assert!(matches!(waiting.await, Ok(Err(ExchangeError::Reset(StreamCode::UpstreamFailed)))));
    }
}
