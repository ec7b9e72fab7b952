//! Why a request could not be proxied, and the `fail_to_proxy` phase: each failure carries its
//! status, the metrics reason it counts under, whom it blames, and the headers its answer needs.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode};
use quictun_core::edge::host::HostError;
use quictun_core::edge::path::PathError;
use quictun_core::edge::serve::plain_text;
use quictun_core::http::InvalidHeader;
use quictun_core::logsafe::Inert;
use quictun_core::tunnel::{BadAnswer, ExchangeError};

use super::IngressBody;
use crate::metrics::Reject;
use crate::sessions::FullBudget;

/// The methods the relay proxies: every method but `CONNECT`.
pub const SERVED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// Why a request could not be proxied, and so which status it gets.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request has no usable host (missing, duplicate, conflicting, invalid).
    #[error("bad request: {0}")]
    BadHost(#[from] HostError),
    /// The request path is refused (see [`quictun_core::edge::path`]).
    #[error("bad request: {0}")]
    BadPath(#[from] PathError),
    /// More headers than the relay takes (`max_header_count`), as the client sent them or
    /// with the relay's own added.
    #[error("too many request headers: {count}, the limit is {max}")]
    TooManyHeaders {
        /// Headers the request would carry.
        count: usize,
        /// The tunnel's limit.
        max: usize,
    },
    /// A method the relay does not proxy (`CONNECT`: it is not a forward proxy).
    #[error("method {0} is not served here")]
    MethodNotAllowed(http::Method),
    /// An HTTPS request for a host other than the one its TLS connection was opened for (SNI):
    /// the client should open a connection for that host (RFC 9110, 15.5.20).
    #[error("this connection was opened for {:?}, not {:?}", Inert(sni), Inert(host))]
    Misdirected {
        /// The request's host.
        host: String,
        /// The TLS server name of its connection.
        sni: String,
    },
    /// No route matches.
    #[error("no route for host {:?} and path {:?}", Inert(host), Inert(path))]
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
    /// The relay of the cluster that holds the group's agent cannot be reached.
    #[error(transparent)]
    Peer(#[from] crate::peers::PeerError),
    /// The exchange with the agent failed before a response head arrived.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The agent's response head cannot be turned into an HTTP response.
    #[error("invalid response from agent: {0}")]
    BadResponse(#[from] BadResponse),
    /// No response head within the deadline.
    #[error("no response from the agent within {0:?}")]
    Timeout(Duration),
    /// The chosen agent's stream budget for this kind of exchange is full.
    #[error("{0}")]
    AgentFull(FullBudget),
    /// The route's in-flight limit is reached.
    #[error("route {0:?} has too many requests in flight")]
    RouteBusy(Arc<str>),
    /// The request body is larger than the route allows.
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    /// The request body was cut, malformed, or stalled by the client on its way.
    #[error("the request body was cut, malformed, or stalled on its way")]
    BadBody,
    /// The request body arrived slower than `min_upload_rate`.
    #[error("request body arrived slower than {0} bytes per second")]
    UploadTooSlow(u64),
    /// The client's address has `max_requests_per_ip` requests in flight.
    #[error("too many requests in flight from your address")]
    AddressBusy,
    /// The route's `allow_ips` / `deny_ips` refuse the client's address.
    #[error("{0} may not use this route")]
    Forbidden(std::net::IpAddr),
    /// The client's address is over the route's `rate_limit_per_ip`: try again after this.
    #[error("too many requests from your address; try again in {:.1} s", .0.as_secs_f64())]
    RateLimited(Duration),
    /// No credentials, or wrong ones, for the route's `basic_auth_file` (with its challenge).
    #[error("authentication required")]
    Unauthorized(HeaderValue),
    /// Too many failed authentications from the client's address: try again after this.
    #[error("too many failed authentications from your address; try again in {:.1} s", .0.as_secs_f64())]
    TooManyAuthFailures(Duration),
}

/// What made an agent's response head unusable as an HTTP response.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    /// A status code HTTP does not have.
    #[error(transparent)]
    Status(#[from] http::status::InvalidStatusCode),
    /// A header that is not a valid HTTP header.
    #[error(transparent)]
    Header(#[from] InvalidHeader),
}

impl From<BadAnswer> for ProxyError {
    fn from(bad: BadAnswer) -> Self {
        Self::Exchange(ExchangeError::Protocol(bad))
    }
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadHost(_) | Self::BadPath(_) | Self::BadBody => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited(_) | Self::TooManyAuthFailures(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Misdirected { .. } => StatusCode::MISDIRECTED_REQUEST,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::RouteBusy(_) | Self::AddressBusy | Self::AgentFull(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UploadTooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Exchange(err) => StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_GATEWAY),
            Self::NoAgent(_) | Self::NoAgentAfterWaiting { .. } | Self::BadResponse(_) | Self::Peer(_) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The metrics reason this refusal counts under, when it is one.
    pub fn reject_reason(&self) -> Option<Reject> {
        Some(match self {
            Self::BadHost(_) | Self::BadPath(_) | Self::BadBody => Reject::bad_request,
            Self::TooManyHeaders { .. } | Self::Exchange(ExchangeError::HeadTooLarge(_)) => Reject::headers_too_large,
            Self::NoRoute { .. } => Reject::no_route,
            Self::MethodNotAllowed(_) => Reject::method_not_allowed,
            Self::Misdirected { .. } => Reject::misdirected,
            Self::NoAgent(_) | Self::NoAgentAfterWaiting { .. } => Reject::no_agent,
            Self::Exchange(ExchangeError::Busy) | Self::AgentFull(FullBudget::Streams { .. }) => Reject::agent_busy,
            Self::AgentFull(FullBudget::Bulk { .. }) => Reject::agent_bulk_busy,
            Self::RouteBusy(_) => Reject::route_busy,
            Self::BodyTooLarge(_) => Reject::body_too_large,
            Self::UploadTooSlow(_) => Reject::upload_too_slow,
            Self::AddressBusy => Reject::ip_requests,
            Self::Forbidden(_) => Reject::policy_address,
            Self::RateLimited(_) => Reject::policy_rate,
            Self::Unauthorized(_) => Reject::policy_auth,
            Self::TooManyAuthFailures(_) => Reject::policy_auth_failures,
            Self::Timeout(_) => Reject::timeout,
            Self::Exchange(_) | Self::BadResponse(_) | Self::Peer(_) => return None,
        })
    }

    /// Headers the answer carries beyond its status and text: the methods served, with a 405
    /// (RFC 9110, 15.5.6). A 503's `Retry-After` is added with the text.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        match self {
            Self::MethodNotAllowed(_) => {
                headers.insert(http::header::ALLOW, HeaderValue::from_static(SERVED_METHODS));
            }
            Self::Unauthorized(challenge) => {
                headers.insert(http::header::WWW_AUTHENTICATE, challenge.clone());
            }
            Self::RateLimited(wait) | Self::TooManyAuthFailures(wait) => {
                // Whole seconds, rounded up (RFC 9110, 10.2.3): never 0, which means "now".
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        headers
    }

    /// The `fail_to_proxy` phase: the answer a client gets for this failure.
    pub fn into_response(self) -> Response<IngressBody> {
        let headers = self.headers();
        let mut response = plain_text(self.status(), &self.to_string(), |bytes| IngressBody::Full(Some(bytes)));
        response.headers_mut().extend(headers);
        response
    }
}
