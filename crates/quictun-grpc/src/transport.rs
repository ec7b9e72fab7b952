//! [`Grpc`]: the gRPC transport as [`quictun_core::transport::Transport`] sees it, the relay's
//! [`GrpcListener`] and the agent's [`GrpcDialer`].

use std::net::SocketAddr;

use quictun_core::transport::{BindError, Connection, DialError, HandshakeError, Transport};
use quictun_core::tunnel::TransportKind;
use quictun_proto::{CloseCode, ControlMessage};
use tokio::net::TcpStream;

use crate::client::GrpcDialer;
use crate::mux::GrpcControl;
use crate::server::{GrpcBindOptions, GrpcListener};

/// The gRPC transport: one bidirectional gRPC stream per agent over TCP and TLS, every exchange
/// multiplexed on it.
#[derive(Debug, Clone, Copy)]
pub struct Grpc;

impl Transport for Grpc {
    const KIND: TransportKind = TransportKind::Grpc;
    type Control = GrpcControl;
    type BindOptions = GrpcBindOptions;
    type Listener = GrpcListener;
    type Incoming = TcpStream;
    type Dialer = GrpcDialer;

    async fn bind(options: GrpcBindOptions) -> Result<GrpcListener, BindError> {
        crate::server::bind(options)
    }

    fn local_addr(listener: &GrpcListener) -> SocketAddr {
        listener.local_addr()
    }

    async fn accept(listener: &GrpcListener) -> Option<(TcpStream, SocketAddr)> {
        listener.accept().await
    }

    /// Closed at once (before TLS).
    fn refuse(incoming: TcpStream) {
        drop(incoming);
    }

    async fn handshake(
        listener: &GrpcListener,
        incoming: TcpStream,
    ) -> Result<Connection<GrpcControl>, HandshakeError> {
        listener.handshake(incoming).await
    }

    /// Ends every connection gracefully; the relay closes each tunnel with its code.
    fn close(listener: &GrpcListener, _code: CloseCode) {
        listener.close();
    }

    async fn dial(dialer: &GrpcDialer, first: ControlMessage) -> Result<Connection<GrpcControl>, DialError> {
        dialer.dial(first).await
    }
}
