//! Framed bodies on a QUIC stream, for exchanges whose body may end with trailers (HTTP/2, gRPC).
//!
//! A raw body is its bytes until FIN; nothing can follow it. A framed body (see
//! [`quictun_proto::stream`]) is a run of data frames and, optionally, one trailers frame before
//! FIN. Data frames are streamed through in chunks as they arrive, never collected; only the
//! trailers frame, bounded by the head-frame limit, is read whole.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use quictun_proto::stream::{BODY_DATA, BODY_TRAILERS};
use quictun_proto::{BodyFrameHeader, Limits, StreamCode, Trailers, frame};

use crate::http_stream::{MAX_CHUNK, headers_from_wire, headers_to_wire, stop, strip_hop_by_hop};
use crate::link::BodyError;

/// How a body is laid out on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The bytes until FIN; trailers cannot be carried (they are dropped).
    Raw,
    /// Body frames; trailers travel in the last one, at most `max_trailers` bytes.
    Framed {
        /// The trailers frame's payload limit (the head-frame limit).
        max_trailers: usize,
    },
}

impl Framing {
    /// The framing a head's `framed_body` flag announces.
    pub fn new(framed_body: bool, limits: &Limits) -> Self {
        if framed_body { Self::Framed { max_trailers: limits.max_head_frame } } else { Self::Raw }
    }
}

/// The body that follows a head on `recv`: framed or raw as the head announced.
pub fn recv_body(recv: quinn::RecvStream, framed_body: bool, limits: Limits) -> crate::link::TunnelBody {
    use http_body_util::BodyExt;
    if framed_body {
        FramedRecvBody::new(recv, limits).boxed_unsync()
    } else {
        crate::http_stream::RecvBody::new(recv).boxed_unsync()
    }
}

/// True when a message's body may end with trailers, so it must be sent framed: HTTP/2 messages
/// (gRPC among them) and HTTP/1.1 ones that announce trailers with a `Trailer` header.
pub fn may_have_trailers(version: http::Version, headers: &HeaderMap) -> bool {
    version >= http::Version::HTTP_2 || headers.contains_key(http::header::TRAILER)
}

/// Trailer fields in wire form, hop-by-hop fields removed.
pub fn trailers_to_wire(map: &HeaderMap) -> Trailers {
    let mut map = map.clone();
    strip_hop_by_hop(&mut map);
    Trailers { headers: headers_to_wire(&map) }
}

