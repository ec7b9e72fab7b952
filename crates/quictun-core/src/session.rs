//! The life of a tunnel's control channel once the agent is registered, the same loop at both
//! ends: heartbeats both ways with the round-trip time, the silence limit, what this end sends on
//! its own (config_sync, go-away), and the messages only one end handles, handed to its
//! [`Role`].
//!
//! The loop ends when the tunnel closes ([`Err`] with the reason), when the peer is silent for
//! the limit or breaks the protocol (the tunnel is closed with the matching code first), or when
//! the role ends the session itself ([`Ok`] with the role's own value).

use std::future::Future;
use std::time::Duration;

use quictun_proto::{CloseCode, ControlMessage};

use crate::control::{ControlError, ControlIo, message_name};
use crate::heartbeat::Heartbeats;
use crate::tunnel::{CloseReason, ProtocolViolation, Tunnel};

/// What a role wants next.
#[derive(Debug)]
pub enum Action<E> {
    /// Send this message to the peer.
    Send(ControlMessage),
    /// Send this message (within the silence limit), then end the session with `E`.
    SendThenEnd(ControlMessage, E),
}

/// What one end does with the session beyond heartbeats.
pub trait Role: Send {
    /// How the role ends a session by itself (the agent: shutdown, or a switch of transport).
    type End: Send;

    /// The peer said something (any message); its health is current.
    fn heard(&mut self) {}

    /// A heartbeat round trip was measured.
    fn round_trip(&mut self, _rtt: Duration) {}

    /// A message the loop does not handle itself (not a heartbeat or its ack). An error is a
    /// protocol violation: the tunnel is closed.
    fn on_message(&mut self, msg: ControlMessage) -> Result<(), ProtocolViolation>;

    /// Waits for something this end wants to do. Must be cancel-safe (it races the peer's
    /// messages); a role with nothing to do waits forever.
    fn next(&mut self) -> impl Future<Output = Action<Self::End>> + Send;
}

/// Runs the session on `control` until it ends (see the module documentation).
pub async fn run<C: ControlIo, R: Role>(
    control: &mut C,
    tunnel: &dyn Tunnel,
    heartbeats: &mut Heartbeats,
    role: &mut R,
) -> Result<R::End, CloseReason> {
    let closed = tunnel.closed();
    tokio::pin!(closed);
    loop {
        let (outgoing, then_end) = tokio::select! {
            reason = &mut closed => return Err(reason),
            action = role.next() => match action {
                Action::Send(msg) => (Some(msg), None),
                Action::SendThenEnd(msg, end) => (Some(msg), Some(end)),
            },
            msg = control.recv() => {
                let reply = match msg {
                    Ok(ControlMessage::Heartbeat(hb)) => Some(heartbeats.on_heartbeat(hb)),
                    Ok(ControlMessage::HeartbeatAck(hb)) => {
                        role.round_trip(heartbeats.on_ack(hb));
                        None
                    }
                    Ok(other) => {
                        heartbeats.heard();
                        if let Err(violation) = role.on_message(other) {
                            tunnel.close(CloseCode::Protocol);
                            return Err(CloseReason::Protocol(violation));
                        }
                        None
                    }
                    Err(ControlError::Frame(err)) => {
                        tunnel.close(CloseCode::Protocol);
                        return Err(CloseReason::Protocol(ProtocolViolation::Malformed(err.to_string())));
                    }
                    Err(err) => return Err(lost(tunnel, err).await),
                };
                role.heard();
                (reply, None)
            }
            tick = heartbeats.tick() => match tick {
                Ok(heartbeat) => (Some(heartbeat), None),
                Err(silent) => {
                    tunnel.close(CloseCode::HeartbeatTimeout);
                    return Err(CloseReason::Silent(silent.0));
                }
            },
        };
        if let Some(msg) = outgoing {
            let name = message_name(&msg);
            match tokio::time::timeout(heartbeats.silence_limit(), control.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) if then_end.is_some() => tracing::debug!(%err, message = name, "not sent"),
                Ok(Err(err)) => return Err(lost(tunnel, err).await),
                Err(_) => {
                    tunnel.close(CloseCode::HeartbeatTimeout);
                    return Err(CloseReason::Protocol(ProtocolViolation::NotReading));
                }
            }
        }
        if let Some(end) = then_end {
            return Ok(end);
        }
    }
}

/// How long the loop waits for a tunnel whose control channel failed to report why it closed.
const CLOSE_REPORT: Duration = Duration::from_millis(200);

