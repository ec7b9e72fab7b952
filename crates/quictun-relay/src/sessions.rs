//! The session manager: client_id → its live instances (one session each), group → connected
//! agents.
//!
//! Agent processes that share a client_id (replicas of one deployment) are instances of it, told
//! apart by the instance id each process draws at start: they serve side by side, as siblings in
//! their group. A new session of an instance already present (the same process reconnecting)
//! replaces (and closes) that instance's old one. Removal is keyed by session id, so a replaced
//! session's late cleanup never removes its successor.
//! Nothing is held across an `.await`, and the two maps are never locked at the same time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use quictun_core::tunnel::Tunnel;
use quictun_proto::{AgentConfig, ClaimAnswer, CloseCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use uuid::Uuid;

use crate::balance::Choice;

/// The agents a request may go to: a group's (the relay's routes and `[[tcp]]` tunnels), or the
/// holders of a tunnel agents declared.
#[derive(Debug, Clone)]
pub enum Pool {
    /// Every agent of the group.
    Group(Arc<str>),
    /// The agents holding a declared tunnel.
    Holders(Arc<Holders>),
}

impl Pool {
    /// The group's name, or the declared tunnel's (for logs and errors).
    pub fn name(&self) -> &Arc<str> {
        match self {
            Self::Group(name) => name,
            Self::Holders(holders) => &holders.name,
        }
    }
}

/// The sessions holding one declared tunnel, in the order they claimed it; they share its
/// requests as a group's agents share a route's.
#[derive(Debug)]
pub struct Holders {
    name: Arc<str>,
    members: std::sync::RwLock<Vec<Arc<Session>>>,
    cursor: AtomicUsize,
}

impl Holders {
    /// No holder yet, for the tunnel called `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self { name: name.into(), members: Default::default(), cursor: AtomicUsize::new(0) }
    }

    /// Adds `session` (once).
    pub fn join(&self, session: &Arc<Session>) {
        let mut members = self.members.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !members.iter().any(|s| s.session_id == session.session_id) {
            members.push(session.clone());
        }
    }

    /// Removes the session; true when no holder is left.
    pub fn leave(&self, session_id: Uuid) -> bool {
        let mut members = self.members.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        members.retain(|s| s.session_id != session_id);
        members.is_empty()
    }

    /// The holders, in claim order.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.read().clone()
    }

    /// The holders' client ids, in claim order.
    pub fn client_ids(&self) -> Vec<Arc<str>> {
        self.read().iter().map(|s| s.client_id.clone()).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Session>>> {
        self.members.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A command for a session's control task.
#[derive(Debug, Clone)]
pub enum SessionCommand {
    /// Push a new configuration.
    ConfigSync(AgentConfig),
    /// Tell the agent of claims the relay no longer grants (after a reload).
    ClaimAnswers(Vec<ClaimAnswer>),
}

/// One registered agent connection.
#[derive(Debug)]
pub struct Session {
    /// The agent's identity.
    pub client_id: Arc<str>,
    /// The agent process (one of possibly several replicas of `client_id`).
    pub instance_id: Uuid,
    /// The group it serves.
    pub group: Arc<str>,
    /// Unique per connection.
    pub session_id: Uuid,
    /// The tunnel to the agent.
    pub tunnel: Arc<dyn Tunnel>,
    /// When the session registered.
    pub connected_at: SystemTime,
    streams: Arc<Semaphore>,
    max_streams: u32,
    /// The share of `streams` long-lived and uploading exchanges may hold.
    bulk: Arc<Semaphore>,
    max_bulk: u32,
    rtt_us: AtomicU64,
    draining: AtomicBool,
    commands: mpsc::Sender<SessionCommand>,
    health: Health,
    flows: std::sync::OnceLock<Arc<quictun_core::flows::FlowTable>>,
}

/// Which of an agent's stream budgets an exchange draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A request without a body: short by nature, and always left a share of the streams.
    Request,
    /// What may hold its stream long or be paced by its client: a request with a body, an
    /// upgrade, a TCP tunnel connection. These share `max_bulk_streams`.
    Bulk,
}

/// An agent's stream budget that was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FullBudget {
    /// Every stream of the agent is in use.
    #[error("all {max} streams of the agent are in use (max_streams_per_agent)")]
    Streams {
        /// The agent's streams.
        max: u32,
    },
    /// The share for uploads, upgrades and TCP tunnels is in use; requests without a body
    /// still have the rest.
    #[error(
        "the agent's {max} streams (of {of}) for uploads, upgrades and TCP tunnels are in use (bulk_stream_percent)"
    )]
    Bulk {
        /// The share.
        max: u32,
        /// The agent's streams.
        of: u32,
    },
}

