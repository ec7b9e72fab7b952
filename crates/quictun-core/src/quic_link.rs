//! The QUIC transport's exchanges: one bidirectional stream each. [`QuicLink`] opens them (the
//! relay towards an agent, and an agent towards the relay for egress); [`serve_streams`] answers
//! the ones the peer opens.
//!
//! The opening side opens the stream itself (no extra round trip), writes the request head,
//! streams the request body from a task that lives exactly as long as the response, and reads the response
//! head; the response body is then read from the stream chunk by chunk.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use quictun_proto::{CloseCode, Limits, RequestHead, ResponseHead, StreamCode, frame};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::body_frames::{Framing, recv_body};
use crate::framed::{ReadFrameError, read_frame, read_frame_within, write_frame};
use crate::http_stream::{pump_body, reset, stop};
use crate::link::{AgentLink, BodyError, BoxFuture, LinkError, RequestHandler, TunnelBody, empty_body};
use crate::stall::StallScope;

/// Longest wait for a free stream slot on the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent reached over one QUIC connection.
#[derive(Debug, Clone)]
pub struct QuicLink {
    conn: quinn::Connection,
    limits: Limits,
    stall: StallScope,
}

impl QuicLink {
    /// Wraps a registered agent's connection; bodies read from it are watched in `stall`.
    pub fn new(conn: quinn::Connection, limits: Limits, stall: StallScope) -> Self {
        Self { conn, limits, stall }
    }

    /// The underlying connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    async fn run_exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> Result<(ResponseHead, TunnelBody), LinkError> {
        // Encoded before the stream opens: a head too large for the tunnel sends nothing.
        let head_frame =
            frame::encode(&head, self.limits.max_head_frame).map_err(|e| LinkError::HeadTooLarge(e.to_string()))?;
        let (mut send, mut recv) = match tokio::time::timeout(OPEN_TIMEOUT, self.conn.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(_)) => return Err(LinkError::NotOpened),
            Err(_) => return Err(LinkError::Busy),
        };
        send.write_chunk(Bytes::from(head_frame)).await.map_err(|_| LinkError::Lost)?;
        let upload = if head.has_body {
            let framing = Framing::new(head.framed_body, &self.limits);
            let task = tokio::spawn(
                async move {
                    if let Err(err) = pump_body(body, &mut send, StreamCode::Cancelled, framing).await {
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
        let body = self.stall.watch(recv_body(recv, response.framed_body, self.limits), &response.headers, client);
        Ok((response, QuicResponseBody { body, upload, finished: false }.boxed_unsync()))
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
    body: TunnelBody,
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
        // Trailers are the last frame; a reader may not poll for the end after them.
        this.finished = frame.as_ref().is_none_or(|f| matches!(f, Ok(f) if f.is_trailers()));
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
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(self.run_exchange(head, body, client))
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

    fn serve_peer_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let reason = serve_streams(&self.conn, handler, tasks, cancel, &self.stall).await;
            debug!(%reason, "no more requests from the peer");
        })
    }
}

/// Deadline for the head frame of a stream the peer opened.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves every stream the peer opens on `conn` with `handler`, each in a task on `tasks` that
/// stops when `cancel` fires, until the connection ends; returns why it ended. Request bodies are
/// watched in `stall`.
pub async fn serve_streams(
    conn: &quinn::Connection,
    handler: Arc<dyn RequestHandler>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    stall: &StallScope,
) -> String {
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let (handler, stall) = (handler.clone(), stall.clone());
                let work = async move { serve_stream(handler.as_ref(), send, recv, &stall).await }.in_current_span();
                crate::spawn_cancellable(&tasks, &cancel, work);
            }
            Err(err) => return err.to_string(),
        }
    }
}

/// Serves one stream the peer opened: reads and checks the request head (a bad one resets the
/// stream with its code), hands the request to `handler`, and streams the answer back (or resets
/// the stream with the handler's code). The request body is watched in `stall`.
pub async fn serve_stream(
    handler: &dyn RequestHandler,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    stall: &StallScope,
) {
    let limits = handler.limits();
    let head: RequestHead = match read_frame_within(&mut recv, limits.max_head_frame, HEAD_TIMEOUT).await {
        Ok(head) => head,
        Err(err) => {
            let code = err.stream_code();
            warn!(%err, ?code, "bad stream from peer");
            reset(&mut send, code);
            stop(&mut recv, code);
            return;
        }
    };
    let span = info_span!("stream", request_id = %head.request_id, upstream = %head.upstream);
    if let Err(err) = head.validate(&limits) {
        span.in_scope(|| warn!(%err, "invalid request head"));
        reset(&mut send, StreamCode::Malformed);
        stop(&mut recv, StreamCode::Malformed);
        return;
    }
    let body = if head.has_body {
        stall.watch(recv_body(recv, head.framed_body, limits), &head.headers, None)
    } else {
        stop(&mut recv, StreamCode::NoError);
        empty_body()
    };
    async {
        match handler.handle(head, body).await {
            Ok((response_head, body)) => {
                if write_frame(&mut send, &response_head, limits.max_head_frame).await.is_err() {
                    return reset(&mut send, StreamCode::Cancelled);
                }
                let framing = Framing::new(response_head.framed_body, &limits);
                match pump_body(body, &mut send, StreamCode::UpstreamFailed, framing).await {
                    Ok(bytes) => debug!(status = response_head.status, bytes, "response sent"),
                    Err(err) => debug!(%err, "response body ended early"),
                }
            }
            Err(code) => reset(&mut send, code),
        }
    }
    .instrument(span)
    .await;
}