/// Encodes trailers as one body frame (header and payload) of at most `max` payload bytes.
pub fn encode_trailers_frame(map: &HeaderMap, max: usize) -> Result<Bytes, frame::FrameError> {
    let payload = frame::encode_payload(&trailers_to_wire(map), max)?;
    let header = BodyFrameHeader { kind: BODY_TRAILERS, len: payload.len() }.encode();
    let mut out = BytesMut::with_capacity(header.len() + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    Ok(out.freeze())
}

/// The header of a data frame carrying `len` bytes.
pub fn data_frame_header(len: usize) -> Bytes {
    Bytes::copy_from_slice(&BodyFrameHeader { kind: BODY_DATA, len }.encode())
}

/// Decodes and checks a trailers payload into a header map.
pub fn trailers_from_wire(payload: &[u8], limits: &Limits) -> Result<HeaderMap, String> {
    let trailers: Trailers = frame::decode_bounded(payload, limits.max_head_frame).map_err(|e| e.to_string())?;
    trailers.validate(limits).map_err(|e| e.to_string())?;
    headers_from_wire(trailers.headers).map_err(|e| e.to_string())
}

enum State {
    /// Reading a frame header (`filled` of its bytes so far).
    Header {
        buf: [u8; BodyFrameHeader::LEN],
        filled: usize,
    },
    /// Passing through the rest of a data frame.
    Data {
        remaining: usize,
    },
    /// Collecting a trailers frame of `len` bytes.
    Trailers {
        buf: Vec<u8>,
        len: usize,
    },
    /// Trailers delivered: only FIN may follow.
    AfterTrailers,
    Done,
}

/// A framed body read from a QUIC receive stream: data frames come out as they arrive, the
/// trailers frame as an HTTP trailers frame. A malformed frame ends the body with an error and
/// stops the stream with [`StreamCode::Malformed`]. Dropping it early stops the stream too.
pub struct FramedRecvBody {
    recv: quinn::RecvStream,
    limits: Limits,
    state: State,
}

impl FramedRecvBody {
    /// Reads the rest of `recv` as a framed body, bounding trailers by `limits`.
    pub fn new(recv: quinn::RecvStream, limits: Limits) -> Self {
        Self { recv, limits, state: State::Header { buf: [0; BodyFrameHeader::LEN], filled: 0 } }
    }

    fn malformed(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Done;
        stop(&mut self.recv, StreamCode::Malformed);
        Poll::Ready(Some(Err(BodyError::Closed(format!("malformed framed body: {why}")))))
    }

    fn failed(&mut self, err: quinn::ReadError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = State::Done;
        Poll::Ready(Some(Err(err.into())))
    }
}

/// Polls one chunk of at most `max` bytes (`read_chunk` is cancel-safe, so a fresh future per
/// poll loses nothing).
fn poll_chunk(
    recv: &mut quinn::RecvStream,
    max: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Bytes>, quinn::ReadError>> {
    let read = recv.read_chunk(max, true);
    let result = ready!(std::pin::pin!(read).poll(cx));
    Poll::Ready(result.map(|chunk| chunk.map(|c| c.bytes)))
}

impl Body for FramedRecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Header { buf, filled } => {
                    let want = BodyFrameHeader::LEN - *filled;
                    let chunk = match ready!(poll_chunk(&mut this.recv, want, cx)) {
                        Ok(chunk) => chunk,
                        Err(err) => return this.failed(err),
                    };
                    let Some(chunk) = chunk else {
                        if *filled == 0 {
                            this.state = State::Done;
                            return Poll::Ready(None);
                        }
                        return this.malformed("stream ended inside a frame header".into());
                    };
                    buf[*filled..*filled + chunk.len()].copy_from_slice(&chunk);
                    *filled += chunk.len();
                    if *filled < BodyFrameHeader::LEN {
                        continue;
                    }
                    let header = match BodyFrameHeader::decode(*buf, &this.limits) {
                        Ok(header) => header,
                        Err(err) => return this.malformed(err.to_string()),
                    };
                    this.state = match header.kind {
                        BODY_DATA => State::Data { remaining: header.len },
                        _ => State::Trailers { buf: Vec::with_capacity(header.len), len: header.len },
                    };
                }
                State::Data { remaining } if *remaining == 0 => {
                    this.state = State::Header { buf: [0; BodyFrameHeader::LEN], filled: 0 };
                }
                State::Data { remaining } => {
                    let want = (*remaining).min(MAX_CHUNK);
                    match ready!(poll_chunk(&mut this.recv, want, cx)) {
                        Ok(Some(chunk)) => {
                            *remaining -= chunk.len();
                            return Poll::Ready(Some(Ok(Frame::data(chunk))));
                        }
                        Ok(None) => return this.malformed("stream ended inside a data frame".into()),
                        Err(err) => return this.failed(err),
                    }
                }
                State::Trailers { buf, len } if buf.len() == *len => {
                    let decoded = trailers_from_wire(buf, &this.limits);
                    this.state = State::AfterTrailers;
                    return match decoded {
                        Ok(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                        Err(err) => this.malformed(err),
                    };
                }
                State::Trailers { buf, len } => {
                    let want = *len - buf.len();
                    match ready!(poll_chunk(&mut this.recv, want, cx)) {
                        Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                        Ok(None) => return this.malformed("stream ended inside the trailers".into()),
                        Err(err) => return this.failed(err),
                    }
                }
                State::AfterTrailers => match ready!(poll_chunk(&mut this.recv, 1, cx)) {
                    Ok(None) => this.state = State::Done,
                    Ok(Some(_)) => return this.malformed("bytes after the trailers".into()),
                    Err(err) => return this.failed(err),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_frames_round_trip_and_drop_hop_by_hop_fields() {
        let limits = Limits::default();
        let mut map = HeaderMap::new();
        map.insert("grpc-status", "5".parse().unwrap());
        map.insert("grpc-message", "not found".parse().unwrap());
        map.insert("connection", "close".parse().unwrap());
        let frame = encode_trailers_frame(&map, limits.max_head_frame).unwrap();
        let header: [u8; BodyFrameHeader::LEN] = frame[..BodyFrameHeader::LEN].try_into().unwrap();
        let header = BodyFrameHeader::decode(header, &limits).unwrap();
        assert_eq!((header.kind, header.len), (BODY_TRAILERS, frame.len() - BodyFrameHeader::LEN));
        let back = trailers_from_wire(&frame[BodyFrameHeader::LEN..], &limits).unwrap();
        assert_eq!(back.get("grpc-status").unwrap(), "5");
        assert_eq!(back.get("grpc-message").unwrap(), "not found");
        assert!(back.get("connection").is_none());
    }

    #[test]
    fn trailers_over_the_field_limit_are_refused() {
        let limits = Limits { max_header_count: 2, ..Limits::default() };
        let mut map = HeaderMap::new();
        for i in 0..3 {
            map.insert(http::HeaderName::try_from(format!("x-{i}")).unwrap(), "1".parse().unwrap());
        }
        let frame = encode_trailers_frame(&map, 4096).unwrap();
        assert!(trailers_from_wire(&frame[BodyFrameHeader::LEN..], &limits).is_err());
    }
}
