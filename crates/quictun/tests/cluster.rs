//! The relay cluster against a real etcd (Debian's `etcd-server`, started here): relays and
//! agents are real processes. Every relay sees every agent with the relay that holds it, and
//! forwards requests for a group it holds no agent of to a relay that does (one hop, the request
//! id and `X-Forwarded-*` kept, a wrong cluster secret refused); an agent that stops is withdrawn
//! and answered 502 by the other relays; a relay killed with `kill -9` loses its agents when its
//! lease ends, and requests for them get 502s, never hang; an etcd outage leaves the relays
//! serving and forwarding from their caches, and they sync again when it is back.
//!
//! Without `etcd` on the machine these tests are reported as ignored (see `build.rs`); under
//! `CI=true` they run, and fail without it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod procs;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use procs::*;

/// A free TCP port on loopback (free a moment ago).
fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free UDP port on loopback (free a moment ago).
fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real etcd server, one member, on loopback; killed on drop.
struct Etcd {
    child: Option<Child>,
    dir: std::path::PathBuf,
    client: u16,
    peer: u16,
}

impl Etcd {
    fn start(dir: &std::path::Path) -> Self {
        let mut etcd = Self { child: None, dir: dir.join("etcd"), client: free_tcp(), peer: free_tcp() };
        etcd.run();
        etcd
    }

    /// Starts (or starts again, on the same data and ports) and waits until it is healthy.
    fn run(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.with_extension("log")).unwrap();
        let (client, peer) = (format!("http://127.0.0.1:{}", self.client), format!("http://127.0.0.1:{}", self.peer));
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian's etcd-server) starts");
        self.child = Some(child);
        wait_for("etcd to be healthy", Duration::from_secs(30), || {
            try_http_get(&format!("127.0.0.1:{}", self.client), "/health")
                .is_ok_and(|r| r.contains("\"health\":\"true\""))
        });
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `done` every 50 ms until it holds; panics after `within`.
fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// A relay process of the cluster.
struct Relay {
    proc: Proc,
    http: String,
    admin: String,
    quic: String,
    pin: String,
    /// A TCP tunnel to the upstream, carried by group `api`.
    tcp: String,
}

/// `office-1` and `office-3` serve group `web` (host `web.test`, and every host no other route
/// takes), `office-2` group `api` (host `api.test`); no agent serves group `ghost` (`ghost.test`).
const CLIENTS: &str = "[[clients]]\nid = \"office-1\"\ntoken = \"one\"\ngroup = \"web\"\n\
                       [[clients]]\nid = \"office-2\"\ntoken = \"two\"\ngroup = \"api\"\n\
                       [[clients]]\nid = \"office-3\"\ntoken = \"three\"\ngroup = \"web\"\n";

/// The cluster's secret.
const SECRET: &str = "the-cluster-secret-0123456789";

impl Relay {
    /// Relay `id` (its QUIC-LB server id: the id's last letter in hex) of the cluster at `etcd`.
    fn start(dir: &TempDir, id: &str, etcd: &str, upstream: &str) -> Self {
        Self::start_with_secret(dir, id, etcd, upstream, SECRET)
    }

