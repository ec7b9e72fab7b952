//! Time limits for one ingress connection, enforced on its socket:
//!
//! - **first byte**: a new connection must send something within `header_timeout` of being
//!   accepted (its TLS handshake included), or it is closed quietly; a client cannot hold a
//!   connection, and a file descriptor, for the keep-alive time without saying anything;
//! - **request head** (slowloris): once the first byte of a request head arrives, the whole head
//!   must follow within `header_timeout`, or the client gets `408 Request Timeout` and the
//!   connection is closed;
//! - **idle keep-alive**: a connection with no request in flight and no byte received for
//!   `idle_timeout` is closed quietly.
//!
//! The connection is "busy" from the moment hyper hands a request to the service until its
//! response body is dropped ([`BusyGuard`]); a busy connection is governed by the stream idle
//! timeout of the body instead. HTTP/2 connections (seen by their preface) only get the idle rule.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::info;

const REQUEST_TIMEOUT_RESPONSE: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: 24\r\n\r\nrequest head too slow.\r\n";
const NOT_STARTED: u64 = u64::MAX;

/// The shared clock of one connection: requests in flight and when the current phase began.
#[derive(Debug)]
pub struct ConnClock {
    origin: Instant,
    busy: AtomicUsize,
    /// Milliseconds since `origin` when the connection last became idle (or saw h2 traffic).
    idle_since: AtomicU64,
    /// Milliseconds since `origin` when the first byte of the pending request head arrived.
    head_since: AtomicU64,
    http2: AtomicBool,
    /// Set (and notified) when the first request reaches the service.
    served: AtomicBool,
    first_request: Notify,
    /// Set once the connection switched protocols (WebSocket): no HTTP deadline applies any more.
    upgraded: AtomicBool,
}

impl ConnClock {
    /// A clock for a connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NOT_STARTED),
            http2: AtomicBool::new(false),
            served: AtomicBool::new(false),
            first_request: Notify::new(),
            upgraded: AtomicBool::new(false),
        })
    }

    /// The connection switched protocols: its head and keep-alive deadlines no longer apply.
    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// Waits until the connection's first request has reached the service (at once if it has).
    pub async fn first_request(&self) {
        if !self.served.load(Ordering::Acquire) {
            self.first_request.notified().await;
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Marks a request as handed to the service; the guard marks it done when dropped.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(NOT_STARTED, Ordering::Release);
        if !self.served.swap(true, Ordering::AcqRel) {
            // Leaves a permit when nobody waits yet.
            self.first_request.notify_one();
        }
        BusyGuard(self.clone())
    }
}

/// Holds a connection busy; dropped with the response body.
#[derive(Debug)]
pub struct BusyGuard(Arc<ConnClock>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now_ms(), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// A new connection sent nothing in time (closed quietly).
    FirstByte,
    /// The request head did not arrive in time (answered 408).
    Head,
    /// The keep-alive connection stayed idle too long.
    Idle,
}

/// An ingress connection (a TCP socket, or the TLS session on it) watched by a [`ConnClock`].
pub struct ClockedStream<S> {
    inner: S,
    clock: Arc<ConnClock>,
    header_timeout: Duration,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
    peer: SocketAddr,
    preface_checked: bool,
    /// Set once a limit closed the connection: every later read is its end.
    expired: bool,
    on_expired: Box<dyn Fn(Expired) + Send + Sync>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClockedStream<S> {
    /// Watches `inner`; `on_expired` is told (for metrics) when a limit closes the connection.
    pub fn new(
        inner: S,
        clock: Arc<ConnClock>,
        header_timeout: Duration,
        idle_timeout: Duration,
        peer: SocketAddr,
        on_expired: Box<dyn Fn(Expired) + Send + Sync>,
    ) -> Self {
        let timer = Box::pin(tokio::time::sleep(idle_timeout));
        Self {
            inner,
            clock,
            header_timeout,
            idle_timeout,
            timer,
            peer,
            preface_checked: false,
            expired: false,
            on_expired,
        }
    }

    /// The deadline in force while idle or reading a head, in ms since the clock's origin.
    fn deadline_ms(&self) -> Option<(u64, Expired)> {
        let clock = &self.clock;
        if clock.busy.load(Ordering::Acquire) > 0 || clock.upgraded.load(Ordering::Acquire) {
            return None;
        }
        if !self.preface_checked {
            // Nothing received yet: the first byte is due within the header timeout.
            return Some((self.header_timeout.as_millis() as u64, Expired::FirstByte));
        }
        let head = clock.head_since.load(Ordering::Acquire);
        if head != NOT_STARTED && !clock.http2.load(Ordering::Relaxed) {
            return Some((head.saturating_add(self.header_timeout.as_millis() as u64), Expired::Head));
        }
        let idle = clock.idle_since.load(Ordering::Acquire).max(if head == NOT_STARTED { 0 } else { head });
        Some((idle.saturating_add(self.idle_timeout.as_millis() as u64), Expired::Idle))
    }

    fn saw_bytes(&mut self, bytes: &[u8]) {
        let clock = &self.clock;
        if !self.preface_checked {
            self.preface_checked = true;
            if bytes.starts_with(b"PRI * HTTP/2.0") {
                clock.http2.store(true, Ordering::Relaxed);
            }
        }
        let now = clock.now_ms();
        if clock.http2.load(Ordering::Relaxed) {
            clock.idle_since.store(now, Ordering::Release);
        } else if clock.busy.load(Ordering::Acquire) == 0 {
            let _first = clock.head_since.compare_exchange(NOT_STARTED, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    fn expire(&mut self, why: Expired) {
        self.expired = true;
        match why {
            Expired::Head => {
                // Best effort, without waiting: the connection is writable unless the client
                // stopped reading too.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _sent = Pin::new(&mut self.inner).poll_write(&mut cx, REQUEST_TIMEOUT_RESPONSE);
                let _flushed = Pin::new(&mut self.inner).poll_flush(&mut cx);
                info!(peer = %self.peer, timeout = ?self.header_timeout, status = 408, "request head too slow, connection closed");
            }
            Expired::Idle => {
                tracing::debug!(peer = %self.peer, timeout = ?self.idle_timeout, "idle keep-alive connection closed");
            }
            Expired::FirstByte => {
                tracing::debug!(peer = %self.peer, timeout = ?self.header_timeout, "new connection sent nothing, closed");
            }
        }
        (self.on_expired)(why);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClockedStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = &buf.filled()[before..];
                if !filled.is_empty() {
                    this.saw_bytes(filled);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                let Some((deadline_ms, why)) = this.deadline_ms() else { return Poll::Pending };
                let deadline = this.clock.origin + Duration::from_millis(deadline_ms);
                if Instant::now() < deadline {
                    this.timer.as_mut().reset(deadline);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                this.expire(why);
                // End of stream: hyper closes the connection.
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClockedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
