//! The seam between what the relay and the agent do and the transports that carry a tunnel (QUIC,
//! gRPC): everything above it is written once, and each transport implements it once.
//!
//! - [`Tunnel`]: one tunnel between a relay and an agent, seen from either end. It opens
//!   exchanges (a request and its answer, each on a stream of its own on QUIC), serves the
//!   exchanges the peer opens, closes with a code, and says why it closed.
//! - [`RequestHandler`]: what serves the exchanges the peer opens (the agent's forwarder, the
//!   relay's egress router).
//! - [`ExchangeError`], [`CloseReason`], [`TransportKind`]: what crosses the seam, typed.
//! - Datagrams: [`Tunnel::datagram_support`], [`Tunnel::send_datagram`] and
//!   [`Tunnel::recv_datagram`] carry a flow's datagrams (QUIC DATAGRAM frames), never waiting.
//!
//! The control channel that comes with every tunnel is [`crate::control::ControlIo`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use quictun_proto::datagram::FlowId;
use quictun_proto::frame::FrameError;
use quictun_proto::{CloseCode, HeadError, Limits, RequestHead, ResponseHead, StreamCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::TunnelBody;

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The transports a tunnel can run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// One QUIC connection; a stream per exchange.
    Quic,
    /// One gRPC stream over TCP and TLS; every exchange multiplexed on it.
    Grpc,
}

impl TransportKind {
    /// Both, in the order they are reported.
    pub const ALL: [TransportKind; 2] = [Self::Quic, Self::Grpc];

    /// `quic` or `grpc`, for logs, metric labels and the admin endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an exchange failed before its response head arrived. Each failure says what may be done
/// about it ([`ExchangeError::retry`]), whom it blames ([`ExchangeError::blame`]) and what the
/// client is answered ([`ExchangeError::http_status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The peer is at its concurrency limit; retrying later is safe (nothing was sent).
    #[error("agent at its concurrency limit")]
    Busy,
    /// The exchange could not be opened: the tunnel is gone and nothing was sent, so the request
    /// may go to another agent.
    #[error("agent connection lost before the request was sent")]
    NotOpened,
    /// The tunnel went away during the exchange.
    #[error("agent connection lost")]
    Lost,
    /// The peer reset the exchange with a code.
    #[error("agent: {0}")]
    Reset(StreamCode),
    /// The peer answered something unusable.
    #[error("invalid response from agent: {0}")]
    Protocol(#[from] BadAnswer),
    /// The request head is larger than the tunnel carries; nothing was sent.
    #[error("request head too large for the tunnel: {0}")]
    HeadTooLarge(#[source] FrameError),
}

/// What was wrong with a peer's answer to an exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAnswer {
    /// The response head's frame did not decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The response head decoded but breaks a rule (its status, its header count).
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The stream ended inside the response head's frame.
    #[error("the stream ended inside the response head")]
    Truncated,
    /// Body data came before the response head.
    #[error("body before the response head")]
    BodyBeforeHead,
    /// No whole response head within the transport's deadline.
    #[error("no response head in time")]
    NoHead,
}

/// Whom a failure is on: what the relay counts it against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The agent, or the service behind it, failed: it counts towards the agent's cooldown.
    Agent,
    /// What the client sent (or did) caused it: nothing is counted against the agent.
    Client,
    /// Nobody whose failure the relay acts on: a limit was reached (a busy agent), or the agent
    /// reported the request's own outcome (a timeout, an overload, a refusal).
    Nobody,
}

/// Whether a request whose exchange failed may be sent again, to another agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing reached the agent: any request may go elsewhere.
    Safe,
    /// The agent may have received the request but never answered: only an idempotent request
    /// (RFC 9110, 9.2.2) whose body no transport has read may go elsewhere.
    IfIdempotent,
    /// The agent answered (or refused) it: the failure is the answer.
    Never,
}

