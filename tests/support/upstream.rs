//! A scriptable upstream HTTP server.
//!
//! - `GET /hello` — `hello`.
//! - `GET /headers` — the request headers it saw, one `name: value` per line.
//! - `POST /echo` — the body streamed back.
//! - `POST /sha256` — the hex SHA-256 of the body (read as a stream).
//! - `GET /bytes/N` — N bytes of [`crate::pattern`].
//! - `GET /hang` — counts itself in [`Upstream::hanging`], answers only after [`Upstream::release`].
//! - `POST /stall` — like `/hang`, and never reads the request body.
//! - `GET /chunks` — sends `first`, waits for [`Upstream::release`], then sends `second`.
//! - `GET /public…` — the request target it received (path and query), as the body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

type Body = Either<Full<Bytes>, Either<Incoming, StreamBody<ChunkStream>>>;
type ChunkStream = tokio_stream_shim::ReceiverStream;

/// A minimal receiver stream (avoids a tokio-stream dependency).
mod tokio_stream_shim {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct ReceiverStream(pub mpsc::Receiver<Result<Frame<Bytes>, Infallible>>);

    impl futures_util::Stream for ReceiverStream {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx)
        }
    }
}

#[derive(Debug)]
struct State {
    hanging: watch::Sender<usize>,
    released: watch::Sender<bool>,
    requests: std::sync::atomic::AtomicUsize,
}

/// A running upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(body.into())));
    *r.status_mut() = status;
    r
}

fn streamed(rx: mpsc::Receiver<Result<Frame<Bytes>, Infallible>>) -> Response<Body> {
    Response::new(Either::Right(Either::Right(StreamBody::new(tokio_stream_shim::ReceiverStream(rx)))))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = req.uri().path().to_owned();
    match (req.method().as_str(), path.as_str()) {
        ("GET", "/hello") => full(StatusCode::OK, "hello"),
        ("GET", "/headers") => {
            let mut text = String::new();
            for (name, value) in req.headers() {
                text.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("<bin>")));
            }
            full(StatusCode::OK, text)
        }
        ("POST", "/echo") => Response::new(Either::Right(Either::Left(req.into_body()))),
        ("POST", "/sha256") => {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            ctx.update(data);
                        }
                    }
                    Err(e) => return full(StatusCode::BAD_REQUEST, format!("body error: {e}")),
                }
            }
            let hex: String = ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
            full(StatusCode::OK, hex)
        }
        ("GET", p) if p.starts_with("/bytes/") => {
            // Streamed in pieces of a period that is a multiple of 251 bytes: no whole-body buffer.
            let n: usize = p["/bytes/".len()..].parse().unwrap_or(0);
            let period = Bytes::from(crate::pattern(251 * 261));
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let mut left = n;
                while left > 0 {
                    let piece = period.slice(..left.min(period.len()));
                    left -= piece.len();
                    if tx.send(Ok(Frame::data(piece))).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = streamed(rx);
            r.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
            r
        }
        // `/stall` never reads the upload: once the buffers between are full, its sender waits.
        ("GET", "/hang") | ("POST", "/stall") => {
            state.hanging.send_modify(|n| *n += 1);
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|r| *r).await;
            state.hanging.send_modify(|n| *n -= 1);
            full(StatusCode::OK, "released")
        }
        ("GET", "/events") => {
            // Server-sent events: one event now, the next only once released.
            let (tx, rx) = mpsc::channel(4);
            let mut released = state.released.subscribe();
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"event: tick\ndata: one\n\n")))).await;
                let _ = released.wait_for(|r| *r).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"event: tick\ndata: two\n\n")))).await;
            });
            let mut r = streamed(rx);
            r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
            r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
            r
        }
        ("GET", "/chunks") => {
            let (tx, rx) = mpsc::channel(4);
            let mut released = state.released.subscribe();
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                let _ = released.wait_for(|r| *r).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"second")))).await;
            });
            streamed(rx)
        }
        ("GET", p) if p.starts_with("/public") => {
            full(StatusCode::OK, req.uri().path_and_query().map_or("", |pq| pq.as_str()).to_owned())
        }
        _ => full(StatusCode::NOT_FOUND, "upstream: no such path"),
    }
}

impl Upstream {
    /// Starts an upstream on 127.0.0.1:0.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            hanging: watch::Sender::new(0),
            released: watch::Sender::new(false),
            requests: std::sync::atomic::AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        let (state2, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            // More than any request through the tunnel can carry: limits under test are the tunnel's.
            builder.http1().max_headers(512);
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                };
                let state = state2.clone();
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let stop = stop2.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, state, stop }
    }

    /// The base URL agents use.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until at least `n` `/hang` requests are waiting.
    pub async fn wait_hanging(&self, n: usize) {
        let mut rx = self.state.hanging.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(20), rx.wait_for(|h| *h >= n))
            .await
            .expect("upstream never saw the hanging request")
            .unwrap();
    }

    /// Lets every `/hang` and `/chunks` request finish.
    pub fn release(&self) {
        self.state.released.send_replace(true);
    }

    /// Makes `/hang` hang again after a [`Self::release`].
    pub fn rearm(&self) {
        self.state.released.send_replace(false);
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many `/hang` requests are waiting now.
    pub fn hanging(&self) -> usize {
        *self.state.hanging.borrow()
    }
}
