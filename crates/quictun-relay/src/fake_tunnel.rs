//! A tunnel that carries no traffic, for unit tests of session bookkeeping and agent choice.

use std::sync::Arc;
use std::time::Duration;

use quictun_core::body::TunnelBody;
use quictun_core::tunnel::{BoxFuture, CloseReason, ExchangeError, RequestHandler, TransportKind, Tunnel};
use quictun_proto::{CloseCode, RequestHead, ResponseHead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sessions::Session;

/// Called with the close code when the relay closes the tunnel.
type OnClose = Box<dyn Fn(CloseCode) + Send + Sync>;

/// Refuses every exchange; runs `on_close` (if any) when closed.
#[derive(Default)]
pub(crate) struct FakeTunnel {
    pub(crate) on_close: Option<OnClose>,
    /// The datagram count it reports, when it counts (set by the test).
    pub(crate) datagrams: Option<Arc<std::sync::atomic::AtomicU64>>,
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
}

/// A session of client `id` in `group` over `tunnel`, heard from just now (every such session of
/// one client is the same instance: a new one replaces the old).
pub(crate) fn session_on(id: &str, group: &str, tunnel: FakeTunnel) -> Arc<Session> {
    instance_on(id, uuid::Uuid::nil(), group, tunnel)
}

/// A session of instance `instance` of client `id` in `group` over `tunnel`.
pub(crate) fn instance_on(id: &str, instance: uuid::Uuid, group: &str, tunnel: FakeTunnel) -> Arc<Session> {
    let (commands, _) = tokio::sync::mpsc::channel(1);
    let s = Arc::new(Session::new(id, instance, group, Arc::new(tunnel), 16, Duration::from_secs(60), commands));
    s.heard();
    s
}
