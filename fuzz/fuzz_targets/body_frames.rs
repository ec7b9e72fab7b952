//! A framed body as the streaming decoder (`FramedBody`) reads it from a transport: the input's
//! first byte says how many chunk sizes follow (up to 8), those bytes are the sizes the body is
//! cut into (cycled), the rest is the body. What the decoder yields (data, trailers, or an error)
//! must be what a walk of the whole body says, whatever the chunk boundaries; trailers re-encode
//! and decode to the same fields. Nothing may panic.
#![no_main]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use libfuzzer_sys::fuzz_target;
use quictun_core::body::BodyError;
use quictun_core::framing::{FramedBody, encode_trailers_frame, trailers_from_wire};
use quictun_proto::stream::BODY_TRAILERS;
use quictun_proto::{BodyFrameHeader, Limits};

/// A raw body arriving in the given chunks, each one ready at once.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }
}

/// What a framed body holds: its data and its trailers, or that it is malformed.
type Decoded = Result<(Vec<u8>, Option<HeaderMap>), ()>;

/// The reference: the frames walked over the whole body at once.
fn walk(mut rest: &[u8], limits: &Limits) -> Decoded {
    let mut data = Vec::new();
    while !rest.is_empty() {
        let (header, tail) = rest.split_first_chunk::<{ BodyFrameHeader::LEN }>().ok_or(())?;
        let header = BodyFrameHeader::decode(*header, limits).map_err(|_| ())?;
        assert_eq!(BodyFrameHeader::decode(header.encode(), limits), Ok(header));
        let (payload, tail) = tail.split_at_checked(header.len).ok_or(())?;
        if header.kind == BODY_TRAILERS {
            let map = trailers_from_wire(payload, limits).map_err(|_| ())?;
            let again = encode_trailers_frame(&map, limits.max_head_frame).expect("checked trailers re-encode");
            let back = trailers_from_wire(&again[BodyFrameHeader::LEN..], limits).expect("re-encoded trailers decode");
            assert_eq!(back, map);
            // Nothing may follow the trailers.
            return if tail.is_empty() { Ok((data, Some(map))) } else { Err(()) };
        }
        data.extend_from_slice(payload);
        rest = tail;
    }
    Ok((data, None))
}

/// The streaming decoder over `body` cut into chunks of `sizes`.
fn stream(body: &[u8], sizes: &[u8], limits: Limits) -> Decoded {
    let mut chunks = VecDeque::new();
    let (mut at, mut i) = (0, 0);
    while at < body.len() {
        let size = usize::from(sizes.get(i % sizes.len().max(1)).copied().unwrap_or(255).max(1)).min(body.len() - at);
        chunks.push_back(Bytes::copy_from_slice(&body[at..at + size]));
        at += size;
        i += 1;
    }
    let mut decoder = FramedBody::new(Chunks(chunks), limits);
    let mut cx = Context::from_waker(Waker::noop());
    let (mut data, mut trailers) = (Vec::new(), None);
    loop {
        match Pin::new(&mut decoder).poll_frame(&mut cx) {
            Poll::Ready(None) => return Ok((data, trailers)),
            Poll::Ready(Some(Err(_))) => return Err(()),
            Poll::Ready(Some(Ok(frame))) => {
                assert!(trailers.is_none(), "a frame after the trailers");
                match frame.into_data() {
                    Ok(bytes) => data.extend_from_slice(&bytes),
                    Err(frame) => trailers = Some(frame.into_trailers().expect("data or trailers")),
                }
            }
            Poll::Pending => panic!("a body whose chunks are all ready must never wait"),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&count, rest)) = input.split_first() else { return };
    let (sizes, body) = rest.split_at(usize::from(count % 9).min(rest.len()));
    let limits = Limits::default();
    let expected = walk(body, &limits);
    let streamed = stream(body, sizes, limits);
    match (&expected, &streamed) {
        (Ok(want), Ok(got)) => assert_eq!(want, got),
        (Err(()), Err(())) => {}
        _ => panic!("whole walk {expected:?}, streamed {streamed:?} (chunk sizes {sizes:?})"),
    }
});
