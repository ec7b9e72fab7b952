//! The `policy` phase: a route's policies, checked after routing and before anything is sent to
//! an agent, so that a request they refuse costs the agent nothing. A route has none yet; each
//! will be one step here (a basic-auth check, an address rule, a rate limit), in a fixed order,
//! refusing with a [`ProxyError`] that carries its status and headers (a `WWW-Authenticate`
//! challenge, a `Retry-After`).

use super::edge::Accepted;
use super::error::ProxyError;

/// Checks `accepted` against its route's policies.
pub fn check(accepted: &Accepted) -> Result<(), ProxyError> {
    let _route = &accepted.route;
    Ok(())
}
