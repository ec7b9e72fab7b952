//! Bounds that every decoder and every stream handler enforces.

/// The hard ceiling on any frame, whatever the configured limits say. bincode is configured with
/// this limit too, so a length *inside* a frame cannot make the decoder allocate more than this.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

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
        Self { max_control_frame: 256 * 1024, max_head_frame: 64 * 1024, max_header_count: 128 }
    }
}
