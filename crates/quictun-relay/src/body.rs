//! A body wrapper for the data path: counts bytes, enforces a size limit and a minimum upload
//! pace, and resets a body that makes no progress for too long. Frames pass through as they come
//! (no buffering).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use quictun_core::body::BodyError;
use tokio::time::{Instant, Sleep};

/// Set when a body went over its size limit, so the request can be answered 413.
#[derive(Debug, Clone, Default)]
pub struct Tripped(Arc<AtomicBool>);

impl Tripped {
    /// True once the limit was exceeded.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Watches one body on its way through the relay.
pub struct Metered<B> {
    inner: B,
    bytes: Counter,
    limit: Option<(u64, Tripped)>,
    seen: u64,
    idle_timeout: Option<Duration>,
    idle: Option<Pin<Box<Sleep>>>,
    pace: Option<Pace>,
    /// Set when the body's own source failed or stalled (for a request body: the client).
    source_failed: Option<Tripped>,
    /// Where this one body's bytes are also added (for the relay's record of the request).
    tally: Option<Arc<AtomicU64>>,
}

/// How long each window of a pace check lasts, counted in time spent waiting for the sender.
pub const PACE_WINDOW: Duration = Duration::from_secs(10);

/// A minimum pace for a body: over every [`PACE_WINDOW`] of time spent waiting for its sender,
/// at least `min_per_sec` bytes per second must arrive. Time the reader does not ask for data
/// (an upstream that reads slowly) is not counted against the sender.
struct Pace {
    min_per_sec: u64,
    waited: Duration,
    bytes: u64,
    waiting_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    tripped: Tripped,
}

impl Pace {
    /// The window is over: true when it carried enough (a new one starts), false when not.
    fn window_passes(&mut self) -> bool {
        let needed = self.min_per_sec.saturating_mul(PACE_WINDOW.as_secs());
        if self.bytes < needed {
            self.tripped.0.store(true, Ordering::Relaxed);
            return false;
        }
        (self.waited, self.bytes) = (Duration::ZERO, 0);
        true
    }

    /// The sender kept the reader waiting; `Ready` once the window ran out without enough bytes.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let now = Instant::now();
            let since = *self.waiting_since.get_or_insert(now);
            let deadline = since + PACE_WINDOW.saturating_sub(self.waited);
            let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            timer.as_mut().reset(deadline);
            ready!(timer.as_mut().poll(cx));
            self.waited = PACE_WINDOW;
            self.waiting_since = Some(Instant::now());
            if !self.window_passes() {
                return Poll::Ready(());
            }
        }
    }

    /// `len` bytes arrived; false when the window that just ended did not carry enough.
    fn arrived(&mut self, len: u64) -> bool {
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
        self.bytes += len;
        self.waited < PACE_WINDOW || self.window_passes()
    }
}

impl<B> Metered<B> {
    /// Body bytes that went through so far.
    pub fn bytes_seen(&self) -> u64 {
        self.seen
    }

    /// Counts the bytes of `inner` into `bytes`; `idle_timeout` ends a body silent that long.
    pub fn new(inner: B, bytes: Counter, idle_timeout: Option<Duration>) -> Self {
        Self {
            inner,
            bytes,
            limit: None,
            seen: 0,
            idle_timeout,
            idle: None,
            pace: None,
            source_failed: None,
            tally: None,
        }
    }

    /// Adds the body's bytes to `tally` too, as they pass (when there is one).
    pub fn with_tally(mut self, tally: Option<Arc<AtomicU64>>) -> Self {
        self.tally = tally;
        self
    }

    /// Fails the body once it arrives slower than `min_per_sec` (see [`PACE_WINDOW`]); the
    /// returned flag tells afterwards.
    pub fn with_min_pace(mut self, min_per_sec: u64) -> (Self, Tripped) {
        let tripped = Tripped::default();
        self.pace = Some(Pace {
            min_per_sec,
            waited: Duration::ZERO,
            bytes: 0,
            waiting_since: None,
            timer: None,
            tripped: tripped.clone(),
        });
        (self, tripped)
    }

    /// Notes when the body's source fails (an error from it: a connection cut, a malformed
    /// chunk, a reset) or makes no progress for the idle timeout; the returned flag tells
    /// afterwards. For a request body that is the client, not the agent.
    pub fn watching_its_source(mut self) -> (Self, Tripped) {
        let tripped = Tripped::default();
        self.source_failed = Some(tripped.clone());
        (self, tripped)
    }

    fn source_failed(&self) {
        if let Some(tripped) = &self.source_failed {
            tripped.0.store(true, Ordering::Relaxed);
        }
    }

