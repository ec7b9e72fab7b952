//! Exchanges on the tunnel stream, in both directions: either end can open one (the relay for an
//! ingress request, the agent for an egress request) and either end serves the ones its peer
//! opens. The machinery is the same on both ends, so it lives here once.
//!
//! Ids tell the directions apart, as HTTP/2 stream ids do: the relay numbers its exchanges from 1,
//! the agent numbers its own with [`AGENT_OPENED`] set. An end refuses a request head whose id
//! says it opened it itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quictun_core::link::{LinkError, RequestHandler, TunnelBody, empty_body};
use quictun_proto::{Limits, RequestHead, ResponseHead, StreamCode, frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use crate::messages::{Payload, TunnelMessage};
use crate::mux::{EXCHANGE_QUEUE, Event, EventBody, Pending, deliver, send_body, trailers_event};

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

/// A request the peer opened: its id, head, and body event queue.
pub struct IncomingExchange {
    id: u64,
    head: RequestHead,
    body: Option<mpsc::Receiver<Event>>,
}

impl std::fmt::Debug for IncomingExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncomingExchange").field("id", &self.id).finish_non_exhaustive()
    }
}

/// One end's exchanges: the queue towards the peer and the table of exchanges in flight.
#[derive(Debug)]
pub struct Exchanges {
    /// Messages towards the peer (bounded).
    pub outbound: mpsc::Sender<TunnelMessage>,
    /// Exchanges in flight, both directions (their ids never collide).
    pub pending: Pending,
    /// Frame limits for heads and trailers.
    pub limits: Limits,
    /// Cancelled once the tunnel stream is gone (see [`Exchanges::close`]).
    pub closed: CancellationToken,
    end: End,
    next_id: AtomicU64,
}

impl Exchanges {
    /// The exchanges of `end`, sending through `outbound`.
    pub fn new(end: End, outbound: mpsc::Sender<TunnelMessage>, limits: Limits) -> Self {
        let first = match end {
            End::Relay => 1,
            End::Agent => AGENT_OPENED | 1,
        };
        let closed = CancellationToken::new();
        Self { outbound, pending: Pending::default(), limits, closed, end, next_id: AtomicU64::new(first) }
    }

    /// The tunnel stream is gone: no exchange opens any more, and every one still waiting learns
    /// it (its event queue closes).
    pub fn close(&self) {
        self.closed.cancel();
        self.pending.clear();
    }

    /// True when the peer, not this end, opened exchange `id`.
    fn peer_opened(&self, id: u64) -> bool {
        (id & AGENT_OPENED != 0) == (self.end == End::Relay)
    }

