//! WebSocket and other HTTP/1.1 upgrades on the ingress: the request goes to the agent as a
//! [`quictun_proto::Target::Upgrade`] stream with its `Connection: upgrade` and `Upgrade`
//! headers; when the agent answers 101 the client's connection is spliced to the stream (raw bytes
//! both ways, half-closes passed on) in a task the relay owns. Upgraded connections have no idle
//! timeout: WebSocket connections are idle by nature and have their own pings.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use quictun_core::body::TunnelBody;
use quictun_core::upgrade::{FrameSender, splice};
use quictun_proto::Header;
use tracing::{Instrument, debug};

use crate::admission::Slots;
use crate::state::Runtime;

/// The headers hop-by-hop stripping removed that an upgrade must carry to the upstream.
pub fn upgrade_headers(headers: &http::HeaderMap) -> Vec<Header> {
    let upgrade = headers.get(http::header::UPGRADE).map(|v| v.as_bytes().to_vec()).unwrap_or_default();
    vec![
        Header { name: "connection".into(), value: b"upgrade".to_vec() },
        Header { name: "upgrade".into(), value: upgrade },
    ]
}

/// The parts of an upgrade request kept until the agent answers.
pub struct Pending {
    /// Resolves to the client's connection once hyper has sent the 101.
    pub on_upgrade: OnUpgrade,
    /// Feeds the client's bytes to the agent.
    pub to_agent: FrameSender,
}

/// Splices the client's connection to the agent's stream once hyper hands it over; the task holds
/// the stream slots and stops when both directions end or the relay stops.
pub fn splice_client<A: Send + 'static>(runtime: &Runtime, pending: Pending, from_agent: TunnelBody, slots: Slots<A>) {
    let stopped = runtime.stopped.clone();
    runtime.tasks.spawn(
        async move {
            let _slots = slots;
            let upgraded = match pending.on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => return debug!(%err, "client connection was not upgraded"),
            };
            tokio::select! {
                _ = splice(TokioIo::new(upgraded), from_agent, pending.to_agent) => {}
                () = stopped.cancelled() => debug!("upgraded connection cut at shutdown"),
            }
        }
        .in_current_span(),
    );
}
