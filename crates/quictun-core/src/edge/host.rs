//! The one host of a request: the host the relay routes on is the host the upstream sees.
//!
//! - An absolute-form request target (`GET http://app.test/x HTTP/1.1`) names the host; a `Host`
//!   header beside it is ignored and replaced (RFC 9112 §3.2.2).
//! - In HTTP/2 `:authority` names the host; a `Host` header that names another one makes the
//!   request malformed (RFC 9113 §8.3.1).
//! - Otherwise the single `Host` header names it. None, or more than one, is refused (RFC 9112
//!   §3.2), as is a value that is not a plain `host[:port]` (no user info).

use crate::logsafe::Inert;
use http::uri::Authority;
use http::{HeaderMap, Uri, Version, header};

/// Why a request has no usable host (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No authority in the target and no `Host` header.
    #[error("no Host header")]
    Missing,
    /// More than one `Host` header.
    #[error("more than one Host header")]
    Duplicate,
    /// An HTTP/2 `:authority` and a `Host` header that disagree.
    #[error("Host header {:?} does not match :authority {:?}", Inert(host), Inert(authority))]
    Conflict {
        /// The `:authority`.
        authority: String,
        /// The `Host` header.
        host: String,
    },
    /// A host that is not `host[:port]`.
    #[error("invalid host {:?}", Inert(.0))]
    Invalid(String),
}

/// The authority (`host[:port]`) a request is for, by the rules above.
pub fn request_authority(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<Authority, HostError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(HostError::Duplicate);
    }
    let text = |value: &http::HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned();
    if let Some(authority) = uri.authority() {
        if let Some(host) = host
            && version >= Version::HTTP_2
            && !host.as_bytes().eq_ignore_ascii_case(authority.as_str().as_bytes())
        {
            return Err(HostError::Conflict { authority: authority.to_string(), host: text(host) });
        }
        return plain(authority.clone());
    }
    let host = host.ok_or(HostError::Missing)?;
    let authority = Authority::try_from(host.as_bytes()).map_err(|_| HostError::Invalid(text(host)))?;
    plain(authority)
}

/// Refuses user info (`user@host`) and an empty host.
fn plain(authority: Authority) -> Result<Authority, HostError> {
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(HostError::Invalid(authority.to_string()));
    }
    Ok(authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(version: Version, target: &str, hosts: &[&str]) -> Result<String, HostError> {
        let uri: Uri = target.parse().unwrap();
        let mut headers = HeaderMap::new();
        for host in hosts {
            headers.append(header::HOST, host.parse().unwrap());
        }
        request_authority(version, &uri, &headers).map(|a| a.to_string())
    }

    #[test]
    fn the_host_header_names_the_host_of_an_origin_form_request() {
        assert_eq!(host_of(Version::HTTP_11, "/x", &["app.test:8080"]).unwrap(), "app.test:8080");
        assert_eq!(host_of(Version::HTTP_11, "/x", &[]), Err(HostError::Missing));
        assert_eq!(host_of(Version::HTTP_11, "/x", &["a.test", "b.test"]), Err(HostError::Duplicate));
        assert!(matches!(host_of(Version::HTTP_11, "/x", &["user@a.test"]), Err(HostError::Invalid(_))));
        assert!(matches!(host_of(Version::HTTP_11, "/x", &["a b"]), Err(HostError::Invalid(_))));
    }

    #[test]
    fn an_absolute_form_target_wins_over_the_host_header() {
        assert_eq!(host_of(Version::HTTP_11, "http://app.test/x", &["other.test"]).unwrap(), "app.test");
        assert_eq!(host_of(Version::HTTP_11, "http://app.test/x", &[]).unwrap(), "app.test");
        assert_eq!(host_of(Version::HTTP_11, "http://a.test/x", &["b.test", "c.test"]), Err(HostError::Duplicate));
    }

    #[test]
    fn http2_authority_and_a_different_host_conflict() {
        assert_eq!(host_of(Version::HTTP_2, "http://app.test/x", &[]).unwrap(), "app.test");
        assert_eq!(host_of(Version::HTTP_2, "http://app.test/x", &["APP.test"]).unwrap(), "app.test");
        assert!(matches!(
            host_of(Version::HTTP_2, "http://app.test/x", &["other.test"]),
            Err(HostError::Conflict { .. })
        ));
    }
}
