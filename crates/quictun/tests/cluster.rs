//! The relay cluster's session directory against a real etcd (Debian's `etcd-server`, started
//! here): relays and agents are real processes. Every relay sees every agent with the relay that
//! holds it; an agent that stops is withdrawn; a relay killed with `kill -9` loses its agents when
//! its lease ends; an etcd outage leaves the relays serving from their caches and their own
//! agents, and they sync again when it is back.
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
}

const CLIENTS: &str = "[[clients]]\nid = \"office-1\"\ntoken = \"one\"\ngroup = \"web\"\n\
                       [[clients]]\nid = \"office-2\"\ntoken = \"two\"\ngroup = \"web\"\n\
                       [[clients]]\nid = \"office-3\"\ntoken = \"three\"\ngroup = \"web\"\n";

impl Relay {
    /// Relay `id` (its QUIC-LB server id: the id's last letter in hex) of the cluster at `etcd`.
    fn start(dir: &TempDir, id: &str, etcd: &str, upstream: &str) -> Self {
        let server_id = format!("{:02x}", id.bytes().last().unwrap_or(0));
        let relay_dir = dir.join(id);
        std::fs::create_dir_all(&relay_dir).unwrap();
        let quic = SocketAddr::from(([127, 0, 0, 1], free_udp()));
        let config = relay_dir.join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\nquic_listen = \"{quic}\"\nhttp_listen = \"127.0.0.1:0\"\ngrpc_listen = \"127.0.0.1:0\"\n\
                 admin_listen = \"127.0.0.1:0\"\n\
                 [cluster]\nrelay_id = \"{id}\"\netcd = [\"{etcd}\"]\nadvertise = \"{quic}\"\nlease_ttl_secs = 3\n\
                 server_id = \"{server_id}\"\n\
                 {CLIENTS}\
                 [[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"{upstream}\"]\n\
                 [[routes]]\nhost = \"*\"\nupstream = \"app\"\n"
            ),
        )
        .unwrap();
        let proc = Proc::spawn(&["relay", "--config", config.to_str().unwrap()], &relay_dir);
        let http = proc.line_with("HTTP ingress").rsplit("http://").next().unwrap().trim().to_owned();
        let admin_line = proc.line_with("admin ");
        let admin = admin_line.rsplit("http://").next().unwrap().trim().trim_end_matches("/api/sessions").to_owned();
        let pin = proc.line_with("pin").split_whitespace().last().unwrap().to_owned();
        Self { proc, http, admin, quic: quic.to_string(), pin }
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
