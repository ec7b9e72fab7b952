//! The relay's side of the QUIC transport: accepting agents. Each new connection is admitted (or
//! refused) before any cryptography; its handshake and its control stream each have a deadline
//! and run in the connection's own task, never in the accept loop, so a slow or hostile client
//! cannot stall other agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::stall::Reclaimer;
use quictun_core::tunnel::{Admission, Admit};
use quictun_proto::{CloseCode, Limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use crate::frames::ControlChannel;
use crate::tunnel::QuicTunnel;

/// Longest a QUIC handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Called for every agent whose control stream opened: register it and serve its session, and
/// drop its [`Admission`] once it has registered (or failed to).
pub type OnAgent = Arc<dyn Fn(ControlChannel, Arc<QuicTunnel>, Admission) + Send + Sync>;

/// What the accept loop needs from the relay.
pub struct Listener {
    /// Admits (or refuses) each new connection.
    pub admit: Admit,
    /// Registers and serves each agent.
    pub on_agent: OnAgent,
    /// Frame limits.
    pub limits: Limits,
    /// How long a new connection may take to open its control stream.
    pub register_timeout: Duration,
    /// Watches bodies from agents for stalled readers.
    pub stall: Reclaimer,
    /// The stream window (what one stalled body may hold).
    pub stream_window: u64,
    /// Accepts each connection with the transport settings for its path.
    pub acceptor: crate::endpoint::Acceptor,
}

/// Accepts QUIC connections on `endpoint` until `shutdown`; each is served in its own task on
/// `tasks`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    listener: Arc<Listener>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let Some(admission) = (listener.admit)(remote) else {
            incoming.refuse();
            continue;
        };
        let listener = listener.clone();
        tasks.spawn(serve_connection(incoming, remote, admission, listener).instrument(info_span!("agent", %remote)));
    }
    debug!("QUIC accept loop stopped");
}

/// Handshake, control stream, then the agent's session.
async fn serve_connection(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    admission: Admission,
    listener: Arc<Listener>,
) {
    let (connecting, full_packets) = match listener.acceptor.accept(incoming) {
        Ok(accepted) => (accepted.connecting, accepted.full_packets),
        Err(err) => return debug!(%err, %remote, "QUIC connection refused"),
    };
    // The connection is used before its handshake completes, so that a register the agent sent
    // as 0-RTT data is read at once and answered in the same round trip; registration enters the
    // session only once `handshake` completes (see `Tunnel::handshake_complete`), because 0-RTT
    // data can be replayed. On the server side `into_0rtt` always succeeds.
    let (conn, handshake) = match connecting.into_0rtt() {
        Ok((conn, handshake)) => (conn, Some(handshake)),
        Err(connecting) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => (conn, None),
            Ok(Err(err)) => return debug!(%err, %remote, "QUIC handshake failed"),
            Err(_) => return debug!(%remote, "QUIC handshake timed out"),
        },
    };
    let (send, recv) = match tokio::time::timeout(listener.register_timeout, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(err)) => return debug!(%err, "connection closed before the control stream"),
        Err(_) => {
            crate::close(&conn, CloseCode::HandshakeTimeout);
            return debug!("no control stream in time");
        }
    };
    let control = ControlChannel::new(send, recv, listener.limits.max_control_frame);
    let stall = listener.stall.scope(listener.stream_window);
    let tunnel = match handshake {
        Some(handshake) => QuicTunnel::early(conn, handshake, listener.limits, stall),
        None => QuicTunnel::new(conn, listener.limits, stall),
    };
    let conn = tunnel.connection().clone();
    (listener.on_agent)(control, Arc::new(tunnel), admission);
    if let Some(permit) = full_packets {
        // The connection's share of the full-size packet budget goes back when it closes.
        let _reason = conn.closed().await;
        drop(permit);
    }
}
