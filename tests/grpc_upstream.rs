//! gRPC through the tunnel, on both transports: a tonic client reaches a tonic server behind the
//! agent through the relay's h2c ingress and its HTTPS ingress (ALPN `h2`). Unary calls, a large
//! message, an error status, a server stream that ends in an error *after* its messages (the
//! status travels in trailers after the body), and a bidirectional chat answered message by
//! message all pass through. The upstream is reached over HTTP/2 both when its target says so
//! (`h2c://`) and when only the request's gRPC content type does.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use quictun_agent::Transport;
use quictun_core::tls::Trust;
use quictun_tests::grpc_echo::{EchoClient, EchoServer, Msg};
use quictun_tests::{Harness, HarnessConfig};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);

fn msg(text: &str, count: u32) -> Msg {
    Msg { text: text.into(), count, blob: vec![] }
}

/// A harness whose `app` upstream is the echo server at `scheme://addr`, with an HTTPS ingress.
async fn harness(transport: Transport, server: &EchoServer, scheme: &str) -> Harness {
    let config = HarnessConfig {
        transport,
        app_target: Some(format!("{scheme}://{}", server.addr())),
        ..HarnessConfig::with_relay(|config| config.relay.https_listen = Some("127.0.0.1:0".parse().unwrap()))
    };
    Harness::start_with(config).await
}

/// Every kind of call, with its status, through `client`.
async fn every_kind_of_call_passes(client: &mut EchoClient) {
    let reply = tokio::time::timeout(WAIT, client.unary(msg("hello", 0))).await.unwrap().unwrap();
    assert_eq!(reply.text, "HELLO");

    let big = Msg { text: "big".into(), count: 0, blob: quictun_tests::pattern(3 << 20) };
    let reply = tokio::time::timeout(WAIT, client.unary(big.clone())).await.unwrap().unwrap();
    assert_eq!((reply.text.as_str(), reply.blob == big.blob), ("BIG", true));

    let status = tokio::time::timeout(WAIT, client.unary(msg("fail", 0))).await.unwrap().unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::NotFound, "no such thing"));

    let (messages, end) = tokio::time::timeout(WAIT, client.countdown(msg("ok", 5))).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.count).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    end.expect("a clean end needs grpc-status 0 from the trailers");

    let (messages, end) = tokio::time::timeout(WAIT, client.countdown(msg("fail", 3))).await.unwrap();
    assert_eq!(messages.len(), 3, "the messages before the error arrive");
    let status = end.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Aborted, "gave up after the messages"));

    // A chat: each answer arrives before the next message is sent, so nothing is held back.
    let (tx, mut answers) = client.chat().await;
    for word in ["one", "two", "three"] {
        tx.send(msg(word, 0)).await.unwrap();
        let answer = tokio::time::timeout(WAIT, answers.message()).await.expect("answer held back").unwrap();
        assert_eq!(answer.unwrap().text, word.to_uppercase());
    }
    drop(tx);
    assert!(tokio::time::timeout(WAIT, answers.message()).await.unwrap().unwrap().is_none());
}

async fn grpc_passes_through_the_h2c_ingress(transport: Transport) {
    let server = EchoServer::start().await;
    let h = harness(transport, &server, "http").await;
    let _agent = h.agent("agent-1").await;
    let mut client = EchoClient::connect(h.relay().http_addr(), "app.test", None).await;
    every_kind_of_call_passes(&mut client).await;
}

async fn grpc_passes_through_the_https_ingress_to_an_h2c_target(transport: Transport) {
    let server = EchoServer::start().await;
    let h = harness(transport, &server, "h2c").await;
    let _agent = h.agent("agent-1").await;
    let (tls, _) = quictun_core::tls::client_config_with_alpn(&Trust::Pin(h.cert.pin), b"h2").unwrap();
    let https = h.relay().https_addr().expect("HTTPS ingress");
    let mut client = EchoClient::connect(https, "app.test", Some(Arc::new(tls))).await;
    every_kind_of_call_passes(&mut client).await;
}

quictun_tests::on_both_transports!(
    grpc_passes_through_the_h2c_ingress,
    grpc_passes_through_the_https_ingress_to_an_h2c_target
);
