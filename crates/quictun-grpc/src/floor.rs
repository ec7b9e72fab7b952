//! The floor under the gRPC transport: tonic over HTTP/2 over TLS alone, with the transport's TLS
//! provider, ALPN, HTTP/2 windows and message type, doing the minimal exchange the way the
//! transport carries exchanges (one bidirectional RPC per connection, exchanges multiplexed on it
//! as messages): a request message of N bytes, answered by a message of the same size. No HTTP
//! routing, no heads, no per-exchange flow control. `quictun bench --workloads floor` runs it
//! beside quinn's floor (`quictun_quic::floor`) so that the two designs' bare costs can be
//! compared before the tunnel adds its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxFuture;
use tonic::server::{Grpc, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::messages::{CONNECT_PATH, Codec, MAX_CHUNK, Payload, TunnelMessage};
use crate::window;

/// Longest wait for a TLS handshake or a connection, on either end.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a floor run failed.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// TCP, TLS, HTTP/2 or the RPC could not be set up.
    #[error("connecting to the gRPC floor server at {addr}: {why}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// What failed, with its causes.
        why: String,
    },
    /// The stream failed or ended mid-run (the run counts on every exchange succeeding).
    #[error("exchange failed: {0}")]
    Exchange(String),
}

/// What a floor run measured.
#[derive(Debug, Clone, Copy)]
pub struct FloorRun {
    /// Exchanges completed.
    pub exchanges: u64,
    /// How long the run took.
    pub elapsed: Duration,
}

/// Answers every message of the RPC with one message of `answer` bytes and the same id.
#[derive(Clone)]
struct Echo {
    answer: Bytes,
}

impl StreamingService<TunnelMessage> for Echo {
    type Response = TunnelMessage;
    type ResponseStream = futures_util::stream::BoxStream<'static, Result<TunnelMessage, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<TunnelMessage>>) -> Self::Future {
        let answer = self.answer.clone();
        Box::pin(async move {
            let answers = request
                .into_inner()
                .map(move |message| message.map(|m| TunnelMessage::new(m.request_id, Payload::Body(answer.clone()))));
            Ok(Response::new(answers.boxed()))
        })
    }
}

/// Serves the minimal exchange on `listener` until the task is dropped: TLS with `tls` (ALPN
/// `h2`), HTTP/2 with the transport's windows, and on each connection's RPC every message
/// answered with `answer` bytes. Each connection runs in a task owned by this function.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, answer: usize) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let echo = Echo { answer: Bytes::from(vec![b'x'; answer]) };
    let mut connections = JoinSet::new();
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, echo) = (acceptor.clone(), echo.clone());
        connections.spawn(async move {
            if tcp.set_nodelay(true).is_err() {
                return;
            }
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else { return };
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let echo = echo.clone();
                async move {
                    let mut grpc = Grpc::new(Codec::default()).max_decoding_message_size(MAX_CHUNK * 2);
                    Ok::<_, Infallible>(grpc.streaming(echo, req).await)
                }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .initial_stream_window_size(window::STREAM)
                .initial_connection_window_size(window::CONNECTION)
                .max_frame_size(window::FRAME);
            // A client that went away ends its connection; nothing to report.
            let _ended = builder.serve_connection(TokioIo::new(tls), service).await;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// A connection to the floor server with its RPC open: the sender of request messages and the
/// stream of answers.
pub struct FloorClient {
    requests: mpsc::Sender<TunnelMessage>,
    answers: Streaming<TunnelMessage>,
}

/// Connects to the floor server at `addr` (verified by `tls`, ALPN `h2`) with the transport's
/// HTTP/2 windows, and opens the RPC.
pub async fn connect(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<FloorClient, FloorError> {
    let failed =
        |why: &(dyn std::error::Error + 'static)| FloorError::Connect { addr, why: quictun_core::error_chain(why) };
    let mut grpc =
        crate::client::connect_grpc(addr, server_name, tls, HANDSHAKE_TIMEOUT).await.map_err(|e| failed(&e))?;
    // Room for every request a run keeps in flight (the sender never waits in a run).
    let (requests, outbound) = mpsc::channel(4096);
    let path = PathAndQuery::from_static(CONNECT_PATH);
    let rpc = grpc.streaming(Request::new(ReceiverStream::new(outbound)), path, Codec::default());
    let answers = match tokio::time::timeout(HANDSHAKE_TIMEOUT, rpc).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(failed(&status)),
        Err(_) => return Err(FloorError::Connect { addr, why: "no answer to the RPC in time".into() }),
    };
    Ok(FloorClient { requests, answers })
}

impl FloorClient {
    /// Keeps `concurrency` exchanges of `size`-byte requests in flight on the RPC for `duration`
    /// (a new request as each answer arrives), then waits for the last answers and ends the RPC.
    pub async fn run(mut self, size: usize, concurrency: usize, duration: Duration) -> Result<FloorRun, FloorError> {
        let request = Bytes::from(vec![b'q'; size]);
        let concurrency = concurrency.clamp(1, 4096);
        let lost = |why: String| FloorError::Exchange(why);
        let started = Instant::now();
        let deadline = started + duration;
        let (mut sent, mut answered) = (0u64, 0u64);
        for _ in 0..concurrency {
            sent += 1;
            let message = TunnelMessage::new(sent, Payload::Body(request.clone()));
            self.requests.send(message).await.map_err(|_| lost("the RPC ended".into()))?;
        }
        while answered < sent {
            let next = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.answers.next()).await;
            match next {
                Ok(Some(Ok(_))) => answered += 1,
                Ok(Some(Err(status))) => return Err(lost(status.to_string())),
                Ok(None) => return Err(lost("the server ended the RPC".into())),
                Err(_) => return Err(lost(format!("no answer within {HANDSHAKE_TIMEOUT:?}"))),
            }
            if Instant::now() < deadline {
                sent += 1;
                let message = TunnelMessage::new(sent, Payload::Body(request.clone()));
                self.requests.send(message).await.map_err(|_| lost("the RPC ended".into()))?;
            }
        }
        Ok(FloorRun { exchanges: answered, elapsed: started.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_core::Trust;
    use quictun_core::tls::GeneratedCert;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_floor_exchanges_over_real_tls_and_http2() {
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let tls = quictun_core::tls::server_config_with_alpn(cert.cert_key().unwrap(), b"h2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(serve(listener, Arc::new(tls), 1024));
        let (client_tls, _) = quictun_core::tls::client_config_with_alpn(&Trust::Pin(cert.pin), b"h2").unwrap();
        let server_name = ServerName::try_from("localhost").unwrap();
        let client = connect(addr, server_name, Arc::new(client_tls)).await.unwrap();
        let run = client.run(1024, 8, Duration::from_millis(300)).await.unwrap();
        assert!(run.exchanges >= 8, "{run:?}");
        serving.abort();
    }

    #[tokio::test]
    async fn a_server_with_another_certificate_is_refused() {
        let cert = GeneratedCert::self_signed(&[]).unwrap();
        let other = GeneratedCert::self_signed(&[]).unwrap();
        let tls = quictun_core::tls::server_config_with_alpn(cert.cert_key().unwrap(), b"h2").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(serve(listener, Arc::new(tls), 1024));
        let (client_tls, _) = quictun_core::tls::client_config_with_alpn(&Trust::Pin(other.pin), b"h2").unwrap();
        let server_name = ServerName::try_from("localhost").unwrap();
        let refused = connect(addr, server_name, Arc::new(client_tls)).await;
        assert!(matches!(refused, Err(FloorError::Connect { .. })), "a wrong pin must not connect");
        serving.abort();
    }
}
