//! Forwarding one request to a local upstream with a pooled hyper client, whatever transport
//! brought it. Failures are stream codes the relay maps to a status; a bad request never affects
//! the others.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use quictun_core::body::TunnelBody;
use quictun_core::edge::forwarded::REQUEST_ID_HEADER;
use quictun_core::tunnel::{BoxFuture, RequestHandler};
use quictun_core::upstream_http::UpstreamHttp;
use quictun_proto::{ClaimAnswer, Limits, RequestHead, ResponseHead, StreamCode, Target};
use tokio::sync::watch;
use tracing::warn;
use uuid::Uuid;

use crate::AgentOptions;
use crate::inspect::Inspector;
use crate::metrics::{ActiveStream, AgentMetrics};
use crate::tunnels::Tunnels;
use crate::upstreams::UpstreamTable;

/// What every stream handler of one agent shares.
#[derive(Debug)]
pub struct Forwarder {
    http: UpstreamHttp,
    upstreams: RwLock<Arc<UpstreamTable>>,
    /// The tunnels the agent declares (changed on reload; each session claims them anew).
    pub tunnels: watch::Sender<Arc<Tunnels>>,
    /// The relay's answers to the agent's last claims.
    pub answers: watch::Sender<Vec<ClaimAnswer>>,
    limits: Limits,
    connect_timeout: Duration,
    allowed_targets: Option<Vec<String>>,
    metrics: Arc<AgentMetrics>,
    /// The recent HTTP requests and the start of their bodies (see [`crate::inspect`]).
    pub inspector: Arc<Inspector>,
}

impl Forwarder {
    /// A forwarder with a pooled HTTP client, configured by the agent's options.
    pub fn new(options: &AgentOptions, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            http: UpstreamHttp::new(options.connect_timeout, options.response_timeout),
            upstreams: RwLock::new(Arc::new(UpstreamTable::default())),
            tunnels: watch::Sender::new(Arc::new(options.tunnels.clone())),
            answers: watch::Sender::new(Vec::new()),
            limits: options.limits,
            connect_timeout: options.connect_timeout,
            allowed_targets: options.allowed_targets.clone(),
            metrics,
            inspector: Arc::new(Inspector::new(options.inspect_capacity, options.inspect_body_bytes)),
        }
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &AgentMetrics {
        &self.metrics
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

    /// Forwards one HTTP or upgrade request to its upstream (see [`UpstreamHttp::send`]). The
    /// request head must already be validated; failures are the code to reset the exchange with.
    pub async fn forward(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let upstreams = self.upstreams();
        let target = head.target.upstream().and_then(|name| upstreams.next_target(name)).ok_or_else(|| {
            warn!("request for an unknown upstream");
            StreamCode::UnknownUpstream
        })?;
        self.http.send(target, head, body).await
    }
}

impl Forwarder {
    /// Sends the captured request `id` to its upstream again (with a request id of its own),
    /// recorded as a replay of it; the answer's head, once its body has been read (for the
    /// record) or `REPLAY_BODY_TIMEOUT` has passed.
    pub async fn replay(&self, id: Uuid) -> Result<(Uuid, ResponseHead), ReplayError> {
        let record = self.inspector.find(id).ok_or(ReplayError::NotFound)?;
        if !record.summary.replayable {
            return Err(ReplayError::BodyNotWhole);
        }
        let mut head = record.head.clone();
        head.request_id = Uuid::new_v4();
        head.has_body = !record.request_bytes.is_empty();
        head.framed_body = false;
        let new_id = head.request_id;
        // The upstream sees the replay's own id, as the inspector lists it.
        for header in head.headers.iter_mut().filter(|h| h.name == REQUEST_ID_HEADER) {
            header.value = new_id.to_string().into_bytes();
        }
        let body =
            http_body_util::Full::new(record.request_bytes.clone()).map_err(|never| match never {}).boxed_unsync();
        let (answer, body) = self.exchange(head, body, Some(id)).await.map_err(ReplayError::Failed)?;
        // Read (and drop) the body so the record has it; an endless one is cut.
        let _ = tokio::time::timeout(REPLAY_BODY_TIMEOUT, body.collect()).await;
        Ok((new_id, answer))
    }

