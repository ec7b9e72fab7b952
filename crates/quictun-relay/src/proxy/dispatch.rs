//! The dispatch half of the request path, for any caller (the HTTP ingress, a peer relay's
//! forwarded request, and whatever hands the relay a request head next): given a
//! transport-neutral head, a body and a request id, choose an agent of the group, admit the
//! request on it (a stream slot), open the exchange, race the agent's silence, send the request
//! once more to a sibling when that is safe, and map what failed to a [`ProxyError`]. In a
//! cluster, a group with no agent here goes to a relay that holds one ([`super::forward`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use quictun_core::body::TunnelBody;
use quictun_core::tunnel::{Blame, ExchangeError, Retry};
use quictun_proto::{RequestHead, ResponseHead};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::error::ProxyError;
use super::forward;
use crate::balance::{Balance, Choice};
use crate::body::{BodySlot, Tripped};
use crate::metrics::Retry as RetryReason;
use crate::peers::PeerLink;
use crate::sessions::{Pool, Session, StreamKind, StreamPermit};
use crate::state::RelayState;

/// One request for the dispatch half.
pub struct Dispatch {
    /// The agents that may serve it.
    pub pool: Pool,
    /// How the group's agents are chosen.
    pub balance: Balance,
    /// The value [`Balance::Hash`] hashes, when the request has one.
    pub hash_key: Option<Vec<u8>>,
    /// The head the agent gets (its `request_id` is the request's).
    pub head: RequestHead,
    /// The request body (an upgrade's: the client's bytes after the 101).
    pub body: TunnelBody,
    /// Whether the request may run twice (RFC 9110, 9.2.2), should its agent die under it.
    pub idempotent: bool,
    /// The client the answer is for (its stalled-reader budget counts the answer's credit).
    pub client: Option<IpAddr>,
    /// The checks the caller put on the body on its way: a body that failed one is the client's
    /// failure, whatever the exchange then said.
    pub checks: BodyChecks,
    /// The agent's stream budget it draws on.
    pub kind: StreamKind,
    /// Whether it may go to a peer relay when no agent of its group is here: false for a
    /// request that came from one (one hop).
    pub may_forward: bool,
}

/// The answer the agent gave, and what the exchange holds until its body ends.
pub struct Dispatched {
    /// The response head.
    pub head: ResponseHead,
    /// The response body, streaming.
    pub body: TunnelBody,
    /// Who answered, and the slot held until the body ends.
    pub served: Served,
    /// From the exchange's opening to the response head.
    pub head_latency: Duration,
}

/// Who answered a request.
pub enum Served {
    /// An agent of this relay, and its stream slot.
    Agent {
        /// The agent's session.
        session: Arc<Session>,
        /// Its stream slot.
        _slot: StreamPermit,
    },
    /// A peer relay, which chose the agent.
    Peer(Arc<PeerLink>),
}

impl Served {
    /// For logs: the agent's `client_id`, or `relay:<id>` for a peer relay.
    pub fn client_id(&self) -> Arc<str> {
        match self {
            Self::Agent { session, .. } => session.client_id.clone(),
            Self::Peer(link) => link.label.clone(),
        }
    }

    /// The transport it was reached over.
    pub fn transport(&self) -> &'static str {
        match self {
            Self::Agent { session, .. } => session.tunnel.transport().as_str(),
            Self::Peer(link) => link.tunnel.transport().as_str(),
        }
    }
}

/// A request the dispatch half could not deliver, and the agent it chose, when it chose one (for
/// the caller's logs).
pub struct Undelivered {
    /// Why.
    pub error: ProxyError,
    /// The `client_id` of the agent it was last sent to.
    pub agent: Option<Arc<str>>,
}

impl From<ProxyError> for Undelivered {
    fn from(error: ProxyError) -> Self {
        Self { error, agent: None }
    }
}

/// What a request body is checked for on its way, known once it failed: each failure is the
/// client's, whatever the exchange then said, and never counts against the agent.
#[derive(Debug, Clone, Default)]
pub struct BodyChecks {
    /// Over the route's `max_body_bytes` (the limit, and whether it was hit).
    pub too_large: Option<(u64, Tripped)>,
    /// Under `min_upload_rate` (the rate, and whether it was).
    pub too_slow: Option<(u64, Tripped)>,
    /// Cut, malformed, or stalled by the client (whether it was).
    pub broken: Option<Tripped>,
}

impl BodyChecks {
    /// The error a failed check answers with.
    pub fn failed(&self) -> Option<ProxyError> {
        let set = |tripped: &Tripped| tripped.is_set();
        match (&self.too_large, &self.too_slow, &self.broken) {
            (Some((max, tripped)), _, _) if set(tripped) => Some(ProxyError::BodyTooLarge(*max)),
            (_, Some((rate, tripped)), _) if set(tripped) => Some(ProxyError::UploadTooSlow(*rate)),
            (_, _, Some(tripped)) if set(tripped) => Some(ProxyError::BadBody),
            _ => None,
        }
    }
}

