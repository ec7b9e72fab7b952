//! Credit held by stalled readers: budgeted per connection, per client address and per process,
//! and taken back from the readers stalled longest.
//!
//! Every body that crosses the tunnel holds flow-control credit while its bytes wait unread: up
//! to a stream window on QUIC (where unread bytes count against the connection's window too), up
//! to an exchange window on gRPC. A reader that stops reading (a client that never reads its
//! response, an upstream that never reads its upload) keeps that credit. Enough of them would
//! hold the whole connection window, and then every other stream of the connection, the control
//! stream and its heartbeats included, would wait.
//!
//! A [`Reclaimer`] watches every such body ([`StallScope::watch`], one scope per connection). A
//! body is **stalled** once it has handed data to its reader and the reader has not asked for
//! more within [`StallLimits::stall_after`]; a reader waiting for data is never stalled. Each
//! stalled body is charged a full window (what it may hold at most). When the stalled
//! bodies of one connection, of one client address, or of the whole process are charged more
//! than their budget, the bodies stalled longest are reclaimed: dropped, which stops their
//! stream (QUIC returns their unread bytes to the connection window at once) and ends their
//! reader's body with an error, as an HTTP/2 server resets its slowest stream under pressure.
//! A connection's budget is at most half its window, so the other half is always there for live
//! streams and the control stream (with the default, very large windows, the budgets are what
//! bound the memory stalled readers pin, and the window is never what stops a stream).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::body::{BodyError, TunnelBody};

/// The budgets, in bytes of credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallLimits {
    /// A reader that has not asked for more data this long after it got some is stalled.
    pub stall_after: Duration,
    /// The most the stalled bodies of one connection may hold (half its window).
    pub per_connection: u64,
    /// The most the stalled bodies of one client address may hold (0: no limit).
    pub per_client: u64,
    /// The most all stalled bodies of the process may hold.
    pub total: u64,
}

impl Default for StallLimits {
    /// Stalled after 1 s; 64 MiB per connection; 32 MiB per client address; 256 MiB in all.
    fn default() -> Self {
        Self { stall_after: Duration::from_secs(1), per_connection: 64 << 20, per_client: 32 << 20, total: 256 << 20 }
    }
}

/// One connection's share of a [`Reclaimer`]: what each of its stalled bodies is charged.
#[derive(Debug, Clone)]
pub struct StallScope {
    reclaimer: Reclaimer,
    connection: u64,
    charge: u64,
}

/// A body declared (by its `Content-Length`) at most this long cannot pin more credit than this:
/// it is not watched. Most bodies are this small, and skip the watch's cost.
pub const SMALL_BODY: u64 = 64 * 1024;

impl StallScope {
    /// Watches `body`, which holds this connection's credit until it is read; `client` is the
    /// ingress client it is for, when there is one. `headers` are its message's (a body they
    /// declare at most [`SMALL_BODY`] long is returned as it is).
    pub fn watch(&self, body: TunnelBody, headers: &[quictun_proto::Header], client: Option<IpAddr>) -> TunnelBody {
        if crate::http::declared_length(headers).is_some_and(|len| len <= SMALL_BODY) {
            return body;
        }
        self.reclaimer.watch(body, self, client)
    }
}

/// Set in `handed_at` while the reader waits for data (or the body ended): not stalled.
const WAITING: u64 = u64::MAX;

struct Entry {
    /// Watched in this order: breaks ties between bodies stalled in the same millisecond.
    id: u64,
    connection: u64,
    charge: u64,
    client: Option<IpAddr>,
    /// Milliseconds since the reclaimer's origin when data was last handed to the reader, or
    /// [`WAITING`].
    handed_at: AtomicU64,
    /// The watched body; taken (and dropped) when reclaimed.
    body: Mutex<Option<TunnelBody>>,
}

