//! The relay's recent requests, for its dashboard and `GET /api/requests`: a ring of the last
//! `inspect_capacity` requests (0 turns it off), each recorded when its answer ends, and the
//! count of every request answered, by status class.
//!
//! What a record keeps is bounded, whatever the client sends: the path and query up to
//! [`MAX_TARGET_BYTES`], at most [`MAX_HEADERS`] headers and [`MAX_HEADER_BYTES`] of them each
//! way, the host up to [`MAX_HOST_BYTES`]. Credentials never enter the ring: `Authorization`,
//! `Proxy-Authorization`, `Cookie` and `Set-Cookie` are redacted as they are captured.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http::HeaderMap;
use serde::Serialize;
use uuid::Uuid;

/// The longest path and query kept of a request; longer ones are cut (and marked with `…`).
pub const MAX_TARGET_BYTES: usize = 2048;
/// The longest host kept.
pub const MAX_HOST_BYTES: usize = 256;
/// The most headers kept of a request or a response.
pub const MAX_HEADERS: usize = 64;
/// The most bytes of header names and values kept of a request or a response.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// The largest `inspect_capacity` a relay takes.
pub const MAX_CAPACITY: usize = 100_000;

/// Headers whose values are credentials: shown as [`REDACTED`].
const SECRET_HEADERS: [http::HeaderName; 4] =
    [http::header::AUTHORIZATION, http::header::PROXY_AUTHORIZATION, http::header::COOKIE, http::header::SET_COOKIE];
/// What a redacted header value reads.
pub const REDACTED: &str = "[redacted]";

/// One finished request as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSummary {
    /// The request id (also in the access log and `x-request-id`).
    pub id: Uuid,
    /// When the request head arrived, in Unix milliseconds.
    pub time_ms: u64,
    /// The method.
    #[serde(serialize_with = "method_name")]
    pub method: http::Method,
    /// The host it was routed on, empty when it had none usable.
    pub host: String,
    /// The path with its query string, as the client sent it.
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// From the request head to the end of the answer, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes forwarded to the agent.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The agent that served it, when one did.
    #[serde(serialize_with = "optional_str")]
    pub client_id: Option<Arc<str>>,
    /// The transport of that agent: `quic` or `grpc`.
    pub transport: Option<&'static str>,
    /// The client's address (the TCP peer).
    pub remote_addr: SocketAddr,
}

fn method_name<S: serde::Serializer>(method: &http::Method, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(method.as_str())
}

fn optional_str<S: serde::Serializer>(value: &Option<Arc<str>>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(text) => serializer.serialize_some(&**text),
        None => serializer.serialize_none(),
    }
}

/// One finished request with its headers, as `GET /api/requests/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestDetail {
    /// What the list shows.
    #[serde(flatten)]
    pub summary: RequestSummary,
    /// The request's headers as the client sent them (credentials redacted).
    pub request_headers: CapturedHeaders,
    /// The response's headers as the client got them (cookies redacted).
    pub response_headers: CapturedHeaders,
}

/// One finished request as the ring keeps it: the numbers, and its text in one buffer.
#[derive(Debug)]
pub struct RequestRecord {
    /// The request id (also in the access log and `x-request-id`).
    pub id: Uuid,
    /// When the request head arrived, in Unix milliseconds.
    pub time_ms: u64,
    /// The method.
    pub method: http::Method,
    /// The status answered.
    pub status: u16,
    /// From the request head to the end of the answer, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes forwarded to the agent.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The agent that served it, when one did.
    pub client_id: Option<Arc<str>>,
    /// The transport of that agent: `quic` or `grpc`.
    pub transport: Option<&'static str>,
    /// The client's address (the TCP peer).
    pub remote_addr: SocketAddr,
    /// The path, the host and the headers.
    pub text: CaptureText,
}

