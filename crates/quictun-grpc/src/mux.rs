//! What both ends of the gRPC transport share: the outbound queue with its priority lanes, the
//! control channel carried on the tunnel stream, the table of exchanges in flight (request_id →
//! event queue and send credit), and bodies read from such a queue.
//!
//! Every queue is bounded, and the task reading the tunnel stream never waits on an exchange:
//! per-exchange flow control ([`crate::flow`]) keeps each event queue big enough for what its
//! sender may send, and a sender that sends more has its exchange reset.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Body, Frame};
use quictun_core::body::{BodyError, BodySink, SinkError, TunnelBody};
use quictun_core::control::{ControlError, ControlIo};
use quictun_core::framing::{trailers_from_wire, trailers_to_wire};
use quictun_proto::Limits;
use quictun_proto::frame::{self, FrameError};
use quictun_proto::{ControlMessage, StreamCode};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::flow::{CREDIT_BATCH, SendCredit, Urgent, cost};
use crate::messages::{MAX_CHUNK, Payload, TunnelMessage};

/// Body messages queued towards the peer, for all exchanges. With chunks of at most
/// [`crate::messages::MAX_CHUNK`] this bounds the queue at 16 MiB.
pub const OUTBOUND_QUEUE: usize = 256;
/// Control messages and request and response heads queued towards the peer: they go before body
/// data, so neither a heartbeat nor a new request waits behind other exchanges' bodies in this
/// end's queue.
pub const PRIORITY_QUEUE: usize = 256;
/// Control messages the reader hands to the session at most (it reads them at once).
pub const CONTROL_QUEUE: usize = 16;

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
    Reset(StreamCode),
}

/// One exchange in flight: where its peer's messages go, and the credit for its own body.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The events of the body coming from the peer.
    pub events: mpsc::Sender<Event>,
    /// The credit for the body going to the peer.
    pub credit: Arc<SendCredit>,
}

/// Exchanges in flight: request_id → [`Slot`].
pub type Pending = Arc<DashMap<u64, Slot>>;

/// Removes an exchange from the table once every holder (the body read from the peer, the body
/// sent to it) is done.
#[derive(Debug)]
pub struct SlotRef {
    pending: Pending,
    id: u64,
}

impl SlotRef {
    /// A holder of exchange `id` of `pending`.
    pub fn new(pending: Pending, id: u64) -> Arc<Self> {
        Arc::new(Self { pending, id })
    }
}

impl Drop for SlotRef {
    fn drop(&mut self) {
        self.pending.remove(&self.id);
    }
}

/// Hands an event from the peer to exchange `id`, never waiting: a queue that is full means its
/// sender overran its window, and the exchange is reset. A reset also stops this end's own body.
/// Unknown ids are ignored (the exchange already ended).
pub fn deliver(pending: &Pending, urgent: &Urgent, id: u64, event: Event) {
    let overran = {
        let Some(slot) = pending.get(&id) else {
            return debug!(id, "event for an exchange that already ended");
        };
        if matches!(event, Event::Reset(_)) {
            slot.credit.stop();
        }
        match slot.events.try_send(event) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                slot.credit.stop();
                true
            }
        }
    };
    if overran {
        warn!(id, "peer sent past its flow-control window: exchange reset");
        pending.remove(&id);
        urgent.reset(id, StreamCode::Malformed);
    }
}

/// The messages towards the peer, in order of urgency: control messages and request and
/// response heads; credits, stops and resets; then bodies, trailers and ends. An exchange's head
/// always goes before its body and before a reset of it.
#[derive(Debug)]
pub struct Outbound {
    heads: mpsc::Receiver<TunnelMessage>,
    urgent: Arc<Urgent>,
    data: mpsc::Receiver<TunnelMessage>,
    /// A message taken from a later lane while a head it may depend on arrived: sent next.
    held: Option<TunnelMessage>,
}

/// The sending halves of an [`Outbound`].
#[derive(Debug, Clone)]
pub struct OutboundSenders {
    /// Control messages, and request and response heads.
    pub heads: mpsc::Sender<TunnelMessage>,
    /// Credits, stops and resets.
    pub urgent: Arc<Urgent>,
    /// Bodies, trailers and ends.
    pub data: mpsc::Sender<TunnelMessage>,
}

