//! TCP tunnels on the relay: each `[[tcp]]` entry listens on a TCP port; every accepted connection
//! is carried to an agent of the entry's group on its own stream
//! ([`quictun_proto::Target::Tcp`]), and spliced once the agent has connected to the
//! upstream. Each side's FIN is passed on as a half-close. A connection that cannot be carried
//! (no agent, agent busy, upstream unreachable, the relay's connection budget or the client
//! address's `max_requests_per_ip` reached) is closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::upgrade::{channel_body, splice};
use quictun_proto::{RequestHead, Target};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};
use uuid::Uuid;

use crate::balance::Choice;
use crate::config::TcpEntry;
use crate::metrics::Reject;
use crate::state::Runtime;

/// Accepts connections on one `[[tcp]]` listener until shutdown.
pub async fn serve(listener: TcpListener, entry: TcpEntry, runtime: Arc<Runtime>, response_timeout: Duration) {
    let entry = Arc::new(entry);
    loop {
        let (stream, peer) = tokio::select! {
            _ = runtime.shutdown.cancelled() => break,
            accepted = quictun_core::accept_tcp(&listener, "TCP tunnel") => accepted,
        };
        let Ok(budget_slot) = runtime.connections.clone().try_acquire_owned() else {
            runtime.metrics.reject(Reject::connection_limit);
            debug!(%peer, "TCP connection refused: the relay's connection budget is exhausted");
            continue;
        };
        let Some(address_slot) = runtime.requests_per_ip.admit(peer.ip()) else {
            runtime.metrics.reject(Reject::ip_requests);
            debug!(%peer, "TCP connection refused: too many from this address");
            continue;
        };
        let (runtime2, entry2) = (runtime.clone(), entry.clone());
        let id = Uuid::new_v4();
        let span =
            info_span!("tcp", request_id = %id, %peer, upstream = %entry.upstream, client_id = tracing::field::Empty);
        runtime.tasks.spawn(
            async move {
                carry(stream, peer, id, entry2, runtime2, response_timeout).await;
                drop((budget_slot, address_slot));
            }
            .instrument(span),
        );
    }
}

/// Carries one accepted connection through an agent of the entry's group.
async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    request_id: Uuid,
    entry: Arc<TcpEntry>,
    runtime: Arc<Runtime>,
    response_timeout: Duration,
) {
    let Some(session) = runtime.sessions.choose(&entry.group, &Choice::default()) else {
        runtime.metrics.reject(Reject::no_agent);
        return warn!(group = %entry.group, "TCP connection refused: no agent of the group is connected");
    };
    tracing::Span::current().record("client_id", &*session.client_id);
    let Some(_slot) = session.try_stream_permit() else {
        runtime.metrics.reject(Reject::agent_busy);
        return warn!("TCP connection refused: the agent is at its stream limit");
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
    tokio::select! {
        () = splice(stream, from_agent, to_agent) => debug!("TCP connection ended"),
        () = runtime.stopped.cancelled() => debug!("TCP connection cut at shutdown"),
    }
}