impl ExchangeError {
    /// The HTTP status a client is answered with: 503 when busy (retry later), 431 for a head
    /// too large, the reset code's status (502, or 504 for timeouts), 502 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Busy => 503,
            Self::HeadTooLarge(_) => 431,
            Self::Reset(code) => code.http_status(),
            Self::NotOpened | Self::Lost | Self::Protocol(_) => 502,
        }
    }

    /// Whom the failure is on: a lost or broken tunnel, or an upstream that refused or failed, is
    /// the agent's; a head too large is the client's; a busy agent, or a reset with another code
    /// (a timeout, an overload), is nobody's the relay counts.
    pub fn blame(&self) -> Blame {
        match self {
            Self::NotOpened | Self::Lost | Self::Protocol(_) => Blame::Agent,
            Self::Reset(StreamCode::UpstreamConnect | StreamCode::UpstreamFailed) => Blame::Agent,
            Self::HeadTooLarge(_) => Blame::Client,
            Self::Busy | Self::Reset(_) => Blame::Nobody,
        }
    }

    /// Whether the request may go to another agent: a stream that could not be opened sent
    /// nothing; a tunnel lost before the answer may have delivered the request.
    pub fn retry(&self) -> Retry {
        match self {
            Self::NotOpened => Retry::Safe,
            Self::Lost => Retry::IfIdempotent,
            Self::Busy | Self::Reset(_) | Self::Protocol(_) | Self::HeadTooLarge(_) => Retry::Never,
        }
    }
}

/// Why a tunnel closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// This end closed it with a code.
    Closed(CloseCode),
    /// The peer closed it with a code.
    ClosedByPeer(CloseCode),
    /// The peer ended it without a code it knows (an older peer, or a gRPC stream that ended).
    Ended,
    /// The peer's heartbeats stopped for this long.
    Silent(std::time::Duration),
    /// The transport heard nothing from the peer for its idle timeout.
    IdleTimeout,
    /// The peer no longer knows the connection: it restarted and answered with a verified
    /// stateless reset (QUIC). It is up again, so a reconnect can go at once.
    PeerRestarted,
    /// The peer broke the control protocol.
    Protocol(ProtocolViolation),
    /// The connection failed (reset, a transport error, the network gone), in the transport's words.
    Failed(String),
}

impl CloseReason {
    /// The code the peer closed with, when it did.
    pub fn peer_code(&self) -> Option<CloseCode> {
        match self {
            Self::ClosedByPeer(code) => Some(*code),
            _ => None,
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed(code) => write!(f, "closed here: {code}"),
            Self::ClosedByPeer(code) => write!(f, "closed by the peer: {code}"),
            Self::Ended => f.write_str("the peer ended the tunnel"),
            Self::Silent(after) => write!(f, "peer silent for {:.1}s", after.as_secs_f64()),
            Self::IdleTimeout => f.write_str("nothing heard from the peer: idle timeout"),
            Self::PeerRestarted => f.write_str("the peer restarted (stateless reset)"),
            Self::Protocol(violation) => write!(f, "protocol violation: {violation}"),
            // The transport's words may carry the peer's (a close frame's reason phrase).
            Self::Failed(why) => write!(f, "connection failed: {}", crate::logsafe::Inert(why)),
        }
    }
}

/// A control-protocol violation by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// A control message this end does not expect from the peer (by its name).
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    /// A control frame that did not decode.
    #[error("malformed control frame: {0}")]
    Malformed(String),
    /// The control channel was blocked: the peer did not read it for the silence limit.
    #[error("the peer stopped reading its control channel")]
    NotReading,
}

/// How a tunnel carries datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramSupport {
    /// Natively and unreliably (QUIC DATAGRAM frames): a datagram lost on the path stays lost,
    /// and none waits behind another. At most `max_payload` bytes each for now (the path's
    /// packet size, which MTU discovery may grow); a larger one needs a stream.
    Native {
        /// The largest payload (flow id prefix excluded) a datagram can carry now.
        max_payload: usize,
    },
    /// Not at all.
    None,
}

