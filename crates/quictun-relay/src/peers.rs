//! Forwarding between the relays of a cluster (`[cluster]`): the links this relay dials to the
//! others, and the requests it takes from them.
//!
//! A request for a group that has no agent on this relay goes to a relay the session directory
//! says holds one, over one QUIC connection per peer relay (dialed at the first request, the
//! peer's certificate pinned to the fingerprint it published in the directory, then kept), one
//! stream per request, in the wire format an agent gets: the agent's head wrapped in
//! [`Target::Peer`] with the group. The request id, the `X-Forwarded-*` headers and the body go
//! through unchanged.
//!
//! The peer lets a link in only when its first message carries the cluster's secret, and
//! dispatches what arrives on it to its own agents only: a request that came from a relay is
//! never forwarded again (one hop; a `Peer` inside a `Peer` is refused when its head is read).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use quictun_cluster::PeerRelay;
use quictun_core::Trust;
use quictun_core::control::ControlIo;
use quictun_core::stall::Reclaimer;
use quictun_core::tls::Pin;
use quictun_core::transport::{Connection, Transport};
use quictun_core::tunnel::Tunnel;
use quictun_proto::{CloseCode, ControlMessage, HostPort, Limits, PROTOCOL_VERSION, PeerHello, Token};
use quictun_quic::{Quic, QuicDialOptions, QuicDialer, QuicEndpoint, Tuning};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The longest a dial to a peer relay may take, its answer included.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed dial, requests for that relay fail at once for this long, rather than each
/// waiting a dial of its own.
const DIAL_BACKOFF: Duration = Duration::from_secs(1);
/// A link that hears nothing from its peer for this long is closed: a relay that died fails the
/// requests it was carrying within it. Keep-alives go every third of it.
const LINK_IDLE: Duration = Duration::from_secs(3);

/// Why a request could not be forwarded to a peer relay.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// Its link could not be set up.
    #[error("relay {relay:?} holds the agent but cannot be reached: {reason}")]
    Unreachable {
        /// The peer relay.
        relay: String,
        /// Why.
        reason: String,
    },
}

/// One link to a peer relay.
#[derive(Debug)]
pub struct PeerLink {
    /// The peer's relay id.
    pub relay_id: Arc<str>,
    /// `relay:<id>`, what logs name as the request's `client_id`.
    pub label: Arc<str>,
    /// Its counters (looked up once, not per request).
    pub forwarded: Counter,
    /// Requests on it that failed before an answer.
    pub failures: Counter,
    /// The tunnel requests go on.
    pub tunnel: Arc<dyn Tunnel>,
    /// Where it was dialed, and the pin it was dialed with (a peer that moved is dialed anew).
    advertise: String,
    pin: String,
}

/// A peer's link, and its dialing (one at a time).
#[derive(Debug, Default)]
struct LinkSlot {
    current: Mutex<Option<Arc<PeerLink>>>,
    dialing: tokio::sync::Mutex<Option<(Instant, String)>>,
}

/// The labels of the per-peer metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer relay.
    pub peer: String,
}

/// The per-peer metrics, both directions.
#[derive(Debug, Default, Clone)]
pub struct PeerMetrics {
    /// Requests this relay forwarded, by the peer they went to.
    pub forwarded: Family<PeerLabels, Counter>,
    /// Forwarded requests that failed before an answer (dial, link or exchange), by peer.
    pub forward_failures: Family<PeerLabels, Counter>,
    /// Requests this relay served for a peer, by the peer they came from.
    pub served: Family<PeerLabels, Counter>,
    /// Links dialed, by peer.
    pub dials: Family<PeerLabels, Counter>,
    /// Links open now (dialed by this relay, and accepted from peers).
    pub links: Gauge,
    /// Peers refused for a wrong cluster secret.
    pub refused: Counter,
}

impl PeerMetrics {
    /// Registers every metric under `quictun_cluster_*`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("cluster_forwarded", "Requests forwarded to another relay, by peer", self.forwarded.clone());
        registry.register(
            "cluster_forward_failures",
            "Forwarded requests that failed before an answer, by peer",
            self.forward_failures.clone(),
        );
        registry.register("cluster_served", "Requests served for another relay, by peer", self.served.clone());
        registry.register("cluster_peer_dials", "Links dialed to another relay, by peer", self.dials.clone());
        registry.register("cluster_peer_links", "Links between this relay and others, open now", self.links.clone());
        registry.register("cluster_peers_refused", "Relays refused for a wrong cluster secret", self.refused.clone());
    }

    /// The counter of `family` for `peer`.
    pub fn of<'a>(family: &'a Family<PeerLabels, Counter>, peer: &str) -> impl std::ops::Deref<Target = Counter> + 'a {
        family.get_or_create(&PeerLabels { peer: peer.to_owned() })
    }
}