/// One stream's place on an agent (and in its bulk share, for a bulk exchange), given back when
/// dropped.
#[derive(Debug)]
pub struct StreamPermit {
    _stream: OwnedSemaphorePermit,
    _bulk: Option<OwnedSemaphorePermit>,
}

/// `datagrams_moved_ms` before the first look.
const NOT_LOOKED_AT: u64 = u64::MAX;

/// Silence after which an agent is suspect by default (`relay.silence_check_ms`): its
/// keep-alive interval (1 s) and a margin.
#[cfg(test)]
pub const SILENT_AFTER: Duration = Duration::from_millis(1250);

/// What a session is made with, from the relay's settings.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Streams (requests in flight) on it at once.
    pub max_streams: u32,
    /// Of those, streams that [`StreamKind::Bulk`] exchanges may hold at once (at most
    /// `max_streams`): the rest stays for requests without a body.
    pub max_bulk_streams: u32,
    /// The heartbeat interval: two missed ones mean its heartbeats lag.
    pub heartbeat_interval: Duration,
    /// Silence after which it is suspect (`None`: never).
    pub silent_after: Option<Duration>,
}

/// Consecutive failed exchanges after which an agent is put in cooldown.
pub const FAILURES_BEFORE_COOLDOWN: u32 = 3;
/// How long an agent stays out after repeated failures.
pub const COOLDOWN: Duration = Duration::from_secs(10);

/// Failures, cooldown and heartbeat freshness of one session (milliseconds since `origin`).
#[derive(Debug)]
struct Health {
    origin: tokio::time::Instant,
    failures: AtomicU64,
    cooldown_until_ms: AtomicU64,
    last_heard_ms: AtomicU64,
    lag_limit: Duration,
    /// The peer's datagram count when last looked at, and when it last moved.
    datagrams: AtomicU64,
    datagrams_moved_ms: AtomicU64,
    went_silent: tokio::sync::Notify,
    /// Whether the last look found it silent.
    seen_silent: AtomicBool,
    /// Silence after which it is suspect (`None`: never).
    silent_after: Option<Duration>,
}

/// What one look at a session's datagram count found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heard from recently, as before.
    Heard,
    /// Heard from again after a silence.
    HeardAgain,
    /// Silent for this long, and it was already.
    Silent(Duration),
    /// Silent for this long: it has just crossed the silence limit.
    WentSilent(Duration),
}

impl Health {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl Session {
    /// A session for a registered connection; `commands` reaches its control task.
    pub fn new(
        client_id: &str,
        instance_id: Uuid,
        group: &str,
        tunnel: Arc<dyn Tunnel>,
        limits: SessionLimits,
        commands: mpsc::Sender<SessionCommand>,
    ) -> Self {
        let SessionLimits { max_streams, max_bulk_streams, heartbeat_interval, silent_after } = limits;
        let max_bulk = max_bulk_streams.clamp(1, max_streams.max(1));
        Self {
            client_id: Arc::from(client_id),
            instance_id,
            group: Arc::from(group),
            session_id: Uuid::new_v4(),
            tunnel,
            connected_at: SystemTime::now(),
            streams: Arc::new(Semaphore::new(max_streams as usize)),
            max_streams,
            bulk: Arc::new(Semaphore::new(max_bulk as usize)),
            max_bulk,
            rtt_us: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            commands,
            flows: std::sync::OnceLock::new(),
            health: Health {
                origin: tokio::time::Instant::now(),
                failures: AtomicU64::new(0),
                cooldown_until_ms: AtomicU64::new(0),
                last_heard_ms: AtomicU64::new(0),
                // A heartbeat is answered within an interval; two missed ones mean trouble.
                lag_limit: heartbeat_interval * 2,
                datagrams: AtomicU64::new(0),
                datagrams_moved_ms: AtomicU64::new(NOT_LOOKED_AT),
                went_silent: tokio::sync::Notify::new(),
                seen_silent: AtomicBool::new(false),
                silent_after,
            },
        }
    }

