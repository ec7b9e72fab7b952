//! Frames on QUIC streams: the head frame that opens each exchange's stream, and the control
//! stream.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use quictun_core::control::{ControlCodec, ControlError, ControlIo};
use quictun_proto::frame::{self, FrameError, LEN_PREFIX};
use quictun_proto::{ControlMessage, StreamCode};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{FramedRead, FramedWrite};

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

    /// Finishes this end of the stream (after a go-away or a rejection).
    fn finish(&mut self) {
        // Already finished or reset: nothing left to do.
        let _already_closed = self.writer.get_mut().finish();
    }
}
