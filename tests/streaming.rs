//! Streaming without buffering, on both transports: a server-sent-events response reaches the
//! client event by event (the first before the upstream has produced the second), and a long poll
//! is answered whenever the upstream answers.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use quictun_agent::Transport;
use quictun_tests::client::empty;
use quictun_tests::{Harness, HarnessConfig};

const WAIT: Duration = Duration::from_secs(20);

async fn server_sent_events_arrive_one_by_one(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let response = h.client.send(Method::GET, "app.test", "/events", empty()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    // The upstream has sent only the first event; it is already here.
    let first = tokio::time::timeout(WAIT, body.frame()).await.expect("first event held back").unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "event: tick\ndata: one\n\n");
    h.upstream.release();
    let second = tokio::time::timeout(WAIT, body.frame()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.into_data().unwrap(), "event: tick\ndata: two\n\n");
    assert!(tokio::time::timeout(WAIT, body.frame()).await.unwrap().is_none());
}

async fn a_long_poll_is_answered_when_the_upstream_answers(transport: Transport) {
    let h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let client = h.client.clone();
    let poll = tokio::spawn(async move { client.get("app.test", "/hang").await });
    h.upstream.wait_hanging(1).await;
    assert!(!poll.is_finished());
    h.upstream.release();
    let reply = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (StatusCode::OK, "released"));
}

quictun_tests::on_both_transports!(
    server_sent_events_arrive_one_by_one,
    a_long_poll_is_answered_when_the_upstream_answers
);
