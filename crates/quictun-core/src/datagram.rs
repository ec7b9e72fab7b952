//! Admission for datagram flows (a UDP tunnel's clients): how many flows may be open at once,
//! and how many datagrams each may have waiting. A datagram that does not fit is dropped and
//! counted, never waited for: a flow that floods its queue loses its own datagrams, nobody
//! else's, and nothing blocks the tunnel.
//!
//! What crosses the tunnel is [`crate::tunnel::Tunnel::send_datagram`] and
//! [`crate::tunnel::Tunnel::recv_datagram`]; a flow's id travels in front of each datagram
//! ([`quictun_proto::datagram`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

/// A budget of flows (per listener, per agent, per tunnel): at most `max` open at once.
#[derive(Debug)]
pub struct FlowBudget {
    max: usize,
    open: AtomicUsize,
    refused: AtomicU64,
}

/// One open flow's place in a [`FlowBudget`]; gives it back when dropped.
#[derive(Debug)]
pub struct FlowSlot(Arc<FlowBudget>);

impl FlowBudget {
    /// A budget of `max` flows.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max, open: AtomicUsize::new(0), refused: AtomicU64::new(0) })
    }

    /// A place for one more flow, or `None` (counted) when the budget is full.
    pub fn admit(self: &Arc<Self>) -> Option<FlowSlot> {
        let taken =
            self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < self.max).then_some(open + 1));
        match taken {
            Ok(_) => Some(FlowSlot(self.clone())),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Flows open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Flows refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for FlowSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The datagrams waiting for one flow: a bounded queue that drops what does not fit.
#[derive(Debug, Clone)]
pub struct FlowQueue {
    sender: mpsc::Sender<Bytes>,
    dropped: Arc<AtomicU64>,
}

impl FlowQueue {
    /// A queue of at most `depth` datagrams, and its reading end.
    pub fn new(depth: usize) -> (Self, mpsc::Receiver<Bytes>) {
        let (sender, receiver) = mpsc::channel(depth.max(1));
        (Self { sender, dropped: Arc::new(AtomicU64::new(0)) }, receiver)
    }

    /// Queues `datagram`; false (counted) when the queue is full or its reader gone.
    pub fn push(&self, datagram: Bytes) -> bool {
        let queued = self.sender.try_send(datagram).is_ok();
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_holds_its_flows_and_gets_places_back() {
        let budget = FlowBudget::new(2);
        let first = budget.admit().unwrap();
        let _second = budget.admit().unwrap();
        assert!(budget.admit().is_none());
        assert_eq!((budget.open(), budget.refused()), (2, 1));
        drop(first);
        assert!(budget.admit().is_some());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (queue, mut receiver) = FlowQueue::new(2);
        assert!(queue.push(Bytes::from_static(b"1")) && queue.push(Bytes::from_static(b"2")));
        assert!(!queue.push(Bytes::from_static(b"3")), "a third does not fit");
        assert_eq!(queue.dropped(), 1);
        assert_eq!(receiver.recv().await.unwrap(), Bytes::from_static(b"1"));
        assert!(queue.push(Bytes::from_static(b"4")), "room again");
        drop(receiver);
        assert!(!queue.push(Bytes::from_static(b"5")), "nobody reads");
        assert_eq!(queue.dropped(), 2);
    }
}
