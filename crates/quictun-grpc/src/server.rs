//! The relay's side of the gRPC transport.
//!
//! [`serve`] accepts TCP connections, does TLS (the relay's certificate, ALPN `h2`) and HTTP/2 with
//! large flow-control windows in each connection's own task, and answers the tunnel RPC. Each RPC
//! becomes a [`GrpcControl`] and a [`GrpcLink`] handed to the caller's `on_agent`, which runs
//! registration and the session exactly as for QUIC.
//!
//! As in the seeds' design, all exchanges of an agent share one stream: the relay numbers them,
//! keeps a table of their event queues (request_id → bounded sender, the seeds' DashMap), and a
//! reader task that never waits on request handling demultiplexes the agent's messages into them.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_core::link::{AgentLink, BoxFuture, LinkError, RequestHandler, TunnelBody};
use quictun_core::stall::Reclaimer;
use quictun_proto::frame;
use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, ResponseHead};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::server::{Grpc, StreamingService};
use tracing::{Instrument, debug, info_span};

use crate::exchange::{End, Exchanges, IncomingExchange};
use crate::flow::EXCHANGE_WINDOW;
use crate::messages::{Codec, Payload, TunnelMessage, close_status};
use crate::mux::{CONTROL_QUEUE, GrpcControl, OUTBOUND_QUEUE, Outbound};
use crate::window;

/// Longest a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closed tunnel's request stream is kept for the agent to read the close status.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Called for every tunnel RPC: run registration and the session on these, and drop the
/// connection's [`Admission`] once the agent has registered (or failed to).
pub type OnAgent = Arc<dyn Fn(GrpcControl, Arc<GrpcLink>, Admission) + Send + Sync>;

/// A new connection's place among those not registered yet, held until it registers.
pub type Admission = Box<dyn std::any::Any + Send + Sync>;

/// Asked for every accepted connection: its place among those not registered yet, or `None` to
/// refuse it at once.
pub type Admit = Arc<dyn Fn(SocketAddr) -> Option<Admission> + Send + Sync>;

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
        .keep_alive_interval(Some(Duration::from_secs(10)));
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    // Resolves when the tunnel RPC has not started in time (and never once it has).
    let no_tunnel_yet = async {
        tokio::time::sleep(TLS_TIMEOUT).await;
        if started.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            std::future::pending::<()>().await;
        }
    };
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
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (close_tx, close_rx) = oneshot::channel();
        let (requests_tx, requests_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let (limits, stall) = (self.setup.limits, self.setup.stall.scope(u64::from(EXCHANGE_WINDOW)));
        let link = Arc::new(GrpcLink {
            exchanges: Arc::new(Exchanges::new(End::Relay, &senders, limits, stall)),
            requests: tokio::sync::Mutex::new(requests_rx),
            remote: self.peer,
            close_tx: Mutex::new(Some(close_tx)),
            reason: Mutex::new(None),
        });
        let control = GrpcControl::new(control_rx, senders.heads.clone(), limits.max_control_frame);
        let reader = demux(request.into_inner(), control_tx, requests_tx, link.clone());
        self.tasks.spawn(reader.in_current_span());
        let admission = self.admission.take().unwrap_or_else(|| Box::new(()));
        (self.setup.on_agent)(control, link, admission);
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

/// Reads the agent's messages until the stream ends, never waiting on an exchange (see
/// [`crate::flow`]).
async fn demux(
    mut inbound: tonic::Streaming<TunnelMessage>,
    control: mpsc::Sender<ControlMessage>,
    requests: mpsc::Sender<IncomingExchange>,
    link: Arc<GrpcLink>,
) {
    let reason = loop {
        let message = tokio::select! {
            _ = link.exchanges.closed.cancelled() => break "closed by the relay".to_owned(),
            message = inbound.message() => message,
        };
        let TunnelMessage { request_id: id, payload } = match message {
            Ok(Some(message)) => message,
            Ok(None) => break "agent ended the tunnel stream".to_owned(),
            Err(status) => break format!("tunnel stream failed: {}", status.message()),
        };
        match payload {
            Some(Payload::Control(bytes)) => {
                match frame::decode_bounded::<ControlMessage>(&bytes, link.exchanges.limits.max_control_frame) {
                    Ok(msg) => {
                        if control.send(msg).await.is_err() {
                            break "control channel closed".to_owned();
                        }
                    }
                    Err(err) => {
                        link.close(CloseCode::Protocol);
                        break format!("malformed control message: {err}");
                    }
                }
            }
            Some(payload) => link.exchanges.dispatch(id, payload, &requests),
            None => {
                link.close(CloseCode::Protocol);
                break "message without a payload".to_owned();
            }
        }
    };
    debug!(%reason, "gRPC tunnel reader stopped");
    link.mark_closed(reason);
    // Dropping the request stream now would reset the RPC (RST_STREAM CANCEL), and the agent's
    // HTTP/2 stack may then discard the close status still on its way in the trailers: a replaced
    // agent would take the reset for a lost connection and come back. Keep it until the agent
    // ends its side, briefly.
    let _ended = tokio::time::timeout(CLOSE_LINGER, async { while let Ok(Some(_)) = inbound.message().await {} }).await;
}

/// An agent reached over one gRPC stream.
#[derive(Debug)]
pub struct GrpcLink {
    exchanges: Arc<Exchanges>,
    /// Exchanges the agent opened (egress), waiting to be served.
    requests: tokio::sync::Mutex<mpsc::Receiver<IncomingExchange>>,
    remote: SocketAddr,
    close_tx: Mutex<Option<oneshot::Sender<CloseCode>>>,
    reason: Mutex<Option<String>>,
}

impl GrpcLink {
    fn mark_closed(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
        drop(slot);
        self.exchanges.close();
    }
}

impl AgentLink for GrpcLink {
    fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(self.exchanges.open(head, body, client))
    }

    fn close(&self, code: CloseCode) {
        if let Some(tx) = self.close_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _receiver_gone = tx.send(code);
        }
        self.mark_closed(format!("closed: {}", String::from_utf8_lossy(code.reason())));
    }

    fn is_closed(&self) -> bool {
        self.exchanges.is_closed()
    }

    fn closed(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            self.exchanges.closed.cancelled().await;
            self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn transport(&self) -> &'static str {
        "grpc"
    }

    fn serve_peer_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut requests = self.requests.lock().await;
            while let Some(exchange) = requests.recv().await {
                let work = self.exchanges.clone().serve(handler.clone(), exchange).in_current_span();
                quictun_core::spawn_cancellable(&tasks, &cancel, work);
            }
        })
    }
}
