//! Messages of the control stream: the first bidirectional stream, opened by the agent.
//!
//! Order: the agent sends [`ControlMessage::Register`]; the relay answers
//! [`ControlMessage::Accepted`] or [`ControlMessage::Rejected`] (and closes). After that either side
//! may send heartbeats (answered by an ack that echoes the timestamp), the relay pushes
//! [`ControlMessage::ConfigSync`] when the agent's configuration changes, and either side announces a
//! shutdown with [`ControlMessage::GoAway`]. An agent that declares tunnels sends
//! [`ControlMessage::Claims`] (its whole set, right after registration and again on each change);
//! the relay answers each set with [`ControlMessage::ClaimAnswers`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::secret::Token;

/// One message on the control stream. The bincode variant index is the message number: never
/// reorder, only append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// 0: agent → relay, first message.
    Register(Register),
    /// 1: relay → agent, registration succeeded.
    Accepted(Accepted),
    /// 2: relay → agent, registration failed; the relay then closes the connection.
    Rejected(Rejected),
    /// 3: relay → agent, a new version of the agent's configuration.
    ConfigSync(AgentConfig),
    /// 4: either way, liveness probe.
    Heartbeat(Heartbeat),
    /// 5: either way, answer to a heartbeat (echoes `seq` and `sent_at_us`).
    HeartbeatAck(Heartbeat),
    /// 6: either way, the sender is shutting down and takes no new streams.
    GoAway(GoAway),
    /// 7: agent → relay, every tunnel the agent declares (replacing the set it sent before).
    Claims(Vec<Claim>),
    /// 8: relay → agent, one answer per claim of the last [`ControlMessage::Claims`], in order;
    /// or, after the relay's configuration changed, the claims it no longer grants.
    ClaimAnswers(Vec<ClaimAnswer>),
    /// 9: relay → relay, first message of a connection between two relays of a cluster.
    PeerHello(PeerHello),
    /// 10: relay → relay, the peer was let in; it may open [`crate::Target::Peer`] streams.
    PeerAccepted(PeerAccepted),
}

/// A relay of a cluster, dialing another to forward requests to the agents it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The dialing relay's id.
    pub relay_id: String,
    /// The cluster's shared secret.
    pub token: Token,
}

/// The answer to [`PeerHello`] when its token is the cluster's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAccepted {
    /// The answering relay's id.
    pub relay_id: String,
}

/// A tunnel an agent declares: what it asks the relay to send it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Claim {
    /// 0: HTTP(S) requests for this host name (lower case, no port), as data streams whose
    /// target is [`crate::Target::Http`] (or `Upgrade`) naming the host.
    Http {
        /// The host name.
        host: String,
    },
    /// 1: TCP connections to this port of the relay, as data streams whose target is
    /// [`crate::Target::TcpPort`].
    Tcp {
        /// The relay's port.
        port: u16,
    },
}

impl std::fmt::Display for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http { host } => write!(f, "http {host}"),
            Self::Tcp { port } => write!(f, "tcp port {port}"),
        }
    }
}

/// The relay's answer to one claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The claim answered.
    pub claim: Claim,
    /// `None` when the claim is accepted (the agent serves it until it withdraws it or leaves);
    /// else why it was refused, for a person.
    pub refused: Option<String>,
}

/// The agent introduces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The agent's identity; the relay's session manager is keyed by it.
    pub client_id: String,
    /// The group whose routes the agent serves.
    pub group: String,
    /// The shared secret for `client_id`.
    pub token: Token,
    /// The agent's software version, for logs.
    pub agent_version: String,
    /// Random per agent process, the same for all its reconnects: sessions of one client with
    /// different instance ids are replicas and serve side by side; a new session of the same
    /// instance replaces that instance's old one.
    pub instance_id: Uuid,
}

/// Registration succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Identifies this session in logs on both sides.
    pub session_id: Uuid,
    /// How often each side sends a heartbeat.
    pub heartbeat_interval_ms: u32,
    /// A peer silent for this many heartbeat intervals is dropped, by either side.
    pub heartbeat_misses: u32,
    /// The agent's configuration at the time of registration.
    pub config: AgentConfig,
}

/// Registration failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Why, as a number the agent can act on.
    pub code: RejectCode,
    /// Why, for a person.
    pub message: String,
}

/// Why a registration was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// 0: no client with this id, or the token does not match (one code, so ids cannot be probed).
    BadToken,
    /// 1: the agent speaks another protocol version.
    VersionMismatch,
    /// 2: the client is configured for another group.
    GroupMismatch,
    /// 3: the relay is shutting down.
    ShuttingDown,
    /// 4: the relay could not take the session (for example: at its session limit).
    Unavailable,
    /// 5: the client already has as many instances connected as the relay allows
    /// (`max_instances_per_client`); one may join when another leaves.
    TooManyInstances,
}

impl RejectCode {
    /// True when retrying with the same credentials cannot help (the agent exits instead).
    pub fn is_permanent(self) -> bool {
        matches!(self, Self::BadToken | Self::VersionMismatch | Self::GroupMismatch)
    }
}

/// The configuration a relay pushes to an agent: the upstreams of the agent's group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Increases with every change; an agent ignores a version older than the one it has.
    pub version: u64,
    /// The upstreams the agent may be asked to serve.
    pub upstreams: Vec<UpstreamSpec>,
}

/// One named upstream and its targets, as the agent sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSpec {
    /// The name data streams refer to.
    pub name: String,
    /// Base URLs such as `http://127.0.0.1:3000`, tried in rotation.
    pub targets: Vec<String>,
}

/// A heartbeat or its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Sequence number chosen by the sender of the heartbeat.
    pub seq: u64,
    /// The heartbeat sender's clock, in microseconds since its session started; echoed in the ack.
    pub sent_at_us: u64,
    /// The sender's latest measured round-trip time, so both sides know it.
    pub rtt_us: Option<u64>,
}

/// The sender is shutting down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoAway {
    /// How long in-flight streams have before the connection is closed.
    pub drain_ms: u32,
    /// Why, for logs.
    pub reason: String,
}