impl Entry {
    fn body(&self) -> MutexGuard<'_, Option<TunnelBody>> {
        self.body.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct Inner {
    limits: StallLimits,
    origin: Instant,
    next_id: AtomicU64,
    entries: DashMap<u64, Arc<Entry>>,
    /// Wakes the sweeper when a body is watched while it idles.
    watched: Notify,
    /// Set while the sweeper idles (nothing watched).
    idle: AtomicBool,
    stalled: Gauge,
    stalled_bytes: Gauge,
    reclaimed: Counter,
}

/// Watches bodies and reclaims the credit of stalled ones (see the module documentation).
/// Clones share the same budgets.
#[derive(Clone)]
pub struct Reclaimer(Arc<Inner>);

impl std::fmt::Debug for Reclaimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reclaimer").field("limits", &self.0.limits).finish_non_exhaustive()
    }
}

/// The metrics a reclaimer keeps, for a registry.
#[derive(Debug, Clone)]
pub struct StallMetrics {
    /// Bodies stalled at the last sweep.
    pub stalled: Gauge,
    /// The credit they may hold (a window each), at the last sweep.
    pub stalled_bytes: Gauge,
    /// Bodies reclaimed so far.
    pub reclaimed: Counter,
}

impl StallMetrics {
    /// Registers `stalled_streams`, `stalled_bytes` and `reclaimed_streams` (a counter).
    pub fn register(self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("stalled_streams", "Streams whose reader stopped reading, at the last sweep", self.stalled);
        registry.register(
            "stalled_bytes",
            "Flow-control credit those streams may hold (a window each): the memory stalled readers can pin",
            self.stalled_bytes,
        );
        registry.register(
            "reclaimed_streams",
            "Streams reset because their stalled reader held credit over a budget",
            self.reclaimed,
        );
    }
}

impl Reclaimer {
    /// A reclaimer with these budgets (run [`Reclaimer::run`] to enforce them).
    pub fn new(limits: StallLimits) -> Self {
        Self(Arc::new(Inner {
            limits,
            origin: Instant::now(),
            next_id: AtomicU64::new(0),
            entries: DashMap::new(),
            watched: Notify::new(),
            idle: AtomicBool::new(false),
            stalled: Gauge::default(),
            stalled_bytes: Gauge::default(),
            reclaimed: Counter::default(),
        }))
    }

    /// The budgets.
    pub fn limits(&self) -> StallLimits {
        self.0.limits
    }

    /// Its metrics (shared: register them once).
    pub fn metrics(&self) -> StallMetrics {
        StallMetrics {
            stalled: self.0.stalled.clone(),
            stalled_bytes: self.0.stalled_bytes.clone(),
            reclaimed: self.0.reclaimed.clone(),
        }
    }

