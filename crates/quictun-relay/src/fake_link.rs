//! A link that carries no traffic, for unit tests of session bookkeeping and agent choice.

use std::sync::Arc;
use std::time::Duration;

use quictun_core::link::{AgentLink, BoxFuture, LinkError, TunnelBody};
use quictun_proto::{CloseCode, RequestHead, ResponseHead};

use crate::sessions::Session;

/// Called with the close code when the relay closes the link.
type OnClose = Box<dyn Fn(CloseCode) + Send + Sync>;

/// Refuses every exchange; runs `on_close` (if any) when closed.
#[derive(Default)]
pub(crate) struct FakeLink {
    pub(crate) on_close: Option<OnClose>,
}

impl std::fmt::Debug for FakeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeLink")
    }
}

impl AgentLink for FakeLink {
    fn exchange(
        &self,
        _: RequestHead,
        _: TunnelBody,
        _: Option<std::net::IpAddr>,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), LinkError>> {
        Box::pin(async { Err(LinkError::NotOpened) })
    }
    fn close(&self, code: CloseCode) {
        if let Some(on_close) = &self.on_close {
            on_close(code);
        }
    }
    fn is_closed(&self) -> bool {
        false
    }
    fn closed(&self) -> BoxFuture<'_, String> {
        Box::pin(std::future::pending())
    }
    fn remote_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1))
    }
    fn transport(&self) -> &'static str {
        "test"
    }
}

/// A session of client `id` in `group` over `link`, heard from just now.
pub(crate) fn session_on(id: &str, group: &str, link: FakeLink) -> Arc<Session> {
    let (commands, _) = tokio::sync::mpsc::channel(1);
    let s = Arc::new(Session::new(id, group, Arc::new(link), 16, Duration::from_secs(60), commands));
    s.heard();
    s
}