/// The links this relay dials to the other relays of its cluster.
#[derive(Debug)]
pub struct Peers {
    relay_id: String,
    token: Token,
    limits: Limits,
    stall: Reclaimer,
    /// The client endpoints the links go from, one per address family, bound at the first dial.
    endpoints: Mutex<[Option<QuicEndpoint>; 2]>,
    links: Mutex<HashMap<String, Arc<LinkSlot>>>,
    turn: AtomicUsize,
    /// The per-peer metrics.
    pub metrics: PeerMetrics,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Peers {
    /// The links of relay `relay_id`, which presents `token` to its peers; each link's watcher
    /// runs on `tasks` until `stop`.
    pub fn new(
        relay_id: String,
        token: Token,
        limits: Limits,
        stall: Reclaimer,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        Self {
            relay_id,
            token,
            limits,
            stall,
            endpoints: Mutex::default(),
            links: Mutex::default(),
            turn: AtomicUsize::new(0),
            metrics: PeerMetrics::default(),
            tasks,
            stop,
        }
    }

    /// Whether `token` is the cluster's secret (in constant time).
    pub fn admits(&self, token: &Token) -> bool {
        bool::from(token.expose().as_bytes().ct_eq(self.token.expose().as_bytes()))
    }

    /// Where a request starts among `count` relays: each call the next (so the forwarded
    /// requests are shared among them).
    pub fn first_of(&self, count: usize) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed) % count.max(1)
    }

    /// The link to `holder`'s relay: the open one, or a new one dialed now (one dial at a time
    /// per relay; after a failure, none for [`DIAL_BACKOFF`]).
    pub async fn link(&self, holder: &PeerRelay) -> Result<Arc<PeerLink>, PeerError> {
        let slot = {
            let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            match links.get(&holder.relay_id) {
                Some(slot) => slot.clone(),
                None => links.entry(holder.relay_id.clone()).or_default().clone(),
            }
        };
        if let Some(link) = usable(&slot, holder) {
            return Ok(link);
        }
        let mut dialing = slot.dialing.lock().await;
        // Another request may have dialed it while this one waited.
        if let Some(link) = usable(&slot, holder) {
            return Ok(link);
        }
        let unreachable = |reason: String| PeerError::Unreachable { relay: holder.relay_id.clone(), reason };
        if let Some((at, reason)) = dialing.as_ref()
            && at.elapsed() < DIAL_BACKOFF
        {
            return Err(unreachable(reason.clone()));
        }
        PeerMetrics::of(&self.metrics.dials, &holder.relay_id).inc();
        let dialed = match tokio::time::timeout(DIAL_TIMEOUT, self.dial(holder)).await {
            Ok(dialed) => dialed,
            Err(_) => Err(format!("no answer within {DIAL_TIMEOUT:?}")),
        };
        match dialed {
            Ok(link) => {
                *dialing = None;
                let replaced = slot.current.lock().unwrap_or_else(PoisonError::into_inner).replace(link.clone());
                // A link to where the relay was before it moved (or got a new certificate).
                if let Some(old) = replaced {
                    old.tunnel.close(CloseCode::Normal);
                }
                Ok(link)
            }
            Err(reason) => {
                warn!(peer = %holder.relay_id, advertise = %holder.advertise, %reason, "could not reach a peer relay");
                *dialing = Some((Instant::now(), reason.clone()));
                Err(unreachable(reason))
            }
        }
    }

    /// Dials `holder`'s relay, says hello with the cluster's secret, and watches the link.
    async fn dial(&self, holder: &PeerRelay) -> Result<Arc<PeerLink>, String> {
        let pin: Pin = holder.pin.parse().map_err(|err| format!("its published pin: {err}"))?;
        let advertised: HostPort = holder.advertise.parse().map_err(|err| format!("its advertised address: {err}"))?;
        let addr = quictun_core::resolve(&advertised).await.map_err(|err| err.to_string())?;
        let options = QuicDialOptions {
            endpoint: self.endpoint(addr)?,
            trust: Trust::Pin(pin),
            tuning: link_tuning(),
            relay: HostPort::from(addr),
            server_name: advertised.host().to_owned(),
            handshake_timeout: DIAL_TIMEOUT,
            limits: self.limits,
            stall: self.stall.clone(),
        };
        let dialer = QuicDialer::new(options).map_err(|err| err.to_string())?;
        let hello = PeerHello {
            protocol_version: PROTOCOL_VERSION,
            relay_id: self.relay_id.clone(),
            token: self.token.clone(),
        };
        let Connection { mut control, tunnel, .. } =
            Quic::dial(&dialer, ControlMessage::PeerHello(hello)).await.map_err(|err| err.to_string())?;
        let refused = |why: String| {
            tunnel.close(CloseCode::Protocol);
            why
        };
        match control.recv_within(DIAL_TIMEOUT).await {
            Ok(ControlMessage::PeerAccepted(accepted)) if accepted.relay_id == holder.relay_id => {}
            Ok(ControlMessage::PeerAccepted(accepted)) => {
                return Err(refused(format!("it says it is relay {:?}", accepted.relay_id)));
            }
            Ok(ControlMessage::Rejected(rejected)) => return Err(refused(format!("refused: {}", rejected.message))),
            Ok(other) => {
                return Err(refused(format!("answered {}", quictun_core::control::message_name(&other))));
            }
            Err(err) => return Err(refused(format!("no answer to hello: {err}"))),
        }
        info!(peer = %holder.relay_id, advertise = %holder.advertise, "linked to a peer relay");
        let link = Arc::new(PeerLink {
            relay_id: holder.relay_id.as_str().into(),
            label: format!("relay:{}", holder.relay_id).into(),
            forwarded: PeerMetrics::of(&self.metrics.forwarded, &holder.relay_id).clone(),
            failures: PeerMetrics::of(&self.metrics.forward_failures, &holder.relay_id).clone(),
            tunnel,
            advertise: holder.advertise.clone(),
            pin: holder.pin.clone(),
        });
        self.metrics.links.inc();
        let (watched, links, stop) = (link.clone(), self.metrics.links.clone(), self.stop.clone());
        self.tasks.spawn(async move {
            watch(&watched, control, &stop).await;
            links.dec();
        });
        Ok(link)
    }

    /// The client endpoint for peers at `addr`'s address family.
    fn endpoint(&self, addr: SocketAddr) -> Result<QuicEndpoint, String> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(PoisonError::into_inner);
        let (index, any) = if addr.is_ipv4() {
            (0, SocketAddr::from(([0, 0, 0, 0], 0)))
        } else {
            (1, SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)))
        };
        if let Some(endpoint) = &endpoints[index] {
            return Ok(endpoint.clone());
        }
        let endpoint = QuicEndpoint::bind(any, &link_tuning()).map_err(|err| err.to_string())?;
        endpoints[index] = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Closes every link (at shutdown).
    pub fn close(&self) {
        for endpoint in self.endpoints.lock().unwrap_or_else(PoisonError::into_inner).iter().flatten() {
            endpoint.close(CloseCode::Normal);
        }
    }
}