    /// The same, presenting `secret` to the other relays.
    fn start_with_secret(dir: &TempDir, id: &str, etcd: &str, upstream: &str, secret: &str) -> Self {
        let server_id = format!("{:02x}", id.bytes().last().unwrap_or(0));
        let relay_dir = dir.join(id);
        std::fs::create_dir_all(&relay_dir).unwrap();
        let quic = SocketAddr::from(([127, 0, 0, 1], free_udp()));
        let config = relay_dir.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\nquic_listen = \"{quic}\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\n\
                 admin_listen = \"127.0.0.1:0\"\nstartup_grace_secs = 0\n\
                 [cluster]\nrelay_id = \"{id}\"\netcd = [\"{etcd}\"]\nadvertise = \"{quic}\"\nlease_ttl_secs = 3\n\
                 server_id = \"{server_id}\"\ntoken = \"{secret}\"\n\
                 {CLIENTS}\
                 [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"{upstream}\"]\n\
                 [[upstreams]]\nname = \"api\"\ngroup = \"api\"\ntargets = [\"{upstream}\"]\n\
                 [[upstreams]]\nname = \"ghost\"\ngroup = \"ghost\"\ntargets = [\"{upstream}\"]\n\
                 [[routes]]\nhost = \"api.test\"\nupstream = \"api\"\n\
                 [[routes]]\nhost = \"ghost.test\"\nupstream = \"ghost\"\n\
                 [[routes]]\nhost = \"*\"\nupstream = \"app\"\n\
                 [[tcp]]\nlisten = \"127.0.0.1:0\"\ngroup = \"api\"\nupstream = \"{}\"\n",
                upstream.trim_start_matches("http://")
            ),
        )
        .unwrap();
        let mut command = Command::new(BIN);
        command.args(["relay", "--config", config.to_str().unwrap()]).env("RUST_LOG", "warn,quictun::access=info");
        let proc = Proc::spawn_command(command, &relay_dir);
        let http = proc.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
        let tcp_line = proc.line_with("TCP tunnel");
        let tcp = tcp_line.split("tcp://").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        let admin_line = proc.line_with("admin ");
        let admin = admin_line.rsplit("http://").next().unwrap().trim().trim_end_matches("/api/sessions").to_owned();
        let pin = proc.line_with("pin").split_whitespace().last().unwrap().to_owned();
        Self { proc, http, admin, quic: quic.to_string(), pin, tcp }
    }

    fn agent(&self, dir: &TempDir, id: &str, token: &str) -> Proc {
        let args = ["agent", "--relay", &self.quic, "--pin", &self.pin, "--client-id", id, "--token", token];
        let agent = Proc::spawn(&args, dir);
        agent.line_with("connected to");
        agent
    }

    /// The cluster as this relay sees it: `client_id@relay_id`, sorted; and whether etcd answers.
    fn view(&self) -> (Vec<String>, bool) {
        let reply = http_get_host(&self.admin, "127.0.0.1", "/api/cluster");
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        let mut holders: Vec<String> = json["sessions"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|h| {
                        format!("{}@{}", h["client_id"].as_str().unwrap_or(""), h["relay_id"].as_str().unwrap_or(""))
                    })
                    .collect()
            })
            .unwrap_or_default();
        holders.sort();
        (holders, json["etcd_up"].as_bool().unwrap_or(false))
    }
}

fn upstream(dir: &TempDir) -> (Proc, String) {
    let upstream = Proc::spawn(&["upstream", "--listen", "127.0.0.1:0"], dir);
    let url = upstream.line_with("listening on").rsplit(' ').next().unwrap().to_owned();
    (upstream, url)
}

/// Two relays of one cluster, `office-1` on relay-a and `office-2` on relay-b, both in both
/// relays' view. Dropped in this order: agents, relays, upstream, etcd, the directory.
struct TwoRelays {
    _one: Proc,
    two: Proc,
    a: Relay,
    b: Relay,
    _upstream: Proc,
    etcd: Etcd,
    dir: TempDir,
}

const BOTH: [&str; 2] = ["office-1@relay-a", "office-2@relay-b"];

impl TwoRelays {
    fn start() -> Self {
        let dir = TempDir::new();
        let etcd = Etcd::start(&dir);
        let (upstream, url) = upstream(&dir);
        let a = Relay::start(&dir, "relay-a", &etcd.endpoint(), &url);
        let b = Relay::start(&dir, "relay-b", &etcd.endpoint(), &url);
        let one = a.agent(&dir, "office-1", "one");
        let two = b.agent(&dir, "office-2", "two");
        for relay in [&a, &b] {
            wait_for("both agents in the directory", Duration::from_secs(10), || {
                relay.view() == (BOTH.map(String::from).to_vec(), true)
            });
        }
        Self { _one: one, two, a, b, _upstream: upstream, etcd, dir }
    }
}

/// Every relay sees every agent with the relay that holds it; an agent that stops is withdrawn
/// from every relay's view within 3 s.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn every_relay_sees_every_agent_and_forgets_one_that_stops() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    cluster.two.terminate();
    let (status, _) = cluster.two.wait_exit();
    assert_eq!(status, 0);
    let took = wait_for("office-2 withdrawn", Duration::from_secs(3), || {
        a.view().0 == ["office-1@relay-a"] && b.view().0 == ["office-1@relay-a"]
    });
    eprintln!("office-2 withdrawn from both views {took:?} after its agent exited");
}

