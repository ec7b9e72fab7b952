//! The relay's part in a cluster (`[cluster]`): its sessions announced in the session directory
//! ([`quictun_cluster::Directory`]), kept in step with the session manager, and the directory
//! kept in sync with etcd, both until the relay shuts down (then its lease is revoked, so the
//! other relays forget its agents at once).
//!
//! A request for a group with no agent here is forwarded to a relay that holds one
//! ([`crate::peers`]); the directory and the links are shown at `/api/cluster` and in the
//! `quictun_cluster_*` metrics.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use quictun_cluster::{Directory, DirectoryConfig, EtcdError};
use tokio_util::sync::CancellationToken;

use quictun_core::stall::Reclaimer;
use quictun_proto::{Limits, Token};
use tokio_util::task::TaskTracker;

use crate::config::ClusterSection;
use crate::peers::Peers;
use crate::sessions::SessionManager;

/// The deadline of each etcd call.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// This relay's view of the cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The session directory.
    pub directory: Arc<Directory>,
    /// 1 while etcd answers (set when the metrics are rendered).
    pub etcd_up: Gauge,
    /// Sessions in the directory, every relay's (set when the metrics are rendered).
    pub sessions: Gauge,
    /// The QUIC-LB server id the relay's connection IDs carry, when it has one.
    pub server_id: Option<quictun_quic::ServerId>,
    /// The links to the other relays, and the cluster's secret.
    pub peers: Peers,
    /// Requests another relay may have forwarded to this one at once.
    pub max_streams_per_peer: u32,
}

/// What a relay brings to its cluster besides its `[cluster]` section.
pub struct Joining<'a> {
    /// The cluster's secret.
    pub token: Token,
    /// The fingerprint of the relay's certificate, published for the others to pin.
    pub pin: String,
    /// Frame limits of the links.
    pub limits: Limits,
    /// Watches bodies on the links for stalled readers.
    pub stall: Reclaimer,
    /// Where the links' watchers run, until `stop`.
    pub tasks: TaskTracker,
    /// When the links end.
    pub stop: CancellationToken,
    /// Where the metrics go.
    pub registry: &'a mut prometheus_client::registry::Registry,
}

impl Cluster {
    /// The cluster of `section`; nothing is dialed until [`Cluster::run`].
    pub fn new(section: &ClusterSection, joining: Joining<'_>) -> Result<Self, EtcdError> {
        let Joining { token, pin, limits, stall, tasks, stop, registry } = joining;
        let directory = Directory::new(DirectoryConfig {
            relay_id: section.relay_id.clone(),
            advertise: section.advertise.clone(),
            pin,
            etcd: section.etcd.clone(),
            prefix: section.prefix.clone(),
            lease_ttl: Duration::from_secs(section.lease_ttl_secs),
            call_timeout: ETCD_CALL_TIMEOUT,
        })?;
        let (etcd_up, sessions) = (Gauge::default(), Gauge::default());
        registry.register("cluster_etcd_up", "1 while etcd answers this relay", etcd_up.clone());
        registry.register(
            "cluster_sessions",
            "Agent sessions in the cluster's directory, every relay's",
            sessions.clone(),
        );
        // Checked when the file was read.
        let server_id = section.server_id.as_deref().and_then(|hex| quictun_quic::ServerId::parse(hex).ok());
        let peers = Peers::new(section.relay_id.clone(), token, limits, stall, tasks, stop);
        peers.metrics.register(registry);
        Ok(Self {
            directory: Arc::new(directory),
            etcd_up,
            sessions,
            server_id,
            peers,
            max_streams_per_peer: section.max_streams_per_peer,
        })
    }

    /// Refreshes the gauges.
    pub fn refresh_metrics(&self) {
        self.etcd_up.set(i64::from(self.directory.is_up()));
        self.sessions.set(i64::try_from(self.directory.holders().len()).unwrap_or(i64::MAX));
    }

    /// Keeps the directory in sync with etcd and with `sessions` until `stop`.
    pub async fn run(directory: Arc<Directory>, sessions: Arc<SessionManager>, stop: CancellationToken) {
        tokio::join!(directory.run(stop.clone()), announce(&directory, &sessions, &stop));
    }
}

/// Announces every session the manager holds, and withdraws those that left, at each change.
async fn announce(directory: &Directory, sessions: &SessionManager, stop: &CancellationToken) {
    let mut changes = sessions.changes();
    let mut announced: HashSet<(Arc<str>, Arc<str>, String)> = HashSet::new();
    loop {
        let now: HashSet<_> =
            sessions.all().iter().map(|s| (s.group.clone(), s.client_id.clone(), s.instance_id.to_string())).collect();
        for (group, client_id, instance) in announced.difference(&now) {
            directory.withdraw(group, client_id, instance);
        }
        for (group, client_id, instance) in now.difference(&announced) {
            directory.announce(group, client_id, instance);
        }
        announced = now;
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}
