//! The agent's traffic inspector (what ngrok's `localhost:4040` is): the last `inspect_capacity`
//! HTTP requests this agent forwarded, with their headers and the first `inspect_body_bytes` of
//! each body, copied as the bodies stream past (nothing waits for a copy, nothing is buffered
//! whole), and the replay of one whose request body was captured whole.
//!
//! The agent's own traffic stays on the agent: headers are kept as the upstream got them
//! (credentials too: a replay must carry them); the admin endpoint is on loopback, and its token
//! guards the inspector like every other page.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use quictun_core::body::{BodyError, TunnelBody};
use quictun_proto::{RequestHead, ResponseHead, StreamCode};
use serde::Serialize;
use uuid::Uuid;

/// The most requests an agent keeps.
pub const MAX_CAPACITY: usize = 10_000;
/// The most bytes of each body an agent keeps.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// One forwarded request as the list shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeSummary {
    /// The relay's request id (join it with the relay's access log and dashboard); a replay
    /// has one of its own.
    pub id: Uuid,
    /// The request this one replayed.
    pub replay_of: Option<Uuid>,
    /// When the agent got it, in Unix milliseconds.
    pub time_ms: u64,
    /// The method.
    pub method: String,
    /// The upstream it went to (its name).
    pub upstream: String,
    /// The path and query.
    pub uri: String,
    /// The upstream's status, when it answered.
    pub status: Option<u16>,
    /// Why it failed, when it did (a stream code: `UpstreamConnect`, …).
    pub error: Option<&'static str>,
    /// From the request to the end of the response body, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes sent to the upstream.
    pub request_bytes: u64,
    /// Response body bytes from the upstream.
    pub response_bytes: u64,
    /// Whether it can be replayed: its request body was captured whole.
    pub replayable: bool,
}

/// A captured body: its first bytes, as text when they are UTF-8, else base64.
#[derive(Debug, Clone, Serialize)]
pub struct CapturedBody {
    /// The bytes kept, when they are UTF-8.
    pub text: Option<String>,
    /// The bytes kept, in base64, when they are not.
    pub base64: Option<String>,
    /// True when the body was longer than what was kept (or did not end).
    pub truncated: bool,
}

/// One forwarded request with headers and bodies.
#[derive(Debug, Serialize)]
pub struct ExchangeRecord {
    /// What the list shows.
    #[serde(flatten)]
    pub summary: ExchangeSummary,
    /// The request headers as the upstream got them.
    pub request_headers: Vec<(String, String)>,
    /// The response headers from the upstream.
    pub response_headers: Vec<(String, String)>,
    /// The start of the request body.
    pub request_body: CapturedBody,
    /// The start of the response body.
    pub response_body: CapturedBody,
    /// The request as sent (for a replay).
    #[serde(skip)]
    pub head: RequestHead,
    /// The request body kept (whole when `summary.replayable`).
    #[serde(skip)]
    pub request_bytes: Bytes,
}

/// The ring of recent requests.
#[derive(Debug)]
pub struct Inspector {
    capacity: usize,
    body_bytes: usize,
    ring: Mutex<VecDeque<Arc<ExchangeRecord>>>,
}

impl Inspector {
    /// A ring of `capacity` requests keeping `body_bytes` of each body (0: headers only).
    pub fn new(capacity: usize, body_bytes: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        Self { capacity, body_bytes: body_bytes.min(MAX_BODY_BYTES), ring: Mutex::new(VecDeque::new()) }
    }

    /// Starts the record of `head` (a replay of `replay_of`), or `None` when the ring is off.
    pub fn begin(self: &Arc<Self>, head: &RequestHead, replay_of: Option<Uuid>) -> Option<Arc<Capture>> {
        (self.capacity > 0).then(|| {
            Arc::new(Capture {
                inspector: self.clone(),
                head: head.clone(),
                replay_of,
                time: SystemTime::now(),
                started: Instant::now(),
                state: Mutex::new(CaptureState::default()),
                finished: AtomicBool::new(false),
            })
        })
    }

    fn keep(&self, record: ExchangeRecord) {
        let record = Arc::new(record);
        let old = {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            let old = if ring.len() >= self.capacity { ring.pop_front() } else { None };
            ring.push_back(record);
            old
        };
        drop(old);
    }

