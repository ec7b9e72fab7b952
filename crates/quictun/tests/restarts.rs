//! A relay that restarts brings its agents back on QUIC (`--transport auto` falls back to gRPC
//! only on evidence that QUIC keeps failing while gRPC answers), and a QUIC port that does not
//! answer is named as such. Real relay and agent processes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod procs;

use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use procs::*;

/// A loopback TCP port and a UDP port free now.
fn free_ports() -> (u16, u16) {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    (tcp, udp)
}

/// Writes the relay's file with fixed ports (a restart takes the same ones) and its identity.
fn relay_file(dir: &std::path::Path, quic: u16, grpc: u16) -> std::path::PathBuf {
    let out = std::process::Command::new(BIN)
        .args(["cert", "gen", "--out", dir.join("certs").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\nquic_listen = \"127.0.0.1:{quic}\"\ngrpc_listen = \"127.0.0.1:{grpc}\"\n\
             http_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             cert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\
             [[clients]]\nid = \"office-1\"\ntoken = \"right\"\ngroup = \"web\"\n"
        ),
    )
    .unwrap();
    config
}

/// `quictun agent` in its default `auto` transport, with the relay's QUIC and gRPC addresses.
fn agent(dir: &std::path::Path, quic: &str, grpc: &str, pin: &str) -> Proc {
    let args =
        ["agent", "--relay", quic, "--grpc-relay", grpc, "--pin", pin, "--client-id", "office-1", "--token", "right"];
    Proc::spawn(&args, dir)
}

#[test]
fn a_relay_stopped_for_two_and_a_half_seconds_ten_times_gets_its_agent_back_on_quic_each_time() {
    let dir = TempDir::new();
    let ((grpc, _), (_, quic)) = (free_ports(), free_ports());
    let config = relay_file(&dir, quic, grpc);
    let start_relay = || {
        let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
        relay.line_with("HTTP ingress");
        relay
    };
    let mut relay = start_relay();
    let pin = relay.line_with("  pin ").split_whitespace().last().unwrap().to_owned();
    let (quic_addr, grpc_addr) = (format!("127.0.0.1:{quic}"), format!("127.0.0.1:{grpc}"));
    // The default transport (auto) and timeouts.
    let agent = agent(&dir, &quic_addr, &grpc_addr, &pin);
    let first = agent.line_with("connected to");
    assert!(first.contains("over QUIC"), "{first}");

    let mut back = Vec::new();
    for round in 1..=10 {
        relay.terminate();
        assert_eq!(relay.wait_exit().0, 0);
        std::thread::sleep(Duration::from_millis(2500));
        let started = Instant::now();
        relay = start_relay();
        let line = agent.line_with("connected to");
        back.push(started.elapsed());
        assert!(line.contains("over QUIC"), "round {round}: {line}");
    }
    eprintln!("relay start to agent registered, ten restarts: {back:?}");
    let slowest = back.iter().max().unwrap();
    assert!(*slowest <= Duration::from_secs(3), "an agent took {slowest:?} to come back: {back:?}");
}

#[test]
fn a_quic_port_that_does_not_answer_is_named_before_the_agent_uses_grpc() {
    let dir = TempDir::new();
    let ((grpc, _), (_, quic)) = (free_ports(), free_ports());
    let config = relay_file(&dir, quic, grpc);
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let pin = relay.line_with("  pin ").split_whitespace().last().unwrap().to_owned();
    let (_, wrong) = free_ports();
    let (wrong_addr, grpc_addr) = (format!("127.0.0.1:{wrong}"), format!("127.0.0.1:{grpc}"));
    let agent = agent(&dir, &wrong_addr, &grpc_addr, &pin);
    let told = agent.line_with("using gRPC");
    assert!(told.contains(&format!("no QUIC answer from {wrong_addr}")), "{told}");
    assert!(told.contains(&format!("{wrong} not its QUIC port")), "{told}");
    assert!(told.contains("2 times in a row, while gRPC answered"), "{told}");
    let connected = agent.line_with("connected to");
    assert!(connected.contains("over gRPC"), "{connected}");
}
