//! The gRPC transport on the agent: dial the relay's gRPC listener with the agent's own TLS
//! verifier (pin or CA, ALPN `h2`), mapping failures to retry or stop.

use std::sync::Arc;
use std::time::Duration;

use quictun_core::control::ControlIo;
use quictun_core::stall::Reclaimer;
use quictun_core::tls::PinVerifier;
use quictun_grpc::GrpcTunnel;
use quictun_grpc::mux::GrpcControl;
use quictun_proto::ControlMessage;
use rustls::pki_types::ServerName;

use crate::session::{Attempt, RetryReason};
use crate::{AgentError, AgentOptions};

/// Longest TCP + TLS + HTTP/2 + the tunnel RPC may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What dialing over gRPC needs, built once.
#[derive(Clone)]
pub struct GrpcSetup {
    tls: Arc<rustls::ClientConfig>,
    pin_verifier: Option<Arc<PinVerifier>>,
}

impl GrpcSetup {
    /// The TLS configuration for `options.trust`, with ALPN `h2`.
    pub fn new(options: &AgentOptions) -> Result<Self, AgentError> {
        let (config, pin_verifier) = quictun_core::tls::client_config_with_alpn(&options.trust, b"h2")
            .map_err(|e| AgentError::Endpoint(e.to_string()))?;
        Ok(Self { tls: Arc::new(config), pin_verifier })
    }
}

/// Dials the relay over gRPC and sends `register` on the control lane.
pub async fn dial(
    options: &AgentOptions,
    setup: &GrpcSetup,
    reclaimer: &Reclaimer,
    register: ControlMessage,
) -> Result<(GrpcControl, Arc<GrpcTunnel>), Attempt> {
    let server_name = ServerName::try_from(options.server_name.clone())
        .map_err(|e| Attempt::Fatal(AgentError::Tls(format!("server name {:?}: {e}", options.server_name))))?;
    let addr = quictun_core::resolve(&options.grpc_relay).await.map_err(RetryReason::from)?;
    let stall = reclaimer.scope(u64::from(quictun_grpc::flow::EXCHANGE_WINDOW));
    match quictun_grpc::client::dial(addr, server_name, setup.tls.clone(), options.limits, DIAL_TIMEOUT, stall).await {
        Ok((mut control, tunnel)) => {
            control.send(register).await.map_err(RetryReason::from)?;
            Ok((control, tunnel))
        }
        Err(err) => {
            if let Some(mismatch) = setup.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
                return Err(Attempt::Fatal(AgentError::PinMismatch(mismatch)));
            }
            if err.is_fatal() {
                return Err(Attempt::Fatal(AgentError::Tls(err.to_string())));
            }
            Err(err.into())
        }
    }
}
