//! Host names and host patterns: the patterns routes and `allow_hosts` match with, and the
//! names an agent may declare.

/// How a route (or a client's `allow_hosts` entry) matches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `*`: every host.
    Any,
    /// One host name.
    Exact(String),
    /// The suffix, including its leading dot.
    Wildcard(String),
}

impl HostMatch {
    /// A route's pattern: `*`, `*.` and a suffix, or a host name (any case).
    pub fn parse(pattern: &str) -> Self {
        let pattern = pattern.trim().to_ascii_lowercase();
        if pattern == "*" {
            Self::Any
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            Self::Wildcard(suffix.to_owned())
        } else {
            Self::Exact(pattern)
        }
    }

    /// A pattern a client's `allow_hosts` may hold: a host name, or `*.` and a host name (not
    /// `*` alone, which would let a client claim every host).
    pub fn parse_pattern(pattern: &str) -> Result<Self, String> {
        let name = pattern.strip_prefix("*.").unwrap_or(pattern);
        host_name(name).map_err(|err| format!("{pattern:?}: {err}"))?;
        Ok(Self::parse(pattern))
    }

    /// The pattern as a route names it: `*`, `*.example.com` or `example.com`.
    pub fn pattern(&self) -> String {
        match self {
            Self::Any => "*".to_owned(),
            Self::Exact(name) => name.clone(),
            Self::Wildcard(suffix) => format!("*{suffix}"),
        }
    }

    /// Whether `host` (lower case, no port) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(name) => name == host,
            Self::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

/// Checks a declared host name: lower-case letters, digits, `-` and `.`, in labels of 1 to 63,
/// at most 253 in all.
pub fn host_name(host: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err("not a lower-case host name (letters, digits, '-' and '.')".into());
    }
    Ok(())
}
