//! Datagrams of a flow: a payload tagged with its flow's id, a QUIC variable-length integer
//! (RFC 9000, 16) in front of the payload, as RFC 9297's context id is. Nothing else is added: a
//! datagram stays one packet.
//!
//! A datagram too large for one packet crosses on its flow's stream instead, framed with a
//! 2-byte big-endian length ([`frame_for_stream`], [`StreamDecoder`]), up to
//! [`MAX_UDP_PAYLOAD`] bytes.

use bytes::{BufMut, Bytes, BytesMut};

/// Which flow of a tunnel a datagram belongs to (a UDP tunnel's client address, say).
pub type FlowId = u64;

/// The largest flow id a varint holds.
pub const MAX_FLOW_ID: FlowId = (1 << 62) - 1;

/// A datagram whose flow id prefix is missing or cut short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("datagram without a whole flow id")]
pub struct TruncatedFlowId;

/// A flow id over [`MAX_FLOW_ID`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow id {0} does not fit a varint")]
pub struct FlowIdTooLarge(pub FlowId);

/// Bytes the prefix of `flow` takes (1, 2, 4 or 8).
pub fn prefix_len(flow: FlowId) -> usize {
    match flow {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    }
}

/// `payload` with `flow`'s prefix in front.
pub fn encode(flow: FlowId, payload: &[u8]) -> Result<Bytes, FlowIdTooLarge> {
    if flow > MAX_FLOW_ID {
        return Err(FlowIdTooLarge(flow));
    }
    let len = prefix_len(flow);
    let mut out = BytesMut::with_capacity(len + payload.len());
    let tag: u64 = match len {
        1 => 0b00,
        2 => 0b01,
        4 => 0b10,
        _ => 0b11,
    };
    let value = (tag << (8 * len - 2)) | flow;
    out.put_uint(value, len);
    out.extend_from_slice(payload);
    Ok(out.freeze())
}

/// The flow id and the payload of a datagram (the payload shares `datagram`'s memory).
pub fn decode(datagram: Bytes) -> Result<(FlowId, Bytes), TruncatedFlowId> {
    let first = *datagram.first().ok_or(TruncatedFlowId)?;
    let len = 1usize << (first >> 6);
    let prefix = datagram.get(..len).ok_or(TruncatedFlowId)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &prefix[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    Ok((value, datagram.slice(len..)))
}

/// The largest UDP payload a flow carries: IPv4's (65,535 less the IP and UDP headers).
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// A datagram over [`MAX_UDP_PAYLOAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("datagram of {0} bytes over the {MAX_UDP_PAYLOAD} a flow carries")]
pub struct DatagramTooLarge(pub usize);

/// `payload` framed for its flow's stream: its length (2 bytes, big-endian), then itself.
pub fn frame_for_stream(payload: &[u8]) -> Result<Bytes, DatagramTooLarge> {
    if payload.len() > MAX_UDP_PAYLOAD {
        return Err(DatagramTooLarge(payload.len()));
    }
    let mut out = BytesMut::with_capacity(2 + payload.len());
    out.put_u16(payload.len() as u16);
    out.extend_from_slice(payload);
    Ok(out.freeze())
}

/// Takes the datagrams out of a flow's stream, whatever the chunks it arrives in. It holds at
/// most one partial datagram besides the chunk being read.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: BytesMut,
}

impl StreamDecoder {
    /// Adds bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
    }

    /// The next whole datagram, `Ok(None)` until one is whole, or an error for a length over
    /// [`MAX_UDP_PAYLOAD`] (the stream is then unusable).
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, DatagramTooLarge> {
        let Some(len) = self.pending.get(..2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
            return Ok(None);
        };
        if len > MAX_UDP_PAYLOAD {
            return Err(DatagramTooLarge(len));
        }
        if self.pending.len() < 2 + len {
            return Ok(None);
        }
        let mut frame = self.pending.split_to(2 + len);
        Ok(Some(frame.split_off(2).freeze()))
    }

    /// Bytes of a datagram not yet whole (0 at a clean end of the stream).
    pub fn partial(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_ids_round_trip_at_every_prefix_length() {
        for flow in [0, 1, 63, 64, 16_383, 16_384, 1_073_741_823, 1_073_741_824, MAX_FLOW_ID] {
            let datagram = encode(flow, b"payload").unwrap();
            assert_eq!(datagram.len(), prefix_len(flow) + 7, "{flow}");
            assert_eq!(decode(datagram).unwrap(), (flow, Bytes::from_static(b"payload")), "{flow}");
        }
        // RFC 9000's own examples (A.1): 37 in one byte, 15,293 in two.
        assert_eq!(&encode(37, b"").unwrap()[..], [0x25]);
        assert_eq!(&encode(15_293, b"").unwrap()[..], [0x7b, 0xbd]);
        assert_eq!(encode(MAX_FLOW_ID + 1, b""), Err(FlowIdTooLarge(MAX_FLOW_ID + 1)));
    }

    #[test]
    fn a_cut_prefix_is_refused() {
        assert_eq!(decode(Bytes::new()), Err(TruncatedFlowId));
        assert_eq!(decode(Bytes::from_static(&[0x40])), Err(TruncatedFlowId));
        assert_eq!(decode(Bytes::from_static(&[0xc0, 0, 0])), Err(TruncatedFlowId));
        assert_eq!(decode(Bytes::from_static(&[0x00])).unwrap(), (0, Bytes::new()));
    }

    #[test]
    fn stream_frames_come_out_whole_whatever_the_chunks() {
        let sizes = [0usize, 1, 1_200, 4_096, MAX_UDP_PAYLOAD];
        let mut wire = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            wire.extend_from_slice(&frame_for_stream(&vec![i as u8; *size]).unwrap());
        }
        for chunk in [1, 7, 1_000, wire.len()] {
            let mut decoder = StreamDecoder::default();
            let mut out = Vec::new();
            for piece in wire.chunks(chunk) {
                decoder.push(piece);
                while let Some(datagram) = decoder.next_datagram().unwrap() {
                    out.push(datagram);
                }
            }
            assert_eq!(out.iter().map(Bytes::len).collect::<Vec<_>>(), sizes, "chunks of {chunk}");
            assert!(out.iter().enumerate().all(|(i, d)| d.iter().all(|b| *b == i as u8)));
            assert_eq!(decoder.partial(), 0);
        }
        assert_eq!(frame_for_stream(&vec![0; MAX_UDP_PAYLOAD + 1]), Err(DatagramTooLarge(MAX_UDP_PAYLOAD + 1)));
        let mut decoder = StreamDecoder::default();
        decoder.push(&[0xff, 0xff, 0]);
        assert_eq!(decoder.next_datagram(), Err(DatagramTooLarge(65_535)));
    }
}
