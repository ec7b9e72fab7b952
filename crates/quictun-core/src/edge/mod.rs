//! The HTTP edge: what a relay decides about a request before it crosses the tunnel.
//!
//! - [`path`]: canonical paths (dot-segments, escapes, hidden separators).
//! - [`host`]: the one host of a request (absolute form, `:authority`, `Host`).
//! - [`forwarded`]: the forwarding-header policy (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`), and
//!   a request's headers as they cross the tunnel, for the ingress and the egress.
//! - [`serve`]: serving a connection with a drain, and plain-text answers, for every listener.

pub mod forwarded;
pub mod host;
pub mod path;
pub mod serve;
