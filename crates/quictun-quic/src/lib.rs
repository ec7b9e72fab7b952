//! quictun's QUIC transport: all of quictun's quinn code is here.
//!
//! - [`endpoint`]: UDP sockets with large buffers, transport tuning, server and client setup.
//! - [`frames`]: head frames on a stream, and the control stream ([`frames::ControlChannel`]).
//! - [`body`]: a stream's bytes as a body, and a stream as the sink of the one body pump.
//! - [`deferred`]: quinn's tokio runtime with its drivers run after the tasks that are ready, so
//!   that one pass packs the writes of many streams.
//! - [`tunnel`]: [`QuicTunnel`], the [`quictun_core::tunnel::Tunnel`] of one connection: a
//!   stream per exchange, either end opening them.
//! - [`accept`]: the relay's accept loop (admission before any cryptography, handshake and
//!   control stream under deadlines, in the connection's own task).
//! - [`dial`]: the agent's dial and probe, with failures typed as fatal or retryable.
//! - [`floor`]: quinn alone doing the minimal exchange, the floor `quictun bench` shows beside
//!   the tunnel.

pub mod accept;
pub mod body;
pub mod deferred;
pub mod dial;
pub mod endpoint;
pub mod floor;
pub mod frames;
pub mod tunnel;

#[cfg(test)]
pub(crate) mod test_pair;

pub use endpoint::{Congestion, Tuning};
/// A QUIC endpoint (a UDP socket and its connections), as the relay and the agent hold it.
pub use quinn::Endpoint;
pub use tunnel::QuicTunnel;

/// Closes `conn` with a quictun close code.
pub fn close(conn: &quinn::Connection, code: quictun_proto::CloseCode) {
    conn.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// Closes every connection of `endpoint` with a quictun close code.
pub fn close_endpoint(endpoint: &quinn::Endpoint, code: quictun_proto::CloseCode) {
    endpoint.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// The quictun close code a peer closed with, when `err` is a close by the peer with one.
pub fn peer_close_code(err: &quinn::ConnectionError) -> Option<quictun_proto::CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            quictun_proto::CloseCode::from_u64(close.error_code.into_inner())
        }
        _ => None,
    }
}
