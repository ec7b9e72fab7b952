//! The HTTP ingress: accepts TCP connections and serves HTTP/1.1 (keep-alive) and HTTP/2 with
//! hyper, each connection in its own tracked task.
//!
//! Limits: open connections per client IP (over it: `503` and close), header size and count
//! (`431`), request head time (`408`, see [`crate::conn_clock`]), idle keep-alive time. Shutdown
//! stops accepting and drains in-flight requests up to the drain timeout.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use quictun_core::link::BodyError;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info_span, warn};

use crate::conn_clock::{BusyGuard, ClockedStream, ConnClock, Expired};
use crate::metrics::Reject;
use crate::proxy::{self, IngressBody};
use crate::state::Shared;

/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 8192;
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 41\r\n\r\ntoo many connections from your address.\r\n";

fn builder(shared: &Shared) -> auto::Builder<TokioExecutor> {
    let settings = &shared.settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own head timeout is a backstop only: the connection clock answers 408 first.
    let backstop = Duration::from_secs(settings.header_read_timeout_secs.max(settings.keep_alive_timeout_secs) + 5);
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(backstop)
        .max_buf_size(settings.max_header_bytes.max(MIN_BUF))
        .max_headers(settings.max_header_count);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Open ingress connections by client address.
#[derive(Debug, Default)]
struct PerIp {
    open: DashMap<IpAddr, usize>,
}

/// One counted connection; uncounts itself when dropped.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = self.open.entry(ip).or_insert(0);
        if max != 0 && *open >= max {
            return None;
        }
        *open += 1;
        Some(IpSlot { table: self.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let _gone = self.table.open.remove_if_mut(&self.ip, |_, open| {
            *open -= 1;
            *open == 0
        });
    }
}

/// The response body, holding its connection busy until it is done.
struct Tracked {
    body: IngressBody,
    _busy: BusyGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Answers a connection over the per-address limit and closes it.
async fn refuse(mut stream: TcpStream) {
    let _sent = tokio::time::timeout(Duration::from_secs(1), stream.write_all(TOO_MANY_CONNECTIONS)).await;
    let _closed = stream.shutdown().await;
}

/// Serves the ingress until shutdown, then drains connections for up to the drain timeout.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let builder = builder(&shared);
    let graceful = GracefulShutdown::new();
    let per_ip = Arc::new(PerIp::default());
    let header_timeout = Duration::from_secs(shared.settings.header_read_timeout_secs);
    let idle_timeout = Duration::from_secs(shared.settings.keep_alive_timeout_secs);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(%err, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(ip_slot) = per_ip.admit(peer.ip(), shared.settings.max_connections_per_ip) else {
            shared.metrics.reject(Reject::ip_limit);
            debug!(%peer, "too many connections from this address");
            shared.tasks.spawn(refuse(stream));
            continue;
        };
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let clock = ConnClock::new();
        let metrics_shared = shared.clone();
        let on_expired = Box::new(move |why| {
            if why == Expired::Head {
                metrics_shared.metrics.reject(Reject::header_timeout);
            }
        });
        let stream = ClockedStream::new(stream, clock.clone(), header_timeout, idle_timeout, peer, on_expired);
        let shared2 = shared.clone();
        let service = service_fn(move |req| {
            let busy = clock.busy();
            let shared = shared2.clone();
            async move {
                Ok::<_, Infallible>(proxy::handle(shared, req, peer).await.map(|body| Tracked { body, _busy: busy }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        let connections = shared.metrics.ingress_connections.clone();
        connections.inc();
        shared.tasks.spawn(
            async move {
                if let Err(err) = conn.await {
                    debug!(%err, "ingress connection ended with an error");
                }
                connections.dec();
                drop(ip_slot);
            }
            .instrument(info_span!("ingress", %peer)),
        );
    }
    drop(listener);
    let drain = Duration::from_secs(shared.settings.drain_timeout_secs);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!(?drain, "ingress connections still open after the drain timeout");
    }
}