/// A relay killed with `kill -9` revokes nothing: its agents leave the others' view when its
/// lease ends (`lease_ttl_secs = 3`), not before the lease could have.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn a_killed_relays_agents_expire_with_its_lease() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    signal(&b.proc.pid().to_string(), "KILL");
    let took = wait_for("relay-b's agent expired", Duration::from_secs(3 + 3), || a.view().0 == ["office-1@relay-a"]);
    eprintln!("relay-b's agent left relay-a's view {took:?} after kill -9 (lease 3 s)");
    assert!(
        took >= Duration::from_millis(500),
        "gone after {took:?}: sooner than a lease of 3 s renewed each 1 s can end"
    );
}

/// etcd stops: the relays say so, keep their view, and serve their own agents; etcd comes back:
/// they sync again, with what changed meanwhile.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn relays_serve_through_an_etcd_outage_and_sync_again() {
    let mut cluster = TwoRelays::start();
    let both = BOTH.map(String::from).to_vec();
    cluster.etcd.kill();
    let (a, b) = (&cluster.a, &cluster.b);
    let took = wait_for("relay-a to notice etcd is down", Duration::from_secs(10), || !a.view().1);
    eprintln!("relay-a noticed the outage after {took:?}");
    assert_eq!(a.view().0, both, "the cached view is kept");
    assert!(http_get_host(&a.http, "app", "/").starts_with("HTTP/1.1 200"), "relay-a serves its own agent");
    let forwarded = request(&a.http, "GET", "api.test", "/", b"");
    assert_eq!(forwarded.status, 200, "relay-a forwards from its cache: {}", forwarded.text());
    let metrics = http_get(&a.admin, "/metrics");
    assert_eq!(metric(&metrics, "quictun_cluster_etcd_up"), Some(0.0), "{metrics}");
    let _three = b.agent(&cluster.dir, "office-3", "three");

    cluster.etcd.run();
    let all = vec!["office-1@relay-a".to_owned(), "office-2@relay-b".to_owned(), "office-3@relay-b".to_owned()];
    let took = wait_for("both relays in sync again", Duration::from_secs(20), || {
        a.view() == (all.clone(), true) && b.view() == (all.clone(), true)
    });
    eprintln!("in sync {took:?} after etcd was back");
    assert_eq!(metric(&http_get(&a.admin, "/metrics"), "quictun_cluster_etcd_up"), Some(1.0));
}

fn http_get(addr: &str, path: &str) -> String {
    let reply = try_http_get(addr, path).unwrap();
    reply.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned())
}