impl RequestRecord {
    /// What the list shows of it.
    pub fn summary(&self) -> RequestSummary {
        RequestSummary {
            id: self.id,
            time_ms: self.time_ms,
            method: self.method.clone(),
            host: self.text.host().to_owned(),
            path: self.text.target().to_owned(),
            status: self.status,
            duration_ms: self.duration_ms,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            client_id: self.client_id.clone(),
            transport: self.transport,
            remote_addr: self.remote_addr,
        }
    }

    /// It with its headers.
    pub fn detail(&self) -> RequestDetail {
        RequestDetail {
            summary: self.summary(),
            request_headers: CapturedHeaders(self.text.part(Part::RequestHeaders).to_owned()),
            response_headers: CapturedHeaders(self.text.part(Part::ResponseHeaders).to_owned()),
        }
    }
}

/// How many requests were answered, in all and by status class, since the relay started.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Totals {
    /// Every request answered.
    pub requests: u64,
    /// Answered 1xx (an upgrade's 101).
    pub status_1xx: u64,
    /// Answered 2xx.
    pub status_2xx: u64,
    /// Answered 3xx.
    pub status_3xx: u64,
    /// Answered 4xx.
    pub status_4xx: u64,
    /// Answered 5xx.
    pub status_5xx: u64,
}

/// The ring of recent requests and the counts by status class.
#[derive(Debug)]
pub struct Inspector {
    capacity: usize,
    ring: Mutex<Ring>,
    by_class: [AtomicU64; 5],
}

/// The records, and the buffers of records that left the ring, cleared for the next requests
/// (so that a busy relay neither allocates nor frees a record's text per request).
#[derive(Debug, Default)]
struct Ring {
    records: VecDeque<RequestRecord>,
    spare: Vec<String>,
}

/// The most cleared buffers kept for reuse.
const MAX_SPARE_BUFFERS: usize = 256;
/// A buffer larger than this is freed rather than kept for reuse.
const MAX_SPARE_BUFFER_BYTES: usize = 4096;
/// The room a new buffer starts with: a typical request's path, host and headers.
const NEW_BUFFER_BYTES: usize = 1024;

impl Inspector {
    /// A ring of `capacity` requests (0: none are kept, only counted).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let ring = Ring { records: VecDeque::with_capacity(capacity), spare: Vec::new() };
        Self { capacity, ring: Mutex::new(ring), by_class: Default::default() }
    }

    /// Whether requests are kept (so their details are worth capturing).
    pub fn keeps_requests(&self) -> bool {
        self.capacity > 0
    }

    /// An empty text for a request's record: a buffer of a record that left the ring when there
    /// is one.
    pub fn text(&self) -> CaptureText {
        if self.capacity == 0 {
            return CaptureText::default();
        }
        let spare = self.lock().spare.pop();
        CaptureText::new(spare.unwrap_or_else(|| String::with_capacity(NEW_BUFFER_BYTES)))
    }

    /// Counts a request answered `status` (every request, kept or not).
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `record`, dropping the oldest when the ring is full (its buffer is kept for reuse).
    pub fn keep(&self, record: RequestRecord) {
        if self.capacity == 0 {
            return;
        }
        let unused = {
            let mut ring = self.lock();
            let old = if ring.records.len() >= self.capacity { ring.records.pop_front() } else { None };
            ring.records.push_back(record);
            match old {
                Some(old)
                    if old.text.text.capacity() <= MAX_SPARE_BUFFER_BYTES && ring.spare.len() < MAX_SPARE_BUFFERS =>
                {
                    let mut buffer = old.text.text;
                    buffer.clear();
                    ring.spare.push(buffer);
                    None
                }
                old => old,
            }
        };
        // Freed outside the lock.
        drop(unused);
    }

    /// The most recent `limit` requests, newest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestSummary> {
        self.lock().records.iter().rev().take(limit).map(RequestRecord::summary).collect()
    }

    /// The request `id`, while it is in the ring.
    pub fn find(&self, id: Uuid) -> Option<RequestDetail> {
        self.lock().records.iter().rev().find(|r| r.id == id).map(RequestRecord::detail)
    }

    /// The requests kept now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// True when no request is kept.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counts since the relay started.
    pub fn totals(&self) -> Totals {
        let class = |i: usize| self.by_class[i].load(Ordering::Relaxed);
        Totals {
            requests: (0..5).map(class).sum(),
            status_1xx: class(0),
            status_2xx: class(1),
            status_3xx: class(2),
            status_4xx: class(3),
            status_5xx: class(4),
        }
    }
}

