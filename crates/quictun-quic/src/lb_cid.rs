//! QUIC-LB connection IDs (draft-ietf-quic-load-balancers, the plaintext algorithm): every
//! connection ID a relay issues starts with its server id, so that an L4 load balancer in front
//! of several relays (Katran, Envoy's QUIC-LB support) sends every packet of a connection to the
//! relay that holds it, even after the agent's address changes.
//!
//! ```text
//! | first octet: config rotation (3 bits) | length - 1 (5 bits) | server id | nonce (8) | tag (4) |
//! ```
//!
//! The nonce is an HMAC-SHA256 of a counter under a key derived from the relay's private key
//! (unique per ID, unpredictable and unlinkable without the key); the tag, an HMAC of the octets
//! before it, lets the relay tell its own IDs from others (and from before a restart) without
//! state, as quinn's hashed IDs do. To a load balancer nonce and tag are opaque
//! "server use" octets.

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};

/// The config rotation codepoint of the IDs issued (0: the first configuration).
pub const CONFIG_ROTATION: u8 = 0;
/// The codepoint that marks an ID as not routable by a QUIC-LB load balancer.
pub const UNROUTABLE: u8 = 0b111;
/// The longest server id: 20 octets of ID, less the first octet, the nonce and the tag.
pub const MAX_SERVER_ID: usize = 20 - 1 - NONCE - TAG;
const NONCE: usize = 8;
const TAG: usize = 4;

/// A relay's server id: 1 to [`MAX_SERVER_ID`] octets, unique among the relays behind one load
/// balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerId(Vec<u8>);

impl ServerId {
    /// The id written in hex (`"0a01"` or `"0x0a01"`).
    pub fn parse(hex: &str) -> Result<Self, String> {
        let digits = hex.strip_prefix("0x").unwrap_or(hex);
        if digits.is_empty() || !digits.len().is_multiple_of(2) || digits.len() / 2 > MAX_SERVER_ID {
            return Err(format!("{hex:?}: 1 to {MAX_SERVER_ID} octets in hex (an even number of digits)"));
        }
        let octets = (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| format!("{hex:?} is not hexadecimal"))?;
        Ok(Self(octets))
    }

    /// The octets.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The server id a load balancer reads from `cid`, knowing the ids are `len` octets; `None` for
/// an ID too short or marked unroutable.
pub fn server_id_of(cid: &[u8], len: usize) -> Option<&[u8]> {
    let first = *cid.first()?;
    if first >> 5 == UNROUTABLE {
        return None;
    }
    cid.get(1..1 + len)
}

/// Issues QUIC-LB connection IDs for one relay.
pub(crate) struct LbConnectionIds {
    server_id: ServerId,
    key: ring::hmac::Key,
    /// IDs issued by this generator (the nonce's input, with `salt`).
    issued: u64,
    /// Tells this generator's nonces from those of another (or of the same relay before a
    /// restart) that counts from 0 too.
    salt: [u8; 16],
}

impl LbConnectionIds {
    /// IDs carrying `server_id`, their nonces and tags made under `key`.
    pub(crate) fn new(server_id: ServerId, key: ring::hmac::Key) -> Self {
        let mut salt = [0; 16];
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).is_err() {
            salt = nanos.to_le_bytes();
        }
        Self { server_id, key, issued: 0, salt }
    }

    fn len(&self) -> usize {
        1 + self.server_id.0.len() + NONCE + TAG
    }

    fn first_octet(&self) -> u8 {
        // The length self-description: the ID's length less one, in the low 5 bits.
        (CONFIG_ROTATION << 5) | ((self.len() - 1) as u8 & 0x1f)
    }

    fn tag(&self, octets: &[u8]) -> [u8; TAG] {
        let mac = ring::hmac::sign(&self.key, octets);
        let mut tag = [0; TAG];
        tag.copy_from_slice(&mac.as_ref()[..TAG]);
        tag
    }
}

impl ConnectionIdGenerator for LbConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut id = Vec::with_capacity(self.len());
        id.push(self.first_octet());
        id.extend_from_slice(&self.server_id.0);
        self.issued += 1;
        let input = [&b"nonce"[..], &self.salt, &self.issued.to_le_bytes()].concat();
        id.extend_from_slice(&ring::hmac::sign(&self.key, &input).as_ref()[..NONCE]);
        let tag = self.tag(&id);
        id.extend_from_slice(&tag);
        ConnectionId::new(&id)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let octets: &[u8] = cid;
        let (body, tag) = octets.split_at_checked(self.len().saturating_sub(TAG)).ok_or(InvalidCid)?;
        let ours = octets.len() == self.len()
            && octets[0] == self.first_octet()
            && server_id_of(octets, self.server_id.0.len()) == Some(&self.server_id.0[..])
            && bool::from(subtle::ConstantTimeEq::ct_eq(&self.tag(body)[..], tag));
        if ours { Ok(()) } else { Err(InvalidCid) }
    }

    fn cid_len(&self) -> usize {
        self.len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(id: &str) -> LbConnectionIds {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"test key");
        LbConnectionIds::new(ServerId::parse(id).unwrap(), key)
    }

    #[test]
    fn an_id_starts_with_its_length_and_the_server_id() {
        let mut ids = generator("0x0a01");
        let cid = ids.generate_cid();
        assert_eq!(cid.len(), 1 + 2 + NONCE + TAG);
        assert_eq!(cid[0], (cid.len() - 1) as u8, "config rotation 0, the length less one");
        assert_eq!(server_id_of(&cid, 2), Some(&[0x0a, 0x01][..]));
        assert_eq!(ids.cid_len(), cid.len());
        assert!(ids.validate(&cid).is_ok());
    }

    #[test]
    fn ids_are_distinct_and_only_ours_validate() {
        let mut ids = generator("07");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let cid = ids.generate_cid();
            assert!(seen.insert(cid.to_vec()), "a repeated ID");
            assert_eq!(server_id_of(&cid, 1), Some(&[7][..]));
        }
        let cid = ids.generate_cid();
        for i in 0..cid.len() {
            let mut changed = cid.to_vec();
            changed[i] ^= 0x40;
            assert!(ids.validate(&ConnectionId::new(&changed)).is_err(), "octet {i} changed");
        }
        assert!(generator("08").validate(&cid).is_err(), "another relay's ID");
        let other_key =
            LbConnectionIds::new(ServerId::parse("07").unwrap(), ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k2"));
        assert!(other_key.validate(&cid).is_err(), "the same server id under another key");
        assert!(ids.validate(&ConnectionId::new(&cid[..5])).is_err());
    }

    #[test]
    fn a_load_balancer_reads_the_server_id_and_skips_unroutable_ids() {
        assert_eq!(server_id_of(&[0x0c, 1, 2, 3, 4], 2), Some(&[1, 2][..]));
        assert_eq!(server_id_of(&[0xe0 | 0x0c, 1, 2, 3], 2), None, "config rotation 0b111");
        assert_eq!(server_id_of(&[0x0c, 1], 2), None, "too short");
        assert_eq!(server_id_of(&[], 1), None);
    }

    #[test]
    fn server_ids_are_hex_of_one_to_seven_octets() {
        assert_eq!(ServerId::parse("0x0a01").unwrap().as_bytes(), [0x0a, 0x01]);
        assert_eq!(ServerId::parse("ff").unwrap().as_bytes(), [0xff]);
        for bad in ["", "0x", "abc", "zz", "0102030405060708"] {
            assert!(ServerId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(MAX_SERVER_ID, 7);
    }
}