/// Why a datagram was not sent or received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// This tunnel carries no datagrams (see [`Tunnel::datagram_support`]).
    #[error("this tunnel carries no datagrams")]
    Unsupported,
    /// The peer did not enable datagrams.
    #[error("the peer takes no datagrams")]
    Disabled,
    /// Larger than a datagram can carry now.
    #[error("datagram of {len} bytes over the {max} a datagram carries now")]
    TooLarge {
        /// The payload's size.
        len: usize,
        /// The most a datagram carries now.
        max: usize,
    },
    /// The transport's queue of datagrams is full: this one is dropped (not an older one).
    #[error("the tunnel's datagram queue is full")]
    Full,
    /// The flow id does not fit its prefix.
    #[error(transparent)]
    FlowId(#[from] quictun_proto::datagram::FlowIdTooLarge),
    /// A datagram from the peer without a whole flow id (dropped).
    #[error(transparent)]
    Truncated(#[from] quictun_proto::datagram::TruncatedFlowId),
    /// The tunnel is closed.
    #[error("the tunnel is closed")]
    Closed,
}

/// A new connection's place among those that have not registered yet, held until it has
/// registered (or failed to); what it holds is the relay's business.
pub type Admission = Box<dyn std::any::Any + Send + Sync>;

/// Asked for every new agent connection before anything else is done with it: its
/// [`Admission`], or `None` to refuse it at once.
pub type Admit = Arc<dyn Fn(SocketAddr) -> Option<Admission> + Send + Sync>;

/// The answer to an exchange the peer opened: the response head and its body, or the code to
/// reset the exchange with.
pub type Answer = Result<(ResponseHead, TunnelBody), StreamCode>;

/// What serves the exchanges the peer opens: forwards one request (head already checked against
/// [`RequestHandler::limits`]) and returns the answer.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(&self, head: RequestHead, body: TunnelBody) -> BoxFuture<'_, Answer>;

    /// The frame limits every request head is checked against.
    fn limits(&self) -> Limits;
}

/// One tunnel between a relay and an agent, from either end.
pub trait Tunnel: Send + Sync + std::fmt::Debug + 'static {
    /// Opens an exchange: sends the request head and streams `body`, and resolves with the
    /// response head and its streaming body. Dropping the future or the body cancels the
    /// exchange. `client` is the ingress client the answer is for, when there is one: the credit
    /// its body holds counts against that client's budget too (see [`crate::stall`]).
    fn open(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), ExchangeError>>;

    /// Serves the exchanges the peer opens with `handler`, each in a task on `tasks` that stops
    /// when `cancel` fires, until the tunnel ends; returns why it ended.
    fn serve(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, CloseReason>;

    /// Closes the tunnel with a code.
    fn close(&self, code: CloseCode);

    /// After [`Tunnel::close`]: waits (bounded) until the peer has seen the close, so that
    /// messages queued before it (a go-away) are not lost. Immediate where the transport's own
    /// close already guarantees that.
    fn flush_close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// True once the tunnel is closed (by either end).
    fn is_closed(&self) -> bool;

    /// How this tunnel carries datagrams (see [`crate::datagram`]).
    fn datagram_support(&self) -> DatagramSupport {
        DatagramSupport::None
    }

    /// Sends one datagram of `flow`. Never waits: a datagram the transport cannot take now is
    /// dropped (and the caller counts it), as a UDP datagram would be.
    fn send_datagram(&self, flow: FlowId, payload: Bytes) -> Result<(), DatagramError> {
        let _ = (flow, payload);
        Err(DatagramError::Unsupported)
    }

    /// The next datagram from the peer, with its flow. One reader at a time.
    fn recv_datagram(&self) -> BoxFuture<'_, Result<(FlowId, Bytes), DatagramError>> {
        Box::pin(std::future::ready(Err(DatagramError::Unsupported)))
    }

    /// Datagrams received from the peer so far, where the transport counts them (QUIC): a count
    /// that stops moving while the peer should be sending (keep-alives, acknowledgements) means
    /// it has gone silent, before the transport's idle timeout declares it dead.
    fn datagrams_received(&self) -> Option<u64> {
        None
    }

    /// Resolves once the transport's handshake is complete, true, or false when the tunnel
    /// failed first. Until then the peer's data may be QUIC 0-RTT data, which an attacker who
    /// recorded it can replay: nothing that changes the relay's state may act on it before this
    /// resolves true. Immediate where data only flows after the handshake (the default).
    fn handshake_complete(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }

    /// Resolves when the tunnel is closed, with the reason.
    fn closed(&self) -> BoxFuture<'_, CloseReason>;

    /// Lets the peer have up to `streams` exchanges open towards this end at once, where the
    /// transport counts them (QUIC's stream limit; a listener starts every connection with an
    /// agent's modest allowance, and raises it for a peer relay once it is authenticated).
    fn allow_incoming_exchanges(&self, streams: u32) {
        let _ = streams;
    }

    /// The peer's address.
    fn remote_addr(&self) -> SocketAddr;

    /// Which transport carries the tunnel.
    fn transport(&self) -> TransportKind;
}
