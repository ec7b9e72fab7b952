//! The gRPC wire: one message type on one bidirectional RPC, `quictun.Tunnel/Connect`, written
//! with prost's derive (no `.proto` compilation, no `protoc`).
//!
//! Every message carries a `request_id` (0 for control) and one payload. Heads and control
//! messages are the same bincode types the QUIC transport uses, so both transports speak the same
//! protocol and only the carrier differs.

use bytes::Bytes;

/// The full method path of the tunnel RPC.
pub const CONNECT_PATH: &str = "/quictun.Tunnel/Connect";

/// Largest body chunk put in one message.
pub const MAX_CHUNK: usize = 64 * 1024;

/// One message on the tunnel stream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TunnelMessage {
    /// The exchange this message belongs to; 0 for control messages.
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// What it carries.
    #[prost(oneof = "Payload", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10")]
    pub payload: Option<Payload>,
}

/// The payload of a [`TunnelMessage`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    /// A bincode [`quictun_proto::ControlMessage`].
    #[prost(bytes = "bytes", tag = "2")]
    Control(Bytes),
    /// A bincode [`quictun_proto::RequestHead`] (opens an exchange).
    #[prost(bytes = "bytes", tag = "3")]
    RequestHead(Bytes),
    /// A bincode [`quictun_proto::ResponseHead`].
    #[prost(bytes = "bytes", tag = "4")]
    ResponseHead(Bytes),
    /// A chunk of the request or response body.
    #[prost(bytes = "bytes", tag = "5")]
    Body(Bytes),
    /// The end of a body.
    #[prost(bool, tag = "6")]
    End(bool),
    /// The exchange is reset with a [`quictun_proto::StreamCode`].
    #[prost(uint32, tag = "7")]
    Reset(u32),
    /// A bincode [`quictun_proto::Trailers`]: the trailers of a body, followed by its end.
    #[prost(bytes = "bytes", tag = "8")]
    Trailers(Bytes),
    /// The receiver consumed this many more bytes of the exchange's body: its sender may send
    /// that much more (see [`crate::flow`]).
    #[prost(uint32, tag = "9")]
    Credit(u32),
    /// The receiver will not read the rest of the exchange's body (a [`quictun_proto::StreamCode`]):
    /// its sender stops; the other direction goes on.
    #[prost(uint32, tag = "10")]
    Stop(u32),
}

impl TunnelMessage {
    /// A message for exchange `request_id`.
    pub fn new(request_id: u64, payload: Payload) -> Self {
        Self { request_id, payload: Some(payload) }
    }
}

/// The prost codec for the tunnel RPC.
pub type Codec = tonic_prost::ProstCodec<TunnelMessage, TunnelMessage>;

/// The close code a peer put in the status that ended the stream (`quictun-close:N`).
pub fn close_status(code: quictun_proto::CloseCode) -> tonic::Status {
    tonic::Status::aborted(format!("quictun-close:{}", code.to_u32()))
}

/// Parses the close code out of a status made by [`close_status`].
pub fn parse_close_status(status: &tonic::Status) -> Option<quictun_proto::CloseCode> {
    let code = status.message().strip_prefix("quictun-close:")?.parse().ok()?;
    quictun_proto::CloseCode::from_u64(code)
}
