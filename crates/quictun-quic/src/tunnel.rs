//! The QUIC tunnel: one connection, a bidirectional stream per exchange. Either end opens
//! exchanges ([`QuicTunnel::open`]: the relay for ingress requests, the agent for egress ones)
//! and serves the ones its peer opens.
//!
//! The opening side opens the stream itself (no extra round trip), writes the request head,
//! streams the request body from a task that lives exactly as long as the answer, and reads the
//! response head; the response body is then read from the stream chunk by chunk.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Shared;
use quictun_core::body::{AbortOnDrop, TunnelBody, WithUpload, empty_body, pump};
use quictun_core::framing::Framing;
use quictun_core::stall::StallScope;
use quictun_core::tunnel::{
    BadAnswer, BoxFuture, CloseReason, DatagramError, DatagramSupport, ExchangeError, RequestHandler, TransportKind,
    Tunnel,
};
use quictun_proto::datagram::{self, FlowId};
use quictun_proto::{CloseCode, Limits, RequestHead, ResponseHead, StreamCode, frame};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::body::{QuicSink, close_recv, recv_body, reset, stop};
use crate::frames::{ReadFrameError, read_head, read_head_within};

/// Longest wait for a free stream slot on the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for the head frame of a stream the peer opened.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A tunnel over one QUIC connection.
#[derive(Debug)]
pub struct QuicTunnel {
    conn: quinn::Connection,
    limits: Limits,
    stall: StallScope,
    /// The code this end closed with, for its own close reason (quinn does not keep it).
    closed_with: Mutex<Option<CloseCode>>,
    /// Set once the connection is known to be closed (by this end, or seen failing by the serve
    /// loop or a waiter): [`Tunnel::is_closed`] is asked for every request the balancer routes,
    /// and asking quinn takes the connection's lock, which its driver holds while it sends.
    known_closed: AtomicBool,
    /// Completes with the handshake, for a connection accepted before it completed (0.5-RTT,
    /// so that an agent's 0-RTT register is read at once); `None` when it was already complete.
    handshake: Handshake,
    /// The connection's share of the relay's full-size loopback packet budget, while it lives.
    _full_packets: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The handshake of a connection used before it completed.
#[derive(Clone)]
struct Handshake(Option<Shared<quinn::ZeroRttAccepted>>);

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Handshake(early)" } else { "Handshake(complete)" })
    }
}

impl QuicTunnel {
    /// A tunnel over `conn`, whose handshake is complete; bodies read from it are watched in `stall`.
    pub(crate) fn new(conn: quinn::Connection, limits: Limits, stall: StallScope) -> Self {
        Self::with_handshake(conn, Handshake(None), limits, stall)
    }

    /// A tunnel over `conn` whose handshake completes with `handshake` (see
    /// [`quinn::Connecting::into_0rtt`]): data read before it did may be replayed 0-RTT data.
    pub(crate) fn early(
        conn: quinn::Connection,
        handshake: quinn::ZeroRttAccepted,
        limits: Limits,
        stall: StallScope,
    ) -> Self {
        Self::with_handshake(conn, Handshake(Some(handshake.shared())), limits, stall)
    }

    fn with_handshake(conn: quinn::Connection, handshake: Handshake, limits: Limits, stall: StallScope) -> Self {
        let (closed_with, known_closed) = (Mutex::new(None), AtomicBool::new(false));
        Self { conn, limits, stall, closed_with, known_closed, handshake, _full_packets: None }
    }

    /// Holds `permit` (a share of the relay's full-size packet budget) while the tunnel lives.
    pub fn holding(mut self, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        self._full_packets = permit;
        self
    }

    fn reason(&self, err: quinn::ConnectionError) -> CloseReason {
        use quinn::ConnectionError as E;
        self.known_closed.store(true, Ordering::Relaxed);
        match err {
            E::ApplicationClosed(_) => {
                crate::peer_close_code(&err).map_or(CloseReason::Ended, CloseReason::ClosedByPeer)
            }
            E::LocallyClosed => {
                CloseReason::Closed(self.closed_with.lock().ok().and_then(|c| *c).unwrap_or(CloseCode::Normal))
            }
            E::TimedOut => CloseReason::IdleTimeout,
            E::Reset => CloseReason::PeerRestarted,
            other => CloseReason::Failed(other.to_string()),
        }
    }

