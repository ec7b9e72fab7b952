//! Serving one data stream: read the request head, forward to the upstream with a pooled hyper
//! client, stream the response back. Failures reset the stream with a code the relay maps to a
//! status; a bad stream never affects the others.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{Either, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use quictun_core::framed::{read_frame_within, write_frame};
use quictun_core::http_stream::{
    RecvBody, headers_from_wire, headers_to_wire, pump_body, reset, stop, strip_hop_by_hop,
};
use quictun_proto::{Limits, RequestHead, ResponseHead, StreamCode, StreamKind};
use tracing::{Instrument, debug, info_span, warn};

use crate::upstreams::UpstreamTable;

/// Deadline for the head frame of a stream the relay opened.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The body sent to an upstream: nothing, or the stream's remaining bytes.
pub type UpstreamBody = Either<Empty<Bytes>, RecvBody>;

/// What every stream handler of one agent shares.
#[derive(Debug)]
pub struct Forwarder {
    client: Client<HttpConnector, UpstreamBody>,
    upstreams: RwLock<Arc<UpstreamTable>>,
    limits: Limits,
    response_timeout: Duration,
}

impl Forwarder {
    /// A forwarder with a pooled HTTP client.
    pub fn new(connect_timeout: Duration, response_timeout: Duration, limits: Limits) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self { client, upstreams: RwLock::new(Arc::new(UpstreamTable::default())), limits, response_timeout }
    }

    /// The upstream table in force.
    pub fn upstreams(&self) -> Arc<UpstreamTable> {
        self.upstreams.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Installs a config_sync table unless it is older than the one in force (a stale version is
    /// ignored); returns whether it did.
    pub fn install(&self, table: UpstreamTable) -> bool {
        let mut slot = self.upstreams.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if table.version() < slot.version() {
            return false;
        }
        *slot = Arc::new(table);
        true
    }

    /// Installs the table of a new session whatever its version (a restarted relay numbers its
    /// configurations afresh).
    pub fn install_fresh(&self, table: UpstreamTable) {
        *self.upstreams.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(table);
    }

    /// Serves one stream opened by the relay.
    pub async fn serve_stream(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let head: RequestHead = match read_frame_within(&mut recv, self.limits.max_head_frame, HEAD_TIMEOUT).await {
            Ok(head) => head,
            Err(err) => {
                let code = err.stream_code();
                warn!(%err, ?code, "bad stream from relay");
                reset(&mut send, code);
                stop(&mut recv, code);
                return;
            }
        };
        let span = info_span!("stream", request_id = %head.request_id, upstream = %head.upstream);
        if let Err(err) = head.validate(&self.limits) {
            span.in_scope(|| warn!(%err, "invalid request head"));
            reset(&mut send, StreamCode::Malformed);
            stop(&mut recv, StreamCode::Malformed);
            return;
        }
        match head.kind {
            StreamKind::Http => {
                if let Err(code) = self.forward_http(head, &mut send, recv).instrument(span.clone()).await {
                    reset(&mut send, code);
                }
            }
            StreamKind::Tcp | StreamKind::Upgrade => {
                span.in_scope(|| debug!(kind = ?head.kind, "stream kind not served"));
                reset(&mut send, StreamCode::KindUnsupported);
                stop(&mut recv, StreamCode::KindUnsupported);
            }
        }
    }

    async fn forward_http(
        &self,
        head: RequestHead,
        send: &mut quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), StreamCode> {
        let upstreams = self.upstreams();
        let target = upstreams.pick(&head.upstream).ok_or_else(|| {
            warn!("request for an unknown upstream");
            StreamCode::UnknownUpstream
        })?;
        let uri = target.uri_for(&head.uri).map_err(|_| StreamCode::Malformed)?;
        let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| StreamCode::Malformed)?;
        let headers = headers_from_wire(head.headers).map_err(|_| StreamCode::Malformed)?;
        let body = if head.has_body {
            Either::Right(RecvBody::new(recv))
        } else {
            stop(&mut recv, StreamCode::NoError);
            Either::Left(Empty::new())
        };
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let code = if err.is_connect() { StreamCode::UpstreamConnect } else { StreamCode::UpstreamFailed };
                warn!(err = %error_chain(&err), ?code, "upstream request failed");
                return Err(code);
            }
            Err(_) => {
                warn!(timeout = ?self.response_timeout, "upstream did not answer in time");
                return Err(StreamCode::UpstreamTimeout);
            }
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let head = ResponseHead { status: parts.status.as_u16(), headers: headers_to_wire(&parts.headers) };
        if write_frame(send, &head, self.limits.max_head_frame).await.is_err() {
            return Err(StreamCode::Cancelled);
        }
        match pump_body(body, send, StreamCode::UpstreamFailed).await {
            Ok(bytes) => debug!(status = head.status, bytes, "response sent"),
            Err(err) => debug!(%err, "response body ended early"),
        }
        Ok(())
    }
}

/// An error and its causes, one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
