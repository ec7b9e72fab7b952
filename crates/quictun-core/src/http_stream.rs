//! The HTTP-over-stream codec both sides share: header conversion with hop-by-hop stripping, a
//! streaming body read from a QUIC stream, and a pump that streams a body into one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use quictun_proto::{Header, StreamCode};

use crate::body_frames::{Framing, data_frame_header, encode_trailers_frame};
pub use crate::link::BodyError;
use quinn::VarInt;
use tracing::debug;

/// Largest chunk handed out by a body read from a stream at a time.
pub const MAX_CHUNK: usize = 64 * 1024;

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

impl From<quinn::ReadError> for BodyError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => Self::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(c) => Self::ConnectionLost(c.to_string()),
            other => Self::Closed(other.to_string()),
        }
    }
}

/// An HTTP body streamed from a QUIC receive stream, chunk by chunk, without copying.
///
/// Dropping it before the end tells the peer to stop sending (quinn sends STOP_SENDING).
pub struct RecvBody {
    recv: quinn::RecvStream,
    done: bool,
}

impl RecvBody {
    /// Streams the rest of `recv` as a body.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self { recv, done: false }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // `read_chunk` is cancel-safe, so a fresh future per poll loses nothing.
        let read = this.recv.read_chunk(MAX_CHUNK, true);
        let result = ready!(std::pin::pin!(read).poll(cx));
        Poll::Ready(match result {
            Ok(Some(chunk)) => Some(Ok(Frame::data(chunk.bytes))),
            Ok(None) => {
                this.done = true;
                None
            }
            Err(e) => {
                this.done = true;
                Some(Err(e.into()))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Why pumping a body into a stream stopped.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading the source body failed (the stream was reset with `Cancelled`).
    #[error("source body: {0}")]
    Source(String),
    /// Writing to the stream failed (peer stopped reading, or connection lost).
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// Streams `body` into `send` frame by frame, laid out as `framing` says, then finishes the
/// stream. Backpressure is QUIC flow control: the next frame is read only after the previous one
/// was accepted. On a source error the stream is reset with `on_source_error`, so the peer never
/// mistakes a truncated body for a whole one. Trailers are sent in a framed body and dropped
/// (with a debug line) from a raw one. Returns the number of body bytes sent.
pub async fn pump_body<B>(
    body: B,
    send: &mut quinn::SendStream,
    on_source_error: StreamCode,
    framing: Framing,
) -> Result<u64, PumpError>
where
    B: Body,
    B::Error: std::fmt::Display,
{
    // quinn *finishes* a dropped SendStream; if this future is dropped half-way, reset instead so
    // the peer never takes a truncated body for a whole one.
    let mut guard = ResetUnlessDone { send, code: StreamCode::Cancelled, done: false };
    let mut body = std::pin::pin!(body);
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                guard.code = on_source_error;
                return Err(PumpError::Source(e.to_string()));
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                let bytes = data.copy_to_bytes(data.remaining());
                if bytes.is_empty() {
                    continue;
                }
                sent += bytes.len() as u64;
                match framing {
                    Framing::Raw => guard.send.write_chunk(bytes).await?,
                    Framing::Framed { .. } => {
                        guard.send.write_all_chunks(&mut [data_frame_header(bytes.len()), bytes]).await?;
                    }
                }
            }
            Err(frame) => {
                let Ok(trailers) = frame.into_trailers() else { continue };
                let Framing::Framed { max_trailers } = framing else {
                    debug!(fields = trailers.len(), "trailers dropped: the body is not framed");
                    continue;
                };
                let encoded = encode_trailers_frame(&trailers, max_trailers).map_err(|e| {
                    guard.code = on_source_error;
                    PumpError::Source(format!("trailers: {e}"))
                })?;
                guard.send.write_chunk(encoded).await?;
                // Trailers end the body.
                break;
            }
        }
    }
    guard.done = true;
    // Finishing a stream the peer already stopped is harmless; the peer learns of it either way.
    let _already_closed = guard.send.finish();
    Ok(sent)
}

/// Resets the stream on drop unless the body was sent whole.
struct ResetUnlessDone<'a> {
    send: &'a mut quinn::SendStream,
    code: StreamCode,
    done: bool,
}

impl Drop for ResetUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.done {
            reset(self.send, self.code);
        }
    }
}

/// Resets a send stream with `code`, ignoring a stream that is already closed.
pub fn reset(send: &mut quinn::SendStream, code: StreamCode) {
    let _already_closed = send.reset(VarInt::from_u32(code.to_u32()));
}

/// Stops a receive stream with `code`, ignoring a stream that is already closed.
pub fn stop(recv: &mut quinn::RecvStream, code: StreamCode) {
    let _already_closed = recv.stop(VarInt::from_u32(code.to_u32()));
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
