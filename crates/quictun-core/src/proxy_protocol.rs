//! HAProxy's PROXY protocol headers (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>),
//! so that an upstream behind a TCP or UDP tunnel sees the client's address: version 1 (a text
//! line) and version 2 (binary, which also names datagrams) for TCP, version 2 for UDP, where
//! the header starts every datagram.
//!
//! Both addresses of a header must be of one family: when the client's and the relay's differ,
//! the IPv4 one is written as an IPv4-mapped IPv6 address.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

/// The 12 bytes that start a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Which PROXY protocol header a tunnel writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Version 1: `PROXY TCP4 <client> <relay> <client port> <relay port>\r\n`.
    V1,
    /// Version 2: the binary header.
    V2,
}

/// What the header says the connection carries (version 2's transport nibble).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A TCP connection.
    Stream,
    /// UDP datagrams.
    Datagram,
}

/// The two addresses in one family: IPv4 when both are, else both IPv6.
fn same_family(client: SocketAddr, relay: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |addr: SocketAddr| match addr.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    };
    match (client, relay) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => (client, relay),
        _ => (v6(client), v6(relay)),
    }
}

/// The version 1 header of a TCP connection from `client` to the relay's `relay`.
pub fn v1(client: SocketAddr, relay: SocketAddr) -> Bytes {
    let (client, relay) = same_family(client, relay);
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let line = format!("PROXY {family} {} {} {} {}\r\n", client.ip(), relay.ip(), client.port(), relay.port());
    Bytes::from(line)
}

/// The version 2 header of a connection (or a datagram) from `client` to the relay's `relay`.
pub fn v2(client: SocketAddr, relay: SocketAddr, carried: Carried) -> Bytes {
    let (client, relay) = same_family(client, relay);
    let transport = match carried {
        Carried::Stream => 0x1,
        Carried::Datagram => 0x2,
    };
    let mut out = BytesMut::with_capacity(16 + 36);
    out.put_slice(&V2_SIGNATURE);
    out.put_u8(0x21); // version 2, command PROXY
    match (client.ip(), relay.ip()) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            out.put_u8(0x10 | transport);
            out.put_u16(12);
            out.put_slice(&from.octets());
            out.put_slice(&to.octets());
        }
        (from, to) => {
            out.put_u8(0x20 | transport);
            out.put_u16(36);
            out.put_slice(&v6_octets(from));
            out.put_slice(&v6_octets(to));
        }
    }
    out.put_u16(client.port());
    out.put_u16(relay.port());
    out.freeze()
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        IpAddr::V6(ip) => ip.octets(),
    }
}

/// The header `protocol` gives a TCP connection.
pub fn for_tcp(protocol: ProxyProtocol, client: SocketAddr, relay: SocketAddr) -> Bytes {
    match protocol {
        ProxyProtocol::V1 => v1(client, relay),
        ProxyProtocol::V2 => v2(client, relay, Carried::Stream),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn version_1_is_the_documented_line() {
        let header = v1(addr("192.0.2.7:51000"), addr("198.51.100.1:5432"));
        assert_eq!(&header[..], b"PROXY TCP4 192.0.2.7 198.51.100.1 51000 5432\r\n");
        let header = v1(addr("[2001:db8::7]:51000"), addr("198.51.100.1:5432"));
        assert_eq!(&header[..], b"PROXY TCP6 2001:db8::7 ::ffff:198.51.100.1 51000 5432\r\n");
    }

    #[test]
    fn version_2_parses_with_an_independent_parser() {
        use ppp::v2::{Addresses, Header, Protocol};
        for (client, relay, carried) in [
            ("192.0.2.7:51000", "198.51.100.1:53", Carried::Datagram),
            ("192.0.2.7:51000", "198.51.100.1:5432", Carried::Stream),
            ("[2001:db8::7]:40000", "[2001:db8::1]:53", Carried::Datagram),
            ("[2001:db8::7]:40000", "198.51.100.1:53", Carried::Stream),
        ] {
            let bytes = v2(addr(client), addr(relay), carried);
            let header = Header::try_from(&bytes[..]).unwrap();
            assert_eq!(header.len(), bytes.len());
            let protocol = if carried == Carried::Datagram { Protocol::Datagram } else { Protocol::Stream };
            assert_eq!(header.protocol, protocol);
            let (from, to) = match header.addresses {
                Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                Addresses::IPv6(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                other => panic!("{other:?}"),
            };
            assert_eq!((from, to), same_family(addr(client), addr(relay)), "{client} → {relay}");
        }
    }
}
