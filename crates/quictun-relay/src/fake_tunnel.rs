//! A tunnel that carries no traffic, for unit tests of session bookkeeping and agent choice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quictun_core::body::TunnelBody;
use quictun_core::tunnel::{
    BoxFuture, CloseReason, DatagramError, DatagramSupport, ExchangeError, RequestHandler, TransportKind, Tunnel,
};
use quictun_proto::datagram::FlowId;
use quictun_proto::{CloseCode, RequestHead, ResponseHead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sessions::{Session, SessionLimits};

/// Called with the close code when the relay closes the tunnel.
type OnClose = Box<dyn Fn(CloseCode) + Send + Sync>;

/// Refuses every exchange; runs `on_close` (if any) when closed; when given a loop, carries
/// datagrams back to itself.
#[derive(Default)]
pub(crate) struct FakeTunnel {
    pub(crate) on_close: Option<OnClose>,
    /// The datagram count it reports, when it counts (set by the test).
    pub(crate) datagrams: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Datagrams sent come back on this loop (at most `max_payload` bytes each).
    pub(crate) datagram_loop: Option<DatagramLoop>,
}

/// A loop that hands a tunnel's sent datagrams back to its reader.
pub(crate) struct DatagramLoop {
    max_payload: usize,
    sender: tokio::sync::mpsc::Sender<(FlowId, Bytes)>,
    receiver: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(FlowId, Bytes)>>,
}

impl DatagramLoop {
    /// A loop of `max_payload`-byte datagrams holding at most `depth` of them.
    pub(crate) fn new(max_payload: usize, depth: usize) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::channel(depth);
        Self { max_payload, sender, receiver: tokio::sync::Mutex::new(receiver) }
    }
}

impl std::fmt::Debug for FakeTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeTunnel")
    }
}

impl Tunnel for FakeTunnel {
    fn open(
        &self,
        _: RequestHead,
        _: TunnelBody,
        _: Option<std::net::IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), ExchangeError>> {
        Box::pin(async { Err(ExchangeError::NotOpened) })
    }
    fn close(&self, code: CloseCode) {
        if let Some(on_close) = &self.on_close {
            on_close(code);
        }
    }
    fn is_closed(&self) -> bool {
        false
    }
    fn closed(&self) -> BoxFuture<'_, CloseReason> {
        Box::pin(std::future::pending())
    }
    fn serve(&self, _: Arc<dyn RequestHandler>, _: TaskTracker, _: CancellationToken) -> BoxFuture<'_, CloseReason> {
        Box::pin(std::future::pending())
    }
    fn remote_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1))
    }
    fn transport(&self) -> TransportKind {
        TransportKind::Quic
    }
    fn datagrams_received(&self) -> Option<u64> {
        self.datagrams.as_ref().map(|count| count.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn datagram_support(&self) -> DatagramSupport {
        match &self.datagram_loop {
            Some(looped) => DatagramSupport::Native { max_payload: looped.max_payload },
            None => DatagramSupport::None,
        }
    }
    fn send_datagram(&self, flow: FlowId, payload: Bytes) -> Result<(), DatagramError> {
        let looped = self.datagram_loop.as_ref().ok_or(DatagramError::Unsupported)?;
        if payload.len() > looped.max_payload {
            return Err(DatagramError::TooLarge { len: payload.len(), max: looped.max_payload });
        }
        // Dropped when the loop is full, as a datagram is.
        let _dropped = looped.sender.try_send((flow, payload));
        Ok(())
    }
    fn recv_datagram(&self) -> BoxFuture<'_, Result<(FlowId, Bytes), DatagramError>> {
        Box::pin(async move {
            let looped = self.datagram_loop.as_ref().ok_or(DatagramError::Unsupported)?;
            looped.receiver.lock().await.recv().await.ok_or(DatagramError::Closed)
        })
    }
}

/// A session of client `id` in `group` over `tunnel`, heard from just now (every such session of
/// one client is the same instance: a new one replaces the old).
pub(crate) fn session_on(id: &str, group: &str, tunnel: FakeTunnel) -> Arc<Session> {
    instance_on(id, uuid::Uuid::nil(), group, tunnel)
}

/// A session of instance `instance` of client `id` in `group` over `tunnel`.
pub(crate) fn instance_on(id: &str, instance: uuid::Uuid, group: &str, tunnel: FakeTunnel) -> Arc<Session> {
    let (commands, _) = tokio::sync::mpsc::channel(1);
    let limits = SessionLimits {
        max_streams: 16,
        max_bulk_streams: 16,
        heartbeat_interval: Duration::from_secs(60),
        silent_after: Some(crate::sessions::SILENT_AFTER),
    };
    let s = Arc::new(Session::new(id, instance, group, Arc::new(tunnel), limits, commands));
    s.heard();
    s
}

#[cfg(test)]
mod tests {
    use quictun_core::datagram::{FlowBudget, FlowQueue};

    use super::*;

    /// The datagram place in the seam, as a relay would use it: flows admitted within a budget,
    /// each flow's datagrams tagged and carried, a full queue dropping rather than waiting.
    #[tokio::test]
    async fn flows_of_datagrams_cross_the_seam_within_their_budgets() {
        let plain: Arc<dyn Tunnel> = Arc::new(FakeTunnel::default());
        assert_eq!(plain.datagram_support(), DatagramSupport::None);
        assert_eq!(plain.send_datagram(1, Bytes::new()), Err(DatagramError::Unsupported));
        assert_eq!(plain.recv_datagram().await, Err(DatagramError::Unsupported));

        let tunnel: Arc<dyn Tunnel> =
            Arc::new(FakeTunnel { datagram_loop: Some(DatagramLoop::new(1200, 8)), ..FakeTunnel::default() });
        assert_eq!(tunnel.datagram_support(), DatagramSupport::Native { max_payload: 1200 });
        let budget = FlowBudget::new(2);
        let flows: Vec<_> = (0..3).map(|_| budget.admit()).collect();
        assert_eq!(flows.iter().filter(|f| f.is_some()).count(), 2, "a third flow is over the budget");
        for flow in [7, 9] {
            tunnel.send_datagram(flow, Bytes::from(format!("to {flow}"))).unwrap();
        }
        let (queue, mut waiting) = FlowQueue::new(1);
        for _ in 0..2 {
            let (flow, payload) = tunnel.recv_datagram().await.unwrap();
            assert_eq!(payload, Bytes::from(format!("to {flow}")));
            queue.push(payload);
        }
        assert_eq!(queue.dropped(), 1, "the flow's queue holds one; the second is dropped, not waited for");
        assert_eq!(waiting.recv().await.unwrap(), Bytes::from_static(b"to 7"));
        let too_large = Bytes::from(vec![0u8; 1201]);
        assert_eq!(tunnel.send_datagram(1, too_large), Err(DatagramError::TooLarge { len: 1201, max: 1200 }));
    }
}
