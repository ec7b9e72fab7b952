//! quictun core: what the relay and the agent share, whatever transport carries their tunnel.
//!
//! The seam:
//! - [`tunnel`]: the [`tunnel::Tunnel`] trait each transport implements once (open an exchange,
//!   serve the peer's, close with a code, a typed close reason), and what crosses it.
//! - [`control`]: the control channel ([`control::ControlIo`]) and its frame codec.
//! - [`body`]: bodies crossing a tunnel: the one pump into a transport's sink, uploads owned by
//!   their answers.
//! - [`session`]: the control-session loop both ends run after registration.
//! - [`datagram`]: admission for datagram flows (a bounded number of flows, a bounded queue each,
//!   what does not fit dropped and counted).
//! - [`transport`]: the [`transport::Transport`] trait each transport implements once, from the
//!   relay's bind and accept (admission by address first) to the agent's dial.
//!
//! Above it, transport-neutral:
//! - [`http`]: HTTP heads in wire form (hop-by-hop stripping, conversion).
//! - [`framing`]: framed bodies (trailers after the body) and their decoder.
//! - [`edge`]: the HTTP edge: canonical paths, the request host, forwarding headers.
//! - [`stall`]: credit held by stalled readers, budgeted and reclaimed.
//! - [`heartbeat`]: heartbeat timing, silence detection and RTT.
//! - [`upgrade`]: upgraded connections (WebSocket): raw bytes both ways after a 101.
//! - [`upstream_http`]: one tunnelled request sent to an HTTP upstream (HTTP/1.1 or HTTP/2).
//! - [`tls`]: certificates (generate, load, pin) and rustls configurations.
//! - [`config`]: TOML loading with errors that name the file and the key.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`admin`]: the admin HTTP endpoint (health, readiness, metrics, bearer token).
//! - [`logsafe`]: strings from the network made inert for the logs (escaped, bounded).
//! - [`idle`]: an idle timeout for a spliced connection (bytes moving either way reset it).

pub mod admin;
pub mod backoff;
pub mod body;
pub mod config;
pub mod control;
pub mod datagram;
pub mod edge;
pub mod flows;
pub mod framing;
pub mod heartbeat;
pub mod http;
pub mod idle;
pub mod logsafe;
pub mod proxy_protocol;
pub mod session;
pub mod stall;
pub mod tls;
pub mod transport;
pub mod tunnel;
pub mod upgrade;
pub mod upstream_http;
pub mod upstream_tls;

pub use tls::{Pin, Trust};

/// How long a listener waits after a failed accept before trying again.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// The next connection on `listener`, with `TCP_NODELAY` set. A failed accept (out of file
/// descriptors and the like) is logged, naming the listener `what`, and retried after a short
/// pause instead of spinning. Cancel-safe, so it can race a shutdown signal in `select!`.
///
/// Every listener here answers with small writes (heads, frames, trailers) that Nagle's
/// algorithm would hold back until the peer's delayed ACK: 40 ms per exchange.
pub async fn accept_tcp(
    listener: &tokio::net::TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%err, listener = what, "could not set TCP_NODELAY");
                }
                return (stream, peer);
            }
            Err(err) => {
                tracing::warn!(%err, listener = what, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A name that did not resolve to an address.
#[derive(Debug, Clone, thiserror::Error)]
#[error("resolving {name}: {why}")]
pub struct ResolveError {
    /// The name, as configured (`host:port`).
    pub name: String,
    /// The resolver's answer.
    pub why: String,
}

/// The first address `name` resolves to.
pub async fn resolve(name: &quictun_proto::HostPort) -> Result<std::net::SocketAddr, ResolveError> {
    let failed = |why: String| ResolveError { name: name.to_string(), why };
    let mut addrs = tokio::net::lookup_host((name.host(), name.port())).await.map_err(|e| failed(e.to_string()))?;
    addrs.next().ok_or_else(|| failed("no address".into()))
}

/// An error and all its causes on one line (`outer: cause: root cause`), for logs and messages.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `err` and each error under it, outermost first. An `io::Error` that wraps another error is
/// followed by that error itself (its own `source` skips the error it wraps, and hyper-rustls
/// wraps tokio-rustls' `io::Error` in another).
pub fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| match e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
        Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
        None => e.source(),
    })
}

/// Pending connections a TCP listener may queue before it accepts them (the kernel caps it at
/// `net.core.somaxconn`). Tokio's default of 1024 made a burst of new clients overflow the queue:
/// the ones dropped retry their SYN only after a second, and `quictun bench`'s many workload (10k
/// clients at once) measured mostly those retries.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Binds a TCP listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as a restarted
/// server needs while old connections linger in TIME_WAIT).
pub fn listen_tcp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Bytes of receive and send buffer a tunnel's UDP socket asks for (where the system allows):
/// the default ~208 KiB loses bursts of datagrams even on loopback.
pub const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Binds a UDP socket on `addr` with [`UDP_SOCKET_BUFFER`]-byte buffers (an IPv6 socket takes
/// IPv4 too), non-blocking, for tokio.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Best effort: the system caps these (net.core.rmem_max) without failing.
    socket.set_recv_buffer_size(UDP_SOCKET_BUFFER).ok();
    socket.set_send_buffer_size(UDP_SOCKET_BUFFER).ok();
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// Sends one datagram on `socket` (to `to`, or to its connected peer) without waiting: straight
/// to the kernel, which takes it or says why not. (tokio's `try_send` also refuses while its own
/// readiness state has not yet seen the socket writable, as on a socket just made.)
pub fn send_datagram_now(
    socket: &tokio::net::UdpSocket,
    datagram: &[u8],
    to: Option<std::net::SocketAddr>,
) -> std::io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    match to {
        Some(to) => socket.send_to(datagram, &to.into()),
        None => socket.send(datagram),
    }
}

/// `work`, ended early when `cancel` fires.
pub async fn until_cancelled<F: std::future::Future<Output = ()>>(
    work: F,
    cancel: tokio_util::sync::CancellationToken,
) {
    tokio::select! {
        () = work => {}
        () = cancel.cancelled() => {}
    }
}

/// Runs `work` on `tasks` until it finishes or `cancel` fires, whichever comes first.
pub fn spawn_cancellable<F>(
    tasks: &tokio_util::task::TaskTracker,
    cancel: &tokio_util::sync::CancellationToken,
    work: F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = cancel.cancelled() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_listener_binds_with_a_deep_backlog_and_can_rebind_at_once() {
        let listener = super::listen_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // A connection left in TIME_WAIT by the old listener does not stop a restart on the port.
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(server);
        drop(client);
        drop(listener);
        let again = super::listen_tcp(addr).unwrap();
        assert_eq!(again.local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_nagle() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), super::accept_tcp(&listener, "test"));
        let (stream, peer) = accepted;
        assert_eq!(peer, client.unwrap().local_addr().unwrap());
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY is not set on the accepted stream");
    }
}
