//! Head frames of data streams.
//!
//! A data stream carries one proxied request. The side that received the request opens the stream
//! and writes a [`RequestHead`] frame, then the request body as raw bytes until FIN. The other side
//! answers with a [`ResponseHead`] frame, then the response body until FIN. Failures reset the stream
//! with a [`crate::StreamCode`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits::Limits;

/// What a data stream carries. The bincode variant index is on the wire: only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// 0: an HTTP request and its response.
    Http,
    /// 1: a raw TCP connection: the head's `upstream` is the `host:port` to connect to, the
    /// agent answers status 200 once connected, then bytes flow both ways.
    Tcp,
    /// 2: an HTTP request that upgrades (WebSocket); raw bytes both ways after the 101.
    Upgrade,
}

/// One header: a name and its raw value bytes (values need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Lower-case header name.
    pub name: String,
    /// Raw value.
    pub value: Vec<u8>,
}

/// The first frame of a data stream, from the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// What the stream carries.
    pub kind: StreamKind,
    /// The relay's id for this request, echoed in logs and `x-quictun-request-id`.
    pub request_id: Uuid,
    /// The upstream name the request is for.
    pub upstream: String,
    /// HTTP method.
    pub method: String,
    /// Path and query (origin form), such as `/api?x=1`.
    pub uri: String,
    /// Request headers, hop-by-hop headers already removed.
    pub headers: Vec<Header>,
    /// True when a request body follows the head (possibly empty); false for a request that has
    /// none, so the upstream request is sent without one.
    pub has_body: bool,
}

/// The first frame the answering side writes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, hop-by-hop headers already removed.
    pub headers: Vec<Header>,
}

/// A head frame that decoded but breaks a limit or a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// More headers than allowed.
    #[error("{count} headers exceed the limit of {max}")]
    TooManyHeaders {
        /// Headers present.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A status outside 100..=999.
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
    /// An empty method or a URI that is not origin-form.
    #[error("invalid request line: {0}")]
    InvalidRequestLine(&'static str),
}

fn check_header_count(headers: &[Header], limits: &Limits) -> Result<(), HeadError> {
    if headers.len() > limits.max_header_count {
        return Err(HeadError::TooManyHeaders { count: headers.len(), max: limits.max_header_count });
    }
    Ok(())
}

impl RequestHead {
    /// Checks the rules a decoder cannot: header count, a non-empty method, an origin-form URI.
    pub fn validate(&self, limits: &Limits) -> Result<(), HeadError> {
        check_header_count(&self.headers, limits)?;
        if self.method.is_empty() {
            return Err(HeadError::InvalidRequestLine("empty method"));
        }
        if !self.uri.starts_with('/') && self.uri != "*" {
            return Err(HeadError::InvalidRequestLine("uri must be origin-form"));
        }
        Ok(())
    }
}

impl ResponseHead {
    /// Checks the header count and the status range.
    pub fn validate(&self, limits: &Limits) -> Result<(), HeadError> {
        check_header_count(&self.headers, limits)?;
        if !(100..=999).contains(&self.status) {
            return Err(HeadError::InvalidStatus(self.status));
        }
        Ok(())
    }
}
