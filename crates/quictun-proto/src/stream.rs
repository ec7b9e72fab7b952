//! Head frames of data streams.
//!
//! A data stream carries one proxied request. The side that received the request opens the stream
//! and writes a [`RequestHead`] frame, then the request body until FIN. The other side answers with
//! a [`ResponseHead`] frame, then the response body until FIN. Failures reset the stream with a
//! [`crate::StreamCode`].
//!
//! A body is sent one of two ways, chosen by its head's `framed_body`:
//!
//! - **raw** (the default, and always for TCP and upgraded streams): the bytes themselves until FIN;
//! - **framed**, for bodies that may end with trailers (HTTP/2, gRPC): a sequence of body frames,
//!   each a [`BodyFrameHeader`] (1-byte type, 4-byte big-endian length) and its payload. Type
//!   [`BODY_DATA`] carries body bytes; type [`BODY_TRAILERS`] carries a bincode [`Trailers`] and is
//!   the last frame: only FIN may follow it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::host_port::HostPort;
use crate::limits::Limits;

/// What a data stream carries, and where it goes. The bincode variant index is on the wire: only
/// append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// 0: an HTTP request (relay → agent) for the agent's upstream of this name.
    Http(String),
    /// 1: a raw TCP connection (relay → agent) to this address; the agent answers status 200
    /// once connected, then bytes flow both ways.
    Tcp(HostPort),
    /// 2: an HTTP request (relay → agent) that upgrades (WebSocket), for the agent's upstream of
    /// this name; raw bytes both ways after the 101.
    Upgrade(String),
    /// 3: an egress request (agent → relay), routed by the relay's egress routes.
    Egress,
    /// 4: a raw TCP connection (relay → agent) to the relay's port of a TCP tunnel the agent
    /// declared ([`crate::Claim::Tcp`]): the agent connects its own target for that port, then
    /// as [`Target::Tcp`].
    TcpPort(u16),
    /// 5: a UDP flow (relay → agent): one client address's datagrams to and from `upstream`.
    /// The stream sets the flow up, ends it with its FIN, and carries the flow's datagrams that
    /// do not fit a DATAGRAM frame ([`crate::datagram::StreamDecoder`]'s framing); the rest cross
    /// as DATAGRAM frames tagged with `flow`. (Boxed: every head is moved through several
    /// futures, and the flow's addresses would double the size of every `Target`.)
    Udp(Box<UdpFlow>),
    /// 6: a request one relay of a cluster forwards to another (relay → relay), for an agent
    /// the other holds: the target that agent gets (HTTP, upgrade or TCP), and what the other
    /// relay chooses it by. The receiving relay never forwards it again (one hop), and refuses a
    /// `Peer` inside a `Peer`.
    Peer(Box<PeerRequest>),
}

/// A request forwarded between relays ([`Target::Peer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRequest {
    /// The group whose agent serves it.
    pub group: String,
    /// What the agent gets: the target the forwarding relay would have sent it.
    pub target: Target,
    /// The ingress client's address (the stalled-reader budget it counts against).
    pub client: Option<std::net::IpAddr>,
    /// The value the route hashes to choose an agent, when it balances by hash.
    pub hash_key: Option<Vec<u8>>,
    /// Whether the request may run twice (RFC 9110, 9.2.2), should its agent die under it.
    pub idempotent: bool,
}

/// A UDP flow's setup: where its datagrams go and what identifies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpFlow {
    /// `host:port` as the agent sees it.
    pub upstream: HostPort,
    /// The id its DATAGRAM frames carry ([`crate::datagram`]); unique within the tunnel.
    pub flow: crate::datagram::FlowId,
    /// The client's address and the relay's, when each datagram to the upstream starts with a
    /// PROXY protocol v2 header naming them.
    pub proxy_v2: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
}

