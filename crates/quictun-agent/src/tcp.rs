//! TCP tunnels on the agent: a [`quictun_proto::Target::Tcp`] stream names the `host:port` to
//! reach. The agent checks it against its allow list, connects under the connect timeout, answers
//! status 200, then splices the stream and the connection (each side's FIN passed on as a
//! half-close).

use std::time::Duration;

use quictun_core::body::TunnelBody;
use quictun_core::upgrade::spawn_splice;
use quictun_proto::{HostPort, ResponseHead, StreamCode};
use tokio::net::TcpStream;
use tracing::warn;

use crate::upstreams::host_port_allowed;

/// Connects to `target` and splices it to the relay's stream.
pub async fn connect(
    target: &HostPort,
    allow: Option<&[String]>,
    timeout: Duration,
    from_relay: TunnelBody,
) -> Result<(ResponseHead, TunnelBody), StreamCode> {
    let (host, port) = (target.host(), target.port());
    if allow.is_some_and(|allow| !host_port_allowed(host, &target.to_string(), allow)) {
        warn!(%target, "refusing TCP target not in allowed_targets");
        return Err(StreamCode::TargetNotAllowed);
    }
    let stream = match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            warn!(%target, %err, "TCP upstream unreachable");
            return Err(StreamCode::UpstreamConnect);
        }
        Err(_) => {
            warn!(%target, ?timeout, "TCP upstream connect timed out");
            return Err(StreamCode::UpstreamTimeout);
        }
    };
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "could not set TCP_NODELAY");
    }
    let body = spawn_splice(async move { Some(stream) }, from_relay);
    Ok((ResponseHead { status: 200, headers: vec![], framed_body: false }, body))
}
