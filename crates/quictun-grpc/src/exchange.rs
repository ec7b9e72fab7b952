//! Exchanges on the tunnel stream, in both directions: either end can open one (the relay for an
//! ingress request, the agent for an egress request) and either end serves the ones its peer
//! opens. The machinery is the same on both ends, so it lives here once.
//!
//! Ids tell the directions apart, as HTTP/2 stream ids do: the relay numbers its exchanges from 1,
//! the agent numbers its own with [`AGENT_OPENED`] set. An end refuses a request head whose id
//! says it opened it itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use quictun_core::body::{AbortOnDrop, TunnelBody, WithUpload, empty_body, pump};
use quictun_core::stall::StallScope;
use quictun_core::tunnel::{BadAnswer, ExchangeError, RequestHandler};
use quictun_proto::{Limits, RequestHead, ResponseHead, StreamCode, frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::flow::{EVENT_QUEUE, SendCredit, Urgent};
use crate::messages::{Payload, TunnelMessage};
use crate::mux::{
    Abandon, Event, EventBody, GrpcSink, OutboundSenders, Pending, Slot, SlotRef, deliver, trailers_event,
};

/// The id bit of exchanges the agent opened.
pub const AGENT_OPENED: u64 = 1 << 63;

/// Which end of the tunnel stream this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The relay: opens exchanges for ingress requests, serves the agent's egress requests.
    Relay,
    /// The agent: serves the relay's exchanges, opens egress exchanges.
    Agent,
}

/// A request the peer opened: its id, head, body event queue and the credit for the answer.
pub struct IncomingExchange {
    id: u64,
    head: RequestHead,
    body: Option<mpsc::Receiver<Event>>,
    credit: Arc<SendCredit>,
}

impl std::fmt::Debug for IncomingExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingExchange").field("id", &self.id).finish_non_exhaustive()
    }
}

/// One end's exchanges: the queues towards the peer and the table of exchanges in flight.
#[derive(Debug)]
pub struct Exchanges {
    /// Heads towards the peer (bounded; ahead of bodies).
    pub heads: mpsc::Sender<TunnelMessage>,
    /// Bodies towards the peer (bounded).
    pub outbound: mpsc::Sender<TunnelMessage>,
    /// Credits, stops and resets towards the peer.
    pub urgent: Arc<Urgent>,
    /// Exchanges in flight, both directions (their ids never collide).
    pub pending: Pending,
    /// Frame limits for heads and trailers.
    pub limits: Limits,
    /// Cancelled once the tunnel stream is gone (see [`Exchanges::close`]).
    pub closed: CancellationToken,
    /// The same, read without a lock on every exchange.
    is_closed: AtomicBool,
    /// Where the bodies read from the peer are watched for stalled readers.
    stall: StallScope,
    end: End,
    next_id: AtomicU64,
}

impl Exchanges {
    /// The exchanges of `end`, sending through `outbound`; bodies from the peer are watched in
    /// `stall`.
    pub fn new(end: End, outbound: &OutboundSenders, limits: Limits, stall: StallScope) -> Self {
        let first = match end {
            End::Relay => 1,
            End::Agent => AGENT_OPENED | 1,
        };
        Self {
            heads: outbound.heads.clone(),
            outbound: outbound.data.clone(),
            urgent: outbound.urgent.clone(),
            pending: Pending::default(),
            limits,
            closed: CancellationToken::new(),
            is_closed: AtomicBool::new(false),
            stall,
            end,
            next_id: AtomicU64::new(first),
        }
    }

    /// The tunnel stream is gone: no exchange opens any more, every sender stops, and every
    /// exchange still waiting learns it (its event queue closes).
    pub fn close(&self) {
        self.is_closed.store(true, Ordering::SeqCst);
        self.closed.cancel();
        for slot in self.pending.iter() {
            slot.credit.stop();
        }
        self.pending.clear();
    }

