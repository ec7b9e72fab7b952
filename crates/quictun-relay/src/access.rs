//! The end of a request's record: its access-log line, at `info` on the `quictun::access` target
//! (turn it off with `RUST_LOG=info,quictun::access=off`), and its entry in the relay's ring of
//! recent requests ([`crate::inspect`]). A streamed answer is finished when its body ends (or the
//! client goes), so that both have the bytes sent and the whole duration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use quictun_core::logsafe::Inert;
use uuid::Uuid;

use crate::inspect::{CapturedHeaders, Inspector, RequestRecord, RequestSummary, unix_ms};

/// What is known of one request once its response head is decided.
#[derive(Debug)]
pub struct AccessEntry {
    /// The request id (also in `x-request-id`).
    pub request_id: Uuid,
    /// The client's address.
    pub client: SocketAddr,
    /// The method.
    pub method: http::Method,
    /// The host the request was routed on (`-` when it had none usable), cut at
    /// [`crate::inspect::MAX_HOST_BYTES`].
    pub host: Option<String>,
    /// The path and query, as the client sent them, cut at [`crate::inspect::MAX_TARGET_BYTES`]
    /// (the log line has the path only).
    pub target: String,
    /// The status answered.
    pub status: u16,
    /// The agent that served it (`-` when none did).
    pub client_id: Option<Arc<str>>,
    /// That agent's transport.
    pub transport: Option<&'static str>,
    /// When the request head arrived.
    pub started: Instant,
    /// The same moment on the wall clock.
    pub time: SystemTime,
    /// Whether the access-log line is written.
    pub access_log: bool,
    /// The ring the request is kept in, with its headers and its body bytes so far, when
    /// inspection is on.
    pub inspect: Option<Inspected>,
}

/// What the ring keeps of a request beyond its log line.
#[derive(Debug)]
pub struct Inspected {
    /// The ring.
    pub inspector: Arc<Inspector>,
    /// The request's headers, captured.
    pub request_headers: CapturedHeaders,
    /// The response's headers, captured.
    pub response_headers: CapturedHeaders,
    /// Request body bytes forwarded so far.
    pub bytes_in: Arc<AtomicU64>,
}

impl AccessEntry {
    /// Writes the line and keeps the record, with `bytes` of response body sent.
    pub fn finish(self, bytes: u64) {
        let duration_ms = duration_ms(self.started);
        if self.access_log {
            let path = self.target.split('?').next().unwrap_or_default();
            tracing::info!(
                target: "quictun::access",
                request_id = %self.request_id,
                client = %self.client,
                host = %Inert(self.host.as_deref().unwrap_or("-")),
                method = %self.method,
                path = %Inert(path),
                status = self.status,
                duration_ms,
                bytes,
                client_id = %self.client_id.as_deref().unwrap_or("-"),
                "{} {}",
                self.method,
                self.status
            );
        }
        let Some(inspected) = self.inspect else { return };
        let summary = RequestSummary {
            id: self.request_id,
            time_ms: unix_ms(self.time),
            method: self.method,
            host: self.host.unwrap_or_default(),
            path: self.target,
            status: self.status,
            duration_ms,
            bytes_in: inspected.bytes_in.load(Ordering::Relaxed),
            bytes_out: bytes,
            client_id: self.client_id,
            transport: self.transport,
            remote_addr: self.client,
        };
        inspected.inspector.keep(RequestRecord {
            summary,
            request_headers: inspected.request_headers,
            response_headers: inspected.response_headers,
        });
    }
}

/// Milliseconds since `started`, to the microsecond.
fn duration_ms(started: Instant) -> f64 {
    started.elapsed().as_micros() as f64 / 1000.0
}
