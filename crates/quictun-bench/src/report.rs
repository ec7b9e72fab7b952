//! The results: one row per measurement, written as JSON, a Markdown table and SVG charts.

use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::svg;

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// (percentile, ms) points for plotting.
    pub curve: Vec<(f64, f64)>,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let curve = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999]
            .iter()
            .map(|p| (*p, ms(p / 100.0)))
            .collect();
        Self { p50_ms: ms(0.5), p99_ms: ms(0.99), p999_ms: ms(0.999), curve }
    }
}

/// One measurement.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// small, large, slow-mix, many, lossy.
    pub workload: String,
    /// quic, grpc, direct.
    pub transport: String,
    /// The variant: `c=64`, `download`, `loss=1%`…
    pub variant: String,
    /// Completed requests per second.
    pub requests_per_sec: Option<f64>,
    /// Latency of the requests (of the instant ones, for slow-mix).
    pub latency: Option<Latency>,
    /// Failed requests.
    pub errors: u64,
    /// Completed requests.
    pub requests: u64,
    /// Bulk throughput.
    pub mb_per_sec: Option<f64>,
    /// Peak RSS of the relay during the measurement.
    pub relay_peak_rss_mib: Option<f64>,
    /// Peak RSS of the agent process during the measurement.
    pub agent_peak_rss_mib: Option<f64>,
    /// Relay memory per idle agent session.
    pub relay_kib_per_session: Option<f64>,
    /// Relay + agent CPU time per request, in microseconds.
    pub tunnel_cpu_us_per_request: Option<f64>,
    /// Datagrams never answered, in percent (the `udp` workload).
    pub lost_percent: Option<f64>,
    /// Anything else worth saying (a ratio, why a run was skipped).
    pub note: String,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What ran where.
    pub machine: String,
    /// When (UTC, RFC 3339-ish).
    pub date: String,
    /// The command line.
    pub command: String,
    /// The measurements.
    pub rows: Vec<Row>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "".into(), |v| format!("{v:.digits$}"))
}

/// A value for a chart title: `74.9k`, `812`.
fn short_value(value: f64) -> String {
    if value >= 1000.0 { format!("{:.1}k", value / 1000.0) } else { format!("{value:.0}") }
}

/// What each column of the table means, under it.
const COLUMNS: &str = "
## Columns

- **workload**: what was sent (see `quictun bench --help`); **transport**: `quic` and `grpc` go
  through a relay and an agent, `direct` goes straight to the upstream (the ceiling), except in
  the `floor` rows named `http …`, where it goes through two plain HTTP proxies in place of relay
  and agent (the HTTP floor), `http+splice …` (an HTTP proxy, then a TCP splice in the agent's
  place) and `splice …` (two TCP splices, no HTTP); **variant**: concurrency (`c=64`: 64 requests in flight), direction,
  or size.
- **req/s**: requests (or exchanges) completed per second over the run.
- **p50 / p99 / p99.9 ms**: request latency percentiles, client side, first byte sent to last
  byte received.
- **errors**: requests that failed or got a non-2xx answer.
- **MB/s**: body bytes per second (10^6 bytes), for transfer workloads.
- **relay / agent peak MiB**: the processes' highest resident memory during the row.
- **relay KiB/session**: relay memory per connected agent session (the `many` workload).
- **tunnel CPU µs/req**: CPU time of the relay and the agent together, divided by requests; for
  `floor` rows, of both ends of the bare carrier, or of the two proxies or splices. Bulk rows
  give the same CPU time for the whole transfer in their note.
- **note**: what else the row needs to be read right.
";

