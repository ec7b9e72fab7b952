//! The stage of the chaos suite: the real `quictun` binary as upstream, relay and agents (each its
//! own process, optionally in a network namespace), a load client, and packet loss by nftables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_quictun");
pub const WAIT: Duration = Duration::from_secs(30);
/// QUIC's idle timeout at the default settings: a relay that hears nothing from an agent for this
/// long declares it dead (the agent PINGs every idle second; the heartbeats, every 5 s with 3
/// misses, would take 15 s).
pub const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// One chaos test at a time: they measure latency and memory and must not disturb each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the suite's turn (held for the whole test); fails the test when not running as root with
/// nftables.
pub async fn privileged(test: &str) -> tokio::sync::MutexGuard<'static, ()> {
    // The tests run only where `build.rs` found root and nft, or under CI, where their lack fails.
    assert!(is_privileged(), "chaos: {test} needs root and nftables (network namespaces, packet loss)");
    SERIAL.lock().await
}

fn is_privileged() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse::<u32>().ok()))
        == Some(0);
    let nft = std::process::Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success());
    root && nft
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("quictun-chaos-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process: its stdout lines arrive on a channel, stderr goes to a log file; killed on
/// drop.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub name: String,
}

impl Proc {
    pub fn spawn(netns: Option<&str>, args: &[&str], log: &Path, name: &str) -> Self {
        Self::spawn_logging(netns, args, log, name, "warn")
    }