    /// A scope for one connection, whose stalled bodies are each charged `charge` (their
    /// window).
    pub fn scope(&self, charge: u64) -> StallScope {
        let connection = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        StallScope { reclaimer: self.clone(), connection, charge }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.origin.elapsed().as_millis()).unwrap_or(WAITING - 1)
    }

    fn watch(&self, body: TunnelBody, scope: &StallScope, client: Option<IpAddr>) -> TunnelBody {
        if body.is_end_stream() {
            return body;
        }
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        // Never polled yet: the reader has not asked, so the clock runs from now.
        let entry = Arc::new(Entry {
            id,
            connection: scope.connection,
            charge: scope.charge,
            client,
            handed_at: AtomicU64::new(self.now_ms()),
            body: Mutex::new(Some(body)),
        });
        self.0.entries.insert(id, entry.clone());
        // Pairs with the sweeper's fence: it sees this entry, or this sees it idle.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.0.idle.load(Ordering::Relaxed) {
            self.0.watched.notify_one();
        }
        Watched { id, entry, reclaimer: self.clone() }.boxed_unsync()
    }

    /// Reclaims the bodies stalled longest until every budget holds; returns how many it took.
    pub fn sweep(&self) -> usize {
        let limits = self.0.limits;
        let now = self.now_ms();
        let stall_ms = u64::try_from(limits.stall_after.as_millis()).unwrap_or(u64::MAX);
        let mut stalled: Vec<(u64, Arc<Entry>)> = self
            .0
            .entries
            .iter()
            .filter_map(|item| {
                let entry = item.value();
                let handed_at = entry.handed_at.load(Ordering::Acquire);
                (handed_at != WAITING && now.saturating_sub(handed_at) >= stall_ms).then(|| (handed_at, entry.clone()))
            })
            .collect();
        stalled.sort_by_key(|(handed_at, entry)| (*handed_at, entry.id));
        let mut per_connection: HashMap<u64, u64> = HashMap::new();
        let mut per_client: HashMap<IpAddr, u64> = HashMap::new();
        let mut total = 0u64;
        for (_, entry) in &stalled {
            *per_connection.entry(entry.connection).or_default() += entry.charge;
            if let Some(client) = entry.client {
                *per_client.entry(client).or_default() += entry.charge;
            }
            total += entry.charge;
        }
        let mut reclaimed = 0;
        // Oldest first: every budget that is over gives up its longest-stalled bodies.
        for (_, entry) in &stalled {
            let connection = per_connection.get(&entry.connection).copied().unwrap_or(0);
            let client = entry.client.and_then(|c| per_client.get(&c).copied()).unwrap_or(0);
            let over = connection > limits.per_connection
                || (limits.per_client != 0 && client > limits.per_client)
                || total > limits.total;
            if !over {
                continue;
            }
            let Some(body) = entry.body().take() else { continue };
            // Gone for good: never counted as stalled again.
            entry.handed_at.store(WAITING, Ordering::Release);
            drop(body);
            reclaimed += 1;
            total -= entry.charge;
            if let Some(n) = per_connection.get_mut(&entry.connection) {
                *n -= entry.charge;
            }
            if let Some(n) = entry.client.and_then(|c| per_client.get_mut(&c)) {
                *n -= entry.charge;
            }
            debug!(connection = entry.connection, client = ?entry.client, "stalled reader's credit reclaimed");
        }
        if reclaimed > 0 {
            warn!(
                reclaimed,
                stalled = stalled.len(),
                "readers stalled over the credit budget: their streams were reset"
            );
            self.0.reclaimed.inc_by(reclaimed as u64);
        }
        self.0.stalled.set((stalled.len() - reclaimed) as i64);
        self.0.stalled_bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        reclaimed
    }

    /// Sweeps four times per stall period while anything is watched, until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let period = (self.0.limits.stall_after / 4).max(Duration::from_millis(10));
        loop {
            if self.0.entries.is_empty() {
                self.0.stalled.set(0);
                self.0.stalled_bytes.set(0);
                // Idle until a body is watched (checked again once marked, so none is missed).
                self.0.idle.store(true, Ordering::Relaxed);
                std::sync::atomic::fence(Ordering::SeqCst);
                if self.0.entries.is_empty() {
                    tokio::select! {
                        () = self.0.watched.notified() => {}
                        () = stop.cancelled() => return,
                    }
                }
                self.0.idle.store(false, Ordering::Relaxed);
            }
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = stop.cancelled() => return,
            }
            self.sweep();
        }
    }
}

