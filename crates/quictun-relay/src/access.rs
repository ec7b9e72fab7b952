//! The access log: one line per proxied request, at `info` on the `quictun::access` target (turn
//! it off with `RUST_LOG=info,quictun::access=off`). A streamed answer is logged when its body
//! ends (or the client goes), so that the line has the bytes sent and the whole duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use quictun_core::logsafe::Inert;
use uuid::Uuid;

/// What the line of one request says, gathered while it is handled.
#[derive(Debug)]
pub struct AccessEntry {
    /// The request id (also in `x-request-id`).
    pub request_id: Uuid,
    /// The client's address.
    pub client: SocketAddr,
    /// The method.
    pub method: http::Method,
    /// The host the request was routed on (`-` when it had none usable).
    pub host: Option<String>,
    /// The path, as the client sent it.
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// The agent that served it (`-` when none did).
    pub client_id: Option<Arc<str>>,
    /// When the request head arrived.
    pub started: Instant,
}

impl AccessEntry {
    /// Writes the line, with `bytes` of response body sent.
    pub fn log(&self, bytes: u64) {
        tracing::info!(
            target: "quictun::access",
            request_id = %self.request_id,
            client = %self.client,
            host = %Inert(self.host.as_deref().unwrap_or("-")),
            method = %self.method,
            path = %Inert(&self.path),
            status = self.status,
            duration_ms = duration_ms(self.started),
            bytes,
            client_id = %self.client_id.as_deref().unwrap_or("-"),
            "{} {}",
            self.method,
            self.status
        );
    }
}

/// Milliseconds since `started`, to the microsecond.
fn duration_ms(started: Instant) -> f64 {
    started.elapsed().as_micros() as f64 / 1000.0
}
