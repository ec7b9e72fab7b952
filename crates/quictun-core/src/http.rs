//! HTTP heads in the tunnel's wire form: header conversion both ways, with hop-by-hop headers
//! stripped (and those `Connection` names), `TE: trailers` kept where it belongs.

use http::{HeaderMap, HeaderName, HeaderValue};
use quictun_proto::Header;

/// Headers that describe one connection and never cross a proxy (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any named in `Connection`. `TE: trailers` is kept (as
/// exactly that): it says the client accepts trailers, which gRPC needs end to end and HTTP/2
/// allows (RFC 9113 §8.2.2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let accepts_trailers = accepts_trailers(headers);
    for name in connection_listed(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if accepts_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// True when a `TE` header lists `trailers` (the client accepts trailers).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers")))
}

/// Converts headers to their wire form (hop-by-hop headers must already be gone).
pub fn headers_to_wire(headers: &HeaderMap) -> Vec<Header> {
    headers.iter().map(|(name, value)| wire_header(name, value)).collect()
}

/// One header in wire form.
pub fn wire_header(name: &HeaderName, value: &HeaderValue) -> Header {
    Header { name: name.as_str().to_owned(), value: value.as_bytes().to_vec() }
}

/// The body length a message's `Content-Length` declares, when it declares one.
pub fn declared_length(headers: &[Header]) -> Option<u64> {
    let header = headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
    std::str::from_utf8(&header.value).ok()?.trim().parse().ok()
}

/// The names a `Connection` header lists (hop-by-hop for this request only), lower-cased.
pub fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// True for a hop-by-hop header name (the fixed list; see [`connection_listed`] for the rest).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// A header from the wire that is not valid HTTP.
#[derive(Debug, thiserror::Error)]
#[error("invalid header {name:?}")]
pub struct InvalidHeader {
    /// The offending name (lossy).
    pub name: String,
}

/// Converts wire headers back, refusing invalid names or values and dropping hop-by-hop headers.
pub fn headers_from_wire(headers: Vec<Header>) -> Result<HeaderMap, InvalidHeader> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for Header { name, value } in headers {
        let header_name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| InvalidHeader { name: name.clone() })?;
        let header_value = HeaderValue::from_bytes(&value).map_err(|_| InvalidHeader { name })?;
        map.append(header_name, header_value);
    }
    strip_hop_by_hop(&mut map);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_stripped_including_connection_named_ones() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn te_trailers_is_kept_and_other_te_values_dropped() {
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, trailers;q=1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("te").unwrap(), "trailers");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("te").is_none());
    }

    #[test]
    fn invalid_wire_headers_are_refused() {
        let bad = vec![Header { name: "bad name".into(), value: b"x".to_vec() }];
        assert!(headers_from_wire(bad).is_err());
        let bad_value = vec![Header { name: "x".into(), value: b"a\nb".to_vec() }];
        assert!(headers_from_wire(bad_value).is_err());
        let ok = vec![
            Header { name: "x-a".into(), value: b"1".to_vec() },
            Header { name: "x-a".into(), value: b"2".to_vec() },
        ];
        assert_eq!(headers_from_wire(ok).unwrap().get_all("x-a").iter().count(), 2);
    }
}
