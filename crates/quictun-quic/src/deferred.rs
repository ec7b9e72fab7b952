//! quinn's tokio runtime with its drivers deferred behind the tasks that are ready.
//!
//! quinn drives each connection (and each endpoint) in a task of its own, woken by every stream
//! write. Tokio runs a task woken by another in the waker's "LIFO slot", i.e. next, so the driver
//! used to run after each single write and send each small request or answer in a UDP datagram of
//! its own (0.8 `sendmsg` per request at the relay under 64 concurrent small requests, where the
//! gRPC transport's HTTP/2 connection wrote once per five requests). A driver woken here first
//! yields once, to the back of the run queue: the tasks already ready write their streams first,
//! and one pass of the driver packs them into as few packets as they fit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// quinn's tokio runtime, spawning drivers that defer once per wake ([`Deferred`]).
#[derive(Debug)]
pub(crate) struct DeferringRuntime(quinn::TokioRuntime);

impl DeferringRuntime {
    /// The runtime for endpoints made inside a tokio runtime, as quinn takes it.
    pub(crate) fn shared() -> Arc<dyn quinn::Runtime> {
        Arc::new(Self(quinn::TokioRuntime))
    }
}

impl quinn::Runtime for DeferringRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        self.0.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(Box::pin(Deferred { inner: future, yielded: false }));
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        self.0.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        self.0.now()
    }
}

/// A future that, each time it is woken, first yields once before it polls `inner`.
pub struct Deferred {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    yielded: bool,
}

impl Future for Deferred {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.yielded {
            // Waking itself while polled sends the task to the back of the run queue.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.yielded = false;
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const WRITERS: usize = 8;

    /// What the writers and the driver share: stream writes done, the driver's waker (as quinn's
    /// connection keeps it), and how many writes each pass of the driver found.
    #[derive(Default)]
    struct Shared {
        writes: AtomicUsize,
        waker: Mutex<Option<std::task::Waker>>,
        passes: Mutex<Vec<usize>>,
        registered: tokio::sync::Notify,
    }

    /// A stand-in for quinn's connection driver: each pass packs the writes it finds.
    struct Driver(Arc<Shared>);

    impl Future for Driver {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let writes = self.0.writes.load(Ordering::SeqCst);
            if writes == 0 {
                self.0.registered.notify_one();
            } else {
                self.0.passes.lock().unwrap().push(writes);
            }
            if writes == WRITERS {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// On one worker thread: eight tasks become ready together (spawned by one task, as an
    /// I/O event wakes several connections' tasks), each "writes a stream" and wakes the driver.
    /// Returns how many writes the driver's first pass found.
    fn first_pass(deferred: bool) -> usize {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().unwrap();
        runtime.block_on(async {
            let shared = Arc::new(Shared::default());
            let registered = shared.registered.notified();
            let driver = Box::pin(Driver(shared.clone()));
            if deferred {
                DeferringRuntime::shared().spawn(driver)
            } else {
                drop(tokio::spawn(driver))
            }
            registered.await;
            let trigger = shared.clone();
            let writers = tokio::spawn(async move {
                let writers: Vec<_> = (0..WRITERS)
                    .map(|_| {
                        let shared = trigger.clone();
                        tokio::spawn(async move {
                            shared.writes.fetch_add(1, Ordering::SeqCst);
                            if let Some(waker) = shared.waker.lock().unwrap().take() {
                                waker.wake();
                            }
                        })
                    })
                    .collect();
                for writer in writers {
                    writer.await.unwrap();
                }
            });
            writers.await.unwrap();
            let last_pass = async {
                while shared.passes.lock().unwrap().last() != Some(&WRITERS) {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(10), last_pass)
                .await
                .expect("the driver saw every write");
            shared.passes.lock().unwrap()[0]
        })
    }

    #[test]
    fn a_woken_driver_runs_after_the_tasks_that_were_ready_with_it() {
        assert_eq!(first_pass(true), WRITERS, "the deferred driver packs every write in one pass");
        // What tokio does without it: the driver runs after the first write alone.
        assert_eq!(first_pass(false), 1);
    }
}
