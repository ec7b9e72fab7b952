//! Framed bodies, for exchanges whose body may end with trailers (HTTP/2, gRPC): the frame
//! encoding, and [`FramedBody`], which decodes one from any transport's raw bytes.
//!
//! A raw body is its bytes until its end; nothing can follow it. A framed body (see
//! [`quictun_proto::stream`]) is a run of data frames and, optionally, one trailers frame before
//! the end. Data frames are streamed through as they arrive, never collected; only the trailers
//! frame, bounded by the head-frame limit, is read whole.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame};
use quictun_proto::stream::{BODY_DATA, BODY_TRAILERS};
use quictun_proto::{BodyFrameHeader, Limits, Trailers, frame};

use crate::body::BodyError;
use crate::http::{headers_from_wire, headers_to_wire, strip_hop_by_hop};

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
    /// Trailers delivered: only the end may follow.
    AfterTrailers,
    Done,
}

/// What one poll of a body gives.
type Polled = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

/// A framed body decoded from the raw bytes of `inner` (see [`quictun_proto::stream`]): data
/// frames come out as they arrive, sliced from the chunks they came in (never copied or
/// collected); the trailers frame, bounded by the head-frame limit, comes out as an HTTP
/// trailers frame. A malformed frame ends the body with an error; any transport's raw body can
/// be read this way.
pub struct FramedBody<B> {
    inner: B,
    limits: Limits,
    state: State,
    /// Bytes of `inner` received and not yet taken.
    pending: Bytes,
}

impl<B> FramedBody<B> {
    /// Decodes `inner`, bounding trailers by `limits`.
    pub fn new(inner: B, limits: Limits) -> Self {
        let state = State::Header { buf: [0; BodyFrameHeader::LEN], filled: 0 };
        Self { inner, limits, state, pending: Bytes::new() }
    }

    fn malformed(&mut self, why: impl std::fmt::Display) -> Polled {
        self.state = State::Done;
        Poll::Ready(Some(Err(BodyError::Closed(format!("malformed framed body: {why}")))))
    }

    /// The raw body ended: a clean end between frames (or after the trailers), malformed inside
    /// one.
    fn at_end(&mut self) -> Polled {
        match &self.state {
            State::Header { filled: 0, .. } | State::AfterTrailers | State::Data { remaining: 0 } | State::Done => {
                self.state = State::Done;
                Poll::Ready(None)
            }
            State::Header { .. } => self.malformed("the body ended inside a frame header"),
            State::Data { .. } => self.malformed("the body ended inside a data frame"),
            State::Trailers { .. } => self.malformed("the body ended inside the trailers"),
        }
    }

    /// Moves the decoder on over the pending bytes: a frame to hand out, or `None` to go on
    /// (more bytes needed, or the next state entered).
    fn step(&mut self) -> Option<Polled> {
        match &mut self.state {
            State::Done => Some(Poll::Ready(None)),
            State::Header { buf, filled } => {
                let take = (BodyFrameHeader::LEN - *filled).min(self.pending.len());
                buf[*filled..*filled + take].copy_from_slice(&self.pending.split_to(take));
                *filled += take;
                if *filled < BodyFrameHeader::LEN {
                    return None;
                }
                let header = match BodyFrameHeader::decode(*buf, &self.limits) {
                    Ok(header) => header,
                    Err(err) => return Some(self.malformed(err)),
                };
                self.state = match header.kind {
                    BODY_DATA => State::Data { remaining: header.len },
                    _ => State::Trailers { buf: Vec::with_capacity(header.len), len: header.len },
                };
                None
            }
            State::Data { remaining } if *remaining == 0 => {
                self.state = State::Header { buf: [0; BodyFrameHeader::LEN], filled: 0 };
                None
            }
            State::Data { remaining } => {
                let take = (*remaining).min(self.pending.len());
                *remaining -= take;
                Some(Poll::Ready(Some(Ok(Frame::data(self.pending.split_to(take))))))
            }
            State::Trailers { buf, len } => {
                let take = (*len - buf.len()).min(self.pending.len());
                buf.extend_from_slice(&self.pending.split_to(take));
                if buf.len() < *len {
                    return None;
                }
                let decoded = trailers_from_wire(buf, &self.limits);
                self.state = State::AfterTrailers;
                Some(match decoded {
                    Ok(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                    Err(err) => self.malformed(err),
                })
            }
            State::AfterTrailers => Some(self.malformed("bytes after the trailers")),
        }
    }
}

impl<B> Body for FramedBody<B>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if matches!(this.state, State::Done) {
                return Poll::Ready(None);
            }
            if this.pending.is_empty() {
                match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            this.pending = data;
                        }
                        continue;
                    }
                    Some(Err(err)) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(err)));
                    }
                    None => return this.at_end(),
                }
            }
            if let Some(frame) = this.step() {
                return frame;
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

    /// `frames` cut into chunks of `sizes` (cycled), as a raw body.
    fn chunked(frames: &[u8], sizes: &[usize]) -> crate::body::TunnelBody {
        use http_body_util::BodyExt;
        let mut chunks = Vec::new();
        let (mut at, mut i) = (0, 0);
        while at < frames.len() {
            let size = sizes[i % sizes.len()].max(1).min(frames.len() - at);
            chunks.push(Ok::<_, BodyError>(Frame::data(Bytes::copy_from_slice(&frames[at..at + size]))));
            at += size;
            i += 1;
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
    }

    fn framed(data: &[&[u8]], trailers: Option<&HeaderMap>) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in data {
            out.extend_from_slice(&data_frame_header(piece.len()));
            out.extend_from_slice(piece);
        }
        if let Some(trailers) = trailers {
            out.extend_from_slice(&encode_trailers_frame(trailers, 4096).unwrap());
        }
        out
    }

    async fn decode(raw: crate::body::TunnelBody) -> Result<(Vec<u8>, Option<HeaderMap>), BodyError> {
        use http_body_util::BodyExt;
        let collected = FramedBody::new(raw, Limits::default()).collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((collected.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn framed_bodies_decode_whatever_the_chunking() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let bytes = framed(&[b"hello ", b"", b"world"], Some(&trailers));
        for sizes in [&[1usize][..], &[2, 3], &[5], &[7, 1, 64], &[4096]] {
            let (data, got) = decode(chunked(&bytes, sizes)).await.unwrap();
            assert_eq!(data, b"hello world", "{sizes:?}");
            assert_eq!(got.unwrap().get("grpc-status").unwrap(), "0", "{sizes:?}");
        }
        let (data, got) = decode(chunked(&framed(&[b"abc"], None), &[2])).await.unwrap();
        assert_eq!((data.as_slice(), got), (&b"abc"[..], None));
    }

    #[tokio::test]
    async fn truncated_or_trailing_bytes_are_malformed() {
        let bytes = framed(&[b"hello"], None);
        assert!(decode(chunked(&bytes[..bytes.len() - 1], &[3])).await.is_err(), "ends inside a data frame");
        assert!(decode(chunked(&bytes[..3], &[1])).await.is_err(), "ends inside a header");
        let mut trailers = HeaderMap::new();
        trailers.insert("x", "1".parse().unwrap());
        let mut after = framed(&[], Some(&trailers));
        after.push(0);
        assert!(decode(chunked(&after, &[64])).await.is_err(), "bytes after the trailers");
        assert!(decode(chunked(&[9, 0, 0, 0, 1, 0], &[6])).await.is_err(), "unknown frame type");
    }
}
