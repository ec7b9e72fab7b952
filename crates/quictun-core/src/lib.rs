//! quictun core: what the relay and the agent share.
//!
//! - [`tls`]: certificates (generate, load, pin) and rustls configurations (TLS 1.3, ALPN
//!   `quictun/1`, pinning verifier).
//! - [`endpoint`]: UDP sockets with large buffers and the QUIC transport tuning.
//! - [`framed`]: head frames on data streams and the control channel codec.
//! - [`http_stream`]: the HTTP-over-stream codec: header conversion, streaming bodies.
//! - [`body_frames`]: framed bodies, so trailers (gRPC's status) can follow a body.
//! - [`link`]: what a transport provides (control channel, agent link, tunnel bodies).
//! - [`quic_link`]: the QUIC transport's agent link (one stream per exchange).
//! - [`stall`]: credit held by stalled readers, budgeted and reclaimed.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`heartbeat`]: heartbeat timing, silence detection and RTT.
//! - [`config`]: TOML loading with errors that name the file and the key.
//! - [`edge`]: the HTTP edge: canonical paths, the request host, forwarding headers.
//! - [`upgrade`]: upgraded connections (WebSocket): raw bytes both ways after a 101.
//! - [`upstream_http`]: one tunnelled request sent to an HTTP upstream (HTTP/1.1 or HTTP/2).
//! - [`admin`]: the admin HTTP endpoint (health, readiness, metrics, bearer token).

pub mod admin;
pub mod backoff;
pub mod body_frames;
pub mod config;
pub mod edge;
pub mod endpoint;
pub mod framed;
pub mod heartbeat;
pub mod http_stream;
pub mod link;
pub mod quic_link;
pub mod stall;
pub mod tls;
pub mod upgrade;
pub mod upstream_http;

pub use endpoint::{Congestion, Tuning};
pub use tls::{Pin, Trust};

/// How long a listener waits after a failed accept before trying again.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// The next connection on `listener`, with `TCP_NODELAY` set. A failed accept (out of file
/// descriptors and the like) is logged, naming the listener `what`, and retried after a short
/// pause instead of spinning. Cancel-safe, so it can race a shutdown signal in `select!`.
///
/// Every listener here answers with small writes (heads, frames, trailers) that Nagle's
/// algorithm would hold back until the peer's delayed ACK: 40 ms per exchange.
pub async fn accept_tcp(
    listener: &tokio::net::TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%err, listener = what, "could not set TCP_NODELAY");
                }
                return (stream, peer);
            }
            Err(err) => {
                tracing::warn!(%err, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Closes `conn` with a quictun close code.
pub fn close(conn: &quinn::Connection, code: quictun_proto::CloseCode) {
    conn.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// The quictun close code a connection was closed with by its peer, if any.
pub fn peer_close_code(err: &quinn::ConnectionError) -> Option<quictun_proto::CloseCode> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            quictun_proto::CloseCode::from_u64(close.error_code.into_inner())
        }
        _ => None,
    }
}

/// Closes every connection of `endpoint` with a quictun close code.
pub fn close_endpoint(endpoint: &quinn::Endpoint, code: quictun_proto::CloseCode) {
    endpoint.close(quinn::VarInt::from_u32(code.to_u32()), code.reason());
}

/// An error and all its causes on one line (`outer: cause: root cause`), for logs and messages.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs `work` on `tasks` until it finishes or `cancel` fires, whichever comes first.
pub fn spawn_cancellable<F>(
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    work: F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = cancel.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), super::accept_tcp(&listener, "test"));
        let (stream, peer) = accepted;
        assert_eq!(peer, client.unwrap().local_addr().unwrap());
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY is not set on the accepted stream");
    }
}
