//! Bodies crossing a tunnel, for every transport: the body type, how one is sent (the one pump,
//! into a transport's [`BodySink`]), and how an exchange's upload lives exactly as long as its
//! answer ([`WithUpload`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use quictun_proto::StreamCode;
use tracing::debug;

/// Why a body crossing the tunnel ended early.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The peer reset the exchange with a code.
    #[error("reset by peer: {0} ({n})", n = .0.to_u32())]
    Reset(StreamCode),
    /// The tunnel is gone.
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The local side closed the exchange, or a source body failed.
    #[error("{0}")]
    Closed(String),
}

/// A streaming body crossing the tunnel.
pub type TunnelBody = UnsyncBoxBody<Bytes, BodyError>;

/// An empty tunnel body.
pub fn empty_body() -> TunnelBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A complete answer the relay gives itself: `status`, `headers` and the text `message` (a line),
/// with its type and length.
pub fn text_answer(
    status: u16,
    message: &str,
    mut headers: Vec<quictun_proto::Header>,
) -> (quictun_proto::ResponseHead, TunnelBody) {
    use http_body_util::BodyExt;
    let text = Bytes::from(format!("{message}\n"));
    headers.push(quictun_proto::Header { name: "content-type".into(), value: b"text/plain; charset=utf-8".to_vec() });
    headers.push(quictun_proto::Header { name: "content-length".into(), value: text.len().to_string().into_bytes() });
    let body = http_body_util::Full::new(text).map_err(|never| match never {}).boxed_unsync();
    (quictun_proto::ResponseHead { status, headers, framed_body: false }, body)
}

/// Aborts a task when dropped: a helper task lives exactly as long as its owner.
#[derive(Debug)]
pub struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Owns `task`.
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self(Some(task))
    }

    /// Lets go of the task without aborting it (someone else owns it now).
    pub fn into_inner(mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.0.take()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Why a sink took no more of a body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The peer will not read more of it (it stopped or reset the exchange).
    #[error("stopped by the peer")]
    Stopped,
    /// The tunnel is gone.
    #[error("tunnel connection lost")]
    Lost,
    /// The trailers do not fit in a frame (the exchange is reset).
    #[error("trailers too large: {0}")]
    TrailersTooLarge(String),
}

