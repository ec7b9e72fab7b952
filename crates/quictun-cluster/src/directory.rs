//! The session directory: which relay holds which agent.
//!
//! Each relay writes one key per agent session it holds,
//! `{prefix}sessions/{group}/{client_id}/{instance}` → `{"relay_id", "advertise", "pin"}`, under one
//! lease of `lease_ttl` (10 s) that it renews every third of it; it deletes a key when its agent
//! leaves, and revokes the lease when it stops. A relay that dies stops renewing: etcd deletes its
//! keys when the lease ends.
//!
//! Each relay also watches the whole prefix into a local cache (read first, then watched from the
//! revision read), so a request never waits on etcd. When etcd cannot be reached the relay keeps
//! its cache and serves from it, says so in a log line and in [`Directory::is_up`], and retries
//! with a growing delay (up to 5 s); when it answers again the relay writes its sessions anew
//! under a new lease (the old one may have expired) and reads the directory again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::{DELETE, Etcd, EtcdError, KeyValue};

/// How a relay joins the directory.
#[derive(Debug, Clone)]
pub struct DirectoryConfig {
    /// This relay's id, unique in the cluster.
    pub relay_id: String,
    /// Where other relays reach this one (QUIC, `host:port`).
    pub advertise: String,
    /// The fingerprint of this relay's certificate (`sha256:…`), which the others pin.
    pub pin: String,
    /// etcd's endpoints.
    pub etcd: Vec<String>,
    /// The key prefix (`/quictun/`).
    pub prefix: String,
    /// The lease's time to live.
    pub lease_ttl: Duration,
    /// The deadline of each etcd call.
    pub call_timeout: Duration,
}

/// A relay holding an agent session, as the directory says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    /// The agent's client id.
    pub client_id: String,
    /// The agent process.
    pub instance: String,
    /// Its group.
    pub group: String,
    /// The relay holding its session.
    pub relay_id: String,
    /// Where that relay is reached.
    pub advertise: String,
    /// That relay's certificate fingerprint (empty when it published none: it cannot be dialed).
    pub pin: String,
}

/// The value of a directory key.
#[derive(Debug, Serialize, Deserialize)]
struct Value {
    relay_id: String,
    advertise: String,
    #[serde(default)]
    pin: String,
}

/// What the relay writes, and what it has read.
#[derive(Debug)]
pub struct Directory {
    config: DirectoryConfig,
    etcd: Etcd,
    /// This relay's sessions: key → value (to write again under a new lease).
    local: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Set when `local` changed since it was last written.
    wake: Notify,
    /// Every relay's sessions, as last read and watched: key → holder.
    cache: Mutex<HashMap<String, Holder>>,
    up: AtomicBool,
}

/// The longest wait between two attempts to reach etcd.
const MAX_RETRY: Duration = Duration::from_secs(5);

impl Directory {
    /// The directory of `config`; nothing is dialed until [`Directory::run`].
    pub fn new(config: DirectoryConfig) -> Result<Self, EtcdError> {
        let etcd = Etcd::new(&config.etcd, config.call_timeout)?;
        Ok(Self {
            config,
            etcd,
            local: Mutex::default(),
            wake: Notify::new(),
            cache: Mutex::default(),
            up: AtomicBool::new(false),
        })
    }

    /// This relay's id.
    pub fn relay_id(&self) -> &str {
        &self.config.relay_id
    }

    fn key(&self, group: &str, client_id: &str, instance: &str) -> String {
        format!("{}sessions/{group}/{client_id}/{instance}", self.config.prefix)
    }

    /// Says this relay holds a session of `client_id` (process `instance`) in `group`.
    pub fn announce(&self, group: &str, client_id: &str, instance: &str) {
        let config = &self.config;
        let value =
            Value { relay_id: config.relay_id.clone(), advertise: config.advertise.clone(), pin: config.pin.clone() };
        let value = serde_json::to_vec(&value).unwrap_or_default();
        self.local.lock().unwrap_or_else(PoisonError::into_inner).insert(self.key(group, client_id, instance), value);
        self.wake.notify_one();
    }

