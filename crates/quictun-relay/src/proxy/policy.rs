//! The `policy` phase: a route's policies ([`crate::policies`]), checked after routing and
//! before anything is sent to an agent, so that a request they refuse costs the agent nothing.
//! In a fixed order, cheapest first: the address rule (403), the rate limit (429 with
//! `Retry-After`), then basic auth (401 with `WWW-Authenticate`, or 429 after too many failed
//! attempts), whose credentials are removed before the request goes on. The address judged is
//! the TCP peer's, or, behind a trusted proxy, the one that proxy saw
//! ([`crate::policies::client_address`]).

use crate::policies::{AuthOutcome, client_address};
use crate::state::RelayState;

use super::Peer;
use super::edge::Accepted;
use super::error::ProxyError;

/// Checks `accepted` against its route's policies.
pub async fn check(shared: &RelayState, accepted: &mut Accepted, peer: &Peer) -> Result<(), ProxyError> {
    if !accepted.route.policies.checks_anything() {
        return Ok(());
    }
    let route = accepted.route.clone();
    let policies = &route.policies;
    let client = client_address(&shared.settings.trusted_proxies, peer.addr.ip(), accepted.request.headers());
    if let Some(rule) = &policies.addresses
        && !rule.admits(client)
    {
        return Err(ProxyError::Forbidden(client));
    }
    if let Some(rate) = &policies.rate
        && let Err(wait) = rate.take(client)
    {
        return Err(ProxyError::RateLimited(wait));
    }
    if let Some(auth) = &policies.basic_auth {
        let headers = accepted.request.headers_mut();
        match auth.check(headers.get(http::header::AUTHORIZATION), client).await {
            AuthOutcome::Allowed => {
                headers.remove(http::header::AUTHORIZATION);
            }
            AuthOutcome::Refused => return Err(ProxyError::Unauthorized(auth.challenge())),
            AuthOutcome::TooManyFailures(wait) => return Err(ProxyError::TooManyAuthFailures(wait)),
        }
    }
    Ok(())
}