    /// True once the tunnel stream is gone.
    pub fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::SeqCst)
    }

    /// True when the peer, not this end, opened exchange `id`.
    fn peer_opened(&self, id: u64) -> bool {
        (id & AGENT_OPENED != 0) == (self.end == End::Relay)
    }

    /// A table entry for exchange `id`: its event queue and its send credit.
    fn insert(&self, id: u64) -> (mpsc::Receiver<Event>, Arc<SendCredit>) {
        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let credit = Arc::new(SendCredit::default());
        self.pending.insert(id, Slot { events, credit: credit.clone() });
        if self.is_closed() {
            // Closed while this was being added: `close` may not have seen it.
            credit.stop();
        }
        (receiver, credit)
    }

    /// Opens an exchange: sends the head, streams `body` from a task that lives as long as the
    /// response body, and waits for the response head. Nothing is queued when the head queue is
    /// full ([`ExchangeError::Busy`]) or the tunnel is gone ([`ExchangeError::NotOpened`]). The
    /// response body's credit counts against `client`'s budget too.
    pub async fn open(
        &self,
        head: RequestHead,
        body: TunnelBody,
        client: Option<IpAddr>,
    ) -> Result<(ResponseHead, TunnelBody), ExchangeError> {
        if self.is_closed() {
            return Err(ExchangeError::NotOpened);
        }
        let encoded = frame::encode_payload(&head, self.limits.max_head_frame).map_err(ExchangeError::HeadTooLarge)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (mut events, credit) = self.insert(id);
        let slot = SlotRef::new(self.pending.clone(), id);
        match self.heads.try_send(TunnelMessage::new(id, Payload::RequestHead(Bytes::from(encoded)))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(ExchangeError::Busy),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(ExchangeError::NotOpened),
        }
        // From here the peer knows the exchange: given up before the answer, it is reset.
        let mut abandoned = Abandoned { urgent: &self.urgent, id, armed: true };
        let upload = head.has_body.then(|| {
            let (mut sink, slot) = (self.sink(id, credit), slot.clone());
            AbortOnDrop::new(tokio::spawn(
                async move {
                    if let Err(err) = pump(body, &mut sink, StreamCode::Cancelled).await {
                        debug!(id, %err, "request body upload ended early");
                    }
                    drop(slot);
                }
                .in_current_span(),
            ))
        });
        let answer = match events.recv().await {
            Some(Event::Head(response)) => response,
            Some(Event::Reset(code)) => {
                abandoned.armed = false;
                return Err(ExchangeError::Reset(code));
            }
            Some(_) => return Err(BadAnswer::BodyBeforeHead.into()),
            None => {
                abandoned.armed = false;
                return Err(ExchangeError::Lost);
            }
        };
        answer.validate(&self.limits).map_err(BadAnswer::from)?;
        // The body takes over: it resets the exchange if dropped before its end.
        abandoned.armed = false;
        let upload = upload.and_then(AbortOnDrop::into_inner);
        let body = EventBody::new(events, id, self.urgent.clone(), Abandon::Reset, slot);
        let body = self.stall.watch(body.boxed(), &answer.headers, client);
        Ok((answer, WithUpload::wrap(body, upload)))
    }

    /// Routes one message of an exchange (anything but control) to where it belongs. A request
    /// head from the peer becomes an [`IncomingExchange`] on `requests` (a full or closed queue
    /// resets it at once). Never waits.
    pub fn dispatch(&self, id: u64, payload: Payload, requests: &mpsc::Sender<IncomingExchange>) {
        let event = match payload {
            Payload::RequestHead(bytes) => return self.accept(id, &bytes, requests),
            Payload::ResponseHead(bytes) => {
                match frame::decode_bounded::<ResponseHead>(&bytes, self.limits.max_head_frame) {
                    Ok(head) => Event::Head(head),
                    Err(err) => {
                        warn!(id, %err, "malformed response head");
                        Event::Reset(StreamCode::Malformed)
                    }
                }
            }
            Payload::Body(bytes) => Event::Body(bytes),
            Payload::Trailers(bytes) => trailers_event(id, &bytes, &self.limits),
            Payload::End(_) => Event::End,
            Payload::Reset(code) => Event::Reset(StreamCode::from_wire(u64::from(code))),
            Payload::Credit(n) => {
                if let Some(slot) = self.pending.get(&id) {
                    slot.credit.grant(n);
                }
                return;
            }
            Payload::Stop(code) => {
                if let Some(slot) = self.pending.get(&id) {
                    debug!(id, code, "peer stopped reading the body");
                    slot.credit.stop();
                }
                return;
            }
            Payload::Control(_) => return debug!(id, "control message dispatched as an exchange message"),
        };
        deliver(&self.pending, &self.urgent, id, event);
    }

    fn accept(&self, id: u64, bytes: &[u8], requests: &mpsc::Sender<IncomingExchange>) {
        let reset = |code: StreamCode| self.urgent.reset(id, code);
        if !self.peer_opened(id) || self.pending.contains_key(&id) {
            warn!(id, "request head with an id the peer may not use");
            return reset(StreamCode::Malformed);
        }
        let head = match frame::decode_bounded::<RequestHead>(bytes, self.limits.max_head_frame) {
            Ok(head) => head,
            Err(err) => {
                warn!(id, %err, "bad request head");
                let too_large = matches!(err, frame::FrameError::TooLarge { .. });
                return reset(if too_large { StreamCode::HeadTooLarge } else { StreamCode::Malformed });
            }
        };
        let (events, credit) = self.insert(id);
        let body = head.has_body.then_some(events);
        match requests.try_send(IncomingExchange { id, head, body, credit }) {
            Ok(()) => {}
            Err(refused) => {
                self.pending.remove(&id);
                let full = matches!(refused, mpsc::error::TrySendError::Full(_));
                reset(if full { StreamCode::Overloaded } else { StreamCode::ShuttingDown });
            }
        }
    }

    /// Serves an exchange the peer opened with `handler`: checks the head, hands the request
    /// over, and sends back the response head and body (or a reset with the handler's code).
    pub async fn serve(self: Arc<Self>, handler: Arc<dyn RequestHandler>, exchange: IncomingExchange) {
        let IncomingExchange { id, head, body, credit } = exchange;
        let slot = SlotRef::new(self.pending.clone(), id);
        let limits = handler.limits();
        if let Err(err) = head.validate(&limits) {
            warn!(id, %err, "invalid request head");
            return self.send_reset(id, StreamCode::Malformed);
        }
        let span = info_span!("exchange", request_id = %head.request_id, target = %head.target);
        let body = match body {
            Some(events) => {
                let body = EventBody::new(events, id, self.urgent.clone(), Abandon::Stop, slot.clone());
                self.stall.watch(body.boxed(), &head.headers, None)
            }
            None => empty_body(),
        };
        async {
            match handler.handle(head, body).await {
                Ok((response, body)) => {
                    let encoded = match frame::encode_payload(&response, limits.max_head_frame) {
                        Ok(encoded) => encoded,
                        Err(err) => {
                            warn!(%err, "response head too large");
                            return self.send_reset(id, StreamCode::UpstreamFailed);
                        }
                    };
                    let head = TunnelMessage::new(id, Payload::ResponseHead(Bytes::from(encoded)));
                    if self.heads.send(head).await.is_ok() {
                        let mut sink = self.sink(id, credit);
                        match pump(body, &mut sink, StreamCode::UpstreamFailed).await {
                            Ok(bytes) => debug!(status = response.status, bytes, "response sent"),
                            Err(err) => debug!(%err, "response body ended early"),
                        }
                    }
                }
                Err(code) => self.send_reset(id, code),
            }
        }
        .instrument(span)
        .await;
        // The response is done; the request may still be arriving (an upgraded or TCP stream
        // whose other direction closed first): the exchange ends when its request body is dropped.
        drop(slot);
    }

    /// Tells the peer exchange `id` failed with `code` (ahead of body data).
    fn send_reset(&self, id: u64, code: StreamCode) {
        self.urgent.reset(id, code);
    }

    /// The sink of exchange `id`'s body towards the peer, within `credit`.
    fn sink(&self, id: u64, credit: Arc<SendCredit>) -> GrpcSink {
        GrpcSink::new(self.outbound.clone(), self.urgent.clone(), credit, id, self.limits.max_head_frame)
    }
}

/// Resets an opened exchange when its opener gives up before the answer (a deadline passed, the
/// requester went away).
struct Abandoned<'a> {
    urgent: &'a Urgent,
    id: u64,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.urgent.reset(self.id, StreamCode::Cancelled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_core::stall::{Reclaimer, StallLimits};

    #[test]
    fn each_end_accepts_only_the_ids_its_peer_opens() {
        let (_outbound, senders) = crate::mux::Outbound::new();
        let scope = Reclaimer::new(StallLimits::default()).scope(1);
        let relay = Exchanges::new(End::Relay, &senders, Limits::default(), scope.clone());
        let agent = Exchanges::new(End::Agent, &senders, Limits::default(), scope);
        let relay_id = relay.next_id.load(Ordering::Relaxed);
        let agent_id = agent.next_id.load(Ordering::Relaxed);
        assert!(agent.peer_opened(relay_id) && !relay.peer_opened(relay_id));
        assert!(relay.peer_opened(agent_id) && !agent.peer_opened(agent_id));
    }
}