/// A body under watch.
struct Watched {
    id: u64,
    entry: Arc<Entry>,
    reclaimer: Reclaimer,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.reclaimer.0.entries.remove(&self.id);
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let mut slot = this.entry.body();
        let Some(body) = slot.as_mut() else {
            return Poll::Ready(Some(Err(BodyError::Closed("reader stalled: its credit was reclaimed".into()))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        let handed_at = match &polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => this.reclaimer.now_ms(),
            _ => WAITING,
        };
        this.entry.handed_at.store(handed_at, Ordering::Release);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.entry.body().as_ref().is_some_and(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.entry.body().as_ref().map_or_else(SizeHint::default, |body| body.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A reclaimer whose connections may hold `per_connection` each, charged 10 per stalled body.
    fn reclaimer(per_connection: u64, per_client: u64, total: u64) -> (Reclaimer, Vec<StallScope>) {
        let limits = StallLimits { stall_after: Duration::from_secs(1), per_connection, per_client, total };
        let reclaimer = Reclaimer::new(limits);
        let scopes = (0..5).map(|_| reclaimer.scope(10)).collect();
        (reclaimer, scopes)
    }

    /// A body that has one chunk, then waits forever.
    fn endless() -> (TunnelBody, tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BodyError>>) {
        let (tx, body) = crate::upgrade::channel_body();
        (body, tx)
    }

    /// The body ends with the reclaim error (never hangs: time is paused, so the timeout fires).
    async fn assert_reclaimed(body: &mut TunnelBody) {
        let next = tokio::time::timeout(Duration::from_secs(60), body.frame()).await.expect("body not reclaimed");
        let err = next.unwrap().unwrap_err();
        assert!(err.to_string().contains("reclaimed"), "{err}");
    }

    async fn stall(scope: &StallScope, client: u8) -> TunnelBody {
        let (body, tx) = endless();
        tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.unwrap();
        std::mem::forget(tx); // the producer never ends the body
        let mut body = scope.watch(body, &[], Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, client))));
        // The reader takes one chunk and never asks again.
        body.frame().await.unwrap().unwrap();
        body
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_stalled_readers_of_a_connection_over_its_budget_are_reclaimed() {
        let (reclaimer, scopes) = reclaimer(20, 0, 1000);
        let mut first = stall(&scopes[1], 1).await;
        tokio::time::advance(Duration::from_millis(10)).await;
        let _second = stall(&scopes[1], 2).await;
        let _third = stall(&scopes[1], 3).await;
        let _elsewhere = stall(&scopes[2], 4).await;
        assert_eq!(reclaimer.sweep(), 0, "nobody is stalled before the stall period");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(reclaimer.sweep(), 1, "connection 1 holds 30 of 20: its oldest goes");
        assert_reclaimed(&mut first).await;
        assert_eq!(reclaimer.sweep(), 0);
        assert_eq!(reclaimer.metrics().stalled.get(), 3);
        assert_eq!(reclaimer.metrics().reclaimed.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_address_over_its_budget_loses_its_own_streams_first() {
        let (reclaimer, scopes) = reclaimer(1000, 20, 1000);
        let _old_other = stall(&scopes[1], 9).await;
        let mut hostile: Vec<TunnelBody> = Vec::new();
        for _ in 0..4 {
            hostile.push(stall(&scopes[1], 1).await);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(reclaimer.sweep(), 2, "the address holds 40 of 20");
        assert_eq!(reclaimer.metrics().stalled.get(), 3, "the other client's older stream stays");
        assert_reclaimed(&mut hostile[0]).await;
        assert_reclaimed(&mut hostile[1]).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_process_budget_holds_across_connections() {
        let (reclaimer, scopes) = reclaimer(1000, 0, 25);
        let mut bodies = Vec::new();
        for (i, scope) in scopes.iter().enumerate() {
            bodies.push(stall(scope, i as u8).await);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(reclaimer.sweep(), 3);
        assert_eq!(reclaimer.metrics().stalled_bytes.get(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_waiting_for_data_is_never_stalled() {
        let (reclaimer, scopes) = reclaimer(0, 0, 0);
        let (body, tx) = endless();
        let mut body = scopes[0].watch(body, &[], None);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await.unwrap();
        body.frame().await.unwrap().unwrap();
        // The reader asks again and waits: the producer is the slow one.
        let waiting = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        assert!(waiting.is_err());
        assert_eq!(reclaimer.sweep(), 0);
        // Dropped bodies leave the watch.
        drop(body);
        assert!(reclaimer.0.entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_declared_small_is_not_watched() {
        let (reclaimer, scopes) = reclaimer(0, 0, 0);
        let small = [quictun_proto::Header { name: "content-length".into(), value: b"1024".to_vec() }];
        let large = [quictun_proto::Header { name: "Content-Length".into(), value: b"1048576".to_vec() }];
        let _small = scopes[0].watch(endless().0, &small, None);
        assert!(reclaimer.0.entries.is_empty());
        let _large = scopes[0].watch(endless().0, &large, None);
        let _unknown = scopes[0].watch(endless().0, &[], None);
        assert_eq!(reclaimer.0.entries.len(), 2);
    }
}
