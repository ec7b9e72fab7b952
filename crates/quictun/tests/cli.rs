//! The `quictun` binary as a user runs it: help, exit codes, configuration errors, certificates,
//! and relay, agent and demo as real processes talking over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod procs;

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use procs::*;

/// One timed or CPU-heavy test at a time: the tests that assert how long something took run
/// alone, never beside the benchmark smoke test (which keeps both cores busy) nor beside any other
/// test of this file, so that what they measure is the code, not a neighbour.
static TIMED: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Takes the timed tests' turn, alone (held for the whole test; a failed test does not block the
/// rest).
fn timed_turn() -> std::sync::RwLockWriteGuard<'static, ()> {
    TIMED.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes an untimed test's turn: beside other untimed tests, never beside a timed one (these
/// start processes, open hundreds of connections or run the demo: on two cores, enough to stall
/// a timed test's request by 100 ms, as CI once saw).
fn untimed_turn() -> std::sync::RwLockReadGuard<'static, ()> {
    TIMED.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn quictun(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env_remove("QUICTUN_TOKEN").output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The `[[clients]]` entry the relay tests use.
const OFFICE_CLIENT: &str = "[[clients]]\nid = \"office-1\"\ntoken = \"right\"\ngroup = \"web\"\n";

fn http_get(addr: &str, path: &str) -> String {
    try_http_get(addr, path).unwrap()
}

#[test]
fn every_command_has_help() {
    let _turn = untimed_turn();
    for args in [
        &["--help"][..],
        &["relay", "--help"],
        &["agent", "--help"],
        &["cert", "gen", "--help"],
        &["cert", "pin", "--help"],
        &["demo", "--help"],
    ] {
        let out = quictun(args);
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"), "{args:?}");
    }
}

#[test]
fn usage_and_configuration_errors_exit_2_naming_file_and_key() {
    let _turn = untimed_turn();
    let out = quictun(&["relay", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));

    let dir = TempDir::new();
    let missing = dir.join("missing.toml");
    let out = quictun(&["relay", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("missing.toml"), "{}", stderr(&out));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[relay]\nquic_listn = \"0.0.0.0:1\"\n").unwrap();
    let out = quictun(&["relay", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("bad.toml") && stderr(&out).contains("quic_listn"), "{}", stderr(&out));
    assert!(stderr(&out).contains("did you mean `quic_listen`?"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("http_listen"), "not the list of every key: {}", stderr(&out));

    let dangling = dir.join("dangling.toml");
    std::fs::write(&dangling, "[[routes]]\nhost = \"a\"\nupstream = \"nope\"\n").unwrap();
    let out = quictun(&["relay", "--config", dangling.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("routes[0].upstream"), "{}", stderr(&out));
    assert!(!dir.join("certs").exists(), "a broken file leaves no new identity behind");

    let out = quictun(&["agent", "--client-id", "x", "--token", "t", "--pin", "sha256:00"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("agent.relay"), "{}", stderr(&out));

    let out = quictun(&["agent", "--relay", "h:1", "--client-id", "x", "--token", "t", "--pin", "sha256:zz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("agent.pin"), "{}", stderr(&out));

    let out = quictun(&["agent", "--relay", "h:1", "--client-id", "x", "--pin", &format!("sha256:{}", "0".repeat(64))]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("QUICTUN_TOKEN"), "{}", stderr(&out));
}

#[test]
fn cert_gen_writes_a_private_key_and_cert_pin_agrees() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let out = quictun(&["cert", "gen", "--out", dir.to_str().unwrap(), "--san", "relay.example.com"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let pin = stdout.lines().find_map(|l| l.strip_prefix("pin:")).unwrap().trim().to_owned();
    assert!(pin.starts_with("sha256:") && pin.len() == 71);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("relay.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key readable by others: {mode:o}");
    }
    let out = quictun(&["cert", "pin", dir.join("relay.crt").to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pin);
    // No silent overwrite.
    let again = quictun(&["cert", "gen", "--out", dir.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    let not_a_cert = quictun(&["cert", "pin", "/etc/hostname"]);
    assert_eq!(not_a_cert.status.code(), Some(2));
}

#[test]
fn relay_generates_a_cert_and_real_agents_are_refused_for_a_wrong_pin_or_token() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let config = loopback_relay_config(&dir, "public_name = \"127.0.0.1\"\n", OFFICE_CLIENT);
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let quic = relay.line_with("udp://").rsplit("udp://").next().unwrap().trim().to_owned();
    let pin = relay.line_with("pin").split_whitespace().last().unwrap().to_owned();
    let command = relay.line_with("agent command");
    assert!(command.contains(&pin) && command.contains("--client-id office-1"), "{command}");
    assert!(!command.contains("--token"), "the token belongs in QUICTUN_TOKEN: {command}");
    assert!(dir.join("certs/relay.crt").exists() && dir.join("certs/relay.key").exists());

    // The printed command, pasted with the real token, connects (over QUIC, or gRPC on the port
    // it names).
    let pasted = command.split_once("agent command").unwrap().1.trim().replace("<office-1's token>", "right");
    let mut shell = Command::new("sh");
    // `exec env`: the agent replaces the shell, so that dropping the process stops it.
    shell.arg("-c").arg(format!("exec env {}", pasted.replace(" quictun ", &format!(" {BIN} "))));
    let agent = Proc::spawn_command(shell, &dir);
    agent.line_with("quictun agent connected");
    drop(agent);

    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let agent = Proc::spawn(
        &["agent", "--relay", &quic, "--pin", &wrong_pin, "--client-id", "office-1", "--token", "right"],
        &dir,
    );
    let (code, err) = agent.wait_exit();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&wrong_pin) && err.contains(&pin), "{err}");

    let agent = Proc::spawn(
        &["agent", "--relay", &quic, "--pin", &pin, "--client-id", "office-1", "--token", "hunter2-bad"],
        &dir,
    );
    let (code, err) = agent.wait_exit();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("rejected") && !err.contains("hunter2"), "token must not be echoed: {err}");
}

#[test]
fn the_admin_endpoint_answers_while_idle_clients_hold_every_ingress_connection() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        "[relay]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         grpc_listen = \"127.0.0.1:0\"\nheader_read_timeout_secs = 2\nmax_connections_per_ip = 0\n",
    )
    .unwrap();
    // 256 open files: the relay takes 192 ingress connections at once and keeps the rest.
    let relay = Proc::spawn_with_file_limit(256, &["relay", "--config", config.to_str().unwrap()], &dir);
    let http = relay.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
    let admin =
        relay.line_with("admin ").rsplit("http://").next().unwrap().trim().trim_end_matches("/api/sessions").to_owned();
    let silent: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(&http).unwrap()).collect();
    // Over the budget: answered at once and closed, not held.
    let mut refused = String::new();
    let mut last = silent.last().unwrap().try_clone().unwrap();
    last.set_read_timeout(Some(WAIT)).unwrap();
    last.read_to_string(&mut refused).unwrap();
    assert!(refused.starts_with("HTTP/1.1 503") && refused.contains("connection limit"), "{refused}");
    // The admin endpoint still has descriptors.
    let health = http_get(&admin, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    // The silent connections are closed after the header timeout, and clients get in again.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let answer = try_http_get(&http, "/");
        if answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 404")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ingress still refusing: {answer:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(silent);
}

#[test]
fn demo_prints_a_curl_line_that_works() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let demo = Proc::spawn(&["demo", "--http-listen", "127.0.0.1:0"], &dir);
    let line = demo.line_with("curl -i");
    let url = line.split_whitespace().last().unwrap();
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let response = http_get(addr, "/");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("Hello from the quictun demo upstream"), "{response}");
    assert!(response.to_ascii_lowercase().contains("x-quictun-request-id"), "{response}");
    let big = http_get(addr, "/bytes/1048576");
    assert!(big.ends_with(&"q".repeat(1000)), "download truncated");
}

/// Whether this run is CI's (`CI=true`), where nothing may be skipped: CI runs as root with
/// nftables and `/dev/net/tun`, so every workload can run.
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

#[test]
fn bench_smoke_runs_every_workload_on_every_transport() {
    let _turn = timed_turn();
    let dir = TempDir::new();
    let out = dir.join("results");
    let args = [
        "bench",
        "--duration",
        "0.5",
        "--large-mib",
        "2",
        "--many-agents",
        "3",
        "--many-streams",
        "20",
        "--concurrency",
        "1,4",
        "--loss",
        "1",
        "--slow-clients",
        "3",
        "--wan-mib",
        "1",
        "--udp-rate",
        "2000",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = Command::new(BIN).args(args).env("RUST_LOG", "warn").output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    let has =
        |workload: &str, transport: &str| rows.iter().any(|r| r["workload"] == workload && r["transport"] == transport);
    for transport in ["quic", "grpc", "direct"] {
        for workload in ["small", "slow-mix", "large", "wan", "grpc", "egress", "slow-clients", "udp"] {
            assert!(has(workload, transport), "no {workload} row for {transport}");
        }
    }
    for transport in ["quic", "grpc"] {
        assert!(has("many", transport) && has("lossy", transport), "no many/lossy row for {transport}");
    }
    // Each carrier's floor (quinn alone, tonic alone), beside its tunnel rows, and the HTTP floor
    // (two plain proxies in place of relay and agent) with its CPU per request and both bulk rows.
    assert!(has("floor", "quic") && has("floor", "grpc"), "no floor row for each transport");
    let http_floor = |variant: &str| {
        rows.iter()
            .find(|r| r["workload"] == "floor" && r["transport"] == "direct" && r["variant"] == variant)
            .unwrap_or_else(|| panic!("no HTTP floor row {variant:?}"))
    };
    // Also with a TCP splice in the agent's place, and with splices in both places.
    for chain in ["http", "http+splice", "splice"] {
        for concurrency in [1, 4] {
            let row = http_floor(&format!("{chain} c={concurrency}"));
            assert!(row["tunnel_cpu_us_per_request"].as_f64().is_some_and(|us| us > 0.0), "{row}");
        }
        for direction in ["download", "upload"] {
            let row = http_floor(&format!("{chain} {direction}"));
            assert!(row["mb_per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{row}");
            assert!(row["note"].as_str().unwrap().contains("CPU"), "{row}");
        }
    }
    // lossy and wan need root, nftables and /dev/net/tun: without them their rows say why they
    // were skipped; under CI, which has all three, a skipped row fails the test.
    let skipped: Vec<_> = rows.iter().filter(|r| r["variant"] == "skipped").collect();
    for row in &skipped {
        eprintln!("bench smoke: {} on {} skipped: {}", row["workload"], row["transport"], row["note"]);
    }
    assert!(!under_ci() || skipped.is_empty(), "workloads skipped under CI: {skipped:?}");
    let bulk = |r: &&serde_json::Value| r["workload"] == "wan" && r["variant"] != "small c=16";
    let timed = ["small", "floor", "grpc", "egress", "slow-clients", "lossy", "wan", "udp"];
    // Datagrams through each tunnel and straight to the echo: without loss on the tunnel leg,
    // next to none are lost (the socket buffers hold a burst).
    for row in rows.iter().filter(|r| r["workload"] == "udp" && r["variant"] == "loss=0%") {
        assert!(row["lost_percent"].as_f64().is_some_and(|lost| lost < 5.0), "{row}");
        assert!(row["latency"]["p99_ms"].as_f64().is_some_and(|p99| p99 > 0.0), "{row}");
    }
    for transport in ["quic", "grpc"] {
        let lossy = |r: &&serde_json::Value| r["workload"] == "udp" && r["transport"] == transport;
        assert!(
            rows.iter().filter(lossy).any(|r| r["variant"] == "loss=1%" || r["variant"] == "skipped"),
            "{transport}"
        );
    }
    for row in rows.iter().filter(|r| timed.contains(&r["workload"].as_str().unwrap_or(""))) {
        if row["variant"] == "skipped" {
            continue;
        }
        if bulk(&row) {
            assert!(row["mb_per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{row}");
            continue;
        }
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| small | quic | c=1 |"), "{md}");
    assert!(std::fs::read_to_string(out.join("throughput-small.svg")).unwrap().starts_with("<svg"));
}

#[test]
fn the_relay_reloads_on_sighup_and_on_file_change_and_refuses_a_broken_file() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let upstream = Proc::spawn(&["upstream", "--listen", "127.0.0.1:0"], &dir);
    let upstream_url = upstream.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    let config = dir.join("relay.toml");
    let base = format!(
        "[relay]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         grpc_listen = \"127.0.0.1:0\"\n{OFFICE_CLIENT}\
         [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"{upstream_url}\"]\n"
    );
    let route =
        |host: &str, upstream: &str| format!("{base}[[routes]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\n");
    std::fs::write(&config, route("a.test", "app")).unwrap();
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let quic = relay.line_with("udp://").rsplit("udp://").next().unwrap().trim().to_owned();
    let http = relay.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
    let pin = relay.line_with("pin").split_whitespace().last().unwrap().to_owned();
    let _agent = Proc::spawn(
        &[
            "agent",
            "--relay",
            &quic,
            "--pin",
            &pin,
            "--client-id",
            "office-1",
            "--token",
            "right",
            "--transport",
            "quic",
        ],
        &dir,
    );
    assert!(time_until_served_for(&http, "a.test", WAIT).is_some(), "a.test never served");
    let pid = relay.child.as_ref().unwrap().id().to_string();
    let hangup = || signal(&pid, "HUP");
    let status_of = |host: &str| {
        let answer = http_get_host(&http, host, "/hello");
        answer.get(9..12).unwrap_or_default().to_owned()
    };

    // A route to an upstream that does not exist: refused, with the key named, and the running
    // configuration stays: a.test is served, b.test is not.
    std::fs::write(&config, route("b.test", "nope")).unwrap();
    hangup();
    let refused = relay.line_with("reload refused");
    assert!(refused.contains("routes[0].upstream"), "{refused}");
    assert_eq!((status_of("a.test").as_str(), status_of("b.test").as_str()), ("200", "404"));

    // Accepted: b.test is served at once, by the agent already connected, and a.test is gone.
    std::fs::write(&config, route("b.test", "app")).unwrap();
    hangup();
    assert!(relay.line_with("configuration reloaded").contains("(version 2)"));
    assert_eq!((status_of("a.test").as_str(), status_of("b.test").as_str()), ("404", "200"));

    // No signal: the relay notices the file changed.
    std::fs::write(&config, format!("{}\n", route("c.test", "app"))).unwrap();
    assert!(relay.line_with("configuration reloaded").contains("(version 3)"));
    assert_eq!((status_of("b.test").as_str(), status_of("c.test").as_str()), ("404", "200"));
}

/// `GET /hello` for `host` until it answers 200 (every 20 ms, for at most `within`).
fn time_until_served_for(addr: &str, host: &str, within: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if http_get_host(addr, host, "/hello").starts_with("HTTP/1.1 200") {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `GET path` until it answers 200, polling every 20 ms for at most `within`; how long it took.
fn time_until_served(addr: &str, path: &str, within: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if try_http_get(addr, path).is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn an_agent_serves_again_within_seconds_of_a_killed_relay_restarting_on_its_ports() {
    let _turn = timed_turn();
    let dir = TempDir::new();
    let upstream = Proc::spawn(&["upstream", "--listen", "127.0.0.1:0"], &dir);
    let upstream_url = upstream.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    assert!(quictun(&["cert", "gen", "--out", dir.join("certs").to_str().unwrap()]).status.success());
    let relay_config = |quic: &str, http: &str| {
        format!(
            "[relay]\nquic_listen = \"{quic}\"\nhttp_listen = \"{http}\"\nadmin_listen = \"127.0.0.1:0\"\n\
             grpc_listen = \"127.0.0.1:0\"\n\
             cert = \"certs/relay.crt\"\nkey = \"certs/relay.key\"\n\
             [[clients]]\nid = \"office-1\"\ntoken = \"right\"\ngroup = \"web\"\n\
             [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"{upstream_url}\"]\n\
             [[routes]]\nhost = \"*\"\nupstream = \"app\"\n"
        )
    };
    let config = dir.join("relay.toml");
    std::fs::write(&config, relay_config("127.0.0.1:0", "127.0.0.1:0")).unwrap();
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let quic = relay.line_with("udp://").rsplit("udp://").next().unwrap().trim().to_owned();
    let http = relay.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
    let pin = relay.line_with("pin").split_whitespace().last().unwrap().to_owned();
    // Default settings: nothing here shortens a heartbeat or a timeout.
    let _agent =
        Proc::spawn(&["agent", "--relay", &quic, "--pin", &pin, "--client-id", "office-1", "--token", "right"], &dir);
    assert!(time_until_served(&http, "/hello", WAIT).is_some(), "the agent never served");

    // SIGKILL: the relay sends nothing on its way out. A new one comes up on the same ports a
    // second later, with the same key (so it can prove to the agent that it lost the connection).
    drop(relay);
    std::thread::sleep(Duration::from_secs(1));
    std::fs::write(&config, relay_config(&quic, &http)).unwrap();
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    relay.line_with("HTTP ingress");
    let back = time_until_served(&http, "/hello", WAIT).expect("the agent never came back");
    eprintln!("relay restart to serving again: {} ms", back.as_millis());
    // The agent's next keep-alive (within 1 s), a verified stateless reset, a reconnect (under
    // 250 ms of spread): 0.1-1.3 s in docs/failures.md's runs, bound at 2 s. Without the reset the agent
    // would wait for its idle timeout (3 s) and its backoff; before the reset key it took the
    // heartbeat timeout, about 15 s.
    assert!(back < Duration::from_secs(2), "the agent took {back:?} to serve again");
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_quic_agents_is_killed() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("quic", Departure::Kill);
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_grpc_agents_is_killed() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("grpc", Departure::Kill);
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_quic_agents_hangs() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("quic", Departure::Hang);
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_grpc_agents_hangs() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("grpc", Departure::Hang);
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_quic_agents_is_stopped_for_a_deploy() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("quic", Departure::Terminate);
}

#[test]
fn steady_gets_lose_nothing_when_one_of_two_grpc_agents_is_stopped_for_a_deploy() {
    steady_gets_lose_nothing_when_one_of_two_agents_goes("grpc", Departure::Terminate);
}

/// How an agent leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Departure {
    /// SIGKILL: it says nothing.
    Kill,
    /// SIGSTOP: the process hangs (its kernel still holds its sockets: TCP stays up), resumed
    /// with SIGCONT once the test has measured.
    Hang,
    /// SIGTERM: a rolling deploy's stop.
    Terminate,
}

/// QUIC's idle timeout at the default settings: a relay that hears nothing from an agent for this
/// long declares it dead.
const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// gRPC's HTTP/2 PINGs at the default settings: sent after a second of silence, two seconds to
/// answer: a silent agent is declared dead after this.
const GRPC_PING_DEADLINE: Duration = Duration::from_secs(3);

/// The longest any steady GET may take when one of two agents leaves: the claim of docs/failures.md for each
/// transport and departure, with its margin.
///
/// - A QUIC agent killed or hung goes silent: the relay suspects it after 1.25 s without a
///   datagram and moves the requests waiting on it to the sibling (1.47-1.72 s measured).
///   The bound is QUIC's idle timeout itself, so that only that suspicion can meet it: a request
///   that waited for the agent to be declared dead would take longer.
/// - A killed gRPC agent's TCP connection is closed by its kernel, so the relay knows at once
///   (12 ms measured; bound 0.25 s, where the fallback, HTTP/2 PINGs, would take 3 s).
/// - A hung gRPC agent keeps its TCP connection: HTTP/2 PINGs declare it dead within 3 s, and the
///   requests waiting on it move then (bound 1.5 × 3 s; its heartbeats would take 15 s).
/// - An agent stopped for a deploy sends go-away first: no GET waits on it (11 ms measured; bound
///   0.1 s, a tenth of the 1.25 s any silence or death detection would take).
fn slowest_allowed(transport: &str, departure: Departure) -> Duration {
    match (transport, departure) {
        ("quic", Departure::Kill | Departure::Hang) => QUIC_IDLE_TIMEOUT,
        (_, Departure::Kill) => Duration::from_millis(250),
        (_, Departure::Hang) => GRPC_PING_DEADLINE * 3 / 2,
        (_, Departure::Terminate) => Duration::from_millis(100),
    }
}

/// A relay (real process, default settings, every listener on a free port) routing every host to
/// an upstream process, with clients `office-1` (token `one`) and `office-2` (token `two`) in
/// group `web`; and how an agent of `transport` reaches it.
struct Stack {
    dir: TempDir,
    _upstream: Proc,
    _relay: Proc,
    quic: String,
    grpc: String,
    http: String,
    admin: String,
    pin: String,
    transport: &'static str,
}

impl Stack {
    fn start(transport: &'static str) -> Self {
        let dir = TempDir::new();
        let upstream = Proc::spawn(&["upstream", "--listen", "127.0.0.1:0"], &dir);
        let upstream_url = upstream.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
        let config = dir.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\nquic_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\n\
                 admin_listen = \"127.0.0.1:0\"\n\
                 [[clients]]\nid = \"office-1\"\ntoken = \"one\"\ngroup = \"web\"\n\
                 [[clients]]\nid = \"office-2\"\ntoken = \"two\"\ngroup = \"web\"\n\
                 [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"{upstream_url}\"]\n\
                 [[routes]]\nhost = \"*\"\nupstream = \"app\"\n"
            ),
        )
        .unwrap();
        let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
        let quic = relay.line_with("udp://").rsplit("udp://").next().unwrap().trim().to_owned();
        let grpc = relay.line_with("tcp://").rsplit("tcp://").next().unwrap().trim().to_owned();
        let http = relay.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
        let admin_line = relay.line_with("admin ");
        let admin = admin_line.rsplit("http://").next().unwrap().trim().trim_end_matches("/api/sessions").to_owned();
        let pin = relay.line_with("pin").split_whitespace().last().unwrap().to_owned();
        Self { dir, _upstream: upstream, _relay: relay, quic, grpc, http, admin, pin, transport }
    }

    /// Waits (polling `/api/sessions`) until the relay has `n` requests in flight on its agents.
    fn wait_in_flight(&self, n: u64) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let reply = try_http_get(&self.admin, "/api/sessions").unwrap_or_default();
            let body = reply.split_once("\r\n\r\n").map_or("", |(_, body)| body);
            let sessions: Vec<serde_json::Value> = serde_json::from_str(body).unwrap_or_default();
            if sessions.iter().filter_map(|s| s["in_flight"].as_u64()).sum::<u64>() >= n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never {n} requests in flight: {reply}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (polling `/api/sessions`) until the relay has `n` sessions.
    fn wait_sessions(&self, n: usize) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let reply = try_http_get(&self.admin, "/api/sessions").unwrap_or_default();
            let body = reply.split_once("\r\n\r\n").map_or("", |(_, body)| body);
            let sessions: Vec<serde_json::Value> = serde_json::from_str(body).unwrap_or_default();
            if sessions.len() == n {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never {n} sessions: {reply}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The relay's `/metrics` page.
    fn metrics(&self) -> String {
        let reply = http_get(&self.admin, "/metrics");
        reply.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned())
    }

    /// Agent `id` with `token` (default settings), once it reports its registration.
    fn agent(&self, id: &str, token: &str) -> Proc {
        self.agent_with(id, token, &[])
    }

    /// Agent `id` with `token` and `extra` flags, once it reports its registration.
    fn agent_with(&self, id: &str, token: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["agent", "--relay", &self.quic, "--pin", &self.pin, "--client-id", id, "--token", token];
        args.extend_from_slice(extra);
        let transport = transport_args(self.transport, &self.grpc);
        args.extend(transport.iter().map(String::as_str));
        let agent = Proc::spawn(&args, &self.dir);
        agent.line_with("connected to");
        agent
    }
}

/// The agent flags that pick `transport` on a relay with gRPC listener `grpc`.
fn transport_args(transport: &'static str, grpc: &str) -> Vec<String> {
    let mut args = vec!["--transport".to_owned(), transport.to_owned()];
    if transport == "grpc" {
        args.extend(["--grpc-relay".to_owned(), grpc.to_owned()]);
    }
    args
}

fn steady_gets_lose_nothing_when_one_of_two_agents_goes(transport: &'static str, departure: Departure) {
    let _turn = timed_turn();
    let stack = Stack::start(transport);
    let http = stack.http.clone();
    let victim = stack.agent("office-1", "one");
    let _survivor = stack.agent("office-2", "two");

    // Steady GETs from two clients, one at a time each, while office-1 leaves mid-way.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (http, stop) = (http.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut failed, mut slowest, mut sent) = (Vec::new(), Duration::ZERO, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = std::time::Instant::now();
                    let answer = try_http_get(&http, "/hello");
                    slowest = slowest.max(started.elapsed());
                    sent += 1;
                    match answer {
                        Ok(a) if a.starts_with("HTTP/1.1 200") => {}
                        other => failed.push(format!("{other:?}")),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (sent, failed, slowest)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let pid = victim.pid().to_string();
    let mut victim = Some(victim);
    match departure {
        Departure::Kill => drop(victim.take()),
        Departure::Hang => signal(&pid, "STOP"),
        Departure::Terminate => signal(&pid, "TERM"),
    }
    // Long enough for the slowest departure (a hung gRPC agent: 3 s) to be over.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
    for client in clients {
        let (n, f, s) = client.join().unwrap();
        (sent, slowest) = (sent + n, slowest.max(s));
        failed.extend(f);
    }
    let metrics = stack.metrics();
    let retries =
        |reason: &str| metric(&metrics, &format!("quictun_retries_total{{reason=\"{reason}\"}}")).unwrap_or(0.0);
    let (silent, lost) = (retries("silent"), retries("lost"));
    eprintln!(
        "{transport}, {departure:?}: {sent} GETs, {} failed, slowest {} ms; retried on the sibling: {silent} on \
         silence, {lost} on a lost tunnel",
        failed.len(),
        slowest.as_millis()
    );
    assert!(failed.is_empty(), "GETs failed although a sibling was up: {failed:?}");
    let allowed = slowest_allowed(transport, departure);
    assert!(slowest < allowed, "slowest GET took {slowest:?} (allowed: {allowed:?})");
    if transport == "quic" && departure != Departure::Terminate {
        // The GETs that waited on the silent agent moved because it went silent, none because it
        // was declared dead.
        assert!(silent >= 1.0 && lost == 0.0, "silence retries {silent}, lost-tunnel retries {lost}\n{metrics}");
    }
    match (departure, victim) {
        (Departure::Terminate, Some(victim)) => {
            let (code, err) = victim.wait_exit();
            assert_eq!(code, 0, "a stopped agent exits cleanly: {err}");
        }
        (Departure::Hang, Some(victim)) => {
            // Resumed, it finds its session gone and registers again.
            signal(&pid, "CONT");
            victim.line_with("connected to");
            stack.wait_sessions(2);
        }
        _ => {}
    }
}

/// Sends `SIG{name}` to process `pid`.

#[test]
fn a_request_on_a_killed_quic_agent_gets_its_502_within_seconds() {
    a_request_on_a_killed_agent_gets_its_502_within_seconds("quic");
}

#[test]
fn a_request_on_a_killed_grpc_agent_gets_its_502_at_once() {
    a_request_on_a_killed_agent_gets_its_502_within_seconds("grpc");
}

fn a_request_on_a_killed_agent_gets_its_502_within_seconds(transport: &'static str) {
    let _turn = timed_turn();
    let stack = Stack::start(transport);
    let http = stack.http.clone();
    let agent = stack.agent("office-1", "one");
    assert!(time_until_served(&http, "/hello", WAIT).is_some());

    // A request the upstream holds for 20 s is in flight when the only agent dies (SIGKILL).
    let in_flight = {
        let http = http.clone();
        std::thread::spawn(move || try_http_get(&http, "/delay/20000"))
    };
    stack.wait_in_flight(1);
    drop(agent);
    let killed = std::time::Instant::now();
    let answer = in_flight.join().unwrap().unwrap();
    let answered = killed.elapsed();
    eprintln!("{transport}: only agent killed: in-flight request answered {} ms later", answered.as_millis());
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    // QUIC finds the dead agent at its idle timeout (2 s; the heartbeats would take 15 s); gRPC at
    // once, when the agent's kernel closes its TCP connection (HTTP/2 PINGs would take 3 s).
    let allowed = if transport == "quic" { QUIC_IDLE_TIMEOUT * 3 / 2 } else { Duration::from_millis(500) };
    assert!(answered < allowed, "the 502 came {answered:?} after the agent died (allowed: {allowed:?})");
    let after = try_http_get(&http, "/hello").unwrap();
    assert!(after.starts_with("HTTP/1.1 502"), "a request after the death must fail at once: {after}");
}

#[test]
fn relative_paths_in_a_config_file_are_read_against_its_directory() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("office.token"), "right\n").unwrap();
    let clients = "[[clients]]\nid = \"office-1\"\ntoken_file = \"office.token\"\ngroup = \"web\"\n";
    let config = loopback_relay_config(&etc, "", clients);

    // Started from another directory: the identity is made beside the file, not in ./certs, and
    // the token file is found beside it too.
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let generated = relay.line_with("certificate");
    assert!(generated.contains(etc.join("certs/relay.crt").to_str().unwrap()), "{generated}");
    assert!(etc.join("certs/relay.key").exists());
    assert!(!dir.join("certs").exists(), "an identity was made where the relay was started");
    let (status, err) = {
        relay.terminate();
        relay.wait_exit()
    };
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("generated a new relay identity"), "the new identity was not announced: {err}");

    // A certificate the file names must exist: no new identity in its place.
    let named = loopback_relay_config(&etc, "cert = \"tls/relay.crt\"\nkey = \"tls/relay.key\"\n", clients);
    let out = Command::new(BIN)
        .args(["relay", "--config", named.to_str().unwrap()])
        .current_dir(dir.join("."))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(etc.join("tls/relay.crt").to_str().unwrap()), "{}", stderr(&out));
    assert!(!etc.join("tls").exists());
}

#[test]
fn each_request_gets_one_access_line_in_text_without_colour_or_in_json() {
    let _turn = untimed_turn();
    for format in ["text", "json"] {
        let dir = TempDir::new();
        let mut command = Command::new(BIN);
        command.args(["--log-format", format, "demo", "--http-listen", "127.0.0.1:0"]);
        command.env("RUST_LOG", "warn,quictun::access=info").env_remove("NO_COLOR");
        let demo = Proc::spawn_command(command, &dir);
        let line = demo.line_with("curl -i");
        let addr =
            line.split_whitespace().last().unwrap().trim_start_matches("http://").trim_end_matches('/').to_owned();
        assert!(http_get(&addr, "/").starts_with("HTTP/1.1 200"));
        assert!(http_get(&addr, "/bytes/1000").starts_with("HTTP/1.1 200"));
        assert!(http_get(&addr, "/nowhere/../..").starts_with("HTTP/1.1 400"));
        demo.terminate();
        let (status, err) = demo.wait_exit();
        assert_eq!(status, 0, "{err}");
        assert!(!err.contains('\x1b'), "colour codes in a log that is not a terminal: {err}");
        let access: Vec<&str> = err.lines().filter(|l| l.contains("quictun::access")).collect();
        assert_eq!(access.len(), 3, "one line per request: {err}");
        if format == "text" {
            let line = access[1];
            assert!(
                line.contains("GET 200") && line.contains("path=/bytes/1000") && line.contains("bytes=1000"),
                "{line}"
            );
            assert_eq!(line.matches("/bytes/1000").count(), 1, "the path is logged once: {line}");
            assert!(access[1].contains("client_id=demo"), "{}", access[1]);
            assert!(access[2].contains("GET 400 ") && access[2].contains("client_id=-"), "{}", access[2]);
            continue;
        }
        let lines: Vec<serde_json::Value> = access.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let fields = &lines[1]["fields"];
        assert_eq!(fields["method"], "GET");
        assert_eq!(fields["path"], "/bytes/1000");
        assert_eq!(fields["status"], 200);
        assert_eq!(fields["bytes"], 1000);
        assert_eq!(fields["client_id"], "demo");
        assert_eq!(fields["host"], "demo", "the Host header http_get sends");
        assert!(fields["duration_ms"].as_f64().unwrap() > 0.0);
        assert!(fields["request_id"].as_str().unwrap().len() == 36);
        assert_eq!(lines[2]["fields"]["status"], 400);
    }
}

#[test]
fn a_mistyped_flag_gets_a_suggestion_and_the_whole_usage_line() {
    let _turn = untimed_turn();
    let out = quictun(&["relay", "--quic-listn", "0.0.0.0:4433"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("a similar argument exists: '--quic-listen'"), "{err}");
    assert!(err.contains("Usage: quictun relay [--config <FILE>] [OPTIONS]"), "{err}");
    let out = quictun(&["agnet"]);
    assert!(stderr(&out).contains("a similar subcommand exists: 'agent'"), "{}", stderr(&out));
}

#[test]
fn completions_and_a_manual_page_are_generated_from_the_flags() {
    let _turn = untimed_turn();
    let bash = quictun(&["completions", "bash"]);
    assert!(bash.status.success(), "{}", stderr(&bash));
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(script.contains("_quictun()") && script.contains("--quic-listen"), "not a bash completion script");
    for shell in ["zsh", "fish"] {
        assert!(quictun(&["completions", shell]).status.success(), "{shell}");
    }
    let man = quictun(&["man"]);
    assert!(man.status.success(), "{}", stderr(&man));
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH quictun"), "not a roff page");
    assert!(page.contains("relay") && page.contains("agent"));
    for sub in ["relay", "agent", "demo", "cert", "bench", "upstream"] {
        let man = quictun(&["man", sub]);
        assert!(man.status.success(), "{sub}: {}", stderr(&man));
        let page = String::from_utf8_lossy(&man.stdout);
        assert!(page.contains(&format!(".TH quictun-{sub}")), "{sub}: {page}");
    }
    assert!(String::from_utf8_lossy(&quictun(&["man", "relay"]).stdout).contains("quic\\-listen"));
    let config = String::from_utf8_lossy(&quictun(&["man", "config"]).stdout).into_owned();
    assert!(config.contains(".TH QUICTUN.TOML 5") && config.contains("allow_hosts"), "{config}");
    assert_eq!(quictun(&["man", "nope"]).status.code(), Some(2));
}

#[test]
fn an_agent_pointed_at_the_relays_http_port_is_told_so() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let config = loopback_relay_config(&dir, "", OFFICE_CLIENT);
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    let http = relay.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
    let pin = relay.line_with("pin").split_whitespace().last().unwrap().to_owned();
    let port = http.rsplit(':').next().unwrap().to_owned();
    let mut agent = Command::new(BIN);
    agent.args(["agent", "--relay", &http, "--pin", &pin, "--client-id", "office-1", "--transport", "quic"]);
    agent.env("QUICTUN_TOKEN", "right");
    let agent = Proc::spawn_command(agent, &dir);
    let told = agent.line_with("cannot connect");
    assert!(told.contains(&format!("is {port} the relay's HTTP port?")), "{told}");
}

#[test]
fn log_format_json_in_the_config_file_makes_json_log_lines() {
    let _turn = untimed_turn();
    let dir = TempDir::new();
    let config = loopback_relay_config(&dir, "log_format = \"json\"\n", "");
    let relay = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &dir);
    relay.line_with("pin");
    relay.terminate();
    let (status, err) = relay.wait_exit();
    assert_eq!(status, 0, "{err}");
    let first = err.lines().next().expect("the generated identity is logged at warn");
    let line: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(line["level"], "WARN");
}

/// `n` keep-alive `GET /bytes/64` requests on one connection to `addr`, each with a 2 KiB
/// header the relay's ring keeps; panics on any answer but 200.
fn keep_alive_gets(addr: &str, n: usize) {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let request = format!("GET /bytes/64 HTTP/1.1\r\nhost: app\r\nx-padding: {}\r\n\r\n", "p".repeat(2048));
    for _ in 0..n {
        stream.write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
    }
}

/// The relay's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap()
}

