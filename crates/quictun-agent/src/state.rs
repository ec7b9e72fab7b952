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
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Why the last attempt or session ended.
        reason: String,
    },
    /// Stopped (shutdown or fatal error).
    Stopped,
}
