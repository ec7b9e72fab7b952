//! A message of the gRPC transport: protobuf first, then the bincode head or control message it
//! carries (or its trailers), as the relay's and the agent's demultiplexers decode them. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use quictun_grpc::messages::{Payload, TunnelMessage};
use quictun_proto::{ControlMessage, Limits, RequestHead, ResponseHead, frame};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = TunnelMessage::decode(data) else { return };
    let limits = Limits::default();
    match message.payload {
        Some(Payload::Control(bytes)) => {
            let _ = frame::decode_bounded::<ControlMessage>(&bytes, limits.max_control_frame);
        }
        Some(Payload::RequestHead(bytes)) => {
            if let Ok(head) = frame::decode_bounded::<RequestHead>(&bytes, limits.max_head_frame) {
                let _ = head.validate(&limits);
            }
        }
        Some(Payload::ResponseHead(bytes)) => {
            if let Ok(head) = frame::decode_bounded::<ResponseHead>(&bytes, limits.max_head_frame) {
                let _ = head.validate(&limits);
            }
        }
        Some(Payload::Trailers(bytes)) => {
            let _ = quictun_core::body_frames::trailers_from_wire(&bytes, &limits);
        }
        Some(Payload::Body(_) | Payload::End(_) | Payload::Reset(_)) | None => {}
    }
});
