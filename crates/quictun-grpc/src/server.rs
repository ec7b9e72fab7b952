//! The relay's side of the gRPC transport: a TCP listener whose new connections are offered to
//! the relay's admission first (by address, before TLS), then do TLS (the relay's certificate,
//! ALPN `h2`) and HTTP/2 with large flow-control windows in the connection's own task, and must
//! open the tunnel RPC in time. Each RPC becomes a [`GrpcControl`] and a [`GrpcTunnel`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_core::stall::Reclaimer;
use quictun_core::transport::{BindError, Connection, HandshakeError};
use quictun_core::tunnel::TransportKind;
use quictun_proto::{CloseCode, Limits};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::server::{Grpc, StreamingService};
use tracing::{Instrument, debug, info_span};

use crate::exchange::End;
use crate::flow::EXCHANGE_WINDOW;
use crate::messages::{Codec, TunnelMessage, close_status};
use crate::mux::{GrpcControl, Outbound};
use crate::tunnel::{Closer, GrpcTunnel, ReaderTask, Start};
use crate::window;

/// Longest a TLS handshake may take, and then the tunnel RPC.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay binds its gRPC listener with.
pub struct GrpcBindOptions {
    /// The TCP address.
    pub addr: SocketAddr,
    /// The relay's TLS configuration (ALPN `h2`).
    pub tls: Arc<rustls::ServerConfig>,
    /// Frame limits.
    pub limits: Limits,
    /// Watches bodies from agents for stalled readers.
    pub stall: Reclaimer,
    /// Where each connection's HTTP/2 task runs.
    pub tasks: TaskTracker,
    /// Ends every connection gracefully (HTTP/2 GOAWAY, the tunnel RPC finishing) when cancelled.
    pub shutdown: CancellationToken,
}

/// The relay's gRPC listener.
pub struct GrpcListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    limits: Limits,
    stall: Reclaimer,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A tunnel RPC handed from a connection's HTTP/2 task to its handshake.
type Handover = (GrpcControl, Arc<GrpcTunnel>);

/// Binds the relay's gRPC listener.
pub fn bind(options: GrpcBindOptions) -> Result<GrpcListener, BindError> {
    let GrpcBindOptions { addr, tls, limits, stall, tasks, shutdown } = options;
    let failed = |source: std::io::Error| BindError { transport: TransportKind::Grpc, addr, source: source.into() };
    let listener = quictun_core::listen_tcp(addr).map_err(failed)?;
    let local_addr = listener.local_addr().map_err(failed)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(GrpcListener { listener, local_addr, acceptor, limits, stall, tasks, shutdown })
}

impl GrpcListener {
    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next TCP connection and its peer.
    pub(crate) async fn accept(&self) -> Option<(TcpStream, SocketAddr)> {
        Some(quictun_core::accept_tcp(&self.listener, "gRPC").await)
    }

    /// TLS, then HTTP/2 in the connection's own task, until the agent opens the tunnel RPC (both
    /// under [`TLS_TIMEOUT`]).
    pub(crate) async fn handshake(&self, tcp: TcpStream) -> Result<Connection<GrpcControl>, HandshakeError> {
        let peer = tcp.peer_addr().map_err(|e| HandshakeError::Failed { what: "TCP connection", source: e.into() })?;
        let tls = match tokio::time::timeout(TLS_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => return Err(HandshakeError::Failed { what: "TLS handshake", source: err.into() }),
            Err(_) => return Err(HandshakeError::TimedOut { what: "TLS handshake", after: TLS_TIMEOUT }),
        };
        let (handover, tunnel_rpc) = oneshot::channel();
        let setup = ConnectionSetup {
            peer,
            limits: self.limits,
            stall: self.stall.clone(),
            tasks: self.tasks.clone(),
            handover: Arc::new(Mutex::new(Some(handover))),
        };
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(serve_connection(tls, setup, shutdown).instrument(info_span!("grpc", %peer)));
        match tokio::time::timeout(TLS_TIMEOUT, tunnel_rpc).await {
            Ok(Ok((control, tunnel))) => Ok(Connection { control, tunnel, early_data: false }),
            Ok(Err(_)) => Err(HandshakeError::Failed {
                what: "HTTP/2 connection",
                source: "it ended before the tunnel RPC".into(),
            }),
            Err(_) => Err(HandshakeError::TimedOut { what: "tunnel RPC", after: TLS_TIMEOUT }),
        }
    }

