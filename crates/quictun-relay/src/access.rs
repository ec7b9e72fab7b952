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

use crate::inspect::{CaptureText, Inspector, RequestRecord, unix_ms};

/// What is known of one request once its response head is decided.
#[derive(Debug)]
pub struct AccessEntry {
    /// The request id (also in `x-request-id`).
    pub request_id: Uuid,
    /// The client's address.
    pub client: SocketAddr,
    /// The method.
    pub method: http::Method,
    /// The path and query as the client sent them (the log line has the path only), the host
    /// the request was routed on (`-` in the log when it had none usable) and, when the request
    /// is kept in the ring, the headers.
    pub text: CaptureText,
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

/// Where a request is kept beyond its log line.
#[derive(Debug)]
pub struct Inspected {
    /// The ring.
    pub inspector: Arc<Inspector>,
    /// Request body bytes forwarded so far.
    pub bytes_in: Arc<AtomicU64>,
}

impl AccessEntry {
    /// Writes the line and keeps the record, with `bytes` of response body sent.
    pub fn finish(self, bytes: u64) {
        let duration_ms = duration_ms(self.started);
        if self.access_log {
            let path = self.text.target().split('?').next().unwrap_or_default();
            let host = self.text.host();
            tracing::info!(
                target: "quictun::access",
                request_id = %self.request_id,
                client = %self.client,
                host = %Inert(if host.is_empty() { "-" } else { host }),
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
        inspected.inspector.keep(RequestRecord {
            id: self.request_id,
            time_ms: unix_ms(self.time),
            method: self.method,
            status: self.status,
            duration_ms,
            bytes_in: inspected.bytes_in.load(Ordering::Relaxed),
            bytes_out: bytes,
            client_id: self.client_id,
            transport: self.transport,
            remote_addr: self.client,
            text: self.text,
        });
    }
}

/// Milliseconds since `started`, to the microsecond.
fn duration_ms(started: Instant) -> f64 {
    started.elapsed().as_micros() as f64 / 1000.0
}
