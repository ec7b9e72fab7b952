//! Frames on QUIC streams: the head frame that opens each exchange's stream, and the control
//! stream.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use quictun_core::control::{ControlCodec, ControlError, ControlIo};
use quictun_proto::frame::{self, FrameError, LEN_PREFIX};
use quictun_proto::{ControlMessage, StreamCode};
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFrameError {
    /// The bytes were not a valid frame (too large, malformed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before a whole frame arrived.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The peer reset the stream.
    #[error("stream reset by peer: {0}")]
    Reset(StreamCode),
    /// The connection is gone.
    #[error("connection lost: {0}")]
    ConnectionLost(#[from] quinn::ConnectionError),
    /// No frame before the deadline.
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    /// The stream was used after it was closed locally (a bug, reported rather than panicking).
    #[error("stream already closed")]
    Closed,
}

impl ReadFrameError {
    /// The code to reset the stream with after this error.
    pub fn stream_code(&self) -> StreamCode {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) => StreamCode::HeadTooLarge,
            Self::Timeout(_) => StreamCode::HeadTimeout,
            Self::Reset(_) | Self::ConnectionLost(_) | Self::Closed => StreamCode::Cancelled,
            _ => StreamCode::Malformed,
        }
    }
}

impl From<quinn::ReadError> for ReadFrameError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => Self::Reset(StreamCode::from_wire(code.into_inner())),
            quinn::ReadError::ConnectionLost(c) => Self::ConnectionLost(c),
            _ => Self::Closed,
        }
    }
}

/// Reads the head frame that opens an exchange's stream, and returns it with the bytes that came
/// after it (the start of the body). The stream is read a chunk at a time, without copying when a
/// chunk holds the whole frame: a head and the body that followed it in one packet take one read
/// (each read takes the connection's lock, which its driver holds while it sends). The length
/// prefix is checked against `max` before anything is buffered.
pub(crate) async fn read_head<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<(T, Bytes), ReadFrameError> {
    let mut buffered = BytesMut::new();
    loop {
        // Never more than the rest of the largest frame: a peer cannot make us buffer a body.
        let room = (LEN_PREFIX + max).saturating_sub(buffered.len()).max(1);
        let Some(chunk) = recv.read_chunk(room, true).await? else {
            return Err(ReadFrameError::Truncated);
        };
        if buffered.is_empty() {
            // The common case: the whole frame is in the first chunk, decoded in place.
            if let Some((head, used)) = frame::decode(&chunk.bytes, max)? {
                return Ok((head, chunk.bytes.slice(used..)));
            }
        }
        buffered.extend_from_slice(&chunk.bytes);
        if let Some((head, used)) = frame::decode(&buffered, max)? {
            return Ok((head, buffered.split_off(used).freeze()));
        }
    }
}

/// [`read_head`] with a deadline.
pub(crate) async fn read_head_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    deadline: Duration,
) -> Result<(T, Bytes), ReadFrameError> {
    tokio::time::timeout(deadline, read_head(recv, max)).await.map_err(|_| ReadFrameError::Timeout(deadline))?
}

/// The send priority of the control stream: above every data stream (which keep quinn's 0).
pub const CONTROL_PRIORITY: i32 = 100;

/// The control stream, as a reader of messages (cancel-safe) and a writer.
pub struct ControlChannel {
    reader: FramedRead<quinn::RecvStream, ControlCodec>,
    writer: FramedWrite<quinn::SendStream, ControlCodec>,
}

impl ControlChannel {
    /// Wraps the two halves of the control stream. Its data is sent before any data stream's
    /// (heartbeats never queue behind bodies).
    pub(crate) fn new(send: quinn::SendStream, recv: quinn::RecvStream, max_frame: usize) -> Self {
        if send.set_priority(CONTROL_PRIORITY).is_err() {
            tracing::debug!("control stream closed before its priority was set");
        }
        let codec = ControlCodec::new(max_frame);
        Self { reader: FramedRead::new(recv, codec), writer: FramedWrite::new(send, codec) }
    }

    /// True when the peer opened this stream as 0-RTT data (before the handshake completed).
    pub fn is_0rtt(&self) -> bool {
        self.reader.get_ref().is_0rtt()
    }
}

impl ControlIo for ControlChannel {
    /// The next message; `Err(Closed)` when the peer finished the stream. Cancel-safe.
    async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
        match self.reader.next().await {
            Some(result) => result,
            None => Err(ControlError::Closed),
        }
    }

    /// Sends one message and flushes it.
    async fn send(&mut self, msg: ControlMessage) -> Result<(), ControlError> {
        self.writer.send(msg).await
    }

    /// Finishes this end of the stream (after a go-away or a rejection).
    fn finish(&mut self) {
        // Already finished or reset: nothing left to do.
        let _already_closed = self.writer.get_mut().finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_pair::Pair;
    use quictun_proto::ResponseHead;

    fn head() -> ResponseHead {
        ResponseHead { status: 200, headers: vec![], framed_body: false }
    }

    /// A real QUIC connection: the client's send half of a fresh stream and the server's receive
    /// half, for `write` to fill and `read_head` to read.
    async fn stream_pair(write: impl AsyncFnOnce(&mut quinn::SendStream)) -> (quinn::RecvStream, Pair) {
        let pair = crate::test_pair::connected().await;
        let mut send = pair.client.open_bi().await.unwrap().0;
        write(&mut send).await;
        let (_, recv) = pair.server.accept_bi().await.unwrap();
        (recv, pair)
    }

    #[tokio::test]
    async fn a_head_and_the_body_after_it_come_apart_whether_written_together_or_in_pieces() {
        let encoded = frame::encode(&head(), 1024).unwrap();
        let together = [encoded.clone(), b"body".to_vec()].concat();
        let (mut recv, _conn) = stream_pair(async |send| {
            send.write_all(&together).await.unwrap();
            send.finish().unwrap();
        })
        .await;
        let (read, start): (ResponseHead, Bytes) = read_head(&mut recv, 1024).await.unwrap();
        assert_eq!(read, head());
        let mut body = start.to_vec();
        body.extend(recv.read_to_end(1024).await.unwrap());
        assert_eq!(body, b"body");

        // One byte per write: the head is put together across chunks.
        let (mut recv, _conn) = stream_pair(async |send| {
            for byte in &together {
                send.write_all(&[*byte]).await.unwrap();
            }
            send.finish().unwrap();
        })
        .await;
        let (read, start): (ResponseHead, Bytes) = read_head(&mut recv, 1024).await.unwrap();
        assert_eq!(read, head());
        let mut body = start.to_vec();
        body.extend(recv.read_to_end(1024).await.unwrap());
        assert_eq!(body, b"body");
    }

    #[tokio::test]
    async fn an_oversized_or_cut_head_is_refused() {
        let (mut recv, _conn) = stream_pair(async |send| {
            send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
            send.write_all(&[0; 64]).await.unwrap();
        })
        .await;
        let refused = read_head::<ResponseHead>(&mut recv, 1024).await;
        assert!(matches!(refused, Err(ReadFrameError::Frame(FrameError::TooLarge { .. }))), "{refused:?}");

        let encoded = frame::encode(&head(), 1024).unwrap();
        let (mut recv, _conn) = stream_pair(async |send| {
            send.write_all(&encoded[..encoded.len() - 1]).await.unwrap();
            send.finish().unwrap();
        })
        .await;
        let cut = read_head::<ResponseHead>(&mut recv, 1024).await;
        assert!(matches!(cut, Err(ReadFrameError::Truncated)), "{cut:?}");
    }
}
