//! The workloads. Each starts its own stack per transport (so one cannot warm or tire the next),
//! measures, and returns report rows.

use std::net::SocketAddr;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::BenchOptions;
use crate::load::{self, LoadSpec, RequestClass};
use crate::netem::Loss;
use crate::procs::{Mode, Stack, Topology};
use crate::report::{Latency, Row};

fn spinner(message: String) -> ProgressBar {
    use std::io::IsTerminal;
    let bar = ProgressBar::new_spinner();
    if !std::io::stderr().is_terminal() {
        // Redirected to a file or a CI log: a plain line every few seconds, not a spinner.
        bar.set_draw_target(indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::default()), 1));
    }
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} requests ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// How often progress is written when stderr is not a terminal.
const LOG_LINE_EVERY: Duration = Duration::from_secs(5);

/// A progress "terminal" that writes the bar as a plain line on stderr at most every
/// [`LOG_LINE_EVERY`], ignoring cursor movements.
#[derive(Debug, Default)]
struct LogLines {
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl LogLines {
    fn line(&self, text: &str) -> std::io::Result<()> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let Ok(mut last) = self.last.lock() else { return Ok(()) };
        if last.is_some_and(|at| at.elapsed() < LOG_LINE_EVERY) {
            return Ok(());
        }
        *last = Some(std::time::Instant::now());
        use std::io::Write;
        writeln!(std::io::stderr(), "{text}")
    }
}

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        200
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

fn instant(path: &str) -> Vec<RequestClass> {
    vec![RequestClass { name: "instant", path: path.to_owned(), percent: 100 }]
}

/// CPU time of relay + agent (+ the second relay of a cluster), for a per-request figure.
fn tunnel_cpu(stack: &Stack) -> Option<Duration> {
    let relay = stack.relay.as_ref()?.cpu_time()?;
    let agent = stack.agent.as_ref()?.cpu_time()?;
    let peer = stack.peer_relay.as_ref().map_or(Some(Duration::ZERO), crate::procs::Proc::cpu_time)?;
    Some(relay + agent + peer)
}

async fn measure(
    stack: &mut Stack,
    spec: LoadSpec,
    label: String,
) -> anyhow::Result<(crate::load::LoadResult, Option<f64>)> {
    let bar = spinner(label);
    let cpu_before = tunnel_cpu(stack);
    let result = load::run(&spec, &bar).await?;
    let cpu_after = tunnel_cpu(stack);
    bar.finish_and_clear();
    stack.check_alive()?;
    let cpu = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if result.ok > 0 => Some((after - before).as_secs_f64() * 1e6 / result.ok as f64),
        _ => None,
    };
    Ok((result, cpu))
}

/// Where a row's requests go and what it is called.
pub(crate) struct RowSpec<'a> {
    /// Where the requests go.
    pub target: SocketAddr,
    /// The row's workload.
    pub workload: &'a str,
    /// The row's variant.
    pub variant: String,
    /// The row's note.
    pub note: String,
}

/// Runs 1 KiB GETs at `concurrency` against the stack's ingress and returns the row for them.
async fn small_requests(
    opts: &BenchOptions,
    stack: &mut Stack,
    concurrency: usize,
    workload: &str,
    variant: String,
    note: String,
) -> anyhow::Result<Row> {
    let row = RowSpec { target: stack.target, workload, variant, note };
    small_requests_to(opts, stack, concurrency, row).await
}

/// Runs 1 KiB GETs at `concurrency` against `row.target`, measuring `stack`'s processes.
pub(crate) async fn small_requests_to(
    opts: &BenchOptions,
    stack: &mut Stack,
    concurrency: usize,
    row: RowSpec<'_>,
) -> anyhow::Result<Row> {
    let RowSpec { target, workload, variant, note } = row;
    let spec =
        LoadSpec { target, classes: instant("/bytes/1024"), concurrency, duration: opts.duration, rate: opts.rate };
    let label = format!("{workload} {} {variant}", stack.mode.name());
    let (result, cpu) = measure(stack, spec, label).await?;
    Ok(Row {
        workload: workload.into(),
        transport: stack.mode.name().into(),
        variant,
        requests_per_sec: Some(result.rate()),
        latency: Some(Latency::from_histogram(&result.merged())),
        errors: result.errors,
        requests: result.ok,
        tunnel_cpu_us_per_request: cpu,
        note,
        ..Row::default()
    })
}

/// 1 KiB GETs at several concurrencies.
pub async fn small(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        rows.push(
            small_requests(opts, &mut stack, concurrency, "small", format!("c={concurrency}"), String::new()).await?,
        );
    }
    Ok(rows)
}

