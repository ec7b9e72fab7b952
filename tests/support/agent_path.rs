//! The path between one agent and the relay through a forwarder the test controls, on either
//! transport: a [`UdpProxy`] for QUIC, a [`TcpProxy`] for gRPC.

use std::net::SocketAddr;

use quictun_agent::Transport;

use crate::{TcpProxy, UdpProxy};

/// A controllable path to the relay.
pub enum AgentPath {
    /// QUIC's UDP datagrams.
    Quic(UdpProxy),
    /// gRPC's TCP connection.
    Grpc(TcpProxy),
}

impl AgentPath {
    /// A forwarder to `relay` (the listener of `transport`).
    pub async fn start(transport: Transport, relay: SocketAddr) -> Self {
        match transport {
            Transport::Grpc => Self::Grpc(TcpProxy::start(relay).await),
            _ => Self::Quic(UdpProxy::start(relay).await),
        }
    }

    /// Where the agent dials.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Quic(proxy) => proxy.addr,
            Self::Grpc(proxy) => proxy.addr,
        }
    }

    /// Every packet dropped from now on, both ways, and nothing said to either end: a cable pull, a
    /// dead router, or (on QUIC) a `kill -9` of the agent, which UDP cannot tell the relay about.
    pub fn blackhole(&self) {
        match self {
            Self::Quic(proxy) => proxy.blackhole(),
            Self::Grpc(proxy) => proxy.blackhole(),
        }
    }

    /// What the relay sees when the agent's process is killed (`kill -9`): on QUIC nothing at all
    /// (the path goes silent), on gRPC a reset of its TCP connection (the agent's kernel closes it).
    pub fn kill_agent(&self) {
        match self {
            Self::Quic(proxy) => proxy.blackhole(),
            Self::Grpc(proxy) => proxy.reset(),
        }
    }

    /// Forwards again.
    pub fn restore(&self) {
        match self {
            Self::Quic(proxy) => proxy.restore(),
            Self::Grpc(proxy) => proxy.restore(),
        }
    }
}
