//! The agent's upstream table: pushed upstreams merged with local ones, filtered by the allow list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use quictun_proto::AgentConfig;
use tracing::warn;

pub use quictun_core::upstream_http::Target;

/// Checks a target against allow-list entries (`host:port` or `host:*`).
fn allowed(target: &Target, allow: &[String]) -> bool {
    host_port_allowed(target.host(), &target.host_port(), allow)
}

/// Checks `host` (and its `host_port`) against allow-list entries (`host:port` or `host:*`).
pub fn host_port_allowed(host: &str, host_port: &str, allow: &[String]) -> bool {
    allow.iter().any(|entry| match entry.strip_suffix(":*") {
        Some(entry_host) => entry_host.eq_ignore_ascii_case(host),
        None => entry.eq_ignore_ascii_case(host_port),
    })
}

/// Parses a target the agent's file declares, with its TLS keys (`ca_file`, `tls_server_name`,
/// `insecure_skip_verify`, only for `https://`; a `ca_file` is read now); an error names the key.
pub fn declared_target(
    target: &str,
    ca_file: Option<&std::path::Path>,
    server_name: Option<&str>,
    insecure_skip_verify: bool,
) -> Result<Target, (&'static str, String)> {
    let parsed = Target::parse(target).map_err(|err| ("target", err.to_string()))?;
    if parsed.tls().is_none() {
        return match (ca_file, server_name, insecure_skip_verify) {
            (None, None, false) => Ok(parsed),
            (Some(_), ..) => Err(("ca_file", "only for https:// targets".into())),
            (_, Some(_), _) => Err(("tls_server_name", "only for https:// targets".into())),
            _ => Err(("insecure_skip_verify", "only for https:// targets".into())),
        };
    }
    let tls = quictun_core::upstream_tls::UpstreamTls {
        ca_file: ca_file.map(ToOwned::to_owned),
        server_name: server_name.map(ToOwned::to_owned),
        insecure_skip_verify,
    };
    if ca_file.is_some() {
        tls.client_config().map_err(|err| ("ca_file", err.to_string()))?;
    }
    tls.server_name(parsed.host()).map_err(|err| ("tls_server_name", err.to_string()))?;
    parsed.with_tls(tls).map_err(|_| ("target", "not an https:// target".into()))
}

/// A local upstream, its targets parsed once (when the options are validated).
#[derive(Debug, Clone)]
pub struct LocalTargets {
    /// The name routes refer to.
    pub name: String,
    /// Base URLs, tried in rotation.
    pub targets: Vec<Target>,
}

#[derive(Debug)]
struct Upstream {
    targets: Vec<Target>,
    cursor: AtomicUsize,
}

/// Named upstreams the agent serves, at one configuration version.
#[derive(Debug, Default)]
pub struct UpstreamTable {
    version: u64,
    upstreams: HashMap<String, Upstream>,
}

impl UpstreamTable {
    /// Merges the relay's `pushed` configuration with the agent's `local` upstreams (which win on
    /// a name clash). Pushed targets that do not parse, or are not in `allow` when it is set, are
    /// dropped with a warning; pushed `https://` targets are verified with `pushed_ca` when set,
    /// else the system's roots.
    pub fn build(
        pushed: &AgentConfig,
        local: &[LocalTargets],
        allow: Option<&[String]>,
        pushed_ca: Option<&std::path::Path>,
    ) -> Self {
        let pushed_tls =
            quictun_core::upstream_tls::UpstreamTls { ca_file: pushed_ca.map(ToOwned::to_owned), ..Default::default() };
        let mut upstreams = HashMap::new();
        for spec in &pushed.upstreams {
            let targets: Vec<Target> = spec
                .targets
                .iter()
                .filter_map(|t| match Target::parse(t) {
                    Ok(target) if allow.is_none_or(|a| allowed(&target, a)) => {
                        Some(target.with_tls(pushed_tls.clone()).unwrap_or_else(|plain| plain))
                    }
                    Ok(_) => {
                        warn!(upstream = %spec.name, target = %t, "refusing pushed target not in allowed_targets");
                        None
                    }
                    Err(err) => {
                        warn!(upstream = %spec.name, %err, "ignoring pushed target");
                        None
                    }
                })
                .collect();
            if !targets.is_empty() {
                upstreams.insert(spec.name.clone(), Upstream { targets, cursor: AtomicUsize::new(0) });
            }
        }
        for spec in local {
            upstreams
                .insert(spec.name.clone(), Upstream { targets: spec.targets.clone(), cursor: AtomicUsize::new(0) });
        }
        Self { version: pushed.version, upstreams }
    }

    /// The configuration version this table was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The next target of `name` in rotation.
    pub fn next_target(&self, name: &str) -> Option<&Target> {
        let upstream = self.upstreams.get(name)?;
        let n = upstream.targets.len();
        if n == 0 {
            return None;
        }
        Some(&upstream.targets[upstream.cursor.fetch_add(1, Ordering::Relaxed) % n])
    }

    /// Names of the upstreams served.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.upstreams.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quictun_proto::UpstreamSpec;

    fn pushed(targets: &[&str]) -> AgentConfig {
        AgentConfig {
            version: 3,
            upstreams: vec![UpstreamSpec {
                name: "app".into(),
                targets: targets.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn rotation_and_local_precedence() {
        let table = UpstreamTable::build(&pushed(&["http://a:1", "http://b:2"]), &[], None, None);
        assert_eq!(table.version(), 3);
        let first = table.next_target("app").unwrap().host_port();
        let second = table.next_target("app").unwrap().host_port();
        assert_ne!(first, second);
        let local = [LocalTargets { name: "app".into(), targets: vec![Target::parse("http://local:9").unwrap()] }];
        let table = UpstreamTable::build(&pushed(&["http://a:1"]), &local, None, None);
        assert_eq!(table.next_target("app").unwrap().host_port(), "local:9");
        assert!(table.next_target("other").is_none());
    }

    #[test]
    fn allow_list_refuses_pushed_targets() {
        let allow = vec!["127.0.0.1:3000".to_owned(), "svc:*".to_owned()];
        let table = UpstreamTable::build(
            &pushed(&["http://10.0.0.5:22", "http://svc:8080", "http://127.0.0.1:3000"]),
            &[],
            Some(&allow),
            None,
        );
        let picked: Vec<String> = (0..4).map(|_| table.next_target("app").unwrap().host_port()).collect();
        assert!(!picked.iter().any(|p| p.starts_with("10.")), "{picked:?}");
        let none = UpstreamTable::build(&pushed(&["http://10.0.0.5:22"]), &[], Some(&allow), None);
        assert!(none.next_target("app").is_none());
    }
}
