//! A framed body as a reader walks it: frame headers (type and length checked against the limits
//! before anything is read), data skipped, trailers decoded and checked, then re-encoded and
//! decoded again to the same fields. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quictun_core::framing::{encode_trailers_frame, trailers_from_wire};
use quictun_proto::stream::BODY_TRAILERS;
use quictun_proto::{BodyFrameHeader, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let mut rest = data;
    while let Some((header, tail)) = rest.split_first_chunk::<{ BodyFrameHeader::LEN }>() {
        let Ok(header) = BodyFrameHeader::decode(*header, &limits) else { return };
        assert_eq!(BodyFrameHeader::decode(header.encode(), &limits), Ok(header));
        let Some((payload, tail)) = tail.split_at_checked(header.len) else { return };
        if header.kind == BODY_TRAILERS {
            let Ok(map) = trailers_from_wire(payload, &limits) else { return };
            let again = encode_trailers_frame(&map, limits.max_head_frame).expect("checked trailers re-encode");
            let back = trailers_from_wire(&again[BodyFrameHeader::LEN..], &limits).expect("re-encoded trailers decode");
            assert_eq!(back, map);
            return;
        }
        rest = tail;
    }
});