/// Why the session ended when its control channel failed: the tunnel's own reason when it has
/// one (the control channel usually fails because the tunnel did), the channel's error otherwise.
async fn lost(tunnel: &dyn Tunnel, err: ControlError) -> CloseReason {
    match tokio::time::timeout(CLOSE_REPORT, tunnel.closed()).await {
        Ok(reason) => reason,
        Err(_) => CloseReason::Failed(format!("control channel: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{BoxFuture, ExchangeError, RequestHandler, TransportKind};
    use quictun_proto::{GoAway, Heartbeat, RequestHead, ResponseHead};
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// A control channel made of two queues.
    struct Channel {
        inbound: mpsc::Receiver<ControlMessage>,
        outbound: mpsc::Sender<ControlMessage>,
    }

    impl ControlIo for Channel {
        async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
            self.inbound.recv().await.ok_or(ControlError::Closed)
        }
        async fn send(&mut self, msg: ControlMessage) -> Result<(), ControlError> {
            self.outbound.send(msg).await.map_err(|_| ControlError::Closed)
        }
        fn finish(&mut self) {}
    }

    /// A tunnel that only records its close.
    #[derive(Debug, Default)]
    struct Closing {
        closed: CancellationToken,
        code: Mutex<Option<CloseCode>>,
    }

    impl Tunnel for Closing {
        fn open(
            &self,
            _: RequestHead,
            _: crate::body::TunnelBody,
            _: Option<std::net::IpAddr>,
        ) -> BoxFuture<'_, Result<(ResponseHead, crate::body::TunnelBody), ExchangeError>> {
            Box::pin(async { Err(ExchangeError::NotOpened) })
        }
        fn serve(
            &self,
            _: Arc<dyn RequestHandler>,
            _: tokio_util::task::TaskTracker,
            _: CancellationToken,
        ) -> BoxFuture<'_, CloseReason> {
            Box::pin(async { CloseReason::Ended })
        }
        fn close(&self, code: CloseCode) {
            *self.code.lock().unwrap() = Some(code);
            self.closed.cancel();
        }
        fn is_closed(&self) -> bool {
            self.closed.is_cancelled()
        }
        fn closed(&self) -> BoxFuture<'_, CloseReason> {
            Box::pin(async {
                self.closed.cancelled().await;
                CloseReason::Closed(self.code.lock().unwrap().unwrap_or(CloseCode::Normal))
            })
        }
        fn remote_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 1))
        }
        fn transport(&self) -> TransportKind {
            TransportKind::Quic
        }
    }

    /// Counts what it is told; ends the session when `stop` fires, after a go-away.
    struct Recorder {
        heard: usize,
        rtts: usize,
        stop: CancellationToken,
    }

    impl Role for Recorder {
        type End = &'static str;
        fn heard(&mut self) {
            self.heard += 1;
        }
        fn round_trip(&mut self, _rtt: Duration) {
            self.rtts += 1;
        }
        fn on_message(&mut self, msg: ControlMessage) -> Result<(), ProtocolViolation> {
            match msg {
                ControlMessage::GoAway(_) => Ok(()),
                other => Err(ProtocolViolation::Unexpected(message_name(&other))),
            }
        }
        async fn next(&mut self) -> Action<&'static str> {
            self.stop.cancelled().await;
            Action::SendThenEnd(ControlMessage::GoAway(GoAway { drain_ms: 0, reason: "bye".into() }), "stopped")
        }
    }

    fn session() -> (Channel, mpsc::Sender<ControlMessage>, mpsc::Receiver<ControlMessage>) {
        let (to_us, inbound) = mpsc::channel(8);
        let (outbound, from_us) = mpsc::channel(8);
        (Channel { inbound, outbound }, to_us, from_us)
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_are_answered_and_a_role_ends_after_its_go_away() {
        let (mut channel, peer, mut sent) = session();
        let tunnel = Closing::default();
        let mut heartbeats = Heartbeats::new(Duration::from_secs(1), 3);
        let mut role = Recorder { heard: 0, rtts: 0, stop: CancellationToken::new() };
        let stop = role.stop.clone();
        let hb = Heartbeat { seq: 7, sent_at_us: 0, rtt_us: None };
        peer.send(ControlMessage::Heartbeat(hb)).await.unwrap();
        let driver = async {
            // Our own first heartbeat and the answer to the peer's, in either order.
            let (first, second) = (sent.recv().await.unwrap(), sent.recv().await.unwrap());
            let ours = |m: &ControlMessage| matches!(m, ControlMessage::Heartbeat(_));
            let answer = ControlMessage::HeartbeatAck(hb);
            assert!((ours(&first) && second == answer) || (first == answer && ours(&second)), "{first:?} {second:?}");
            stop.cancel();
            assert!(matches!(sent.recv().await, Some(ControlMessage::GoAway(_))));
        };
        let (ended, ()) = tokio::join!(run(&mut channel, &tunnel, &mut heartbeats, &mut role), driver);
        assert_eq!(ended.unwrap(), "stopped");
        assert_eq!(role.heard, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_and_an_unexpected_message_close_the_tunnel() {
        let (mut channel, _peer, _sent) = session();
        let tunnel = Closing::default();
        let mut heartbeats = Heartbeats::new(Duration::from_secs(1), 3);
        let mut role = Recorder { heard: 0, rtts: 0, stop: CancellationToken::new() };
        let ended = run(&mut channel, &tunnel, &mut heartbeats, &mut role).await;
        assert!(matches!(ended, Err(CloseReason::Silent(after)) if after >= Duration::from_secs(3)), "{ended:?}");
        assert_eq!(*tunnel.code.lock().unwrap(), Some(CloseCode::HeartbeatTimeout));

        let (mut channel, peer, _sent) = session();
        let tunnel = Closing::default();
        peer.send(ControlMessage::ConfigSync(Default::default())).await.unwrap();
        let ended = run(&mut channel, &tunnel, &mut Heartbeats::new(Duration::from_secs(1), 3), &mut role).await;
        assert_eq!(ended.unwrap_err(), CloseReason::Protocol(ProtocolViolation::Unexpected("config_sync")));
        assert_eq!(*tunnel.code.lock().unwrap(), Some(CloseCode::Protocol));
    }
}
