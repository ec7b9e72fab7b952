//! Tunnels the agent declares (`--http`, `--tcp`, `[[tunnels]]`), as a user runs them: real relay,
//! agent and upstream processes, real HTTP and TCP clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod procs;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;

use procs::*;

/// A relay started from `clients` (its `[[clients]]` entries), declared ports on 127.0.0.1.
struct Relay {
    proc: Proc,
    quic: String,
    grpc: String,
    http: String,
    admin: String,
    pin: String,
}

impl Relay {
    fn start(dir: &Path, clients: &str) -> Self {
        Self::start_logging(dir, clients, "warn")
    }

    /// [`Relay::start`] with JSON log lines at `log` (`RUST_LOG`) on its stderr.
    fn start_logging(dir: &Path, clients: &str, log: &str) -> Self {
        let config = loopback_relay_config(dir, "declared_tcp_address = \"127.0.0.1\"\n", clients);
        let mut command = std::process::Command::new(BIN);
        command.args(["--log-format", "json", "relay", "--config", config.to_str().unwrap()]).env("RUST_LOG", log);
        let proc = Proc::spawn_command(command, dir);
        let after = |line: String, prefix: &str| line.rsplit(prefix).next().unwrap().trim().to_owned();
        let quic = after(proc.line_with("udp://"), "udp://");
        let grpc = after(proc.line_with("gRPC (agents)"), "tcp://");
        let http = after(proc.line_with("HTTP ingress"), "http://");
        let admin = after(proc.line_with("  admin "), "http://").trim_end_matches("/api/sessions").to_owned();
        let pin = proc.line_with("  pin ").split_whitespace().last().unwrap().to_owned();
        // Bound to loopback, the relay names itself by that address, not the machine's name.
        let command = proc.line_with("agent command");
        assert!(command.contains(&format!("--relay {quic} ")), "{command}");
        Self { proc, quic, grpc, http, admin, pin }
    }

    /// `quictun agent` for `client` over `transport`, with `extra` flags.
    fn agent(&self, dir: &Path, client: &str, transport: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["agent", "--relay", &self.quic, "--grpc-relay", &self.grpc, "--pin", &self.pin];
        args.extend(["--client-id", client, "--token", "right", "--transport", transport]);
        args.extend(extra);
        Proc::spawn(&args, dir)
    }

    /// The status line's code of `GET /hello` for `host`, and the body.
    fn get(&self, host: &str) -> (String, String) {
        let answer = http_get_host(&self.http, host, "/hello");
        let status = answer.get(9..12).unwrap_or_default().to_owned();
        (status, answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
    }

    /// `/api/tunnels` or `/api/sessions`.
    fn api(&self, page: &str) -> String {
        let answer = try_http_get(&self.admin, page).unwrap();
        answer.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
    }

    /// Polls `/api/tunnels` (every 20 ms, at most [`WAIT`]) until `holds`.
    fn tunnels_until(&self, what: &str, holds: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let started = std::time::Instant::now();
        loop {
            let tunnels: serde_json::Value = serde_json::from_str(&self.api("/api/tunnels")).unwrap();
            if holds(&tunnels) {
                return tunnels;
            }
            assert!(started.elapsed() < WAIT, "{what}: never so; /api/tunnels is {tunnels}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// `[[clients]]` entries: (id, group, allow lines).
fn clients(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(id, group, allow)| {
            format!("[[clients]]\nid = \"{id}\"\ntoken = \"right\"\ngroup = \"{group}\"\n{allow}\n")
        })
        .collect()
}

const ALLOW_DEV: &str = "allow_hosts = [\"*.dev.test\"]\nallow_tcp_ports = [\"1024-65535\"]";

/// A TCP server on a free loopback port that answers each connection with what it reads,
/// prefixed by `echo:`.
fn echo_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    let _ = stream.write_all(&[b"echo:", &buf[..n]].concat());
                }
            });
        }
    });
    addr
}

