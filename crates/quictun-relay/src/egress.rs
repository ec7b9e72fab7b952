//! Egress, the reverse direction: requests that machines next to an agent send to its egress
//! listener arrive on streams the agent opens, and the relay forwards them by its
//! `[[egress_routes]]` to targets it can reach.
//!
//! The answers follow the ingress's error table: no route → 404, a group the route does not allow
//! → 403 (both answered by the relay itself), and upstream failures reset the stream with the
//! code the agent maps to 502 or 504.

use std::sync::Arc;

use http_body_util::BodyExt;
use quictun_core::body::TunnelBody;
use quictun_core::logsafe::Inert;
use quictun_core::tunnel::{BoxFuture, RequestHandler};
use quictun_proto::{Limits, RequestHead, ResponseHead, StreamCode, Target};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info_span, warn};

use crate::state::RelayState;

/// Serves the egress requests of one agent session.
pub struct EgressHandler {
    shared: Arc<RelayState>,
    group: Arc<str>,
    /// Egress requests in flight for this session (`max_egress_streams_per_agent`); the QUIC
    /// transport bounds them by stream count too, the gRPC one only here.
    in_flight: Arc<Semaphore>,
}

impl EgressHandler {
    /// A handler for an agent of `group`.
    pub fn new(shared: Arc<RelayState>, group: Arc<str>) -> Self {
        let in_flight = Arc::new(Semaphore::new(shared.settings.max_egress_streams_per_agent as usize));
        Self { shared, group, in_flight }
    }

    async fn forward(&self, head: RequestHead, body: TunnelBody) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        if head.target != Target::Egress {
            return Err(StreamCode::KindUnsupported);
        }
        let host = head.headers.iter().find(|h| h.name.eq_ignore_ascii_case("host")).map(|h| h.value.clone());
        let Some(host) = host.and_then(|h| String::from_utf8(h).ok()) else {
            return Ok(refusal(400, "egress request without a Host header"));
        };
        // Matched and forwarded in canonical form, as on the ingress.
        let mut head = head;
        match quictun_core::edge::path::normalize(&head.uri) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(canonical)) => head.uri = canonical,
            Err(err) => return Ok(refusal(400, &format!("bad request: {err}"))),
        }
        let path = head.uri.split('?').next().unwrap_or("/");
        let live = self.shared.live.current();
        let Some(route) = live.egress.route(&host, path) else {
            debug!(host = %Inert(&host), path = %Inert(path), "no egress route");
            self.shared.runtime.metrics.egress("-", "404");
            return Ok(refusal(404, &format!("no egress route for host {host:?} and path {path:?}")));
        };
        if !route.allows(&self.group) {
            warn!(host = %Inert(&host), group = %self.group, "egress route not open to this group");
            self.shared.runtime.metrics.egress(&route.target.host_port(), "403");
            return Ok(refusal(403, &format!("egress to {host:?} is not allowed for group {:?}", self.group)));
        }
        let target = route.target.clone();
        drop(live);
        let Ok(slot) = self.in_flight.clone().try_acquire_owned() else {
            self.shared.runtime.metrics.egress(&target.host_port(), "Overloaded");
            return Err(StreamCode::Overloaded);
        };
        let answered = self.shared.runtime.egress_http.send(&target, head, body).await.map(|(head, body)| {
            // The slot is held until the response body is done.
            let body = body.map_frame(move |frame| {
                let _held = &slot;
                frame
            });
            (head, body.boxed_unsync())
        });
        let outcome = match &answered {
            Ok((head, _)) => head.status.to_string(),
            Err(code) => code.as_str().to_owned(),
        };
        self.shared.runtime.metrics.egress(&target.host_port(), &outcome);
        answered
    }
}

/// An answer the relay gives itself, as plain text.
fn refusal(status: u16, message: &str) -> (ResponseHead, TunnelBody) {
    quictun_core::body::text_answer(status, message, Vec::new())
}

impl RequestHandler for EgressHandler {
    fn handle(
        &self,
        head: RequestHead,
        body: TunnelBody,
    ) -> BoxFuture<'_, Result<(ResponseHead, TunnelBody), StreamCode>> {
        let span = info_span!("egress", request_id = %head.request_id, method = %head.method, uri = %head.uri);
        Box::pin(self.forward(head, body).instrument(span))
    }

    fn limits(&self) -> Limits {
        self.shared.settings.limits
    }
}
