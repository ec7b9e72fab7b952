//! The tunnels this agent declares (`[[tunnels]]`, `--http`, `--tcp`): what it claims at the
//! relay ([`Claim`]), and where it sends what the relay then carries to it. An HTTP tunnel is
//! served as a local upstream named by its host; a TCP tunnel's connections arrive as
//! [`quictun_proto::Target::TcpPort`] and go to its target.

use quictun_proto::{Claim, HostPort};

use crate::config::TunnelEntry;
use crate::upstreams::{LocalTargets, Target, declared_target};

/// An HTTP tunnel: requests for `host` go to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTunnel {
    /// The public host name (lower case).
    pub host: String,
    /// The local service.
    pub target: Target,
}

/// A TCP tunnel: connections to the relay's `remote_port` go to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpTunnel {
    /// The relay's port.
    pub remote_port: u16,
    /// The local service.
    pub target: HostPort,
}

/// Every tunnel the agent declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tunnels {
    /// HTTP tunnels, one per host.
    pub http: Vec<HttpTunnel>,
    /// TCP tunnels, one per port.
    pub tcp: Vec<TcpTunnel>,
}

/// A key of `[[tunnels]]` and what is wrong with it.
type Invalid = (String, String);

impl Tunnels {
    /// Validates `entries` (hosts, targets, ports, no host or port twice); errors name the key.
    pub fn from_entries(entries: &[TunnelEntry]) -> Result<Self, Invalid> {
        let mut tunnels = Self::default();
        for (i, entry) in entries.iter().enumerate() {
            let key = |k: &str| format!("tunnels[{i}].{k}");
            match entry {
                TunnelEntry::Http(http) => {
                    let host = http.host.trim().trim_end_matches('.').to_ascii_lowercase();
                    if host.is_empty() || host.contains([':', '/', ' ', '*']) {
                        return Err((key("host"), format!("{host:?} is not a host name")));
                    }
                    if tunnels.http.iter().any(|t| t.host == host) {
                        return Err((key("host"), format!("{host} is declared twice")));
                    }
                    let (ca, name) = (http.ca_file.as_deref(), http.tls_server_name.as_deref());
                    let target = declared_target(&http.target, ca, name, http.insecure_skip_verify)
                        .map_err(|(k, message)| (key(k), message))?;
                    tunnels.http.push(HttpTunnel { host, target });
                }
                TunnelEntry::Tcp(tcp) => {
                    if tcp.remote_port == 0 {
                        return Err((key("remote_port"), "must be a port (1-65535)".into()));
                    }
                    if tunnels.tcp.iter().any(|t| t.remote_port == tcp.remote_port) {
                        return Err((key("remote_port"), format!("port {} is declared twice", tcp.remote_port)));
                    }
                    let target = tcp.target.parse::<HostPort>().map_err(|err| (key("target"), err.to_string()))?;
                    tunnels.tcp.push(TcpTunnel { remote_port: tcp.remote_port, target });
                }
            }
        }
        Ok(tunnels)
    }

    /// True when the agent declares nothing.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.tcp.is_empty()
    }

    /// What the agent claims at the relay, in declaration order (HTTP first).
    pub fn claims(&self) -> Vec<Claim> {
        let http = self.http.iter().map(|t| Claim::Http { host: t.host.clone() });
        http.chain(self.tcp.iter().map(|t| Claim::Tcp { port: t.remote_port })).collect()
    }

    /// The HTTP tunnels as local upstreams, named by their hosts (the name the relay's data
    /// streams give).
    pub fn upstreams(&self) -> impl Iterator<Item = LocalTargets> + '_ {
        self.http.iter().map(|t| LocalTargets { name: t.host.clone(), targets: vec![t.target.clone()] })
    }

    /// Logs a warning for each HTTP tunnel whose `https://` target is not verified.
    pub fn warn_insecure(&self) {
        for t in self.http.iter().filter(|t| t.target.tls().is_some_and(|tls| tls.insecure_skip_verify)) {
            tracing::warn!(host = %t.host, target = %t.target, "insecure_skip_verify: the upstream's certificate is not verified");
        }
    }

    /// Where the connections to the relay's `port` go.
    pub fn tcp_target(&self, port: u16) -> Option<&HostPort> {
        self.tcp.iter().find(|t| t.remote_port == port).map(|t| &t.target)
    }

    /// The local service behind `claim`, for messages.
    pub fn target_of(&self, claim: &Claim) -> Option<String> {
        match claim {
            Claim::Http { host } => self.http.iter().find(|t| &t.host == host).map(|t| t.target.to_string()),
            Claim::Tcp { port } => self.tcp_target(*port).map(ToString::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{HttpTunnelEntry, TcpTunnelEntry};

    fn http(host: &str, target: &str) -> TunnelEntry {
        TunnelEntry::Http(HttpTunnelEntry { host: host.into(), target: target.into(), ..Default::default() })
    }

    fn tcp(remote_port: u16, target: &str) -> TunnelEntry {
        TunnelEntry::Tcp(TcpTunnelEntry { remote_port, target: target.into() })
    }

    #[test]
    fn entries_become_claims_and_upstreams_named_by_host() {
        let entries = [http("App.Example.com.", "http://127.0.0.1:3000"), tcp(2222, "127.0.0.1:22")];
        let tunnels = Tunnels::from_entries(&entries).unwrap();
        assert_eq!(tunnels.claims(), vec![Claim::Http { host: "app.example.com".into() }, Claim::Tcp { port: 2222 }]);
        assert_eq!(tunnels.upstreams().next().unwrap().name, "app.example.com");
        assert_eq!(tunnels.tcp_target(2222).unwrap().to_string(), "127.0.0.1:22");
        assert_eq!(tunnels.tcp_target(2223), None);
    }

    #[test]
    fn bad_entries_name_their_key() {
        let twice = [http("a.example.com", "http://x:1"), http("a.example.com", "http://y:1")];
        assert_eq!(Tunnels::from_entries(&twice).unwrap_err().0, "tunnels[1].host");
        assert_eq!(Tunnels::from_entries(&[http("a.example.com", "ftp://x")]).unwrap_err().0, "tunnels[0].target");
        assert_eq!(Tunnels::from_entries(&[http("*.example.com", "http://x:1")]).unwrap_err().0, "tunnels[0].host");
        assert_eq!(Tunnels::from_entries(&[tcp(0, "x:1")]).unwrap_err().0, "tunnels[0].remote_port");
        assert_eq!(Tunnels::from_entries(&[tcp(1, "no-port")]).unwrap_err().0, "tunnels[0].target");
        let mut plain_with_ca =
            HttpTunnelEntry { host: "a.example.com".into(), target: "http://x:1".into(), ..Default::default() };
        plain_with_ca.ca_file = Some("/nonexistent.pem".into());
        let entry = [TunnelEntry::Http(plain_with_ca.clone())];
        assert_eq!(Tunnels::from_entries(&entry).unwrap_err().0, "tunnels[0].ca_file", "only for https://");
        plain_with_ca.target = "https://x:1".into();
        let (key, message) = Tunnels::from_entries(&[TunnelEntry::Http(plain_with_ca)]).unwrap_err();
        assert_eq!(key, "tunnels[0].ca_file", "an unreadable ca_file is refused at once: {message}");
    }
}
