//! One trait per transport, from bind to dial (the shape of rathole's `Transport`): the relay
//! binds a listener and takes each new connection's address first, so that it can be refused
//! before any cryptography, then completes its handshake; the agent dials. Either way the result
//! is the same [`Connection`]: the control channel, the [`Tunnel`], and whether the first control
//! message came as early (0-RTT) data.
//!
//! Each transport (`quictun_quic::Quic`, `quictun_grpc::Grpc`) implements [`Transport`] once.
//! Admission (what a new connection may hold before it registers) is the relay's, applied the
//! same way whatever the transport; this trait only gives it the address to decide on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_proto::{CloseCode, ControlMessage};

use crate::ResolveError;
use crate::control::ControlIo;
use crate::tls::PinMismatch;
use crate::tunnel::{TransportKind, Tunnel};

/// An error from a library, kept as the source of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection a transport established between a relay and an agent.
pub struct Connection<C> {
    /// Its control channel; the agent's first message (register) is on it.
    pub control: C,
    /// Its tunnel.
    pub tunnel: Arc<dyn Tunnel>,
    /// The first control message travelled as early (0-RTT) data, before the handshake
    /// completed: it may be a replay until [`Tunnel::handshake_complete`] says otherwise.
    pub early_data: bool,
}

/// A transport: how the relay accepts tunnels and how the agent dials them.
pub trait Transport: Send + Sync + 'static {
    /// Which transport this is.
    const KIND: TransportKind;
    /// The control channel of each connection.
    type Control: ControlIo + 'static;
    /// What the relay binds a listener with (its address, identity, limits, deadlines).
    type BindOptions: Send;
    /// A bound listener, the relay's.
    type Listener: Send + Sync + 'static;
    /// A new connection the listener received, not yet through its handshake.
    type Incoming: Send + 'static;
    /// What the agent dials with (its socket or TLS setup, the relay's address and name).
    type Dialer: Send + Sync + 'static;

    /// Binds a listener.
    fn bind(options: Self::BindOptions) -> impl Future<Output = Result<Self::Listener, BindError>> + Send;

    /// The listener's bound address.
    fn local_addr(listener: &Self::Listener) -> SocketAddr;

    /// The next new connection and its peer's address; `None` once the listener is closed.
    /// Cancel-safe.
    fn accept(listener: &Self::Listener) -> impl Future<Output = Option<(Self::Incoming, SocketAddr)>> + Send;

    /// Turns a new connection away, before any cryptography.
    fn refuse(incoming: Self::Incoming);

    /// Completes an admitted connection: its handshake, its control channel and its tunnel,
    /// each under the listener's deadlines.
    fn handshake(
        listener: &Self::Listener,
        incoming: Self::Incoming,
    ) -> impl Future<Output = Result<Connection<Self::Control>, HandshakeError>> + Send;

    /// Closes the listener, and every connection it accepted, with `code`.
    fn close(listener: &Self::Listener, code: CloseCode);

    /// Dials the relay, verifies it, opens the control channel and sends `first` on it.
    fn dial(
        dialer: &Self::Dialer,
        first: ControlMessage,
    ) -> impl Future<Output = Result<Connection<Self::Control>, DialError>> + Send;
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("{transport} listener on {addr}: {source}")]
pub struct BindError {
    /// Which transport.
    pub transport: TransportKind,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: BoxError,
}

/// A new connection whose handshake did not complete (logged, and the connection dropped).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// It did not complete in time.
    #[error("no {what} within {after:?}")]
    TimedOut {
        /// What did not arrive (the handshake, the control stream, the tunnel RPC).
        what: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// It failed.
    #[error("{what}: {source}")]
    Failed {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: BoxError,
    },
}

/// Why dialing the relay failed. [`DialError::is_fatal`] says whether another attempt can help.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The relay's name did not resolve.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The relay's certificate does not match the pin.
    #[error(transparent)]
    PinMismatch(#[from] PinMismatch),
    /// The relay's certificate was refused (CA mode: not valid for the name, or not signed by the
    /// CA).
    #[error("the relay's certificate was refused: {0}")]
    Certificate(#[source] BoxError),
    /// No handshake in time: nothing answers at that address, or the path drops the packets.
    #[error("no {transport} handshake with {addr} after {:.1} s", after.as_secs_f64())]
    TimedOut {
        /// Which transport.
        transport: TransportKind,
        /// The relay's address.
        addr: SocketAddr,
        /// How long it waited.
        after: Duration,
    },
    /// The relay refused the connection (it is at a limit, or shutting down).
    #[error("the relay at {0} refused the connection")]
    Refused(SocketAddr),
    /// The local end cannot dial that address at all.
    #[error("cannot dial {addr}: {source}")]
    Unreachable {
        /// The relay's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The connection failed otherwise (refused by the network, reset, a protocol error).
    #[error("{what} with {addr}: {source}")]
    Failed {
        /// What failed (the handshake, the control stream, the tunnel RPC).
        what: &'static str,
        /// The relay's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: BoxError,
    },
}

impl DialError {
    /// True when retrying cannot help: the relay's certificate does not match, or the local end
    /// cannot dial the address at all.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::PinMismatch(_) | Self::Certificate(_) | Self::Unreachable { .. })
    }
}
