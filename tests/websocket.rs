//! WebSocket through the tunnel, on both transports: a real tokio-tungstenite client on the
//! ingress, a real tokio-tungstenite server behind the agent. The 101 passes through, then text
//! and binary messages echo both ways on the same stream, a close from either side ends it, and
//! an idle one outlives every timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use quictun_agent::Transport;
use quictun_tests::{Harness, HarnessConfig, pattern};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const WAIT: Duration = Duration::from_secs(20);

/// A WebSocket echo server; the text `bye` makes it close the connection itself.
async fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(message)) = ws.next().await {
                    let echo = match message {
                        Message::Text(text) if text.as_str() == "bye" => {
                            let frame = CloseFrame { code: CloseCode::Away, reason: "server says bye".into() };
                            let _ = ws.close(Some(frame)).await;
                            continue;
                        }
                        Message::Text(_) | Message::Binary(_) => message,
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn connect(h: &Harness) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(h.relay().http_addr()).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async("ws://app.test/chat", stream).await.expect("handshake");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("sec-websocket-accept"));
    ws
}

async fn next(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Option<Message> {
    tokio::time::timeout(WAIT, ws.next()).await.expect("no message in time").map(Result::unwrap)
}

async fn websocket_messages_echo_and_either_side_closes(transport: Transport) {
    let target = echo_server().await;
    let h = Harness::start_with(HarnessConfig { transport, app_target: Some(target), ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let _api = h.agent("agent-2").await;

    let mut ws = connect(&h).await;
    ws.send(Message::text("hello through the tunnel")).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("hello through the tunnel")));
    let binary = pattern(1 << 20);
    ws.send(Message::binary(binary.clone())).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::binary(binary)));
    // Plain HTTP still works next to the open WebSocket.
    assert_eq!(h.client.get("api.test", "/hello").await.text(), "hello");

    // The client closes: the server answers the close and the stream ends.
    ws.close(None).await.unwrap();
    assert!(matches!(next(&mut ws).await, Some(Message::Close(_))));
    assert!(next(&mut ws).await.is_none());
    drop(ws);

    // The server closes.
    let mut ws = connect(&h).await;
    ws.send(Message::text("bye")).await.unwrap();
    match next(&mut ws).await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.reason.as_str(), "server says bye"),
        other => panic!("expected the server's close, got {other:?}"),
    }
    assert!(next(&mut ws).await.is_none());
    drop(ws);

    // Nothing is left in flight on the agent once the clients closed their sockets too.
    let agent = h.relay().sessions().get("agent-1").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while agent.in_flight() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "upgraded streams still open: {}", agent.in_flight());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The relay's and the agent's timeouts, every one set to a second.
const SHORT: Duration = Duration::from_secs(1);

/// An upgraded connection has no idle timeout: with every timeout of the relay and the agent set
/// to a second (stream idle, keep-alive, request head, response head, upstream connect and
/// response), a WebSocket left idle for three times that is still open both ways.
async fn an_idle_websocket_outlives_every_timeout(transport: Transport) {
    let target = echo_server().await;
    let secs = SHORT.as_secs();
    let config = HarnessConfig::with_relay(move |config| {
        let relay = &mut config.relay;
        relay.stream_idle_timeout_secs = secs;
        relay.keep_alive_timeout_secs = secs;
        relay.header_read_timeout_secs = secs;
        relay.response_timeout_secs = secs;
    });
    let h = Harness::start_with(HarnessConfig {
        transport,
        app_target: Some(target),
        response_timeout_secs: secs,
        ..config
    })
    .await;
    let mut options = h.agent_options("agent-1");
    (options.connect_timeout, options.response_timeout) = (SHORT, SHORT);
    let _agent = h.agent_with(options).await;

    let mut ws = connect(&h).await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("before")));
    // Nothing either way (tungstenite sends no pings of its own) for three times every timeout.
    tokio::time::sleep(SHORT * 3).await;
    ws.send(Message::text("after the silence")).await.unwrap();
    assert_eq!(next(&mut ws).await, Some(Message::text("after the silence")));
    ws.close(None).await.unwrap();
    assert!(matches!(next(&mut ws).await, Some(Message::Close(_))));
}

quictun_tests::on_both_transports!(
    websocket_messages_echo_and_either_side_closes,
    an_idle_websocket_outlives_every_timeout
);
