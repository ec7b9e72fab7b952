//! Numbered application error codes.
//!
//! [`StreamCode`] resets one exchange (a QUIC stream, or an exchange on the gRPC stream);
//! [`CloseCode`] closes a whole tunnel. The numbers are part of the wire protocol: never
//! renumber, only add. Each code has a stable snake_case name ([`StreamCode::as_str`]) for metric
//! labels and a phrase for people ([`StreamCode::describe`]).

/// Declares a wire code enum from one table: number, variant, metric name, description.
macro_rules! wire_codes {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $number:literal, $label:literal, $phrase:literal; )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $number, )+
        }

        impl $name {
            /// Every code, in number order.
            pub const ALL: &'static [$name] = &[$( Self::$variant, )+];

            /// The code's number on the wire.
            pub fn to_u32(self) -> u32 {
                self as u32
            }

            /// Parses a code from the wire; unknown numbers give `None`.
            pub fn from_u64(code: u64) -> Option<Self> {
                match code {
                    $( $number => Some(Self::$variant), )+
                    _ => None,
                }
            }

            /// A stable snake_case name, for metric labels and structured logs.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $label, )+
                }
            }

            /// A short phrase for people (logs and error bodies).
            pub fn describe(self) -> &'static str {
                match self {
                    $( Self::$variant => $phrase, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.describe())
            }
        }
    };
}

wire_codes! {
    /// Why an exchange was reset. The relay maps each code to an HTTP status
    /// ([`StreamCode::http_status`]).
    pub enum StreamCode {
        /// The stream finished or was abandoned with nothing wrong.
        NoError = 0, "no_error", "no error";
        /// The head frame could not be decoded, or violated a limit other than size.
        Malformed = 1, "malformed", "malformed head frame";
        /// The head frame's length prefix exceeded the limit.
        HeadTooLarge = 2, "head_too_large", "head frame too large";
        /// The stream kind is known but not served by this peer.
        KindUnsupported = 3, "kind_unsupported", "stream kind not supported";
        /// The request named an upstream the agent does not know.
        UnknownUpstream = 4, "unknown_upstream", "unknown upstream";
        /// The upstream target is not in the agent's allow list.
        TargetNotAllowed = 5, "target_not_allowed", "upstream target not allowed by the agent";
        /// The upstream refused the connection or could not be reached.
        UpstreamConnect = 6, "upstream_connect", "upstream unreachable";
        /// The upstream reset the connection or sent a malformed answer.
        UpstreamFailed = 7, "upstream_failed", "upstream failed";
        /// The upstream did not answer in time.
        UpstreamTimeout = 8, "upstream_timeout", "upstream timed out";
        /// The peer is at its concurrency limit; retry later.
        Overloaded = 9, "overloaded", "agent at its concurrency limit";
        /// The requester went away; the answer is no longer wanted.
        Cancelled = 10, "cancelled", "cancelled";
        /// The peer is shutting down and takes no new streams.
        ShuttingDown = 11, "shutting_down", "agent shutting down";
        /// The first frame did not arrive before the deadline.
        HeadTimeout = 12, "head_timeout", "head frame not received in time";
        /// The upstream's TLS certificate was not accepted (or its TLS could not be set up).
        UpstreamCertificate = 13, "upstream_certificate", "upstream's TLS certificate not accepted";
    }
}

impl StreamCode {
    /// A code from the wire; an unknown number (from a newer peer) reads as [`Self::Cancelled`],
    /// which every receiver handles as "the exchange is over".
    pub fn from_wire(code: u64) -> Self {
        Self::from_u64(code).unwrap_or(Self::Cancelled)
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
}

wire_codes! {
    /// Why a whole tunnel was closed.
    pub enum CloseCode {
        /// Orderly shutdown.
        Normal = 0, "normal", "normal";
        /// The peer broke the protocol (bad control frame, wrong message order).
        Protocol = 1, "protocol", "protocol violation";
        /// Registration was rejected (bad token, unknown client, version mismatch).
        Rejected = 2, "rejected", "registration rejected";
        /// Another connection registered with the same client_id and replaced this one.
        Replaced = 3, "replaced", "replaced by a newer connection";
        /// The peer is shutting down after a go-away.
        GoingAway = 4, "going_away", "going away";
        /// The peer was silent for too many heartbeat intervals.
        HeartbeatTimeout = 5, "heartbeat_timeout", "heartbeat timeout";
        /// The first message did not arrive before the deadline.
        HandshakeTimeout = 6, "handshake_timeout", "handshake timeout";
    }
}

impl CloseCode {
    /// The reason phrase sent with the close.
    pub fn reason(self) -> &'static [u8] {
        self.describe().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for &c in StreamCode::ALL {
            assert_eq!(StreamCode::from_u64(u64::from(c.to_u32())), Some(c));
        }
        for &c in CloseCode::ALL {
            assert_eq!(CloseCode::from_u64(u64::from(c.to_u32())), Some(c));
        }
        assert_eq!(StreamCode::from_u64(9999), None);
        assert_eq!(StreamCode::from_wire(9999), StreamCode::Cancelled);
        let names: std::collections::HashSet<_> = StreamCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), StreamCode::ALL.len());
    }

    #[test]
    fn status_mapping_follows_the_error_table() {
        assert_eq!(StreamCode::UpstreamTimeout.http_status(), 504);
        assert_eq!(StreamCode::Overloaded.http_status(), 503);
        assert_eq!(StreamCode::UpstreamConnect.http_status(), 502);
        assert_eq!(StreamCode::UpstreamFailed.http_status(), 502);
    }
}
