//! The QUIC transport's [`AgentLink`]: one bidirectional stream per exchange.
//!
//! The relay opens the stream itself (no extra round trip), writes the request head, streams the
//! request body from a task that lives exactly as long as the response, and reads the response
//! head; the response body is then read from the stream chunk by chunk.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use quictun_proto::{CloseCode, Limits, RequestHead, ResponseHead, StreamCode};
use tracing::{Instrument, debug};

use crate::framed::{ReadFrameError, WriteFrameError, read_frame, write_frame};
use crate::http_stream::{RecvBody, pump_body};
use crate::link::{AgentLink, BodyError, BoxFuture, LinkError, TunnelBody};

/// Longest wait for a free stream slot on the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent reached over one QUIC connection.
#[derive(Debug, Clone)]
pub struct QuicLink {
    conn: quinn::Connection,
    limits: Limits,
}

impl QuicLink {
    /// Wraps a registered agent's connection.
    pub fn new(conn: quinn::Connection, limits: Limits) -> Self {
        Self { conn, limits }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    async fn run_exchange(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), LinkError> {
        let (mut send, mut recv) = match tokio::time::timeout(OPEN_TIMEOUT, self.conn.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(_)) => return Err(LinkError::NotOpened),
            Err(_) => return Err(LinkError::Busy),
        };
        write_frame(&mut send, &head, self.limits.max_head_frame).await.map_err(|err| match err {
            WriteFrameError::Frame(e) => LinkError::Protocol(format!("request head: {e}")),
            WriteFrameError::Write(_) => LinkError::Lost,
        })?;
        let upload = if head.has_body {
            let task = tokio::spawn(
                async move {
                    if let Err(err) = pump_body(body, &mut send, StreamCode::Cancelled).await {
                        debug!(%err, "request body upload ended early");
                    }
                }
                .in_current_span(),
            );
            Some(task)
        } else {
            // Finishing right after the head lets the agent see the end at once.
            let _already_closed = send.finish();
            None
        };
        let response: ResponseHead = read_frame(&mut recv, self.limits.max_head_frame).await.map_err(from_read)?;
        response.validate(&self.limits).map_err(|e| LinkError::Protocol(e.to_string()))?;
        Ok((response, QuicResponseBody { body: RecvBody::new(recv), upload, finished: false }.boxed_unsync()))
    }
}

fn from_read(err: ReadFrameError) -> LinkError {
    match err {
        ReadFrameError::Reset(code) => StreamCode::from_u64(code).map_or(LinkError::Lost, LinkError::Reset),
        ReadFrameError::ConnectionLost(_) | ReadFrameError::Closed => LinkError::Lost,
        other => LinkError::Protocol(other.to_string()),
    }
}

/// The response body, holding the request-body upload. Dropped before its end, it aborts the
/// upload (the exchange is abandoned); once the response ended cleanly the upload may still be
/// sending (an upgraded or TCP stream whose other direction closed first), so it is left to
/// finish by itself: it ends with its source, or when the peer stops the stream.
struct QuicResponseBody {
    body: RecvBody,
    upload: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
}

impl Drop for QuicResponseBody {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && !self.finished
        {
            upload.abort();
        }
    }
}

impl Body for QuicResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        this.finished = frame.is_none();
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl AgentLink for QuicLink {
    fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(self.run_exchange(head, body))
    }

    fn close(&self, code: CloseCode) {
        crate::close(&self.conn, code);
    }

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    fn closed(&self) -> BoxFuture<'_, String> {
        Box::pin(async { self.conn.closed().await.to_string() })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn transport(&self) -> &'static str {
        "quic"
    }
}
