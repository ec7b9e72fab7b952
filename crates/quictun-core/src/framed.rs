//! Frames on QUIC streams: head frames on data streams, and the control channel.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use quictun_proto::frame::{self, FrameError, LEN_PREFIX};
use quictun_proto::{ControlMessage, StreamCode};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

use crate::link::ControlIo;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    /// The bytes were not a valid frame (too large, malformed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended before a whole frame arrived.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The peer reset the stream.
    #[error("stream reset by peer with code {0}")]
    Reset(u64),
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
            quinn::ReadError::Reset(code) => Self::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(c) => Self::ConnectionLost(c),
            _ => Self::Closed,
        }
    }
}

impl From<quinn::ReadExactError> for ReadFrameError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => Self::Truncated,
            quinn::ReadExactError::ReadError(e) => e.into(),
        }
    }
}

/// Reads one frame: the length prefix is checked against `max` before the payload is allocated.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, max: usize) -> Result<T, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    recv.read_exact(&mut prefix).await?;
    let len = frame::payload_len(prefix, max)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    Ok(frame::decode_payload(&payload)?)
}

/// [`read_frame`] with a deadline.
pub async fn read_frame_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    deadline: Duration,
) -> Result<T, ReadFrameError> {
    tokio::time::timeout(deadline, read_frame(recv, max)).await.map_err(|_| ReadFrameError::Timeout(deadline))?
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteFrameError {
    /// The message could not be encoded within the limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream or connection failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    max: usize,
) -> Result<(), WriteFrameError> {
    let bytes = frame::encode(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// The send priority of the control stream: above every data stream (which keep quinn's 0).
pub const CONTROL_PRIORITY: i32 = 100;

/// A tokio codec for control messages with a maximum frame size.
#[derive(Debug, Clone, Copy)]
pub struct ControlCodec {
    max: usize,
}

impl ControlCodec {
    /// A codec refusing frames over `max` payload bytes.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

/// Errors on the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A frame was invalid.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the control stream.
    #[error("control stream closed by peer")]
    Closed,
    /// No message within the deadline.
    #[error("no control message within {0:?}")]
    Timeout(Duration),
}

impl Decoder for ControlCodec {
    type Item = ControlMessage;
    type Error = ControlError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ControlMessage>, ControlError> {
        match frame::check(src, self.max)? {
            None => {
                if let Some(prefix) = src.first_chunk::<LEN_PREFIX>() {
                    // Length already checked against the limit by `check`.
                    let total = LEN_PREFIX + u32::from_be_bytes(*prefix) as usize;
                    src.reserve(total.saturating_sub(src.len()));
                }
                Ok(None)
            }
            Some(n) => {
                let bytes = src.split_to(n);
                Ok(Some(frame::decode_payload(&bytes[LEN_PREFIX..])?))
            }
        }
    }
}

impl Encoder<ControlMessage> for ControlCodec {
    type Error = ControlError;

    fn encode(&mut self, msg: ControlMessage, dst: &mut BytesMut) -> Result<(), ControlError> {
        dst.extend_from_slice(&frame::encode(&msg, self.max)?);
        Ok(())
    }
}

/// The control stream, as a reader of messages (cancel-safe) and a writer.
pub struct ControlChannel {
    reader: FramedRead<quinn::RecvStream, ControlCodec>,
    writer: FramedWrite<quinn::SendStream, ControlCodec>,
}

impl ControlChannel {
    /// Wraps the two halves of the control stream. Its data is sent before any data stream's
    /// (heartbeats never queue behind bodies).
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream, max_frame: usize) -> Self {
        if send.set_priority(CONTROL_PRIORITY).is_err() {
            tracing::debug!("control stream closed before its priority was set");
        }
        let codec = ControlCodec::new(max_frame);
        Self { reader: FramedRead::new(recv, codec), writer: FramedWrite::new(send, codec) }
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

    /// Finishes our side of the stream (after a go-away or a rejection).
    fn finish(&mut self) {
        // Already finished or reset: nothing left to do.
        let _already_closed = self.writer.get_mut().finish();
    }
}