    /// The most recent `limit` requests, newest first.
    pub fn recent(&self, limit: usize) -> Vec<ExchangeSummary> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().take(limit).map(|r| r.summary.clone()).collect()
    }

    /// The most recent `limit` requests with their headers and bodies, newest first.
    pub fn recent_records(&self, limit: usize) -> Vec<Arc<ExchangeRecord>> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().take(limit).cloned().collect()
    }

    /// The request `id`, while it is in the ring (the newest, when a replay shares it).
    pub fn find(&self, id: Uuid) -> Option<Arc<ExchangeRecord>> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().find(|r| r.summary.id == id).cloned()
    }

    /// The ring's size and the bytes of each body kept.
    pub fn settings(&self) -> (usize, usize) {
        (self.capacity, self.body_bytes)
    }
}

/// What is gathered of one request while it is forwarded.
#[derive(Debug, Default)]
struct CaptureState {
    request: Side,
    response: Side,
    status: Option<u16>,
    response_headers: Vec<(String, String)>,
    error: Option<&'static str>,
}

/// One body, as it passed.
#[derive(Debug, Default)]
struct Side {
    kept: BytesMut,
    total: u64,
    ended: bool,
}

/// The record of one request in the making; kept in the ring once its response body ends (or
/// is dropped), or at once when the request fails.
#[derive(Debug)]
pub struct Capture {
    inspector: Arc<Inspector>,
    head: RequestHead,
    replay_of: Option<Uuid>,
    time: SystemTime,
    started: Instant,
    state: Mutex<CaptureState>,
    finished: AtomicBool,
}

