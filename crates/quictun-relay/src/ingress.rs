//! The HTTP ingress: accepts TCP connections and serves HTTP/1.1 (keep-alive) and HTTP/2 with
//! hyper, each connection in its own tracked task. The same code serves the HTTPS ingress, where
//! TLS (ALPN `h2`, `http/1.1`) comes first.
//!
//! Limits: open connections per client IP (over it: `503` and close), header size and count
//! (`431`), request head time (`408`, see [`crate::conn_clock`]), idle keep-alive time. Shutdown
//! stops accepting and drains in-flight requests up to the drain timeout.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use quictun_core::body::BodyError;
use quictun_core::edge::serve::serve_with_drain;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::admission::PerKey;
use crate::conn_clock::{BusyGuard, ClockedStream, ConnClock, Expired};
use crate::metrics::Reject;
use crate::proxy::{self, IngressBody, Peer, Scheme};
use crate::state::RelayState;

/// hyper's smallest allowed read buffer.
const MIN_BUF: usize = 8192;
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 41\r\n\r\ntoo many connections from your address.\r\n";
const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 36\r\n\r\nthe relay is at its connection limit\n";

fn builder(shared: &RelayState) -> auto::Builder<TokioExecutor> {
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

/// Answers a connection the relay does not take (`answer`: a complete 503) and closes it.
async fn refuse(mut stream: TcpStream, answer: &'static [u8]) {
    let _sent = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    let _closed = stream.shutdown().await;
}

/// What every accepted connection is served with.
struct Ingress {
    shared: Arc<RelayState>,
    builder: auto::Builder<TokioExecutor>,
    /// The TLS acceptor of an HTTPS ingress.
    tls: Option<TlsAcceptor>,
    /// The connection tasks; the ingress waits for them when it drains.
    conns: TaskTracker,
    per_ip: Arc<PerKey<IpAddr>>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Ingress {
    fn scheme(&self) -> Scheme {
        if self.tls.is_some() { Scheme::Https } else { Scheme::Http }
    }

    /// Serves one accepted connection in its own tracked task (or refuses it over the relay's
    /// connection budget or the per-address limit). An HTTPS connection first completes its TLS
    /// handshake, within the header timeout.
    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let shared = &self.shared;
        let Ok(budget_slot) = shared.runtime.connections.clone().try_acquire_owned() else {
            shared.runtime.metrics.reject(Reject::connection_limit);
            debug!(%peer, "ingress connection budget exhausted");
            shared.runtime.tasks.spawn(refuse(stream, AT_CAPACITY));
            return;
        };
        let Some(ip_slot) = self.per_ip.admit(peer.ip()) else {
            shared.runtime.metrics.reject(Reject::ip_limit);
            debug!(%peer, "too many connections from this address");
            shared.runtime.tasks.spawn(refuse(stream, TOO_MANY_CONNECTIONS));
            return;
        };
        let connections = shared.runtime.metrics.ingress_connections.clone();
        connections.inc();
        let conn = Connection {
            shared: shared.clone(),
            builder: self.builder.clone(),
            clock: ConnClock::new(),
            peer,
            scheme: self.scheme(),
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        };
        let (tls, stopped) = (self.tls.clone(), shared.runtime.stopped.clone());
        let handshake_timeout = self.header_timeout;
        self.conns.spawn(
            async move {
                let served = async {
                    let Some(tls) = tls else { return conn.serve(stream, None).await };
                    match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let sni = stream.get_ref().1.server_name().map(Arc::from);
                            conn.serve(stream, sni).await;
                        }
                        Ok(Err(err)) => debug!(%err, "TLS handshake failed"),
                        Err(_) => {
                            conn.shared.runtime.metrics.reject(Reject::header_timeout);
                            debug!(timeout = ?handshake_timeout, "TLS handshake too slow, connection closed");
                        }
                    }
                };
                tokio::select! {
                    () = served => {}
                    _ = stopped.cancelled() => debug!("ingress connection cut at the end of the drain"),
                }
                connections.dec();
                drop((ip_slot, budget_slot));
            }
            .instrument(info_span!("ingress", %peer)),
        );
    }

    /// Accepts the connections the kernel already completed (their clients have sent their
    /// requests), then closes the listener. Works on the socket directly: the reactor may not
    /// have reported them yet.
    fn take_queued(&self, listener: TcpListener) {
        let listener = match listener.into_std() {
            Ok(listener) => listener,
            Err(err) => return warn!(%err, "could not take the ingress queue"),
        };
        let mut taken = 0usize;
        while let Ok((stream, peer)) = listener.accept() {
            let stream = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
            match stream {
                Ok(stream) => {
                    taken += 1;
                    self.admit(stream, peer);
                }
                Err(err) => debug!(%err, %peer, "could not adopt a queued connection"),
            }
        }
        debug!(taken, "ingress listener closed");
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    shared: Arc<RelayState>,
    builder: auto::Builder<TokioExecutor>,
    clock: Arc<ConnClock>,
    peer: SocketAddr,
    scheme: Scheme,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Connection {
    /// Serves HTTP on `stream` (a TCP socket or a TLS session for `sni`) until it ends. When the relay
    /// drains, the request in flight (or, on a connection that has not spoken yet, the request on
    /// its way) finishes, then the connection closes.
    async fn serve<S>(self, stream: S, sni: Option<Arc<str>>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self { shared, builder, clock, peer, scheme, header_timeout, idle_timeout } = self;
        let metrics_shared = shared.clone();
        let on_expired = Box::new(move |why| match why {
            Expired::Head => metrics_shared.runtime.metrics.reject(Reject::header_timeout),
            Expired::FirstByte => metrics_shared.runtime.metrics.reject(Reject::first_byte_timeout),
            Expired::Idle => {}
        });
        let stream = ClockedStream::new(stream, clock.clone(), header_timeout, idle_timeout, peer, on_expired);
        let service_shared = shared.clone();
        let service_clock = clock.clone();
        let service = service_fn(move |req| {
            let busy = service_clock.busy();
            let (shared, clock, sni) = (service_shared.clone(), service_clock.clone(), sni.clone());
            async move {
                let response = proxy::handle(shared, req, Peer { addr: peer, scheme, sni }).await;
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    clock.set_upgraded();
                }
                Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let stop = async {
            shared.runtime.shutdown.cancelled().await;
            tokio::select! {
                _ = clock.first_request() => {}
                _ = tokio::time::sleep(FRESH_GRACE) => {}
            }
        };
        serve_with_drain(conn, stop, "ingress").await;
    }
}

/// Serves the ingress until shutdown, then drains connections for up to the drain timeout: the
/// listener closes (after taking the connections already queued in the kernel), requests in
/// flight finish, idle keep-alive connections close. With `tls` it is an HTTPS ingress.
pub async fn serve(listener: TcpListener, shared: Arc<RelayState>, tls: Option<Arc<rustls::ServerConfig>>) {
    let ingress = Ingress {
        builder: builder(&shared),
        tls: tls.map(TlsAcceptor::from),
        conns: TaskTracker::new(),
        per_ip: PerKey::new(shared.settings.max_connections_per_ip),
        header_timeout: Duration::from_secs(shared.settings.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(shared.settings.keep_alive_timeout_secs),
        shared,
    };
    loop {
        tokio::select! {
            _ = ingress.shared.runtime.shutdown.cancelled() => break,
            (stream, peer) = quictun_core::accept_tcp(&listener, "ingress") => ingress.admit(stream, peer),
        }
    }
    ingress.take_queued(listener);
    ingress.conns.close();
    let drain = Duration::from_secs(ingress.shared.settings.drain_timeout_secs);
    if tokio::time::timeout(drain, ingress.conns.wait()).await.is_err() {
        warn!(?drain, open = ingress.conns.len(), "ingress connections still open after the drain timeout");
    }
}

/// How long a connection that has not sent a request yet gets, once the relay drains, to send
/// it: its client connected before the signal and the request is on its way.
const FRESH_GRACE: Duration = Duration::from_secs(1);
