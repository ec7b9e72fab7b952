//! The agent's side of the gRPC transport: dial (TCP, TLS with the agent's own verifier, HTTP/2
//! with large windows) and open the tunnel RPC. The tunnel's reader starts at dial time, because
//! registration already needs it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use quictun_core::stall::StallScope;
use quictun_proto::Limits;
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;

use crate::exchange::End;
use crate::messages::{Codec, TunnelMessage};
use crate::mux::{GrpcControl, Outbound};
use crate::tunnel::{Closer, GrpcTunnel, ReaderTask, Start};
use crate::window;

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The relay's certificate was refused by the agent's verifier (or the relay refused ours).
    #[error("TLS with {addr}: {message}")]
    Certificate {
        /// The relay's address.
        addr: SocketAddr,
        /// The verifier's verdict, with its causes.
        message: String,
    },
    /// TCP, TLS or HTTP/2 failed otherwise.
    #[error("connecting to {addr}: {message}")]
    Connect {
        /// The relay's address.
        addr: SocketAddr,
        /// What failed, with its causes.
        message: String,
    },
    /// The relay refused the tunnel RPC.
    #[error("tunnel RPC refused: {0}")]
    Rpc(String),
}

impl DialError {
    /// True when retrying cannot help (the certificate was refused).
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Certificate { .. })
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
pub async fn dial(
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
            DialError::Certificate { addr, message }
        } else {
            DialError::Connect { addr, message }
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
    let response = tokio::time::timeout(timeout, grpc.streaming(request, path, Codec::default()))
        .await
        .map_err(|_| DialError::Rpc("no answer in time".into()))?
        .map_err(|status| DialError::Rpc(status.message().to_owned()))?;
    let start = Start { end: End::Agent, senders, closer: Closer::EndStream(ending), limits, stall, remote: addr };
    Ok(GrpcTunnel::start(start, response.into_inner(), ReaderTask::Owned))
}