    /// Ends every connection gracefully.
    pub fn close(&self) {
        self.shutdown.cancel();
    }
}

/// What one connection's HTTP/2 task needs.
struct ConnectionSetup {
    peer: SocketAddr,
    limits: Limits,
    stall: Reclaimer,
    tasks: TaskTracker,
    /// Where its (one) tunnel RPC goes; empty once it went.
    handover: Arc<Mutex<Option<oneshot::Sender<Handover>>>>,
}

/// Serves HTTP/2 on one agent connection: its tunnel RPC (one, which must start within
/// [`TLS_TIMEOUT`] of the handshake) until the connection ends.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    setup: ConnectionSetup,
    shutdown: CancellationToken,
) {
    let started = setup.handover.clone();
    let setup = Arc::new(setup);
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let setup = setup.clone();
        async move {
            if req.uri().path() != crate::messages::CONNECT_PATH {
                return Ok::<_, Infallible>(Status::unimplemented("unknown method").into_http());
            }
            let Some(handover) = setup.handover.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                return Ok(Status::failed_precondition("one tunnel per connection").into_http());
            };
            let mut grpc = Grpc::new(Codec::default()).max_decoding_message_size(crate::messages::MAX_CHUNK * 2);
            let connect = Connect { setup: setup.clone(), handover: Some(handover) };
            Ok(grpc.streaming(connect, req).await)
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(window::STREAM)
        .initial_connection_window_size(window::CONNECTION)
        .max_frame_size(window::FRAME)
        .keep_alive_interval(Some(crate::PING_INTERVAL))
        .keep_alive_timeout(crate::PING_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    // Resolves when the tunnel RPC has not started in time (and never once it has).
    let no_tunnel_yet = async {
        tokio::time::sleep(TLS_TIMEOUT).await;
        if started.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            std::future::pending::<()>().await;
        }
    };
    // `quictun_core::edge::serve::serve_with_drain` with a third way out; written here because
    // the generic helper's future cannot be proven `Send` for hyper's HTTP/2 connection type.
    tokio::pin!(conn);
    let result = tokio::select! {
        result = &mut conn => result,
        () = no_tunnel_yet => return debug!("no tunnel RPC in time: connection closed"),
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        debug!(%err, "gRPC connection ended with an error");
    }
}

/// The tunnel RPC of one agent connection.
struct Connect {
    setup: Arc<ConnectionSetup>,
    handover: Option<oneshot::Sender<Handover>>,
}

impl StreamingService<TunnelMessage> for Connect {
    type Response = TunnelMessage;
    type ResponseStream = OutboundStream;
    type Future = quictun_core::tunnel::BoxFuture<'static, Result<tonic::Response<OutboundStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<TunnelMessage>>) -> Self::Future {
        let (outbound, senders) = Outbound::new();
        let (close_tx, close_rx) = oneshot::channel();
        let start = Start {
            end: End::Relay,
            senders,
            closer: Closer::Status(Mutex::new(Some(close_tx))),
            limits: self.setup.limits,
            stall: self.setup.stall.scope(u64::from(EXCHANGE_WINDOW)),
            remote: self.setup.peer,
        };
        let (control, tunnel) = GrpcTunnel::start(start, request.into_inner(), ReaderTask::Tracked(&self.setup.tasks));
        if let Some(handover) = self.handover.take()
            && handover.send((control, tunnel.clone())).is_err()
        {
            // The handshake gave up waiting: nobody will serve this tunnel.
            tunnel_closed(&tunnel);
        }
        Box::pin(async move { Ok(tonic::Response::new(OutboundStream { outbound, close: Some(close_rx) })) })
    }
}

/// Closes a tunnel nobody took.
fn tunnel_closed(tunnel: &GrpcTunnel) {
    quictun_core::tunnel::Tunnel::close(tunnel, CloseCode::HandshakeTimeout);
}

/// The relay → agent message stream: queued messages, ended early by a close.
pub struct OutboundStream {
    outbound: Outbound,
    close: Option<oneshot::Receiver<CloseCode>>,
}

impl Stream for OutboundStream {
    type Item = Result<TunnelMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(close) = self.close.as_mut()
            && let Poll::Ready(code) = Pin::new(close).poll(cx)
        {
            self.close = None;
            self.outbound.close();
            return Poll::Ready(code.ok().map(|code| Err(close_status(code))));
        }
        self.outbound.poll_next(cx).map(|m| m.map(Ok))
    }
}

use std::future::Future as _;
