//! Forwarding headers: what the relay tells an upstream about the client.
//!
//! The policy, the same on every ingress: from a client that is not a trusted proxy, every
//! `Forwarded`, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`, `X-Forwarded-Port` and
//! `X-Real-IP` line it sent is dropped, and the relay sets its own:
//!
//! | header | value |
//! |---|---|
//! | `X-Forwarded-For` | the client's address |
//! | `X-Forwarded-Proto` | `http` or `https` |
//! | `X-Forwarded-Host` | the host the request was routed on (also its `Host`) |
//! | `X-Forwarded-Port` | the port the client connected to |
//! | `X-Real-IP` | the client's address |
//! | `Forwarded` | `for=…;proto=…;host="…"` (RFC 7239) |
//!
//! From a trusted proxy (an address in `trusted_proxies`), what it set is kept: the relay's
//! element is appended to `X-Forwarded-For` (all lines joined in order) and `Forwarded`, its
//! `X-Forwarded-Proto`/`-Host`/`-Port` are kept when present, and `X-Real-IP` is the rightmost
//! address of the chain that is not itself a trusted proxy (as nginx's `real_ip_recursive`).

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// The headers the forwarding policy owns (dropped from untrusted clients, then set).
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

    /// Parses `10.0.0.0/8`, `192.0.2.7` or `2001:db8::/32`.
    pub fn parse_network(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("{text:?} is not an address or a network (a.b.c.d/n)"))
    }

    /// True when `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
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
    pub client: SocketAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The host the request was routed on, as `host[:port]`.
    pub host: &'a str,
    /// The port the client connected to.
    pub port: u16,
}

/// The forwarding headers to send with a request that arrived with `incoming` over `hop`
/// (names from [`FORWARDING_HEADERS`]; values never contain a line break).
pub fn forwarding_headers(
    trusted: &TrustedProxies,
    incoming: &HeaderMap,
    hop: &Hop<'_>,
) -> Vec<(&'static str, String)> {
    let client = hop.client.ip().to_canonical();
    let ours = forwarded_element(client, hop);
    let port = hop.port.to_string();
    if !trusted.contains(client) {
        let client = client.to_string();
        return vec![
            ("x-forwarded-for", client.clone()),
            ("x-forwarded-proto", hop.proto.to_owned()),
            ("x-forwarded-host", hop.host.to_owned()),
            ("x-forwarded-port", port),
            ("x-real-ip", client),
            ("forwarded", ours),
        ];
    }
    let joined = |name: &str| {
        let values: Vec<&str> = incoming.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        (!values.is_empty()).then(|| values.join(", "))
    };
    let first = |name: &str| incoming.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let chain = match joined("x-forwarded-for") {
        Some(previous) => format!("{previous}, {client}"),
        None => client.to_string(),
    };
    let real = real_client(trusted, &chain).to_string();
    let forwarded = match joined("forwarded") {
        Some(previous) => format!("{previous}, {ours}"),
        None => ours,
    };
    vec![
        ("x-forwarded-for", chain),
        ("x-forwarded-proto", first("x-forwarded-proto").unwrap_or_else(|| hop.proto.to_owned())),
        ("x-forwarded-host", first("x-forwarded-host").unwrap_or_else(|| hop.host.to_owned())),
        ("x-forwarded-port", first("x-forwarded-port").unwrap_or(port)),
        ("x-real-ip", real),
        ("forwarded", forwarded),
    ]
}

/// The relay's `Forwarded` element (RFC 7239): IPv6 nodes and the host are quoted.
fn forwarded_element(client: IpAddr, hop: &Hop<'_>) -> String {
    let node = match client {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    format!("for={node};proto={};host=\"{}\"", hop.proto, hop.host)
}

/// The rightmost address of an `X-Forwarded-For` chain that is not a trusted proxy; the leftmost
/// one when all are (or the last parsable one when a part is not an address).
fn real_client(trusted: &TrustedProxies, chain: &str) -> String {
    let mut last = None;
    for part in chain.rsplit(',').map(str::trim) {
        let Ok(ip) = part.parse::<IpAddr>() else { break };
        last = Some(ip);
        if !trusted.contains(ip) {
            return ip.to_string();
        }
    }
    last.map_or_else(String::new, |ip| ip.to_string())
}

/// A header value from a forwarding string (the inputs are addresses, hosts and header values
/// that were valid already, so this never fails in practice; an invalid one is dropped).
pub fn header_value(value: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(client: &str) -> Hop<'static> {
        Hop { client: client.parse().unwrap(), proto: "https", host: "app.test", port: 8443 }
    }

    fn incoming(lines: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    fn get<'a>(headers: &'a [(&'static str, String)], name: &str) -> &'a str {
        &headers.iter().find(|(n, _)| *n == name).unwrap().1
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
        let h = forwarding_headers(&TrustedProxies::default(), &spoofed, &hop("198.51.100.7:5000"));
        assert_eq!(get(&h, "x-forwarded-for"), "198.51.100.7");
        assert_eq!(get(&h, "x-real-ip"), "198.51.100.7");
        assert_eq!(get(&h, "x-forwarded-proto"), "https");
        assert_eq!(get(&h, "x-forwarded-host"), "app.test");
        assert_eq!(get(&h, "x-forwarded-port"), "8443");
        assert_eq!(get(&h, "forwarded"), "for=198.51.100.7;proto=https;host=\"app.test\"");
        let v6 = forwarding_headers(&TrustedProxies::default(), &HeaderMap::new(), &hop("[2001:db8::1]:5000"));
        assert_eq!(get(&v6, "forwarded"), "for=\"[2001:db8::1]\";proto=https;host=\"app.test\"");
    }

    #[test]
    fn a_trusted_proxy_keeps_its_chain_and_the_real_client_is_found() {
        let trusted = TrustedProxies::new(vec![
            TrustedProxies::parse_network("10.0.0.0/8").unwrap(),
            TrustedProxies::parse_network("192.0.2.9").unwrap(),
        ]);
        let from_proxy = incoming(&[
            ("x-forwarded-for", "203.0.113.5"),
            ("x-forwarded-for", "192.0.2.9"),
            ("forwarded", "for=203.0.113.5"),
            ("x-forwarded-proto", "https"),
        ]);
        let h = forwarding_headers(&trusted, &from_proxy, &hop("10.1.2.3:5000"));
        assert_eq!(get(&h, "x-forwarded-for"), "203.0.113.5, 192.0.2.9, 10.1.2.3");
        assert_eq!(get(&h, "x-real-ip"), "203.0.113.5");
        assert_eq!(get(&h, "forwarded"), "for=203.0.113.5, for=10.1.2.3;proto=https;host=\"app.test\"");
        assert_eq!(get(&h, "x-forwarded-port"), "8443");
        assert!(trusted.contains("::ffff:10.9.9.9".parse().unwrap()), "IPv4-mapped addresses match IPv4 networks");
        assert!(TrustedProxies::parse_network("not-an-ip").is_err());
    }
}