/// Carries `request` through an agent of its group (see the module documentation).
pub async fn dispatch(shared: &RelayState, request: Dispatch) -> Result<Dispatched, Undelivered> {
    let Dispatch { pool, balance, hash_key, head, body, idempotent, client, checks, kind, may_forward } = request;
    let choice = |exclude| Choice { balance, key: hash_key.as_deref(), exclude };
    let deadline = Duration::from_secs(shared.settings.response_timeout_secs);
    let session = match (shared.runtime.sessions.choose_in(&pool, &choice(None)), &pool) {
        (Some(session), _) => session,
        (None, Pool::Group(group)) => {
            if may_forward && let Some(relays) = forward::holders(&shared.runtime, group) {
                let request = forward::Forward { group, head, body, client, hash_key, idempotent, checks };
                return forward::to_peer(&shared.runtime, deadline, relays, request).await;
            }
            agent_after_startup(shared, group).await?
        }
        (None, Pool::Holders(_)) => return Err(ProxyError::NoAgent(pool.name().clone()).into()),
    };
    let chosen = |session: &Session| {
        tracing::Span::current().record("client_id", &*session.client_id);
        Some(session.client_id.clone())
    };
    let mut agent = chosen(&session);
    let fail = |error: ProxyError, agent: &Option<Arc<str>>| Undelivered { error, agent: agent.clone() };
    let agent_slot = match session.try_stream_permit(kind) {
        Ok(permit) => permit,
        Err(full) => return Err(fail(ProxyError::AgentFull(full), &agent)),
    };
    let started = Instant::now();
    let body = BodySlot::new(body);
    // Kept for a retry only where another agent could take it (not on the common single-agent path).
    let retry_head = (shared.runtime.sessions.pool_len(&pool) > 1).then(|| head.clone());
    let (mut attempt, silenced) =
        first_attempt(&session, head, &body, client, deadline, retry_head.is_some() && idempotent).await;
    let (mut session, mut agent_slot) = (session, agent_slot);
    if let (Some(head), Some(reason)) = (retry_head, retry_reason(&attempt, idempotent, silenced))
        && body.untouched()
        && let Some((other, permit)) = shared
            .runtime
            .sessions
            .choose_in(&pool, &choice(Some(session.session_id)))
            .and_then(|other| other.try_stream_permit(kind).ok().map(|permit| (other, permit)))
    {
        session.record_failure();
        shared.runtime.metrics.retry(reason);
        warn!(from = %session.client_id, to = %other.client_id, ?reason, "agent unreachable before it answered: retrying on another agent");
        (session, agent_slot) = (other, permit);
        agent = chosen(&session);
        attempt = tokio::time::timeout(deadline, session.tunnel.open(head, body.body(), client)).await;
    }
    let answered = match attempt {
        Ok(answered) => answered,
        Err(_) => return Err(fail(ProxyError::Timeout(deadline), &agent)),
    };
    match answered {
        Ok((head, body)) => {
            session.record_success();
            // The request body's own failure (too large, too slow) is the answer all the same.
            if let Some(failed) = checks.failed() {
                return Err(fail(failed, &agent));
            }
            let served = Served::Agent { session, _slot: agent_slot };
            Ok(Dispatched { head, body, served, head_latency: started.elapsed() })
        }
        Err(err) => {
            // The request body's own failure is the cause, not the agent.
            if let Some(failed) = checks.failed() {
                return Err(fail(failed, &agent));
            }
            if err.blame() == Blame::Agent {
                session.record_failure();
            }
            Err(fail(err.into(), &agent))
        }
    }
}

/// The outcome of one exchange under the response deadline: its answer, or the elapsed deadline.
type Attempt = Result<Result<(ResponseHead, TunnelBody), ExchangeError>, tokio::time::error::Elapsed>;

/// The first exchange, and whether it was given up because the agent went silent (only when
/// `race_silence`: a sibling could take the request and the request may run twice).
async fn first_attempt(
    session: &Session,
    head: RequestHead,
    body: &BodySlot,
    client: Option<IpAddr>,
    deadline: Duration,
    race_silence: bool,
) -> (Attempt, bool) {
    let exchange = session.tunnel.open(head, body.body(), client);
    if !race_silence {
        return (tokio::time::timeout(deadline, exchange).await, false);
    }
    match tokio::time::timeout(deadline, answer_or_silence(exchange, session, body)).await {
        Ok(Ok(answer)) => (Ok(answer), false),
        Ok(Err(Silenced)) => (Ok(Err(ExchangeError::Lost)), true),
        Err(elapsed) => (Err(elapsed), false),
    }
}

/// Why the request may go once to another agent, when it may: a stream that could not be opened
/// sent nothing; an idempotent request (RFC 9110, 9.2.2) may run again where the agent died under
/// it (its tunnel was lost before an answer, or it went silent while the request waited).
fn retry_reason(attempt: &Attempt, idempotent: bool, silenced: bool) -> Option<RetryReason> {
    let Ok(Err(err)) = attempt else { return None };
    match err.retry() {
        Retry::Safe => Some(RetryReason::not_opened),
        Retry::IfIdempotent if idempotent => Some(if silenced { RetryReason::silent } else { RetryReason::lost }),
        Retry::IfIdempotent | Retry::Never => None,
    }
}

