//! The gRPC tunnel: one tunnel RPC, every exchange multiplexed on it, the same at both ends.
//!
//! One reader task per tunnel reads the peer's messages and never waits on an exchange: control
//! messages go to the control channel, everything else to the exchange table ([`Exchanges`]).
//! [`GrpcTunnel`] implements [`Tunnel`] on top: opening exchanges, serving the peer's, closing.
//!
//! The ends differ only in how they end their side of the RPC: the relay ends its response
//! stream with a status that carries the close code; the agent ends its request stream after
//! what is queued (gRPC has no status for a client to send).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quictun_core::body::{AbortOnDrop, TunnelBody};
use quictun_core::stall::StallScope;
use quictun_core::tunnel::{
    BoxFuture, CloseReason, ExchangeError, ProtocolViolation, RequestHandler, TransportKind, Tunnel,
};
use quictun_proto::{CloseCode, ControlMessage, Limits, RequestHead, ResponseHead, frame};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::exchange::{End, Exchanges, IncomingExchange};
use crate::messages::{Payload, TunnelMessage, parse_close_status};
use crate::mux::{CONTROL_QUEUE, GrpcControl, OUTBOUND_QUEUE, OutboundSenders};

/// How long a closed tunnel's inbound stream is kept for the peer to end its side.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How long [`Tunnel::flush_close`] waits for the peer to end its side.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// How this end ends its side of the tunnel RPC.
#[derive(Debug)]
pub(crate) enum Closer {
    /// The relay: the response stream ends with a status carrying the code.
    Status(Mutex<Option<oneshot::Sender<CloseCode>>>),
    /// The agent: the request stream ends after what is queued.
    EndStream(CancellationToken),
}

/// What the tunnel and its reader share.
#[derive(Debug)]
struct Inner {
    exchanges: Arc<Exchanges>,
    closer: Closer,
    /// Why the tunnel closed, once it has.
    reason: Mutex<Option<CloseReason>>,
}

impl Inner {
    /// Ends this end's side with `code`.
    fn close(&self, code: CloseCode) {
        self.record(CloseReason::Closed(code));
        match &self.closer {
            Closer::Status(tx) => {
                if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _stream_gone = tx.send(code);
                }
                // The relay's close is final at once: nothing more is read or sent.
                self.exchanges.close();
            }
            // The agent keeps reading until the relay ends its side (its close status, queued
            // answers); the reader then closes the exchanges.
            Closer::EndStream(ending) => ending.cancel(),
        }
    }

    /// Keeps the first reason the tunnel closed for.
    fn record(&self, reason: CloseReason) {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(reason);
    }
}

/// A tunnel over one gRPC stream, from either end.
#[derive(Debug)]
pub struct GrpcTunnel {
    inner: Arc<Inner>,
    /// Exchanges the peer opened, waiting to be served.
    requests: tokio::sync::Mutex<mpsc::Receiver<IncomingExchange>>,
    remote: SocketAddr,
    /// The reader, when this tunnel owns it (the agent's; the relay's runs on its task tracker so
    /// that it outlives a closed tunnel for [`CLOSE_LINGER`]).
    _reader: Option<AbortOnDrop>,
}

/// Where a tunnel's reader runs.
pub(crate) enum ReaderTask<'a> {
    /// On this tracker, until the stream ends.
    Tracked(&'a TaskTracker),
    /// Owned by the tunnel: it stops when the tunnel is dropped.
    Owned,
}

/// The parts of a tunnel being started.
pub(crate) struct Start {
    /// Which end this is.
    pub end: End,
    /// The outbound queue's senders.
    pub senders: OutboundSenders,
    /// How this end ends its side.
    pub closer: Closer,
    /// Frame limits.
    pub limits: Limits,
    /// Watches bodies read from the peer.
    pub stall: StallScope,
    /// The peer's address.
    pub remote: SocketAddr,
}

