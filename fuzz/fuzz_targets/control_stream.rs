//! Bytes arriving on the control stream, fed to the codec the way a socket delivers them: in two
//! pieces at a fuzzer-chosen split. Every frame is decoded until the codec errs or wants more;
//! nothing may panic and the buffer the codec reserves stays within the frame limit.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use quictun_core::control::ControlCodec;
use quictun_proto::Limits;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    let max = Limits::default().max_control_frame;
    let mut codec = ControlCodec::new(max);
    let cut = usize::from(split).min(data.len());
    let mut buf = BytesMut::new();
    for piece in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_message)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= max + 4 + data.len() + 64, "codec reserved {} bytes", buf.capacity());
    }
});