/// A response: its status, its head's lines, its body.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `method path` for `host` with `body` on a fresh connection (`Connection: close`).
fn request(addr: &str, method: &str, host: &str, path: &str, body: &[u8]) -> Reply {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Reply { status, head, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = raw.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
}

/// Requests for a group with no agent on a relay reach the relay that holds one, both ways:
/// headers as the upstream got them (`X-Forwarded-*` naming the real client and host), the
/// request id the same in the client's answer, at the upstream, and in both relays' access logs;
/// a 100 KB body there and back; per-peer metrics on both relays.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn every_agent_is_reachable_through_every_relay() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    // office-1 (web) is on relay-a only, office-2 (api) on relay-b only.
    let via_b = request(&b.http, "GET", "web.test", "/headers", b"");
    assert_eq!(via_b.status, 200, "{}", via_b.text());
    let seen = via_b.text();
    for expected in ["x-forwarded-for: 127.0.0.1", "x-forwarded-host: web.test", "x-forwarded-proto: http"] {
        assert!(seen.lines().any(|l| l == expected), "{expected:?} not in what the upstream got:\n{seen}");
    }
    let id = via_b.header("x-quictun-request-id").expect("a request id").to_owned();
    assert!(seen.contains(&format!("x-quictun-request-id: {id}")), "the upstream got another id:\n{seen}");
    let via_a = request(&a.http, "GET", "api.test", "/", b"");
    assert_eq!(via_a.status, 200, "{}", via_a.text());
    // A TCP tunnel of group `api`, on relay-a, carried by relay-b's agent.
    let over_tcp = request(&a.tcp, "GET", "tcp.test", "/headers", b"");
    assert_eq!(over_tcp.status, 200, "{}", over_tcp.text());
    assert!(over_tcp.text().contains("host: tcp.test"), "the upstream got the bytes as sent:\n{}", over_tcp.text());

    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = request(&b.http, "POST", "web.test", "/echo", &payload);
    assert_eq!(echoed.status, 200);
    assert!(echoed.body == payload, "the echo came back changed ({} bytes)", echoed.body.len());

    let (a_metrics, b_metrics) = (http_get(&a.admin, "/metrics"), http_get(&b.admin, "/metrics"));
    let count = |text: &str, sample: &str| metric(text, sample).unwrap_or(0.0);
    assert_eq!(count(&b_metrics, "quictun_cluster_forwarded_total{peer=\"relay-a\"}"), 2.0, "{b_metrics}");
    assert_eq!(count(&a_metrics, "quictun_cluster_served_total{peer=\"relay-b\"}"), 2.0, "{a_metrics}");
    assert_eq!(count(&a_metrics, "quictun_cluster_forwarded_total{peer=\"relay-b\"}"), 2.0, "{a_metrics}");
    assert_eq!(count(&b_metrics, "quictun_cluster_peer_dials_total{peer=\"relay-a\"}"), 1.0, "one link, reused");

    // The one id in both relays' access logs: the ingress line on relay-b, the forwarded one on relay-a.
    let TwoRelays { _one, two, a, b, .. } = cluster;
    drop((_one, two));
    for relay in [&a, &b] {
        relay.proc.terminate();
    }
    let (_, a_log) = a.proc.wait_exit();
    let (_, b_log) = b.proc.wait_exit();
    let line_with_id = |log: &str| log.lines().find(|l| l.contains(&id)).map(str::to_owned);
    let on_a = line_with_id(&a_log).unwrap_or_else(|| panic!("relay-a logged no line with {id}:\n{a_log}"));
    let on_b = line_with_id(&b_log).unwrap_or_else(|| panic!("relay-b logged no line with {id}:\n{b_log}"));
    assert!(on_a.contains("forwarded from a peer relay") && on_a.contains("relay-b"), "{on_a}");
    assert!(on_b.contains("client_id=relay:relay-a"), "{on_b}");
}

/// An agent that stops: the relay that forwarded to it answers 502 within 3 s, and no request
/// waits longer than that.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn an_agent_that_stops_is_answered_502_by_the_other_relay_within_3_s() {
    let cluster = TwoRelays::start();
    assert_eq!(request(&cluster.b.http, "GET", "api.test", "/", b"").status, 200, "office-2 is local to relay-b");
    assert_eq!(request(&cluster.a.http, "GET", "api.test", "/", b"").status, 200, "relay-a forwards");
    signal(&cluster.two.pid().to_string(), "KILL");
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let took = wait_for("a 502 from relay-a", Duration::from_secs(3), || {
        let sent = Instant::now();
        let reply = request(&cluster.a.http, "GET", "api.test", "/", b"");
        slowest = slowest.max(sent.elapsed());
        assert!(matches!(reply.status, 200 | 502), "{} {}", reply.status, reply.text());
        reply.status == 502
    });
    eprintln!("relay-a answered 502 {took:?} after office-2 was killed (slowest request {slowest:?})");
    assert!(killed.elapsed() < Duration::from_secs(3) + Duration::from_millis(500));
    let reply = request(&cluster.a.http, "GET", "api.test", "/", b"");
    assert_eq!(reply.status, 502, "{}", reply.text());
}

