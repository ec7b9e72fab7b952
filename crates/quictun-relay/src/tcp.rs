//! TCP tunnels on the relay: each `[[tcp]]` entry listens on a TCP port; every accepted connection
//! is carried to an agent of the entry's group on its own stream
//! ([`quictun_proto::Target::Tcp`]), and spliced once the agent has connected to the
//! upstream. Each side's FIN is passed on as a half-close.
//!
//! Admission, before anything is opened: the relay's connection budget, the client address's
//! `max_requests_per_ip`, the listener's own `max_connections` and `max_connections_per_ip`, and
//! a place in the agent's bulk share of streams (`bulk_stream_percent`), so that idle tunnel
//! connections can never take the streams HTTP requests need. A connection through which nothing
//! moves for the entry's `idle_timeout_secs` is closed. A connection that cannot be carried is
//! closed at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quictun_core::idle::Watched;
use quictun_core::upgrade::{channel_body, splice};
use quictun_proto::{RequestHead, Target};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};
use uuid::Uuid;

use crate::admission::PerKey;
use crate::balance::Choice;
use crate::config::TcpEntry;
use crate::metrics::Reject;
use crate::sessions::StreamKind;
use crate::state::Runtime;

/// One `[[tcp]]` listener's own budgets.
struct Listener {
    entry: TcpEntry,
    connections: Arc<Semaphore>,
    per_ip: Arc<PerKey<IpAddr>>,
}

/// Accepts connections on one `[[tcp]]` listener until shutdown.
pub async fn serve(listener: TcpListener, entry: TcpEntry, runtime: Arc<Runtime>, response_timeout: Duration) {
    let this = Arc::new(Listener {
        connections: Arc::new(Semaphore::new(entry.max_connections)),
        per_ip: PerKey::new(entry.max_connections_per_ip),
        entry,
    });
    loop {
        let (stream, peer) = tokio::select! {
            _ = runtime.shutdown.cancelled() => break,
            accepted = quictun_core::accept_tcp(&listener, "TCP tunnel") => accepted,
        };
        let Some(slots) = this.admit(&runtime, peer) else { continue };
        let (runtime2, this2) = (runtime.clone(), this.clone());
        let id = Uuid::new_v4();
        let span = info_span!("tcp", request_id = %id, %peer, upstream = %this.entry.upstream, client_id = tracing::field::Empty);
        runtime.tasks.spawn(
            async move {
                carry(stream, peer, id, &this2.entry, runtime2, response_timeout).await;
                drop(slots);
            }
            .instrument(span),
        );
    }
}

impl Listener {
    /// The places a new connection from `peer` holds until it ends, or `None` (the refusal
    /// counted and logged) when one of its budgets is full.
    fn admit(&self, runtime: &Runtime, peer: SocketAddr) -> Option<impl Send + use<>> {
        match self.places(runtime, peer.ip()) {
            Ok(places) => Some(places),
            Err((reason, why)) => {
                runtime.metrics.reject(reason);
                debug!(%peer, listen = %self.entry.listen, "TCP connection refused: {why}");
                None
            }
        }
    }

    /// The relay's connection budget, the address's requests, the listener's connections and
    /// the address's connections on it, in that order; the first that is full says why.
    fn places(&self, runtime: &Runtime, ip: IpAddr) -> Result<impl Send + use<>, (Reject, &'static str)> {
        let full = |reason, why| move |_| (reason, why);
        let budget = runtime
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(full(Reject::connection_limit, "the relay's connection budget is exhausted"))?;
        let address =
            runtime.requests_per_ip.admit(ip).ok_or((Reject::ip_requests, "too many requests from this address"))?;
        let listener = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(full(Reject::tcp_connections, "the listener's max_connections are open"))?;
        let listener_address = self
            .per_ip
            .admit(ip)
            .ok_or((Reject::tcp_connections_per_ip, "this address has max_connections_per_ip open"))?;
        Ok((budget, address, listener, listener_address))
    }
}

/// Carries one accepted connection through an agent of the entry's group.
async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    request_id: Uuid,
    entry: &TcpEntry,
    runtime: Arc<Runtime>,
    response_timeout: Duration,
) {
    let Some(session) = runtime.sessions.choose(&entry.group, &Choice::default()) else {
        runtime.metrics.reject(Reject::no_agent);
        return warn!(group = %entry.group, "TCP connection refused: no agent of the group is connected");
    };
    tracing::Span::current().record("client_id", &*session.client_id);
    let _slot = match session.try_stream_permit(StreamKind::Bulk) {
        Ok(permit) => permit,
        Err(full) => {
            runtime.metrics.reject(Reject::agent_bulk_busy);
            return warn!(%full, "TCP connection refused");
        }
    };
    let head = RequestHead {
        target: Target::Tcp(entry.upstream.clone()),
        request_id,
        method: "CONNECT".into(),
        uri: "/".into(),
        headers: vec![quictun_proto::Header { name: "x-forwarded-for".into(), value: peer.ip().to_string().into() }],
        has_body: true,
        framed_body: false,
    };
    let (to_agent, body) = channel_body();
    let deadline = response_timeout;
    let from_agent = match tokio::time::timeout(deadline, session.tunnel.open(head, body, Some(peer.ip()))).await {
        Ok(Ok((head, from_agent))) if head.status == 200 => from_agent,
        Ok(Ok((head, _))) => return warn!(status = head.status, "agent refused the TCP connection"),
        Ok(Err(err)) => return warn!(%err, "TCP connection could not be carried"),
        Err(_) => return warn!(?deadline, "agent did not connect the TCP upstream in time"),
    };
    let stream = Watched::new(stream);
    let activity = stream.activity();
    let idle = async {
        match entry.idle_timeout() {
            Some(timeout) => activity.idle(timeout).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = splice(stream, from_agent, to_agent) => debug!("TCP connection ended"),
        () = idle => debug!(idle_timeout_secs = entry.idle_timeout_secs, "TCP connection idle: closed"),
        () = runtime.stopped.cancelled() => debug!("TCP connection cut at shutdown"),
    }
}
