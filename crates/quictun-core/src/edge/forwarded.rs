//! Forwarding headers: what the relay tells an upstream about the client.
//!
//! The policy, the same on every ingress. From a client that is not a trusted proxy, every
//! `Forwarded`, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Forwarded-Port` and
//! `X-Real-IP` line it sent is dropped (an upstream that reads them would believe the client's
//! claim), and the relay sets its own:
//!
//! | header | value |
//! |---|---|
//! | `X-Forwarded-For` | the client's address |
//! | `X-Forwarded-Proto` | `http` or `https` |
//! | `X-Forwarded-Host` | the host the request was routed on (also its `Host`) |
//!
//! From a trusted proxy (an address in `trusted_proxies`), what it set is kept: the client's
//! address is appended to `X-Forwarded-For` (all its lines joined in order, RFC 9110 §5.3),
//! `X-Forwarded-Proto` and `X-Forwarded-Host` are set only when it sent none, and its
//! `Forwarded`, `X-Forwarded-Port` and `X-Real-IP` pass unchanged.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, header};
use ipnet::IpNet;
use quictun_proto::Header;

use crate::http::{accepts_trailers, connection_listed, is_hop_by_hop, wire_header};

/// The header carrying quictun's request id, to the upstream and back to the client.
pub const REQUEST_ID_HEADER: &str = "x-quictun-request-id";

/// The headers the forwarding policy owns (dropped from untrusted clients).
pub const FORWARDING_HEADERS: [&str; 6] =
    ["forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip"];

/// True for a header the forwarding policy owns.
pub fn is_forwarding_header(name: &HeaderName) -> bool {
    FORWARDING_HEADERS.contains(&name.as_str())
}

/// Which client addresses are proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts these networks (a bare address is a /32 or /128).
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    /// Trusts every client: for the agent's egress listener, whose clients are the machines next
    /// to it (their forwarding headers are extended, not replaced).
    pub fn any() -> Self {
        Self(vec![IpNet::V4(ipnet::Ipv4Net::default()), IpNet::V6(ipnet::Ipv6Net::default())])
    }

    /// Parses `10.0.0.0/8`, `192.0.2.7` or `2001:db8::/32`.
    pub fn parse_network(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{text:?} is not an address or a network (a.b.c.d/n)"))
    }

    /// True when `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl<'de> serde::Deserialize<'de> for TrustedProxies {
    /// A list of addresses and networks; an entry that is neither is an error naming it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        let networks = entries.iter().map(|entry| Self::parse_network(entry)).collect::<Result<Vec<_>, _>>();
        networks.map(Self).map_err(serde::de::Error::custom)
    }
}

/// What the relay knows about one hop: the client and how it reached the relay.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The client's address (the TCP peer).
    pub client: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the request was routed on, as `host[:port]`.
    pub host: &'a str,
}

/// The forwarding headers to send with a request that arrived with `incoming` over `hop`, and
/// whether the incoming ones are to be kept (from a trusted proxy) or dropped. Values never hold
/// a line break (they are addresses, a scheme, a routed host and values that were valid headers).
pub fn forwarding_headers(trusted: &TrustedProxies, incoming: &HeaderMap, hop: &Hop<'_>) -> Forwarding {
    let client = hop.client.to_canonical().to_string();
    if !trusted.contains(hop.client) {
        return Forwarding {
            keep_incoming: false,
            set: vec![
                ("x-forwarded-for", client),
                ("x-forwarded-proto", hop.proto.to_owned()),
                ("x-forwarded-host", hop.host.to_owned()),
            ],
        };
    }
    let lines: Vec<&str> = incoming.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    let chain = if lines.is_empty() { client } else { format!("{}, {client}", lines.join(", ")) };
    let mut set = vec![("x-forwarded-for", chain)];
    if !incoming.contains_key("x-forwarded-proto") {
        set.push(("x-forwarded-proto", hop.proto.to_owned()));
    }
    if !incoming.contains_key("x-forwarded-host") {
        set.push(("x-forwarded-host", hop.host.to_owned()));
    }
    Forwarding { keep_incoming: true, set }
}

/// The outcome of the policy for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    /// Keep the incoming forwarding headers, except `X-Forwarded-For` (replaced by the joined
    /// chain in `set`) and those `set` replaces.
    pub keep_incoming: bool,
    /// Headers to set.
    pub set: Vec<(&'static str, String)>,
}

