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
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_core::link::{AgentLink, BoxFuture, LinkError, TunnelBody};
use quictun_proto::frame;
use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, ResponseHead, StreamCode};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use tonic::server::{Grpc, StreamingService};
use tracing::{Instrument, debug, info_span, warn};

use crate::messages::{Codec, Payload, TunnelMessage, close_status};
use crate::mux::{
    EXCHANGE_QUEUE, Event, EventBody, GrpcControl, OUTBOUND_QUEUE, Pending, deliver, send_body, trailers_event,
};
use crate::window;

/// Longest a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closed tunnel's request stream is kept for the agent to read the close status.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Called for every tunnel RPC: run registration and the session on these.
pub type OnAgent = Arc<dyn Fn(GrpcControl, Arc<GrpcLink>) + Send + Sync>;

/// Accepts gRPC agents on `listener` until `shutdown`; connections and readers run on `tasks`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    on_agent: OnAgent,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (acceptor, on_agent, shutdown2, tasks2) =
            (acceptor.clone(), on_agent.clone(), shutdown.clone(), tasks.clone());
        tasks.spawn(
            async move {
                if let Err(err) = tcp.set_nodelay(true) {
                    debug!(%err, "could not set TCP_NODELAY");
                }
                let tls = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => return debug!(%err, "TLS handshake failed"),
                    Err(_) => return debug!("TLS handshake timed out"),
                };
                serve_connection(tls, peer, limits, on_agent, shutdown2, tasks2).await;
            }
            .instrument(info_span!("grpc", %peer)),
        );
    }
}

async fn serve_connection(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    limits: Limits,
    on_agent: OnAgent,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (on_agent, tasks) = (on_agent.clone(), tasks.clone());
        async move {
            if req.uri().path() != crate::messages::CONNECT_PATH {
                return Ok::<_, Infallible>(Status::unimplemented("unknown method").into_http());
            }
            let mut grpc = Grpc::new(Codec::default()).max_decoding_message_size(crate::messages::MAX_CHUNK * 2);
            let connect = Connect { peer, limits, on_agent, tasks };
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
    tokio::select! {
        result = &mut conn => if let Err(err) = result {
            debug!(%err, "gRPC connection ended with an error");
        },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            if let Err(err) = conn.await {
                debug!(%err, "gRPC connection ended with an error");
            }
        }
    }
}

/// The tunnel RPC of one agent connection.
struct Connect {
    peer: SocketAddr,
    limits: Limits,
    on_agent: OnAgent,
    tasks: TaskTracker,
}

impl StreamingService<TunnelMessage> for Connect {
    type Response = TunnelMessage;
    type ResponseStream = OutboundStream;
    type Future = BoxFuture<'static, Result<tonic::Response<OutboundStream>, Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<TunnelMessage>>) -> Self::Future {
        let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let (control_tx, control_rx) = mpsc::channel(16);
        let (close_tx, close_rx) = oneshot::channel();
        let link = Arc::new(GrpcLink {
            outbound: outbound_tx.clone(),
            pending: Arc::new(DashMap::new()),
            next_id: AtomicU64::new(1),
            remote: self.peer,
            closed: CancellationToken::new(),
            close_tx: Mutex::new(Some(close_tx)),
            reason: Mutex::new(None),
            limits: self.limits,
        });
        let control = GrpcControl::new(control_rx, outbound_tx, self.limits.max_control_frame);
        self.tasks.spawn(demux(request.into_inner(), control_tx, link.clone()).in_current_span());
        (self.on_agent)(control, link);
        Box::pin(async move { Ok(tonic::Response::new(OutboundStream { rx: outbound_rx, close: Some(close_rx) })) })
    }
}

/// The relay → agent message stream: queued messages, ended early by a close.
pub struct OutboundStream {
    rx: mpsc::Receiver<TunnelMessage>,
    close: Option<oneshot::Receiver<CloseCode>>,
}

impl Stream for OutboundStream {
    type Item = Result<TunnelMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(close) = self.close.as_mut()
            && let Poll::Ready(code) = Pin::new(close).poll(cx)
        {
            self.close = None;
            self.rx.close();
            return Poll::Ready(code.ok().map(|code| Err(close_status(code))));
        }
        self.rx.poll_recv(cx).map(|m| m.map(Ok))
    }
}

use std::future::Future as _;

