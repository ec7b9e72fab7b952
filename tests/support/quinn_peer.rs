//! Peers written with quinn itself (hostile clients, scripted agents), for what the real agent
//! would never send: a client endpoint that verifies the relay as the agent does, the close code
//! a peer closed with, and head frames written and read by hand.

use std::net::SocketAddr;
use std::sync::Arc;

use quictun_core::Trust;
use quictun_proto::{CloseCode, frame};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A quinn client endpoint on `bind` that verifies the relay by `trust` with the agent's TLS
/// configuration (ALPN `quictun/1`); `connect` uses it.
pub fn client_endpoint(bind: SocketAddr, trust: &Trust) -> quinn::Endpoint {
    let (tls, _) = quictun_core::tls::client_config(trust).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client(bind).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// The quictun close code a peer closed with, when it did.
pub fn peer_close_code(err: &quinn::ConnectionError) -> Option<CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => CloseCode::from_u64(close.error_code.into_inner()),
        _ => None,
    }
}

/// Writes `msg` as one frame (length prefix and bincode) on `send`.
pub async fn write_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T, max: usize) {
    send.write_all(&frame::encode(msg, max).unwrap()).await.unwrap();
}

/// Reads one frame from `recv` (what the stream has until it ends, at most `max` bytes), and
/// returns the message and the bytes after it.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream, max: usize) -> Option<(T, bytes::Bytes)> {
    let mut buf = Vec::new();
    loop {
        if let Ok(Some((msg, used))) = frame::decode::<T>(&buf, max) {
            return Some((msg, bytes::Bytes::copy_from_slice(&buf[used..])));
        }
        let chunk = recv.read_chunk(max, true).await.ok()??;
        buf.extend_from_slice(&chunk.bytes);
    }
}

/// A quinn server endpoint on `addr` with the relay's TLS configuration for `cert` (ALPN
/// `quictun/1`): a relay scripted by a test.
pub fn server_endpoint(addr: SocketAddr, cert: quictun_core::tls::CertKey) -> quinn::Endpoint {
    let tls = quictun_core::tls::server_config(cert).unwrap();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), addr).unwrap()
}

/// A control stream written by hand: control messages in the wire's frames, on a quinn stream.
pub struct Control {
    read: tokio_util::codec::FramedRead<quinn::RecvStream, quictun_core::control::ControlCodec>,
    write: tokio_util::codec::FramedWrite<quinn::SendStream, quictun_core::control::ControlCodec>,
}

impl Control {
    /// The control stream on `send` and `recv`.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let codec = quictun_core::control::ControlCodec::new(1 << 20);
        Self {
            read: tokio_util::codec::FramedRead::new(recv, codec),
            write: tokio_util::codec::FramedWrite::new(send, codec),
        }
    }

    /// The next message, or `None` once the stream ended or failed.
    pub async fn recv(&mut self) -> Option<quictun_proto::ControlMessage> {
        use futures_util::StreamExt;
        self.read.next().await?.ok()
    }

    /// Sends `msg`.
    pub async fn send(&mut self, msg: quictun_proto::ControlMessage) {
        use futures_util::SinkExt;
        self.write.send(msg).await.unwrap();
    }
}

/// A scripted agent: registers with real credentials and answers heartbeats.
pub async fn scripted_agent(
    h: &crate::Harness,
    client_id: &str,
    token: &str,
) -> (quinn::Endpoint, quinn::Connection, uuid::Uuid) {
    let endpoint = client_endpoint("127.0.0.1:0".parse().unwrap(), &Trust::Pin(h.cert.pin));
    let relay = h.relay().quic_addr().expect("QUIC listener");
    let conn = endpoint.connect(relay, "localhost").unwrap().await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut control = Control::new(send, recv);
    control
        .send(quictun_proto::ControlMessage::Register(quictun_proto::Register {
            protocol_version: quictun_proto::PROTOCOL_VERSION,
            client_id: client_id.into(),
            group: String::new(),
            token: quictun_proto::Token::new(token),
            agent_version: "scripted".into(),
            instance_id: uuid::Uuid::new_v4(),
        }))
        .await;
    let quictun_proto::ControlMessage::Accepted(accepted) = control.recv().await.unwrap() else {
        panic!("not accepted")
    };
    tokio::spawn(async move {
        while let Some(msg) = control.recv().await {
            if let quictun_proto::ControlMessage::Heartbeat(hb) = msg {
                control.send(quictun_proto::ControlMessage::HeartbeatAck(hb)).await;
            }
        }
    });
    (endpoint, conn, accepted.session_id)
}