/// A relay killed with `kill -9`: the requests the others forwarded to it fail (502) within the
/// lease's TTL (3 s here), each answered, never hung; then they are answered at once.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn requests_for_a_killed_relays_agents_get_502_within_the_lease_ttl() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    assert_eq!(request(&a.http, "GET", "api.test", "/", b"").status, 200);
    // One request in flight when the relay dies.
    let waiting = {
        let http = a.http.clone();
        std::thread::spawn(move || {
            let sent = Instant::now();
            (request(&http, "GET", "api.test", "/delay/20000", b"").status, sent.elapsed())
        })
    };
    wait_for("the request in flight on relay-b", Duration::from_secs(10), || {
        metric(&http_get(&b.admin, "/metrics"), "quictun_active_streams").unwrap_or(0.0) >= 1.0
    });
    signal(&b.proc.pid().to_string(), "KILL");
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let took = wait_for("relay-a to answer 502 at once", Duration::from_secs(3 + 3), || {
        let sent = Instant::now();
        let status = request(&a.http, "GET", "api.test", "/", b"").status;
        let elapsed = sent.elapsed();
        slowest = slowest.max(elapsed);
        assert_eq!(status, 502, "office-2's relay is dead");
        elapsed < Duration::from_millis(100)
    });
    let (status, waited) = waiting.join().unwrap();
    eprintln!(
        "after kill -9: 502 at once {took:?} later (slowest {slowest:?}); the request in flight got {status} after {waited:?}"
    );
    assert_eq!(status, 502);
    assert!(waited < Duration::from_secs(3 + 1), "the request in flight hung {waited:?}");
    assert!(slowest < Duration::from_secs(3 + 1), "a request waited {slowest:?}");
    assert!(killed.elapsed() < Duration::from_secs(3 + 3));
}

/// A relay presenting another secret is refused: its requests for the others' agents get 502,
/// the refusing relay counts it.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn a_relay_with_the_wrong_cluster_secret_is_refused() {
    let cluster = TwoRelays::start();
    let (_upstream, url) = upstream(&cluster.dir);
    let c =
        Relay::start_with_secret(&cluster.dir, "relay-c", &cluster.etcd.endpoint(), &url, "not-the-secret-0123456789");
    wait_for("relay-c to see the cluster", Duration::from_secs(10), || {
        c.view() == (BOTH.map(String::from).to_vec(), true)
    });
    let reply = request(&c.http, "GET", "api.test", "/", b"");
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(reply.text().contains("refused"), "{}", reply.text());
    let b_metrics = http_get(&cluster.b.admin, "/metrics");
    assert!(metric(&b_metrics, "quictun_cluster_peers_refused_total").unwrap_or(0.0) >= 1.0, "{b_metrics}");
    assert_eq!(metric(&b_metrics, "quictun_cluster_served_total{peer=\"relay-c\"}"), None);
}

/// One hop: with the directory saying each relay holds the other's `ghost` agent (entries
/// written straight into etcd), a request goes to the other relay once and is answered 502 there,
/// never sent back.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn a_forwarded_request_is_never_forwarded_again() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    let etcd = quictun_cluster::Etcd::new(&[cluster.etcd.endpoint()], Duration::from_secs(3)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (client, relay) in [("ghost-1", b), ("ghost-2", a)] {
        let relay_id = if std::ptr::eq(relay, a) { "relay-a" } else { "relay-b" };
        let value = serde_json::json!({ "relay_id": relay_id, "advertise": relay.quic, "pin": relay.pin }).to_string();
        let key = format!("/quictun/sessions/ghost/{client}/x");
        runtime.block_on(etcd.put(key.as_bytes(), value.as_bytes(), 0)).unwrap();
    }
    wait_for("the ghosts in both views", Duration::from_secs(10), || {
        a.view().0.contains(&"ghost-1@relay-b".to_owned()) && b.view().0.contains(&"ghost-2@relay-a".to_owned())
    });
    for (relay, other) in [(a, "relay-b"), (b, "relay-a")] {
        let reply = request(&relay.http, "GET", "ghost.test", "/", b"");
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(reply.text().contains("no agent of group \"ghost\""), "{}", reply.text());
        let _ = other;
    }
    let (a_metrics, b_metrics) = (http_get(&a.admin, "/metrics"), http_get(&b.admin, "/metrics"));
    for (metrics, peer) in [(&a_metrics, "relay-b"), (&b_metrics, "relay-a")] {
        let sample = |name: &str| metric(metrics, &format!("quictun_cluster_{name}_total{{peer=\"{peer}\"}}"));
        assert_eq!(sample("forwarded"), Some(1.0), "each relay forwarded its own request once:\n{metrics}");
        assert_eq!(sample("served"), Some(1.0), "and served the other's once, never sending it back:\n{metrics}");
    }
}

