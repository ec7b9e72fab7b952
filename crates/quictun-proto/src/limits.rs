//! Bounds that every decoder and every stream handler enforces.

/// The hard ceiling on any frame, whatever the configured limits say. bincode is configured with
/// this limit too, so a length *inside* a frame cannot make the decoder allocate more than this.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// Most headers a client may send to the relay's ingress (the ingress's default and ceiling).
pub const CLIENT_MAX_HEADERS: usize = 128;
/// Largest request head a client may send to the relay's ingress, in bytes (default and ceiling).
pub const CLIENT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// Headers a forwarding end may add to a client's request: `Host`, the six forwarding headers,
/// the request id, `TE` and the upgrade pair, with room to spare. The tunnel's header limit is the
/// client's plus this, so a request the ingress accepted always fits the tunnel.
pub const ADDED_HEADERS: usize = 16;
/// Bytes the added headers (and the head frame's own encoding) may take beyond the client's head.
pub const ADDED_HEAD_BYTES: usize = 8 * 1024;

/// Most tunnels one agent may declare ([`crate::Claim`]); the relay refuses the rest.
pub const MAX_CLAIMS: usize = 64;

/// Limits negotiated by configuration; both sides check every length from the wire against them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest control-stream frame (config_sync carries the upstream list).
    pub max_control_frame: usize,
    /// Largest request-head or response-head frame on a data stream.
    pub max_head_frame: usize,
    /// Most headers in one head frame.
    pub max_header_count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_control_frame: 256 * 1024,
            max_head_frame: CLIENT_MAX_HEAD_BYTES + ADDED_HEAD_BYTES,
            max_header_count: CLIENT_MAX_HEADERS + ADDED_HEADERS,
        }
    }
}
