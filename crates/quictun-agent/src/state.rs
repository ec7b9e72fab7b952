//! What the agent is doing now (watched through `Agent::state`).

use std::net::SocketAddr;

use uuid::Uuid;

/// What the agent is doing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Dialing or registering.
    Connecting,
    /// Registered and serving.
    Connected {
        /// The session id the relay assigned.
        session_id: Uuid,
        /// The relay's address.
        relay: SocketAddr,
        /// `QUIC` or `gRPC`.
        transport: &'static str,
    },
    /// QUIC kept getting no answer while the relay's gRPC port answered: going over gRPC (QUIC
    /// is probed again in the background).
    FallingBack {
        /// What was observed.
        reason: String,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Why the last attempt or session ended.
        reason: String,
    },
    /// Stopped (shutdown or fatal error).
    Stopped,
}
