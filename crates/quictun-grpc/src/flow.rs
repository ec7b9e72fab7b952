//! Flow control per exchange, as HTTP/2 does it per stream, so that no exchange can hold up the
//! tunnel stream.
//!
//! A sender may have at most [`EXCHANGE_WINDOW`] bytes of an exchange's body that the receiving
//! end's reader has not consumed; each body message costs its length, at least [`MIN_COST`]. The
//! receiver grants more ([`crate::messages::Payload::Credit`]) as its reader consumes, a quarter
//! window at a time. So an exchange's event queue always has room for what its sender may send,
//! the task reading the tunnel stream never waits for a reader, and a reader that stops reading
//! holds its own window and nothing else. Credits, stops and resets travel in the [`Urgent`]
//! lane, ahead of body data; control messages go ahead of both.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Context;

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use quictun_proto::StreamCode;

use crate::messages::{Payload, TunnelMessage};

/// Body bytes a sender may have unconsumed at the receiver, per exchange.
pub const EXCHANGE_WINDOW: u32 = 8 << 20;
/// What the smallest body message costs, so that a window also bounds the message count.
pub const MIN_COST: u32 = 4096;
/// Events an exchange's queue holds: a full window of the smallest messages, and its head,
/// trailers, end and reset.
pub const EVENT_QUEUE: usize = (EXCHANGE_WINDOW / MIN_COST) as usize + 4;
/// Consumed bytes the receiver gathers before granting them back.
pub const CREDIT_BATCH: u32 = EXCHANGE_WINDOW / 4;

/// The credit a body message of `len` bytes costs.
pub fn cost(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX).max(MIN_COST)
}

/// A sender's credit for one exchange's body. One task waits on it at a time (the body's pump).
#[derive(Debug)]
pub struct SendCredit {
    available: AtomicU64,
    /// Set when the sender must stop: the peer stopped or reset the exchange, or the tunnel is
    /// gone.
    stopped: AtomicBool,
    /// Wakes the waiting pump on a grant or a stop.
    changed: Notify,
}

impl Default for SendCredit {
    /// A full window.
    fn default() -> Self {
        Self {
            available: AtomicU64::new(u64::from(EXCHANGE_WINDOW)),
            stopped: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }
}

impl SendCredit {
    /// The receiver consumed `n` more bytes.
    pub fn grant(&self, n: u32) {
        self.available.fetch_add(u64::from(n), Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// The sender must stop (the peer will not read more, or the tunnel is gone).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// True once the sender must stop.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves when the sender must stop.
    pub async fn stopped(&self) {
        while !self.stopped.load(Ordering::Acquire) {
            self.changed.notified().await;
        }
    }

    /// Waits until at least [`MIN_COST`] may be sent and returns how much may; `None` once
    /// stopped.
    pub async fn acquire(&self) -> Option<u64> {
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return None;
            }
            let available = self.available.load(Ordering::Acquire);
            if available >= u64::from(MIN_COST) {
                return Some(available);
            }
            self.changed.notified().await;
        }
    }

    /// Spends `n` of the credit [`SendCredit::acquire`] reported.
    pub fn spend(&self, n: u32) {
        let n = u64::from(n);
        let _spent = self.available.fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| Some(a.saturating_sub(n)));
    }
}

#[derive(Debug, Default)]
struct Signals {
    credit: u32,
    stop: Option<StreamCode>,
    reset: Option<StreamCode>,
}

/// Messages about exchanges that go ahead of body data: credit grants, stops and resets, at most
/// one pending entry per exchange (grants add up), so the lane is bounded by the exchanges in
/// flight.
#[derive(Debug, Default)]
pub struct Urgent {
    pending: Mutex<(HashMap<u64, Signals>, VecDeque<u64>)>,
    /// How many exchanges have signals pending (read without the lock on every poll).
    count: AtomicUsize,
    waker: AtomicWaker,
}

impl Urgent {
    fn update(&self, id: u64, change: impl FnOnce(&mut Signals)) {
        {
            let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let (signals, order) = &mut *guard;
            let entry = signals.entry(id).or_insert_with(|| {
                order.push_back(id);
                Signals::default()
            });
            change(entry);
            self.count.store(signals.len(), Ordering::Release);
        }
        self.waker.wake();
    }

    /// Grants the sender of exchange `id` `n` more bytes.
    pub fn credit(&self, id: u64, n: u32) {
        self.update(id, |s| s.credit = s.credit.saturating_add(n));
    }

    /// Tells the sender of exchange `id` to stop its body (`code`); the other direction goes on.
    pub fn stop(&self, id: u64, code: StreamCode) {
        self.update(id, |s| s.stop = Some(code));
    }

    /// Resets exchange `id` with `code`: both directions end.
    pub fn reset(&self, id: u64, code: StreamCode) {
        self.update(id, |s| s.reset = Some(code));
    }

    /// The next urgent message, registering `cx` to be woken when one comes.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Option<TunnelMessage> {
        self.waker.register(cx.waker());
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (signals, order) = &mut *guard;
        while let Some(id) = order.front().copied() {
            let Some(entry) = signals.get_mut(&id) else {
                order.pop_front();
                continue;
            };
            let payload = if let Some(code) = entry.reset.take() {
                entry.credit = 0;
                entry.stop = None;
                Payload::Reset(code.to_u32())
            } else if let Some(code) = entry.stop.take() {
                entry.credit = 0;
                Payload::Stop(code.to_u32())
            } else {
                Payload::Credit(std::mem::take(&mut entry.credit))
            };
            signals.remove(&id);
            order.pop_front();
            self.count.store(signals.len(), Ordering::Release);
            if !matches!(payload, Payload::Credit(0)) {
                return Some(TunnelMessage::new(id, payload));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credit_is_spent_and_granted_and_a_stop_ends_the_wait() {
        let credit = SendCredit::default();
        assert_eq!(credit.acquire().await, Some(u64::from(EXCHANGE_WINDOW)));
        credit.spend(EXCHANGE_WINDOW - 100);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), credit.acquire()).await;
        assert!(waiting.is_err(), "less than MIN_COST left: the sender waits");
        credit.grant(MIN_COST);
        assert_eq!(credit.acquire().await, Some(u64::from(MIN_COST) + 100));
        credit.spend(MIN_COST);
        credit.stop();
        assert_eq!(credit.acquire().await, None);
    }

    #[test]
    fn urgent_signals_coalesce_per_exchange_and_a_reset_wins() {
        let urgent = Urgent::default();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        urgent.credit(1, 10);
        urgent.credit(2, 5);
        urgent.credit(1, 20);
        urgent.stop(3, StreamCode::Cancelled);
        urgent.credit(3, 7);
        urgent.reset(2, StreamCode::Malformed);
        let drained: Vec<_> = std::iter::from_fn(|| urgent.poll_next(&mut cx)).collect();
        assert_eq!(
            drained,
            vec![
                TunnelMessage::new(1, Payload::Credit(30)),
                TunnelMessage::new(2, Payload::Reset(StreamCode::Malformed.to_u32())),
                TunnelMessage::new(3, Payload::Stop(StreamCode::Cancelled.to_u32())),
            ]
        );
    }
}