impl Forwarding {
    /// Whether the incoming header `name` (a forwarding header) goes on.
    pub fn keeps(&self, name: &HeaderName) -> bool {
        self.keep_incoming && !self.set.iter().any(|(set, _)| *set == name.as_str())
    }
}

/// A request's headers as they cross the tunnel, for the ingress and the egress alike: the
/// client's end-to-end headers (without hop-by-hop ones, those its `Connection` lists, its `Host`,
/// its request id, and the forwarding headers the policy drops), then `Host` (the routed host),
/// the forwarding headers of the policy, the request id, and `TE: trailers` when the client
/// accepts trailers.
pub fn tunnel_request_headers(
    trusted: &TrustedProxies,
    headers: &HeaderMap,
    hop: &Hop<'_>,
    request_id: &str,
) -> Vec<Header> {
    let listed = connection_listed(headers);
    let forwarding = forwarding_headers(trusted, headers, hop);
    let mut wire = Vec::with_capacity(headers.len() + 6);
    for (name, value) in headers {
        let ours = *name == header::HOST
            || name == REQUEST_ID_HEADER
            || (is_forwarding_header(name) && !forwarding.keeps(name));
        if !ours && !is_hop_by_hop(name) && !listed.contains(name) {
            wire.push(wire_header(name, value));
        }
    }
    let mut set = |name: &str, value: String| wire.push(Header { name: name.to_owned(), value: value.into_bytes() });
    set("host", hop.host.to_owned());
    for (name, value) in forwarding.set {
        set(name, value);
    }
    set(REQUEST_ID_HEADER, request_id.to_owned());
    if accepts_trailers(headers) {
        set("te", "trailers".to_owned());
    }
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(client: &str) -> Hop<'static> {
        Hop { client: client.parse().unwrap(), proto: "https", host: "app.test" }
    }

    fn incoming(lines: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn get<'a>(forwarding: &'a Forwarding, name: &str) -> Option<&'a str> {
        forwarding.set.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn an_untrusted_client_gets_only_the_relays_values() {
        let spoofed = incoming(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-real-ip", "3.3.3.3"),
            ("forwarded", "for=4.4.4.4"),
            ("x-forwarded-proto", "gopher"),
        ]);
        let f = forwarding_headers(&TrustedProxies::default(), &spoofed, &hop("198.51.100.7"));
        assert!(!f.keep_incoming);
        assert!(!f.keeps(&HeaderName::from_static("x-real-ip")));
        assert_eq!(get(&f, "x-forwarded-for"), Some("198.51.100.7"));
        assert_eq!(get(&f, "x-forwarded-proto"), Some("https"));
        assert_eq!(get(&f, "x-forwarded-host"), Some("app.test"));
        let mapped = forwarding_headers(&TrustedProxies::default(), &HeaderMap::new(), &hop("::ffff:192.0.2.1"));
        assert_eq!(get(&mapped, "x-forwarded-for"), Some("192.0.2.1"), "IPv4-mapped addresses are shown as IPv4");
    }

    #[test]
    fn a_trusted_proxy_keeps_its_chain() {
        let trusted = TrustedProxies::new(vec![
            TrustedProxies::parse_network("10.0.0.0/8").unwrap(),
            TrustedProxies::parse_network("192.0.2.9").unwrap(),
        ]);
        let from_proxy = incoming(&[
            ("x-forwarded-for", "203.0.113.5"),
            ("x-forwarded-for", "192.0.2.9"),
            ("x-real-ip", "203.0.113.5"),
            ("x-forwarded-proto", "https"),
        ]);
        let f = forwarding_headers(&trusted, &from_proxy, &hop("10.1.2.3"));
        assert_eq!(get(&f, "x-forwarded-for"), Some("203.0.113.5, 192.0.2.9, 10.1.2.3"));
        assert_eq!(get(&f, "x-forwarded-proto"), None, "the proxy's own is kept");
        assert_eq!(get(&f, "x-forwarded-host"), Some("app.test"));
        assert!(
            f.keeps(&HeaderName::from_static("x-real-ip")) && f.keeps(&HeaderName::from_static("x-forwarded-proto"))
        );
        assert!(!f.keeps(&HeaderName::from_static("x-forwarded-for")), "replaced by the joined chain");
        assert!(trusted.contains("::ffff:10.9.9.9".parse().unwrap()), "IPv4-mapped addresses match IPv4 networks");
        assert!(TrustedProxies::parse_network("not-an-ip").is_err());
    }
}