/// gRPC unary calls with 1 KiB messages at the small workload's concurrencies: HTTP/2 on the
/// ingress, HTTP/2 to the upstream, the status in trailers.
pub async fn grpc(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        let bar = spinner(format!("grpc {} c={concurrency}", mode.name()));
        let cpu_before = tunnel_cpu(&stack);
        let result = crate::grpc_echo::run(stack.target, concurrency, 1024, opts.duration, &bar).await?;
        let cpu_after = tunnel_cpu(&stack);
        bar.finish_and_clear();
        stack.check_alive()?;
        let cpu = match (cpu_before, cpu_after) {
            (Some(before), Some(after)) if result.ok > 0 => {
                Some((after - before).as_secs_f64() * 1e6 / result.ok as f64)
            }
            _ => None,
        };
        rows.push(Row {
            workload: "grpc".into(),
            transport: mode.name().into(),
            variant: format!("c={concurrency}"),
            requests_per_sec: Some(result.rate()),
            latency: Some(Latency::from_histogram(&result.merged())),
            errors: result.errors,
            requests: result.ok,
            tunnel_cpu_us_per_request: cpu,
            note: "1 KiB unary calls, 16 per HTTP/2 connection".into(),
            ..Row::default()
        });
    }
    Ok(rows)
}

/// 1 KiB GETs through the tunnel the other way round: into the agent's egress listener, out of
/// the relay to the upstream by its `[[egress_routes]]`. `direct` is the upstream itself.
pub async fn egress(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start_with_egress(&opts.exe, mode).await?;
    let target = match (mode, stack.egress) {
        (Mode::Direct, _) => stack.target,
        (_, Some(egress)) => egress,
        (_, None) => anyhow::bail!("the stack has no egress listener"),
    };
    let mut rows = Vec::new();
    for &concurrency in &opts.concurrency {
        let row = RowSpec {
            target,
            workload: "egress",
            variant: format!("c={concurrency}"),
            note: match mode {
                Mode::Direct => "the upstream itself".into(),
                _ => "agent's egress listener → relay → upstream".into(),
            },
        };
        rows.push(small_requests_to(opts, &mut stack, concurrency, row).await?);
    }
    Ok(rows)
}

/// How long non-reading clients get to fill their buffers and count as stalled (the relay's
/// stall timeout is 1 s, its budgets are enforced a quarter of that later).
const STALL_SETTLE: Duration = Duration::from_secs(2);

/// Small requests (c=16) beside N clients that stopped reading their downloads: does a client
/// that never reads delay anyone else? One row without them, then one per N.
pub async fn slow_clients(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let mut rows = Vec::new();
    for &stalled in std::iter::once(&0).chain(&opts.slow_clients) {
        let clients = load::non_reading(stack.target, "/bytes/1073741824", stalled).await?;
        if stalled > 0 {
            tokio::time::sleep(STALL_SETTLE).await;
        }
        let note = format!("c=16 beside {stalled} clients that never read a 1 GiB download");
        rows.push(small_requests(opts, &mut stack, 16, "slow-clients", format!("stalled={stalled}"), note).await?);
        drop(clients);
    }
    Ok(rows)
}

/// 90% instant requests, 10% that take 1 s at the upstream: does a slow request delay the others?
pub async fn slow_mix(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let classes = vec![
        RequestClass { name: "instant", path: "/bytes/1024".into(), percent: 90 },
        RequestClass { name: "slow", path: "/delay/1000".into(), percent: 10 },
    ];
    let concurrency = 64;
    let spec = LoadSpec {
        target: stack.target,
        classes,
        concurrency,
        duration: opts.duration.max(Duration::from_secs(3)),
        rate: opts.rate,
    };
    let (result, cpu) = measure(&mut stack, spec, format!("slow-mix {}", mode.name())).await?;
    Ok(vec![Row {
        workload: "slow-mix".into(),
        transport: mode.name().into(),
        variant: format!("c={concurrency}"),
        requests_per_sec: Some(result.rate()),
        latency: Some(Latency::from_histogram(&result.latency[0])),
        errors: result.errors,
        requests: result.ok,
        tunnel_cpu_us_per_request: cpu,
        note: "latency of the instant requests".into(),
        ..Row::default()
    }])
}

/// A bulk transfer's time, and the CPU time relay and agent spent on it.
pub(crate) struct Transfer {
    /// From the request to the last byte.
    pub elapsed: Duration,
    /// Relay + agent CPU time, when known.
    pub cpu: Option<Duration>,
}

