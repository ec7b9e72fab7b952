//! The control channel that comes with every tunnel: register, accepted/rejected, config_sync,
//! heartbeats and go-away, as length-prefixed bincode frames.
//!
//! - [`ControlIo`]: a channel of control messages, whatever carries it (a QUIC stream, the gRPC
//!   stream's control lane).
//! - [`ControlCodec`]: the frame codec for byte-stream carriers, with a size limit checked before
//!   anything is allocated.

use std::future::Future;
use std::time::Duration;

use bytes::BytesMut;
use quictun_proto::ControlMessage;
use quictun_proto::frame::{self, FrameError, LEN_PREFIX};
use tokio_util::codec::{Decoder, Encoder};

/// Errors on the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A frame was invalid.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The channel's carrier failed.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the channel.
    #[error("control stream closed by peer")]
    Closed,
    /// No message within the deadline.
    #[error("no control message within {0:?}")]
    Timeout(Duration),
}

/// A control-message channel. `recv` must be cancel-safe (it is used in `select!`).
pub trait ControlIo: Send {
    /// The next message; `Err(ControlError::Closed)` when the peer ended the channel.
    fn recv(&mut self) -> impl Future<Output = Result<ControlMessage, ControlError>> + Send;

    /// Sends one message.
    fn send(&mut self, msg: ControlMessage) -> impl Future<Output = Result<(), ControlError>> + Send;

    /// Ends this end of the channel.
    fn finish(&mut self);

    /// [`ControlIo::recv`] with a deadline.
    fn recv_within(&mut self, deadline: Duration) -> impl Future<Output = Result<ControlMessage, ControlError>> + Send {
        async move { tokio::time::timeout(deadline, self.recv()).await.map_err(|_| ControlError::Timeout(deadline))? }
    }
}

/// The name of a control message, for logs.
pub fn message_name(msg: &ControlMessage) -> &'static str {
    match msg {
        ControlMessage::Register(_) => "register",
        ControlMessage::Accepted(_) => "accepted",
        ControlMessage::Rejected(_) => "rejected",
        ControlMessage::ConfigSync(_) => "config_sync",
        ControlMessage::Heartbeat(_) => "heartbeat",
        ControlMessage::HeartbeatAck(_) => "heartbeat_ack",
        ControlMessage::GoAway(_) => "go_away",
        ControlMessage::Claims(_) => "claims",
        ControlMessage::ClaimAnswers(_) => "claim_answers",
        ControlMessage::PeerHello(_) => "peer_hello",
        ControlMessage::PeerAccepted(_) => "peer_accepted",
    }
}

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