/// Just after the relay started, agents are still reconnecting: wait (up to the end of the
/// startup grace) for one of `group` to register rather than failing at once.
async fn agent_after_startup(shared: &RelayState, group: &Arc<str>) -> Result<Arc<Session>, ProxyError> {
    let grace = Duration::from_secs(shared.settings.startup_grace_secs);
    let left = grace.saturating_sub(shared.runtime.started.elapsed());
    let sessions = &shared.runtime.sessions;
    if left.is_zero() || shared.runtime.shutdown.is_cancelled() {
        return sessions.choose(group, &Choice::default()).ok_or_else(|| ProxyError::NoAgent(group.clone()));
    }
    debug!(left_ms = left.as_millis(), %group, "no agent yet: waiting for one to register");
    let waiting = Instant::now();
    shared.runtime.metrics.waiting_for_agent.inc();
    sessions.wait_until(left, |sessions| sessions.choose(group, &Choice::default()).is_some()).await;
    shared.runtime.metrics.waiting_for_agent.dec();
    sessions
        .choose(group, &Choice::default())
        .ok_or_else(|| ProxyError::NoAgentAfterWaiting { group: group.clone(), waited: waiting.elapsed() })
}

/// The answer to `exchange`, or [`Silenced`] when the agent goes silent first (see
/// [`crate::liveness`]) while no transport has read any of the request body: the request can then
/// move to a sibling at once, rather than wait for the agent to be declared dead. Once part of
/// the body has gone, the answer is awaited.
async fn answer_or_silence<F>(exchange: F, session: &Session, body: &BodySlot) -> Result<F::Output, Silenced>
where
    F: Future<Output = Result<(ResponseHead, TunnelBody), ExchangeError>>,
{
    let mut exchange = std::pin::pin!(exchange);
    tokio::select! {
        answer = &mut exchange => return Ok(answer),
        () = session.went_silent() => {}
    }
    if body.untouched() {
        return Err(Silenced);
    }
    Ok(exchange.await)
}

/// The agent went silent before it answered, and none of the request had gone to it.
struct Silenced;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use http_body_util::BodyExt;
    use quictun_core::body::empty_body;
    use quictun_proto::StreamCode;

    use super::*;
    use crate::fake_tunnel::{FakeTunnel, session_on};
    use crate::sessions::SILENT_AFTER;

    fn silent_session() -> Arc<Session> {
        let datagrams = Some(Arc::new(AtomicU64::new(1)));
        let session = session_on("a", "g", FakeTunnel { datagrams, ..FakeTunnel::default() });
        session.observe_datagrams();
        session
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_body_is_untouched_leaves_an_agent_that_goes_silent() {
        let session = silent_session();
        let body = BodySlot::new(empty_body());
        let never_answered = std::future::pending();
        let waiting = answer_or_silence(never_answered, &session, &body);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        tokio::time::advance(SILENT_AFTER + Duration::from_millis(1)).await;
        session.observe_datagrams();
        assert!(matches!(waiting.await, Err(Silenced)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_body_went_out_waits_for_its_answer() {
        let session = silent_session();
        let body = BodySlot::new(empty_body());
        // The transport took the body: the request may have reached the agent.
        let _taken = body.body().frame().await;
        assert!(!body.untouched());
        let answer = async {
            tokio::time::sleep(SILENT_AFTER * 2).await;
            Err(ExchangeError::Reset(StreamCode::UpstreamFailed))
        };
        let waiting = answer_or_silence(answer, &session, &body);
        let mut waiting = std::pin::pin!(waiting);
        assert!(futures_util::poll!(&mut waiting).is_pending());
        tokio::time::advance(SILENT_AFTER + Duration::from_millis(1)).await;
        session.observe_datagrams();
        assert!(session.silent_for().is_some());
        assert!(matches!(waiting.await, Ok(Err(ExchangeError::Reset(StreamCode::UpstreamFailed)))));
    }

    #[test]
    fn only_a_request_that_may_run_twice_moves_after_the_agent_is_lost() {
        let lost: Attempt = Ok(Err(ExchangeError::Lost));
        let not_opened: Attempt = Ok(Err(ExchangeError::NotOpened));
        let reset: Attempt = Ok(Err(ExchangeError::Reset(StreamCode::UpstreamFailed)));
        assert_eq!(retry_reason(&not_opened, false, false), Some(RetryReason::not_opened));
        assert_eq!(retry_reason(&lost, true, false), Some(RetryReason::lost));
        assert_eq!(retry_reason(&lost, true, true), Some(RetryReason::silent));
        assert_eq!(retry_reason(&lost, false, false), None, "a POST is never sent twice");
        assert_eq!(retry_reason(&reset, true, false), None, "an answer is the answer");
    }
}