    async fn run_exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> Result<(ResponseHead, TunnelBody), ExchangeError> {
        // Encoded before the stream opens: a head too large for the tunnel sends nothing.
        let head_frame = frame::encode(&head, self.limits.max_head_frame).map_err(ExchangeError::HeadTooLarge)?;
        let (mut send, mut recv) = match tokio::time::timeout(OPEN_TIMEOUT, self.conn.open_bi()).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(err)) => {
                self.reason(err);
                return Err(ExchangeError::NotOpened);
            }
            Err(_) => return Err(ExchangeError::Busy),
        };
        send.write_chunk(Bytes::from(head_frame)).await.map_err(|_| ExchangeError::Lost)?;
        let upload = if head.has_body {
            let mut sink = QuicSink::new(send, Framing::new(head.framed_body, &self.limits));
            let upload = async move {
                if let Err(err) = pump(body, &mut sink, StreamCode::Cancelled).await {
                    debug!(%err, "request body upload ended early");
                }
            };
            Some(tokio::spawn(upload.in_current_span()))
        } else {
            // Finishing right after the head lets the peer see the end at once.
            let _already_closed = send.finish();
            None
        };
        let upload = upload.map(AbortOnDrop::new);
        let (response, start): (ResponseHead, _) =
            read_head(&mut recv, self.limits.max_head_frame).await.map_err(from_read)?;
        response.validate(&self.limits).map_err(BadAnswer::from)?;
        let body = recv_body(recv, start, Framing::new(response.framed_body, &self.limits), self.limits);
        let body = self.stall.watch(body, &response.headers, client);
        Ok((response, WithUpload::wrap(body, upload.and_then(AbortOnDrop::into_inner))))
    }
}

fn from_read(err: ReadFrameError) -> ExchangeError {
    match err {
        ReadFrameError::Reset(code) => ExchangeError::Reset(code),
        ReadFrameError::ConnectionLost(_) | ReadFrameError::Closed => ExchangeError::Lost,
        ReadFrameError::Frame(err) => BadAnswer::Frame(err).into(),
        ReadFrameError::Truncated => BadAnswer::Truncated.into(),
        ReadFrameError::Timeout(_) => BadAnswer::NoHead.into(),
    }
}

impl Tunnel for QuicTunnel {
    fn open(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), ExchangeError>> {
        Box::pin(self.run_exchange(head, body, client))
    }

    fn serve(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, CloseReason> {
        Box::pin(async move {
            loop {
                match self.conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let (handler, stall) = (handler.clone(), self.stall.clone());
                        let work = async move { serve_stream(handler.as_ref(), send, recv, &stall).await };
                        quictun_core::spawn_cancellable(&tasks, &cancel, work.in_current_span());
                    }
                    Err(err) => return self.reason(err),
                }
            }
        })
    }

    fn close(&self, code: CloseCode) {
        if let Ok(mut closed_with) = self.closed_with.lock() {
            closed_with.get_or_insert(code);
        }
        self.known_closed.store(true, Ordering::Relaxed);
        crate::close(&self.conn, code);
    }

    fn is_closed(&self) -> bool {
        // The serve loop, which every session runs, sees a closed connection at once; until then
        // the lock-free flag is the answer.
        self.known_closed.load(Ordering::Relaxed)
    }

    fn closed(&self) -> BoxFuture<'_, CloseReason> {
        Box::pin(async { self.reason(self.conn.closed().await) })
    }

    fn datagrams_received(&self) -> Option<u64> {
        Some(self.conn.stats().udp_rx.datagrams)
    }

    fn allow_incoming_exchanges(&self, streams: u32) {
        self.conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(streams));
    }

    fn handshake_complete(&self) -> BoxFuture<'_, bool> {
        let handshake = self.handshake.0.clone();
        Box::pin(async move {
            if let Some(handshake) = handshake {
                // Resolves when the handshake completes or the connection fails, whichever is
                // first (the value itself only says whether 0-RTT was accepted).
                handshake.await;
            }
            self.conn.close_reason().is_none()
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn datagram_support(&self) -> DatagramSupport {
        match self.conn.max_datagram_size() {
            // Room for the longest flow id prefix.
            Some(max) => DatagramSupport::Native { max_payload: max.saturating_sub(MAX_FLOW_PREFIX) },
            None => DatagramSupport::None,
        }
    }

    fn send_datagram(&self, flow: FlowId, payload: Bytes) -> Result<(), DatagramError> {
        use quinn::SendDatagramError as E;
        let len = payload.len();
        let datagram = datagram::encode(flow, &payload)?;
        // quinn would drop the oldest queued datagram to make room; dropping the new one instead
        // lets the caller count the drop (and keeps what is queued in order). Never waits.
        if self.conn.datagram_send_buffer_space() < datagram.len() {
            return Err(DatagramError::Full);
        }
        self.conn.send_datagram(datagram).map_err(|err| match err {
            E::UnsupportedByPeer => DatagramError::Disabled,
            E::Disabled => DatagramError::Unsupported,
            E::TooLarge => {
                let max = self.conn.max_datagram_size().unwrap_or(0).saturating_sub(datagram::prefix_len(flow));
                DatagramError::TooLarge { len, max }
            }
            E::ConnectionLost(_) => DatagramError::Closed,
        })
    }

    fn recv_datagram(&self) -> BoxFuture<'_, Result<(FlowId, Bytes), DatagramError>> {
        Box::pin(async move {
            let received = self.conn.read_datagram().await.map_err(|_| DatagramError::Closed)?;
            Ok(datagram::decode(received)?)
        })
    }
}

