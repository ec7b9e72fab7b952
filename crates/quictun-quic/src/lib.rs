//! quictun's QUIC transport: all of quictun's quinn code is here, behind [`Quic`], the
//! implementation of [`quictun_core::transport::Transport`]. No quinn type is part of this
//! crate's public API (`tests/architecture.rs` checks it).
//!
//! - `endpoint`: UDP sockets with large buffers, transport tuning by path, server and client setup.
//! - `frames`: head frames on a stream, and the control stream ([`ControlChannel`]).
//! - `body`: a stream's bytes as a body, and a stream as the sink of the one body pump.
//! - `deferred`: quinn's tokio runtime with its drivers run after the tasks that are ready, so
//!   that one pass packs the writes of many streams.
//! - `tunnel`: [`QuicTunnel`], the [`quictun_core::tunnel::Tunnel`] of one connection: a stream
//!   per exchange, either end opening them.
//! - `accept`: the relay's [`QuicListener`] (admission by address before any cryptography,
//!   handshake and control stream under deadlines).
//! - `dial`: the agent's [`QuicEndpoint`] and [`QuicDialer`], failures typed.
//! - `lb_cid`: QUIC-LB connection IDs ([`ServerId`] first in every ID the relay issues), for an
//!   L4 load balancer in front of several relays.
//! - `transport`: [`Quic`].
//! - [`floor`]: quinn alone doing the minimal exchange, the floor `quictun bench` shows beside
//!   the tunnel.

mod accept;
mod body;
mod deferred;
mod dial;
mod endpoint;
pub mod floor;
mod frames;
mod lb_cid;
mod transport;
mod tunnel;

#[cfg(test)]
pub(crate) mod test_pair;

pub use accept::{QuicBindOptions, QuicListener};
pub use dial::{QuicDialOptions, QuicDialer, QuicEndpoint};
pub use endpoint::{Congestion, EndpointError, Tuning};
pub use frames::ControlChannel;
pub use lb_cid::{MAX_SERVER_ID, ServerId, server_id_of};
pub use transport::Quic;
pub use tunnel::QuicTunnel;

/// Closes `conn` with a quictun close code.
fn close(conn: &quinn::Connection, code: quictun_proto::CloseCode) {
    conn.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// Closes every connection of `endpoint` with a quictun close code.
fn close_endpoint(endpoint: &quinn::Endpoint, code: quictun_proto::CloseCode) {
    endpoint.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// The quictun close code a peer closed with, when `err` is a close by the peer with one.
fn peer_close_code(err: &quinn::ConnectionError) -> Option<quictun_proto::CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            quictun_proto::CloseCode::from_u64(close.error_code.into_inner())
        }
        _ => None,
    }
}