impl Outbound {
    /// A new outbound queue and its senders.
    pub fn new() -> (Self, OutboundSenders) {
        let (heads_tx, heads) = mpsc::channel(PRIORITY_QUEUE);
        let (data_tx, data) = mpsc::channel(OUTBOUND_QUEUE);
        let urgent = Arc::new(Urgent::default());
        let senders = OutboundSenders { heads: heads_tx, urgent: urgent.clone(), data: data_tx };
        (Self { heads, urgent, data, held: None }, senders)
    }

    /// The next message to send; `None` once the data queue is closed and drained.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<TunnelMessage>> {
        if let Poll::Ready(Some(message)) = self.heads.poll_recv(cx) {
            return Poll::Ready(Some(message));
        }
        if let Some(message) = self.held.take() {
            return Poll::Ready(Some(message));
        }
        let later = match self.urgent.poll_next(cx) {
            Some(message) => message,
            None => match std::task::ready!(self.data.poll_recv(cx)) {
                Some(message) => message,
                None => return Poll::Ready(None),
            },
        };
        // The lanes are filled from other threads: a body (or a reset) may have been queued
        // after its head only once the head lane was checked. The head goes first.
        match self.heads.try_recv() {
            Ok(head) => {
                self.held = Some(later);
                Poll::Ready(Some(head))
            }
            Err(_) => Poll::Ready(Some(later)),
        }
    }

    /// Takes no more messages; those queued are still sent.
    pub fn close(&mut self) {
        self.heads.close();
        self.data.close();
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
    /// Control messages arrive on `inbound` (from the reader) and leave through `outbound` (the
    /// priority lane of an [`Outbound`]).
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

/// What a reader that lets go of its body before the end tells the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandon {
    /// Reset the whole exchange (the requester went away).
    Reset,
    /// Stop only the peer's body (the request body an upstream did not read to the end).
    Stop,
}

/// A body read from an exchange's event queue. Grants credit back as its reader consumes; let go
/// of early, it tells the peer ([`Abandon`]).
pub struct EventBody {
    events: mpsc::Receiver<Event>,
    id: u64,
    urgent: Arc<Urgent>,
    abandon: Abandon,
    /// Consumed bytes not yet granted back.
    consumed: u32,
    done: bool,
    /// The body ended with its end or trailers, or the peer reset it: nothing to tell it.
    settled: bool,
    _slot: Arc<SlotRef>,
}

impl Drop for EventBody {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let code = StreamCode::Cancelled;
        match self.abandon {
            Abandon::Reset => self.urgent.reset(self.id, code),
            Abandon::Stop => self.urgent.stop(self.id, code),
        }
    }
}

impl EventBody {
    /// The body of exchange `id` from `events`, holding the exchange (`slot`) until dropped.
    pub fn new(
        events: mpsc::Receiver<Event>,
        id: u64,
        urgent: Arc<Urgent>,
        abandon: Abandon,
        slot: Arc<SlotRef>,
    ) -> Self {
        Self { events, id, urgent, abandon, consumed: 0, done: false, settled: false, _slot: slot }
    }

    /// Boxed as a tunnel body.
    pub fn boxed(self) -> TunnelBody {
        http_body_util::BodyExt::boxed_unsync(self)
    }

    fn consumed(&mut self, len: usize) {
        self.consumed = self.consumed.saturating_add(cost(len));
        if self.consumed >= CREDIT_BATCH {
            self.urgent.credit(self.id, std::mem::take(&mut self.consumed));
        }
    }
}

impl Body for EventBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let event = std::task::ready!(this.events.poll_recv(cx));
        Poll::Ready(match event {
            Some(Event::Body(bytes)) => {
                this.consumed(bytes.len());
                Some(Ok(Frame::data(bytes)))
            }
            Some(Event::Trailers(map)) => {
                // Trailers are the last frame; a reader may not poll for the end after them.
                this.settled = true;
                Some(Ok(Frame::trailers(map)))
            }
            Some(Event::End) => {
                this.done = true;
                this.settled = true;
                None
            }
            Some(Event::Reset(code)) => {
                this.done = true;
                this.settled = true;
                Some(Err(BodyError::Reset(code)))
            }
            Some(Event::Head(_)) => {
                this.done = true;
                Some(Err(BodyError::Closed("a second head inside a body".into())))
            }
            None => {
                this.done = true;
                this.settled = true;
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
            Event::Reset(StreamCode::Malformed)
        }
    }
}

