//! What a transport must provide, so that routing, sessions, registration and the agent's upstream
//! side are shared by every transport (QUIC, gRPC).
//!
//! - [`ControlIo`]: the control-message channel (register, config_sync, heartbeats, go-away).
//! - [`AgentLink`]: the relay's handle on one registered agent: send a request, get a response
//!   head and a streaming body back.
//! - [`TunnelBody`]: a streaming body crossing the tunnel, in either direction.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use std::sync::Arc;

use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, ResponseHead, StreamCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::framed::ControlError;

/// Why a body crossing the tunnel ended early.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    /// The peer reset the exchange with a code.
    #[error("reset by peer: {}", describe_code(*.0))]
    Reset(u64),
    /// The tunnel connection is gone.
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The local side closed the exchange, or a source body failed.
    #[error("{0}")]
    Closed(String),
}

fn describe_code(code: u64) -> String {
    match StreamCode::from_u64(code) {
        Some(c) => format!("{} ({code})", c.describe()),
        None => format!("code {code}"),
    }
}

/// A streaming body crossing the tunnel.
pub type TunnelBody = UnsyncBoxBody<Bytes, BodyError>;

/// An empty tunnel body.
pub fn empty_body() -> TunnelBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Aborts a task when dropped: a helper task lives exactly as long as its owner.
#[derive(Debug)]
pub struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Owns `task`.
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self(Some(task))
    }

    /// Lets go of the task without aborting it (someone else owns it now).
    pub fn into_inner(mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A boxed future, as trait objects need.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an exchange with an agent failed before a response head arrived.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The agent is at its concurrency limit; retrying later is safe (nothing was sent).
    #[error("agent at its concurrency limit")]
    Busy,
    /// The stream could not be opened: the connection is gone and nothing was sent, so the
    /// request may go to another agent.
    #[error("agent connection lost before the request was sent")]
    NotOpened,
    /// The connection went away.
    #[error("agent connection lost")]
    Lost,
    /// The agent reset the exchange with a code.
    #[error("agent: {}", .0.describe())]
    Reset(StreamCode),
    /// The agent answered something unusable.
    #[error("invalid response from agent: {0}")]
    Protocol(String),
    /// The request head is larger than the tunnel carries; nothing was sent.
    #[error("request head too large for the tunnel: {0}")]
    HeadTooLarge(String),
}

impl LinkError {
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
}

/// One side's handle for sending requests through a tunnel connection: the relay's handle on
/// an agent connection, and (for egress) an agent's handle on its relay connection.
pub trait AgentLink: Send + Sync + std::fmt::Debug + 'static {
    /// Sends one request (head and streaming body) and resolves with the response head and its
    /// streaming body. Dropping the future or the body cancels the exchange. `client` is the
    /// ingress client the response is for, when there is one: the credit its body holds counts
    /// against that client's budget too (see [`crate::stall`]).
    fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>>;

    /// Closes the connection with a quictun close code.
    fn close(&self, code: CloseCode);

    /// True once the connection is closed (by either side).
    fn is_closed(&self) -> bool;

    /// Resolves when the connection is closed, with the reason.
    fn closed(&self) -> BoxFuture<'_, String>;

    /// The agent's address as the relay sees it.
    fn remote_addr(&self) -> SocketAddr;

    /// The transport's name, for logs and the admin endpoint.
    fn transport(&self) -> &'static str;

    /// Serves the requests the *peer* opens on this connection (an agent's egress requests) with
    /// `handler`, each in a task on `tasks` that stops when `cancel` fires, until the connection
    /// ends. A transport that carries none returns at once (the default) and refuses them itself.
    fn serve_peer_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, ()> {
        let _unused = (handler, tasks, cancel);
        Box::pin(async {})
    }
}

/// A control-message channel. `recv` must be cancel-safe (it is used in `select!`).
pub trait ControlIo: Send {
    /// The next message; `Err(ControlError::Closed)` when the peer ended the channel.
    fn recv(&mut self) -> impl Future<Output = Result<ControlMessage, ControlError>> + Send;

    /// Sends one message.
    fn send(&mut self, msg: ControlMessage) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Ends our side of the channel.
    fn finish(&mut self);

    /// [`ControlIo::recv`] with a deadline.
    fn recv_within(
        &mut self,
        deadline: std::time::Duration,
    ) -> impl Future<Output = Result<ControlMessage, ControlError>> + Send {
        async move { tokio::time::timeout(deadline, self.recv()).await.map_err(|_| ControlError::Timeout(deadline))? }
    }
}

/// The agent's side of an exchange: forwards one request (head already validated) to its upstream
/// and returns the response head and body, or the code to reset the exchange with.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request.
    fn handle(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), StreamCode>>;

    /// The frame limits every request head is checked against.
    fn limits(&self) -> Limits;
}

/// The agent's handle on its connection to the relay.
pub trait RelayConnection: Send + Sync {
    /// Serves requests from the relay with `handler` until the connection ends (returning why).
    /// Each request runs in a task on `tasks` and stops when `cancel` fires.
    fn serve_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, String>;

    /// Closes the connection with a close code.
    fn close(&self, code: CloseCode);

    /// After [`RelayConnection::close`]: waits (bounded) until the relay has seen the close, so
    /// messages queued before it (a go-away) are not lost. Immediate where the transport's own close
    /// already guarantees that.
    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// The code the relay closed the connection with, if it did.
    fn peer_close_code(&self) -> Option<CloseCode>;

    /// The relay's address.
    fn remote_addr(&self) -> SocketAddr;

    /// A handle for sending requests to the relay (egress) over this connection; `None` when the
    /// transport carries none (the default).
    fn egress_link(&self) -> Option<Arc<dyn AgentLink>> {
        None
    }
}
