//! Length-prefixed bincode frames.
//!
//! A frame is a 4-byte big-endian payload length followed by that many bytes of bincode (standard
//! configuration, varint integers). Decoders check the length against the caller's limit before
//! allocating, tell an incomplete buffer ([`decode`] returns `Ok(None)`) from an invalid one, and
//! refuse trailing bytes inside a frame.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{Serialize, de::DeserializeOwned};

use crate::limits::MAX_FRAME_BYTES;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_BYTES>>;

fn wire_config() -> WireConfig {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix (or an encoded message) exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The claimed or encoded length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The payload decoded, but bytes were left over.
    #[error("malformed frame: {0} trailing bytes")]
    TrailingBytes(usize),
    /// The message could not be serialized.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

/// Encodes `msg` as one frame (length prefix included), refusing results over `max` payload bytes.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; LEN_PREFIX];
    bincode::serde::encode_into_std_write(msg, &mut out, wire_config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - LEN_PREFIX;
    let max = max.min(MAX_FRAME_BYTES);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, max })?;
    out[..LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Encodes `msg` without a length prefix (for carriers that frame messages themselves), refusing
/// results over `max` bytes.
pub fn encode_payload<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut bytes = encode(msg, max)?;
    bytes.drain(..LEN_PREFIX);
    Ok(bytes)
}

/// Decodes a payload that arrived without a length prefix, checking its size against `max` first.
pub fn decode_bounded<T: DeserializeOwned>(payload: &[u8], max: usize) -> Result<T, FrameError> {
    let max = max.min(MAX_FRAME_BYTES);
    if payload.len() > max {
        return Err(FrameError::TooLarge { len: payload.len(), max });
    }
    decode_payload(payload)
}

/// Reads a length prefix and checks it against `max` (and the hard ceiling) before anything is
/// allocated for the payload.
pub fn payload_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    let max = max.min(MAX_FRAME_BYTES);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a payload (the bytes after the length prefix). Every byte must be used.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) =
        bincode::serde::decode_from_slice(payload, wire_config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Checks whether `buf` starts with a whole frame, allocating nothing.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some(n))`: the first `n` bytes are one frame.
pub fn check(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = payload_len(*prefix, max)?;
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    Ok(Some(LEN_PREFIX + len))
}

/// Decodes the first frame of `buf`: `Ok(None)` when incomplete, else the message and the number of
/// bytes it used.
pub fn decode<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<Option<(T, usize)>, FrameError> {
    match check(buf, max)? {
        None => Ok(None),
        Some(n) => decode_payload(&buf[LEN_PREFIX..n]).map(|msg| Some((msg, n))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ControlMessage, Heartbeat};

    fn heartbeat() -> ControlMessage {
        ControlMessage::Heartbeat(Heartbeat { seq: 7, sent_at_us: 42, rtt_us: Some(300) })
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let bytes = encode(&heartbeat(), 1024).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode::<ControlMessage>(&bytes[..cut], 1024), Ok(None), "cut at {cut}");
        }
        let (msg, used) = decode::<ControlMessage>(&bytes, 1024).unwrap().unwrap();
        assert_eq!(msg, heartbeat());
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn huge_length_prefix_is_refused_before_allocation() {
        let buf = [0xff, 0xff, 0xff, 0xff, 0];
        assert_eq!(check(&buf, 1024), Err(FrameError::TooLarge { len: u32::MAX as usize, max: 1024 }));
    }

    #[test]
    fn limit_is_capped_by_the_hard_ceiling() {
        let len = (MAX_FRAME_BYTES + 1) as u32;
        assert!(payload_len(len.to_be_bytes(), usize::MAX).is_err());
    }

    #[test]
    fn garbage_payload_is_malformed() {
        let mut buf = vec![0, 0, 0, 3];
        buf.extend_from_slice(&[0xfe, 0xfe, 0xfe]);
        assert!(matches!(decode::<ControlMessage>(&buf, 1024), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&heartbeat(), 1024).unwrap();
        bytes.push(0);
        let len = (bytes.len() - LEN_PREFIX) as u32;
        bytes[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode::<ControlMessage>(&bytes, 1024), Err(FrameError::TrailingBytes(1)));
    }

    #[test]
    fn an_inner_length_cannot_force_a_huge_allocation() {
        // A header-count varint claiming u64::MAX entries inside a tiny frame.
        let payload = [0u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_payload::<Vec<String>>(&payload[1..]).is_err());
    }

    #[test]
    fn encode_refuses_oversized_messages() {
        let big = vec![1u8; 2000];
        assert!(matches!(encode(&big, 1000), Err(FrameError::TooLarge { .. })));
    }
}
