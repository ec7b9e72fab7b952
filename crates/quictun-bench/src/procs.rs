//! The processes under test: the real `quictun` binary run as upstream, relay and agent(s), each
//! its own process, with fresh certificates and configuration in a temporary directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How requests reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Through the tunnel over QUIC.
    Quic,
    /// Through the tunnel over gRPC (TCP + TLS + HTTP/2).
    Grpc,
    /// Straight to the upstream: the limit.
    Direct,
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Grpc => "grpc",
            Self::Direct => "direct",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(Self::Quic),
            "grpc" => Ok(Self::Grpc),
            "direct" => Ok(Self::Direct),
            other => Err(format!("unknown transport {other:?} (quic, grpc, direct)")),
        }
    }
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Starts `exe args…`, its output going to `log`.
    pub fn spawn(exe: &Path, args: &[String], log: &Path, name: &str) -> anyhow::Result<Self> {
        Self::spawn_in(None, exe, args, log, name)
    }

    /// Starts `exe args…` inside network namespace `netns` (`ip netns exec` replaces itself with
    /// the program, so the pid is the program's).
    pub fn spawn_in(netns: Option<&str>, exe: &Path, args: &[String], log: &Path, name: &str) -> anyhow::Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { child, name: name.to_owned() })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn status_kib(&self, key: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS:")
    }

    /// Peak resident memory since the last [`Proc::reset_peak`], in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resets the peak-RSS counter (Linux `clear_refs` 5).
    pub fn reset_peak(&self) {
        let _unsupported = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// CPU time used so far (user + system), from `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time_of(&format!("/proc/{}/stat", self.pid()))
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _already_gone = self.child.kill();
        let _reaped = self.child.wait();
    }
}

