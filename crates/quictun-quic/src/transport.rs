//! [`Quic`]: the QUIC transport as [`quictun_core::transport::Transport`] sees it, the relay's
//! [`QuicListener`] and the agent's [`QuicDialer`].

use std::net::SocketAddr;

use quictun_core::transport::{BindError, Connection, DialError, HandshakeError, Transport};
use quictun_core::tunnel::TransportKind;
use quictun_proto::{CloseCode, ControlMessage};

use crate::accept::{QuicBindOptions, QuicListener};
use crate::dial::QuicDialer;
use crate::frames::ControlChannel;

/// The QUIC transport: one connection per agent, the control stream and a stream per exchange.
#[derive(Debug, Clone, Copy)]
pub struct Quic;

impl Transport for Quic {
    const KIND: TransportKind = TransportKind::Quic;
    type Control = ControlChannel;
    type BindOptions = QuicBindOptions;
    type Listener = QuicListener;
    type Incoming = quinn::Incoming;
    type Dialer = QuicDialer;

    async fn bind(options: QuicBindOptions) -> Result<QuicListener, BindError> {
        crate::accept::bind(options)
    }

    fn local_addr(listener: &QuicListener) -> SocketAddr {
        listener.local_addr()
    }

    async fn accept(listener: &QuicListener) -> Option<(quinn::Incoming, SocketAddr)> {
        listener.accept().await
    }

    fn refuse(incoming: quinn::Incoming) {
        incoming.refuse();
    }

    async fn handshake(
        listener: &QuicListener,
        incoming: quinn::Incoming,
    ) -> Result<Connection<ControlChannel>, HandshakeError> {
        listener.handshake(incoming).await
    }

    fn close(listener: &QuicListener, code: CloseCode) {
        listener.close(code);
    }

    async fn dial(dialer: &QuicDialer, first: ControlMessage) -> Result<Connection<ControlChannel>, DialError> {
        dialer.dial(first).await
    }
}