/// The parts of a record's text, in the order they are written.
#[derive(Debug, Clone, Copy)]
enum Part {
    Target,
    RequestHeaders,
    Host,
    ResponseHeaders,
}

/// A request's text as a record keeps it, in one buffer: the path and query, the request's
/// headers, the host, then the response's headers, each written once as the request goes on
/// (a part not written reads empty). Headers are `name: value` lines (a value never holds a
/// line break).
#[derive(Debug, Default)]
pub struct CaptureText {
    text: String,
    /// Where each part ends.
    ends: [usize; 4],
    /// How many parts are written (or passed over).
    written: usize,
}

impl CaptureText {
    fn new(mut buffer: String) -> Self {
        buffer.clear();
        Self { text: buffer, ends: [0; 4], written: 0 }
    }

    /// Writes `part` with `write`, unless it or a later part is written already.
    fn write(&mut self, part: Part, write: impl FnOnce(&mut String)) {
        let index = part as usize;
        if index < self.written {
            return;
        }
        let start = self.text.len();
        self.ends[self.written..index].fill(start);
        write(&mut self.text);
        self.ends[index] = self.text.len();
        self.written = index + 1;
    }

    fn part(&self, part: Part) -> &str {
        let index = part as usize;
        if index >= self.written {
            return "";
        }
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        &self.text[start..self.ends[index]]
    }

    /// Keeps the path and query, cut at [`MAX_TARGET_BYTES`].
    pub fn set_target(&mut self, target: &str) {
        self.write(Part::Target, |text| push_bounded(text, target, MAX_TARGET_BYTES));
    }

    /// Keeps the request's headers.
    pub fn set_request_headers(&mut self, map: &HeaderMap) {
        self.write(Part::RequestHeaders, |text| push_headers(text, map));
    }

    /// Keeps the host, cut at [`MAX_HOST_BYTES`].
    pub fn set_host(&mut self, host: &str) {
        self.write(Part::Host, |text| push_bounded(text, host, MAX_HOST_BYTES));
    }

    /// Keeps the response's headers.
    pub fn set_response_headers(&mut self, map: &HeaderMap) {
        self.write(Part::ResponseHeaders, |text| push_headers(text, map));
    }

    /// The path and query kept.
    pub fn target(&self) -> &str {
        self.part(Part::Target)
    }

    /// The host kept (empty when none was).
    pub fn host(&self) -> &str {
        self.part(Part::Host)
    }
}

/// Appends the headers of `map` as lines: secrets redacted, values not UTF-8 shown lossily, at
/// most [`MAX_HEADERS`] and [`MAX_HEADER_BYTES`]; what is left out is said in a last line.
fn push_headers(text: &mut String, map: &HeaderMap) {
    let start = text.len();
    for (kept, (name, value)) in map.iter().enumerate() {
        let value = if SECRET_HEADERS.contains(name) {
            std::borrow::Cow::Borrowed(REDACTED)
        } else {
            String::from_utf8_lossy(value.as_bytes())
        };
        if kept == MAX_HEADERS || text.len() - start + name.as_str().len() + value.len() + 3 > MAX_HEADER_BYTES {
            use std::fmt::Write as _;
            let _ = writeln!(text, "…: {} more headers not kept", map.len() - kept);
            break;
        }
        for part in [name.as_str(), ": ", &value, "\n"] {
            text.push_str(part);
        }
    }
}

/// Headers as a record shows them, `[name, value]` pairs, from its `name: value` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedHeaders(String);

