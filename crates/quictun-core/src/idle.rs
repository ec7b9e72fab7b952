//! An idle timeout for a spliced connection: [`Watched`] wraps its socket and notes each time
//! bytes move either way; [`Watched::idle`] resolves once none have for the timeout. A TCP tunnel
//! selects on it beside the splice, so that connections left open and silent give their stream
//! back.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// A socket whose traffic is watched (see the module documentation).
#[derive(Debug)]
pub struct Watched<IO> {
    io: IO,
    activity: Activity,
}

/// When bytes last moved, in milliseconds since `origin`.
#[derive(Debug, Clone)]
pub struct Activity {
    origin: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// Activity that starts now.
    pub fn new() -> Self {
        Self { origin: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }

    /// Notes that something moved now.
    pub fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once no byte has moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl<IO> Watched<IO> {
    /// Watches `io`, counting from now.
    pub fn new(io: IO) -> Self {
        Self { io, activity: Activity::new() }
    }

    /// A handle on the watch, kept by whoever waits for [`Activity::idle`].
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_resolves_only_after_a_silence_of_the_timeout() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut watched = Watched::new(near);
        let activity = watched.activity();
        let timeout = Duration::from_secs(10);
        let started = Instant::now();
        let mut idle = std::pin::pin!(activity.idle(timeout));
        for _ in 0..3 {
            tokio::select! {
                () = &mut idle => panic!("idle while bytes moved"),
                () = tokio::time::sleep(Duration::from_secs(6)) => {}
            }
            far.write_all(b"x").await.unwrap();
            let mut byte = [0u8];
            watched.read_exact(&mut byte).await.unwrap();
        }
        watched.write_all(b"y").await.unwrap();
        let written = Instant::now();
        idle.await;
        assert_eq!(written.elapsed(), timeout, "ten seconds after the last byte");
        assert!(started.elapsed() >= Duration::from_secs(28));
    }
}
