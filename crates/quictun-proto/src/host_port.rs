//! `host:port`, parsed once: where a TCP tunnel connects, in configuration and on the wire.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest host name accepted (DNS names are at most 253 bytes).
const MAX_HOST: usize = 253;

/// A host (a DNS name, an IPv4 address, or an IPv6 address without brackets) and a port.
/// Written `host:port`, or `[v6]:port`; it travels on the wire in that form and is checked again
/// when decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    host: String,
    port: u16,
}

/// Why a `host:port` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host:port")]
pub struct HostPortError(pub String);

impl HostPort {
    /// The host, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The same host with another port.
    pub fn with_port(&self, port: u16) -> Self {
        Self { host: self.host.clone(), port }
    }
}

impl FromStr for HostPort {
    type Err = HostPortError;

    fn from_str(text: &str) -> Result<Self, HostPortError> {
        let refuse = || HostPortError(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(refuse)?;
        let port: u16 = port.parse().map_err(|_| refuse())?;
        let host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.strip_suffix(']').filter(|h| h.contains(':')).ok_or_else(refuse)?,
            // An IPv6 address needs its brackets, or the port could not be told apart.
            None if host.contains(':') => return Err(refuse()),
            None => host,
        };
        let valid = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%');
        if port == 0 || host.is_empty() || host.len() > MAX_HOST || !host.bytes().all(valid) {
            return Err(refuse());
        }
        Ok(Self { host: host.to_owned(), port })
    }
}

impl From<std::net::SocketAddr> for HostPort {
    fn from(addr: std::net::SocketAddr) -> Self {
        Self { host: addr.ip().to_string(), port: addr.port() }
    }
}

impl TryFrom<String> for HostPort {
    type Error = HostPortError;

    fn try_from(text: String) -> Result<Self, HostPortError> {
        text.parse()
    }
}

impl From<HostPort> for String {
    fn from(target: HostPort) -> String {
        target.to_string()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_parse_and_print_back() {
        for text in ["db.internal:5432", "127.0.0.1:22", "[::1]:8080", "[fe80::1%eth0]:80"] {
            let parsed: HostPort = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
        let v6: HostPort = "[::1]:8080".parse().unwrap();
        assert_eq!((v6.host(), v6.port()), ("::1", 8080));
    }

    #[test]
    fn what_is_not_host_port_is_refused() {
        for text in
            ["", "db", "db:", ":22", "db:0", "db:65536", "db:x", "::1:80", "[::1]", "[db]:80", "a b:80", "a/b:80"]
        {
            assert!(text.parse::<HostPort>().is_err(), "{text:?} accepted");
        }
    }
}
