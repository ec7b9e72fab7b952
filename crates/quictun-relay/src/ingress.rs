//! The HTTP ingress: accepts TCP connections and serves HTTP/1.1 (keep-alive) and HTTP/2 with
//! hyper, each connection in its own tracked task. Header size and count are bounded, a slow
//! header sender is cut off, and shutdown drains in-flight requests up to the drain timeout.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info_span, warn};

use crate::proxy;
use crate::state::Shared;

/// How long a client may take to send a complete request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 8192;

fn builder(shared: &Shared) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(shared.settings.max_header_bytes.max(MIN_BUF))
        .max_headers(shared.settings.max_header_count);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves the ingress until shutdown, then drains connections for up to the drain timeout.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let builder = builder(&shared);
    let graceful = GracefulShutdown::new();
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
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let shared2 = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared2.clone();
            async move { Ok::<_, Infallible>(proxy::handle(shared, req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        shared.tasks.spawn(
            async move {
                if let Err(err) = conn.await {
                    debug!(%err, "ingress connection ended with an error");
                }
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
