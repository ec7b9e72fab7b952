//! A request-head frame as the agent reads it off a data stream: length prefix, bincode, limits,
//! then the header conversion the agent does before forwarding. Nothing may panic, and whatever
//! decodes must re-encode to a frame that decodes to the same head.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quictun_proto::{Limits, RequestHead, frame};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(Some((head, used))) = frame::decode::<RequestHead>(data, limits.max_head_frame) else { return };
    assert!(used <= data.len());
    if head.validate(&limits).is_ok() {
        let _ = quictun_core::http::headers_from_wire(head.headers.clone());
    }
    let again = frame::encode(&head, limits.max_head_frame).expect("a decoded head re-encodes");
    let (back, _) = frame::decode::<RequestHead>(&again, limits.max_head_frame).unwrap().unwrap();
    assert_eq!(back, head);
});