impl Capture {
    fn state(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The request body, copied (its first bytes) as it goes to the upstream.
    pub fn request_body(self: &Arc<Self>, body: TunnelBody) -> TunnelBody {
        http_body_util::BodyExt::boxed_unsync(Tee { inner: body, capture: self.clone(), response: false })
    }

    /// The upstream answered `head`; its body, copied as it goes to the relay, finishes the
    /// record when it ends or is dropped.
    pub fn response(self: &Arc<Self>, head: &ResponseHead, body: TunnelBody) -> TunnelBody {
        {
            let mut state = self.state();
            state.status = Some(head.status);
            state.response_headers =
                head.headers.iter().map(|h| (h.name.clone(), String::from_utf8_lossy(&h.value).into_owned())).collect();
        }
        http_body_util::BodyExt::boxed_unsync(Tee { inner: body, capture: self.clone(), response: true })
    }

    /// The request failed with `code`: kept now.
    pub fn failed(&self, code: StreamCode) {
        self.state().error = Some(code.as_str());
        self.finish();
    }

    fn finish(&self) {
        if self.finished.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = std::mem::take(&mut *self.state());
        // A client such as hyper's stops reading a body of a known length at its last byte.
        let declared = self.head.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
        let declared = declared.and_then(|h| std::str::from_utf8(&h.value).ok()?.trim().parse::<u64>().ok());
        state.request.ended |= declared == Some(state.request.total);
        let limit = self.inspector.body_bytes as u64;
        let whole = |side: &Side| side.ended && side.total <= limit;
        let replayable = whole(&state.request) || !self.head.has_body;
        let captured = |side: &Side| {
            let truncated = !whole(side);
            match std::str::from_utf8(&side.kept) {
                Ok(text) => CapturedBody { text: Some(text.to_owned()), base64: None, truncated },
                Err(_) => {
                    use base64::Engine;
                    let encoded = base64::engine::general_purpose::STANDARD.encode(&side.kept);
                    CapturedBody { text: None, base64: Some(encoded), truncated }
                }
            }
        };
        let head = &self.head;
        let summary = ExchangeSummary {
            id: head.request_id,
            replay_of: self.replay_of,
            time_ms: self.time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            method: head.method.clone(),
            upstream: head.target.upstream().unwrap_or_default().to_owned(),
            uri: head.uri.clone(),
            status: state.status,
            error: state.error,
            duration_ms: self.started.elapsed().as_micros() as f64 / 1000.0,
            request_bytes: state.request.total,
            response_bytes: state.response.total,
            replayable,
        };
        let record = ExchangeRecord {
            summary,
            request_headers: head
                .headers
                .iter()
                .map(|h| (h.name.clone(), String::from_utf8_lossy(&h.value).into_owned()))
                .collect(),
            response_headers: state.response_headers.clone(),
            request_body: captured(&state.request),
            response_body: captured(&state.response),
            head: head.clone(),
            request_bytes: state.request.kept.freeze(),
        };
        self.inspector.keep(record);
    }
}

impl Drop for Capture {
    /// A request dropped before its answer (the relay or the client went away) is kept too.
    fn drop(&mut self) {
        if !self.finished.load(Ordering::Acquire) {
            self.state().error.get_or_insert("Cancelled");
            self.finish();
        }
    }
}

/// A body copied, its first bytes, into its request's capture as it passes.
struct Tee {
    inner: TunnelBody,
    capture: Arc<Capture>,
    response: bool,
}

impl Tee {
    fn side<'a>(&self, state: &'a mut CaptureState) -> &'a mut Side {
        if self.response { &mut state.response } else { &mut state.request }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let limit = self.capture.inspector.body_bytes;
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                // A reader such as hyper's client stops at `is_end_stream`, without a last poll.
                let ended = self.inner.is_end_stream();
                let mut state = self.capture.state();
                let side = self.side(&mut state);
                if let Some(data) = frame.data_ref() {
                    side.total += data.len() as u64;
                    let room = limit.saturating_sub(side.kept.len());
                    side.kept.extend_from_slice(&data[..data.len().min(room)]);
                }
                side.ended |= ended;
            }
            Poll::Ready(None) => {
                let mut state = self.capture.state();
                self.side(&mut state).ended = true;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            let mut state = self.capture.state();
            self.side(&mut state).ended = true;
        }
        if self.response {
            self.capture.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use quictun_proto::{Header, Target};

    fn head(body: bool) -> RequestHead {
        RequestHead {
            target: Target::Http("app".into()),
            request_id: Uuid::new_v4(),
            method: "POST".into(),
            uri: "/echo".into(),
            headers: vec![Header { name: "x-a".into(), value: b"1".to_vec() }],
            has_body: body,
            framed_body: false,
        }
    }

    fn full(bytes: &'static [u8]) -> TunnelBody {
        Full::new(Bytes::from_static(bytes)).map_err(|never| match never {}).boxed_unsync()
    }

    async fn exchange(inspector: &Arc<Inspector>, request: &'static [u8], response: &'static [u8]) -> Uuid {
        let head = head(true);
        let id = head.request_id;
        let capture = inspector.begin(&head, None).unwrap();
        capture.request_body(full(request)).collect().await.unwrap();
        let answer = ResponseHead { status: 200, headers: vec![], framed_body: false };
        capture.response(&answer, full(response)).collect().await.unwrap();
        id
    }

    #[tokio::test]
    async fn bodies_are_kept_up_to_the_limit_and_a_whole_one_can_be_replayed() {
        let inspector = Arc::new(Inspector::new(10, 4));
        let small = exchange(&inspector, b"abc", b"hello").await;
        let record = inspector.find(small).unwrap();
        assert_eq!(record.request_body.text.as_deref(), Some("abc"));
        assert!(!record.request_body.truncated && record.summary.replayable);
        assert_eq!(record.response_body.text.as_deref(), Some("hell"));
        assert!(record.response_body.truncated);
        assert_eq!((record.summary.request_bytes, record.summary.response_bytes), (3, 5));
        assert_eq!(&record.request_bytes[..], b"abc");

        let big = exchange(&inspector, b"abcdef", b"\xff\xfe").await;
        let record = inspector.find(big).unwrap();
        assert!(record.request_body.truncated && !record.summary.replayable);
        assert_eq!(record.response_body.base64.as_deref(), Some("//4="));
    }

    #[tokio::test]
    async fn a_response_dropped_midway_is_kept_not_replayable_when_its_request_did_not_end() {
        let inspector = Arc::new(Inspector::new(10, 64));
        let head = head(true);
        let capture = inspector.begin(&head, None).unwrap();
        drop(capture.request_body(full(b"never read")));
        drop(capture.response(&ResponseHead { status: 502, headers: vec![], framed_body: false }, full(b"x")));
        let record = inspector.find(head.request_id).unwrap();
        assert_eq!(record.summary.status, Some(502));
        assert!(!record.summary.replayable);

        let failed = self::head(false);
        inspector.begin(&failed, None).unwrap().failed(StreamCode::UpstreamConnect);
        let record = inspector.find(failed.request_id).unwrap();
        assert_eq!(record.summary.error, Some(StreamCode::UpstreamConnect.as_str()));
        assert!(record.summary.replayable, "a request without a body is replayable");
    }

    #[tokio::test]
    async fn the_ring_keeps_its_capacity_and_zero_turns_it_off() {
        let inspector = Arc::new(Inspector::new(3, 16));
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(exchange(&inspector, b"a", b"b").await);
        }
        let recent: Vec<Uuid> = inspector.recent(10).iter().map(|r| r.id).collect();
        assert_eq!(recent, [ids[4], ids[3], ids[2]]);
        assert!(Arc::new(Inspector::new(0, 16)).begin(&head(false), None).is_none());
    }
}
