//! A TCP forwarder between agents and the relay's gRPC listener that can go silent (every byte
//! held where it is, both connections left open: a path that drops everything) or reset its
//! connections (what the relay sees when an agent's process dies: the kernel resets its socket).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the forwarder does with the bytes of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Forwards both ways.
    Open,
    /// Reads nothing more from either side (the kernels' buffers fill, then the senders wait).
    Silent,
    /// Every connection reset (RST) and every new one refused.
    Reset,
}

/// A running forwarder.
pub struct TcpProxy {
    /// Where the agent should connect.
    pub addr: SocketAddr,
    path: watch::Sender<Path>,
    stop: CancellationToken,
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TcpProxy {
    /// Forwards every connection made to [`TcpProxy::addr`] to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (path, watching) = watch::channel(Path::Open);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let accepting = stop.clone();
        tokio::spawn(async move {
            loop {
                let front = tokio::select! {
                    _ = accepting.cancelled() => break,
                    accepted = listener.accept() => match accepted { Ok((front, _)) => front, Err(_) => continue },
                };
                if *watching.borrow() == Path::Reset {
                    reset(front);
                    continue;
                }
                let Ok(back) = TcpStream::connect(target).await else { continue };
                tasks.spawn(forward(front, back, watching.clone(), accepting.clone()));
            }
            tasks.close();
        });
        Self { addr, path, stop }
    }

    /// Holds every byte from now on, both ways, and says nothing to either end.
    pub fn blackhole(&self) {
        self.path.send_replace(Path::Silent);
    }

    /// Resets every connection (both ends see a RST) and refuses new ones.
    pub fn reset(&self) {
        self.path.send_replace(Path::Reset);
    }

    /// Forwards again (connections held by [`TcpProxy::blackhole`] go on where they stopped).
    pub fn restore(&self) {
        self.path.send_replace(Path::Open);
    }
}

/// Closes `stream` with a RST rather than a FIN, as the kernel does for a killed process that
/// left data unread.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn forward(front: TcpStream, back: TcpStream, mut path: watch::Receiver<Path>, stop: CancellationToken) {
    let _ = (front.set_nodelay(true), back.set_nodelay(true));
    let (mut front_read, mut front_write) = front.into_split();
    let (mut back_read, mut back_write) = back.into_split();
    let (upload, download) = (path.clone(), path.clone());
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async {
            tokio::join!(copy(&mut front_read, &mut back_write, upload), copy(&mut back_read, &mut front_write, download))
        } => {}
        _ = path.wait_for(|p| *p == Path::Reset) => {}
    }
    if let (Ok(front), Ok(back)) = (front_read.reunite(front_write), back_read.reunite(back_write)) {
        reset(front);
        reset(back);
    }
}

/// Copies `from` to `to` while the path is open, pausing (reading nothing) while it is silent;
/// returns at the end of `from` (after passing the FIN on) or at an error.
async fn copy(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, mut path: watch::Receiver<Path>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if path.wait_for(|p| *p == Path::Open).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            _ = path.wait_for(|p| *p != Path::Open) => continue,
        };
        match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
