//! Requests from the other relays of the cluster: a relay that dials the agent listener and says
//! [`PeerHello`] with the cluster's secret gets a link, and each stream it opens carries one
//! request for an agent of this relay ([`Target::Peer`]). What arrives goes through the dispatch
//! half like an ingress request, to this relay's agents only (one hop: never to another relay),
//! under its request id; a failure is answered as the ingress would answer it (status and text),
//! so the client of the first relay sees the same page.
//!
//! A peer with a wrong secret, or from a relay with no `[cluster]`, is refused and the connection
//! closed; nothing it sends before the handshake completes (QUIC 0-RTT data, which could be a
//! replay) is served.

use std::sync::Arc;

use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use quictun_core::body::TunnelBody;
use quictun_core::control::ControlIo;
use quictun_core::http::headers_to_wire;
use quictun_core::logsafe::Inert;
use quictun_core::transport::Connection;
use quictun_core::tunnel::{Admission, Answer, BoxFuture, RequestHandler};
use quictun_proto::{
    ControlMessage, Limits, PROTOCOL_VERSION, PeerAccepted, PeerHello, PeerRequest, RejectCode, Rejected, RequestHead,
    ResponseHead, StreamCode, Target,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::balance::Balance;
use crate::peers::PeerMetrics;
use crate::proxy::dispatch::{BodyChecks, Dispatch, dispatch};
use crate::proxy::error::ProxyError;
use crate::sessions::{Pool, StreamKind};
use crate::state::RelayState;

/// Whether the relay that said `hello` may link to this one: `Err` says why not (a relay with
/// no `[cluster]`, another protocol version, not the cluster's secret, shutting down).
pub fn admit(hello: &PeerHello, shared: &RelayState) -> Result<(), Rejected> {
    let refused = |code, message: &str| Err(Rejected { code, message: message.to_owned() });
    let Some(cluster) = &shared.runtime.cluster else {
        return refused(RejectCode::BadToken, "this relay is in no cluster");
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return refused(RejectCode::VersionMismatch, "another protocol version");
    }
    if !cluster.peers.admits(&hello.token) {
        cluster.peers.metrics.refused.inc();
        return refused(RejectCode::BadToken, "not the cluster's secret");
    }
    if shared.runtime.shutdown.is_cancelled() {
        return refused(RejectCode::ShuttingDown, "relay is shutting down");
    }
    Ok(())
}

/// Serves the peer relay of `connection`, let in by [`admit`], until the link ends.
/// `admission` holds its place among the connections not registered yet until its handshake is
/// complete.
pub async fn serve_peer<C: ControlIo>(
    connection: Connection<C>,
    hello: PeerHello,
    shared: Arc<RelayState>,
    admission: Admission,
) {
    let Connection { mut control, tunnel, .. } = connection;
    let span = info_span!("peer", peer = %Inert(&hello.relay_id));
    async move {
        let Some(cluster) = shared.runtime.cluster.as_ref() else { return };
        // Its requests are served only once the handshake is complete: never on early data.
        if !tunnel.handshake_complete().await {
            return;
        }
        drop(admission);
        let accepted = PeerAccepted { relay_id: cluster.directory.relay_id().to_owned() };
        if let Err(err) = control.send(ControlMessage::PeerAccepted(accepted)).await {
            return warn!(%err, "could not answer the peer relay");
        }
        tunnel.allow_incoming_exchanges(cluster.max_streams_per_peer);
        info!(remote = %tunnel.remote_addr(), "peer relay linked");
        cluster.peers.metrics.links.inc();
        let served = PeerMetrics::of(&cluster.peers.metrics.served, &hello.relay_id).clone();
        let handler = Arc::new(PeerRequests { shared: shared.clone(), peer: hello.relay_id.clone(), served });
        let stop = CancellationToken::new();
        let serving = tunnel.serve(handler, shared.runtime.tasks.clone(), stop.clone());
        let control_ended = async {
            loop {
                if let Err(err) = control.recv().await {
                    return err;
                }
            }
        };
        tokio::select! {
            reason = serving => info!(?reason, "peer relay link ended"),
            err = control_ended => info!(%err, "peer relay's control stream ended"),
            () = shared.runtime.stopped.cancelled() => {}
        }
        stop.cancel();
        tunnel.close(quictun_proto::CloseCode::Normal);
        cluster.peers.metrics.links.dec();
    }
    .instrument(span)
    .await;
}

/// Serves the requests one peer relay forwards.
struct PeerRequests {
    shared: Arc<RelayState>,
    peer: String,
    /// `quictun_cluster_served_total{peer}`.
    served: Counter,
}

impl PeerRequests {
    async fn answer(&self, head: RequestHead, body: TunnelBody) -> Answer {
        let RequestHead { target, request_id, method, uri, headers, has_body, framed_body } = head;
        let Target::Peer(peer_request) = target else { return Err(StreamCode::KindUnsupported) };
        let PeerRequest { group, target, client, hash_key, idempotent } = *peer_request;
        let head = RequestHead { target, request_id, method, uri, headers, has_body, framed_body };
        self.served.inc();
        let kind = if head.has_body { StreamKind::Bulk } else { StreamKind::Request };
        let balance = if hash_key.is_some() { Balance::Hash } else { Balance::default() };
        let request = Dispatch {
            pool: Pool::Group(group.as_str().into()),
            balance,
            hash_key,
            head,
            body,
            idempotent,
            client,
            checks: BodyChecks::default(),
            kind,
            may_forward: false,
        };
        let (status, client_id, answer) = match dispatch(&self.shared, request).await {
            Ok(answered) => {
                let client_id = answered.served.client_id();
                let served = answered.served;
                // The agent's stream slot is held until the body ends.
                let body = answered
                    .body
                    .map_frame(move |frame| {
                        let _held = &served;
                        frame
                    })
                    .boxed_unsync();
                (answered.head.status, Some(client_id), (answered.head, body))
            }
            Err(undelivered) => {
                let answer = refusal(&undelivered.error);
                (answer.0.status, undelivered.agent, answer)
            }
        };
        info!(
            target: "quictun::access",
            request_id = %request_id,
            peer = %Inert(&self.peer),
            group = %Inert(&group),
            status,
            client_id = %client_id.as_deref().unwrap_or("-"),
            "forwarded from a peer relay"
        );
        Ok(answer)
    }
}

impl RequestHandler for PeerRequests {
    fn handle(&self, head: RequestHead, body: TunnelBody) -> BoxFuture<'_, Answer> {
        Box::pin(self.answer(head, body))
    }

    fn limits(&self) -> Limits {
        self.shared.settings.limits
    }
}

/// The answer the ingress gives for `error`, as a response head and body.
fn refusal(error: &ProxyError) -> (ResponseHead, TunnelBody) {
    let headers = headers_to_wire(&error.headers());
    quictun_core::body::text_answer(error.status().as_u16(), &error.to_string(), headers)
}
