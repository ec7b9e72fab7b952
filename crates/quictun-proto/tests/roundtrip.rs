//! Property tests: every message survives encode → decode, and no input makes a decoder panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use quictun_proto::frame::{self, FrameError};
use quictun_proto::*;
use uuid::Uuid;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._/:-]{0,40}"
}

fn upstream() -> impl Strategy<Value = UpstreamSpec> {
    (text(), prop::collection::vec(text(), 0..4)).prop_map(|(name, targets)| UpstreamSpec { name, targets })
}

fn agent_config() -> impl Strategy<Value = AgentConfig> {
    (any::<u64>(), prop::collection::vec(upstream(), 0..4))
        .prop_map(|(version, upstreams)| AgentConfig { version, upstreams })
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::BadToken),
        Just(RejectCode::VersionMismatch),
        Just(RejectCode::GroupMismatch),
        Just(RejectCode::ShuttingDown),
        Just(RejectCode::Unavailable),
    ]
}

fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    (any::<u64>(), any::<u64>(), any::<Option<u64>>()).prop_map(|(seq, sent_at_us, rtt_us)| Heartbeat {
        seq,
        sent_at_us,
        rtt_us,
    })
}

fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        (any::<u16>(), text(), text(), text(), text(), any::<u128>()).prop_map(|(v, c, g, t, a, i)| {
            ControlMessage::Register(Register {
                protocol_version: v,
                client_id: c,
                group: g,
                token: Token::new(t),
                agent_version: a,
                instance_id: Uuid::from_u128(i),
            })
        }),
        (any::<u128>(), any::<u32>(), any::<u32>(), agent_config()).prop_map(|(id, hb, misses, config)| {
            ControlMessage::Accepted(Accepted {
                session_id: Uuid::from_u128(id),
                heartbeat_interval_ms: hb,
                heartbeat_misses: misses,
                config,
            })
        }),
        (reject_code(), text()).prop_map(|(code, message)| ControlMessage::Rejected(Rejected { code, message })),
        agent_config().prop_map(ControlMessage::ConfigSync),
        heartbeat().prop_map(ControlMessage::Heartbeat),
        heartbeat().prop_map(ControlMessage::HeartbeatAck),
        (any::<u32>(), text()).prop_map(|(drain_ms, reason)| ControlMessage::GoAway(GoAway { drain_ms, reason })),
        (any::<u16>(), text(), text()).prop_map(|(v, relay_id, t)| {
            ControlMessage::PeerHello(PeerHello { protocol_version: v, relay_id, token: Token::new(t) })
        }),
        text().prop_map(|relay_id| ControlMessage::PeerAccepted(PeerAccepted { relay_id })),
    ]
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    prop::collection::vec(
        (text(), prop::collection::vec(any::<u8>(), 0..32)).prop_map(|(name, value)| Header { name, value }),
        0..8,
    )
}

fn target() -> impl Strategy<Value = Target> {
    let host_port =
        ("[a-z0-9.-]{1,40}", 1..=u16::MAX).prop_map(|(host, port)| format!("{host}:{port}").parse().unwrap());
    prop_oneof![
        text().prop_map(Target::Http),
        host_port.prop_map(Target::Tcp),
        text().prop_map(Target::Upgrade),
        Just(Target::Egress),
        (
            text(),
            text(),
            any::<bool>(),
            prop::option::of(any::<[u8; 4]>()),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..8))
        )
            .prop_map(|(group, upstream, idempotent, client, hash_key)| {
                Target::Peer(Box::new(PeerRequest {
                    group,
                    target: Target::Http(upstream),
                    client: client.map(std::net::IpAddr::from),
                    hash_key,
                    idempotent,
                }))
            }),
    ]
}

