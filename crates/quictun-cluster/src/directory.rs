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
use std::sync::{Arc, Mutex, PoisonError};
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

/// A relay holding agents of a group, as a relay forwarding to it needs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerRelay {
    /// Its id.
    pub relay_id: String,
    /// Where it is reached.
    pub advertise: String,
    /// Its certificate's fingerprint.
    pub pin: String,
}

/// Every relay's sessions, as last read and watched, and by group the other relays holding one.
#[derive(Debug, Default)]
struct Cache {
    /// Key → holder.
    holders: HashMap<String, Holder>,
    /// Group → the other relays holding one of its agents, each once, by id; only those that
    /// published a pin (the others cannot be dialed). Rebuilt at each change, read per request.
    by_group: HashMap<String, Arc<[PeerRelay]>>,
}

impl Cache {
    /// Rebuilds `by_group` from `holders`, leaving out `own` relay.
    fn reindex(&mut self, own: &str) {
        let mut groups: HashMap<&str, Vec<PeerRelay>> = HashMap::new();
        for holder in self.holders.values().filter(|h| h.relay_id != own && !h.pin.is_empty()) {
            let relays = groups.entry(&holder.group).or_default();
            if !relays.iter().any(|r| r.relay_id == holder.relay_id) {
                relays.push(PeerRelay {
                    relay_id: holder.relay_id.clone(),
                    advertise: holder.advertise.clone(),
                    pin: holder.pin.clone(),
                });
            }
        }
        self.by_group = groups
            .into_iter()
            .map(|(group, mut relays)| {
                relays.sort();
                (group.to_owned(), Arc::from(relays))
            })
            .collect();
    }
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
    /// Every relay's sessions, as last read and watched.
    cache: Mutex<Cache>,
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
            self.cache.lock().unwrap_or_else(PoisonError::into_inner).holders.values().cloned().collect();
        all.sort_by(|a, b| (&a.group, &a.client_id, &a.instance).cmp(&(&b.group, &b.client_id, &b.instance)));
        all
    }

    /// The other relays holding an agent of `group` (each once, sorted by id), when there are any.
    pub fn relays_for(&self, group: &str) -> Option<Arc<[PeerRelay]>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).by_group.get(group).cloned()
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
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.holders = fresh;
            cache.reindex(&self.config.relay_id);
        }
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
                cache.holders.remove(String::from_utf8_lossy(&kv.key).as_ref());
            } else if let Some((key, holder)) = self.holder(&kv) {
                cache.holders.insert(key, holder);
            }
        }
        cache.reindex(&self.config.relay_id);
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

    /// The per-group index a request reads: the other relays, each once, sorted; none without
    /// a pin; this relay never; kept in step with deletes.
    #[test]
    fn the_relays_of_a_group_are_indexed_once_each() {
        let d = directory();
        let value =
            |relay: &str, pin: &str| format!(r#"{{"relay_id":"{relay}","advertise":"{relay}:1","pin":"{pin}"}}"#);
        let events = [
            ("/quictun/sessions/web/a/1", value("r3", "p3")),
            ("/quictun/sessions/web/b/1", value("r2", "p2")),
            ("/quictun/sessions/web/c/1", value("r3", "p3")),
            ("/quictun/sessions/web/d/1", value("r1", "p1")),
            ("/quictun/sessions/web/e/1", value("r4", "")),
            ("/quictun/sessions/api/f/1", value("r2", "p2")),
        ];
        let answer = |kind: i32, keys: &[(&str, String)]| crate::etcd::WatchResponse {
            events: keys.iter().map(|(k, v)| crate::etcd::Event { kind, kv: Some(kv(k, v)) }).collect(),
            ..Default::default()
        };
        d.apply(answer(0, &events));
        let ids = |group: &str| {
            d.relays_for(group).map(|relays| relays.iter().map(|r| r.relay_id.clone()).collect::<Vec<_>>())
        };
        assert_eq!(ids("web"), Some(vec!["r2".to_owned(), "r3".to_owned()]));
        assert_eq!(ids("api"), Some(vec!["r2".to_owned()]));
        assert_eq!(ids("none"), None);
        d.apply(answer(DELETE, &[("/quictun/sessions/web/b/1", String::new())]));
        assert_eq!(ids("web"), Some(vec!["r3".to_owned()]));
        assert_eq!(d.relays_for("web").unwrap()[0].pin, "p3");
    }
}
