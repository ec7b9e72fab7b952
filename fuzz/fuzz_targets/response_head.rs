//! A response-head frame as the relay reads it off a data stream, then the header conversion the
//! relay does before answering the client. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quictun_proto::{Limits, ResponseHead, frame};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(Some((head, _))) = frame::decode::<ResponseHead>(data, limits.max_head_frame) else { return };
    if head.validate(&limits).is_ok() {
        let _ = quictun_core::http::headers_from_wire(head.headers.clone());
    }
    let again = frame::encode(&head, limits.max_head_frame).expect("a decoded head re-encodes");
    let (back, _) = frame::decode::<ResponseHead>(&again, limits.max_head_frame).unwrap().unwrap();
    assert_eq!(back, head);
});
