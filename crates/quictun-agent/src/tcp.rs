//! TCP tunnels on the agent: a [`quictun_proto::StreamKind::Tcp`] stream names the `host:port` to
//! reach. The agent checks it against its allow list, connects under the connect timeout, answers
//! status 200, then splices the stream and the connection (each side's FIN passed on as a
//! half-close).

use std::time::Duration;

use quictun_core::body::TunnelBody;
use quictun_core::upgrade::spawn_splice;
use quictun_proto::{ResponseHead, StreamCode};
use tokio::net::TcpStream;
use tracing::warn;

use crate::upstreams::host_port_allowed;

/// Connects to `target` (`host:port`) and splices it to the relay's stream.
pub async fn connect(
    target: &str,
    allow: Option<&[String]>,
    timeout: Duration,
    from_relay: TunnelBody,
) -> Result<(ResponseHead, TunnelBody), StreamCode> {
    let Some((host, port)) = target.rsplit_once(':').and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
    else {
        warn!(%target, "TCP target is not host:port");
        return Err(StreamCode::Malformed);
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if allow.is_some_and(|allow| !host_port_allowed(host, target, allow)) {
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
