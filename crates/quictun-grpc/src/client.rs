//! The agent's side of the gRPC transport: dial (TCP, TLS with the agent's own verifier, HTTP/2
//! with large windows) and open the tunnel RPC. The tunnel's reader starts at dial time, because
//! registration already needs it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use quictun_core::Trust;
use quictun_core::control::ControlIo;
use quictun_core::stall::{Reclaimer, StallScope};
use quictun_core::tls::{PinVerifier, TlsError};
use quictun_core::transport::{Connection, DialError};
use quictun_proto::{ControlMessage, HostPort, Limits};
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use crate::exchange::End;
use crate::messages::{Codec, TunnelMessage};
use crate::mux::{GrpcControl, Outbound};
use crate::tunnel::{Closer, GrpcTunnel, ReaderTask, Start};
use crate::window;

/// What the agent dials the relay over gRPC with.
pub struct GrpcDialOptions {
    /// How the relay is verified.
    pub trust: Trust,
    /// The relay's gRPC address.
    pub relay: HostPort,
    /// The TLS server name.
    pub server_name: String,
    /// Frame limits.
    pub limits: Limits,
    /// Watches bodies from the relay for stalled readers.
    pub stall: Reclaimer,
}

/// The agent's gRPC dialer: its TLS configuration (the agent's own verifier, ALPN `h2`) and the
/// relay's address.
pub struct GrpcDialer {
    tls: Arc<rustls::ClientConfig>,
    pin_verifier: Option<Arc<PinVerifier>>,
    relay: HostPort,
    server_name: ServerName<'static>,
    limits: Limits,
    stall: Reclaimer,
}

/// Longest TCP + TLS + HTTP/2 + the tunnel RPC may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

impl GrpcDialer {
    /// A dialer with `options`' trust; a server name that is not a DNS name or an address is
    /// refused.
    pub fn new(options: GrpcDialOptions) -> Result<Self, TlsError> {
        let GrpcDialOptions { trust, relay, server_name, limits, stall } = options;
        let (config, pin_verifier) = quictun_core::tls::client_config_with_alpn(&trust, b"h2")?;
        let server_name = ServerName::try_from(server_name.clone()).map_err(|_| TlsError::ServerName(server_name))?;
        Ok(Self { tls: Arc::new(config), pin_verifier, relay, server_name, limits, stall })
    }

    /// Resolves the relay, dials it and sends `first` on the control lane.
    pub(crate) async fn dial(&self, first: ControlMessage) -> Result<Connection<GrpcControl>, DialError> {
        let addr = quictun_core::resolve(&self.relay).await?;
        let stall = self.stall.scope(u64::from(crate::flow::EXCHANGE_WINDOW));
        let dialed = dial(addr, self.server_name.clone(), self.tls.clone(), self.limits, DIAL_TIMEOUT, stall).await;
        let (mut control, tunnel) =
            dialed.map_err(|err| match self.pin_verifier.as_ref().and_then(|v| v.last_mismatch()) {
                Some(mismatch) => DialError::PinMismatch(mismatch),
                None => err,
            })?;
        control.send(first).await.map_err(|e| DialError::Failed {
            what: "registering on the tunnel RPC",
            addr,
            source: e.into(),
        })?;
        Ok(Connection { control, tunnel, early_data: false })
    }
}

/// True when `err`'s chain holds a TLS certificate failure (a rustls error about the
/// certificate, found through the I/O errors that carry it).
fn is_certificate_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        let tls = err
            .downcast_ref::<rustls::Error>()
            .or_else(|| err.downcast_ref::<std::io::Error>()?.get_ref()?.downcast_ref::<rustls::Error>());
        if let Some(tls) = tls {
            return matches!(
                tls,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadCertificate
                            | rustls::AlertDescription::UnsupportedCertificate
                            | rustls::AlertDescription::CertificateRevoked
                            | rustls::AlertDescription::CertificateExpired
                            | rustls::AlertDescription::CertificateUnknown
                            | rustls::AlertDescription::UnknownCA
                            | rustls::AlertDescription::AccessDenied
                            | rustls::AlertDescription::DecryptError
                    )
            );
        }
        next = err.source();
    }
    false
}

/// The agent → relay message stream; ends gracefully (after what is queued) once `ending` fires.
struct EndingStream {
    outbound: Outbound,
    ending: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl tokio_stream::Stream for EndingStream {
    type Item = TunnelMessage;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<TunnelMessage>> {
        if !self.ended && self.ending.as_mut().poll(cx).is_ready() {
            self.ended = true;
            self.outbound.close();
        }
        self.outbound.poll_next(cx)
    }
}

use std::future::Future as _;

/// A gRPC client of the tunnel's carrier, connected and ready: TCP (no Nagle), TLS with `tls`,
/// HTTP/2 with the transport's windows and PINGs. Used by the agent's dial and by the floor.
pub async fn connect_grpc(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<tonic::client::Grpc<tonic::transport::Channel>, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (tls, server_name) = (tls.clone(), server_name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("https://quictun-relay")
        .connect_timeout(timeout)
        .initial_stream_window_size(window::STREAM)
        .initial_connection_window_size(window::CONNECTION)
        .http2_keep_alive_interval(crate::PING_INTERVAL)
        .keep_alive_timeout(crate::PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(crate::messages::MAX_CHUNK * 2);
    grpc.ready().await?;
    Ok(grpc)
}

/// Dials the relay's gRPC listener and opens the tunnel RPC. Bodies from the relay are watched
/// for stalled readers in `stall`.
async fn dial(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    limits: Limits,
    timeout: Duration,
    stall: StallScope,
) -> Result<(GrpcControl, Arc<GrpcTunnel>), DialError> {
    let connect_err = |err: &(dyn std::error::Error + 'static)| {
        let message = quictun_core::error_chain(err);
        if is_certificate_error(err) {
            DialError::Certificate(message.into())
        } else {
            DialError::Failed { what: "gRPC connection", addr, source: message.into() }
        }
    };
    let mut grpc = connect_grpc(addr, server_name, tls, timeout).await.map_err(|e| connect_err(&e))?;
    let (outbound, senders) = Outbound::new();
    let ending = CancellationToken::new();
    let request = tonic::Request::new(EndingStream {
        outbound,
        ending: Box::pin(ending.clone().cancelled_owned()),
        ended: false,
    });
    let path = PathAndQuery::from_static(crate::messages::CONNECT_PATH);
    let rpc_failed =
        |source: quictun_core::transport::BoxError| DialError::Failed { what: "the tunnel RPC", addr, source };
    let response = tokio::time::timeout(timeout, grpc.streaming(request, path, Codec::default()))
        .await
        .map_err(|_| rpc_failed("no answer in time".into()))?
        .map_err(|status| rpc_failed(status.message().to_owned().into()))?;
    let start = Start { end: End::Agent, senders, closer: Closer::EndStream(ending), limits, stall, remote: addr };
    Ok(GrpcTunnel::start(start, response.into_inner(), ReaderTask::Owned))
}
