//! The load generator: a fixed number of workers, each with its own keep-alive HTTP/1.1
//! connection (opened before the clock starts), for a fixed time; optionally paced to a fixed
//! total rate (latency is then measured from the scheduled send time, so a stalled server cannot
//! hide its delay). Latencies go into HdrHistograms, one per request class.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use indicatif::ProgressBar;

/// One kind of request in a mix, with its share (in percent).
#[derive(Debug, Clone)]
pub struct RequestClass {
    /// Name in reports.
    pub name: &'static str,
    /// The path requested.
    pub path: String,
    /// Percent of requests of this class.
    pub percent: u32,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The HTTP server.
    pub target: SocketAddr,
    /// The request mix.
    pub classes: Vec<RequestClass>,
    /// Workers (connections, requests in flight).
    pub concurrency: usize,
    /// How long.
    pub duration: Duration,
    /// Total requests per second (paced), or as fast as possible.
    pub rate: Option<u64>,
}

/// What a run produced.
#[derive(Debug)]
pub struct LoadResult {
    /// Completed requests with a 2xx answer.
    pub ok: u64,
    /// Failed requests (transport error, or a status other than 2xx).
    pub errors: u64,
    /// Completed requests with a 2xx answer that arrived within the window.
    pub in_window: u64,
    /// The window: from the start to the deadline.
    pub window: Duration,
    /// Wall time, until the last request sent before the deadline was answered.
    pub elapsed: Duration,
    /// Latency in microseconds per class, in the order of the spec.
    pub latency: Vec<Histogram<u64>>,
}

impl LoadResult {
    /// Requests per second: those answered within the window over the window, as `wrk` counts
    /// (the requests still in flight at the deadline are answered and counted in `ok`, not
    /// here); over the wall time when the window is empty.
    pub fn rate(&self) -> f64 {
        if self.window.is_zero() {
            return self.ok as f64 / self.elapsed.as_secs_f64();
        }
        self.in_window as f64 / self.window.as_secs_f64()
    }

    /// All classes merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in &self.latency {
            let _same_bounds = all.add(h);
        }
        all
    }
}

/// An empty latency histogram in microseconds (1 µs to 10 min, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; constants that cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// How late a timer may fire before a paced worker counts as behind schedule.
const TIMER_SLOP: Duration = Duration::from_millis(2);

async fn connect(target: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(target).await.with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _closed = conn.await;
    });
    Ok(sender)
}

/// `GET path` for host `bench`, with the run's extra headers (see [`crate::Settings`]).
fn get(path: &str) -> anyhow::Result<Request<Empty<Bytes>>> {
    let mut req = Request::builder().method(Method::GET).uri(path).header("host", "bench").body(Empty::new())?;
    for (name, value) in &crate::settings().headers {
        req.headers_mut().insert(name.clone(), value.clone());
    }
    Ok(req)
}

/// One request on `sender`; true on a 2xx answer read to the end.
async fn request(sender: &mut Sender, path: &str) -> anyhow::Result<bool> {
    sender.ready().await?;
    let response = sender.send_request(get(path)?).await?;
    let ok = response.status().is_success();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(ok)
}

fn pick(classes: &[RequestClass], n: u64) -> usize {
    let slot = (n % 100) as u32;
    let mut acc = 0;
    for (i, c) in classes.iter().enumerate() {
        acc += c.percent;
        if slot < acc {
            return i;
        }
    }
    classes.len() - 1
}

/// Runs the load; the progress bar advances with completed requests.
///
/// The workers' connections are opened before the clock starts, and every worker sends at least
/// one request, even when the load generator first gets to run it after the deadline: with
/// thousands of workers on a machine the server shares, both measured mostly how soon the load
/// generator got to run (in `many`, half the workers had not connected when the time was up, and
/// after that fix a fifth of them still had not sent their request, so the row counted 8,000 of
/// its 10,000 concurrent requests).
pub async fn run(spec: &LoadSpec, progress: &ProgressBar) -> anyhow::Result<LoadResult> {
    let target = spec.target;
    let connecting: Vec<_> =
        (0..spec.concurrency).map(|_| tokio::spawn(async move { connect(target).await.ok() })).collect();
    let mut senders = Vec::with_capacity(spec.concurrency);
    for connected in connecting {
        senders.push(connected.await?);
    }
    let started = Instant::now();
    let deadline = started + spec.duration;
    let spec = Arc::new(spec.clone());
    let workers: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(worker, sender)| tokio::spawn(work(spec.clone(), worker, sender, deadline, progress.clone())))
        .collect();
    let mut result = LoadResult {
        ok: 0,
        in_window: 0,
        window: spec.duration,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: spec.classes.iter().map(|_| new_histogram()).collect(),
    };
    for worker in workers {
        let tally = worker.await?;
        result.ok += tally.ok;
        result.in_window += tally.in_window;
        result.errors += tally.errors;
        for (total, h) in result.latency.iter_mut().zip(&tally.latency) {
            let _same_bounds = total.add(h);
        }
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

/// What one worker counted.
struct Tally {
    ok: u64,
    in_window: u64,
    errors: u64,
    latency: Vec<Histogram<u64>>,
}

/// One worker: requests one at a time on its connection (reconnecting after an error) until the
/// deadline, at least one; paced when the spec has a rate.
async fn work(
    spec: Arc<LoadSpec>,
    worker: usize,
    mut sender: Option<Sender>,
    deadline: Instant,
    progress: ProgressBar,
) -> Tally {
    let mut tally =
        Tally { ok: 0, in_window: 0, errors: 0, latency: spec.classes.iter().map(|_| new_histogram()).collect() };
    let period = spec.rate.map(|r| Duration::from_secs_f64(spec.concurrency as f64 / r.max(1) as f64));
    let mut next_send = Instant::now();
    let mut n = worker as u64 * 7;
    let mut first = true;
    while std::mem::take(&mut first) || Instant::now() < deadline {
        if period.is_some() {
            tokio::time::sleep_until(next_send.into()).await;
        }
        // Paced: latency counts from the scheduled time when the worker fell behind (the server
        // held it up), else from now (so timer slop is not charged to the server).
        let now = Instant::now();
        let scheduled = if period.is_some() && now > next_send + TIMER_SLOP { next_send } else { now };
        let class = pick(&spec.classes, n);
        n += 1;
        let result = match sender.as_mut() {
            Some(s) => request(s, &spec.classes[class].path).await,
            None => Err(anyhow::anyhow!("not connected")),
        };
        match result {
            Ok(true) => {
                tally.ok += 1;
                tally.in_window += u64::from(Instant::now() <= deadline);
                let us = scheduled.elapsed().as_micros().max(1) as u64;
                let _clamped = tally.latency[class].record(us.min(600_000_000));
            }
            Ok(false) => tally.errors += 1,
            Err(_) => {
                tally.errors += 1;
                sender = connect(spec.target).await.ok();
            }
        }
        progress.inc(1);
        if let Some(period) = period {
            next_send += period;
        }
    }
    tally
}

/// GET a path and return the body as text (admin endpoint, readiness checks).
pub async fn get_text(target: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut sender = connect(target).await?;
    sender.ready().await?;
    let body = sender.send_request(get(path)?).await?.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Downloads `path` to the end; returns the bytes received and the time taken.
pub async fn download(target: SocketAddr, path: &str) -> anyhow::Result<(u64, Duration)> {
    download_inner(target, path).await
}

/// `n` clients that send `GET path` and then never read: a 4 KiB receive buffer each, so the
/// server's writes stop at once. They hold their connections until dropped.
pub async fn non_reading(target: SocketAddr, path: &str, n: usize) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_recv_buffer_size(4096)?;
        let mut stream = socket.connect(target).await.with_context(|| format!("connecting to {target}"))?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n").as_bytes()).await?;
        clients.push(stream);
    }
    Ok(clients)
}

