//! Upgraded connections (WebSocket and any other HTTP/1.1 `Upgrade`): after the `101 Switching
//! Protocols` answer the exchange's stream carries raw bytes both ways. Each side splices the
//! stream to its own connection (the client's on the relay, the upstream's on the agent); the
//! end of one direction is passed on as a half-close and does not cut the other.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::Instrument;

use quictun_proto::Header;

use crate::body::{BodyError, TunnelBody};
use crate::http::{InvalidHeader, headers_from_wire};

/// Sends the bytes of one direction into a [`TunnelBody`].
pub type FrameSender = mpsc::Sender<Result<Frame<Bytes>, BodyError>>;

/// Frames queued per direction (each up to [`READ_CHUNK`] bytes).
const QUEUED_FRAMES: usize = 8;
/// Largest read from the connection.
const READ_CHUNK: usize = 16 * 1024;

/// True for an HTTP/1.1 request asking to switch protocols (`Connection: upgrade` and an
/// `Upgrade` header).
pub fn is_upgrade_request(version: http::Version, headers: &HeaderMap) -> bool {
    version == http::Version::HTTP_11 && headers.contains_key(header::UPGRADE) && connection_has_upgrade(headers)
}

/// True when the `Connection` header lists `upgrade`.
pub fn connection_has_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Converts the wire headers of an upgrade (the request on the agent, the 101 on the relay) like
/// [`crate::http::headers_from_wire`], but keeps `Connection: upgrade` and `Upgrade`: they
/// are what the message is about.
pub fn upgrade_headers_from_wire(headers: Vec<Header>) -> Result<HeaderMap, InvalidHeader> {
    let upgrade = headers.iter().find(|h| h.name.eq_ignore_ascii_case("upgrade")).map(|h| h.value.clone());
    let mut map = headers_from_wire(headers)?;
    if let Some(value) = upgrade {
        let value = HeaderValue::from_bytes(&value).map_err(|_| InvalidHeader { name: "upgrade".into() })?;
        map.insert(header::UPGRADE, value);
        map.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok(map)
}

/// A tunnel body fed by a bounded channel, and the channel's sender.
pub fn channel_body() -> (FrameSender, TunnelBody) {
    channel_body_of(QUEUED_FRAMES)
}

/// A tunnel body fed by a channel of `depth` frames, and the channel's sender.
pub fn channel_body_of(depth: usize) -> (FrameSender, TunnelBody) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
    (tx, StreamBody::new(stream).boxed_unsync())
}

/// Splices `io` (once `io` resolves to a connection) to the peer in a task that ends when both
/// directions have ended or the peer's side is gone; returns the body carrying what `io` reads.
pub fn spawn_splice<F, IO>(io: F, from_peer: TunnelBody) -> TunnelBody
where
    F: std::future::Future<Output = Option<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (to_peer, body) = channel_body();
    tokio::spawn(
        async move {
            if let Some(io) = io.await {
                splice(io, from_peer, to_peer).await;
            }
        }
        .in_current_span(),
    );
    body
}

/// What a splice moved, and how each direction ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes from the peer written to the connection.
    pub to_io: u64,
    /// Bytes read from the connection and sent to the peer.
    pub from_io: u64,
    /// The peer's side ended cleanly (and the connection's write side was shut down).
    pub peer_ended_cleanly: bool,
    /// The connection reached its end cleanly (and the peer's body was ended).
    pub io_ended_cleanly: bool,
}

/// Copies `from_peer` into `io` and what `io` reads into `to_peer`, until both directions end.
/// When `from_peer` ends, `io`'s write side is shut down (a half-close); when `io` reaches its
/// end, `to_peer` is dropped, which ends the peer's body. An error in either direction ends both.
pub async fn splice<IO>(io: IO, from_peer: TunnelBody, to_peer: FrameSender) -> Spliced
where
    IO: AsyncRead + AsyncWrite,
{
    splice_counted(io, from_peer, to_peer, &SpliceMeters::default()).await
}

/// Counters a splice adds each direction's bytes to as they move (metrics, and a connection's
/// own count that outlives a splice cut short).
#[derive(Debug, Clone, Default)]
pub struct SpliceMeters {
    /// Bytes written to the connection.
    pub to_io: Vec<Counter>,
    /// Bytes read from the connection.
    pub from_io: Vec<Counter>,
}

/// [`splice`], counting in `meters` as the bytes move.
pub async fn splice_counted<IO>(
    io: IO,
    mut from_peer: TunnelBody,
    to_peer: FrameSender,
    meters: &SpliceMeters,
) -> Spliced
where
    IO: AsyncRead + AsyncWrite,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let (mut written, mut read) = (0u64, 0u64);
    let inbound = async {
        while let Some(frame) = from_peer.frame().await {
            let Ok(frame) = frame else { return false };
            if let Ok(data) = frame.into_data() {
                if writer.write_all(&data).await.is_err() {
                    return false;
                }
                written += data.len() as u64;
                meters.to_io.iter().for_each(|c| {
                    c.inc_by(data.len() as u64);
                });
            }
        }
        writer.shutdown().await.is_ok()
    };
    // Owns the sender: the peer's body ends as soon as this direction does.
    let outbound = async {
        let to_peer = to_peer;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let got = tokio::select! {
                got = reader.read_buf(&mut buf) => got,
                // The peer's side of the stream is gone: nobody will read what comes.
                () = to_peer.closed() => return false,
            };
            match got {
                Ok(0) => return true,
                Ok(n) => {
                    read += n as u64;
                    meters.from_io.iter().for_each(|c| {
                        c.inc_by(n as u64);
                    });
                    if to_peer.send(Ok(Frame::data(buf.split().freeze()))).await.is_err() {
                        return false;
                    }
                }
                Err(err) => {
                    let _ = to_peer.send(Err(BodyError::Closed(format!("upgraded connection: {err}")))).await;
                    return false;
                }
            }
        }
    };
    let (peer_ended_cleanly, io_ended_cleanly) = tokio::join!(inbound, outbound);
    tracing::debug!(peer_ended_cleanly, io_ended_cleanly, "upgraded connection ended");
    Spliced { to_io: written, from_io: read, peer_ended_cleanly, io_ended_cleanly }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_each_end_is_a_half_close() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (to_io, from_peer) = channel_body();
        let (to_peer, read_back) = channel_body();
        let task = tokio::spawn(splice(near, from_peer, to_peer));
        to_io.send(Ok(Frame::data(Bytes::from_static(b"ping")))).await.unwrap();
        drop(to_io);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping", "the peer's end shut the write side down");
        // The other direction still works after the half-close.
        far.write_all(b"pong").await.unwrap();
        far.shutdown().await.unwrap();
        drop(far);
        let back = read_back.collect().await.unwrap().to_bytes();
        assert_eq!(&back[..], b"pong");
        task.await.unwrap();
    }

    #[test]
    fn recognizes_upgrade_requests() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(is_upgrade_request(http::Version::HTTP_11, &headers));
        assert!(!is_upgrade_request(http::Version::HTTP_2, &headers));
        headers.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        assert!(!is_upgrade_request(http::Version::HTTP_11, &headers));
    }
}