    /// [`Proc::spawn`] with `RUST_LOG` at `level`.
    pub fn spawn_logging(netns: Option<&str>, args: &[&str], log: &Path, name: &str, level: &str) -> Self {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .args(args)
            .env("RUST_LOG", level)
            .env_remove("QUICTUN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        Self { child, lines, name: name.to_owned() }
    }

    /// A process that is not started (replaced before use).
    fn placeholder() -> Self {
        let child = Command::new("true").kill_on_drop(true).spawn().unwrap();
        Self { child, lines: mpsc::channel(1).1, name: "not started".to_owned() }
    }

    /// The relay's banner: its stdout lines up to the one with the pin (the last).
    pub async fn banner(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while !lines.last().is_some_and(|l: &String| l.contains("agent command")) {
            lines.push(self.line_with("").await);
        }
        lines
    }

    /// The next stdout line containing `needle`.
    pub async fn line_with(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("{}: no output line containing {needle:?}", self.name),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process is running")
    }

    /// `kill -9`.
    pub async fn kill9(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

/// The address printed after `marker` (`udp://`, `http://`) on a line.
fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let rest = line.rsplit(marker).next().unwrap();
    rest.split(['/', ' ']).next().unwrap().parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// The processes of one test and where they listen.
pub struct Scene {
    pub dir: TempDir,
    _upstream: Proc,
    pub upstream_addr: SocketAddr,
    /// The upstream's UDP echo (`{udp_upstream}` in `extra`).
    pub udp_upstream_addr: SocketAddr,
    pub relay: Proc,
    /// Where the relay's stderr (its log) goes.
    pub relay_log: PathBuf,
    pub quic: SocketAddr,
    /// The gRPC listener, when `extra` chose `transport = "all"`.
    pub grpc: Option<SocketAddr>,
    /// The `[[tcp]]` tunnels' listeners, in the file's order.
    pub tcp: Vec<SocketAddr>,
    /// The `[[udp]]` tunnels' listeners, in the file's order.
    pub udp: Vec<SocketAddr>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub pin: String,
    extra: String,
    netns: Option<String>,
    log_level: &'static str,
}

/// The addresses a relay listens on (`127.0.0.1:0` and a free port unless told).
struct Listen {
    quic: String,
    grpc: String,
    http: String,
    admin: String,
}

impl Default for Listen {
    fn default() -> Self {
        let any = || "127.0.0.1:0".to_owned();
        Self { quic: any(), grpc: any(), http: any(), admin: any() }
    }
}

/// Agents known to the chaos relay: `agent-N` with token `token-N`, all in group `web`.
pub const AGENTS: usize = 4;

impl Scene {
    /// An upstream (in `netns` when given), and a relay with `extra` lines in `[relay]` (tables
    /// such as `[[tcp]]` may follow them; `{upstream}` in them is the upstream's address), its
    /// QUIC listener on `quic_ip`, logging warnings.
    pub async fn start(netns: Option<&str>, quic_ip: &str, extra: &str) -> Self {
        Self::start_logging(netns, quic_ip, extra, "warn").await
    }

    /// [`Scene::start`] with the relay's `RUST_LOG` at `log_level`.
    pub async fn start_logging(netns: Option<&str>, quic_ip: &str, extra: &str, log_level: &'static str) -> Self {
        let dir = TempDir::new();
        let args = ["upstream", "--listen", "127.0.0.1:0", "--udp-echo", "127.0.0.1:0"];
        let mut upstream = Proc::spawn(netns, &args, &dir.0.join("upstream.log"), "upstream");
        let upstream_addr = addr_after(&upstream.line_with("listening on").await, "http://");
        let udp_upstream_addr = addr_after(&upstream.line_with("echoing UDP").await, "udp://");
        let mut scene = Self {
            dir,
            _upstream: upstream,
            upstream_addr,
            udp_upstream_addr,
            relay_log: PathBuf::new(),
            relay: Proc::placeholder(),
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            grpc: None,
            tcp: Vec::new(),
            udp: Vec::new(),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            pin: String::new(),
            extra: extra.to_owned(),
            netns: netns.map(str::to_owned),
            log_level,
        };
        let listen = Listen { quic: format!("{quic_ip}:0"), ..Listen::default() };
        scene.spawn_relay(&listen).await;
        scene
    }

    /// Writes the relay's file (the default settings, heartbeats and timeouts included, but for
    /// `extra`; the transport QUIC unless `extra` names one) and starts the relay on `listen`.
    async fn spawn_relay(&mut self, listen: &Listen) {
        let Listen { quic, grpc, http, admin } = listen;
        let extra = self
            .extra
            .replace("{upstream}", &self.upstream_addr.to_string())
            .replace("{udp_upstream}", &self.udp_upstream_addr.to_string());
        let transport = if extra.contains("transport =") { "" } else { "transport = \"quic\"\n" };
        let mut config = format!(
            "[relay]\nquic_listen = \"{quic}\"\ngrpc_listen = \"{grpc}\"\nhttp_listen = \"{http}\"\n\
             admin_listen = \"{admin}\"\n{transport}drain_timeout_secs = 2\n{extra}\n"
        );
        for i in 1..=AGENTS {
            config.push_str(&format!("[[clients]]\nid = \"agent-{i}\"\ntoken = \"token-{i}\"\ngroup = \"web\"\n"));
        }
        config.push_str(&format!(
            "[[upstreams]]\nname = \"app\"\ngroup = \"web\"\ntargets = [\"http://{}\"]\n\
             [[routes]]\nhost = \"*\"\nupstream = \"app\"\n",
            self.upstream_addr
        ));
        // The identity is generated beside the file at the first start and kept across restarts.
        let path = self.dir.0.join("relay.toml");
        std::fs::write(&path, config).unwrap();
        self.relay_log = self.dir.0.join(format!("relay-{}.log", fastrand::u32(..)));
        let args = ["relay", "--config", path.to_str().unwrap()];
        let mut relay = Proc::spawn_logging(None, &args, &self.relay_log, "relay", self.log_level);
        let banner = relay.banner().await;
        let line = |what: &str| banner.iter().find(|l| l.contains(what)).cloned();
        self.quic = line("QUIC (agents)").map_or(self.quic, |l| addr_after(&l, "udp://"));
        self.grpc = line("gRPC (agents)").map(|l| addr_after(&l, "tcp://"));
        self.tcp = banner.iter().filter(|l| l.contains("TCP tunnel")).map(|l| addr_after(l, "tcp://")).collect();
        self.udp = banner.iter().filter(|l| l.contains("UDP tunnel")).map(|l| addr_after(l, "udp://")).collect();
        self.http = addr_after(&line("HTTP ingress").unwrap(), "http://");
        self.admin = addr_after(&line("admin").unwrap(), "http://");
        let pin = line("pin").unwrap().split_whitespace().last().unwrap().to_owned();
        assert!(self.pin.is_empty() || self.pin == pin, "the restarted relay must reuse its certificate");
        self.pin = pin;
        self.relay = relay;
    }

    /// `kill -9` the relay and start a new one on the same ports (and certificate). Returns when
    /// the new one listens.
    pub async fn kill_and_restart_relay(&mut self) {
        self.relay.kill9().await;
        let listen = Listen {
            quic: self.quic.to_string(),
            grpc: self.grpc.map_or_else(|| Listen::default().grpc, |a| a.to_string()),
            http: self.http.to_string(),
            admin: self.admin.to_string(),
        };
        // The killed process's sockets are released by the kernel at once; retry if not yet.
        while tokio::time::timeout(WAIT, self.spawn_relay(&listen)).await.is_err() {}
    }

    /// Starts agent `agent-{n}` (in the scene's namespace when it has one) dialing `relay` over
    /// QUIC, and waits until it reports its registration.
    pub async fn agent(&self, n: usize, relay: SocketAddr) -> Proc {
        let mut agent = self.agent_as(&format!("agent-{n}"), &format!("token-{n}"), relay, "quic");
        agent.line_with("connected to").await;
        agent
    }

    /// Starts an agent as `id` with `token`, dialing `relay` over `transport` (`quic`: `relay`
    /// is the QUIC address; `grpc`: the gRPC one); returns at once.
    pub fn agent_as(&self, id: &str, token: &str, relay: SocketAddr, transport: &str) -> Proc {
        let log = self.dir.0.join(format!("agent-{}.log", fastrand::u32(..)));
        let relay = relay.to_string();
        let mut args = vec!["agent", "--relay", &relay, "--transport", transport, "--pin", &self.pin];
        if transport == "grpc" {
            args.extend(["--grpc-relay", &relay]);
        }
        args.extend(["--client-id", id, "--token", token]);
        Proc::spawn(self.netns.as_deref(), &args, &log, "agent")
    }

    /// `/api/sessions` from the admin endpoint.
    pub async fn sessions(&self) -> Vec<serde_json::Value> {
        let text = get(self.admin, "/api/sessions").await.map(|(_, body)| body).unwrap_or_default();
        serde_json::from_slice::<Vec<serde_json::Value>>(&text).unwrap_or_default()
    }

    /// Waits (polling the admin endpoint) until `pred` holds for the session list; returns how long
    /// it took, or panics after `limit`.
    pub async fn sessions_until(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            if pred(&self.sessions().await) {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "{what}: not within {limit:?}; sessions: {:?}", self.sessions().await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A pooled HTTP/1.1 client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http()
}

/// One request with a body; status and whole body, or the error text.
pub async fn request(
    client: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: Bytes,
) -> Result<(u16, Bytes), String> {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", "app.test")
        .body(Full::new(body))
        .unwrap();
    let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, body))
}

/// `GET` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    request(&client(), "GET", addr, path, Bytes::new()).await
}

/// Latencies of `count` GETs of `path` by `workers` workers (each one request at a time).
pub async fn latencies(addr: SocketAddr, path: &str, count: usize, workers: usize) -> Vec<Duration> {
    let client = client();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let client = client.clone();
            let path = path.to_owned();
            tokio::spawn(async move {
                let mut times = Vec::new();
                for _ in 0..count / workers {
                    let started = Instant::now();
                    let (status, _) = request(&client, "GET", addr, &path, Bytes::new()).await.unwrap();
                    assert_eq!(status, 200);
                    times.push(started.elapsed());
                }
                times
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// The 99th percentile of some latencies.
pub fn p99(samples: &[Duration]) -> Duration {
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for t in samples {
        histogram.record(t.as_micros() as u64).unwrap();
    }
    Duration::from_micros(histogram.value_at_quantile(0.99))
}

/// A network namespace joined to the host by a veth pair: host side `10.213.N.1`, namespace side
/// `10.213.N.2`. Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = std::process::id() % 200 + 20;
        let name = format!("qtc-{tag}-{}", std::process::id());
        let host_if = format!("qh{tag}{n}");
        let ns_if = format!("qn{tag}{n}");
        let (host_ip, ns_ip) = (format!("10.213.{n}.1"), format!("10.213.{n}.2"));
        let _stale = std::process::Command::new("ip").args(["netns", "del", &name]).output();
        let _stale = std::process::Command::new("ip").args(["link", "del", &host_if]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        sh(&["ip", "link", "set", &ns_if, "netns", &name]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&["ip", "netns", "exec", &name, "ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        sh(&["ip", "netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        sh(&["ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Self { name, host_if, host_ip, ns_ip }
    }

    /// Drops `percent`% of UDP packets between the namespace and `relay_port`, in both
    /// directions, with nftables `numgen` on each side's input hook (100: all of them, a
    /// partition).
    pub fn loss(&self, percent: u32, relay_port: u16) -> Loss {
        let table = format!("qtc_loss_{}", std::process::id());
        // 100% is a partition: every packet dropped (nft refuses `mod 100 < 100`).
        let chance = if percent >= 100 { String::new() } else { format!(" numgen random mod 100 < {percent}") };
        let rules = |matcher: String| {
            format!(
                "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 {matcher}{chance} drop\n  }}\n}}\n"
            )
        };
        nft(None, &rules(format!("ip saddr {} udp dport {relay_port}", self.ns_ip)));
        nft(Some(&self.name), &rules(format!("udp sport {relay_port}")));
        Loss { table, netns: self.name.clone() }
    }
}

/// Loads an nftables script (in `netns` when given).
fn nft(netns: Option<&str>, script: &str) {
    use std::io::Write;
    let mut command = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = std::process::Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = command.stdin(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft refused:\n{script}");
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Packet loss in force until dropped.
pub struct Loss {
    table: String,
    netns: String,
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]).output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "nft", "delete", "table", "inet", &self.table])
            .output();
    }
}

/// nftables counters of the UDP packets to and from a port on this host's input hook (loopback
/// traffic crosses it once each way); removed on drop.
pub struct PacketCount {
    table: String,
}

impl PacketCount {
    /// Starts counting the packets to `port` and from it.
    pub fn start(port: u16) -> Self {
        let table = format!("qtc_count_{}", std::process::id());
        nft(
            None,
            &format!(
                "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
                 udp dport {port} counter\n    udp sport {port} counter\n  }}\n}}\n"
            ),
        );
        Self { table }
    }

    /// Packets counted so far: (to the port, from it).
    pub fn read(&self) -> (u64, u64) {
        let out = std::process::Command::new("nft").args(["list", "table", "inet", &self.table]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(counts.len(), 2, "two counters in {text}");
        (counts[0], counts[1])
    }
}

impl Drop for PacketCount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]).output();
    }
}
