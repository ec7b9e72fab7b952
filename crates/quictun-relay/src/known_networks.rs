//! The networks agents registered from (IPv4 /24, IPv6 /48, see
//! [`crate::admission::network_of`]): a new connection from one of them may take a place in the
//! lane of pending places kept for them, so that after a restart under attack the fleet comes
//! back. Kept in memory (at most [`MAX_KNOWN`]) and, best-effort, in a file beside the relay's
//! certificate, one network per line, so that a restarted relay knows them before the first
//! agent returns. A file that cannot be read or written costs the lane, never the relay.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::admission::network_of;

/// The most networks remembered; past it, new ones are not added (the lane stays for the first).
pub const MAX_KNOWN: usize = 4096;

/// How long after a new network the file is written: a fleet registering at once is one write.
const WRITE_AFTER: Duration = Duration::from_secs(1);

/// The networks agents registered from.
#[derive(Debug, Default)]
pub struct KnownNetworks {
    networks: Mutex<HashSet<IpAddr>>,
    file: Option<PathBuf>,
    changed: Notify,
    /// A network was added since the file was last written.
    unwritten: AtomicBool,
}

impl KnownNetworks {
    /// The networks in `file` (none when it is `None`, missing or unreadable: a warning).
    pub fn load(file: Option<PathBuf>) -> Arc<Self> {
        let mut networks = HashSet::new();
        if let Some(path) = &file {
            match std::fs::read_to_string(path) {
                Ok(text) => networks.extend(parse(&text)),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => warn!(path = %path.display(), %err, "could not read the known agent networks"),
            }
        }
        debug!(known = networks.len(), "known agent networks");
        Arc::new(Self {
            networks: Mutex::new(networks),
            file,
            changed: Notify::new(),
            unwritten: AtomicBool::new(false),
        })
    }

    /// True when `ip` is in a network an agent registered from.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.lock().contains(&network_of(ip))
    }

    /// Notes that an agent registered from `ip`.
    pub fn note(&self, ip: IpAddr) {
        let mut networks = self.lock();
        if networks.len() < MAX_KNOWN && networks.insert(network_of(ip)) {
            drop(networks);
            self.unwritten.store(true, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<IpAddr>> {
        self.networks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the file after each change (a second after the first of a burst), and what is
    /// unwritten when `stop` comes, then returns.
    pub async fn keep_written(self: Arc<Self>, stop: CancellationToken) {
        let Some(path) = self.file.clone() else { return };
        loop {
            let stopping = tokio::select! {
                () = self.changed.notified() => false,
                () = stop.cancelled() => true,
            };
            if !stopping {
                tokio::select! {
                    () = tokio::time::sleep(WRITE_AFTER) => {}
                    () = stop.cancelled() => {}
                }
            }
            if self.unwritten.swap(false, Ordering::Relaxed) {
                self.write(&path).await;
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    async fn write(&self, path: &Path) {
        let text = self.lock().iter().map(|n| format!("{n}\n")).collect::<String>();
        let target = path.to_owned();
        match tokio::task::spawn_blocking(move || write_replacing(&target, &text)).await {
            Ok(Ok(())) => debug!(path = %path.display(), "known agent networks written"),
            Ok(Err(err)) => warn!(path = %path.display(), %err, "could not write the known agent networks"),
            Err(err) => warn!(%err, "the known agent networks writer failed"),
        }
    }
}

/// The networks of a file's lines; lines that are not an address are skipped.
fn parse(text: &str) -> impl Iterator<Item = IpAddr> + '_ {
    text.lines().filter_map(|line| line.trim().parse::<IpAddr>().ok()).map(network_of).take(MAX_KNOWN)
}

/// Writes `text` to a temporary file beside `path`, then renames it over `path`: a reader never
/// sees half a file.
fn write_replacing(path: &Path, text: &str) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn networks_are_remembered_across_a_restart_through_the_file() {
        let dir = std::env::temp_dir().join(format!("quictun-known-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent-networks");
        std::fs::write(&file, "203.0.113.0\nnot an address\n").unwrap();
        let known = KnownNetworks::load(Some(file.clone()));
        assert!(known.contains("203.0.113.77".parse().unwrap()));
        let stop = CancellationToken::new();
        let writer = tokio::spawn(known.clone().keep_written(stop.clone()));
        known.note("198.51.100.9".parse().unwrap());
        known.note("2001:db8:5:6::1".parse().unwrap());
        assert!(known.contains("198.51.100.200".parse().unwrap()));
        assert!(known.contains("2001:db8:5:ffff::9".parse().unwrap()), "the same /48");
        assert!(!known.contains("192.0.2.1".parse().unwrap()));
        stop.cancel();
        writer.await.unwrap();
        let again = KnownNetworks::load(Some(file.clone()));
        for ip in ["203.0.113.1", "198.51.100.1", "2001:db8:5::1"] {
            assert!(again.contains(ip.parse().unwrap()), "{ip} after the restart");
        }
        assert!(!KnownNetworks::load(None).contains("198.51.100.1".parse().unwrap()));
        let _ = std::fs::remove_dir_all(dir);
    }
}
