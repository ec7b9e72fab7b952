//! The QUIC transport on the agent: dial and verify the relay (see [`quictun_quic::dial`]), with
//! failures sorted into fatal and retryable.

use std::sync::Arc;

use quictun_core::stall::Reclaimer;
use quictun_quic::QuicTunnel;
use quictun_quic::dial::DialError;
use quictun_quic::endpoint::ClientSetup;
use quictun_quic::frames::ControlChannel;

use quictun_proto::ControlMessage;
use tracing::debug;

use crate::session::Attempt;
use crate::{AgentError, AgentOptions};

/// Dials the relay, verifies it, opens the control stream and sends `register` on it (as 0-RTT
/// data when this process reached the relay before: see [`quictun_quic::dial::dial`]).
pub async fn dial(
    options: &AgentOptions,
    endpoint: &quictun_quic::Endpoint,
    setup: &ClientSetup,
    reclaimer: &Reclaimer,
    register: ControlMessage,
) -> Result<(ControlChannel, Arc<QuicTunnel>), Attempt> {
    let stall = reclaimer.scope(u64::from(options.tuning.stream_window));
    let dialed = async {
        let addr = quictun_core::resolve(&options.relay).await?;
        let timeout = options.quic_handshake_timeout;
        let target = (addr, options.server_name.as_str());
        quictun_quic::dial::dial(endpoint, setup, target, timeout, options.limits, stall, register).await
    };
    match dialed.await {
        Ok(dialed) => {
            debug!(handshake = ?dialed.handshake, "reached the relay");
            Ok((dialed.control, Arc::new(dialed.tunnel)))
        }
        Err(DialError::PinMismatch(mismatch)) => Err(Attempt::Fatal(AgentError::PinMismatch(mismatch))),
        Err(DialError::TimedOut { addr, .. }) => {
            Err(crate::diagnose::why_quic_is_silent(addr, &options.grpc_relay).await.into())
        }
        Err(err) if err.is_fatal() => Err(Attempt::Fatal(AgentError::Tls(err.to_string()))),
        Err(err) => Err(err.into()),
    }
}

/// Whether a QUIC handshake with the relay completes now (the connection is closed at once).
pub async fn probe(options: &AgentOptions, endpoint: &quictun_quic::Endpoint, setup: &ClientSetup) -> bool {
    let Ok(addr) = quictun_core::resolve(&options.relay).await else { return false };
    quictun_quic::dial::probe(endpoint, setup, addr, &options.server_name, options.quic_handshake_timeout).await
}
