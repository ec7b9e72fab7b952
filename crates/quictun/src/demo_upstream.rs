//! The demo's built-in upstream: a tiny HTTP server.
//!
//! - `GET /` — a greeting naming the method, path and forwarded headers.
//! - `GET /bytes/N` — N bytes (streamed in 64 KiB chunks, with Content-Length).
//! - `GET /delay/MS` — answers after MS milliseconds.
//! - `POST /echo` — the request body, streamed back.
//! - `POST /sink` — reads the body and answers with its length.
//! - gRPC `/quictun.bench.Echo/Unary` (HTTP/2) — the message back (the bench's `grpc` workload).
//!
//! With `--udp-echo ADDR`, also a UDP echo: each datagram back to its sender.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type DemoBody = Either<Full<Bytes>, Either<RepeatBody, Either<Incoming, tonic::body::Body>>>;

const CHUNK: usize = 64 * 1024;

/// `left` bytes of one repeated chunk, produced as they are polled (nothing is pre-built).
pub struct RepeatBody {
    chunk: Bytes,
    left: u64,
}

impl hyper::body::Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let take = self.left.min(self.chunk.len() as u64) as usize;
        self.left -= take as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

fn text(status: StatusCode, body: String) -> Response<DemoBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response
}

fn bytes_body(n: u64) -> Response<DemoBody> {
    let body = RepeatBody { chunk: Bytes::from(vec![b'q'; CHUNK]), left: n };
    let mut response = Response::new(Either::Right(Either::Left(body)));
    response.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
    response
}

async fn handle(req: Request<Incoming>) -> Response<DemoBody> {
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("POST", "/echo") => Response::new(Either::Right(Either::Right(Either::Left(req.into_body())))),
        ("POST", quictun_bench::grpc_echo::UNARY_PATH) => {
            quictun_bench::grpc_echo::serve(req).await.map(|body| Either::Right(Either::Right(Either::Right(body))))
        }
        ("POST", "/sink") => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => n += frame.data_ref().map_or(0, |d| d.len() as u64),
                    Err(err) => return text(StatusCode::BAD_REQUEST, format!("body error: {err}\n")),
                }
            }
            text(StatusCode::OK, format!("{n}\n"))
        }
        ("GET", "/headers") => {
            let mut lines = String::new();
            for (name, value) in req.headers() {
                lines.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
            }
            text(StatusCode::OK, lines)
        }
        ("GET", p) if p.starts_with("/delay/") => match p["/delay/".len()..].parse::<u64>() {
            Ok(ms) if ms <= 600_000 => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("waited {ms} ms\n"))
            }
            _ => text(StatusCode::BAD_REQUEST, "usage: /delay/MS (at most 600000)\n".into()),
        },
        ("GET", p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
            Ok(n) if n <= 1 << 40 => bytes_body(n),
            _ => text(StatusCode::BAD_REQUEST, "usage: /bytes/N\n".into()),
        },
        (method, _) => {
            let forwarded = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("-");
            text(
                StatusCode::OK,
                format!("Hello from the quictun demo upstream: {method} {path} (x-forwarded-for: {forwarded})\n"),
            )
        }
    }
}

/// Serves the demo upstream on `listener` until `stop` is cancelled; over TLS when `tls` is given.
pub async fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, stop: CancellationToken) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = quictun_core::accept_tcp(&listener, "demo upstream") => accepted,
        };
        let (acceptor, stop) = (acceptor.clone(), stop.clone());
        tokio::spawn(async move {
            let served = async {
                match acceptor {
                    None => serve_connection(stream).await,
                    Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream).await,
                        Ok(Err(err)) => tracing::debug!(%err, "demo upstream TLS handshake failed"),
                        Err(_) => tracing::debug!("demo upstream TLS handshake timed out"),
                    },
                }
            };
            tokio::select! {
                () = served => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves HTTP/1.1 or HTTP/2 on one connection until it ends.
async fn serve_connection<IO>(io: IO)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let service = service_fn(|req| async { Ok::<_, Infallible>(handle(req).await) });
    if let Err(err) = builder.serve_connection(TokioIo::new(io), service).await {
        tracing::debug!(%err, "demo upstream connection error");
    }
}

/// Binds the demo upstream (with the relay's deep backlog: benchmarks open thousands of
/// connections to it at once).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    quictun_core::listen_tcp(addr)
}

/// Sends every datagram back to its sender until `stop` is cancelled.
pub async fn udp_echo(socket: tokio::net::UdpSocket, stop: CancellationToken) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        match received {
            Ok((len, from)) => {
                if let Err(err) = socket.send_to(&buf[..len], from).await {
                    tracing::debug!(%err, %from, "UDP echo could not answer");
                }
            }
            Err(err) => tracing::debug!(%err, "UDP echo receive failed"),
        }
    }
}

/// `quictun upstream`: serves until Ctrl-C or SIGTERM (HTTPS with `--tls-cert` and `--tls-key`).
pub async fn run(args: crate::cli::UpstreamArgs) -> Result<(), crate::Failure> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert = quictun_core::tls::CertKey::load(cert, key).map_err(crate::Failure::usage)?;
            Some(Arc::new(quictun_core::tls::ingress_server_config(cert).map_err(crate::Failure::usage)?))
        }
        (None, None) => None,
        _ => return Err(crate::Failure::usage(anyhow::anyhow!("--tls-cert and --tls-key go together"))),
    };
    let listener =
        bind(args.listen).await.map_err(|e| crate::Failure::runtime(anyhow::anyhow!("{}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(crate::Failure::runtime)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("quictun upstream listening on {scheme}://{addr}");
    let stop = CancellationToken::new();
    if let Some(addr) = args.udp_echo {
        let socket =
            quictun_core::bind_udp(addr).map_err(|e| crate::Failure::runtime(anyhow::anyhow!("{addr}: {e}")))?;
        println!("quictun upstream echoing UDP on udp://{}", socket.local_addr().map_err(crate::Failure::runtime)?);
        tokio::spawn(udp_echo(socket, stop.clone()));
    }
    let server = tokio::spawn(serve(listener, tls, stop.clone()));
    crate::signal::shutdown().await;
    stop.cancel();
    if let Err(err) = server.await {
        tracing::warn!(%err, "upstream server task failed");
    }
    Ok(())
}
