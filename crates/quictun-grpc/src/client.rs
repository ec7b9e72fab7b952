//! The agent's side of the gRPC transport: dial (TCP, TLS with the agent's own verifier, HTTP/2
//! with large windows), open the tunnel RPC, and serve the exchanges the relay starts on it.
//!
//! The reader task starts at dial time, because registration already needs it: it routes control
//! messages to the control channel and every other message to the exchanges (see
//! [`crate::exchange`]): the relay's requests, and the answers to the agent's egress requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use quictun_core::link::AbortOnDrop;
use quictun_core::link::{AgentLink, BoxFuture, LinkError, RelayConnection, RequestHandler, TunnelBody};
use quictun_core::stall::StallScope;
use quictun_proto::frame;
use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, ResponseHead};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::exchange::{End, Exchanges, IncomingExchange};
use crate::messages::{Codec, Payload, TunnelMessage, parse_close_status};
use crate::mux::{CONTROL_QUEUE, GrpcControl, OUTBOUND_QUEUE, Outbound};
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

/// Dials the relay's gRPC listener and opens the tunnel RPC. Bodies from the relay are watched
/// for stalled readers in `stall`.
pub async fn dial(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    limits: Limits,
    timeout: Duration,
    stall: StallScope,
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
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let (requests_tx, requests_rx) = mpsc::channel(OUTBOUND_QUEUE);
    let shared = Arc::new(Shared {
        exchanges: Arc::new(Exchanges::new(End::Agent, &senders, limits, stall)),
        ending,
        close_code: Mutex::new(None),
    });
    let reader = tokio::spawn(read(response.into_inner(), control_tx, requests_tx, shared.clone()).in_current_span());
    let relay = GrpcRelay {
        shared,
        requests: tokio::sync::Mutex::new(requests_rx),
        remote: addr,
        _reader: AbortOnDrop::new(reader),
    };
    Ok((GrpcControl::new(control_rx, senders.heads.clone(), limits.max_control_frame), relay))
}

#[derive(Debug)]
struct Shared {
    exchanges: Arc<Exchanges>,
    /// Cancelled to end our request stream gracefully (queued messages are still sent).
    ending: CancellationToken,
    close_code: Mutex<Option<CloseCode>>,
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
                match frame::decode_bounded::<ControlMessage>(&bytes, shared.exchanges.limits.max_control_frame) {
                    Ok(msg) => {
                        if control.send(msg).await.is_err() {
                            break "control channel closed".to_owned();
                        }
                    }
                    Err(err) => break format!("malformed control message: {err}"),
                }
            }
            Some(payload) => shared.exchanges.dispatch(id, payload, &requests),
            None => break "message without a payload".to_owned(),
        }
    };
    debug!(%reason, "gRPC tunnel reader stopped");
    // The relay ended its side, or the stream failed.
    shared.exchanges.close();
}

/// The agent's connection to the relay over gRPC.
#[derive(Debug)]
pub struct GrpcRelay {
    shared: Arc<Shared>,
    requests: tokio::sync::Mutex<mpsc::Receiver<IncomingExchange>>,
    remote: SocketAddr,
    _reader: AbortOnDrop,
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
                let work = self.shared.exchanges.clone().serve(handler.clone(), exchange).in_current_span();
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
            if tokio::time::timeout(FINISH_TIMEOUT, self.shared.exchanges.closed.cancelled()).await.is_err() {
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

    fn egress_link(&self) -> Option<Arc<dyn AgentLink>> {
        Some(Arc::new(GrpcEgress { shared: self.shared.clone(), remote: self.remote }))
    }
}

/// The agent's egress exchanges on the tunnel stream (see [`crate::exchange`]).
#[derive(Debug)]
struct GrpcEgress {
    shared: Arc<Shared>,
    remote: SocketAddr,
}

impl AgentLink for GrpcEgress {
    fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(self.shared.exchanges.open(head, body, client))
    }

    fn close(&self, _code: CloseCode) {
        self.shared.ending.cancel();
    }

    fn is_closed(&self) -> bool {
        self.shared.exchanges.is_closed()
    }

    fn closed(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            self.shared.exchanges.closed.cancelled().await;
            "gRPC tunnel stream ended".to_owned()
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn transport(&self) -> &'static str {
        "grpc"
    }
}
