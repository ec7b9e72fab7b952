//! Bodies on QUIC streams: a stream's bytes read as a body ([`RecvBody`], or framed with
//! [`quictun_core::framing::FramedBody`]), and a stream as a [`BodySink`] for the one pump.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use quictun_core::body::{BodyError, BodySink, SinkError, TunnelBody};
use quictun_core::framing::{FramedBody, Framing, data_frame_header, encode_trailers_frame};
use quictun_proto::{Limits, StreamCode};
use quinn::VarInt;
use tracing::debug;

/// Most received chunks (each at most one packet's payload) taken from quinn in one read and
/// handed on as one body chunk.
pub const READ_BATCH: usize = 16;

/// A body streamed from a QUIC receive stream. Each poll takes every chunk quinn holds for the
/// stream, up to [`READ_BATCH`], under one take of the connection's lock: one chunk is handed on
/// as it is (no copy: a small answer's end), several are joined into one (bulk: one copy of
/// packet-sized pieces saves a poll of every body layer above, and hyper's write, per packet).
/// Dropped before the end, it tells the peer to stop sending (quinn sends STOP_SENDING), unless
/// the end is already there: a consumer that knows the length (hyper, from `content-length`)
/// stops polling at the last byte, before the FIN is read.
pub struct RecvBody {
    recv: quinn::RecvStream,
    /// Body bytes already read with the head, handed out first.
    start: Option<Bytes>,
    /// Where a read puts its chunks; empty between polls.
    batch: [Bytes; READ_BATCH],
    done: bool,
}

impl RecvBody {
    /// Streams `start` (the body bytes read together with the head), then the rest of `recv`.
    pub(crate) fn new(recv: quinn::RecvStream, start: Bytes) -> Self {
        Self { recv, start: Some(start).filter(|b| !b.is_empty()), batch: Default::default(), done: false }
    }
}

/// The first `n` chunks of `batch` as one, leaving `batch` empty.
fn join_chunks(batch: &mut [Bytes], n: usize) -> Bytes {
    let taken = &mut batch[..n];
    if let [one] = taken {
        return std::mem::take(one);
    }
    let mut joined = bytes::BytesMut::with_capacity(taken.iter().map(Bytes::len).sum());
    for chunk in taken {
        joined.extend_from_slice(&std::mem::take(chunk));
    }
    joined.freeze()
}

fn read_error(e: quinn::ReadError) -> BodyError {
    match e {
        quinn::ReadError::Reset(code) => BodyError::Reset(StreamCode::from_wire(code.into_inner())),
        quinn::ReadError::ConnectionLost(c) => BodyError::ConnectionLost(c.to_string()),
        other => BodyError::Closed(other.to_string()),
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        if !self.done {
            let _at_end = read_end_now(&mut self.recv);
        }
    }
}

/// Whether `recv` is at its end now: true when nothing but the peer's FIN is left (it is read, so
/// dropping the stream sends nothing). Does not wait; unread data is consumed and gives false.
///
/// Without this every exchange whose end is known from its length would cost a STOP_SENDING
/// frame, a packet and its acknowledgement: measured at about two more datagrams per small
/// request when each connection carries few requests at a time (1,000 agents).
fn read_end_now(recv: &mut quinn::RecvStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let read = recv.read_chunk(usize::MAX, true);
    matches!(std::pin::pin!(read).poll(&mut cx), Poll::Ready(Ok(None)))
}