    /// Forwards one exchange of any kind; an HTTP request is recorded by the inspector (as a
    /// replay of `replay_of`, when it is one).
    async fn exchange(
        &self,
        head: RequestHead,
        body: TunnelBody,
        replay_of: Option<Uuid>,
    ) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let capture = match head.target {
            Target::Http(_) => self.inspector.begin(&head, replay_of),
            _ => None,
        };
        let body = match &capture {
            Some(capture) => capture.request_body(body),
            None => body,
        };
        match (self.exchange_uninspected(head, body).await, capture) {
            (Ok((head, body)), Some(capture)) => {
                let body = capture.response(&head, body);
                Ok((head, body))
            }
            (Err(code), Some(capture)) => {
                capture.failed(code);
                Err(code)
            }
            (answered, None) => answered,
        }
    }

    /// Forwards one exchange to its upstream or TCP target, counted in the metrics.
    async fn exchange_uninspected(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let metrics = &self.metrics;
        let active = ActiveStream::new(&metrics.active_streams);
        // The metric label: the upstream's name, or the TCP tunnel's address.
        let upstream = match &head.target {
            Target::Tcp(addr) => addr.to_string(),
            Target::TcpPort(port) => format!("tcp port {port}"),
            other => other.upstream().unwrap_or_default().to_owned(),
        };
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
        let answered = match &head.target {
            Target::Tcp(addr) => {
                let timeout = self.connect_timeout;
                crate::tcp::connect(addr, self.allowed_targets.as_deref(), timeout, body).await
            }
            Target::TcpPort(port) => {
                let target = self.tunnels.borrow().tcp_target(*port).cloned();
                match target {
                    // The agent's own declaration: its allowed_targets (for what the relay
                    // pushes) do not apply.
                    Some(target) => crate::tcp::connect(&target, None, self.connect_timeout, body).await,
                    None => {
                        warn!(port, "connection for a TCP port this agent does not declare");
                        Err(StreamCode::UnknownUpstream)
                    }
                }
            }
            Target::Http(_) | Target::Upgrade(_) => self.forward(head, body).await,
            // Egress requests go the other way, to the relay; UDP flows belong to the session
            // (`crate::session::SessionHandler`).
            Target::Egress | Target::Udp(_) | Target::Peer(_) => Err(StreamCode::KindUnsupported),
        };
        let (head, body) = match answered {
            Ok(answered) => answered,
            Err(code) => {
                metrics.request(&upstream, code.as_str(), None);
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
    }
}

/// How long a replay waits for its answer's body to end (it is read only for the record).
const REPLAY_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a replay was not sent, or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The request is not (or no longer) in the inspector's ring.
    #[error("no such request in the inspector")]
    NotFound,
    /// Its request body was not captured whole (over `inspect_body_bytes`, or it did not end).
    #[error("its request body was not captured whole (over inspect_body_bytes, or cut)")]
    BodyNotWhole,
    /// The upstream could not be reached, or failed.
    #[error("the replay failed: {}", .0.as_str())]
    Failed(StreamCode),
}

impl RequestHandler for Forwarder {
    fn handle(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), StreamCode>> {
        Box::pin(self.exchange(head, body, None))
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
        UpstreamTable::build(&pushed, &[], None, None)
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
            tunnels: vec![],
        };
        let options = AgentOptions::from_config(file, std::path::Path::new("t.toml")).unwrap();
        let forwarder = Forwarder::new(&options, Arc::new(AgentMetrics::new()));
        forwarder.install_fresh(table(5, "http://127.0.0.1:5"));
        assert!(!forwarder.install(table(4, "http://127.0.0.1:4")), "version 4 after 5 must be ignored");
        assert_eq!(forwarder.upstreams().next_target("app").unwrap().host_port(), "127.0.0.1:5");
        assert!(forwarder.install(table(6, "http://127.0.0.1:6")));
        assert_eq!(forwarder.upstreams().next_target("app").unwrap().host_port(), "127.0.0.1:6");
    }
}
