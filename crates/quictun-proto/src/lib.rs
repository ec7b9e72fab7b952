//! The quictun wire protocol, with no networking in it.
//!
//! Everything that crosses the QUIC connection between a relay and an agent is defined here:
//!
//! - [`frame`]: length-prefixed bincode framing. A length from the wire is checked against its limit
//!   before anything is allocated, and decoders tell "need more bytes" from "invalid".
//! - [`control`]: the messages of the control stream (register, accepted/rejected, config_sync,
//!   heartbeat, go-away).
//! - [`stream`]: the head frames of a data stream (one QUIC stream per proxied request).
//! - [`datagram`]: a flow's datagrams, tagged with the flow's id.
//! - [`codes`]: the numbered application error codes used to reset streams and close connections.
//! - [`limits`]: the bounds every decoder enforces.
//! - [`secret`]: a token type whose `Debug` never shows the secret.
//!
//! The relay and the agent drive these types; this crate only encodes, decodes and validates.

pub mod codes;
pub mod control;
pub mod datagram;
pub mod frame;
pub mod host_port;
pub mod limits;
pub mod secret;
pub mod stream;

pub use codes::{CloseCode, StreamCode};
pub use control::{
    Accepted, AgentConfig, Claim, ClaimAnswer, ControlMessage, GoAway, Heartbeat, PeerAccepted, PeerHello, Register,
    RejectCode, Rejected, UpstreamSpec,
};
pub use frame::FrameError;
pub use host_port::{HostPort, HostPortError};
pub use limits::Limits;
pub use secret::Token;
pub use stream::{
    BodyFrameHeader, HeadError, Header, PeerRequest, RequestHead, ResponseHead, Target, Trailers, UdpFlow,
};

/// The ALPN protocol identifier both sides must negotiate.
pub const ALPN: &[u8] = b"quictun/1";

/// The protocol version an agent announces in [`Register`]. The relay rejects any other.
///
/// 2: the gRPC transport's per-exchange flow control (credit and stop messages, without which a
/// version-1 peer would never be granted more than a window), and head frames that may carry the
/// headers the relay adds on top of a client's 128 ([`limits::ADDED_HEADERS`]).
///
/// 3: [`Accepted`] carries the heartbeat misses both ends apply, so the relay sets the silence
/// limit for both; a request head names its [`Target`] by kind (an upstream, a `host:port`, the
/// relay's egress routes) instead of a kind and an overloaded string.
///
/// 4: [`Register`] carries the agent process's instance id, so that replicas sharing a client id
/// serve side by side (and a relay may refuse one more with [`RejectCode::TooManyInstances`]).
pub const PROTOCOL_VERSION: u16 = 4;
