//! Numbered application error codes.
//!
//! [`StreamCode`] resets one data stream; [`CloseCode`] closes a whole QUIC connection. The numbers
//! are part of the wire protocol: never renumber, only add.

/// Why a data stream was reset. The relay maps each code to an HTTP status ([`StreamCode::http_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum StreamCode {
    /// The stream finished or was abandoned with nothing wrong.
    NoError = 0,
    /// The head frame could not be decoded, or violated a limit other than size.
    Malformed = 1,
    /// The head frame's length prefix exceeded the limit.
    HeadTooLarge = 2,
    /// The stream kind is known but not served by this peer.
    KindUnsupported = 3,
    /// The request named an upstream the agent does not know.
    UnknownUpstream = 4,
    /// The upstream target is not in the agent's allow list.
    TargetNotAllowed = 5,
    /// The upstream refused the connection or could not be reached.
    UpstreamConnect = 6,
    /// The upstream reset the connection or sent a malformed answer.
    UpstreamFailed = 7,
    /// The upstream did not answer in time.
    UpstreamTimeout = 8,
    /// The peer is at its concurrency limit; retry later.
    Overloaded = 9,
    /// The requester went away; the answer is no longer wanted.
    Cancelled = 10,
    /// The peer is shutting down and takes no new streams.
    ShuttingDown = 11,
    /// The first frame did not arrive before the deadline.
    HeadTimeout = 12,
}

impl StreamCode {
    /// Every code, for tests and documentation.
    pub const ALL: [StreamCode; 13] = [
        Self::NoError,
        Self::Malformed,
        Self::HeadTooLarge,
        Self::KindUnsupported,
        Self::UnknownUpstream,
        Self::TargetNotAllowed,
        Self::UpstreamConnect,
        Self::UpstreamFailed,
        Self::UpstreamTimeout,
        Self::Overloaded,
        Self::Cancelled,
        Self::ShuttingDown,
        Self::HeadTimeout,
    ];

    /// The code as sent in a QUIC RESET_STREAM or STOP_SENDING frame.
    pub fn to_u32(self) -> u32 {
        self as u32
    }

    /// Parses a code from the wire; unknown numbers give `None`.
    pub fn from_u64(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| u64::from(c.to_u32()) == code)
    }

    /// The HTTP status the relay answers with when a stream ends with this code before a response
    /// head arrived.
    pub fn http_status(self) -> u16 {
        match self {
            Self::UpstreamTimeout | Self::HeadTimeout => 504,
            Self::Overloaded | Self::ShuttingDown => 503,
            _ => 502,
        }
    }

    /// A short, stable description for logs and error bodies.
    pub fn describe(self) -> &'static str {
        match self {
            Self::NoError => "no error",
            Self::Malformed => "malformed head frame",
            Self::HeadTooLarge => "head frame too large",
            Self::KindUnsupported => "stream kind not supported",
            Self::UnknownUpstream => "unknown upstream",
            Self::TargetNotAllowed => "upstream target not allowed by the agent",
            Self::UpstreamConnect => "upstream unreachable",
            Self::UpstreamFailed => "upstream failed",
            Self::UpstreamTimeout => "upstream timed out",
            Self::Overloaded => "agent at its concurrency limit",
            Self::Cancelled => "cancelled",
            Self::ShuttingDown => "agent shutting down",
            Self::HeadTimeout => "head frame not received in time",
        }
    }
}

/// Why a whole QUIC connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal = 0,
    /// The peer broke the protocol (bad control frame, wrong message order).
    Protocol = 1,
    /// Registration was rejected (bad token, unknown client, version mismatch).
    Rejected = 2,
    /// Another connection registered with the same client_id and replaced this one.
    Replaced = 3,
    /// The peer is shutting down after a go-away.
    GoingAway = 4,
    /// The peer was silent for too many heartbeat intervals.
    HeartbeatTimeout = 5,
    /// The first message did not arrive before the deadline.
    HandshakeTimeout = 6,
}

impl CloseCode {
    /// Every code.
    pub const ALL: [CloseCode; 7] = [
        Self::Normal,
        Self::Protocol,
        Self::Rejected,
        Self::Replaced,
        Self::GoingAway,
        Self::HeartbeatTimeout,
        Self::HandshakeTimeout,
    ];

    /// The code as sent in a QUIC CONNECTION_CLOSE frame.
    pub fn to_u32(self) -> u32 {
        self as u32
    }

    /// Parses a code from the wire; unknown numbers give `None`.
    pub fn from_u64(code: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|c| u64::from(c.to_u32()) == code)
    }

    /// The reason phrase sent with the close.
    pub fn reason(self) -> &'static [u8] {
        match self {
            Self::Normal => b"normal",
            Self::Protocol => b"protocol violation",
            Self::Rejected => b"registration rejected",
            Self::Replaced => b"replaced by a newer connection",
            Self::GoingAway => b"going away",
            Self::HeartbeatTimeout => b"heartbeat timeout",
            Self::HandshakeTimeout => b"handshake timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for c in StreamCode::ALL {
            assert_eq!(StreamCode::from_u64(u64::from(c.to_u32())), Some(c));
        }
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_u64(u64::from(c.to_u32())), Some(c));
        }
        assert_eq!(StreamCode::from_u64(9999), None);
    }

    #[test]
    fn status_mapping_follows_the_error_table() {
        assert_eq!(StreamCode::UpstreamTimeout.http_status(), 504);
        assert_eq!(StreamCode::Overloaded.http_status(), 503);
        assert_eq!(StreamCode::UpstreamConnect.http_status(), 502);
        assert_eq!(StreamCode::UpstreamFailed.http_status(), 502);
    }
}
