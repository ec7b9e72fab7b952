//! Messages of the gRPC transport: protobuf first, then the bincode head or control message each
//! carries (or its trailers), as the relay's and the agent's demultiplexers decode them; and the
//! same messages dispatched to a real exchange table (credits, stops, resets, bodies for
//! exchanges that may or may not exist). Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use quictun_core::stall::{Reclaimer, StallLimits};
use quictun_grpc::exchange::{End, Exchanges};
use quictun_grpc::messages::{Payload, TunnelMessage};
use quictun_grpc::mux::Outbound;
use quictun_proto::{ControlMessage, Limits, RequestHead, ResponseHead, frame};

fn decode_payload(payload: &Payload, limits: &Limits) {
    match payload {
        Payload::Control(bytes) => {
            let _ = frame::decode_bounded::<ControlMessage>(bytes, limits.max_control_frame);
        }
        Payload::RequestHead(bytes) => {
            if let Ok(head) = frame::decode_bounded::<RequestHead>(bytes, limits.max_head_frame) {
                let _ = head.validate(limits);
            }
        }
        Payload::ResponseHead(bytes) => {
            if let Ok(head) = frame::decode_bounded::<ResponseHead>(bytes, limits.max_head_frame) {
                let _ = head.validate(limits);
            }
        }
        Payload::Trailers(bytes) => {
            let _ = quictun_core::framing::trailers_from_wire(bytes, limits);
        }
        Payload::Body(_) | Payload::End(_) | Payload::Reset(_) | Payload::Credit(_) | Payload::Stop(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let (_outbound, senders) = Outbound::new();
    let stall = Reclaimer::new(StallLimits::default()).scope(1 << 20);
    let exchanges = Exchanges::new(End::Agent, &senders, limits, stall);
    let (requests, mut incoming) = tokio::sync::mpsc::channel(4);
    let mut rest = data;
    while let Ok(message) = TunnelMessage::decode_length_delimited(&mut rest) {
        let Some(payload) = message.payload else { continue };
        decode_payload(&payload, &limits);
        if !matches!(payload, Payload::Control(_)) {
            exchanges.dispatch(message.request_id, payload, &requests);
        }
        while incoming.try_recv().is_ok() {}
    }
    exchanges.close();
});
