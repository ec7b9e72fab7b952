//! Why no QUIC handshake completed: a QUIC dial that times out looks the same whether the relay
//! is down, a firewall drops UDP, or the address is the relay's HTTP port. Two TCP probes tell
//! them apart, so that the agent says what is wrong (and falls back to gRPC only when that is
//! the cure).

use std::net::SocketAddr;
use std::time::Duration;

use quictun_proto::HostPort;
use tokio::net::TcpStream;

/// How long each TCP probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probes found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicSilence {
    /// Something answers TCP on the very address QUIC was sent to: most likely the relay's HTTP
    /// (or another TCP) port was given where its QUIC port belongs.
    #[error(
        "{addr} answers over TCP but not over QUIC: is {port} the relay's HTTP port? QUIC listens on UDP (4433 unless relay.quic_listen says otherwise; the relay prints its udp:// address)",
        port = addr.port()
    )]
    TcpOnThatPort {
        /// The address dialed.
        addr: SocketAddr,
    },
    /// The relay's gRPC port answers over TCP while QUIC gets no answer: UDP is blocked on the
    /// way (or the relay does not serve QUIC).
    #[error(
        "no QUIC answer from {quic} while the relay's gRPC port {grpc} answered over TCP (UDP blocked on the way, the relay restarting, or {} not its QUIC port: the relay prints its udp:// address)",
        quic.port()
    )]
    UdpBlocked {
        /// The QUIC address.
        quic: SocketAddr,
        /// The gRPC address that answered.
        grpc: SocketAddr,
    },
    /// Nothing answers at all.
    #[error("the relay at {quic} is unreachable: no QUIC answer, and its gRPC port {grpc} {why}")]
    Unreachable {
        /// The QUIC address.
        quic: SocketAddr,
        /// The gRPC `host:port` probed.
        grpc: HostPort,
        /// What the TCP probe got.
        why: String,
    },
}

impl QuicSilence {
    /// True when gRPC over TCP is the cure (the relay is there, UDP is not getting through).
    pub fn calls_for_grpc(&self) -> bool {
        matches!(self, Self::UdpBlocked { .. })
    }
}

/// Probes the relay after the QUIC handshake with `quic` got no answer.
pub async fn why_quic_is_silent(quic: SocketAddr, grpc: &HostPort) -> QuicSilence {
    if tcp_answers(quic).await.is_ok() {
        return QuicSilence::TcpOnThatPort { addr: quic };
    }
    let grpc_addr = match quictun_core::resolve(grpc).await {
        Ok(addr) => addr,
        Err(err) => {
            return QuicSilence::Unreachable { quic, grpc: grpc.clone(), why: format!("does not resolve ({err})") };
        }
    };
    match tcp_answers(grpc_addr).await {
        Ok(()) => QuicSilence::UdpBlocked { quic, grpc: grpc_addr },
        Err(why) => QuicSilence::Unreachable { quic, grpc: grpc.clone(), why },
    }
}

/// Whether a TCP connection to `addr` is accepted, or what happened instead.
async fn tcp_answers(addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(_connected)) => Ok(()),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("refuses TCP connections (nothing listens there)".into())
        }
        Ok(Err(err)) => Err(format!("cannot be reached over TCP either ({err})")),
        Err(_) => Err(format!("does not answer over TCP either (within {} s)", PROBE_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tells_a_tcp_port_a_blocked_udp_path_and_a_dead_host_apart() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        // A UDP port nobody listens on (QUIC there gets no answer).
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let closed = {
            let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            probe.local_addr().unwrap()
        };
        let grpc_up: HostPort = tcp_addr.to_string().parse().unwrap();
        let grpc_down: HostPort = closed.to_string().parse().unwrap();

        let wrong_port = why_quic_is_silent(tcp_addr, &grpc_down).await;
        assert_eq!(wrong_port, QuicSilence::TcpOnThatPort { addr: tcp_addr });
        assert!(wrong_port.to_string().contains("HTTP port"), "{wrong_port}");

        let blocked = why_quic_is_silent(silent, &grpc_up).await;
        assert!(blocked.calls_for_grpc(), "{blocked}");

        let dead = why_quic_is_silent(silent, &grpc_down).await;
        assert!(matches!(dead, QuicSilence::Unreachable { .. }) && !dead.calls_for_grpc(), "{dead}");
        assert!(dead.to_string().contains("nothing listens"), "{dead}");
    }
}
