//! The relay's side of the gRPC transport.
//!
//! [`serve`] accepts TCP connections, does TLS (the relay's certificate, ALPN `h2`) and HTTP/2 with
//! large flow-control windows in each connection's own task, and answers the tunnel RPC. Each RPC
//! becomes a [`GrpcControl`] and a [`GrpcTunnel`] handed to the caller's `on_agent`, which runs
//! registration and the session exactly as for QUIC.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_core::stall::Reclaimer;
use quictun_core::tunnel::{Admission, Admit, BoxFuture};
use quictun_proto::{CloseCode, Limits};
use tokio::net::TcpListener;
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

/// Longest a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// Called for every tunnel RPC: run registration and the session on these, and drop the
/// connection's [`Admission`] once the agent has registered (or failed to).
pub type OnAgent = Arc<dyn Fn(GrpcControl, Arc<GrpcTunnel>, Admission) + Send + Sync>;

/// What the relay's gRPC listener needs from the relay.
pub struct Listener {
    /// The relay's TLS configuration (ALPN `h2`).
    pub tls: Arc<rustls::ServerConfig>,
    /// Frame limits.
    pub limits: Limits,
    /// Runs registration and the session of each agent.
    pub on_agent: OnAgent,
    /// Admits (or refuses) each new connection.
    pub admit: Admit,
    /// Watches bodies from agents for stalled readers.
    pub stall: Reclaimer,
}

/// Accepts gRPC agents on `listener` until `shutdown`; connections and readers run on `tasks`.
pub async fn serve(listener: TcpListener, setup: Arc<Listener>, shutdown: CancellationToken, tasks: TaskTracker) {
    let acceptor = tokio_rustls::TlsAcceptor::from(setup.tls.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = quictun_core::accept_tcp(&listener, "gRPC") => accepted,
        };
        let Some(admission) = (setup.admit)(peer) else {
            debug!(%peer, "gRPC connection refused: too many not registered yet");
            continue;
        };
        let (acceptor, setup2, shutdown2, tasks2) = (acceptor.clone(), setup.clone(), shutdown.clone(), tasks.clone());
        tasks.spawn(
            async move {
                let tls = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => return debug!(%err, "TLS handshake failed"),
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                serve_connection(tls, peer, setup2, admission, shutdown2, tasks2).await;
            }
            .instrument(info_span!("grpc", %peer)),
        );
    }
}

/// Serves HTTP/2 on one agent connection: its tunnel RPC (one, which must start within
/// [`TLS_TIMEOUT`] of the handshake) until the connection ends.
async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    setup: Arc<Listener>,
    admission: Admission,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let admission = Arc::new(Mutex::new(Some(admission)));
    let started = admission.clone();
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (setup, tasks, admission) = (setup.clone(), tasks.clone(), admission.clone());
        async move {
            if req.uri().path() != crate::messages::CONNECT_PATH {
                return Ok::<_, Infallible>(Status::unimplemented("unknown method").into_http());
            }
            let Some(admission) = admission.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                return Ok(Status::failed_precondition("one tunnel per connection").into_http());
            };
            let mut grpc = Grpc::new(Codec::default()).max_decoding_message_size(crate::messages::MAX_CHUNK * 2);
            let connect = Connect { peer, setup, tasks, admission: Some(admission) };
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
    peer: SocketAddr,
    setup: Arc<Listener>,
    tasks: TaskTracker,
    admission: Option<Admission>,
}

impl StreamingService<TunnelMessage> for Connect {
    type Response = TunnelMessage;
    type ResponseStream = OutboundStream;
    type Future = BoxFuture<'static, Result<tonic::Response<OutboundStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<TunnelMessage>>) -> Self::Future {
        let (outbound, senders) = Outbound::new();
        let (close_tx, close_rx) = oneshot::channel();
        let start = Start {
            end: End::Relay,
            senders,
            closer: Closer::Status(Mutex::new(Some(close_tx))),
            limits: self.setup.limits,
            stall: self.setup.stall.scope(u64::from(EXCHANGE_WINDOW)),
            remote: self.peer,
        };
        let (control, tunnel) = GrpcTunnel::start(start, request.into_inner(), ReaderTask::Tracked(&self.tasks));
        let admission = self.admission.take().unwrap_or_else(|| Box::new(()));
        (self.setup.on_agent)(control, tunnel, admission);
        Box::pin(async move { Ok(tonic::Response::new(OutboundStream { outbound, close: Some(close_rx) })) })
    }
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
