//! UDP flows on the agent: a [`quictun_proto::Target::Udp`] exchange sets up one flow (one
//! client address of a relay's `[[udp]]` listener). The agent checks the upstream against its
//! allow list, opens a socket of its own for the flow, connected to the upstream, so that the
//! upstream's replies come back to this flow alone, and answers status 200. Datagrams then cross
//! as DATAGRAM frames where the tunnel has them, or on the exchange ([`quictun_core::flows`]).
//! The flow ends when the relay ends its exchange (idle timeout, client gone) or the tunnel does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quictun_core::body::TunnelBody;
use quictun_core::datagram::FlowBudget;
use quictun_core::flows::{Deliver, DropReason, FlowLink, FlowTable, UdpMetrics, read_stream};
use quictun_core::proxy_protocol::{self, Carried};
use quictun_core::tunnel::Tunnel;
use quictun_core::upgrade::channel_body_of;
use quictun_proto::datagram::MAX_UDP_PAYLOAD;
use quictun_proto::{ResponseHead, StreamCode, UdpFlow};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use crate::upstreams::host_port_allowed;

/// Flows one session carries at once; the relay's own limits are lower by default.
pub const MAX_FLOWS_PER_SESSION: usize = 4096;
/// Datagrams a flow may have waiting for its stream.
const QUEUE_DATAGRAMS: usize = 64;

/// The UDP flows of one session with the relay.
#[derive(Debug)]
pub struct UdpFlows {
    table: Arc<FlowTable>,
    metrics: Arc<UdpMetrics>,
    budget: Arc<FlowBudget>,
    allowed_targets: Option<Vec<String>>,
    connect_timeout: Duration,
    ending: CancellationToken,
}

impl UdpFlows {
    /// The flows of the session on `tunnel`; upstreams are checked against `allowed_targets`
    /// and resolved within `connect_timeout`.
    pub fn new(
        tunnel: Arc<dyn Tunnel>,
        metrics: Arc<UdpMetrics>,
        allowed_targets: Option<Vec<String>>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            table: FlowTable::new(tunnel, metrics.clone()),
            metrics,
            budget: FlowBudget::new(MAX_FLOWS_PER_SESSION),
            allowed_targets,
            connect_timeout,
            ending: CancellationToken::new(),
        })
    }

    /// Ends every flow now (the agent is leaving: the relay sets them up again elsewhere, where
    /// waiting out a drain would only hold them on an agent that is going away).
    pub fn end_all(&self) {
        self.ending.cancel();
    }

    /// The session's flow table (its DATAGRAM reader is [`FlowTable::read_datagrams`]).
    pub fn table(&self) -> &Arc<FlowTable> {
        &self.table
    }

    /// Sets up `flow`: its upstream socket, and a task that moves its datagrams until the relay
    /// ends the exchange; answers 200 with the body that carries the upstream's replies.
    pub async fn open(&self, flow: &UdpFlow, from_relay: TunnelBody) -> Result<(ResponseHead, TunnelBody), StreamCode> {
        let target = &flow.upstream;
        if self
            .allowed_targets
            .as_deref()
            .is_some_and(|allow| !host_port_allowed(target.host(), &target.to_string(), allow))
        {
            warn!(%target, "refusing UDP target not in allowed_targets");
            return Err(StreamCode::TargetNotAllowed);
        }
        let slot = self.budget.admit().ok_or(StreamCode::Overloaded)?;
        let socket = Arc::new(self.connect(target).await?);
        let deliver = to_upstream(socket.clone(), flow.proxy_v2, self.metrics.clone());
        let Some(registered) = self.table.register(flow.flow, deliver.clone()) else {
            warn!(flow = flow.flow, "the relay set up a flow id that is in use");
            return Err(StreamCode::Malformed);
        };
        let (stream, body) = channel_body_of(QUEUE_DATAGRAMS);
        let mut link = FlowLink::new(flow.flow, stream.clone(), self.metrics.clone());
        // The relay registered the flow before it asked for it: replies may go as DATAGRAM frames.
        link.use_datagrams(self.table.tunnel());
        let (metrics, ending) = (self.metrics.clone(), self.ending.clone());
        metrics.flows.inc();
        tokio::spawn(
            async move {
                let mut buf = vec![0u8; MAX_UDP_PAYLOAD + 1];
                let requests = read_stream(from_relay, &deliver, &metrics);
                tokio::pin!(requests);
                loop {
                    tokio::select! {
                        received = socket.recv(&mut buf) => match received {
                            Ok(len) if len <= MAX_UDP_PAYLOAD => link.send(Bytes::copy_from_slice(&buf[..len])),
                            Ok(_) => metrics.drop_one(DropReason::too_large),
                            // An ICMP error for an earlier datagram (port unreachable): not the end.
                            Err(err) => debug!(%err, "UDP upstream receive failed"),
                        },
                        ended = &mut requests => {
                            if let Err(err) = ended {
                                debug!(%err, "UDP flow's stream ended");
                            }
                            break;
                        }
                        () = stream.closed() => break,
                        () = ending.cancelled() => break,
                    }
                }
                drop((registered, slot));
                metrics.flows.dec();
            }
            .in_current_span(),
        );
        Ok((ResponseHead { status: 200, headers: vec![], framed_body: false }, body))
    }

    /// A socket of the flow's own, connected to the upstream's first address.
    async fn connect(&self, target: &quictun_proto::HostPort) -> Result<UdpSocket, StreamCode> {
        let resolved =
            tokio::time::timeout(self.connect_timeout, tokio::net::lookup_host((target.host(), target.port())))
                .await
                .map_err(|_| StreamCode::UpstreamTimeout)?;
        let Some(addr) = resolved.ok().and_then(|mut addrs| addrs.next()) else {
            warn!(%target, "UDP upstream does not resolve");
            return Err(StreamCode::UpstreamConnect);
        };
        let local: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let socket = quictun_core::bind_udp(local).map_err(|err| {
            warn!(%err, "cannot open a UDP socket");
            StreamCode::UpstreamConnect
        })?;
        socket.connect(addr).await.map_err(|err| {
            warn!(%target, %err, "UDP upstream unreachable");
            StreamCode::UpstreamConnect
        })?;
        Ok(socket)
    }
}

/// Sends a datagram from the tunnel to the upstream, after the flow's PROXY protocol v2 header
/// when it has one. Never waits.
fn to_upstream(
    socket: Arc<UdpSocket>,
    proxy_v2: Option<(SocketAddr, SocketAddr)>,
    metrics: Arc<UdpMetrics>,
) -> Deliver {
    let header = proxy_v2.map(|(client, relay)| proxy_protocol::v2(client, relay, Carried::Datagram));
    Arc::new(move |datagram: Bytes| {
        let sent = match &header {
            Some(header) => {
                let mut whole = BytesMut::with_capacity(header.len() + datagram.len());
                whole.extend_from_slice(header);
                whole.extend_from_slice(&datagram);
                quictun_core::send_datagram_now(&socket, &whole, None)
            }
            None => quictun_core::send_datagram_now(&socket, &datagram, None),
        };
        if sent.is_err() {
            metrics.drop_one(DropReason::socket);
        }
    })
}
