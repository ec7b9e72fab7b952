//! The agent's side of the gRPC transport: dial (TCP, TLS with the agent's own verifier, HTTP/2
//! with large windows), open the tunnel RPC, and serve the exchanges the relay starts on it.
//!
//! The reader task starts at dial time, because registration already needs it: it routes control
//! messages to the control channel, opens an exchange for every request head (a bounded queue in
//! the pending table) and feeds body chunks to it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use quictun_core::link::AbortOnDrop;
use quictun_core::link::{BoxFuture, RelayConnection, RequestHandler};
use quictun_proto::frame;
use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, StreamCode};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::messages::{Codec, Payload, TunnelMessage, parse_close_status};
use crate::mux::{
    EXCHANGE_QUEUE, Event, EventBody, GrpcControl, OUTBOUND_QUEUE, Pending, deliver, send_body, trailers_event,
};
use crate::window;

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP, TLS or HTTP/2 failed (the TLS verifier's verdict is in the message).
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

/// How long [`GrpcRelay::finish`] waits for the relay to end its side.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent → relay message stream; ends gracefully (after what is queued) once `ending` fires.
struct EndingStream {
    rx: mpsc::Receiver<TunnelMessage>,
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
            self.rx.close();
        }
        self.rx.poll_recv(cx)
    }
}

use std::future::Future as _;

/// A request the reader handed over: its id, head, and body event queue.
struct IncomingExchange {
    id: u64,
    head: RequestHead,
    body: Option<mpsc::Receiver<Event>>,
}

