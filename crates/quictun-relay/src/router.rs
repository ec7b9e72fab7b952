//! Host and path routing: the first route whose host and path prefix match wins.
//!
//! Hosts match case-insensitively without the port. `*.example.com` matches any name ending in
//! `.example.com` (at any depth) but not `example.com` itself; `*` matches every host. A path
//! prefix matches on segment boundaries: `/api` matches `/api` and `/api/x`, not `/apix`; a prefix
//! ending in `/` matches any path under it.

use std::sync::Arc;

use tokio::sync::Semaphore;

use quictun_core::upstream_http::Target;

use crate::balance::Balance;
pub use crate::hosts::HostMatch;
use crate::sessions::{Holders, Pool};

use crate::config::{ConfigError, RelayConfig};

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    host: HostMatch,
    path_prefix: String,
    /// The upstream name carried in the stream head.
    pub upstream: Arc<str>,
    /// The agents that serve the upstream: a group's, or a declared tunnel's holders.
    pub pool: Pool,
    /// Slots for requests in flight on this route, when it is limited.
    pub in_flight: Option<Arc<Semaphore>>,
    /// How many slots `in_flight` has.
    in_flight_limit: u32,
    /// The largest request body this route accepts.
    pub max_body_bytes: Option<u64>,
    /// How the upstream's requests are spread over its group.
    pub balance: Balance,
    /// The header hashed by [`Balance::Hash`].
    pub hash_header: Option<http::HeaderName>,
    /// What the route checks before dispatch, and the headers it rewrites.
    pub policies: Arc<crate::policies::Policies>,
}

impl Route {
    /// The route of an HTTP tunnel declared for `host`: every path, to the upstream named by
    /// the host (the agents know it by that name), through its holders.
    pub fn declared(host: &str, holders: Arc<Holders>) -> Self {
        Self {
            host: HostMatch::Exact(host.to_owned()),
            path_prefix: "/".into(),
            upstream: Arc::from(host),
            pool: Pool::Holders(holders),
            in_flight: None,
            in_flight_limit: 0,
            max_body_bytes: None,
            balance: Balance::RoundRobin,
            hash_header: None,
            policies: Arc::default(),
        }
    }

    /// True for a route that matches every host (`host = "*"`): a host an agent declared
    /// comes before it.
    pub fn matches_every_host(&self) -> bool {
        self.host == HostMatch::Any
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The routing table built from a validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Shared, so that a request holds its route past a reload for a reference count.
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Compiles the routes of `config`; a route naming no upstream, or an upstream whose hash
    /// header is not a header name, is an error naming the key.
    pub fn new(config: &RelayConfig) -> Result<Self, ConfigError> {
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let Some((j, upstream)) = config.upstreams.iter().enumerate().find(|(_, u)| u.name == r.upstream) else {
                return Err(
                    config.invalid(format!("routes[{i}].upstream"), format!("no upstream named {:?}", r.upstream))
                );
            };
            let hash_header = match (&upstream.hash_header, upstream.balance) {
                (Some(name), _) => Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    config.invalid(format!("upstreams[{j}].hash_header"), format!("{name:?} is not a header name"))
                })?),
                (None, Balance::Hash) => {
                    return Err(
                        config.invalid(format!("upstreams[{j}].hash_header"), "hash balancing needs a hash_header")
                    );
                }
                (None, _) => None,
            };
            let policies = crate::policies::Policies::compile(r)
                .map_err(|(key, why)| config.invalid(format!("routes[{i}].{key}"), why))?;
            routes.push(Arc::new(Route {
                host: HostMatch::parse(&r.host),
                path_prefix: r.path_prefix.clone(),
                upstream: Arc::from(upstream.name.as_str()),
                pool: Pool::Group(Arc::from(upstream.group.as_str())),
                in_flight: r.max_in_flight.map(|n| Arc::new(Semaphore::new(n as usize))),
                in_flight_limit: r.max_in_flight.unwrap_or(0),
                max_body_bytes: r.max_body_bytes,
                balance: upstream.balance,
                hash_header,
                policies: Arc::new(policies),
            }));
        }
        Ok(Self { routes })
    }

    /// Whether a route names `host` (lower case, no port) itself or by a wildcard: such a host
    /// is the relay's, and no agent may declare it.
    pub fn names_host(&self, host: &str) -> bool {
        self.routes.iter().any(|r| r.host != HostMatch::Any && r.host.matches(host))
    }

    /// The routes in the order they are tried, as the admin endpoint shows them.
    pub fn views(&self) -> Vec<RouteView> {
        self.routes
            .iter()
            .map(|r| RouteView {
                host: r.host.pattern(),
                path_prefix: r.path_prefix.clone(),
                upstream: r.upstream.to_string(),
                group: r.pool.name().to_string(),
                max_in_flight: r.in_flight.as_ref().map(|_| r.in_flight_limit),
                policies: r.policies.names(),
            })
            .collect()
    }

    /// The first route matching `host` (any case, port ignored) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let host = normalize_host(host);
        self.routes.iter().find(|r| r.host.matches(&host) && prefix_matches(&r.path_prefix, path))
    }
}

