//! Inputs shared by the micro-benchmarks: realistic head frames and control messages.

use quictun_proto::{Header, RequestHead, ResponseHead, Target};
use uuid::Uuid;

/// A request head like a browser's: a dozen headers.
pub fn browser_request() -> RequestHead {
    let headers = [
        ("host", "app.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
        ),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-US,en;q=0.9"),
        ("accept-encoding", "gzip, deflate, br"),
        ("cookie", "session=4f1c2b7e9a8d4c3b; theme=dark; consent=yes"),
        ("cache-control", "no-cache"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "app.example.com"),
        ("x-quictun-request-id", "9b2d5f1e-2c3a-4e8f-9d7b-1a2b3c4d5e6f"),
    ];
    RequestHead {
        target: Target::Http("app".into()),
        request_id: Uuid::from_u128(0x9b2d_5f1e_2c3a_4e8f_9d7b_1a2b_3c4d_5e6f),
        method: "GET".into(),
        uri: "/dashboard/projects?page=2&sort=updated".into(),
        headers: headers.iter().map(|(n, v)| Header { name: (*n).into(), value: v.as_bytes().to_vec() }).collect(),
        has_body: false,
        framed_body: false,
    }
}

/// A typical response head.
pub fn response() -> ResponseHead {
    let headers = [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", "18734"),
        ("cache-control", "private, max-age=0"),
        ("etag", "\"5f8d-1a2b3c\""),
        ("date", "Sun, 22 Nov 2026 04:20:00 GMT"),
    ];
    ResponseHead {
        status: 200,
        headers: headers.iter().map(|(n, v)| Header { name: (*n).into(), value: v.as_bytes().to_vec() }).collect(),
        framed_body: false,
    }
}