impl CapturedHeaders {
    /// The headers of `map`, captured as a record keeps them.
    #[cfg(test)]
    pub fn of(map: &HeaderMap) -> Self {
        let mut text = String::new();
        push_headers(&mut text, map);
        Self(text)
    }

    /// The headers, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.lines().filter_map(|line| line.split_once(": "))
    }
}

impl Serialize for CapturedHeaders {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.pairs().map(|(name, value)| [name, value]))
    }
}

/// Appends `value` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn push_bounded(text: &mut String, value: &str, max: usize) {
    if value.len() <= max {
        text.push_str(value);
        return;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    text.push_str(&value[..end]);
    text.push('…');
}

/// Unix milliseconds of `time`.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(inspector: &Inspector, n: u16, headers: &HeaderMap) -> RequestRecord {
        let mut text = inspector.text();
        text.set_target(&format!("/{n}"));
        text.set_request_headers(headers);
        text.set_host("h");
        text.set_response_headers(&HeaderMap::new());
        RequestRecord {
            id: Uuid::new_v4(),
            time_ms: u64::from(n),
            method: http::Method::GET,
            status: 200,
            duration_ms: 1.0,
            bytes_in: 0,
            bytes_out: 0,
            client_id: None,
            transport: None,
            remote_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            text,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_finds_them() {
        let inspector = Inspector::new(3);
        let mut headers = HeaderMap::new();
        headers.insert("x-n", "1".parse().unwrap());
        let ids: Vec<Uuid> = (0..5)
            .map(|n| {
                let r = record(&inspector, n, &headers);
                let id = r.id;
                inspector.keep(r);
                id
            })
            .collect();
        let recent = inspector.recent(10);
        assert_eq!(recent.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), ["/4", "/3", "/2"]);
        assert_eq!(recent[0].host, "h");
        assert_eq!(inspector.recent(1).len(), 1);
        assert!(inspector.find(ids[0]).is_none(), "evicted");
        let found = inspector.find(ids[4]).unwrap();
        assert_eq!(found.summary.path, "/4");
        assert_eq!(found.request_headers.pairs().collect::<Vec<_>>(), [("x-n", "1")]);
        assert_eq!(found.response_headers.pairs().count(), 0);
    }

    #[test]
    fn a_ring_of_zero_keeps_nothing_but_counts() {
        let inspector = Inspector::new(0);
        assert!(!inspector.keeps_requests());
        inspector.keep(record(&inspector, 1, &HeaderMap::new()));
        for status in [101, 200, 204, 302, 404, 502, 999] {
            inspector.count(status);
        }
        assert!(inspector.is_empty());
        let t = inspector.totals();
        assert_eq!(
            (t.requests, t.status_1xx, t.status_2xx, t.status_3xx, t.status_4xx, t.status_5xx),
            (7, 1, 2, 1, 1, 2)
        );
    }

    /// Parts are read back as written; one passed over, or never written, reads empty; a part
    /// written after a later one is not written (it cannot move the others).
    #[test]
    fn a_records_text_keeps_each_part_apart() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "1".parse().unwrap());
        let mut text = CaptureText::default();
        text.set_target("/p?q=1");
        text.set_host("example.com");
        text.set_response_headers(&headers);
        text.set_request_headers(&headers);
        assert_eq!((text.target(), text.host()), ("/p?q=1", "example.com"));
        assert_eq!(text.part(Part::RequestHeaders), "");
        assert_eq!(text.part(Part::ResponseHeaders), "x-a: 1\n");

        let mut empty = CaptureText::default();
        empty.set_target("/only");
        assert_eq!((empty.target(), empty.host(), empty.part(Part::ResponseHeaders)), ("/only", "", ""));
    }

    /// A record that leaves the ring gives its buffer to a later request, cleared; a buffer grown
    /// past the spare bound is freed instead.
    #[test]
    fn buffers_of_evicted_records_are_reused_cleared() {
        let inspector = Inspector::new(1);
        inspector.keep(record(&inspector, 1, &HeaderMap::new()));
        let second = record(&inspector, 2, &HeaderMap::new());
        let buffer = second.text.text.as_ptr();
        inspector.keep(second);
        inspector.keep(record(&inspector, 3, &HeaderMap::new()));
        // The first record's buffer went to the third; the second's is spare now.
        assert_eq!(inspector.lock().spare.len(), 1);
        assert_eq!(inspector.lock().spare[0].as_ptr(), buffer);
        let reused = inspector.text();
        assert_eq!((reused.target(), reused.text.len(), reused.text.as_ptr()), ("", 0, buffer));
        assert!(inspector.lock().spare.is_empty());

        // A record with a big buffer: evicted, it is freed, not kept.
        let mut big = HeaderMap::new();
        big.insert("x-big", "v".repeat(MAX_HEADER_BYTES - 16).parse().unwrap());
        inspector.keep(record(&inspector, 4, &big));
        assert_eq!(inspector.lock().spare.len(), 1, "the third's buffer");
        inspector.keep(record(&inspector, 5, &HeaderMap::new()));
        assert!(inspector.lock().spare.is_empty(), "the big buffer was freed, not kept");
    }

    #[test]
    fn secrets_are_redacted_and_headers_bounded() {
        let mut map = HeaderMap::new();
        map.insert("authorization", "Basic YWxpY2U6czNjcmV0".parse().unwrap());
        map.insert("cookie", "session=abc".parse().unwrap());
        map.insert("x-ok", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let kept = CapturedHeaders::of(&map);
        let pairs: Vec<(&str, &str)> = kept.pairs().collect();
        assert_eq!(pairs, [("authorization", REDACTED), ("cookie", REDACTED), ("x-ok", "caf\u{fffd}")]);
        assert!(!format!("{kept:?}").contains("YWxp"));
        assert_eq!(
            serde_json::to_string(&kept).unwrap(),
            "[[\"authorization\",\"[redacted]\"],[\"cookie\",\"[redacted]\"],[\"x-ok\",\"caf\u{fffd}\"]]"
        );

        let mut many = HeaderMap::new();
        for i in 0..200 {
            many.insert(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                "v".repeat(500).parse().unwrap(),
            );
        }
        let kept = CapturedHeaders::of(&many);
        let pairs: Vec<(&str, &str)> = kept.pairs().collect();
        assert!(
            pairs.len() <= MAX_HEADERS + 1 && kept.0.len() <= MAX_HEADER_BYTES + 64,
            "{} headers, {} bytes",
            pairs.len(),
            kept.0.len()
        );
        let (name, left) = pairs.last().unwrap();
        assert!(*name == "…" && left.ends_with("more headers not kept"), "{left}");
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let cut = |value: &str, max: usize| {
            let mut text = String::new();
            push_bounded(&mut text, value, max);
            text
        };
        assert_eq!(cut("abc", 3), "abc");
        assert_eq!(cut("abcd", 3), "abc…");
        assert_eq!(cut("aé", 2), "a…");
    }

    /// A hundred thousand requests with the largest headers the ring keeps: it holds its
    /// capacity and no more, and its spare buffers stay bounded.
    #[test]
    fn the_ring_stays_bounded_under_a_flood() {
        let inspector = Inspector::new(1000);
        let mut big = HeaderMap::new();
        big.insert("x-big", "v".repeat(MAX_HEADER_BYTES - 16).parse().unwrap());
        for n in 0..100_000u32 {
            let headers = if n % 2 == 0 { &big } else { &HeaderMap::new() };
            inspector.keep(record(&inspector, (n % 1000) as u16, headers));
        }
        assert_eq!(inspector.len(), 1000);
        assert_eq!(inspector.recent(usize::MAX).len(), 1000);
        assert!(inspector.lock().spare.len() <= MAX_SPARE_BUFFERS);
    }
}
