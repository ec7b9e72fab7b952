//! quictun's gRPC transport: the design quictun replaces, kept as a transport of its own, to
//! benchmark against and as a fallback where UDP is blocked.
//!
//! One long-lived bidirectional gRPC stream per agent (TCP + TLS + HTTP/2) carries every message:
//! control, request and response heads, body chunks, ends and resets, each tagged with a
//! `request_id` and matched through a table of per-exchange queues. It follows the seeds' own
//! concurrency plan so that it is the strongest honest version of that design: the reader never
//! waits on request handling or on any exchange, handling is concurrent, every queue is bounded,
//! a full head queue answers 503 at once, and deadlines clean the table. Each exchange has flow
//! control of its own ([`flow`]), so a reader that stops reading holds its exchange's window and
//! nothing else; heads, credits and control messages go ahead of body data. What it cannot avoid
//! is that all exchanges share one TCP connection: a lost packet delays them all, and they share
//! its bandwidth and its kernel buffers in arrival order.
//!
//! - [`messages`]: the prost message (no `protoc`) and the codec.
//! - [`flow`]: flow control per exchange (credit), and the lane that carries it ahead of data.
//! - [`mux`]: what both ends share: outbound queue, control channel, exchange table, bodies from
//!   event queues.
//! - [`exchange`]: exchanges in both directions (the relay's ingress requests, the agent's egress
//!   requests): opening one, and serving one the peer opened.
//! - [`tunnel`]: [`GrpcTunnel`], the [`quictun_core::tunnel::Tunnel`] of one tunnel RPC, the
//!   same at both ends, with its one reader.
//! - `server`: the relay side ([`GrpcListener`]: admission by address before TLS, then TLS,
//!   HTTP/2 and the tunnel RPC under deadlines).
//! - `client`: the agent side ([`GrpcDialer`]).
//! - `transport`: [`Grpc`], the implementation of [`quictun_core::transport::Transport`].
//! - [`floor`]: tonic alone doing the minimal exchange, the floor under the gRPC rows of
//!   `quictun bench`.

mod client;
pub mod exchange;
pub mod floor;
pub mod flow;
pub mod messages;
pub mod mux;
mod server;
mod transport;
pub mod tunnel;

pub use client::{GrpcDialOptions, GrpcDialer};
pub use server::{GrpcBindOptions, GrpcListener};
pub use transport::Grpc;
pub use tunnel::GrpcTunnel;

/// HTTP/2 PINGs, sent by both ends: a peer that answers none for [`PING_TIMEOUT`] after a
/// [`PING_INTERVAL`] of silence is dead, so a dead relay or agent is found within about 3 s (as the
/// QUIC transport's idle timeout finds it), not at TCP's retransmission timeout.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a PING may go unanswered before the connection is closed.
pub const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// HTTP/2 flow-control windows, set on both ends (without them bulk throughput collapses).
pub mod window {
    /// Per-stream window.
    pub const STREAM: u32 = 16 << 20;
    /// Per-connection window.
    pub const CONNECTION: u32 = 64 << 20;
    /// Largest HTTP/2 frame.
    pub const FRAME: u32 = 1 << 20;
}
