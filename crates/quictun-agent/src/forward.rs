//! Forwarding one request to a local upstream with a pooled hyper client, whatever transport
//! brought it. Failures are stream codes the relay maps to a status; a bad request never affects
//! the others.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quictun_core::http_stream::{headers_from_wire, headers_to_wire, strip_hop_by_hop};
use quictun_core::link::{BodyError, BoxFuture, RequestHandler, TunnelBody, empty_body};
use quictun_core::upgrade::{spawn_splice, upgrade_headers_from_wire};
use quictun_proto::{Limits, RequestHead, ResponseHead, StreamCode, StreamKind};
use tracing::{debug, warn};

use crate::AgentOptions;
use crate::metrics::{ActiveStream, AgentMetrics};
use crate::upstreams::UpstreamTable;

/// What every stream handler of one agent shares.
#[derive(Debug)]
pub struct Forwarder {
    client: Client<HttpConnector, TunnelBody>,
    upstreams: RwLock<Arc<UpstreamTable>>,
    limits: Limits,
    connect_timeout: Duration,
    response_timeout: Duration,
    allowed_targets: Option<Vec<String>>,
    metrics: Arc<AgentMetrics>,
}

impl Forwarder {
    /// A forwarder with a pooled HTTP client, configured by the agent's options.
    pub fn new(options: &AgentOptions, metrics: Arc<AgentMetrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            client,
            upstreams: RwLock::new(Arc::new(UpstreamTable::default())),
            limits: options.limits,
            connect_timeout: options.connect_timeout,
            response_timeout: options.response_timeout,
            allowed_targets: options.allowed_targets.clone(),
            metrics,
        }
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

    /// Forwards one request to its upstream and returns the upstream's response head and body.
    /// The request head must already be validated. Failures are the code to reset the exchange
    /// with. For an upgrade (WebSocket) the request goes without a body; when the upstream
    /// answers 101, `body` (the client's bytes) is spliced to the upstream's connection and the
    /// returned body carries the upstream's bytes.
    pub async fn forward(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let upgrade = head.kind == StreamKind::Upgrade;
        let (request_body, from_relay) = if upgrade { (empty_body(), Some(body)) } else { (body, None) };
        let upstreams = self.upstreams();
        let target = upstreams.pick(&head.upstream).ok_or_else(|| {
            warn!("request for an unknown upstream");
            StreamCode::UnknownUpstream
        })?;
        let uri = target.uri_for(&head.uri).map_err(|_| StreamCode::Malformed)?;
        let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| StreamCode::Malformed)?;
        let headers = if upgrade { upgrade_headers_from_wire(head.headers) } else { headers_from_wire(head.headers) };
        let headers = headers.map_err(|_| StreamCode::Malformed)?;
        let mut request = Request::new(request_body);
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let response = match tokio::time::timeout(self.response_timeout, self.client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let code = match () {
                    () if err.is_connect() && is_timeout(&err) => StreamCode::UpstreamTimeout,
                    () if err.is_connect() => StreamCode::UpstreamConnect,
                    () => StreamCode::UpstreamFailed,
                };
                warn!(err = %quictun_core::error_chain(&err), ?code, "upstream request failed");
                return Err(code);
            }
            Err(_) => {
                warn!(timeout = ?self.response_timeout, "upstream did not answer in time");
                return Err(StreamCode::UpstreamTimeout);
            }
        };
        if let Some(from_relay) = from_relay
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            // The Connection and Upgrade headers are the answer itself: kept.
            let head = ResponseHead { status: 101, headers: headers_to_wire(response.headers()) };
            return Ok((head, splice_upstream(response, from_relay)));
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = body.map_err(|e| BodyError::Closed(format!("upstream body: {e}"))).boxed_unsync();
        Ok((ResponseHead { status: parts.status.as_u16(), headers: headers_to_wire(&parts.headers) }, body))
    }
}

/// Splices the relay's stream to the upstream's upgraded connection; returns the upstream's bytes.
fn splice_upstream(mut response: hyper::Response<Incoming>, from_relay: TunnelBody) -> TunnelBody {
    let on_upgrade = hyper::upgrade::on(&mut response);
    let upgraded = async move {
        match on_upgrade.await {
            Ok(upgraded) => Some(TokioIo::new(upgraded)),
            Err(err) => {
                debug!(%err, "upstream connection was not upgraded");
                None
            }
        }
    };
    spawn_splice(upgraded, from_relay)
}

/// True when a connect error was a timeout (answered 504 rather than 502).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(cause) = source {
        if cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        source = cause.source();
    }
    false
}

impl RequestHandler for Forwarder {
    fn handle(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), StreamCode>> {
        Box::pin(async move {
            let metrics = &self.metrics;
            let active = ActiveStream::new(&metrics.active_streams);
            let upstream = head.upstream.clone();
            let sent = metrics.bytes_to_upstream.clone();
            let body = body
                .map_frame(move |frame| {
                    if let Some(data) = frame.data_ref() {
                        sent.inc_by(data.len() as u64);
                    }
                    frame
                })
                .boxed_unsync();
            let started = Instant::now();
            let answered = match head.kind {
                StreamKind::Tcp => {
                    let timeout = self.connect_timeout;
                    crate::tcp::connect(&head.upstream, self.allowed_targets.as_deref(), timeout, body).await
                }
                StreamKind::Http | StreamKind::Upgrade => self.forward(head, body).await,
            };
            let (head, body) = match answered {
                Ok(answered) => answered,
                Err(code) => {
                    metrics.request(&upstream, &format!("{code:?}"), None);
                    return Err(code);
                }
            };
            metrics.request(&upstream, &head.status.to_string(), Some(started.elapsed()));
            let received = metrics.bytes_from_upstream.clone();
            let body = body
                .map_frame(move |frame| {
                    // The closure owns the active-stream guard: it ends with the body.
                    let _active = &active;
                    if let Some(data) = frame.data_ref() {
                        received.inc_by(data.len() as u64);
                    }
                    frame
                })
                .boxed_unsync();
            Ok((head, body))
        })
    }

    fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfigFile, AgentSection};
    use quictun_proto::{AgentConfig, Token, UpstreamSpec};

    fn table(version: u64, target: &str) -> UpstreamTable {
        let pushed =
            AgentConfig { version, upstreams: vec![UpstreamSpec { name: "app".into(), targets: vec![target.into()] }] };
        UpstreamTable::build(&pushed, &[], None)
    }

    #[tokio::test]
    async fn a_stale_config_sync_is_ignored_and_a_newer_one_applied() {
        let file = AgentConfigFile {
            agent: AgentSection {
                relay: "127.0.0.1:1".into(),
                pin: Some(format!("sha256:{}", "ab".repeat(32))),
                client_id: "a".into(),
                token: Some(Token::new("t")),
                ..AgentSection::default()
            },
            upstreams: vec![],
        };
        let options = AgentOptions::from_config(file, std::path::Path::new("t.toml")).unwrap();
        let forwarder = Forwarder::new(&options, Arc::new(AgentMetrics::new()));
        forwarder.install_fresh(table(5, "http://127.0.0.1:5"));
        assert!(!forwarder.install(table(4, "http://127.0.0.1:4")), "version 4 after 5 must be ignored");
        assert_eq!(forwarder.upstreams().pick("app").unwrap().host_port(), "127.0.0.1:5");
        assert!(forwarder.install(table(6, "http://127.0.0.1:6")));
        assert_eq!(forwarder.upstreams().pick("app").unwrap().host_port(), "127.0.0.1:6");
    }
}