/// The HA setup: an agent connected to two relays is held by both, and a third relay forwards to
/// either; when one of the two is killed (`kill -9`), requests through the third still reach the
/// agent through the other, none failing (an idempotent request caught on the dead link moves to
/// the other relay), none waiting past the link's idle timeout.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn an_agent_on_two_relays_is_served_through_either_when_one_dies() {
    let cluster = TwoRelays::start();
    let (a, b) = (&cluster.a, &cluster.b);
    // relay-c shares relay-a's certificate, so that one pin reaches both.
    let certs = cluster.dir.join("relay-c/certs");
    std::fs::create_dir_all(&certs).unwrap();
    for file in ["relay.crt", "relay.key"] {
        std::fs::copy(cluster.dir.join("relay-a/certs").join(file), certs.join(file)).unwrap();
    }
    let (_upstream, url) = upstream(&cluster.dir);
    let c = Relay::start(&cluster.dir, "relay-c", &cluster.etcd.endpoint(), &url);
    assert_eq!(c.pin, a.pin);
    let args = [
        "agent",
        "--relay",
        &a.quic,
        "--relay",
        &c.quic,
        "--pin",
        &a.pin,
        "--client-id",
        "office-3",
        "--token",
        "three",
    ];
    let _three = Proc::spawn(&args, &cluster.dir);
    wait_for("office-3 on relay-a and relay-c", Duration::from_secs(10), || {
        let view = b.view().0;
        view.contains(&"office-3@relay-a".to_owned()) && view.contains(&"office-3@relay-c".to_owned())
    });
    for _ in 0..4 {
        assert_eq!(request(&b.http, "GET", "web.test", "/", b"").status, 200);
    }
    let b_metrics = http_get(&b.admin, "/metrics");
    for peer in ["relay-a", "relay-c"] {
        let sample = format!("quictun_cluster_forwarded_total{{peer=\"{peer}\"}}");
        assert!(metric(&b_metrics, &sample).unwrap_or(0.0) >= 1.0, "relay-b took turns:\n{b_metrics}");
    }

    signal(&a.proc.pid().to_string(), "KILL");
    let killed = Instant::now();
    let (mut answered, mut slowest) = (0, Duration::ZERO);
    while killed.elapsed() < Duration::from_secs(3 + 3) {
        let sent = Instant::now();
        let reply = request(&b.http, "GET", "web.test", "/", b"");
        slowest = slowest.max(sent.elapsed());
        assert_eq!(reply.status, 200, "after {:?}: {}", killed.elapsed(), reply.text());
        answered += 1;
    }
    eprintln!("{answered} requests through relay-b in the 6 s after relay-a's kill -9, all 200; slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(3 + 1), "a request waited {slowest:?}");
}

/// `quictun bench --workloads cluster` starts its own etcd and two relays and measures both
/// paths: a row through the holding relay and one through the forwarding relay, each with
/// answers, no errors and a CPU figure.
#[test]
#[cfg_attr(not(etcd_capable), ignore = "needs etcd: apt-get install etcd-server")]
fn the_cluster_benchmark_measures_both_paths() {
    let dir = TempDir::new();
    let out = dir.join("results");
    let args = ["bench", "--transports", "quic", "--workloads", "cluster", "--duration", "0.5", "--concurrency", "4"];
    let run = Command::new(BIN).args(args).arg("--out").arg(&out).env("RUST_LOG", "warn").output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    for via in ["holding relay c=4", "forwarding relay c=4"] {
        let row = rows
            .iter()
            .find(|r| r["workload"] == "cluster" && r["variant"] == via)
            .unwrap_or_else(|| panic!("no {via} row"));
        assert!(row["requests"].as_u64().is_some_and(|n| n > 0) && row["errors"] == 0, "{row}");
        assert!(row["tunnel_cpu_us_per_request"].as_f64().is_some_and(|us| us > 0.0), "{row}");
    }
}