async fn download_inner(target: SocketAddr, path: &str) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    let mut sender = connect(target).await?;
    sender.ready().await?;
    let req = Request::builder().uri(path).header("host", "bench").body(Empty::new())?;
    let response = sender.send_request(req).await?;
    anyhow::ensure!(response.status().is_success(), "download answered {}", response.status());
    let mut body = response.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            bytes += data.len() as u64;
        }
    }
    Ok((bytes, started.elapsed()))
}

/// Uploads `size` bytes (chunked, generated as they are sent) to `path`; returns the time taken.
pub async fn upload(target: SocketAddr, path: &str, size: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let stream = tokio::net::TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _closed = conn.await;
    });
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (0..size.div_ceil(chunk.len() as u64)).map(move |i| {
        let left = size - i * chunk.len() as u64;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
            chunk.slice(..left.min(chunk.len() as u64) as usize),
        ))
    });
    let body = IterBody(chunks);
    let req = Request::builder().method(Method::POST).uri(path).header("host", "bench").body(body)?;
    let response = sender.send_request(req).await?;
    anyhow::ensure!(response.status().is_success(), "upload answered {}", response.status());
    let answer = response.into_body().collect().await?.to_bytes();
    let received: u64 = String::from_utf8_lossy(&answer).trim().parse().unwrap_or(0);
    anyhow::ensure!(received == size, "upstream received {received} of {size} bytes");
    Ok(started.elapsed())
}

/// A body whose frames come from an iterator (nothing to await between them).
pub struct IterBody<I>(I);

impl<I: Iterator<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> + Unpin> hyper::body::Body
    for IterBody<I>
{
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local HTTP/1 server answering every request with an empty 200 (after 300 ms for
    /// `/slow`); aborted on drop.
    struct OkServer(tokio::task::JoinHandle<()>, SocketAddr);

    impl OkServer {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
                        if request.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
                    });
                    connections.spawn(async move {
                        let _ended = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self(accept, addr)
        }

        /// `concurrency` workers requesting `path` for `duration`, as fast as they go.
        fn load(&self, path: &str, concurrency: usize, duration: Duration) -> LoadSpec {
            let classes = vec![RequestClass { name: "test", path: path.into(), percent: 100 }];
            LoadSpec { target: self.1, classes, concurrency, duration, rate: None }
        }
    }

    impl Drop for OkServer {
        fn drop(&mut self) {
            self.0.abort();
        }
    }

    #[tokio::test]
    async fn every_worker_sends_a_request_even_when_it_first_runs_after_the_deadline() {
        let server = OkServer::start().await;
        // The window is over before any worker runs: each still sends its one request (as in
        // `many`, where the generator may get to a worker only after the deadline).
        let result = run(&server.load("/", 50, Duration::ZERO), &ProgressBar::hidden()).await.unwrap();
        assert_eq!((result.ok, result.errors), (50, 0));
        assert_eq!(result.merged().len(), 50, "every request's latency is recorded");
    }

    #[tokio::test]
    async fn the_rate_counts_only_the_answers_that_came_within_the_window() {
        let server = OkServer::start().await;
        let spec = server.load("/slow", 10, Duration::from_millis(100));
        let result = run(&spec, &ProgressBar::hidden()).await.unwrap();
        // Each worker's one request was sent in the window and answered after it.
        assert_eq!((result.ok, result.in_window, result.errors), (10, 0, 0));
        assert_eq!(result.rate(), 0.0);
    }
}