impl Transfer {
    /// `size` bytes' rate in MB/s.
    pub fn mb_per_sec(&self, size: u64) -> f64 {
        size as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    /// The CPU time as a note ("relay + agent CPU 2.41 s"), or nothing.
    pub fn cpu_note(&self) -> String {
        self.cpu.map_or_else(String::new, |cpu| format!("relay + agent CPU {:.2} s", cpu.as_secs_f64()))
    }
}

/// Moves `size` bytes through `stack` in one direction.
pub(crate) async fn transfer(stack: &Stack, direction: &str, size: u64, label: String) -> anyhow::Result<Transfer> {
    let bar = spinner(label);
    let cpu_before = tunnel_cpu(stack);
    let elapsed = if direction == "download" {
        let (bytes, elapsed) = load::download(stack.target, &format!("/bytes/{size}")).await?;
        anyhow::ensure!(bytes == size, "downloaded {bytes} of {size} bytes");
        elapsed
    } else {
        load::upload(stack.target, "/sink", size).await?
    };
    let cpu = cpu_before.zip(tunnel_cpu(stack)).map(|(before, after)| after.saturating_sub(before));
    bar.finish_and_clear();
    Ok(Transfer { elapsed, cpu })
}

/// A large download and a large upload.
pub async fn large(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let stack = Stack::start(&opts.exe, mode, 1).await?;
    let idle = (stack.relay.as_ref().and_then(|p| p.rss_kib()), stack.agent.as_ref().and_then(|p| p.rss_kib()));
    let size = opts.large_bytes;
    let mut rows = Vec::new();
    for direction in ["download", "upload"] {
        for p in stack.relay.iter().chain(stack.agent.iter()) {
            p.reset_peak();
        }
        let done =
            transfer(&stack, direction, size, format!("large {} {direction} {} MiB", mode.name(), size >> 20)).await?;
        let idle_note = match idle {
            (Some(r), Some(a)) => {
                format!("idle RSS relay {:.1} MiB, agent {:.1} MiB", r as f64 / 1024.0, a as f64 / 1024.0)
            }
            _ => String::new(),
        };
        let note = [idle_note, done.cpu_note()].into_iter().filter(|n| !n.is_empty()).collect::<Vec<_>>().join("; ");
        rows.push(Row {
            workload: "large".into(),
            transport: mode.name().into(),
            variant: direction.into(),
            mb_per_sec: Some(done.mb_per_sec(size)),
            relay_peak_rss_mib: mib(stack.relay.as_ref().and_then(|p| p.peak_rss_kib())),
            agent_peak_rss_mib: mib(stack.agent.as_ref().and_then(|p| p.peak_rss_kib())),
            note,
            ..Row::default()
        });
    }
    Ok(rows)
}

/// Many agent sessions (one process holds them), then many concurrent streams over them.
pub async fn many(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    if mode == Mode::Direct {
        return Ok(Vec::new());
    }
    // Relay memory with one session, then with all of them.
    let one = Stack::start(&opts.exe, mode, 1).await?;
    let base = one.relay.as_ref().and_then(|p| p.rss_kib());
    drop(one);
    let mut stack = Stack::start(&opts.exe, mode, opts.many_agents).await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // let allocations settle after the last registration
    let loaded = stack.relay.as_ref().and_then(|p| p.rss_kib());
    let per_session = match (base, loaded) {
        (Some(b), Some(l)) if opts.many_agents > 1 => Some(l.saturating_sub(b) as f64 / (opts.many_agents - 1) as f64),
        _ => None,
    };
    let spec = LoadSpec {
        target: stack.target,
        classes: instant("/delay/500"),
        concurrency: opts.many_streams,
        duration: opts.duration,
        rate: None,
    };
    let (result, cpu) =
        measure(&mut stack, spec, format!("many {} {} streams", mode.name(), opts.many_streams)).await?;
    Ok(vec![Row {
        workload: "many".into(),
        transport: mode.name().into(),
        variant: format!("{} sessions, {} streams", opts.many_agents, opts.many_streams),
        requests_per_sec: Some(result.rate()),
        latency: Some(Latency::from_histogram(&result.merged())),
        errors: result.errors,
        requests: result.ok,
        relay_kib_per_session: per_session,
        relay_peak_rss_mib: mib(stack.relay.as_ref().and_then(|p| p.peak_rss_kib())),
        tunnel_cpu_us_per_request: cpu,
        note: "requests take 500 ms at the upstream".into(),
        ..Row::default()
    }])
}

/// Small requests at c=16 with random packet loss on the tunnel's own packets (relay ↔ agent).
pub async fn lossy(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    if mode == Mode::Direct && !opts.loss_everywhere {
        return Ok(Vec::new());
    }
    if let Err(why) = crate::netem::available() {
        return Ok(vec![Row {
            workload: "lossy".into(),
            transport: mode.name().into(),
            variant: "skipped".into(),
            note: why,
            ..Row::default()
        }]);
    }
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let mut rows = Vec::new();
    for &percent in &opts.loss {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        match mode {
            Mode::Quic => udp.push(stack.quic_port),
            Mode::Grpc => tcp.push(stack.grpc_port),
            Mode::Direct => {}
        }
        if opts.loss_everywhere {
            tcp.push(stack.target.port());
            tcp.push(stack.upstream_port);
        }
        let _loss = Loss::apply(percent, &udp, &tcp)?;
        let note = if opts.loss_everywhere {
            "c=16, loss on every leg, both directions"
        } else {
            "c=16, loss on the relay-agent leg, both directions"
        };
        rows.push(small_requests(opts, &mut stack, 16, "lossy", format!("loss={percent}%"), note.into()).await?);
    }
    Ok(rows)
}

/// Flows of the `udp` workload, and each datagram's size.
const UDP_FLOWS: usize = 16;
const UDP_BYTES: usize = 512;

/// UDP datagrams through a `[[udp]]` tunnel (or straight to the echo, `direct`) at a fixed rate,
/// with no loss and with each `--loss` on the tunnel leg: replies a second, round-trip p50/p99,
/// and the share lost.
pub async fn udp(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start(&opts.exe, mode, 1).await?;
    let mut rows = Vec::new();
    let lossy = if mode == Mode::Direct { Vec::new() } else { opts.loss.clone() };
    for percent in std::iter::once(0).chain(lossy) {
        let _loss = if percent == 0 {
            None
        } else if let Err(why) = crate::netem::available() {
            rows.push(Row {
                workload: "udp".into(),
                transport: mode.name().into(),
                variant: "skipped".into(),
                note: why,
                ..Row::default()
            });
            continue;
        } else {
            let (udp, tcp) = match mode {
                Mode::Quic => (vec![stack.quic_port], vec![]),
                _ => (vec![], vec![stack.grpc_port]),
            };
            Some(Loss::apply(percent, &udp, &tcp)?)
        };
        let spec = crate::udp_load::UdpSpec {
            target: stack.udp_target,
            flows: UDP_FLOWS,
            rate: opts.udp_rate,
            size: UDP_BYTES,
            duration: opts.duration,
        };
        let bar = spinner(format!("udp {} loss={percent}%", mode.name()));
        let result = crate::udp_load::run(spec).await?;
        bar.finish_and_clear();
        stack.check_alive()?;
        let lost = result.lost_percent();
        rows.push(Row {
            workload: "udp".into(),
            transport: mode.name().into(),
            variant: format!("loss={percent}%"),
            requests_per_sec: Some(result.received as f64 / opts.duration.as_secs_f64()),
            latency: Some(Latency::from_histogram(&result.latency)),
            requests: result.received,
            lost_percent: Some(lost),
            note: format!(
                "{UDP_FLOWS} flows, {} datagrams/s of {UDP_BYTES} B offered; {lost:.2}% lost{}",
                opts.udp_rate,
                if percent == 0 { "" } else { " (loss on the relay-agent leg, both ways)" }
            ),
            ..Row::default()
        });
    }
    Ok(rows)
}

/// Small requests and bulk transfers over an emulated WAN link between relay and agent: 50 ms
/// RTT, 1% loss each way, 100 Mbit/s.
pub async fn wan(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    if let Err(why) = crate::wan::available() {
        return Ok(vec![Row {
            workload: "wan".into(),
            transport: mode.name().into(),
            variant: "skipped".into(),
            note: why,
            ..Row::default()
        }]);
    }
    let link = crate::wan::WanLink::start(crate::wan::Impairment::wan())?;
    let rows = wan_rows(opts, mode).await;
    link.close().await;
    rows
}

/// The rows of [`wan`], over the link it built.
async fn wan_rows(opts: &BenchOptions, mode: Mode) -> anyhow::Result<Vec<Row>> {
    let mut stack = Stack::start_on(&opts.exe, mode, 1, Topology::Wan).await?;
    let note = "50 ms RTT, 1% loss each way, 100 Mbit/s between relay and agent".to_owned();
    let mut rows = vec![small_requests(opts, &mut stack, 16, "wan", "small c=16".into(), note.clone()).await?];
    let size = opts.wan_bytes;
    for direction in ["download", "upload"] {
        let done =
            transfer(&stack, direction, size, format!("wan {} {direction} {} MiB", mode.name(), size >> 20)).await?;
        rows.push(Row {
            workload: "wan".into(),
            transport: mode.name().into(),
            variant: format!("large {direction}"),
            mb_per_sec: Some(done.mb_per_sec(size)),
            note: note.clone(),
            ..Row::default()
        });
    }
    Ok(rows)
}
