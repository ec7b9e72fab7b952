//! The HTTP edge: what a relay decides about a request before it crosses the tunnel.
//!
//! - [`path`]: canonical paths (dot-segments, escapes, hidden separators).
//! - [`host`]: the one host of a request (absolute form, `:authority`, `Host`).
//! - [`forwarded`]: the forwarding-header policy (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`).

pub mod forwarded;
pub mod host;
pub mod path;
