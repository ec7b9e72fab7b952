//! The edge half of the request path: hyper's request turned into a transport-neutral one.
//!
//! - [`request_filter`]: the checks of the head alone (a method the relay serves, at most
//!   `max_header_count` headers on any HTTP version), the one host (on HTTPS, the host its
//!   connection was opened for), the canonical path, the route, a declared body over the route's
//!   limit, the client address's and the route's places for a request in flight.
//! - [`upstream_request_filter`]: the head the agent gets (hop-by-hop headers out, the relay's
//!   forwarding headers and request id in) and the body it streams (watched for size, pace and
//!   progress), ready for [`super::dispatch`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::Request;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use quictun_core::body::TunnelBody;
use quictun_core::edge::forwarded::{Hop, tunnel_request_headers};
use quictun_core::edge::host::request_authority;
use quictun_core::edge::path;
use quictun_core::framing::may_have_trailers;
use quictun_core::upgrade::{channel_body, is_upgrade_request};
use quictun_proto::{RequestHead, Target};
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use super::Peer;
use super::dispatch::{BodyChecks, Dispatch};
use super::error::ProxyError;
use super::respond::RequestLog;
use crate::admission::Held;
use crate::body::Metered;
use crate::router::Route;
use crate::sessions::StreamKind;
use crate::state::RelayState;
use crate::upgrade;

/// A request the edge accepted: routed, checked, holding its places. What the policy phase looks
/// at, and what [`upstream_request_filter`] turns into a dispatch.
pub struct Accepted {
    /// The request as hyper gave it.
    pub request: Request<Incoming>,
    /// The host it was routed on.
    pub host: String,
    /// Its canonical path and query: what the route matched, and what the upstream receives.
    pub target: String,
    /// The route it matched.
    pub route: Arc<Route>,
    /// Its places under the client address's and the route's limits.
    pub slots: EdgeSlots,
}

/// The places a request holds at the edge until its answer's body ends.
pub struct EdgeSlots {
    /// Under the client address's `max_requests_per_ip`.
    pub address: Held<IpAddr>,
    /// Under the route's `max_in_flight`, when it has one.
    pub route: Option<OwnedSemaphorePermit>,
}

/// The `request_filter` phase (see the module documentation). `log` learns the host and the
/// route as soon as they are known, for the request's metrics and access-log line.
pub fn request_filter(
    shared: &RelayState,
    request: Request<Incoming>,
    peer: &Peer,
    log: &mut RequestLog,
) -> Result<Accepted, ProxyError> {
    if request.method() == http::Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(http::Method::CONNECT));
    }
    // HTTP/1.1 is held to the budget by hyper's parser; HTTP/2 here, by the same count.
    let (count, max) = (request.headers().len(), shared.settings.max_header_count);
    if count > max {
        return Err(ProxyError::TooManyHeaders { count, max });
    }
    let authority = request_authority(request.version(), request.uri(), request.headers())?;
    let host = authority.as_str().to_owned();
    log.host(&host);
    if let Some(sni) = &peer.sni
        && !authority.host().eq_ignore_ascii_case(sni)
    {
        return Err(ProxyError::Misdirected { host, sni: sni.to_string() });
    }
    // Routed and forwarded in its canonical form: the upstream sees the path the route matched.
    let target = path::normalize(request.uri().path_and_query().map_or("/", |pq| pq.as_str()))?.into_owned();
    let path = target.split('?').next().unwrap_or("/");
    // The relay's routes, then the hosts agents declared, then a route for every host.
    let route = match shared.live.current().router.route(&host, path) {
        Some(route) if !route.matches_every_host() => Some(route.clone()),
        every_host => shared.runtime.declared.route(&host).or_else(|| every_host.cloned()),
    }
    .ok_or_else(|| ProxyError::NoRoute { host: host.clone(), path: path.to_owned() })?;
    log.route = Some(route.upstream.clone());
    if let (Some(max), Some(length)) = (route.max_body_bytes, request.body().size_hint().exact())
        && length > max
    {
        return Err(ProxyError::BodyTooLarge(max));
    }
    let address = shared.runtime.requests_per_ip.admit(peer.addr.ip()).ok_or(ProxyError::AddressBusy)?;
    let route_slot = match &route.in_flight {
        Some(slots) => {
            Some(slots.clone().try_acquire_owned().map_err(|_| ProxyError::RouteBusy(route.upstream.clone()))?)
        }
        None => None,
    };
    Ok(Accepted { request, host, target, route, slots: EdgeSlots { address, route: route_slot } })
}

