//! What both ends of the gRPC transport share: the control channel carried on the tunnel stream,
//! the table of exchanges in flight (request_id → bounded event queue), and bodies read from such a
//! queue. Every queue is bounded; a full per-exchange queue makes the reader wait (this is the
//! head-of-line blocking the single-stream design cannot avoid), never grow.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Body, Frame};
use quictun_core::body_frames::{trailers_from_wire, trailers_to_wire};
use quictun_core::framed::ControlError;
use quictun_core::link::{BodyError, ControlIo, TunnelBody};
use quictun_proto::Limits;
use quictun_proto::frame::{self, FrameError};
use quictun_proto::{ControlMessage, StreamCode};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::messages::{MAX_CHUNK, Payload, TunnelMessage};

/// Messages queued towards the peer, for all exchanges and control. With chunks of at most
/// [`crate::messages::MAX_CHUNK`] this bounds the queue at 16 MiB.
pub const OUTBOUND_QUEUE: usize = 256;
/// Events queued for one exchange (at most 2 MiB of body).
pub const EXCHANGE_QUEUE: usize = 32;
/// Longest the reader waits for a slow exchange before resetting it.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What the reader hands to one exchange.
#[derive(Debug)]
pub enum Event {
    /// The response head (relay side), already decoded.
    Head(quictun_proto::ResponseHead),
    /// A body chunk.
    Body(Bytes),
    /// The body's trailers, already checked.
    Trailers(http::HeaderMap),
    /// The body is complete.
    End,
    /// The peer reset the exchange.
    Reset(u32),
}

/// Exchanges in flight: request_id → the queue of their events.
pub type Pending = Arc<DashMap<u64, mpsc::Sender<Event>>>;

/// Delivers an event to exchange `id`. Waits while its queue is full (bounded by
/// [`DELIVERY_TIMEOUT`], after which the exchange is dropped and reset). Unknown ids are ignored
/// (the exchange already ended).
pub async fn deliver(pending: &Pending, outbound: &mpsc::Sender<TunnelMessage>, id: u64, event: Event) {
    let Some(tx) = pending.get(&id).map(|tx| tx.clone()) else {
        return debug!(id, "event for an exchange that already ended");
    };
    let ends = matches!(event, Event::End | Event::Reset(_));
    match tokio::time::timeout(DELIVERY_TIMEOUT, tx.send(event)).await {
        Ok(Ok(())) if !ends => {}
        Ok(_) => {
            pending.remove(&id);
        }
        Err(_) => {
            pending.remove(&id);
            let _queue_full = outbound.try_send(TunnelMessage::new(id, Payload::Reset(StreamCode::Cancelled.to_u32())));
        }
    }
}

/// Encodes a control message for the tunnel stream.
pub fn control_message(msg: &ControlMessage, max: usize) -> Result<TunnelMessage, FrameError> {
    Ok(TunnelMessage::new(0, Payload::Control(Bytes::from(frame::encode_payload(msg, max)?))))
}

/// The control channel carried on the tunnel stream.
#[derive(Debug)]
pub struct GrpcControl {
    inbound: mpsc::Receiver<ControlMessage>,
    outbound: mpsc::Sender<TunnelMessage>,
    max_frame: usize,
}

impl GrpcControl {
    /// Control messages arrive on `inbound` (from the reader) and leave through `outbound`.
    pub fn new(
        inbound: mpsc::Receiver<ControlMessage>,
        outbound: mpsc::Sender<TunnelMessage>,
        max_frame: usize,
    ) -> Self {
        Self { inbound, outbound, max_frame }
    }
}

impl ControlIo for GrpcControl {
    async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
        self.inbound.recv().await.ok_or(ControlError::Closed)
    }

    async fn send(&mut self, msg: ControlMessage) -> Result<(), ControlError> {
        let message = control_message(&msg, self.max_frame)?;
        self.outbound.send(message).await.map_err(|_| ControlError::Closed)
    }

    fn finish(&mut self) {
        self.inbound.close();
    }
}