    /// Says this relay no longer holds that session.
    pub fn withdraw(&self, group: &str, client_id: &str, instance: &str) {
        self.local.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key(group, client_id, instance));
        self.wake.notify_one();
    }

    /// Whether etcd answered the last call (the cache is current).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Every session the directory holds (this relay's too), sorted.
    pub fn holders(&self) -> Vec<Holder> {
        let mut all: Vec<Holder> =
            self.cache.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        all.sort_by(|a, b| (&a.group, &a.client_id, &a.instance).cmp(&(&b.group, &b.client_id, &b.instance)));
        all
    }

    /// The other relays holding an agent of `group`.
    pub fn relays_for(&self, group: &str) -> Vec<Holder> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.values().filter(|h| h.group == group && h.relay_id != self.config.relay_id).cloned().collect()
    }

    /// Keeps the directory until `stop`: writes this relay's sessions, renews the lease, watches
    /// the others; on an etcd failure, retries (the cache stays as it was). On `stop` the lease is
    /// revoked, so the other relays forget this one's agents at once.
    pub async fn run(&self, stop: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut lease = None;
            let ended = tokio::select! {
                _ = stop.cancelled() => Ok(()),
                ended = self.session(&mut lease) => ended,
            };
            if stop.is_cancelled() {
                if let Some(id) = lease {
                    let _ = tokio::time::timeout(self.config.call_timeout, self.etcd.revoke(id)).await;
                }
                return;
            }
            if let Err(err) = ended {
                if self.up.swap(false, Ordering::Relaxed) {
                    warn!(%err, "etcd unreachable: serving from the cached session directory");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }

    /// One connected spell: a lease, this relay's keys, the cache read and watched; returns on
    /// the first failure. `lease` is set as soon as one is granted.
    async fn session(&self, lease: &mut Option<i64>) -> Result<(), EtcdError> {
        let (id, ttl) = self.etcd.grant(self.config.lease_ttl).await?;
        *lease = Some(id);
        let mut keep_alive = self.etcd.keep_alive(id).await?;
        let mut written = BTreeMap::new();
        self.write(id, &mut written).await?;
        let prefix = format!("{}sessions/", self.config.prefix);
        let (kvs, revision) = self.etcd.range_prefix(prefix.as_bytes()).await?;
        let fresh: HashMap<String, Holder> = kvs.iter().filter_map(|kv| self.holder(kv)).collect();
        let count = fresh.len();
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
        let mut watch = self.etcd.watch_prefix(prefix.as_bytes(), revision + 1).await?;
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(relay_id = %self.config.relay_id, sessions = count, lease = id, "session directory in sync with etcd");
        }
        let mut renew = tokio::time::interval((ttl / 3).max(Duration::from_millis(500)));
        renew.tick().await;
        loop {
            tokio::select! {
                _ = renew.tick() => { keep_alive.beat().await?; }
                _ = self.wake.notified() => self.write(id, &mut written).await?,
                answer = watch.next() => self.apply(answer?),
            }
        }
    }

    /// Writes what changed in this relay's sessions since `written` (which it updates).
    async fn write(&self, lease: i64, written: &mut BTreeMap<String, Vec<u8>>) -> Result<(), EtcdError> {
        let local = self.local.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for (key, value) in &local {
            if written.get(key) != Some(value) {
                self.etcd.put(key.as_bytes(), value, lease).await?;
                written.insert(key.clone(), value.clone());
            }
        }
        let gone: Vec<String> = written.keys().filter(|k| !local.contains_key(*k)).cloned().collect();
        for key in gone {
            self.etcd.delete(key.as_bytes()).await?;
            written.remove(&key);
        }
        Ok(())
    }

    /// Applies a watch answer's events to the cache.
    fn apply(&self, answer: crate::etcd::WatchResponse) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        for event in answer.events {
            let Some(kv) = event.kv else { continue };
            if event.kind == DELETE {
                cache.remove(String::from_utf8_lossy(&kv.key).as_ref());
            } else if let Some((key, holder)) = self.holder(&kv) {
                cache.insert(key, holder);
            }
        }
    }

    /// A directory key and its holder; `None` for a key or value not in the directory's shape.
    fn holder(&self, kv: &KeyValue) -> Option<(String, Holder)> {
        let key = std::str::from_utf8(&kv.key).ok()?;
        let rest = key.strip_prefix(&self.config.prefix)?.strip_prefix("sessions/")?;
        let mut parts = rest.splitn(3, '/');
        let (group, client_id, instance) = (parts.next()?, parts.next()?, parts.next()?);
        let value: Value = serde_json::from_slice(&kv.value).ok()?;
        let holder = Holder {
            client_id: client_id.to_owned(),
            instance: instance.to_owned(),
            group: group.to_owned(),
            relay_id: value.relay_id,
            advertise: value.advertise,
            pin: value.pin,
        };
        Some((key.to_owned(), holder))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        Directory::new(DirectoryConfig {
            relay_id: "r1".into(),
            advertise: "10.0.0.1:4433".into(),
            pin: "sha256:00".into(),
            etcd: vec!["127.0.0.1:1".into()],
            prefix: "/quictun/".into(),
            lease_ttl: Duration::from_secs(10),
            call_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.as_bytes().to_vec(), mod_revision: 1, value: value.as_bytes().to_vec(), lease: 0 }
    }

    #[test]
    fn keys_parse_into_holders_and_others_are_ignored() {
        let d = directory();
        let (_, h) =
            d.holder(&kv("/quictun/sessions/web/office-1/abc", r#"{"relay_id":"r2","advertise":"x:1"}"#)).unwrap();
        assert_eq!((h.group.as_str(), h.client_id.as_str(), h.instance.as_str()), ("web", "office-1", "abc"));
        assert_eq!((h.relay_id.as_str(), h.advertise.as_str()), ("r2", "x:1"));
        assert!(d.holder(&kv("/other/sessions/web/a/b", r#"{"relay_id":"r2","advertise":"x"}"#)).is_none());
        assert!(d.holder(&kv("/quictun/sessions/web/a", r#"{"relay_id":"r2","advertise":"x"}"#)).is_none());
        assert!(d.holder(&kv("/quictun/sessions/web/a/b", "not json")).is_none());
    }

    #[test]
    fn announced_sessions_wait_to_be_written() {
        let d = directory();
        d.announce("web", "office-1", "i1");
        d.announce("web", "office-2", "i2");
        d.withdraw("web", "office-1", "i1");
        let local = d.local.lock().unwrap().clone();
        assert_eq!(local.keys().collect::<Vec<_>>(), ["/quictun/sessions/web/office-2/i2"]);
        assert!(!d.is_up());
    }
}