/// One hop: a peer request must carry a request for an agent, never another peer request.
#[test]
fn a_peer_request_inside_a_peer_request_is_refused() {
    let peer = |target| {
        Target::Peer(Box::new(PeerRequest {
            group: "g".into(),
            target,
            client: None,
            hash_key: None,
            idempotent: true,
        }))
    };
    let head = |target| RequestHead {
        target,
        request_id: Uuid::nil(),
        method: "GET".into(),
        uri: "/".into(),
        headers: Vec::new(),
        has_body: false,
        framed_body: false,
    };
    let limits = quictun_proto::Limits::default();
    assert!(head(peer(Target::Http("web".into()))).validate(&limits).is_ok());
    assert!(head(peer(peer(Target::Http("web".into())))).validate(&limits).is_err());
    assert!(head(peer(Target::Egress)).validate(&limits).is_err());
    assert!(head(peer(Target::Tcp("db:5432".parse().unwrap()))).validate(&limits).is_ok());
    let flow = UdpFlow { upstream: "dns:53".parse().unwrap(), flow: 1, proxy_v2: None };
    assert!(head(peer(Target::Udp(Box::new(flow)))).validate(&limits).is_err(), "flows are not forwarded");
    let raw = RequestHead { framed_body: true, ..head(peer(Target::Upgrade("web".into()))) };
    assert!(raw.validate(&limits).is_err(), "an upgrade stays raw through the hop");
}

proptest! {
    #[test]
    fn control_messages_round_trip(msg in control()) {
        let bytes = frame::encode(&msg, Limits::default().max_control_frame).unwrap();
        let (back, used) = frame::decode::<ControlMessage>(&bytes, Limits::default().max_control_frame).unwrap().unwrap();
        prop_assert_eq!(back, msg);
        prop_assert_eq!(used, bytes.len());
    }

    #[test]
    fn request_heads_round_trip(target in target(), id in any::<u128>(), method in text(), uri in text(), headers in headers(), has_body in any::<bool>(), framed_body in any::<bool>()) {
        let head = RequestHead { target, request_id: Uuid::from_u128(id), method, uri, headers, has_body, framed_body };
        let bytes = frame::encode(&head, Limits::default().max_head_frame).unwrap();
        let (back, _) = frame::decode::<RequestHead>(&bytes, Limits::default().max_head_frame).unwrap().unwrap();
        prop_assert_eq!(back, head);
    }

    #[test]
    fn response_heads_round_trip(status in any::<u16>(), headers in headers(), framed_body in any::<bool>()) {
        let head = ResponseHead { status, headers, framed_body };
        let bytes = frame::encode(&head, 4096).unwrap();
        let (back, _) = frame::decode::<ResponseHead>(&bytes, 4096).unwrap().unwrap();
        prop_assert_eq!(back, head);
    }

    #[test]
    fn trailers_round_trip(headers in headers()) {
        let trailers = Trailers { headers };
        let bytes = frame::encode(&trailers, 4096).unwrap();
        let (back, _) = frame::decode::<Trailers>(&bytes, 4096).unwrap().unwrap();
        prop_assert_eq!(back, trailers);
    }

    #[test]
    fn body_frame_headers_are_bounded(kind in any::<u8>(), len in any::<u32>()) {
        let limits = Limits::default();
        let mut bytes = [0u8; BodyFrameHeader::LEN];
        bytes[0] = kind;
        bytes[1..].copy_from_slice(&len.to_be_bytes());
        match BodyFrameHeader::decode(bytes, &limits) {
            Ok(header) => {
                prop_assert!(kind <= 1);
                prop_assert!(header.len <= quictun_proto::stream::MAX_BODY_DATA_FRAME);
                prop_assert_eq!(header.encode(), bytes);
            }
            Err(_) => prop_assert!(kind > 1 || len as usize > limits.max_head_frame),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode::<ControlMessage>(&bytes, 1024);
        let _ = frame::decode::<RequestHead>(&bytes, 1024);
        let _ = frame::decode::<ResponseHead>(&bytes, 1024);
    }

    #[test]
    fn lengths_over_the_limit_are_refused(len in 1025u32..) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0; 8]);
        let refused = matches!(frame::check(&buf, 1024), Err(FrameError::TooLarge { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn damaged_frames_decode_to_an_error_or_a_wait_never_a_panic(msg in control(), cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let max = Limits::default().max_control_frame;
        let bytes = frame::encode(&msg, max).unwrap();
        // Truncated anywhere: the decoder waits for more bytes.
        let short = &bytes[..cut.index(bytes.len())];
        prop_assert!(matches!(frame::decode::<ControlMessage>(short, max), Ok(None)));
        // One bit flipped anywhere: an error, a wait, or some message; never a panic or an overrun.
        let mut damaged = bytes.clone();
        damaged[flip.index(bytes.len())] ^= 1 << bit;
        if let Ok(Some((_, used))) = frame::decode::<ControlMessage>(&damaged, max) {
            prop_assert!(used <= damaged.len());
        }
    }
}
