//! The dispatch half's way out of a relay: a request for a group with no agent here goes to a
//! relay of the cluster that holds one, on that relay's link ([`crate::peers`]), one stream per
//! request. The head the agent will get is wrapped in [`Target::Peer`] with the group; the
//! request id, the `X-Forwarded-*` headers and the body go through as they are.
//!
//! A relay that cannot be reached, or a stream that could not be opened on its link (nothing
//! was sent), moves the request to the next relay holding the group, once; so does an idempotent
//! request whose link was lost before any of its body went. Anything else is the answer.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_cluster::PeerRelay;
use quictun_core::body::TunnelBody;
use quictun_core::tunnel::{ExchangeError, Retry};
use quictun_proto::{PeerRequest, RequestHead, Target};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::dispatch::{BodyChecks, Dispatched, Served, Undelivered};
use super::error::ProxyError;
use crate::body::BodySlot;
use crate::peers::PeerMetrics;
use crate::state::Runtime;

/// The most relays one request is offered to.
const MAX_RELAYS_TRIED: usize = 2;

/// A request for a peer relay.
pub struct Forward<'a> {
    /// Its group.
    pub group: &'a str,
    /// The head its agent gets.
    pub head: RequestHead,
    /// Its body.
    pub body: TunnelBody,
    /// The ingress client.
    pub client: Option<IpAddr>,
    /// The value the route hashes, when it balances by hash.
    pub hash_key: Option<Vec<u8>>,
    /// Whether it may run twice.
    pub idempotent: bool,
    /// The checks on its body (a body that failed one is the client's failure).
    pub checks: BodyChecks,
}

/// The other relays holding an agent of `group` (from the directory's cache: one lock, no
/// copy); `None` when this relay is in no cluster or no other relay holds one.
pub fn holders(runtime: &Runtime, group: &str) -> Option<Arc<[PeerRelay]>> {
    runtime.cluster.as_ref()?.directory.relays_for(group).filter(|relays| !relays.is_empty())
}

/// Carries `request` to the first of `relays` that takes it, each under `deadline` for its
/// response head (see the module documentation).
pub async fn to_peer(
    runtime: &Runtime,
    deadline: Duration,
    relays: Arc<[PeerRelay]>,
    request: Forward<'_>,
) -> Result<Dispatched, Undelivered> {
    let Some(cluster) = runtime.cluster.as_ref() else {
        return Err(ProxyError::NoAgent(request.group.into()).into());
    };
    let peers = &cluster.peers;
    let Forward { group, head, body, client, hash_key, idempotent, checks } = request;
    let body = BodySlot::new(body);
    let peer_request =
        PeerRequest { group: group.to_owned(), target: head.target.clone(), client, hash_key, idempotent };
    let tries = relays.len().min(MAX_RELAYS_TRIED);
    let first = peers.first_of(relays.len());
    // Kept for a second relay only where there is one to try.
    let mut head = Some(RequestHead { target: Target::Peer(Box::new(peer_request)), ..head });
    let mut last: Option<Undelivered> = None;
    for attempt in 0..tries {
        let holder = &relays[(first + attempt) % relays.len()];
        let Some(peer_head) = (if attempt + 1 < tries { head.clone() } else { head.take() }) else { break };
        let started = Instant::now();
        let failed = |error: ProxyError, via: Option<Arc<str>>| Undelivered { error, agent: via };
        let link = match peers.link(holder).await {
            Ok(link) => link,
            Err(err) => {
                PeerMetrics::of(&peers.metrics.forward_failures, &holder.relay_id).inc();
                last = Some(failed(err.into(), None));
                continue;
            }
        };
        tracing::Span::current().record("client_id", &*link.label);
        link.forwarded.inc();
        let opened = tokio::time::timeout(deadline, link.tunnel.open(peer_head, body.body(), client)).await;
        let error = match opened {
            Ok(Ok((head, body))) => {
                if let Some(failed_check) = checks.failed() {
                    return Err(failed(failed_check, Some(link.label.clone())));
                }
                let head_latency = started.elapsed();
                debug!(peer = %holder.relay_id, "forwarded to a peer relay");
                return Ok(Dispatched { head, body, served: Served::Peer(link), head_latency });
            }
            Ok(Err(err)) => err,
            Err(_) => return Err(failed(ProxyError::Timeout(deadline), Some(link.label.clone()))),
        };
        link.failures.inc();
        if let Some(failed_check) = checks.failed() {
            return Err(failed(failed_check, Some(link.label.clone())));
        }
        let may_move = body.untouched() && may_move(&error, idempotent);
        warn!(peer = %holder.relay_id, %error, may_move, "a peer relay did not answer the request");
        last = Some(failed(error.into(), Some(link.label.clone())));
        if !may_move {
            break;
        }
    }
    Err(last.unwrap_or_else(|| ProxyError::NoAgent(group.into()).into()))
}

/// Whether a request whose exchange failed with `error` may go to another relay (none of its
/// body having gone).
fn may_move(error: &ExchangeError, idempotent: bool) -> bool {
    match error.retry() {
        Retry::Safe => true,
        Retry::IfIdempotent => idempotent,
        Retry::Never => false,
    }
}
