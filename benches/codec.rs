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

criterion_group!(benches, request_head, response_head, control);
criterion_main!(benches);