/// Reads the agent's messages until the stream ends, never waiting on request handling except
/// for a full per-exchange queue.
async fn demux(
    mut inbound: tonic::Streaming<TunnelMessage>,
    control: mpsc::Sender<ControlMessage>,
    link: Arc<GrpcLink>,
) {
    let reason = loop {
        let message = tokio::select! {
            _ = link.closed.cancelled() => break "closed by the relay".to_owned(),
            message = inbound.message() => message,
        };
        let TunnelMessage { request_id: id, payload } = match message {
            Ok(Some(message)) => message,
            Ok(None) => break "agent ended the tunnel stream".to_owned(),
            Err(status) => break format!("tunnel stream failed: {}", status.message()),
        };
        match payload {
            Some(Payload::Control(bytes)) => {
                match frame::decode_bounded::<ControlMessage>(&bytes, link.limits.max_control_frame) {
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
            Some(Payload::ResponseHead(bytes)) => {
                let event = match frame::decode_bounded::<ResponseHead>(&bytes, link.limits.max_head_frame) {
                    Ok(head) => Event::Head(head),
                    Err(err) => {
                        warn!(id, %err, "malformed response head");
                        Event::Reset(StreamCode::Malformed.to_u32())
                    }
                };
                deliver(&link.pending, &link.outbound, id, event).await;
            }
            Some(Payload::Body(bytes)) => deliver(&link.pending, &link.outbound, id, Event::Body(bytes)).await,
            Some(Payload::Trailers(bytes)) => {
                let event = trailers_event(id, &bytes, &link.limits);
                deliver(&link.pending, &link.outbound, id, event).await;
            }
            Some(Payload::End(_)) => deliver(&link.pending, &link.outbound, id, Event::End).await,
            Some(Payload::Reset(code)) => deliver(&link.pending, &link.outbound, id, Event::Reset(code)).await,
            Some(Payload::RequestHead(_)) => {
                // No agent-initiated exchange is served yet.
                let refuse = TunnelMessage::new(id, Payload::Reset(StreamCode::KindUnsupported.to_u32()));
                let _queue_full = link.outbound.try_send(refuse);
            }
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
    outbound: mpsc::Sender<TunnelMessage>,
    pending: Pending,
    next_id: AtomicU64,
    remote: SocketAddr,
    closed: CancellationToken,
    close_tx: Mutex<Option<oneshot::Sender<CloseCode>>>,
    reason: Mutex<Option<String>>,
    limits: Limits,
}

impl GrpcLink {
    fn mark_closed(&self, reason: String) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(reason);
        drop(slot);
        self.closed.cancel();
        // Every exchange still waiting learns the tunnel is gone.
        self.pending.clear();
    }

    async fn run_exchange(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), LinkError> {
        if self.closed.is_cancelled() {
            return Err(LinkError::NotOpened);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, mut events) = mpsc::channel(EXCHANGE_QUEUE);
        self.pending.insert(id, events_tx);
        let mut guard =
            ExchangeGuard { pending: self.pending.clone(), outbound: self.outbound.clone(), id, done: false };
        let encoded = frame::encode_payload(&head, self.limits.max_head_frame)
            .map_err(|e| LinkError::Protocol(format!("request head: {e}")))?;
        match self.outbound.try_send(TunnelMessage::new(id, Payload::RequestHead(Bytes::from(encoded)))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                guard.done = true; // nothing reached the agent
                return Err(LinkError::Busy);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                guard.done = true; // nothing reached the agent
                return Err(LinkError::NotOpened);
            }
        }
        let upload = head.has_body.then(|| {
            let outbound = self.outbound.clone();
            let max_trailers = self.limits.max_head_frame;
            tokio::spawn(
                async move {
                    send_body(&outbound, id, body, StreamCode::Cancelled, max_trailers).await;
                }
                .in_current_span(),
            )
        });
        match events.recv().await {
            Some(Event::Head(response)) => {
                response.validate(&self.limits).map_err(|e| LinkError::Protocol(e.to_string()))?;
                Ok((response, EventBody::new(events, guard).with_upload(upload).boxed()))
            }
            Some(Event::Reset(code)) => {
                guard.done = true;
                Err(StreamCode::from_u64(u64::from(code)).map_or(LinkError::Lost, LinkError::Reset))
            }
            Some(_) => Err(LinkError::Protocol("body before the response head".into())),
            None => Err(LinkError::Lost),
        }
    }
}

/// Removes an exchange from the table when it ends, and tells the agent to stop when it ends
/// early (the client went away, or a deadline passed).
struct ExchangeGuard {
    pending: Pending,
    outbound: mpsc::Sender<TunnelMessage>,
    id: u64,
    done: bool,
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        if self.pending.remove(&self.id).is_some() && !self.done {
            let cancel = TunnelMessage::new(self.id, Payload::Reset(StreamCode::Cancelled.to_u32()));
            let _queue_full = self.outbound.try_send(cancel);
        }
    }
}

impl AgentLink for GrpcLink {
    fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(self.run_exchange(head, body))
    }

    fn close(&self, code: CloseCode) {
        if let Some(tx) = self.close_tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _receiver_gone = tx.send(code);
        }
        self.mark_closed(format!("closed: {}", String::from_utf8_lossy(code.reason())));
    }

    fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    fn closed(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            self.closed.cancelled().await;
            self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn transport(&self) -> &'static str {
        "grpc"
    }
}