/// What [`upstream_request_filter`] hands on: the dispatch, and what the answer needs back.
pub struct Outgoing {
    /// The request for the dispatch half.
    pub dispatch: Dispatch,
    /// An upgrade's parts, kept until the agent answers 101.
    pub upgrade: Option<upgrade::Pending>,
    /// The edge's places, held until the answer's body ends.
    pub slots: EdgeSlots,
    /// The route (its response-header rewrites apply to the answer).
    pub route: Arc<Route>,
}

/// The `upstream_request_filter` phase (see the module documentation).
pub fn upstream_request_filter(
    shared: &RelayState,
    accepted: Accepted,
    peer: &Peer,
    request_id: Uuid,
    tally: Option<Arc<AtomicU64>>,
) -> Result<Outgoing, ProxyError> {
    let Accepted { mut request, host, target, route, slots } = accepted;
    let is_upgrade = is_upgrade_request(request.version(), request.headers());
    let hop = Hop { client: peer.addr.ip(), proto: peer.scheme.as_str(), host: &host };
    let mut headers =
        tunnel_request_headers(&shared.settings.trusted_proxies, request.headers(), &hop, &request_id.to_string());
    if is_upgrade {
        headers.extend(upgrade::upgrade_headers(request.headers()));
    }
    route.policies.request_headers.apply_to_wire(&mut headers);
    let max = shared.settings.limits.max_header_count;
    if headers.len() > max {
        return Err(ProxyError::TooManyHeaders { count: headers.len(), max });
    }
    let upstream = route.upstream.to_string();
    let head = RequestHead {
        target: if is_upgrade { Target::Upgrade(upstream) } else { Target::Http(upstream) },
        request_id,
        method: request.method().as_str().to_owned(),
        uri: target,
        headers,
        has_body: is_upgrade || !request.body().is_end_stream(),
        framed_body: !is_upgrade && may_have_trailers(request.version(), request.headers()),
    };
    let hash_key = route.hash_header.as_ref().and_then(|h| request.headers().get(h)).map(|v| v.as_bytes().to_vec());
    let idempotent = request.method().is_idempotent();
    // An upgrade's "body" is the client's bytes after the 101; it has no idle timeout.
    let (upgrade, body, checks) = if is_upgrade {
        let on_upgrade = hyper::upgrade::on(&mut request);
        let (to_agent, body) = channel_body();
        let body = Metered::new(body, shared.runtime.metrics.bytes_to_agent.clone(), None).with_tally(tally);
        (Some(upgrade::Pending { on_upgrade, to_agent }), body.boxed_unsync(), BodyChecks::default())
    } else {
        let grpc = is_grpc(request.headers());
        let (body, checks) = request_body(shared, request.into_body(), route.max_body_bytes, grpc, tally);
        (None, body, checks)
    };
    let client = Some(peer.addr.ip());
    let (pool, balance) = (route.pool.clone(), route.balance);
    let kind = if head.has_body { StreamKind::Bulk } else { StreamKind::Request };
    let dispatch =
        Dispatch { pool, balance, hash_key, head, body, idempotent, client, checks, kind, may_forward: true };
    Ok(Outgoing { dispatch, upgrade, slots, route })
}

/// The request body as it goes to the agent: counted, reset after `stream_idle_timeout` without
/// progress, cut over the route's `max_body_bytes`, and cut when it arrives slower than
/// `min_upload_rate`, chunked or not. A gRPC call's body is exempt from the pace (its messages
/// come when its application sends them; a client stream may idle between them), and held only to
/// the idle timeout. A body that fails on the client's side (cut, malformed, stalled) is noted as
/// the client's. Its bytes are added to `tally` too, when there is one.
fn request_body(
    shared: &RelayState,
    body: Incoming,
    max_body: Option<u64>,
    grpc: bool,
    tally: Option<Arc<AtomicU64>>,
) -> (TunnelBody, BodyChecks) {
    let empty = body.size_hint().exact() == Some(0);
    let mut body =
        Metered::new(body, shared.runtime.metrics.bytes_to_agent.clone(), shared.settings.stream_idle_timeout())
            .with_tally(tally);
    let mut checks = BodyChecks::default();
    if empty {
        // Nothing can arrive, so nothing can fail or be too large or too slow.
        return (body.boxed_unsync(), checks);
    }
    let broken;
    (body, broken) = body.watching_its_source();
    checks.broken = Some(broken);
    if let Some(max) = max_body {
        let tripped;
        (body, tripped) = body.with_limit(max);
        checks.too_large = Some((max, tripped));
    }
    let rate = shared.settings.min_upload_rate;
    if rate > 0 && !grpc {
        let tripped;
        (body, tripped) = body.with_min_pace(rate);
        checks.too_slow = Some((rate, tripped));
    }
    (body.boxed_unsync(), checks)
}

/// True for a gRPC request (`content-type: application/grpc`, with or without a `+format`).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.get(..16).is_some_and(|p| p.eq_ignore_ascii_case("application/grpc")))
}