    /// Records that the agent said something on its control stream.
    pub fn heard(&self) {
        self.health.last_heard_ms.store(self.health.now_ms(), Ordering::Relaxed);
    }

    /// Records an exchange the agent completed.
    pub fn record_success(&self) {
        self.health.failures.store(0, Ordering::Relaxed);
    }

    /// Records a failed exchange; after `FAILURES_BEFORE_COOLDOWN` in a row the agent is left
    /// out for `COOLDOWN` (while a healthy agent of its group exists).
    pub fn record_failure(&self) {
        let failures = self.health.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= u64::from(FAILURES_BEFORE_COOLDOWN) {
            self.health.failures.store(0, Ordering::Relaxed);
            let until = self.health.now_ms() + u64::try_from(COOLDOWN.as_millis()).unwrap_or(u64::MAX);
            self.health.cooldown_until_ms.store(until, Ordering::Relaxed);
            tracing::warn!(client_id = %self.client_id, ?COOLDOWN, "agent failing repeatedly: cooling down");
        }
    }

    /// How much longer the agent stays in cooldown, when it is in one.
    pub fn cooldown_left(&self) -> Option<Duration> {
        let left = self.health.cooldown_until_ms.load(Ordering::Relaxed).saturating_sub(self.health.now_ms());
        (left > 0).then(|| Duration::from_millis(left))
    }

    /// False while the agent is in cooldown, its heartbeats lag, or it has gone silent.
    pub fn is_healthy(&self) -> bool {
        let now = self.health.now_ms();
        let lagging = now.saturating_sub(self.health.last_heard_ms.load(Ordering::Relaxed))
            > u64::try_from(self.health.lag_limit.as_millis()).unwrap_or(u64::MAX);
        now >= self.health.cooldown_until_ms.load(Ordering::Relaxed) && !lagging && self.silent_at(now).is_none()
    }

    /// Looks at the tunnel's datagram count (see [`crate::liveness`]) and says what changed; wakes
    /// [`Session::went_silent`] waiters when the agent has just gone silent.
    pub fn observe_datagrams(&self) -> Liveness {
        let now = self.health.now_ms();
        match self.tunnel.datagrams_received() {
            Some(count) if count == self.health.datagrams.load(Ordering::Relaxed) => {}
            Some(count) => {
                self.health.datagrams.store(count, Ordering::Relaxed);
                self.health.datagrams_moved_ms.store(now, Ordering::Relaxed);
            }
            // The transport does not count (gRPC: HTTP/2 PINGs watch the peer instead).
            None => self.health.datagrams_moved_ms.store(now, Ordering::Relaxed),
        }
        let silent = self.silent_for();
        let was_silent = self.health.seen_silent.swap(silent.is_some(), Ordering::Relaxed);
        match (was_silent, silent) {
            (false, None) => Liveness::Heard,
            (true, None) => Liveness::HeardAgain,
            (true, Some(silent)) => Liveness::Silent(silent),
            (false, Some(silent)) => {
                self.health.went_silent.notify_waiters();
                Liveness::WentSilent(silent)
            }
        }
    }