/// The rings of recent requests keep memory flat: the relay's (default `inspect_capacity`, 1000,
/// each with its headers) and the agent's inspector (100, with the first 64 KiB of each body).
/// Once they are full, 100,000 more requests with 2 KiB headers (an unbounded ring would hold over
/// 200 MiB of them) grow each process by less than 16 MiB.
#[test]
fn the_relays_memory_is_flat_over_a_hundred_thousand_inspected_requests() {
    let _turn = timed_turn();
    let stack = Stack::start("quic");
    let agent = stack.agent_with("office-1", "one", &["--admin-listen", "127.0.0.1:0"]);
    let agent_pid = agent.pid();
    let load = |per_connection: usize| {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let http = stack.http.clone();
                std::thread::spawn(move || keep_alive_gets(&http, per_connection))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    let relay = stack._relay.pid();
    load(2_500);
    let (full, agent_full) = (rss_kib(relay), rss_kib(agent_pid));
    load(25_000);
    let (after, agent_after) = (rss_kib(relay), rss_kib(agent_pid));
    let requests = metric(&stack.metrics(), "quictun_requests_total{route=\"app\",status=\"200\"}");
    assert_eq!(requests, Some(110_000.0));
    let ring = http_get_host(&stack.admin, "127.0.0.1", "/api/requests");
    let body = ring.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let kept = serde_json::from_str::<Vec<serde_json::Value>>(body).map_or(0, |list| list.len());
    assert_eq!(kept, 1000, "the ring holds its capacity");
    assert!(after < full + 16 * 1024, "the relay grew from {full} KiB to {after} KiB over 100,000 requests");
    let agent_grew = format!("the agent grew from {agent_full} KiB to {agent_after} KiB over 100,000 requests");
    assert!(agent_after < agent_full + 16 * 1024, "{agent_grew}");
    eprintln!("relay RSS: {full} KiB with the ring full, {after} KiB after 100,000 more requests");
    eprintln!("agent RSS: {agent_full} KiB with the inspector full, {agent_after} KiB after them");
}
