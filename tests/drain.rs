//! Graceful drain: a rolling restart of the relay under steady load loses no request that was
//! accepted before the signal.
//!
//! The load opens a fresh TCP connection per request and notes when the connection was
//! established. A request whose connection was established before the relay was told to stop was
//! accepted (the kernel completed it, the relay takes its queue before closing the listener): it
//! must be answered 200 in full. Requests that connect after the signal, until the agent is back on
//! the new relay, may be refused or answered 502; nothing may fail in any other way. Slow requests in flight at the signal finish during the drain.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quictun_tests::{Harness, HarnessConfig, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const ROUNDS: usize = 3;
const HANGING: usize = 10;

/// What happened to one request.
#[derive(Debug)]
enum Outcome {
    /// The connection could not be established (no listener): not accepted.
    Refused,
    /// Connected at this instant, then got this status line and body (or an error).
    Answered { connected: Instant, result: Result<(u16, String), String> },
}

async fn one_request(addr: SocketAddr, path: &str) -> Outcome {
    let Ok(mut stream) = TcpStream::connect(addr).await else { return Outcome::Refused };
    let connected = Instant::now();
    let result = async {
        let request = format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
            .await
            .map_err(|_| "no answer within 20 s".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad answer {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }
    .await;
    Outcome::Answered { connected, result }
}

async fn a_rolling_restart_under_load_loses_no_accepted_request(transport: Transport) {
    let mut h = Harness::start_with(HarnessConfig { transport, ..Default::default() }).await;
    let _agent = h.agent("agent-1").await;
    let http = h.relay().http_addr();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (outcomes, stop) = (outcomes.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let outcome = one_request(http, "/hello").await;
                    if !matches!(outcome, Outcome::Answered { result: Ok((200, _)), .. }) {
                        // The service is down during the restart gap: do not spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();

    // (signal, agent back): the windows in which the service was down.
    let mut gaps = Vec::new();
    for round in 0..ROUNDS {
        let served = |outcomes: &Mutex<Vec<Outcome>>| {
            outcomes.lock().unwrap().iter().filter(|o| matches!(o, Outcome::Answered { result: Ok(_), .. })).count()
        };
        // Steady state: the tunnel answers before the signal.
        let before = served(&outcomes);
        let deadline = Instant::now() + WAIT;
        while served(&outcomes) < before + 50 {
            assert!(Instant::now() < deadline, "round {round}: load not served after the restart");
            tokio::task::yield_now().await;
        }
        // Slow requests in flight at the signal.
        h.upstream.rearm();
        let slow: Vec<_> = (0..HANGING).map(|_| tokio::spawn(one_request(http, "/hang"))).collect();
        h.upstream.wait_hanging(HANGING).await;

        let old = h.take_relay();
        let listen = Harness::listeners_of(&old);
        let signal = Instant::now();
        let drain = tokio::spawn(old.shutdown());
        // The relay is draining: let the slow requests finish now.
        h.upstream.release();
        for request in slow {
            match request.await.unwrap() {
                Outcome::Answered { result: Ok((200, body)), .. } => assert_eq!(body, "released"),
                other => panic!("round {round}: a request in flight at the signal was lost: {other:?}"),
            }
        }
        tokio::time::timeout(WAIT, drain).await.expect("drain did not finish").unwrap();
        h.start_relay_on(listen).await;
        assert!(
            h.relay().sessions().wait_until(WAIT, |s| s.get("agent-1").is_some()).await,
            "round {round}: the agent did not come back"
        );
        // Until the agent is back, the new relay answers 502 (no agent): said, not lost.
        gaps.push((signal, Instant::now()));
    }
    stop.cancel();
    for task in load {
        task.await.unwrap();
    }

    let outcomes = outcomes.lock().unwrap();
    let (mut ok, mut refused, mut late_failures) = (0, 0, 0);
    for outcome in outcomes.iter() {
        match outcome {
            Outcome::Refused => refused += 1,
            Outcome::Answered { result: Ok((200, body)), .. } => {
                assert_eq!(body, "hello");
                ok += 1;
            }
            Outcome::Answered { connected, result } => {
                // Only a connection made between a signal and the agent's return may fail.
                let in_a_gap = gaps.iter().any(|(signal, restarted)| signal < connected && connected < restarted);
                assert!(in_a_gap, "a request accepted by a running relay failed: {result:?}");
                late_failures += 1;
            }
        }
    }
    eprintln!(
        "rolling restart x{ROUNDS}: {ok} answered, {refused} refused in the gaps, {late_failures} turned away after a signal"
    );
    assert!(ok > 150, "only {ok} requests answered");
}

quictun_tests::on_both_transports!(a_rolling_restart_under_load_loses_no_accepted_request,);