/// A loopback port free now (for the relay to bind as a declared port).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a connection to the relay's `port` answers to `ping`; the error when it is refused.
fn tcp_ping(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(b"ping")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The upstream's base URL.
fn upstream(dir: &Path) -> (Proc, String) {
    let proc = Proc::spawn(&["upstream", "--listen", "127.0.0.1:0"], dir);
    let url = proc.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    (proc, url)
}

fn exposes_http_and_tcp_by_flags_alone(transport: &str) {
    let dir = TempDir::new();
    let (_upstream, url) = upstream(&dir);
    let echo = echo_server();
    // The relay's own route names one host under the allowance: it stays the relay's.
    let own = format!(
        "[[upstreams]]\nname = \"own\"\ngroup = \"web\"\ntargets = [\"{url}\"]\n\
         [[routes]]\nhost = \"own.dev.test\"\nupstream = \"own\"\n"
    );
    let relay = Relay::start(&dir, &(clients(&[("office-1", "web", ALLOW_DEV)]) + &own));
    let port = free_port();
    // A port something else holds: refused with the system's error.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (app, evil, tcp) = (format!("app.dev.test={url}"), format!("evil.other.test={url}"), format!("{port}={echo}"));
    let (own_claim, busy) = (format!("own.dev.test={url}/mine"), format!("{taken_port}={echo}"));
    let agent = relay.agent(
        &dir,
        "office-1",
        transport,
        &[
            "--http",
            &app,
            "--http",
            &evil,
            "--http",
            &own_claim,
            "--tcp",
            &tcp,
            "--tcp",
            &busy,
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let admin =
        agent.line_with("agent admin on").rsplit("http://").next().unwrap().trim_end_matches("/metrics").to_owned();
    agent.line_with("tunnel http app.dev.test: accepted");
    let refused = agent.line_with("tunnel http evil.other.test: refused");
    assert!(refused.contains("allow_hosts"), "{refused}");
    let refused = agent.line_with("tunnel http own.dev.test: refused");
    assert!(refused.contains("the relay's own routes serve this host"), "{refused}");
    agent.line_with(&format!("tunnel tcp port {port}: accepted"));
    let refused = agent.line_with(&format!("tunnel tcp port {taken_port}: refused"));
    assert!(refused.contains("cannot listen on") && refused.contains("in use"), "{refused}");

    let (status, body) = relay.get("app.dev.test");
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("GET /hello"), "{body}");
    assert_eq!(relay.get("evil.other.test").0, "404", "a refused host gets the relay's usual 404");
    assert_eq!(tcp_ping(port).unwrap(), "echo:ping");
    let (status, body) = relay.get("own.dev.test");
    assert!(status == "200" && !body.contains("/mine"), "the relay's route serves its host: {body}");
    let metrics = try_http_get(&admin, "/metrics").unwrap();
    assert_eq!(metric(&metrics, "quictun_agent_tunnels_refused_total"), Some(3.0), "{metrics}");
    drop(taken);
    let tunnels = relay.api("/api/tunnels");
    assert!(tunnels.contains("\"app.dev.test\"") && tunnels.contains(&format!("127.0.0.1:{port}")), "{tunnels}");
    assert!(!tunnels.contains("evil"), "{tunnels}");
}

#[test]
fn one_quic_agent_exposes_http_and_tcp_by_flags_alone_and_a_refused_claim_leaves_the_others_working() {
    exposes_http_and_tcp_by_flags_alone("quic");
}

#[test]
fn one_grpc_agent_exposes_http_and_tcp_by_flags_alone_and_a_refused_claim_leaves_the_others_working() {
    exposes_http_and_tcp_by_flags_alone("grpc");
}

#[test]
fn agents_of_one_group_share_a_host_and_another_group_is_refused_it() {
    let dir = TempDir::new();
    let (_upstream, url) = upstream(&dir);
    let relay = Relay::start(
        &dir,
        &clients(&[("office-1", "web", ALLOW_DEV), ("office-2", "web", ALLOW_DEV), ("other-1", "other", ALLOW_DEV)]),
    );
    // The second agent's target has a base path, so the answers tell the two apart.
    let one = relay.agent(&dir, "office-1", "quic", &["--http", &format!("app.dev.test={url}")]);
    one.line_with("tunnel http app.dev.test: accepted");
    let two = relay.agent(&dir, "office-2", "quic", &["--http", &format!("app.dev.test={url}/two")]);
    two.line_with("tunnel http app.dev.test: accepted");
    let holders = |t: &serde_json::Value| t[0]["holders"].as_array().map_or(0, Vec::len);
    relay.tunnels_until("two holders", |t| holders(t) == 2);

    let answers: Vec<String> = (0..20).map(|_| relay.get("app.dev.test").1).collect();
    let by_two = answers.iter().filter(|a| a.contains("GET /two/hello")).count();
    let by_one = answers.iter().filter(|a| a.contains("GET /hello")).count();
    assert_eq!((by_one, by_two), (10, 10), "round robin over the holders: {answers:?}");

    let other = relay.agent(&dir, "other-1", "quic", &["--http", &format!("app.dev.test={url}/other")]);
    let refused = other.line_with("tunnel http app.dev.test: refused");
    assert!(refused.contains("another group holds it"), "{refused}");
    let tunnels = relay.tunnels_until("still web's", |t| holders(t) == 2);
    assert_eq!(tunnels[0]["group"], "web", "{tunnels}");
    assert!((0..4).all(|_| !relay.get("app.dev.test").1.contains("/other/")), "the holder keeps the host");
}

#[test]
fn an_agent_reload_adds_and_removes_tunnels_on_its_session_and_a_port_is_released_when_it_leaves() {
    let dir = TempDir::new();
    let (_upstream, url) = upstream(&dir);
    let echo = echo_server();
    let relay = Relay::start(&dir, &clients(&[("office-1", "web", ALLOW_DEV)]));
    let (old_port, new_port) = (free_port(), free_port());
    let file = dir.join("agent.toml");
    let write_agent = |host: &str, port: u16| {
        let agent = format!(
            "[agent]\nrelay = \"{}\"\npin = \"{}\"\nclient_id = \"office-1\"\ntoken = \"right\"\ntransport = \"quic\"\n",
            relay.quic, relay.pin
        );
        let tunnels = format!(
            "[[tunnels]]\ntype = \"http\"\nhost = \"{host}\"\ntarget = \"{url}\"\n\
             [[tunnels]]\ntype = \"tcp\"\nremote_port = {port}\ntarget = \"{echo}\"\n"
        );
        std::fs::write(&file, agent + &tunnels).unwrap();
    };
    write_agent("a.dev.test", old_port);
    let agent = Proc::spawn(&["agent", "--config", file.to_str().unwrap()], &dir);
    agent.line_with(&format!("tunnel tcp port {old_port}: accepted"));
    assert_eq!(relay.get("a.dev.test").0, "200");
    assert_eq!(tcp_ping(old_port).unwrap(), "echo:ping");
    let session: serde_json::Value = serde_json::from_str(&relay.api("/api/sessions")).unwrap();

    write_agent("b.dev.test", new_port);
    signal(&agent.pid().to_string(), "HUP");
    agent.line_with("reloaded its tunnels");
    agent.line_with(&format!("tunnel tcp port {new_port}: accepted"));
    assert_eq!((relay.get("a.dev.test").0, relay.get("b.dev.test").0), ("404".into(), "200".into()));
    assert!(tcp_ping(old_port).is_err(), "the withdrawn port is closed");
    assert_eq!(tcp_ping(new_port).unwrap(), "echo:ping");
    let now: serde_json::Value = serde_json::from_str(&relay.api("/api/sessions")).unwrap();
    assert_eq!(now[0]["session_id"], session[0]["session_id"], "the reload kept the session");
    assert_eq!(now.as_array().unwrap().len(), 1);

    // A file with an error changes nothing.
    std::fs::write(&file, "[[tunnels]]\ntype = \"udp\"\n").unwrap();
    signal(&agent.pid().to_string(), "HUP");
    agent.line_with("reload refused");
    assert_eq!(relay.get("b.dev.test").0, "200");

    drop(agent);
    relay.tunnels_until("every tunnel released", |t| t.as_array().is_some_and(Vec::is_empty));
    assert!(tcp_ping(new_port).is_err(), "the released port is closed");
    TcpListener::bind(("127.0.0.1", new_port)).expect("the released port can be bound again");
    assert_eq!(relay.get("b.dev.test").0, "404");
    drop(relay.proc);
}

#[test]
fn a_relay_reload_that_takes_an_allowance_away_revokes_the_tunnel_and_tells_the_agent() {
    let dir = TempDir::new();
    let (_upstream, url) = upstream(&dir);
    let relay = Relay::start(&dir, &clients(&[("office-1", "web", ALLOW_DEV)]));
    let agent = relay.agent(&dir, "office-1", "quic", &["--http", &format!("app.dev.test={url}")]);
    agent.line_with("tunnel http app.dev.test: accepted");
    assert_eq!(relay.get("app.dev.test").0, "200");

    let narrower = "allow_hosts = [\"*.other.test\"]";
    loopback_relay_config(&dir, "declared_tcp_address = \"127.0.0.1\"\n", &clients(&[("office-1", "web", narrower)]));
    signal(&relay.proc.pid().to_string(), "HUP");
    let revoked = agent.line_with("tunnel http app.dev.test: refused");
    assert!(revoked.contains("allow_hosts"), "{revoked}");
    assert_eq!(relay.get("app.dev.test").0, "404");
    relay.tunnels_until("nothing held", |t| t.as_array().is_some_and(Vec::is_empty));
}

#[test]
fn an_https_upstream_is_verified_with_its_ca_file_and_a_wrong_ca_gets_a_502_naming_the_certificate() {
    let dir = TempDir::new();
    for name in ["up", "other"] {
        let out = std::process::Command::new(BIN)
            .args(["cert", "gen", "--out", dir.to_str().unwrap(), "--name", name, "--san", "localhost"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let (cert, key) = (dir.join("up.crt"), dir.join("up.key"));
    let upstream = Proc::spawn(
        &[
            "upstream",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &dir,
    );
    let url = upstream.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let relay = Relay::start(&dir, &clients(&[("office-1", "web", ALLOW_DEV)]));
    let tunnel = |host: &str, keys: &str| {
        format!("[[tunnels]]\ntype = \"http\"\nhost = \"{host}\"\ntarget = \"{url}\"\n{keys}\n")
    };
    let file = dir.join("agent.toml");
    let agent = format!(
        "[agent]\nrelay = \"{}\"\npin = \"{}\"\nclient_id = \"office-1\"\ntoken = \"right\"\ntransport = \"quic\"\n",
        relay.quic, relay.pin
    );
    let tunnels = [
        tunnel("good.dev.test", "ca_file = \"up.crt\"\ntls_server_name = \"localhost\""),
        tunnel("wrong-ca.dev.test", "ca_file = \"other.crt\"\ntls_server_name = \"localhost\""),
        tunnel("system-roots.dev.test", "tls_server_name = \"localhost\""),
        tunnel("wrong-name.dev.test", "ca_file = \"up.crt\""),
        tunnel("unverified.dev.test", "insecure_skip_verify = true"),
    ];
    std::fs::write(&file, agent + &tunnels.concat()).unwrap();
    let agent = Proc::spawn(&["agent", "--config", file.to_str().unwrap()], &dir);
    agent.line_with("tunnel http unverified.dev.test: accepted");

    let (status, body) = relay.get("good.dev.test");
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("GET /hello"), "{body}");
    for refused in ["wrong-ca.dev.test", "system-roots.dev.test", "wrong-name.dev.test"] {
        let (status, body) = relay.get(refused);
        assert_eq!(status, "502", "{refused}: {body}");
        assert!(body.contains("certificate"), "{refused}: {body}");
    }
    assert_eq!(relay.get("unverified.dev.test").0, "200");
}

#[test]
fn each_tcp_connection_leaves_an_access_line_with_its_bytes_and_how_it_ended() {
    let dir = TempDir::new();
    let echo = echo_server();
    let relay = Relay::start_logging(&dir, &clients(&[("office-1", "web", ALLOW_DEV)]), "warn,quictun::access=info");
    let (port, dead_port) = (free_port(), free_port());
    let nothing = format!("127.0.0.1:{}", free_port());
    let (tcp, dead) = (format!("{port}={echo}"), format!("{dead_port}={nothing}"));
    let agent = relay.agent(&dir, "office-1", "quic", &["--tcp", &tcp, "--tcp", &dead]);
    agent.line_with(&format!("tunnel tcp port {dead_port}: accepted"));
    assert_eq!(tcp_ping(port).unwrap(), "echo:ping");
    assert!(tcp_ping(dead_port).map_or(true, |answer| answer.is_empty()), "nothing listens behind {dead_port}");
    let metrics = try_http_get(&relay.admin, "/metrics").unwrap();
    let to_agent = metric(&metrics, "quictun_bytes_total{direction=\"to_agent\"}").unwrap_or(0.0);
    assert!(to_agent >= 4.0, "TCP bytes count in the metrics: {metrics}");

    relay.proc.terminate();
    let (status, err) = relay.proc.wait_exit();
    assert_eq!(status, 0, "{err}");
    let access: Vec<serde_json::Value> =
        err.lines().filter(|l| l.contains("quictun::access")).map(|l| serde_json::from_str(l).unwrap()).collect();
    let of = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        let lines: Vec<_> = access.iter().filter(|l| l["fields"]["listen"] == listen.as_str()).collect();
        assert_eq!(lines.len(), 1, "one line per connection on {listen}: {err}");
        lines[0]["fields"].clone()
    };
    let served = of(port);
    assert_eq!(served["message"], format!("TCP {port}"));
    assert_eq!(served["client_id"], "office-1");
    assert_eq!(served["bytes_to_agent"], 4, "{served}");
    assert_eq!(served["bytes_from_agent"], 9, "{served}");
    assert_eq!(served["end"], "closed", "{served}");
    assert!(served["duration_ms"].as_f64().unwrap() > 0.0);
    let refused = of(dead_port);
    assert!(refused["end"].as_str().unwrap().starts_with("refused: the agent could not connect"), "{refused}");
    assert_eq!(refused["bytes_to_agent"], 0);
}