/// Closes a receive stream that is to be read no further: it stays quiet when its end is already
/// there, and is stopped with `code` otherwise.
pub(crate) fn close_recv(mut recv: quinn::RecvStream, code: StreamCode) {
    if !read_end_now(&mut recv) {
        stop(&mut recv, code);
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(start) = this.start.take() {
            return Poll::Ready(Some(Ok(Frame::data(start))));
        }
        // `read_chunks` is cancel-safe, so a fresh future per poll loses nothing.
        let read = this.recv.read_chunks(&mut this.batch);
        let result = ready!(std::pin::pin!(read).poll(cx));
        Poll::Ready(match result {
            Ok(Some(n)) => Some(Ok(Frame::data(join_chunks(&mut this.batch, n)))),
            Ok(None) => {
                this.done = true;
                None
            }
            Err(e) => {
                this.done = true;
                Some(Err(read_error(e)))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The body that follows a head on `recv` (`start` being the part of it read with the head), laid
/// out as the head announced.
pub(crate) fn recv_body(recv: quinn::RecvStream, start: Bytes, framing: Framing, limits: Limits) -> TunnelBody {
    match framing {
        Framing::Raw => RecvBody::new(recv, start).boxed_unsync(),
        Framing::Framed { .. } => FramedBody::new(RecvBody::new(recv, start), limits).boxed_unsync(),
    }
}

/// A QUIC send stream as the sink of one body, laid out as `framing` says.
pub struct QuicSink {
    send: quinn::SendStream,
    framing: Framing,
    /// The encoded head, when it goes out with the body's first bytes (or its end) in one write.
    head: Option<Bytes>,
}

impl QuicSink {
    /// Sends a body on `send` (its head already written).
    pub(crate) fn new(send: quinn::SendStream, framing: Framing) -> Self {
        Self { send, framing, head: None }
    }

    /// Sends the encoded `head`, then a body on `send`. The head is written together with the
    /// body's first bytes when they are already there, so that a small answer is one write and
    /// one end (each write takes the connection's lock, which its driver holds while it sends);
    /// [`BodySink::flush`] sends it alone before the pump waits for a slow body.
    pub(crate) fn with_head(send: quinn::SendStream, framing: Framing, head: Bytes) -> Self {
        Self { send, framing, head: Some(head) }
    }

    /// Writes `chunks` after the held-back head, if any, in one call.
    async fn write_after_head(&mut self, chunks: &mut [Bytes]) -> Result<(), SinkError> {
        let written = match self.head.take() {
            None => self.send.write_all_chunks(chunks).await,
            Some(head) => {
                let mut all: Vec<Bytes> = std::iter::once(head).chain(chunks.iter().cloned()).collect();
                self.send.write_all_chunks(&mut all).await
            }
        };
        written.map_err(write_error)
    }
}

fn write_error(e: quinn::WriteError) -> SinkError {
    match e {
        quinn::WriteError::Stopped(_) => SinkError::Stopped,
        _ => SinkError::Lost,
    }
}

impl BodySink for QuicSink {
    async fn send_data(&mut self, data: Bytes) -> Result<(), SinkError> {
        match self.framing {
            Framing::Raw => self.write_after_head(&mut [data]).await,
            Framing::Framed { .. } => self.write_after_head(&mut [data_frame_header(data.len()), data]).await,
        }
    }

    async fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), SinkError> {
        let Framing::Framed { max_trailers } = self.framing else {
            debug!(fields = trailers.len(), "trailers dropped: the body is not framed");
            return Ok(());
        };
        let encoded =
            encode_trailers_frame(&trailers, max_trailers).map_err(|e| SinkError::TrailersTooLarge(e.to_string()))?;
        self.write_after_head(&mut [encoded]).await
    }

    async fn flush(&mut self) -> Result<(), SinkError> {
        match self.head.take() {
            Some(head) => self.send.write_chunk(head).await.map_err(write_error),
            None => Ok(()),
        }
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        self.flush().await?;
        // Finishing a stream the peer already stopped is harmless; the peer learns of it either way.
        let _already_closed = self.send.finish();
        Ok(())
    }

    fn reset(&mut self, code: StreamCode) {
        reset(&mut self.send, code);
    }
}

/// Resets a send stream with `code`, ignoring a stream that is already closed.
pub(crate) fn reset(send: &mut quinn::SendStream, code: StreamCode) {
    let _already_closed = send.reset(VarInt::from_u32(code.to_u32()));
}

/// Stops a receive stream with `code`, ignoring a stream that is already closed.
pub(crate) fn stop(recv: &mut quinn::RecvStream, code: StreamCode) {
    let _already_closed = recv.stop(VarInt::from_u32(code.to_u32()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chunk_is_handed_on_as_it_is_and_several_are_joined_in_order() {
        let mut batch: [Bytes; READ_BATCH] = Default::default();
        let one = Bytes::from_static(b"only");
        batch[0] = one.clone();
        let out = join_chunks(&mut batch, 1);
        assert_eq!(out.as_ptr(), one.as_ptr(), "a single chunk is not copied");
        assert!(batch.iter().all(Bytes::is_empty));

        for (i, part) in [&b"ab"[..], b"", b"cde", b"f"].into_iter().enumerate() {
            batch[i] = Bytes::copy_from_slice(part);
        }
        assert_eq!(join_chunks(&mut batch, 4), Bytes::from_static(b"abcdef"));
        assert!(batch.iter().all(Bytes::is_empty), "the batch holds nothing between reads");
    }

    /// How many STOP_SENDING frames `pair`'s client has received, after a round trip on a fresh
    /// stream (so that a frame queued before it has arrived).
    async fn stops_received(pair: &crate::test_pair::Pair) -> u64 {
        let (mut send, mut recv) = pair.client.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        let (mut back, mut there) = pair.server.accept_bi().await.unwrap();
        assert_eq!(there.read_to_end(16).await.unwrap(), b"ping");
        back.write_all(b"pong").await.unwrap();
        back.finish().unwrap();
        assert_eq!(recv.read_to_end(16).await.unwrap(), b"pong");
        pair.client.stats().frame_rx.stop_sending
    }

    /// A stream from the client to the server holding `data`, finished when `finish`; the
    /// server's receive half once all of it (and the FIN) has arrived.
    async fn received(pair: &crate::test_pair::Pair, data: &[u8], finish: bool) -> quinn::RecvStream {
        let (mut send, _) = pair.client.open_bi().await.unwrap();
        send.write_all(data).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        let (_, recv) = pair.server.accept_bi().await.unwrap();
        if finish {
            // Acknowledged by the server: the data and the FIN are there.
            assert_eq!(send.stopped().await.unwrap(), None);
        }
        recv
    }

    #[tokio::test]
    async fn a_body_dropped_at_its_last_byte_sends_no_stop_sending_and_one_dropped_early_does() {
        let pair = crate::test_pair::connected().await;
        // The whole answer came with the head (`read_head` reads chunks as they come), the FIN is
        // left in quinn.
        let mut recv = received(&pair, b"answer", true).await;
        let start = recv.read_chunk(usize::MAX, true).await.unwrap().unwrap().bytes;
        let mut body = RecvBody::new(recv, start);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "answer");
        drop(body); // as hyper does once content-length bytes are through
        assert_eq!(stops_received(&pair).await, 0, "the whole body was read, yet the peer was stopped");

        let body = RecvBody::new(received(&pair, b"not read", true).await, Bytes::new());
        drop(body);
        assert_eq!(stops_received(&pair).await, 1, "unread data must stop the peer");
    }

    #[tokio::test]
    async fn closing_a_receive_stream_at_its_end_is_quiet_and_before_it_stops_the_peer() {
        let pair = crate::test_pair::connected().await;
        close_recv(received(&pair, b"", true).await, StreamCode::NoError);
        assert_eq!(stops_received(&pair).await, 0);

        let (mut send, _) = pair.client.open_bi().await.unwrap();
        send.write_all(b"head").await.unwrap();
        let (_, mut recv) = pair.server.accept_bi().await.unwrap();
        let mut head = [0; 4];
        recv.read_exact(&mut head).await.unwrap();
        close_recv(recv, StreamCode::NoError); // the sender has not finished: more may come
        assert_eq!(stops_received(&pair).await, 1);
        assert_eq!(send.stopped().await.unwrap(), Some(VarInt::from_u32(StreamCode::NoError.to_u32())));
    }
}