impl GrpcTunnel {
    /// Starts the tunnel on the peer's message stream: its reader runs as `reader` says.
    pub(crate) fn start(
        start: Start,
        inbound: tonic::Streaming<TunnelMessage>,
        reader: ReaderTask<'_>,
    ) -> (GrpcControl, Arc<Self>) {
        let Start { end, senders, closer, limits, stall, remote } = start;
        let inner = Arc::new(Inner {
            exchanges: Arc::new(Exchanges::new(end, &senders, limits, stall)),
            closer,
            reason: Mutex::new(None),
        });
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (requests_tx, requests_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let read = read(inbound, control_tx, requests_tx, inner.clone()).in_current_span();
        let reader = match reader {
            ReaderTask::Tracked(tasks) => {
                tasks.spawn(read);
                None
            }
            ReaderTask::Owned => Some(AbortOnDrop::new(tokio::spawn(read))),
        };
        let control = GrpcControl::new(control_rx, senders.heads.clone(), limits.max_control_frame);
        let tunnel = Self { inner, requests: tokio::sync::Mutex::new(requests_rx), remote, _reader: reader };
        (control, Arc::new(tunnel))
    }
}

/// Reads the peer's messages until the stream ends or this end closes the tunnel, never waiting
/// on an exchange (see [`crate::flow`]); then records why the tunnel closed.
async fn read(
    mut inbound: tonic::Streaming<TunnelMessage>,
    control: mpsc::Sender<ControlMessage>,
    requests: mpsc::Sender<IncomingExchange>,
    inner: Arc<Inner>,
) {
    let exchanges = &inner.exchanges;
    let reason = loop {
        let message = tokio::select! {
            _ = exchanges.closed.cancelled() => break None,
            message = inbound.message() => message,
        };
        let TunnelMessage { request_id: id, payload } = match message {
            Ok(Some(message)) => message,
            Ok(None) => break Some(CloseReason::Ended),
            Err(status) => {
                break Some(match parse_close_status(&status) {
                    Some(code) => CloseReason::ClosedByPeer(code),
                    None => CloseReason::Failed(format!("tunnel stream: {}", status.message())),
                });
            }
        };
        match payload {
            Some(Payload::Control(bytes)) => {
                match frame::decode_bounded::<ControlMessage>(&bytes, exchanges.limits.max_control_frame) {
                    Ok(msg) => {
                        if control.send(msg).await.is_err() {
                            // The session is over; the tunnel closes with it.
                            break None;
                        }
                    }
                    Err(err) => {
                        inner.record(CloseReason::Protocol(ProtocolViolation::Malformed(err.to_string())));
                        inner.close(CloseCode::Protocol);
                        break None;
                    }
                }
            }
            Some(payload) => exchanges.dispatch(id, payload, &requests),
            None => {
                inner.record(CloseReason::Protocol(ProtocolViolation::Malformed("message without a payload".into())));
                inner.close(CloseCode::Protocol);
                break None;
            }
        }
    };
    if let Some(reason) = reason {
        inner.record(reason);
    }
    debug!(reason = ?inner.reason.lock().unwrap_or_else(|p| p.into_inner()), "gRPC tunnel reader stopped");
    exchanges.close();
    drop((control, requests));
    // Dropping the inbound stream now would reset the RPC (RST_STREAM CANCEL), and the peer's
    // HTTP/2 stack may then discard the close status still on its way: a replaced agent would
    // take the reset for a lost connection and come back. Keep it until the peer ends its side,
    // briefly.
    let _ended = tokio::time::timeout(CLOSE_LINGER, async { while let Ok(Some(_)) = inbound.message().await {} }).await;
}

impl Tunnel for GrpcTunnel {
    fn open(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), ExchangeError>> {
        Box::pin(self.inner.exchanges.open(head, body, client))
    }

    fn serve(
        &self,
        handler: Arc<dyn RequestHandler>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> BoxFuture<'_, CloseReason> {
        Box::pin(async move {
            let mut requests = self.requests.lock().await;
            while let Some(exchange) = requests.recv().await {
                let work = self.inner.exchanges.clone().serve(handler.clone(), exchange).in_current_span();
                quictun_core::spawn_cancellable(&tasks, &cancel, work);
            }
            self.closed().await
        })
    }

    fn close(&self, code: CloseCode) {
        debug!(code = code.as_str(), "closing the gRPC tunnel");
        self.inner.close(code);
    }

    fn flush_close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            if tokio::time::timeout(FLUSH_TIMEOUT, self.inner.exchanges.closed.cancelled()).await.is_err() {
                debug!("the peer did not end the tunnel stream in time");
            }
        })
    }

    fn is_closed(&self) -> bool {
        self.inner.exchanges.is_closed()
    }

    fn closed(&self) -> BoxFuture<'_, CloseReason> {
        Box::pin(async move {
            self.inner.exchanges.closed.cancelled().await;
            let reason = self.inner.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            reason.unwrap_or(CloseReason::Ended)
        })
    }

    fn remote_addr(&self) -> SocketAddr {
        self.remote
    }

    fn transport(&self) -> TransportKind {
        TransportKind::Grpc
    }
}
