//! Messages of the gRPC transport: protobuf first, then the bincode head or control message each
//! carries (or its trailers), as the relay's and the agent's demultiplexers decode them; and the
//! same messages dispatched to a real exchange table of each end, the relay's and the agent's,
//! each with exchanges of its own waiting for their answers (response heads, bodies, trailers,
//! credits, stops and resets for exchanges that exist, and for ones that do not; request heads
//! with ids the peer may and may not use). Every waiting exchange must end once the table
//! closes. Nothing may panic.
#![no_main]

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, Waker};

use http_body::Body;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use quictun_core::body::{TunnelBody, empty_body};
use quictun_core::stall::{Reclaimer, StallLimits};
use quictun_core::tunnel::ExchangeError;
use quictun_grpc::exchange::{End, Exchanges};
use quictun_grpc::messages::{Payload, TunnelMessage};
use quictun_grpc::mux::Outbound;
use quictun_proto::{ControlMessage, Limits, RequestHead, ResponseHead, Target, frame};

/// Exchanges each end opens before the messages arrive.
const OPENED: usize = 4;

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));

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

fn head() -> RequestHead {
    RequestHead {
        target: Target::Http("app".into()),
        request_id: Default::default(),
        method: "GET".into(),
        uri: "/".into(),
        headers: Vec::new(),
        has_body: false,
        framed_body: false,
    }
}

type Opening<'a> = Pin<Box<dyn Future<Output = Result<(quictun_proto::ResponseHead, TunnelBody), ExchangeError>> + 'a>>;

/// One exchange this end opened: waiting for its answer, then reading its body.
enum Waiting<'a> {
    Head(Opening<'a>),
    Body(TunnelBody),
    Ended,
}

impl Waiting<'_> {
    /// Polls once (everything here is ready or waits on a message that may never come).
    fn poll(&mut self, cx: &mut Context<'_>) {
        match self {
            Self::Head(opening) => match opening.as_mut().poll(cx) {
                Poll::Ready(Ok((_, body))) => *self = Self::Body(body),
                Poll::Ready(Err(_)) => *self = Self::Ended,
                Poll::Pending => {}
            },
            Self::Body(body) => {
                while let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
                    if !matches!(frame, Some(Ok(_))) {
                        *self = Self::Ended;
                        return;
                    }
                }
            }
            Self::Ended => {}
        }
    }
}

/// Runs the messages of `data` through the exchange table of `end`.
fn one_end(end: End, data: &[u8]) {
    let limits = Limits::default();
    let (_outbound, senders) = Outbound::new();
    let stall = Reclaimer::new(StallLimits::default()).scope(1 << 20);
    let exchanges = Exchanges::new(end, &senders, limits, stall);
    let (requests, mut incoming) = tokio::sync::mpsc::channel(4);
    let mut cx = Context::from_waker(Waker::noop());
    let mut waiting: Vec<Waiting<'_>> =
        (0..OPENED).map(|_| Waiting::Head(Box::pin(exchanges.open(head(), empty_body(), None)))).collect();
    for exchange in &mut waiting {
        exchange.poll(&mut cx);
    }
    let mut rest = data;
    while let Ok(message) = TunnelMessage::decode_length_delimited(&mut rest) {
        let Some(payload) = message.payload else { continue };
        decode_payload(&payload, &limits);
        if !matches!(payload, Payload::Control(_)) {
            exchanges.dispatch(message.request_id, payload, &requests);
        }
        while incoming.try_recv().is_ok() {}
        for exchange in &mut waiting {
            exchange.poll(&mut cx);
        }
    }
    exchanges.close();
    for exchange in &mut waiting {
        exchange.poll(&mut cx);
        assert!(!matches!(exchange, Waiting::Head(_)), "an exchange still waits for its answer after the close");
    }
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        one_end(End::Agent, data);
        one_end(End::Relay, data);
    });
});