/// The slot's link, when it is open and still where `holder` says.
fn usable(slot: &LinkSlot, holder: &PeerRelay) -> Option<Arc<PeerLink>> {
    let current = slot.current.lock().unwrap_or_else(PoisonError::into_inner);
    current
        .as_ref()
        .filter(|l| !l.tunnel.is_closed() && l.advertise == holder.advertise && l.pin == holder.pin)
        .cloned()
}

/// Keeps a link's control stream until the link ends (the peer closed it, or went silent for
/// [`LINK_IDLE`]), it says it goes away, or this relay stops; then closes the link so that the
/// next request dials anew.
async fn watch<C: ControlIo>(link: &PeerLink, mut control: C, stop: &CancellationToken) {
    let ended = async {
        loop {
            match control.recv().await {
                Ok(ControlMessage::GoAway(_)) => return "it goes away".to_owned(),
                Ok(other) => debug!(message = quictun_core::control::message_name(&other), "ignored on a peer link"),
                Err(err) => return err.to_string(),
            }
        }
    };
    tokio::select! {
        why = ended => info!(peer = %link.relay_id, %why, "link to a peer relay ended"),
        reason = link.tunnel.closed() => info!(peer = %link.relay_id, ?reason, "link to a peer relay closed"),
        () = stop.cancelled() => {}
    }
    link.tunnel.close(CloseCode::Normal);
}

/// The QUIC settings of a link this relay dials: no streams from the peer (only the control
/// stream, which this end opens), and a short idle timeout kept alive by frequent pings, so a
/// dead peer is known within [`LINK_IDLE`].
fn link_tuning() -> Tuning {
    Tuning { max_concurrent_streams: 0, idle_timeout: LINK_IDLE, keep_alive: LINK_IDLE / 3, ..Tuning::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> Peers {
        Peers::new(
            "r1".into(),
            Token::new("a-secret-of-some-length"),
            Limits::default(),
            Reclaimer::new(Default::default()),
            TaskTracker::new(),
            CancellationToken::new(),
        )
    }

    #[test]
    fn the_relays_take_turns() {
        let peers = peers();
        assert_eq!((0..5).map(|_| peers.first_of(2)).collect::<Vec<_>>(), [0, 1, 0, 1, 0]);
        assert_eq!(peers.first_of(0), 0, "no relay: no division by zero");
    }

    #[test]
    fn only_the_clusters_secret_is_admitted() {
        let peers = peers();
        assert!(peers.admits(&Token::new("a-secret-of-some-length")));
        assert!(!peers.admits(&Token::new("a-secret-of-some-lengtH")));
        assert!(!peers.admits(&Token::new("a-secret")));
        assert!(!peers.admits(&Token::new("")));
    }
}