/// CPU time (user + system) from a `/proc/…/stat` file.
fn cpu_time_of(stat: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(stat).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time this process (the load generator) has used so far.
pub fn own_cpu_time() -> Option<Duration> {
    cpu_time_of("/proc/self/stat")
}

/// Runs `exe args…` to completion and returns its standard output.
pub fn run_to_end(exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe).args(args).output().with_context(|| format!("running quictun {args:?}"))?;
    if !out.status.success() {
        bail!("quictun {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Generates a certificate in `dir/certs` (`relay.crt`, `relay.key`) and returns its pin.
pub fn generate_cert(exe: &Path, dir: &Path) -> anyhow::Result<String> {
    let certs = dir.join("certs");
    run_to_end(exe, &["cert", "gen", "--out", &certs.to_string_lossy()])?;
    Ok(run_to_end(exe, &["cert", "pin", &certs.join("relay.crt").to_string_lossy()])?.trim().to_owned())
}

/// A free TCP or UDP port on 127.0.0.1 (bound, then released).
pub fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// Polls `probe` every 50 ms until it holds (a benchmark may poll; tests wait on signals).
pub async fn wait_until(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !probe().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Where the processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Everything on 127.0.0.1.
    Loopback,
    /// Agent and upstream in the WAN namespace, behind [`crate::wan::WanLink`].
    Wan,
}

/// A running stack: upstream, and for tunnel modes a relay and an agent process.
#[derive(Debug)]
pub struct Stack {
    /// The transport.
    pub mode: Mode,
    /// Where the load goes (the relay's ingress, or the upstream for `direct`).
    pub target: SocketAddr,
    /// The relay's admin endpoint.
    pub admin: Option<SocketAddr>,
    /// The agent's egress listener ([`Stack::start_with_egress`]): requests sent there go
    /// through the tunnel the other way, and the relay forwards them to the upstream.
    pub egress: Option<SocketAddr>,
    /// The relay's QUIC port.
    pub quic_port: u16,
    /// The relay's gRPC port.
    pub grpc_port: u16,
    /// The upstream.
    pub upstream: Proc,
    /// The upstream's TCP port.
    pub upstream_port: u16,
    /// Where the `udp` workload's datagrams go: the relay's `[[udp]]` listener, or the upstream's
    /// UDP echo for `direct`.
    pub udp_target: SocketAddr,
    /// The relay.
    pub relay: Option<Proc>,
    /// The agent (or the process holding many agents).
    pub agent: Option<Proc>,
    /// A second relay of the relay's cluster, holding no agent ([`Stack::start_in_cluster`]).
    pub peer_relay: Option<Proc>,
    /// The cluster the relay joins, when it joins one.
    cluster: Option<ClusterJoin>,
    topology: Topology,
    dir: PathBuf,
}

/// The cluster a stack's relays join: etcd's endpoint and the cluster's secret.
#[derive(Debug, Clone)]
pub struct ClusterJoin {
    /// etcd's client endpoint (`host:port`).
    pub etcd: String,
    /// The cluster's secret.
    pub token: String,
}

impl ClusterJoin {
    /// The `[cluster]` section of relay `relay_id`, reached by the other relays at `advertise`.
    fn section(&self, relay_id: &str, advertise: &str) -> String {
        format!(
            "[cluster]\nrelay_id = \"{relay_id}\"\netcd = [\"{}\"]\nadvertise = \"{advertise}\"\ntoken = \"{}\"\n",
            self.etcd, self.token
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.agent.take();
        self.peer_relay.take();
        self.relay.take();
        let _left_behind = std::fs::remove_dir_all(&self.dir);
    }
}

/// True once something accepts TCP connections at `addr`.
pub async fn tcp_ready(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

/// The number of sessions the relay's admin endpoint lists.
pub async fn session_count(admin: SocketAddr) -> Option<usize> {
    let body = crate::load::get_text(admin, "/api/sessions").await.ok()?;
    let sessions: serde_json::Value = serde_json::from_str(&body).ok()?;
    sessions.as_array().map(Vec::len)
}

impl Stack {
    /// Starts the upstream and, unless `direct`, a relay and `agents` agents (one process), all
    /// on loopback.
    pub async fn start(exe: &Path, mode: Mode, agents: usize) -> anyhow::Result<Self> {
        Self::start_on(exe, mode, agents, Topology::Loopback).await
    }

    /// [`Stack::start`] on a topology.
    pub async fn start_on(exe: &Path, mode: Mode, agents: usize, topology: Topology) -> anyhow::Result<Self> {
        Self::launch(exe, mode, agents, topology, false, None).await
    }

    /// A loopback stack with one agent whose relay (`relay-a`) joins `cluster`; start the second
    /// relay with [`Stack::start_peer_relay`].
    pub async fn start_in_cluster(exe: &Path, mode: Mode, cluster: ClusterJoin) -> anyhow::Result<Self> {
        Self::launch(exe, mode, 1, Topology::Loopback, false, Some(cluster)).await
    }

    /// A loopback stack with one agent that also serves egress: [`Stack::egress`] is its
    /// listener, and the relay forwards what arrives there to the upstream. Only this stack
    /// lifts the relay's egress stream limit, which costs relay memory per session.
    pub async fn start_with_egress(exe: &Path, mode: Mode) -> anyhow::Result<Self> {
        Self::launch(exe, mode, 1, Topology::Loopback, true, None).await
    }

    async fn launch(
        exe: &Path,
        mode: Mode,
        agents: usize,
        topology: Topology,
        egress: bool,
        cluster: Option<ClusterJoin>,
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("quictun-bench-{}-{}", std::process::id(), free_port(false)?));
        std::fs::create_dir_all(&dir)?;
        let port = free_port(false)?;
        // The upstream as the agent sees it, and as a direct client reaches it.
        let (listen, up_addr, reach): (String, SocketAddr, SocketAddr) = match topology {
            Topology::Loopback => {
                let a: SocketAddr = format!("127.0.0.1:{port}").parse()?;
                (a.to_string(), a, a)
            }
            Topology::Wan => (
                format!("0.0.0.0:{port}"),
                format!("127.0.0.1:{port}").parse()?,
                format!("{}:{port}", crate::wan::AGENT_IP).parse()?,
            ),
        };
        let netns = (topology == Topology::Wan).then_some(crate::wan::NETNS);
        let udp_echo = SocketAddr::new(up_addr.ip(), free_port(true)?);
        let upstream = Proc::spawn_in(
            netns,
            exe,
            &["upstream".into(), "--listen".into(), listen, "--udp-echo".into(), udp_echo.to_string()],
            &dir.join("upstream.log"),
            "upstream",
        )?;
        if mode == Mode::Direct || topology == Topology::Loopback {
            wait_until("the upstream", Duration::from_secs(20), async || tcp_ready(reach).await).await?;
        }
        let mut stack = Self {
            mode,
            target: reach,
            admin: None,
            egress: None,
            quic_port: 0,
            grpc_port: 0,
            upstream,
            upstream_port: port,
            udp_target: udp_echo,
            relay: None,
            agent: None,
            peer_relay: None,
            cluster,
            topology,
            dir,
        };
        if mode != Mode::Direct {
            stack.start_tunnel(exe, up_addr, agents, egress).await?;
        }
        Ok(stack)
    }

    async fn start_tunnel(
        &mut self,
        exe: &Path,
        upstream: SocketAddr,
        agents: usize,
        with_egress: bool,
    ) -> anyhow::Result<()> {
        let (tunnel_ip, netns) = match self.topology {
            Topology::Loopback => ("127.0.0.1", None),
            Topology::Wan => (crate::wan::RELAY_IP, Some(crate::wan::NETNS)),
        };
        let egress = if with_egress { Some(SocketAddr::from(([127, 0, 0, 1], free_port(false)?))) } else { None };
        let dir = self.dir.clone();
        let pin = generate_cert(exe, &dir)?;
        let udp_echo = self.udp_target;
        let (http, admin) = self.start_relay(exe, tunnel_ip, (upstream, udp_echo), agents, with_egress).await?;
        let transport = self.mode.name().to_owned();
        let mut agent_args: Vec<String> = vec![
            "bench-agents".into(),
            "--count".into(),
            agents.to_string(),
            "--relay".into(),
            format!("{tunnel_ip}:{}", self.quic_port),
            "--grpc-relay".into(),
            format!("{tunnel_ip}:{}", self.grpc_port),
            "--pin".into(),
            pin,
            "--transport".into(),
            transport,
        ];
        if let Some(egress) = egress {
            agent_args.extend(["--egress-listen".into(), egress.to_string()]);
        }
        self.agent = Some(Proc::spawn_in(netns, exe, &agent_args, &dir.join("agent.log"), "agent")?);
        wait_until("the agents to register", Duration::from_secs(120), async || {
            session_count(admin).await == Some(agents)
        })
        .await?;
        if let Some(egress) = egress {
            wait_until("the agent's egress listener", Duration::from_secs(20), async || tcp_ready(egress).await)
                .await?;
        }
        self.target = http;
        self.admin = Some(admin);
        self.egress = egress;
        // The upstream may be in another namespace: wait until a request crosses the tunnel.
        wait_until("the upstream through the tunnel", Duration::from_secs(20), async || {
            crate::load::get_text(http, "/").await.is_ok_and(|body| body.starts_with("Hello"))
        })
        .await?;
        Ok(())
    }

    /// Starts the relay on ports free a moment ago. Such a port can be taken in between (the
    /// load's own connections draw ephemeral ports from the same range): a relay that exits
    /// before it listens is started again on new ports, up to three times.
    async fn start_relay(
        &mut self,
        exe: &Path,
        tunnel_ip: &str,
        (upstream, udp_echo): (SocketAddr, SocketAddr),
        agents: usize,
        with_egress: bool,
    ) -> anyhow::Result<(SocketAddr, SocketAddr)> {
        let dir = self.dir.clone();
        for attempt in 1..=3 {
            self.quic_port = free_port(true)?;
            self.grpc_port = free_port(false)?;
            let http: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
            let udp: SocketAddr = format!("127.0.0.1:{}", free_port(true)?).parse()?;
            let mut config = format!(
                "[relay]\nquic_listen = \"{tunnel_ip}:{q}\"\ngrpc_listen = \"{tunnel_ip}:{g}\"\nhttp_listen = \"{http}\"\n\
                 admin_listen = \"{admin}\"\ncert = \"{d}/certs/relay.crt\"\nkey = \"{d}/certs/relay.key\"\n\
                 max_streams_per_agent = 16384\ndrain_timeout_secs = 1\nhandshake_rate_per_ip = 0\n\
                 max_connections_per_ip = 0\nmax_requests_per_ip = 0\nmax_pending_per_network = 0\n{egress_limit}{relay_extra}\n\
                 [[upstreams]]\nname = \"up\"\ngroup = \"bench\"\ntargets = [\"http://{upstream}\"]\n\
                 [[routes]]\nhost = \"*\"\nupstream = \"up\"\n{route_extra}\n{egress_route}\
                 [[udp]]\nlisten = \"{udp}\"\ngroup = \"bench\"\nupstream = \"{udp_echo}\"\nqueue_datagrams = 1024\n",
                q = self.quic_port,
                g = self.grpc_port,
                relay_extra = crate::settings().relay_toml,
                route_extra = crate::settings().route_toml,
                d = dir.display(),
                // The upstream is on loopback, where the relay reaches it too.
                egress_limit = if with_egress { "max_egress_streams_per_agent = 16384\n" } else { "" },
                egress_route = if with_egress {
                    format!("[[egress_routes]]\nhost = \"*\"\ntarget = \"http://{upstream}\"\n")
                } else {
                    String::new()
                },
            );
            for i in 0..agents {
                config.push_str(&format!(
                    "[[clients]]\nid = \"bench-{i}\"\ntoken = \"bench-token\"\ngroup = \"bench\"\n"
                ));
            }
            if let Some(cluster) = &self.cluster {
                config.push_str(&cluster.section("relay-a", &format!("{tunnel_ip}:{}", self.quic_port)));
            }
            std::fs::write(dir.join("relay.toml"), config)?;
            let relay_args =
                ["relay".to_owned(), "--config".into(), dir.join("relay.toml").to_string_lossy().into_owned()];
            self.relay = Some(Proc::spawn(exe, &relay_args, &dir.join("relay.log"), "relay")?);
            let relay = self.relay.as_mut().ok_or_else(|| anyhow::anyhow!("no relay process"))?;
            let mut exited = false;
            wait_until("the relay", Duration::from_secs(20), async || {
                exited = relay.check_alive().is_err();
                exited || tcp_ready(admin).await
            })
            .await?;
            if !exited {
                self.udp_target = udp;
                return Ok((http, admin));
            }
            let log = std::fs::read_to_string(dir.join("relay.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            tracing::warn!(attempt, log = ?tail, "the relay exited before it listened: trying new ports");
        }
        bail!("the relay exited before it listened, three times (see {})", dir.join("relay.log").display())
    }

    /// Starts `relay-b`, a second relay of the stack's cluster with the same route and no agent
    /// of its own, and returns its HTTP ingress once it forwards requests to `relay-a`'s agent.
    pub async fn start_peer_relay(&mut self, exe: &Path) -> anyhow::Result<SocketAddr> {
        let cluster = self.cluster.clone().ok_or_else(|| anyhow::anyhow!("the stack is in no cluster"))?;
        let dir = self.dir.join("relay-b");
        std::fs::create_dir_all(&dir)?;
        generate_cert(exe, &dir)?;
        let quic = free_port(true)?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port(false)?).parse()?;
        let config = format!(
            "[relay]\nquic_listen = \"127.0.0.1:{quic}\"\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"{http}\"\n\
             admin_listen = \"{admin}\"\ncert = \"{d}/certs/relay.crt\"\nkey = \"{d}/certs/relay.key\"\n\
             drain_timeout_secs = 1\nmax_connections_per_ip = 0\nmax_requests_per_ip = 0\n{relay_extra}\n\
             [[upstreams]]\nname = \"up\"\ngroup = \"bench\"\ntargets = [\"http://127.0.0.1:{up}\"]\n\
             [[routes]]\nhost = \"*\"\nupstream = \"up\"\n{route_extra}\n{section}",
            d = dir.display(),
            up = self.upstream_port,
            relay_extra = crate::settings().relay_toml,
            route_extra = crate::settings().route_toml,
            section = cluster.section("relay-b", &format!("127.0.0.1:{quic}")),
        );
        std::fs::write(dir.join("relay.toml"), config)?;
        let args = ["relay".to_owned(), "--config".into(), dir.join("relay.toml").to_string_lossy().into_owned()];
        self.peer_relay = Some(Proc::spawn(exe, &args, &self.dir.join("relay-b.log"), "relay-b")?);
        wait_until("relay-b", Duration::from_secs(20), async || tcp_ready(admin).await).await?;
        wait_until("relay-b to forward to relay-a's agent", Duration::from_secs(30), async || {
            crate::load::get_text(http, "/").await.is_ok_and(|body| body.starts_with("Hello"))
        })
        .await?;
        Ok(http)
    }

    /// Where a process of this stack called `name` writes its log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Fails if any process of the stack has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.upstream.check_alive()?;
        if let Some(relay) = self.relay.as_mut() {
            relay.check_alive()?;
        }
        if let Some(agent) = self.agent.as_mut() {
            agent.check_alive()?;
        }
        if let Some(relay) = self.peer_relay.as_mut() {
            relay.check_alive()?;
        }
        Ok(())
    }
}