/// Where one exchange's body goes to the peer: chunk messages within the exchange's credit, then
/// its trailers and its end, for [`quictun_core::body::pump`]. Waits for credit and for room in
/// the outbound queue (backpressure).
#[derive(Debug)]
pub struct GrpcSink {
    outbound: mpsc::Sender<TunnelMessage>,
    urgent: Arc<Urgent>,
    credit: Arc<SendCredit>,
    id: u64,
    max_trailers: usize,
}

impl GrpcSink {
    /// The body of exchange `id`, sent through `outbound` within `credit`; trailers of at most
    /// `max_trailers` encoded bytes; resets go through `urgent`.
    pub fn new(
        outbound: mpsc::Sender<TunnelMessage>,
        urgent: Arc<Urgent>,
        credit: Arc<SendCredit>,
        id: u64,
        max_trailers: usize,
    ) -> Self {
        Self { outbound, urgent, credit, id, max_trailers }
    }

    async fn send(&self, payload: Payload) -> Result<(), SinkError> {
        self.outbound.send(TunnelMessage::new(self.id, payload)).await.map_err(|_| SinkError::Lost)
    }
}

impl BodySink for GrpcSink {
    async fn send_data(&mut self, mut data: Bytes) -> Result<(), SinkError> {
        while !data.is_empty() {
            let Some(available) = self.credit.acquire().await else { return Err(SinkError::Stopped) };
            let take = data.len().min(MAX_CHUNK).min(usize::try_from(available).unwrap_or(usize::MAX));
            let chunk = data.split_to(take);
            self.credit.spend(cost(chunk.len()));
            self.send(Payload::Body(chunk)).await?;
        }
        Ok(())
    }

    async fn send_trailers(&mut self, trailers: http::HeaderMap) -> Result<(), SinkError> {
        let encoded = frame::encode_payload(&trailers_to_wire(&trailers), self.max_trailers)
            .map_err(|e| SinkError::TrailersTooLarge(e.to_string()))?;
        self.send(Payload::Trailers(Bytes::from(encoded))).await
    }

    async fn finish(&mut self) -> Result<(), SinkError> {
        self.send(Payload::End(true)).await
    }

    fn reset(&mut self, code: StreamCode) {
        // A body the peer stopped (or a tunnel that is gone) needs no reset; on the gRPC stream
        // it would also end the exchange's other direction, which the peer still reads.
        if !self.credit.is_stopped() {
            self.urgent.reset(self.id, code);
        }
    }

    async fn stopped(&mut self) {
        self.credit.stopped().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heads and bodies queued from another thread come out head first, for every exchange,
    /// however the writer's polls interleave with the queueing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_head_always_goes_before_its_body() {
        const EXCHANGES: u64 = 100_000;
        let (mut outbound, senders) = Outbound::new();
        let producer = tokio::spawn(async move {
            for id in 1..=EXCHANGES {
                senders.heads.send(TunnelMessage::new(id, Payload::ResponseHead(Bytes::new()))).await.unwrap();
                senders.data.send(TunnelMessage::new(id, Payload::Body(Bytes::new()))).await.unwrap();
                // Mostly empty queues: the writer polls them while they are being filled.
                tokio::task::yield_now().await;
            }
        });
        let mut headed = std::collections::HashSet::new();
        let mut bodies = 0;
        while bodies < EXCHANGES {
            let message = std::future::poll_fn(|cx| outbound.poll_next(cx)).await.unwrap();
            match message.payload {
                Some(Payload::ResponseHead(_)) => assert!(headed.insert(message.request_id)),
                Some(Payload::Body(_)) => {
                    assert!(headed.contains(&message.request_id), "body of {} before its head", message.request_id);
                    bodies += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        producer.await.unwrap();
    }
}