/// A body read from an exchange's event queue. Holds `guard` (whatever must live as long as the
/// body: the pending-table entry, an upload task) until dropped.
pub struct EventBody<G> {
    events: mpsc::Receiver<Event>,
    done: bool,
    ended_cleanly: bool,
    upload: Option<tokio::task::JoinHandle<()>>,
    _guard: G,
}

impl<G> Drop for EventBody<G> {
    /// Dropped before a clean end, the exchange is abandoned: its upload stops. After a clean end
    /// the upload may still be sending (an upgraded or TCP stream whose other direction closed
    /// first): it finishes by itself when its source ends.
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && !self.ended_cleanly
        {
            upload.abort();
        }
    }
}

impl<G: Send + Unpin + 'static> EventBody<G> {
    /// A body from `events`, keeping `guard` alive.
    pub fn new(events: mpsc::Receiver<Event>, guard: G) -> Self {
        Self { events, done: false, ended_cleanly: false, upload: None, _guard: guard }
    }

    /// Also owns the exchange's request-body upload (see the `Drop` impl).
    pub fn with_upload(mut self, upload: Option<tokio::task::JoinHandle<()>>) -> Self {
        self.upload = upload;
        self
    }

    /// Boxed as a tunnel body.
    pub fn boxed(self) -> TunnelBody {
        http_body_util::BodyExt::boxed_unsync(self)
    }
}

impl<G: Unpin> Body for EventBody<G> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let event = std::task::ready!(this.events.poll_recv(cx));
        Poll::Ready(match event {
            Some(Event::Body(bytes)) => Some(Ok(Frame::data(bytes))),
            Some(Event::Trailers(map)) => {
                // Trailers are the last frame; a reader may not poll for the end after them.
                this.ended_cleanly = true;
                Some(Ok(Frame::trailers(map)))
            }
            Some(Event::End) => {
                this.done = true;
                this.ended_cleanly = true;
                None
            }
            Some(Event::Reset(code)) => {
                this.done = true;
                Some(Err(BodyError::Reset(u64::from(code))))
            }
            Some(Event::Head(_)) => {
                this.done = true;
                Some(Err(BodyError::Closed("a second head inside a body".into())))
            }
            None => {
                this.done = true;
                Some(Err(BodyError::ConnectionLost("tunnel stream ended".into())))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The event for a trailers message: the checked trailers, or a reset when they are malformed.
pub fn trailers_event(id: u64, payload: &[u8], limits: &Limits) -> Event {
    match trailers_from_wire(payload, limits) {
        Ok(map) => Event::Trailers(map),
        Err(err) => {
            warn!(id, %err, "malformed trailers");
            Event::Reset(StreamCode::Malformed.to_u32())
        }
    }
}

/// Sends a body as chunk messages of exchange `id`, then its trailers (if any, at most
/// `max_trailers` bytes) and its end; a failing source resets the exchange with `on_error`. Waits
/// while the outbound queue is full (backpressure). Returns false when the tunnel is gone.
pub async fn send_body(
    outbound: &mpsc::Sender<TunnelMessage>,
    id: u64,
    body: TunnelBody,
    on_error: StreamCode,
    max_trailers: usize,
) -> bool {
    use http_body_util::BodyExt;
    let mut body = body;
    let reset = TunnelMessage::new(id, Payload::Reset(on_error.to_u32()));
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => {
                debug!(id, %err, "body source failed; resetting the exchange");
                return outbound.send(reset).await.is_ok();
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_CHUNK));
                    if outbound.send(TunnelMessage::new(id, Payload::Body(chunk))).await.is_err() {
                        return false;
                    }
                }
            }
            Err(frame) => {
                let Ok(trailers) = frame.into_trailers() else { continue };
                let message = match frame::encode_payload(&trailers_to_wire(&trailers), max_trailers) {
                    Ok(encoded) => TunnelMessage::new(id, Payload::Trailers(Bytes::from(encoded))),
                    Err(err) => {
                        debug!(id, %err, "trailers too large; resetting the exchange");
                        return outbound.send(reset).await.is_ok();
                    }
                };
                if outbound.send(message).await.is_err() {
                    return false;
                }
                break;
            }
        }
    }
    outbound.send(TunnelMessage::new(id, Payload::End(true))).await.is_ok()
}