impl Report {
    /// The Markdown table.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# quictun benchmark: QUIC and gRPC transports against no tunnel\n\n\
             Machine: {}  \nDate: {}  \nCommand: `{}`\n\n",
            self.machine, self.date, self.command
        );
        md.push_str("| workload | transport | variant | req/s | p50 ms | p99 ms | p99.9 ms | errors | MB/s | relay peak MiB | agent peak MiB | relay KiB/session | tunnel CPU µs/req | note |\n");
        md.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for r in &self.rows {
            let l = r.latency.as_ref();
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.workload,
                r.transport,
                r.variant,
                opt(r.requests_per_sec, 0),
                opt(l.map(|l| l.p50_ms), 2),
                opt(l.map(|l| l.p99_ms), 2),
                opt(l.map(|l| l.p999_ms), 2),
                r.errors,
                opt(r.mb_per_sec, 1),
                opt(r.relay_peak_rss_mib, 1),
                opt(r.agent_peak_rss_mib, 1),
                opt(r.relay_kib_per_session, 1),
                opt(r.tunnel_cpu_us_per_request, 0),
                r.note
            ));
        }
        md.push_str(COLUMNS);
        md
    }

    /// Writes `results.json`, `results.md` and the charts into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        std::fs::create_dir_all(dir)?;
        let mut written = vec!["results.json".to_owned(), "results.md".to_owned()];
        std::fs::write(dir.join("results.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        for (name, svg) in self.charts() {
            std::fs::write(dir.join(&name), svg)?;
            written.push(name);
        }
        Ok(written)
    }

    fn rows<'a>(&'a self, workload: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
        self.rows.iter().filter(move |r| r.workload == workload)
    }

    fn charts(&self) -> Vec<(String, String)> {
        let mut charts = Vec::new();
        // Latency curves: one chart per (workload, variant) that has latencies.
        let mut keys: Vec<(String, String)> = Vec::new();
        for r in self.rows.iter().filter(|r| r.latency.is_some() && r.workload != "large") {
            let key = (r.workload.clone(), r.variant.clone());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (workload, variant) in keys {
            let series: Vec<(String, Vec<(f64, f64)>)> = self
                .rows(&workload)
                .filter(|r| r.variant == variant)
                .filter_map(|r| Some((r.transport.clone(), r.latency.as_ref()?.curve.clone())))
                .collect();
            let slug: String = variant.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
            let file = format!("latency-{workload}-{slug}.svg");
            charts
                .push((file, svg::percentile_chart(&format!("{workload} {variant}: latency by percentile"), &series)));
        }
        // Throughput bars.
        for (workload, unit, value) in [
            ("small", "requests/s", (|r: &Row| r.requests_per_sec) as fn(&Row) -> Option<f64>),
            ("large", "MB/s", |r: &Row| r.mb_per_sec),
        ] {
            let mut transports: Vec<String> = Vec::new();
            let mut variants: Vec<String> = Vec::new();
            for r in self.rows(workload) {
                if !transports.contains(&r.transport) {
                    transports.push(r.transport.clone());
                }
                if !variants.contains(&r.variant) {
                    variants.push(r.variant.clone());
                }
            }
            if variants.is_empty() {
                continue;
            }
            let groups: Vec<(String, Vec<f64>)> = variants
                .iter()
                .map(|v| {
                    let values = transports
                        .iter()
                        .map(|t| {
                            self.rows(workload)
                                .find(|r| &r.variant == v && &r.transport == t)
                                .and_then(value)
                                .unwrap_or(0.0)
                        })
                        .collect();
                    (v.clone(), values)
                })
                .collect();
            // No tunnel ("direct") is often ten times the tunnels: it goes in the title, so that
            // the axis is scaled to the tunnels being compared.
            let direct = transports.iter().position(|t| t == "direct");
            let mut title = format!("{workload}: throughput");
            let (mut shown, mut groups) = (transports.clone(), groups);
            if let Some(d) = direct.filter(|_| transports.len() > 1) {
                let without: Vec<String> =
                    groups.iter().map(|(v, values)| format!("{v} {}", short_value(values[d]))).collect();
                title.push_str(&format!(" (no tunnel: {})", without.join(", ")));
                shown.remove(d);
                for (_, values) in &mut groups {
                    values.remove(d);
                }
            }
            charts.push((format!("throughput-{workload}.svg"), svg::bar_chart(&title, unit, &shown, &groups)));
        }
        charts
    }
}