/// A route as `/api/routes` shows it.
#[derive(Debug, serde::Serialize)]
pub struct RouteView {
    /// The host pattern: `*`, `*.example.com` or a host name.
    pub host: String,
    /// The path prefix.
    pub path_prefix: String,
    /// The upstream it names.
    pub upstream: String,
    /// The group serving it.
    pub group: String,
    /// Its `max_in_flight`, when it has one.
    pub max_in_flight: Option<u32>,
    /// The policies it checks and the rewrites it makes (`basic_auth`, `allow_ips`, …).
    pub policies: Vec<&'static str>,
}

/// One compiled egress route.
#[derive(Debug, Clone)]
pub struct EgressRoute {
    host: HostMatch,
    path_prefix: String,
    /// Where matching requests go.
    pub target: Target,
    /// The groups allowed to use it; empty: every group.
    groups: Vec<String>,
}

impl EgressRoute {
    /// Whether agents of `group` may use this route.
    pub fn allows(&self, group: &str) -> bool {
        self.groups.is_empty() || self.groups.iter().any(|g| g == group)
    }
}

/// The egress routing table: requests from agents, by host and path, to targets the relay reaches.
#[derive(Debug, Clone, Default)]
pub struct EgressRouter {
    routes: Vec<EgressRoute>,
}

impl EgressRouter {
    /// Compiles the egress routes of `config`; a target that is not a URL is an error naming
    /// the key.
    pub fn new(config: &RelayConfig) -> Result<Self, ConfigError> {
        let mut routes = Vec::with_capacity(config.egress_routes.len());
        for (i, r) in config.egress_routes.iter().enumerate() {
            let target = Target::parse(&r.target)
                .map_err(|e| config.invalid(format!("egress_routes[{i}].target"), e.to_string()))?;
            routes.push(EgressRoute {
                host: HostMatch::parse(&r.host),
                path_prefix: r.path_prefix.clone(),
                target,
                groups: r.groups.clone(),
            });
        }
        Ok(Self { routes })
    }

    /// The first egress route matching `host` (any case, port ignored) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&EgressRoute> {
        let host = normalize_host(host);
        self.routes.iter().find(|r| r.host.matches(&host) && prefix_matches(&r.path_prefix, path))
    }
}

/// Lower-cases a host and strips its port (keeping IPv6 brackets intact).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        &host[..end + 2]
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let text = format!(
            "[[upstreams]]\nname = \"a\"\ngroup = \"ga\"\ntargets = [\"http://x\"]\n\
             [[upstreams]]\nname = \"b\"\ngroup = \"gb\"\ntargets = [\"http://y\"]\n{routes}"
        );
        Router::new(&RelayConfig::parse(&text, Path::new("t.toml")).unwrap()).unwrap()
    }

    fn upstream<'a>(r: &'a Router, host: &str, path: &str) -> Option<&'a str> {
        r.route(host, path).map(|r| &*r.upstream)
    }

    #[test]
    fn exact_wildcard_and_first_match() {
        let r = router(
            "[[routes]]\nhost = \"app.example.com\"\npath_prefix = \"/api\"\nupstream = \"b\"\n\
             [[routes]]\nhost = \"*.example.com\"\nupstream = \"a\"\n",
        );
        assert_eq!(upstream(&r, "app.example.com", "/api/v1"), Some("b"));
        assert_eq!(upstream(&r, "APP.example.com:8080", "/api"), Some("b"));
        assert_eq!(upstream(&r, "app.example.com", "/apix"), Some("a"));
        assert_eq!(upstream(&r, "x.y.example.com", "/"), Some("a"));
        assert_eq!(upstream(&r, "example.com", "/"), None);
        assert_eq!(upstream(&r, "other.org", "/"), None);
    }

    #[test]
    fn star_matches_any_host() {
        let r = router("[[routes]]\nhost = \"*\"\nupstream = \"a\"\n");
        assert_eq!(upstream(&r, "anything", "/x"), Some("a"));
    }

    #[test]
    fn egress_routes_match_host_and_path_and_check_the_group() {
        let text = "[[egress_routes]]\nhost = \"api.partner.test\"\npath_prefix = \"/v1\"\ntarget = \"http://10.0.0.1:80\"\ngroups = [\"web\"]\n\
                    [[egress_routes]]\nhost = \"*\"\ntarget = \"h2c://10.0.0.2:80\"\n";
        let r = EgressRouter::new(&RelayConfig::parse(text, Path::new("t.toml")).unwrap()).unwrap();
        let first = r.route("API.partner.test:443", "/v1/users").unwrap();
        assert_eq!(first.target.host_port(), "10.0.0.1:80");
        assert!(first.allows("web") && !first.allows("api"));
        let fallback = r.route("api.partner.test", "/v2").unwrap();
        assert!(fallback.target.http2() && fallback.allows("api"));
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Example.COM:80"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("example.com."), "example.com");
    }
}
