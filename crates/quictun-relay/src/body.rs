//! A body wrapper for the data path: counts bytes, enforces a size limit, and resets a body that
//! makes no progress for too long. Frames pass through as they come (no buffering).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use quictun_core::link::BodyError;
use tokio::time::Sleep;

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
}

impl<B> Metered<B> {
    /// Counts the bytes of `inner` into `bytes`; `idle_timeout` ends a body silent that long.
    pub fn new(inner: B, bytes: Counter, idle_timeout: Option<Duration>) -> Self {
        Self { inner, bytes, limit: None, seen: 0, idle_timeout, idle: None }
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
                let Some(timeout) = this.idle_timeout else { return Poll::Pending };
                let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(idle.as_mut().poll(cx));
                Poll::Ready(Some(Err(BodyError::Closed(format!("body made no progress for {timeout:?}")))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(BodyError::Closed(err.to_string())))),
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    this.bytes.inc_by(len);
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
pub struct BodySlot(Arc<std::sync::Mutex<Option<quictun_core::link::TunnelBody>>>);

impl BodySlot {
    /// A slot holding `body`.
    pub fn new(body: quictun_core::link::TunnelBody) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(body))))
    }

    /// True while no transport has read the body.
    pub fn untouched(&self) -> bool {
        self.0.lock().is_ok_and(|slot| slot.is_some())
    }

    /// A body that takes the held one on its first read.
    pub fn body(&self) -> quictun_core::link::TunnelBody {
        use http_body_util::BodyExt;
        SlotBody { slot: self.clone(), inner: None }.boxed_unsync()
    }
}

struct SlotBody {
    slot: BodySlot,
    inner: Option<quictun_core::link::TunnelBody>,
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