/// Dials the relay's gRPC listener and opens the tunnel RPC.
pub async fn dial(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    limits: Limits,
    timeout: Duration,
) -> Result<(GrpcControl, GrpcRelay), DialError> {
    let connect_err = |message: String| DialError::Connect { addr, message };
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
        .http2_keep_alive_interval(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| connect_err(quictun_core::error_chain(&e)))?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(crate::messages::MAX_CHUNK * 2);
    grpc.ready().await.map_err(|e| connect_err(quictun_core::error_chain(&e)))?;
    let (outbound_tx, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let ending = CancellationToken::new();
    let request = tonic::Request::new(EndingStream {
        rx: outbound_rx,
        ending: Box::pin(ending.clone().cancelled_owned()),
        ended: false,
    });
    let path = PathAndQuery::from_static(crate::messages::CONNECT_PATH);
    let response = tokio::time::timeout(timeout, grpc.streaming(request, path, Codec::default()))
        .await
        .map_err(|_| DialError::Rpc("no answer in time".into()))?
        .map_err(|status| DialError::Rpc(status.message().to_owned()))?;
    let (control_tx, control_rx) = mpsc::channel(16);
    let (requests_tx, requests_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let shared = Arc::new(Shared {
        outbound: outbound_tx.clone(),
        pending: Arc::new(DashMap::new()),
        ending,
        closed: CancellationToken::new(),
        close_code: Mutex::new(None),
        limits,
    });
    let reader = tokio::spawn(read(response.into_inner(), control_tx, requests_tx, shared.clone()).in_current_span());
    let relay = GrpcRelay {
        shared,
        requests: tokio::sync::Mutex::new(requests_rx),
        remote: addr,
        _reader: AbortOnDrop(reader),
    };
    Ok((GrpcControl::new(control_rx, outbound_tx, limits.max_control_frame), relay))
}

#[derive(Debug)]
struct Shared {
    outbound: mpsc::Sender<TunnelMessage>,
    pending: Pending,
    /// Cancelled to end our request stream gracefully (queued messages are still sent).
    ending: CancellationToken,
    /// Cancelled when the reader stopped: the relay ended its side, or the stream failed.
    closed: CancellationToken,
    close_code: Mutex<Option<CloseCode>>,
    limits: Limits,
}

async fn read(
    mut inbound: tonic::Streaming<TunnelMessage>,
    control: mpsc::Sender<ControlMessage>,
    requests: mpsc::Sender<IncomingExchange>,
    shared: Arc<Shared>,
) {
    let reason = loop {
        let message = inbound.message().await;
        let TunnelMessage { request_id: id, payload } = match message {
            Ok(Some(message)) => message,
            Ok(None) => break "relay ended the tunnel stream".to_owned(),
            Err(status) => {
                *shared.close_code.lock().unwrap_or_else(|p| p.into_inner()) = parse_close_status(&status);
                break format!("tunnel stream ended: {}", status.message());
            }
        };
        match payload {
            Some(Payload::Control(bytes)) => {
                match frame::decode_bounded::<ControlMessage>(&bytes, shared.limits.max_control_frame) {
                    Ok(msg) => {
                        if control.send(msg).await.is_err() {
                            break "control channel closed".to_owned();
                        }
                    }
                    Err(err) => break format!("malformed control message: {err}"),
                }
            }
            Some(Payload::RequestHead(bytes)) => {
                let head = match frame::decode_bounded::<RequestHead>(&bytes, shared.limits.max_head_frame) {
                    Ok(head) => head,
                    Err(err) => {
                        let code = if matches!(err, frame::FrameError::TooLarge { .. }) {
                            StreamCode::HeadTooLarge
                        } else {
                            StreamCode::Malformed
                        };
                        warn!(id, %err, "bad request head from relay");
                        let _queue_full =
                            shared.outbound.try_send(TunnelMessage::new(id, Payload::Reset(code.to_u32())));
                        continue;
                    }
                };
                let body = head.has_body.then(|| {
                    let (tx, rx) = mpsc::channel(EXCHANGE_QUEUE);
                    shared.pending.insert(id, tx);
                    rx
                });
                if requests.send(IncomingExchange { id, head, body }).await.is_err() {
                    break "request queue closed".to_owned();
                }
            }
            Some(Payload::Body(bytes)) => deliver(&shared.pending, &shared.outbound, id, Event::Body(bytes)).await,
            Some(Payload::Trailers(bytes)) => {
                let event = trailers_event(id, &bytes, &shared.limits);
                deliver(&shared.pending, &shared.outbound, id, event).await;
            }
            Some(Payload::End(_)) => deliver(&shared.pending, &shared.outbound, id, Event::End).await,
            Some(Payload::Reset(code)) => deliver(&shared.pending, &shared.outbound, id, Event::Reset(code)).await,
            Some(Payload::ResponseHead(_)) | None => break "unexpected message from relay".to_owned(),
        }
    };
    debug!(%reason, "gRPC tunnel reader stopped");
    shared.closed.cancel();
    shared.pending.clear();
}

/// The agent's connection to the relay over gRPC.
#[derive(Debug)]
pub struct GrpcRelay {
    shared: Arc<Shared>,
    requests: tokio::sync::Mutex<mpsc::Receiver<IncomingExchange>>,
    remote: SocketAddr,
    _reader: AbortOnDrop,
}

impl std::fmt::Debug for IncomingExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingExchange").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Tells the relay exchange `id` failed with `code`; a tunnel already gone needs no telling.
async fn send_reset(shared: &Shared, id: u64, code: StreamCode) {
    if shared.outbound.send(TunnelMessage::new(id, Payload::Reset(code.to_u32()))).await.is_err() {
        debug!(id, ?code, "tunnel gone before the reset could be sent");
    }
}

async fn serve_exchange(shared: Arc<Shared>, handler: Arc<dyn RequestHandler>, exchange: IncomingExchange) {
    let IncomingExchange { id, head, body } = exchange;
    let limits = handler.limits();
    if let Err(err) = head.validate(&limits) {
        warn!(id, %err, "invalid request head");
        shared.pending.remove(&id);
        send_reset(&shared, id, StreamCode::Malformed).await;
        return;
    }
    let span = info_span!("exchange", request_id = %head.request_id, upstream = %head.upstream);
    let body = match body {
        Some(events) => EventBody::new(events, ()).boxed(),
        None => quictun_core::link::empty_body(),
    };
    async {
        match handler.handle(head, body).await {
            Ok((response, body)) => {
                let encoded = match frame::encode_payload(&response, limits.max_head_frame) {
                    Ok(encoded) => encoded,
                    Err(err) => {
                        warn!(%err, "response head too large");
                        send_reset(&shared, id, StreamCode::UpstreamFailed).await;
                        return;
                    }
                };
                if shared
                    .outbound
                    .send(TunnelMessage::new(id, Payload::ResponseHead(Bytes::from(encoded))))
                    .await
                    .is_ok()
                {
                    send_body(&shared.outbound, id, body, StreamCode::UpstreamFailed, shared.limits.max_head_frame)
                        .await;
                }
            }
            Err(code) => send_reset(&shared, id, code).await,
        }
    }
    .instrument(span)
    .await;
    // The response is done; the request may still be arriving (an upgraded or TCP stream whose
    // other direction closed first). The exchange ends when its request body is dropped.
    let request_events = shared.pending.get(&id).map(|tx| tx.clone());
    if let Some(tx) = request_events {
        tx.closed().await;
    }
    shared.pending.remove(&id);
}

impl RelayConnection for GrpcRelay {
    fn serve_requests(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let mut requests = self.requests.lock().await;
            while let Some(exchange) = requests.recv().await {
                let work = serve_exchange(self.shared.clone(), handler.clone(), exchange).in_current_span();
                quictun_core::spawn_cancellable(&tasks, &cancel, work);
            }
            "gRPC tunnel stream ended".to_owned()
        })
    }

    fn close(&self, code: CloseCode) {
        debug!(?code, "closing the gRPC tunnel");
        self.shared.ending.cancel();
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if tokio::time::timeout(FINISH_TIMEOUT, self.shared.closed.cancelled()).await.is_err() {
                debug!("relay did not end the tunnel stream in time");
            }
        })
    }

    fn peer_close_code(&self) -> Option<CloseCode> {
        *self.shared.close_code.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}
