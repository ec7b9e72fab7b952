//! A UDP forwarder between one agent and the relay that can black-hole every packet, so an agent
//! can vanish without a word (as after `kill -9` or a cable pull), and that can record what the
//! agent sent (to replay it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A running forwarder.
pub struct UdpProxy {
    /// Where the agent should send.
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    recording: Arc<Mutex<Option<Vec<Vec<u8>>>>>,
    stop: CancellationToken,
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl UdpProxy {
    /// Forwards between the first client that sends to [`UdpProxy::addr`] and `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(target).await.unwrap();
        let addr = front.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let recording = Arc::new(Mutex::new(None::<Vec<Vec<u8>>>));
        let stop = CancellationToken::new();
        let (client_tx, mut client_rx) = tokio::sync::watch::channel(None::<SocketAddr>);
        {
            let (front, back, blackhole, stop) = (front.clone(), back.clone(), blackhole.clone(), stop.clone());
            let recording = recording.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let (n, from) = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = front.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
                    };
                    client_tx.send_replace(Some(from));
                    if let Some(recorded) = recording.lock().unwrap().as_mut() {
                        recorded.push(buf[..n].to_vec());
                    }
                    if !blackhole.load(Ordering::Relaxed) {
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            });
        }
        {
            let (blackhole, stop) = (blackhole.clone(), stop.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    let n = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = back.recv(&mut buf) => match r { Ok(n) => n, Err(_) => continue },
                    };
                    let client = *client_rx.borrow_and_update();
                    if let (Some(client), false) = (client, blackhole.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], client).await;
                    }
                }
            });
        }
        Self { addr, blackhole, recording, stop }
    }

    /// Drops every packet from now on, both ways.
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::Relaxed);
    }

    /// Keeps a copy of every datagram the client sends from now on, forwarded or black-holed
    /// (what an on-path attacker could record, or intercept).
    pub fn record(&self) {
        *self.recording.lock().unwrap() = Some(Vec::new());
    }

    /// The datagrams recorded since [`UdpProxy::record`], in order.
    pub fn recorded(&self) -> Vec<Vec<u8>> {
        self.recording.lock().unwrap().clone().unwrap_or_default()
    }

    /// Forwards packets again.
    pub fn restore(&self) {
        self.blackhole.store(false, Ordering::Relaxed);
    }
}
