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
pub struct RequestRecord {
    /// What the list shows.
    #[serde(flatten)]
    pub summary: RequestSummary,
    /// The request's headers as the client sent them (credentials redacted).
    pub request_headers: CapturedHeaders,
    /// The response's headers as the client got them (cookies redacted).
    pub response_headers: CapturedHeaders,
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
    ring: Mutex<VecDeque<RequestRecord>>,
    by_class: [AtomicU64; 5],
}

impl Inspector {
    /// A ring of `capacity` requests (0: none are kept, only counted).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        Self { capacity, ring: Mutex::new(VecDeque::with_capacity(capacity)), by_class: Default::default() }
    }

    /// Whether requests are kept (so their details are worth capturing).
    pub fn keeps_requests(&self) -> bool {
        self.capacity > 0
    }

    /// Counts a request answered `status` (every request, kept or not).
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `record`, dropping the oldest when the ring is full.
    pub fn keep(&self, record: RequestRecord) {
        if self.capacity == 0 {
            return;
        }
        let old = {
            let mut ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let old = if ring.len() >= self.capacity { ring.pop_front() } else { None };
            ring.push_back(record);
            old
        };
        // Freed outside the lock.
        drop(old);
    }

    /// The most recent `limit` requests, newest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestSummary> {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().rev().take(limit).map(|r| r.summary.clone()).collect()
    }

    /// The request `id`, while it is in the ring.
    pub fn find(&self, id: Uuid) -> Option<RequestRecord> {
        let ring = self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        ring.iter().rev().find(|r| r.summary.id == id).cloned()
    }

    /// The requests kept now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// True when no request is kept.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

/// Headers as a record keeps them: one text of `name: value` lines (one allocation however
/// many headers; a value never holds a line break), shown as `[name, value]` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedHeaders(String);

impl CapturedHeaders {
    /// The headers of `map`: secrets redacted, values not UTF-8 shown lossily, at most
    /// [`MAX_HEADERS`] and [`MAX_HEADER_BYTES`]; what is left out is said in a last entry.
    pub fn of(map: &HeaderMap) -> Self {
        let mut text = String::with_capacity(map.len() * 32);
        for (kept, (name, value)) in map.iter().enumerate() {
            let value = if SECRET_HEADERS.contains(name) {
                std::borrow::Cow::Borrowed(REDACTED)
            } else {
                String::from_utf8_lossy(value.as_bytes())
            };
            if kept == MAX_HEADERS || text.len() + name.as_str().len() + value.len() + 3 > MAX_HEADER_BYTES {
                text.push_str(&format!("…: {} more headers not kept\n", map.len() - kept));
                break;
            }
            for part in [name.as_str(), ": ", &value, "\n"] {
                text.push_str(part);
            }
        }
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

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Unix milliseconds of `time`.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u16, headers: CapturedHeaders) -> RequestRecord {
        RequestRecord {
            summary: RequestSummary {
                id: Uuid::new_v4(),
                time_ms: u64::from(n),
                method: http::Method::GET,
                host: "h".into(),
                path: format!("/{n}"),
                status: 200,
                duration_ms: 1.0,
                bytes_in: 0,
                bytes_out: 0,
                client_id: None,
                transport: None,
                remote_addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            },
            request_headers: headers,
            response_headers: CapturedHeaders::default(),
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_finds_them() {
        let inspector = Inspector::new(3);
        let ids: Vec<Uuid> = (0..5)
            .map(|n| {
                let r = record(n, CapturedHeaders::default());
                let id = r.summary.id;
                inspector.keep(r);
                id
            })
            .collect();
        let recent = inspector.recent(10);
        assert_eq!(recent.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), ["/4", "/3", "/2"]);
        assert_eq!(inspector.recent(1).len(), 1);
        assert!(inspector.find(ids[0]).is_none(), "evicted");
        assert_eq!(inspector.find(ids[4]).map(|r| r.summary.path.clone()).as_deref(), Some("/4"));
    }

    #[test]
    fn a_ring_of_zero_keeps_nothing_but_counts() {
        let inspector = Inspector::new(0);
        assert!(!inspector.keeps_requests());
        inspector.keep(record(1, CapturedHeaders::default()));
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
        assert_eq!(bounded("abc", 3), "abc");
        assert_eq!(bounded("abcd", 3), "abc…");
        assert_eq!(bounded("aé", 2), "a…");
    }

    /// A hundred thousand requests with the largest headers the ring keeps: it holds its
    /// capacity and no more.
    #[test]
    fn the_ring_stays_bounded_under_a_flood() {
        let inspector = Inspector::new(1000);
        let mut big = HeaderMap::new();
        big.insert("x-big", "v".repeat(MAX_HEADER_BYTES - 16).parse().unwrap());
        let headers = CapturedHeaders::of(&big);
        assert!(headers.0.len() > MAX_HEADER_BYTES - 16);
        for n in 0..100_000u32 {
            inspector.keep(record((n % 1000) as u16, headers.clone()));
        }
        assert_eq!(inspector.len(), 1000);
        assert_eq!(inspector.recent(usize::MAX).len(), 1000);
    }
}