impl Target {
    /// The upstream name, for the kinds that name one.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            Self::Http(name) | Self::Upgrade(name) => Some(name),
            Self::Peer(peer) => peer.target.upstream(),
            Self::Tcp(_) | Self::TcpPort(_) | Self::Egress | Self::Udp(_) => None,
        }
    }

    /// True for the kinds whose bodies are raw bytes both ways (never framed).
    pub fn is_raw(&self) -> bool {
        match self {
            Self::Peer(peer) => peer.target.is_raw(),
            other => matches!(other, Self::Tcp(_) | Self::TcpPort(_) | Self::Upgrade(_) | Self::Udp(_)),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(name) => write!(f, "http {name}"),
            Self::Tcp(addr) => write!(f, "tcp {addr}"),
            Self::Upgrade(name) => write!(f, "upgrade {name}"),
            Self::Egress => f.write_str("egress"),
            Self::TcpPort(port) => write!(f, "tcp tunnel {port}"),
            Self::Udp(flow) => write!(f, "udp {} flow {}", flow.upstream, flow.flow),
            Self::Peer(peer) => write!(f, "via a peer relay: {}", peer.target),
        }
    }
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
    /// What the stream carries, and where it goes.
    pub target: Target,
    /// The relay's id for this request, echoed in logs and `x-quictun-request-id`.
    pub request_id: Uuid,
    /// HTTP method.
    pub method: String,
    /// Path and query (origin form), such as `/api?x=1`.
    pub uri: String,
    /// Request headers, hop-by-hop headers already removed.
    pub headers: Vec<Header>,
    /// True when a request body follows the head (possibly empty); false for a request that has
    /// none, so the upstream request is sent without one.
    pub has_body: bool,
    /// True when the request body is sent framed, so trailers can follow it.
    pub framed_body: bool,
}

/// The first frame the answering side writes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// Response headers, hop-by-hop headers already removed.
    pub headers: Vec<Header>,
    /// True when the response body is sent framed, so trailers can follow it.
    pub framed_body: bool,
}

/// The trailer fields that end a framed body (gRPC's `grpc-status` travels here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailers {
    /// Trailer fields, hop-by-hop fields already removed.
    pub headers: Vec<Header>,
}

/// Body-frame type: body bytes.
pub const BODY_DATA: u8 = 0;
/// Body-frame type: the trailers, last frame of the body.
pub const BODY_TRAILERS: u8 = 1;
/// Largest data frame a framed body may announce. Data is streamed, never held whole, so this
/// bounds the count a peer can make a reader wait for, not memory.
pub const MAX_BODY_DATA_FRAME: usize = 16 << 20;

/// The fixed header of one body frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyFrameHeader {
    /// [`BODY_DATA`] or [`BODY_TRAILERS`].
    pub kind: u8,
    /// Payload bytes that follow.
    pub len: usize,
}

impl BodyFrameHeader {
    /// Bytes in the encoded header.
    pub const LEN: usize = 5;

    /// Encodes the header (the length must fit in 32 bits; callers never exceed
    /// [`MAX_BODY_DATA_FRAME`] or the head-frame limit).
    pub fn encode(self) -> [u8; Self::LEN] {
        let len = u32::try_from(self.len).unwrap_or(u32::MAX).to_be_bytes();
        [self.kind, len[0], len[1], len[2], len[3]]
    }

    /// Decodes a header and checks its type and its length against the limits (trailers are
    /// bounded by the head-frame limit) before anything is read or allocated for it.
    pub fn decode(bytes: [u8; Self::LEN], limits: &Limits) -> Result<Self, HeadError> {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let max = match bytes[0] {
            BODY_DATA => MAX_BODY_DATA_FRAME,
            BODY_TRAILERS => limits.max_head_frame.min(crate::limits::MAX_FRAME_BYTES),
            other => return Err(HeadError::InvalidBodyFrame(format!("unknown body frame type {other}"))),
        };
        if len > max {
            return Err(HeadError::InvalidBodyFrame(format!("body frame of {len} bytes exceeds {max}")));
        }
        Ok(Self { kind: bytes[0], len })
    }
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
    /// A body frame of an unknown type or over its limit, or bytes after the trailers.
    #[error("invalid body frame: {0}")]
    InvalidBodyFrame(String),
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
        if self.framed_body && self.target.is_raw() {
            return Err(HeadError::InvalidRequestLine("tcp and upgrade streams have raw bodies"));
        }
        if let Target::Peer(peer) = &self.target
            && matches!(peer.target, Target::Peer(_) | Target::Egress | Target::Udp(_))
        {
            return Err(HeadError::InvalidRequestLine("a peer request carries an HTTP request or a TCP connection"));
        }
        Ok(())
    }
}

impl Trailers {
    /// Checks the field count.
    pub fn validate(&self, limits: &Limits) -> Result<(), HeadError> {
        check_header_count(&self.headers, limits)
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
