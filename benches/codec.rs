//! Encode and decode of the frames on the per-request path (`cargo bench -p quictun-benches`).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quictun_proto::frame;
use quictun_proto::{ControlMessage, Heartbeat, Limits, RequestHead, ResponseHead};
use std::hint::black_box;

fn request_head(c: &mut Criterion) {
    let head = quictun_benches::browser_request();
    let max = Limits::default().max_head_frame;
    let bytes = frame::encode(&head, max).unwrap();
    let mut group = c.benchmark_group("request_head");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| frame::encode(black_box(&head), max).unwrap()));
    group.bench_function("decode", |b| b.iter(|| frame::decode::<RequestHead>(black_box(&bytes), max).unwrap()));
    group.bench_function("check_incomplete", |b| b.iter(|| frame::check(black_box(&bytes[..bytes.len() / 2]), max)));
    group.finish();
}

fn response_head(c: &mut Criterion) {
    let head = quictun_benches::response();
    let max = Limits::default().max_head_frame;
    let bytes = frame::encode(&head, max).unwrap();
    let mut group = c.benchmark_group("response_head");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| b.iter(|| frame::encode(black_box(&head), max).unwrap()));
    group.bench_function("decode", |b| b.iter(|| frame::decode::<ResponseHead>(black_box(&bytes), max).unwrap()));
    group.finish();
}

fn control(c: &mut Criterion) {
    let msg = ControlMessage::Heartbeat(Heartbeat { seq: 42, sent_at_us: 123_456_789, rtt_us: Some(350) });
    let max = Limits::default().max_control_frame;
    let bytes = frame::encode(&msg, max).unwrap();
    c.bench_function("heartbeat/encode", |b| b.iter(|| frame::encode(black_box(&msg), max).unwrap()));
    c.bench_function("heartbeat/decode", |b| {
        b.iter(|| frame::decode::<ControlMessage>(black_box(&bytes), max).unwrap())
    });
}

/// The framed-body codec of HTTP/2 and gRPC exchanges: the header of each data frame, and gRPC's
/// trailers (`grpc-status`, `grpc-message`) encoded into their frame and decoded back.
fn body_frames(c: &mut Criterion) {
    use quictun_core::framing::{data_frame_header, encode_trailers_frame, trailers_from_wire};
    let limits = Limits::default();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
    let frame = encode_trailers_frame(&trailers, limits.max_head_frame).unwrap();
    let payload = &frame[quictun_proto::BodyFrameHeader::LEN..];
    c.bench_function("body_frames/data_header", |b| b.iter(|| data_frame_header(black_box(65_536))));
    c.bench_function("body_frames/trailers_encode", |b| {
        b.iter(|| encode_trailers_frame(black_box(&trailers), limits.max_head_frame).unwrap())
    });
    c.bench_function("body_frames/trailers_decode", |b| {
        b.iter(|| trailers_from_wire(black_box(payload), &limits).unwrap())
    });
}

criterion_group!(benches, request_head, response_head, control, body_frames);
criterion_main!(benches);