    /// Fails the body once it exceeds `max` bytes; the returned flag tells afterwards.
    pub fn with_limit(mut self, max: u64) -> (Self, Tripped) {
        let tripped = Tripped::default();
        self.limit = Some((max, tripped.clone()));
        (self, tripped)
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if let Some(pace) = &mut this.pace
                    && pace.poll_waiting(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(BodyError::Closed("request body arrived too slowly".into()))));
                }
                let Some(timeout) = this.idle_timeout else { return Poll::Pending };
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(idle.as_mut().poll(cx));
                this.source_failed();
                Poll::Ready(Some(Err(BodyError::Closed(format!("body made no progress for {timeout:?}")))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(err))) => {
                this.source_failed();
                Poll::Ready(Some(Err(BodyError::Closed(err.to_string()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    this.bytes.inc_by(len);
                    if let Some(tally) = &this.tally {
                        tally.fetch_add(len, Ordering::Relaxed);
                    }
                    if let Some(pace) = &mut this.pace
                        && !pace.arrived(len)
                    {
                        return Poll::Ready(Some(Err(BodyError::Closed("request body arrived too slowly".into()))));
                    }
                    if let Some((max, tripped)) = &this.limit
                        && this.seen > *max
                    {
                        tripped.0.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::Closed(format!("body larger than {max} bytes")))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn counts_and_limits() {
        let counter = Counter::default();
        let body = Metered::new(Full::new(Bytes::from_static(b"hello")), counter.clone(), None);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(counter.get(), 5);
        let (body, tripped) =
            Metered::new(Full::new(Bytes::from_static(b"hello")), Counter::default(), None).with_limit(4);
        assert!(body.collect().await.is_err());
        assert!(tripped.is_set());
    }

    #[tokio::test]
    async fn a_body_slot_can_be_resent_until_first_read() {
        let slot =
            BodySlot::new(Full::new(Bytes::from_static(b"payload")).map_err(|never| match never {}).boxed_unsync());
        drop(slot.body()); // a first attempt that never read it
        assert!(slot.untouched());
        assert_eq!(slot.body().collect().await.unwrap().to_bytes(), "payload");
        assert!(!slot.untouched());
        assert!(slot.body().collect().await.is_err(), "a body can be sent only once");
    }

    /// A body fed by the test: one byte every `gap`, `total` in all.
    fn trickle(gap: Duration, total: usize) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let stream = futures_util::stream::unfold(0usize, move |sent| async move {
            if sent == total {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), sent + 1))
        });
        StreamBody::new(Box::pin(stream))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_minimum_pace_is_cut() {
        let (body, tripped) =
            Metered::new(trickle(Duration::from_secs(1), 100), Counter::default(), None).with_min_pace(1024);
        let started = Instant::now();
        let err = body.collect().await.err().unwrap();
        assert!(err.to_string().contains("too slowly"), "{err}");
        assert!(tripped.is_set());
        assert!(
            started.elapsed() <= PACE_WINDOW + Duration::from_secs(1),
            "cut after one window: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_sender_is_cut_after_one_window_and_a_fast_one_is_not() {
        let never = StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>());
        let (body, tripped) = Metered::new(never, Counter::default(), None).with_min_pace(1);
        assert!(body.collect().await.is_err());
        assert!(tripped.is_set());
        // 30 windows' worth, fast enough throughout.
        let (body, tripped) =
            Metered::new(trickle(Duration::from_millis(100), 3000), Counter::default(), None).with_min_pace(5);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 3000);
        assert!(!tripped.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_does_not_ask_is_not_counted_against_the_sender() {
        let (mut body, tripped) =
            Metered::new(trickle(Duration::from_millis(10), 1000), Counter::default(), None).with_min_pace(50);
        body.frame().await.unwrap().unwrap();
        // The reader (an upstream) takes a minute before it asks again.
        tokio::time::advance(Duration::from_secs(60)).await;
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest.len(), 999);
        assert!(!tripped.is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_ends_after_the_idle_timeout() {
        let never = StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>());
        let body = Metered::new(never, Counter::default(), Some(Duration::from_secs(5)));
        let err = body.collect().await.err().unwrap();
        assert!(err.to_string().contains("no progress"), "{err}");
    }
}

/// Holds a request body until a transport first reads it, so a request whose stream could not be
/// opened can be sent again, whole, to another agent.
#[derive(Clone)]
pub struct BodySlot(Arc<std::sync::Mutex<Option<quictun_core::body::TunnelBody>>>);

impl BodySlot {
    /// A slot holding `body`.
    pub fn new(body: quictun_core::body::TunnelBody) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(body))))
    }

    /// True while no transport has read the body.
    pub fn untouched(&self) -> bool {
        self.0.lock().is_ok_and(|slot| slot.is_some())
    }

    /// A body that takes the held one on its first read.
    pub fn body(&self) -> quictun_core::body::TunnelBody {
        use http_body_util::BodyExt;
        SlotBody { slot: self.clone(), inner: None }.boxed_unsync()
    }
}

struct SlotBody {
    slot: BodySlot,
    inner: Option<quictun_core::body::TunnelBody>,
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            this.inner = this.slot.0.lock().ok().and_then(|mut slot| slot.take());
        }
        match this.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(Some(Err(BodyError::Closed("request body already sent to another agent".into())))),
        }
    }
}