    /// Resolves once the agent is silent (see [`Session::silent_for`]).
    pub async fn went_silent(&self) {
        loop {
            let notified = self.health.went_silent.notified();
            if self.silent_for().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// How long nothing has arrived from the agent, once that is over the silence limit
    /// (`relay.silence_check_ms`): it sends at least a keep-alive each second, so it is likely
    /// gone, and the balancer leaves it out (while a sibling answers) until it is heard again or
    /// declared dead.
    pub fn silent_for(&self) -> Option<Duration> {
        self.silent_at(self.health.now_ms())
    }

    /// [`Session::silent_for`] at `now_ms` (one clock read serves every check of a choice).
    fn silent_at(&self, now_ms: u64) -> Option<Duration> {
        let limit = self.health.silent_after?;
        let moved = self.health.datagrams_moved_ms.load(Ordering::Relaxed);
        if moved == NOT_LOOKED_AT {
            return None;
        }
        let silent = Duration::from_millis(now_ms.saturating_sub(moved));
        (silent > limit).then_some(silent)
    }

    /// The agent's address as the relay sees it.
    pub fn remote(&self) -> SocketAddr {
        self.tunnel.remote_addr()
    }

    /// The session's UDP flows, made on first use (its DATAGRAM frames' reader is spawned on
    /// `tasks` then, where the tunnel has them; it ends with the tunnel).
    pub fn flow_table(
        &self,
        metrics: &Arc<quictun_core::flows::UdpMetrics>,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Arc<quictun_core::flows::FlowTable> {
        self.flows
            .get_or_init(|| {
                let table = quictun_core::flows::FlowTable::new(self.tunnel.clone(), metrics.clone());
                if matches!(self.tunnel.datagram_support(), quictun_core::tunnel::DatagramSupport::Native { .. }) {
                    // Ends when the tunnel closes.
                    tasks.spawn(table.clone().read_datagrams());
                }
                table
            })
            .clone()
    }

    /// UDP flows open on this session now.
    pub fn udp_flows(&self) -> usize {
        self.flows.get().map_or(0, |table| table.len())
    }

    /// A slot for one more in-flight stream of `kind`, or the budget that is full (answer 503
    /// at once).
    pub fn try_stream_permit(&self, kind: StreamKind) -> Result<StreamPermit, FullBudget> {
        let bulk = match kind {
            StreamKind::Request => None,
            StreamKind::Bulk => Some(
                self.bulk
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| FullBudget::Bulk { max: self.max_bulk, of: self.max_streams })?,
            ),
        };
        let stream =
            self.streams.clone().try_acquire_owned().map_err(|_| FullBudget::Streams { max: self.max_streams })?;
        Ok(StreamPermit { _stream: stream, _bulk: bulk })
    }

    /// Streams in flight now.
    pub fn in_flight(&self) -> u32 {
        self.max_streams.saturating_sub(self.streams.available_permits() as u32)
    }

    /// The last heartbeat round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Records a heartbeat round-trip time.
    pub fn set_rtt(&self, rtt: Duration) {
        self.rtt_us.store(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    /// Marks the session as draining: it takes no new requests.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// True when the session can take new requests.
    pub fn is_available(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.tunnel.is_closed()
    }

    /// Queues a command for the control task; false when its queue is full or it has ended.
    pub fn command(&self, cmd: SessionCommand) -> bool {
        self.commands.try_send(cmd).is_ok()
    }
}

/// A registration refused because its client has as many instances as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{connected} instances of this client are connected already")]
pub struct TooManyInstances {
    /// Instances connected.
    pub connected: usize,
}

#[derive(Debug, Default)]
struct Group {
    members: Vec<Arc<Session>>,
    cursor: AtomicUsize,
}

/// All live sessions, by client (each instance's) and by group.
#[derive(Debug)]
pub struct SessionManager {
    by_client: DashMap<Arc<str>, Vec<Arc<Session>>>,
    by_group: DashMap<Arc<str>, Group>,
    generation: watch::Sender<u64>,
}

impl Default for SessionManager {
    fn default() -> Self {
        Self { by_client: DashMap::new(), by_group: DashMap::new(), generation: watch::Sender::new(0) }
    }
}

impl SessionManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a session. A previous session of the same client instance is removed and its
    /// connection closed with [`CloseCode::Replaced`]; it is returned. Other instances of the
    /// client stay, up to `max_instances` in all: a new instance beyond that is refused (and the
    /// count returned), atomically with the others' registrations.
    ///
    /// The new session is in place (as its instance's and in its group) before the old connection
    /// is closed, so whoever reacts to that close sees the finished state.
    pub fn insert(
        &self,
        session: Arc<Session>,
        max_instances: usize,
    ) -> Result<Option<Arc<Session>>, TooManyInstances> {
        let old = {
            let mut instances = self.by_client.entry(session.client_id.clone()).or_default();
            let connected = instances.len();
            match instances.iter_mut().find(|s| s.instance_id == session.instance_id) {
                Some(slot) => Some(std::mem::replace(slot, session.clone())),
                None if connected >= max_instances => return Err(TooManyInstances { connected }),
                None => {
                    instances.push(session.clone());
                    None
                }
            }
        };
        self.by_group.entry(session.group.clone()).or_default().members.push(session);
        if let Some(old) = &old {
            self.remove_from_group(old);
        }
        self.bump();
        if let Some(old) = &old {
            old.tunnel.close(CloseCode::Replaced);
        }
        Ok(old)
    }

    /// Removes `session` if it is still the current one for its instance. Returns whether it was.
    pub fn remove(&self, session: &Session) -> bool {
        let removed = match self.by_client.get_mut(&session.client_id) {
            Some(mut instances) => {
                let before = instances.len();
                instances.retain(|s| s.session_id != session.session_id);
                instances.len() < before
            }
            None => false,
        };
        self.by_client.remove_if(&session.client_id, |_, instances| instances.is_empty());
        self.remove_from_group(session);
        self.bump();
        removed
    }

    fn remove_from_group(&self, session: &Session) {
        if let Some(mut group) = self.by_group.get_mut(&session.group) {
            group.members.retain(|s| s.session_id != session.session_id);
        }
        self.by_group.remove_if(&session.group, |_, g| g.members.is_empty());
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// A session of `group` chosen by `choice` (see the balance module; the default choice
    /// rotates over the group's healthy members).
    pub fn choose(&self, group: &str, choice: &Choice<'_>) -> Option<Arc<Session>> {
        let group = self.by_group.get(group)?;
        let cursor = group.cursor.fetch_add(1, Ordering::Relaxed);
        crate::balance::choose(&group.members, cursor, choice)
    }

    /// A session of `pool` chosen by `choice`, as [`SessionManager::choose`] does for a group.
    pub fn choose_in(&self, pool: &Pool, choice: &Choice<'_>) -> Option<Arc<Session>> {
        match pool {
            Pool::Group(group) => self.choose(group, choice),
            Pool::Holders(holders) => {
                let cursor = holders.cursor.fetch_add(1, Ordering::Relaxed);
                crate::balance::choose(&holders.read(), cursor, choice)
            }
        }
    }

    /// How many sessions `pool` has.
    pub fn pool_len(&self, pool: &Pool) -> usize {
        match pool {
            Pool::Group(group) => self.group_len(group),
            Pool::Holders(holders) => holders.read().len(),
        }
    }

    /// The most recent session of a client (of its most recently connected instance).
    pub fn get(&self, client_id: &str) -> Option<Arc<Session>> {
        self.by_client.get(client_id).and_then(|instances| instances.last().cloned())
    }

    /// The live sessions of a client, one per instance, oldest first.
    pub fn instances(&self, client_id: &str) -> Vec<Arc<Session>> {
        self.by_client.get(client_id).map(|instances| instances.clone()).unwrap_or_default()
    }

    /// Whether `instance_id` of `client_id` has a live session.
    pub fn has_instance(&self, client_id: &str, instance_id: Uuid) -> bool {
        self.by_client.get(client_id).is_some_and(|instances| instances.iter().any(|s| s.instance_id == instance_id))
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.by_client.iter().map(|instances| instances.len()).sum()
    }

    /// True when no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Every live session (a snapshot).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.by_client.iter().flat_map(|e| e.value().clone()).collect()
    }

    /// A receiver that changes whenever a session enters or leaves.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many sessions a group has.
    pub fn group_len(&self, group: &str) -> usize {
        self.by_group.get(group).map_or(0, |g| g.members.len())
    }

    /// The sessions of a group (a snapshot).
    pub fn group(&self, group: &str) -> Vec<Arc<Session>> {
        self.by_group.get(group).map(|g| g.members.clone()).unwrap_or_default()
    }

    /// Waits until `pred` holds, re-checking after every change; false on timeout.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let mut changes = self.generation.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if pred(self) {
                    return;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }
}

impl crate::balance::Candidate for Session {
    fn id(&self) -> Uuid {
        self.session_id
    }

    fn name(&self) -> &str {
        &self.client_id
    }

    fn instance(&self) -> Uuid {
        self.instance_id
    }

    fn is_available(&self) -> bool {
        Session::is_available(self)
    }

    fn is_healthy(&self) -> bool {
        Session::is_healthy(self)
    }

    fn in_flight(&self) -> u32 {
        Session::in_flight(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_tunnel::{FakeTunnel, session_on};
    use std::sync::{Mutex, OnceLock};

    #[test]
    fn bulk_exchanges_cannot_take_the_streams_kept_for_requests() {
        let (commands, _) = mpsc::channel(1);
        let limits = SessionLimits {
            max_streams: 4,
            max_bulk_streams: 3,
            heartbeat_interval: Duration::from_secs(60),
            silent_after: None,
        };
        let session = Session::new("a", Uuid::new_v4(), "g", Arc::new(FakeTunnel::default()), limits, commands);
        let bulk: Vec<_> = (0..3).map(|_| session.try_stream_permit(StreamKind::Bulk).unwrap()).collect();
        let full = session.try_stream_permit(StreamKind::Bulk).unwrap_err();
        assert_eq!(full, FullBudget::Bulk { max: 3, of: 4 });
        assert!(full.to_string().contains("3 streams (of 4) for uploads, upgrades and TCP tunnels"), "{full}");
        let request = session.try_stream_permit(StreamKind::Request).unwrap();
        assert_eq!(session.try_stream_permit(StreamKind::Request).unwrap_err(), FullBudget::Streams { max: 4 });
        assert_eq!(session.in_flight(), 4);
        drop(request);
        drop(bulk);
        assert_eq!(session.in_flight(), 0);
        assert!(session.try_stream_permit(StreamKind::Bulk).is_ok(), "the places come back");
    }

    /// What the manager looked like when a replaced connection was closed.
    #[derive(Debug, PartialEq)]
    struct SeenAtClose {
        current: Option<uuid::Uuid>,
        group: Vec<uuid::Uuid>,
    }

    #[tokio::test]
    async fn a_replaced_connection_is_closed_only_after_its_successor_is_in_place() {
        let manager = Arc::new(SessionManager::new());
        let seen = Arc::new(Mutex::new(None));
        let watcher: Arc<OnceLock<Arc<SessionManager>>> = Arc::new(OnceLock::new());
        let on_close = {
            let (seen, watcher) = (seen.clone(), watcher.clone());
            move |code: CloseCode| {
                assert_eq!(code, CloseCode::Replaced);
                let Some(m) = watcher.get() else { return };
                let group = m.group("web").iter().map(|s| s.session_id).collect();
                *seen.lock().unwrap() = Some(SeenAtClose { current: m.get("agent-1").map(|s| s.session_id), group });
            }
        };
        let first =
            session_on("agent-1", "web", FakeTunnel { on_close: Some(Box::new(on_close)), ..FakeTunnel::default() });
        let other = session_on("agent-2", "web", FakeTunnel::default());
        assert!(manager.insert(first.clone(), 8).unwrap().is_none());
        assert!(manager.insert(other.clone(), 8).unwrap().is_none());
        let _ = watcher.set(manager.clone());

        let second = session_on("agent-1", "web", FakeTunnel::default());
        let old = manager.insert(second.clone(), 8).unwrap().expect("the first session is replaced");
        assert_eq!(old.session_id, first.session_id);
        let expected =
            SeenAtClose { current: Some(second.session_id), group: vec![other.session_id, second.session_id] };
        assert_eq!(seen.lock().unwrap().take(), Some(expected));

        // The replaced session's own cleanup, arriving late, takes nothing from its successor.
        assert!(!manager.remove(&first));
        assert_eq!(manager.len(), 2);
        assert_eq!(manager.group_len("web"), 2);
        assert!(manager.remove(&second) && manager.remove(&other));
        assert!(manager.is_empty() && manager.group("web").is_empty());
    }
}
