//! Heartbeat bookkeeping shared by both ends of the control stream: when to send, when the peer
//! has been silent too long, and the round-trip time measured from acks.

use std::time::Duration;

use quictun_proto::{ControlMessage, Heartbeat};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// The peer has been silent for longer than the limit.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("peer silent for {0:?}")]
pub struct Silent(pub Duration);

/// One side's heartbeat state.
#[derive(Debug)]
pub struct Heartbeats {
    ticker: Interval,
    silence_limit: Duration,
    epoch: Instant,
    last_heard: Instant,
    seq: u64,
    rtt: Option<Duration>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Heartbeats {
    /// Heartbeats every `interval`; the peer is dropped after `misses` silent intervals.
    pub fn new(interval: Duration, misses: u32) -> Self {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let now = Instant::now();
        Self { ticker, silence_limit: interval * misses.max(1), epoch: now, last_heard: now, seq: 0, rtt: None }
    }

    /// How long the peer may stay silent.
    pub fn silence_limit(&self) -> Duration {
        self.silence_limit
    }

    /// Records that the peer said something.
    pub fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// A heartbeat arrived: the ack to send back.
    pub fn on_heartbeat(&mut self, hb: Heartbeat) -> ControlMessage {
        self.heard();
        ControlMessage::HeartbeatAck(hb)
    }

    /// An ack of one of our heartbeats arrived: the measured round-trip time.
    pub fn on_ack(&mut self, hb: Heartbeat) -> Duration {
        self.heard();
        let rtt = Duration::from_micros(micros(self.epoch.elapsed()).saturating_sub(hb.sent_at_us));
        self.rtt = Some(rtt);
        rtt
    }

    /// The latest round-trip time.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Waits for the next tick (cancel-safe): the heartbeat to send, or [`Silent`] as soon as the
    /// peer has said nothing for the whole limit (not at the next tick: a dead peer's requests are
    /// answered that much sooner).
    pub async fn tick(&mut self) -> Result<ControlMessage, Silent> {
        let deadline = self.last_heard + self.silence_limit;
        tokio::select! {
            _ = self.ticker.tick() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        let silent_for = self.last_heard.elapsed();
        if silent_for >= self.silence_limit {
            return Err(Silent(silent_for));
        }
        self.seq += 1;
        Ok(ControlMessage::Heartbeat(Heartbeat {
            seq: self.seq,
            sent_at_us: micros(self.epoch.elapsed()),
            rtt_us: self.rtt.map(micros),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_measure_rtt_and_detect_silence() {
        let mut hb = Heartbeats::new(Duration::from_millis(100), 3);
        let ControlMessage::Heartbeat(sent) = hb.tick().await.unwrap() else { panic!("not a heartbeat") };
        assert_eq!(sent.seq, 1);
        tokio::time::advance(Duration::from_millis(7)).await;
        assert!(hb.on_ack(sent) >= Duration::from_millis(7));
        assert!(matches!(hb.on_heartbeat(sent), ControlMessage::HeartbeatAck(h) if h == sent));
        for _ in 0..3 {
            assert!(hb.tick().await.is_ok());
        }
        let silent = hb.tick().await.unwrap_err();
        // Detected at the limit itself, not at the next tick.
        assert_eq!(silent.0, Duration::from_millis(300));
    }
}