    /// Opens an exchange: sends the head, streams `body` from a task that lives as long as the
    /// response body, and waits for the response head. Nothing is queued when the outbound queue
    /// is full ([`LinkError::Busy`]) or the tunnel is gone ([`LinkError::NotOpened`]).
    pub async fn open(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), LinkError> {
        if self.closed.is_cancelled() {
            return Err(LinkError::NotOpened);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, mut events) = mpsc::channel(EXCHANGE_QUEUE);
        self.pending.insert(id, events_tx);
        let mut guard =
            ExchangeGuard { pending: self.pending.clone(), outbound: self.outbound.clone(), id, done: false };
        let encoded = frame::encode_payload(&head, self.limits.max_head_frame)
            .map_err(|e| LinkError::HeadTooLarge(e.to_string()))?;
        match self.outbound.try_send(TunnelMessage::new(id, Payload::RequestHead(Bytes::from(encoded)))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                guard.done = true; // nothing reached the peer
                return Err(LinkError::Busy);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                guard.done = true; // nothing reached the peer
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

    /// Routes one message of an exchange (anything but control) to where it belongs. A request
    /// head from the peer becomes an [`IncomingExchange`] on `requests` (a full or closed queue
    /// resets it at once: the reader never waits on request handling).
    pub async fn dispatch(&self, id: u64, payload: Payload, requests: &mpsc::Sender<IncomingExchange>) {
        let event = match payload {
            Payload::RequestHead(bytes) => return self.accept(id, &bytes, requests),
            Payload::ResponseHead(bytes) => {
                match frame::decode_bounded::<ResponseHead>(&bytes, self.limits.max_head_frame) {
                    Ok(head) => Event::Head(head),
                    Err(err) => {
                        warn!(id, %err, "malformed response head");
                        Event::Reset(StreamCode::Malformed.to_u32())
                    }
                }
            }
            Payload::Body(bytes) => Event::Body(bytes),
            Payload::Trailers(bytes) => trailers_event(id, &bytes, &self.limits),
            Payload::End(_) => Event::End,
            Payload::Reset(code) => Event::Reset(code),
            Payload::Control(_) => return debug!(id, "control message dispatched as an exchange message"),
        };
        deliver(&self.pending, &self.outbound, id, event).await;
    }

    fn accept(&self, id: u64, bytes: &[u8], requests: &mpsc::Sender<IncomingExchange>) {
        let reset = |code: StreamCode| {
            let _queue_full = self.outbound.try_send(TunnelMessage::new(id, Payload::Reset(code.to_u32())));
        };
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
        let body = head.has_body.then(|| {
            let (tx, rx) = mpsc::channel(EXCHANGE_QUEUE);
            self.pending.insert(id, tx);
            rx
        });
        match requests.try_send(IncomingExchange { id, head, body }) {
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
        let IncomingExchange { id, head, body } = exchange;
        let limits = handler.limits();
        if let Err(err) = head.validate(&limits) {
            warn!(id, %err, "invalid request head");
            self.pending.remove(&id);
            return self.send_reset(id, StreamCode::Malformed).await;
        }
        let span = info_span!("exchange", request_id = %head.request_id, upstream = %head.upstream);
        let body = match body {
            Some(events) => EventBody::new(events, ()).boxed(),
            None => empty_body(),
        };
        async {
            match handler.handle(head, body).await {
                Ok((response, body)) => {
                    let encoded = match frame::encode_payload(&response, limits.max_head_frame) {
                        Ok(encoded) => encoded,
                        Err(err) => {
                            warn!(%err, "response head too large");
                            return self.send_reset(id, StreamCode::UpstreamFailed).await;
                        }
                    };
                    let head = TunnelMessage::new(id, Payload::ResponseHead(Bytes::from(encoded)));
                    if self.outbound.send(head).await.is_ok() {
                        let max_trailers = self.limits.max_head_frame;
                        send_body(&self.outbound, id, body, StreamCode::UpstreamFailed, max_trailers).await;
                    }
                }
                Err(code) => self.send_reset(id, code).await,
            }
        }
        .instrument(span)
        .await;
        // The response is done; the request may still be arriving (an upgraded or TCP stream
        // whose other direction closed first). The exchange ends when its request body is dropped.
        let request_events = self.pending.get(&id).map(|tx| tx.clone());
        if let Some(tx) = request_events {
            tx.closed().await;
        }
        self.pending.remove(&id);
    }

    /// Tells the peer exchange `id` failed with `code`; a tunnel already gone needs no telling.
    async fn send_reset(&self, id: u64, code: StreamCode) {
        if self.outbound.send(TunnelMessage::new(id, Payload::Reset(code.to_u32()))).await.is_err() {
            debug!(id, ?code, "tunnel gone before the reset could be sent");
        }
    }
}

/// Removes an exchange from the table when it ends, and tells the peer to stop when it ends early
/// (the requester went away, or a deadline passed).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_accepts_only_the_ids_its_peer_opens() {
        let (tx, _rx) = mpsc::channel(1);
        let relay = Exchanges::new(End::Relay, tx.clone(), Limits::default());
        let agent = Exchanges::new(End::Agent, tx, Limits::default());
        let relay_id = relay.next_id.load(Ordering::Relaxed);
        let agent_id = agent.next_id.load(Ordering::Relaxed);
        assert!(agent.peer_opened(relay_id) && !relay.peer_opened(relay_id));
        assert!(relay.peer_opened(agent_id) && !agent.peer_opened(agent_id));
    }
}