/// The longest flow id prefix (a varint of 8 bytes).
const MAX_FLOW_PREFIX: usize = 8;

/// Serves one stream the peer opened: reads and checks the request head (a bad one resets the
/// stream with its code), hands the request to `handler`, and streams the answer back (or resets
/// the stream with the handler's code). The request body is watched in `stall`.
pub(crate) async fn serve_stream(
    handler: &dyn RequestHandler,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    stall: &StallScope,
) {
    let limits = handler.limits();
    let (head, start): (RequestHead, _) = match read_head_within(&mut recv, limits.max_head_frame, HEAD_TIMEOUT).await {
        Ok(read) => read,
        Err(err) => {
            let code = err.stream_code();
            warn!(%err, code = code.as_str(), "bad stream from peer");
            reset(&mut send, code);
            stop(&mut recv, code);
            return;
        }
    };
    let span = info_span!("stream", request_id = %head.request_id, target = %head.target);
    if let Err(err) = head.validate(&limits) {
        span.in_scope(|| warn!(%err, "invalid request head"));
        reset(&mut send, StreamCode::Malformed);
        stop(&mut recv, StreamCode::Malformed);
        return;
    }
    let body = if head.has_body {
        let framing = Framing::new(head.framed_body, &limits);
        stall.watch(recv_body(recv, start, framing, limits), &head.headers, None)
    } else {
        close_recv(recv, StreamCode::NoError);
        empty_body()
    };
    async {
        match handler.handle(head, body).await {
            Ok((response_head, body)) => {
                let encoded = match frame::encode(&response_head, limits.max_head_frame) {
                    Ok(encoded) => Bytes::from(encoded),
                    Err(err) => {
                        warn!(%err, "response head too large");
                        return reset(&mut send, StreamCode::UpstreamFailed);
                    }
                };
                // The head goes out with the body's first bytes when they are already there.
                let framing = Framing::new(response_head.framed_body, &limits);
                let mut sink = QuicSink::with_head(send, framing, encoded);
                match pump(body, &mut sink, StreamCode::UpstreamFailed).await {
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

#[cfg(test)]
mod tests {
    use quictun_core::stall::{Reclaimer, StallLimits};

    use super::*;

    fn tunnel(conn: quinn::Connection) -> QuicTunnel {
        QuicTunnel::new(conn, Limits::default(), Reclaimer::new(StallLimits::default()).scope(1 << 20))
    }

    #[tokio::test]
    async fn datagrams_cross_with_their_flow_and_an_oversized_one_is_refused() {
        let pair = crate::test_pair::connected().await;
        let (client, server) = (tunnel(pair.client.clone()), tunnel(pair.server.clone()));
        let DatagramSupport::Native { max_payload } = client.datagram_support() else {
            panic!("QUIC carries datagrams")
        };
        assert!(max_payload >= 1_000, "{max_payload}");
        for (flow, payload) in [(0, &b"first"[..]), (70_000, b"second")] {
            client.send_datagram(flow, Bytes::copy_from_slice(payload)).unwrap();
            let received = tokio::time::timeout(Duration::from_secs(5), server.recv_datagram()).await.unwrap();
            assert_eq!(received.unwrap(), (flow, Bytes::copy_from_slice(payload)));
        }
        let too_large = Bytes::from(vec![0u8; 70_000]);
        assert!(matches!(client.send_datagram(1, too_large), Err(DatagramError::TooLarge { len: 70_000, .. })));
        pair.client.close(0u32.into(), b"done");
        assert_eq!(server.recv_datagram().await, Err(DatagramError::Closed));
    }
}
