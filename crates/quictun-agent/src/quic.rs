//! The QUIC transport on the agent: dial and verify the relay, and serve each stream the relay
//! opens (head frame, forward, response head, streamed body).

use std::net::SocketAddr;
use std::sync::Arc;

use quictun_core::endpoint::ClientSetup;
use quictun_core::framed::ControlChannel;
use quictun_core::link::{BoxFuture, RelayConnection, RequestHandler};
use quictun_core::stall::{Reclaimer, StallScope};
use quictun_proto::CloseCode;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::Attempt;
use crate::{AgentError, AgentOptions};

async fn resolve(relay: &str) -> Result<SocketAddr, Attempt> {
    let mut addrs =
        tokio::net::lookup_host(relay).await.map_err(|e| Attempt::Retry(format!("resolving {relay}: {e}")))?;
    addrs.next().ok_or_else(|| Attempt::Retry(format!("{relay} resolved to no address")))
}

/// Dials the relay, verifies it, and opens the control stream.
pub async fn dial(
    options: &AgentOptions,
    endpoint: &quinn::Endpoint,
    setup: &ClientSetup,
    reclaimer: &Reclaimer,
) -> Result<(ControlChannel, QuicRelay), Attempt> {
    let addr = resolve(&options.relay).await?;
    let connecting = endpoint
        .connect_with(setup.config.clone(), addr, &options.server_name)
        .map_err(|e| Attempt::Fatal(AgentError::Endpoint(format!("cannot dial {addr}: {e}"))))?;
    let handshake_timeout = options.quic_handshake_timeout;
    let conn = match tokio::time::timeout(handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            if let Some(mismatch) = setup.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
                return Err(Attempt::Fatal(AgentError::PinMismatch(mismatch)));
            }
            let text = err.to_string();
            if text.contains("certificate") {
                return Err(Attempt::Fatal(AgentError::Tls(text)));
            }
            return Err(Attempt::Retry(format!("QUIC handshake with {addr}: {text}")));
        }
        Err(_) => {
            return Err(Attempt::Retry(format!("QUIC handshake with {addr} timed out after {handshake_timeout:?}")));
        }
    };
    let (send, recv) = conn.open_bi().await.map_err(|e| Attempt::Retry(format!("opening the control stream: {e}")))?;
    let stall = reclaimer.scope(u64::from(options.tuning.stream_window));
    let control = ControlChannel::new(send, recv, options.limits.max_control_frame);
    Ok((control, QuicRelay { conn, limits: options.limits, stall }))
}

/// Whether a QUIC handshake with the relay completes now (the connection is closed at once).
pub async fn probe(options: &AgentOptions, endpoint: &quinn::Endpoint, setup: &ClientSetup) -> bool {
    let Ok(addr) = resolve(&options.relay).await else { return false };
    let Ok(connecting) = endpoint.connect_with(setup.config.clone(), addr, &options.server_name) else { return false };
    match tokio::time::timeout(options.quic_handshake_timeout, connecting).await {
        Ok(Ok(conn)) => {
            quictun_core::close(&conn, CloseCode::Normal);
            true
        }
        _ => false,
    }
}

/// A connection to the relay over QUIC.
#[derive(Debug)]
pub struct QuicRelay {
    conn: quinn::Connection,
    limits: quictun_proto::Limits,
    stall: StallScope,
}

impl RelayConnection for QuicRelay {
    fn serve_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, String> {
        Box::pin(quictun_core::quic_link::serve_streams(&self.conn, handler, tasks, cancel, &self.stall))
    }

    fn close(&self, code: CloseCode) {
        quictun_core::close(&self.conn, code);
    }

    fn peer_close_code(&self) -> Option<CloseCode> {
        self.conn.close_reason().and_then(|err| quictun_core::peer_close_code(&err))
    }

    fn remote_addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    fn egress_link(&self) -> Option<Arc<dyn quictun_core::link::AgentLink>> {
        Some(Arc::new(quictun_core::quic_link::QuicLink::new(self.conn.clone(), self.limits, self.stall.clone())))
    }
}
