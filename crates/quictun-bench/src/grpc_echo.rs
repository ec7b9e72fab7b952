//! The `grpc` workload's service and load: one unary method, `/quictun.bench.Echo/Unary`, that
//! answers its request message as it is. The demo upstream serves it (HTTP/2 without TLS, next to
//! its HTTP routes); the load generator calls it with tonic, several calls in flight on each
//! HTTP/2 connection as gRPC clients do. Every answer's status comes in trailers, so through a
//! tunnel this measures the framed-body path.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use indicatif::ProgressBar;
use tonic::{Request, Response, Status};

use crate::load::{LoadResult, new_histogram};

/// The method's path.
pub const UNARY_PATH: &str = "/quictun.bench.Echo/Unary";

/// Calls in flight on one HTTP/2 connection.
const CALLS_PER_CONNECTION: usize = 16;

/// The request and the answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoMessage {
    /// Echoed as is.
    #[prost(bytes = "bytes", tag = "1")]
    pub payload: Bytes,
}

type Codec = tonic_prost::ProstCodec<EchoMessage, EchoMessage>;
type Answer = Pin<Box<dyn std::future::Future<Output = Result<Response<EchoMessage>, Status>> + Send>>;

struct Echo;

impl tonic::server::UnaryService<EchoMessage> for Echo {
    type Response = EchoMessage;
    type Future = Answer;

    fn call(&mut self, request: Request<EchoMessage>) -> Self::Future {
        let message = request.into_inner();
        Box::pin(async move { Ok(Response::new(message)) })
    }
}

/// Answers one gRPC request (the caller routes [`UNARY_PATH`] here).
pub async fn serve<B>(req: http::Request<B>) -> http::Response<tonic::body::Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send,
{
    tonic::server::Grpc::new(Codec::default()).unary(Echo, req).await
}

/// An HTTP/2 connection to `target` for tonic, over plain TCP.
async fn channel(target: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    let connector = tower::service_fn(move |_uri: http::Uri| async move {
        let tcp = tokio::net::TcpStream::connect(target).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(TokioIo::new(tcp))
    });
    Ok(tonic::transport::Endpoint::from_static("http://bench")
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect_with_connector(connector)
        .await?)
}

/// Runs `concurrency` callers, each sending `payload`-byte unary calls back to back for
/// `duration`; 16 callers share one HTTP/2 connection. Latency is per call, in microseconds.
pub async fn run(
    target: SocketAddr,
    concurrency: usize,
    payload: usize,
    duration: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<LoadResult> {
    let started = Instant::now();
    let deadline = started + duration;
    let message = EchoMessage { payload: Bytes::from(vec![b'q'; payload]) };
    let connections = concurrency.div_ceil(CALLS_PER_CONNECTION).max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(channel(target).await?);
    }
    let message = Arc::new(message);
    let mut callers = Vec::with_capacity(concurrency);
    for caller in 0..concurrency {
        let mut grpc = tonic::client::Grpc::new(channels[caller % connections].clone());
        let (message, progress) = (message.clone(), progress.clone());
        callers.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let (mut ok, mut in_window, mut errors) = (0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let path = PathAndQuery::from_static(UNARY_PATH);
                let answered = match grpc.ready().await {
                    Ok(()) => grpc.unary(Request::new((*message).clone()), path, Codec::default()).await,
                    Err(err) => Err(Status::unavailable(err.to_string())),
                };
                match answered {
                    Ok(answer) if answer.get_ref().payload.len() == message.payload.len() => {
                        ok += 1;
                        in_window += u64::from(Instant::now() <= deadline);
                        let _clamped = latency.record((sent.elapsed().as_micros().max(1) as u64).min(600_000_000));
                    }
                    _ => errors += 1,
                }
                progress.inc(1);
            }
            (ok, in_window, errors, latency)
        }));
    }
    let mut result = LoadResult {
        ok: 0,
        in_window: 0,
        window: duration,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: vec![new_histogram()],
    };
    for caller in callers {
        let (ok, in_window, errors, latency): (u64, u64, u64, Histogram<u64>) = caller.await?;
        result.ok += ok;
        result.in_window += in_window;
        result.errors += errors;
        let _same_bounds = result.latency[0].add(&latency);
    }
    result.elapsed = started.elapsed();
    Ok(result)
}
