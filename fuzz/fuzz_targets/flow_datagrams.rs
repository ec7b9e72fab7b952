//! A UDP flow's two codecs: a DATAGRAM frame's flow-id prefix (`datagram::decode`), and the
//! datagrams framed on a flow's stream (`StreamDecoder`) arriving in fuzzer-chosen chunks. The
//! input's first byte says how many chunk sizes follow (up to 8); those bytes are the sizes the
//! rest is cut into (cycled). A decoded prefix re-encodes to the same flow and payload; the
//! stream decoder yields, whatever the chunks, what a walk of the whole input says, and ends on
//! the same error or the same partial tail. Nothing may panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quictun_proto::datagram::{self, MAX_UDP_PAYLOAD, StreamDecoder};

/// The whole-input walk: the datagrams, then `Err(len)` for a length over the limit or
/// `Ok(tail)` for the bytes of an unfinished one.
fn walk(mut rest: &[u8]) -> (Vec<&[u8]>, Result<usize, usize>) {
    let mut out = Vec::new();
    loop {
        if rest.len() < 2 {
            return (out, Ok(rest.len()));
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if len > MAX_UDP_PAYLOAD {
            return (out, Err(len));
        }
        if rest.len() < 2 + len {
            return (out, Ok(rest.len()));
        }
        out.push(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
}

fuzz_target!(|input: &[u8]| {
    if let Ok((flow, payload)) = datagram::decode(Bytes::copy_from_slice(input)) {
        let again = datagram::encode(flow, &payload).expect("a decoded flow id fits");
        assert_eq!(datagram::decode(again).unwrap(), (flow, payload));
    }

    let Some((&count, rest)) = input.split_first() else { return };
    let count = usize::from(count % 9).min(rest.len());
    let (sizes, body) = rest.split_at(count);
    let sizes: Vec<usize> = sizes.iter().map(|s| usize::from(*s).max(1)).collect();
    let (expected, end) = walk(body);
    let mut decoder = StreamDecoder::default();
    let mut got = Vec::new();
    let mut error = None;
    let mut offset = 0;
    let mut i = 0;
    'feed: while offset < body.len() {
        let size = if sizes.is_empty() { body.len() } else { sizes[i % sizes.len()] };
        let chunk = &body[offset..(offset + size).min(body.len())];
        offset += chunk.len();
        i += 1;
        decoder.push(chunk);
        loop {
            match decoder.next_datagram() {
                Ok(Some(datagram)) => got.push(datagram),
                Ok(None) => break,
                Err(err) => {
                    error = Some(err.0);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(got.len(), expected.len());
    assert!(got.iter().zip(&expected).all(|(a, b)| &a[..] == *b));
    match end {
        Err(len) => assert_eq!(error, Some(len)),
        Ok(tail) => {
            assert_eq!(error, None);
            assert_eq!(decoder.partial(), tail);
        }
    }
});
