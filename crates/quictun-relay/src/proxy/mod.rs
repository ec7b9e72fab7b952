//! One proxied request, as named phases (the names are pingora's): an edge half that turns
//! hyper's request into a transport-neutral one, and a dispatch half, usable by any caller, that
//! carries a request head and its body through an agent on a stream of its own.
//!
//! | phase | where | what |
//! |---|---|---|
//! | `request_filter` | [`edge`] | the one host, the canonical path, the route, the checks on the head alone, the client's and the route's places |
//! | `policy` | [`policy`] | the route's policies, before anything reaches an agent |
//! | `upstream_request_filter` | [`edge`] | the head the agent gets (forwarding headers, request id) and the body, watched on its way |
//! | `dispatch` | [`dispatch`] | choose an agent of the group, admit, open, race its silence, retry once on a sibling when safe, map failures |
//! | `response_filter` | [`respond`] | the client's response from the agent's answer (a hook for its headers), the body streamed back or the upgrade spliced |
//! | `fail_to_proxy` | [`error`] | a failure answered with its status, text and headers |
//! | `logging` | [`respond`] | the metrics, the request id on the response, the access-log line |
//!
//! Every failure maps to its status in one place ([`ProxyError::status`]): 404 no route, 502
//! agent or upstream failed, 503 busy or no agent, 504 timeouts, 4xx for what the client sent.

pub mod dispatch;
mod edge;
pub(crate) mod error;
pub(crate) mod forward;
mod policy;
mod respond;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use quictun_core::body::{BodyError, TunnelBody};
use quictun_core::logsafe::Inert;
use tracing::{Instrument, debug, field, info_span, warn};
use uuid::Uuid;

use dispatch::dispatch;
use error::ProxyError;

use crate::access::AccessEntry;
use crate::admission::Slots;
use crate::body::Metered;
use crate::state::RelayState;

/// The header carrying the relay's request id, on every response.
pub use quictun_core::edge::forwarded::REQUEST_ID_HEADER;

/// The body of an ingress response: a short error text, or the agent's stream.
// Most answers are streamed: boxing that variant would cost an allocation per response, to save
// space only in the short-lived error answers.
#[allow(clippy::large_enum_variant)]
pub enum IngressBody {
    /// A complete body (errors).
    Full(Option<Bytes>),
    /// The response body streamed from the agent.
    Tunnel {
        /// The body, from whichever transport, counted and watched for progress.
        body: Metered<TunnelBody>,
        /// The stream slot on the agent's connection and on the route, held until the body ends.
        _slots: Slots<dispatch::Served>,
        /// The access-log line, written when the body ends or is dropped.
        access: Option<Box<AccessEntry>>,
    },
}

impl Drop for IngressBody {
    fn drop(&mut self) {
        if let Self::Tunnel { body, access, .. } = self
            && let Some(entry) = access.take()
        {
            (*entry).finish(body.bytes_seen());
        }
    }
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

/// The client of an ingress request: its address and how it reached the relay.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Plain HTTP or HTTPS.
    pub scheme: Scheme,
    /// The TLS server name (SNI) its HTTPS connection was opened for, when it sent one.
    pub sni: Option<Arc<str>>,
}

/// Answers one ingress request through the phases; never fails (failures become responses).
pub async fn handle(shared: Arc<RelayState>, request: Request<Incoming>, peer: Peer) -> Response<IngressBody> {
    let request_id = Uuid::new_v4();
    let path = Inert(request.uri().path());
    let span = info_span!("request", %request_id, method = %request.method(), %path, client_id = field::Empty);
    let mut log = respond::RequestLog::new(&request, peer.addr, request_id, &shared.runtime.inspector);
    let response = match proxy(&shared, request, peer, request_id, &mut log).instrument(span.clone()).await {
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
    respond::logging(&shared, response, log)
}

/// The phases from the request head to the response head.
async fn proxy(
    shared: &RelayState,
    request: Request<Incoming>,
    peer: Peer,
    request_id: Uuid,
    log: &mut respond::RequestLog,
) -> Result<Response<IngressBody>, ProxyError> {
    let mut accepted = edge::request_filter(shared, request, &peer, log)?;
    policy::check(shared, &mut accepted, &peer).await?;
    let outgoing = edge::upstream_request_filter(shared, accepted, &peer, request_id, log.bytes_in())?;
    let answer = dispatch(shared, outgoing.dispatch).await.map_err(|undelivered| {
        log.client_id = undelivered.agent;
        undelivered.error
    })?;
    log.client_id = Some(answer.served.client_id());
    log.transport = Some(answer.served.transport());
    log.head_latency = Some(answer.head_latency);
    respond::response_filter(
        shared,
        answer,
        outgoing.upgrade,
        outgoing.slots,
        &outgoing.route.policies.response_headers,
    )
}