/// Where a transport sends one body of an exchange. [`pump`] drives it.
pub trait BodySink: Send {
    /// Sends body bytes, waiting for flow control.
    fn send_data(&mut self, data: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Sends the trailers, the body's last frame. A sink that cannot carry them (a raw body)
    /// drops them.
    fn send_trailers(&mut self, trailers: HeaderMap) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Ends the body cleanly.
    fn finish(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Ends the body with `code`, so that the peer never takes a truncated body for a whole one.
    fn reset(&mut self, code: StreamCode);

    /// Sends what the sink held back to send together with the body's first bytes (a QUIC
    /// response head). [`pump`] calls it before it waits for the source, so that nothing held
    /// back waits on a slow body.
    fn flush(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send {
        std::future::ready(Ok(()))
    }

    /// Resolves when the peer will not read more (it stopped the exchange, or the tunnel is
    /// gone). A transport whose writes report that by themselves never resolves it.
    fn stopped(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Why a pump stopped.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    /// Reading the source body failed (the exchange was reset with the pump's code).
    #[error("source body: {0}")]
    Source(String),
    /// The sink took no more.
    #[error("sending: {0}")]
    Sink(#[from] SinkError),
}

/// Streams `body` into `sink` frame by frame, then ends it. Backpressure is the sink's flow
/// control: the next frame is read only once the previous one was taken. A source error resets
/// the body with `on_source_error`; a pump dropped half-way resets it with
/// [`StreamCode::Cancelled`]. Returns the number of body bytes sent.
pub async fn pump<B, S>(body: B, sink: &mut S, on_source_error: StreamCode) -> Result<u64, PumpError>
where
    B: Body,
    B::Error: std::fmt::Display,
    S: BodySink,
{
    let mut guard = ResetUnlessDone { sink, code: StreamCode::Cancelled, done: false };
    let mut body = std::pin::pin!(body);
    let mut sent = 0u64;
    loop {
        // A frame that is ready is taken at once; only a wait for one also watches for a stop.
        let frame = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => frame,
            None => {
                guard.sink.flush().await?;
                tokio::select! {
                    frame = body.frame() => frame,
                    () = guard.sink.stopped() => return Err(PumpError::Sink(SinkError::Stopped)),
                }
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                guard.code = on_source_error;
                return Err(PumpError::Source(e.to_string()));
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                let bytes = data.copy_to_bytes(data.remaining());
                if !bytes.is_empty() {
                    sent += bytes.len() as u64;
                    guard.sink.send_data(bytes).await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if let Err(err) = guard.sink.send_trailers(trailers).await {
                        if matches!(err, SinkError::TrailersTooLarge(_)) {
                            guard.code = on_source_error;
                        }
                        return Err(err.into());
                    }
                    // Trailers end the body.
                    break;
                }
            }
        }
    }
    guard.done = true;
    guard.sink.finish().await?;
    Ok(sent)
}

/// Resets the sink on drop unless the body was sent whole.
struct ResetUnlessDone<'a, S: BodySink> {
    sink: &'a mut S,
    code: StreamCode,
    done: bool,
}

impl<S: BodySink> Drop for ResetUnlessDone<'_, S> {
    fn drop(&mut self) {
        if !self.done {
            self.sink.reset(self.code);
        }
    }
}

/// An exchange's answer, holding the task that uploads its request body. Dropped before its end,
/// it aborts the upload (the exchange is abandoned). Once the answer ended cleanly the upload may
/// still be sending (an upgraded or TCP stream whose other direction closed first), so it is left
/// to finish by itself: it ends with its source, or when the peer stops it.
pub struct WithUpload {
    body: TunnelBody,
    upload: Option<tokio::task::JoinHandle<()>>,
    finished: bool,
}

impl WithUpload {
    /// `body`, owning `upload` (if any): the body itself when there is none.
    pub fn wrap(body: TunnelBody, upload: Option<tokio::task::JoinHandle<()>>) -> TunnelBody {
        match upload {
            Some(upload) => Self { body, upload: Some(upload), finished: false }.boxed_unsync(),
            None => body,
        }
    }
}

impl Drop for WithUpload {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take()
            && !self.finished
        {
            upload.abort();
        }
    }
}

impl Body for WithUpload {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        // Trailers are the last frame; a reader may not poll for the end after them.
        this.finished = frame.as_ref().is_none_or(|f| matches!(f, Ok(f) if f.is_trailers()));
        if this.finished {
            debug!("answer complete; the upload finishes by itself");
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink that records what it was given.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl BodySink for Recorder {
        async fn send_data(&mut self, data: Bytes) -> Result<(), SinkError> {
            self.0.lock().unwrap().push(format!("data {}", data.len()));
            Ok(())
        }
        async fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), SinkError> {
            self.0.lock().unwrap().push(format!("trailers {}", trailers.len()));
            Ok(())
        }
        async fn finish(&mut self) -> Result<(), SinkError> {
            self.0.lock().unwrap().push("finish".into());
            Ok(())
        }
        fn reset(&mut self, code: StreamCode) {
            self.0.lock().unwrap().push(format!("reset {}", code.as_str()));
        }
    }

    #[tokio::test]
    async fn a_body_is_sent_frame_by_frame_then_finished() {
        let mut sink = Recorder::default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::new())),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        assert_eq!(pump(body, &mut sink, StreamCode::UpstreamFailed).await.unwrap(), 3);
        assert_eq!(*sink.0.lock().unwrap(), ["data 3", "trailers 1", "finish"]);
    }

    #[tokio::test]
    async fn a_failing_source_resets_with_the_pumps_code() {
        let mut sink = Recorder::default();
        let frames = vec![Ok(Frame::data(Bytes::from_static(b"ab"))), Err(std::io::Error::other("gone"))];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        assert!(pump(body, &mut sink, StreamCode::UpstreamFailed).await.is_err());
        assert_eq!(*sink.0.lock().unwrap(), ["data 2", "reset upstream_failed"]);
    }

    #[tokio::test]
    async fn a_pump_dropped_half_way_resets_as_cancelled() {
        let sink = Recorder::default();
        let never =
            http_body_util::StreamBody::new(futures_util::stream::pending::<Result<Frame<Bytes>, std::io::Error>>());
        let mut pumping = sink.clone();
        let run =
            tokio::time::timeout(std::time::Duration::from_millis(20), pump(never, &mut pumping, StreamCode::NoError));
        assert!(run.await.is_err());
        assert_eq!(*sink.0.lock().unwrap(), ["reset cancelled"]);
    }
}
