//! Reaching the relay over either transport: each transport's dialer, built once from the
//! options, and one [`dial`] for both that sorts every failure into fatal (stop the agent) or
//! retryable (back off and try again).

use quictun_core::stall::Reclaimer;
use quictun_core::transport::{Connection, DialError, Transport};
use quictun_core::tunnel::TransportKind;
use quictun_grpc::{GrpcDialOptions, GrpcDialer};
use quictun_proto::ControlMessage;
use quictun_quic::{QuicDialOptions, QuicDialer, QuicEndpoint};

use crate::AgentOptions;
use crate::error::AgentError;
use crate::session::{Attempt, RetryReason};

/// The agent's dialer of each transport.
pub struct Dialers {
    /// QUIC, from the agent's endpoint.
    pub quic: QuicDialer,
    /// gRPC over TCP and TLS.
    pub grpc: GrpcDialer,
}

impl Dialers {
    /// The dialers for `options`, QUIC's from `endpoint`; bodies from the relay are watched for
    /// stalled readers by `reclaimer`.
    pub fn new(options: &AgentOptions, endpoint: QuicEndpoint, reclaimer: &Reclaimer) -> Result<Self, AgentError> {
        let quic = QuicDialer::new(QuicDialOptions {
            endpoint,
            trust: options.trust.clone(),
            tuning: options.tuning.clone(),
            relay: options.relay.clone(),
            server_name: options.server_name.clone(),
            handshake_timeout: options.quic_handshake_timeout,
            limits: options.limits,
            stall: reclaimer.clone(),
        })?;
        let grpc = GrpcDialer::new(GrpcDialOptions {
            trust: options.trust.clone(),
            relay: options.grpc_relay.clone(),
            server_name: options.server_name.clone(),
            limits: options.limits,
            stall: reclaimer.clone(),
        })?;
        Ok(Self { quic, grpc })
    }
}

/// Dials the relay over `T` and sends `register` (as 0-RTT data when QUIC resumes a session
/// with a relay this process reached before). A wrong pin, a refused certificate or an address
/// this host cannot dial stops the agent; anything else is retried. A QUIC dial that gets no
/// answer at all is diagnosed first (see [`crate::diagnose`]): the reason says whether UDP is
/// blocked, the port is the relay's HTTP port, or nothing answers.
pub async fn dial<T: Transport>(
    dialer: &T::Dialer,
    register: ControlMessage,
    options: &AgentOptions,
) -> Result<Connection<T::Control>, Attempt> {
    match T::dial(dialer, register).await {
        Ok(connection) => {
            tracing::debug!(transport = %T::KIND, early_data = connection.early_data, "reached the relay");
            Ok(connection)
        }
        Err(DialError::PinMismatch(mismatch)) => Err(Attempt::Fatal(AgentError::PinMismatch(mismatch))),
        Err(DialError::TimedOut { transport: TransportKind::Quic, addr, .. }) => {
            Err(crate::diagnose::why_quic_is_silent(addr, &options.grpc_relay).await.into())
        }
        Err(err) if err.is_fatal() => Err(Attempt::Fatal(AgentError::Tls(err))),
        Err(source) => Err(RetryReason::Dial { transport: T::KIND, source }.into()),
    }
}
