//! The figures and their Markdown summary.

use std::fmt::Write;
use std::path::Path;

use crate::floor::FloorTiming;
use crate::lab::Lab;

/// The targets the figures are compared with.
const TARGET_P50_MS: f64 = 2.0;
const TARGET_P99_MS: f64 = 6.0;
const TARGET_SYNC_S: f64 = 0.25;
const TARGET_RSS_MB: f64 = 15.0;
const TARGET_CATALOG_P50_MS: f64 = 3.0;
const TARGET_CATALOG_SYNC_S: f64 = 0.7;

/// The latency rows compared with the targets: the run's name (its start), the metric's label,
/// (`{p}` stands for p50 or p99), the p50 target and Registrator's figure, the p99 target (if any) and Registrator's figure.
type LatencyTarget = (
    &'static str,
    &'static str,
    f64,
    &'static str,
    Option<f64>,
    &'static str,
);
const LATENCY_TARGETS: [LatencyTarget; 6] = [
    (
        "bridge, plain",
        "latency {p} (plain)",
        TARGET_P50_MS,
        "3.8 ms",
        Some(TARGET_P99_MS),
        "9 ms",
    ),
    (
        "bridge, swarm",
        "latency {p} (swarm)",
        TARGET_P50_MS,
        "-",
        Some(TARGET_P99_MS),
        "-",
    ),
    (
        CONSUL_KV_ONLY,
        "Consul KV latency {p}",
        TARGET_P50_MS,
        "3.8 ms",
        Some(TARGET_P99_MS),
        "9 ms",
    ),
    (
        CONSUL_BOTH_KV,
        "Consul KV (KV + catalog) latency {p}",
        TARGET_P50_MS,
        "3.8 ms",
        Some(TARGET_P99_MS),
        "9 ms",
    ),
    (
        CONSUL_BOTH_CATALOG,
        "Consul catalog (KV + catalog) latency {p}",
        TARGET_CATALOG_P50_MS,
        "5.4 ms",
        None,
        "9.4 ms",
    ),
    (
        CONSUL_CATALOG_ONLY,
        "Consul catalog (catalog only) latency {p}",
        TARGET_CATALOG_P50_MS,
        "5.4 ms",
        None,
        "9.4 ms",
    ),
];

/// The names of the Consul rows, which the verdicts look up.
pub const CONSUL_KV_ONLY: &str = "Consul KV: bridge --no-consul-catalog, plain containers";
pub const CONSUL_BOTH_KV: &str = "Consul KV: bridge with KV + catalog, plain containers";
pub const CONSUL_BOTH_CATALOG: &str = "Consul catalog: bridge with KV + catalog, plain containers";
pub const CONSUL_CATALOG_ONLY: &str = "Consul catalog: bridge --no-consul-kv, plain containers";
pub const SYNC_ETCD: &str = "etcd";
pub const SYNC_CONSUL_KV_ONLY: &str = "Consul KV, bridge --no-consul-catalog: last record in KV";
pub const SYNC_CONSUL_BOTH_KV: &str = "Consul KV + catalog: last record in KV";
pub const SYNC_CONSUL_BOTH_CATALOG: &str = "Consul KV + catalog: last instance in the catalog";

/// One measured start.
#[derive(Debug, Clone)]
pub struct Sample {
    pub container_id: String,
    /// The engine's `timeNano` of the `start` event.
    pub time_nano: i64,
    /// When the bench's own event stream delivered that event.
    pub recv_ns: i64,
    /// When the record arrived on the bench's etcd watch or Consul blocking query.
    pub arrival_ns: i64,
    /// The floor agent's own timings of this start.
    pub floor: Option<FloorTiming>,
}

impl Sample {
    pub fn latency_ns(&self) -> i64 {
        self.arrival_ns - self.time_nano
    }
}

/// One latency part.
#[derive(Debug, Clone)]
pub struct LatencyRun {
    pub name: String,
    pub samples: Vec<Sample>,
    /// The RSS (VmRSS, VmHWM) of the process at the end, with the part's containers published.
    pub rss_kib: Option<(u64, u64)>,
    /// The 1-minute load average before and after.
    pub load: (f64, f64),
}

/// One initial sync.
#[derive(Debug, Clone)]
pub struct SyncRun {
    /// From spawning the bridge to the arrival of the last record on the watch.
    pub elapsed_ns: i64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Records under the prefix afterwards (this run's and any other container's).
    pub total_records: i64,
}

#[derive(Debug, Clone)]
pub struct SyncSummary {
    /// Which store and which end: [`SYNC_ETCD`], [`SYNC_CONSUL_KV_ONLY`], ...
    pub name: String,
    pub containers: usize,
    pub idle_rss_kib: u64,
    /// Containers running on the engine (anybody's) while the idle RSS was read.
    pub idle_containers: usize,
    pub runs: Vec<SyncRun>,
    pub load: (f64, f64),
}

/// One write of the Consul store-only floor.
#[derive(Debug, Clone, Copy)]
pub struct FloorStep {
    /// Request sent → acknowledged.
    pub ack_ns: i64,
    /// Request sent → the blocking query's answer carrying the record arrived.
    pub seen_ns: i64,
}

/// Many agent registrations at once (the catalog share of an initial sync).
#[derive(Debug, Clone, Copy)]
pub struct BulkFloor {
    pub count: usize,
    /// First request sent → last acknowledged.
    pub ack_ns: i64,
    /// First request sent → all seen by the catalog blocking query.
    pub seen_ns: i64,
}

/// The Consul store-only floor (see [`crate::consul::floor`]).
#[derive(Debug, Clone, Default)]
pub struct ConsulFloor {
    pub kv: Vec<FloorStep>,
    pub catalog: Vec<FloorStep>,
    pub bulk: Option<BulkFloor>,
    pub load: (f64, f64),
}

/// Everything measured, and the machine.
#[derive(Debug)]
pub struct Report {
    machine: Vec<(String, String)>,
    pub latency: Vec<LatencyRun>,
    pub sync: Vec<SyncSummary>,
    pub consul_floor: Option<ConsulFloor>,
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn read_field(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

impl Report {
    pub async fn new(lab: &Lab, bridge: &Path) -> Report {
        let mut machine = Vec::new();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_else(|_| "?".into());
        let model = read_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "?".into());
        machine.push(("CPUs (nproc)".into(), format!("{cpus} × {model}")));
        let mem = read_field("/proc/meminfo", "MemTotal")
            .and_then(|m| {
                m.split_whitespace()
                    .next()
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "?".into());
        machine.push(("Memory".into(), mem));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        machine.push(("Kernel".into(), kernel));
        let docker = match lab.docker.version().await {
            Ok(v) => format!(
                "{} (API {})",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            ),
            Err(e) => format!("? ({e})"),
        };
        machine.push(("Docker Engine".into(), docker));
        let mut etcd = lab.etcd.clone();
        let etcd = match etcd.status().await {
            Ok(s) => s.version().to_string(),
            Err(e) => format!("? ({e})"),
        };
        machine.push(("etcd".into(), etcd));
        if let Some(consul) = &lab.consul {
            let v = match consul.version().await {
                Ok(v) => format!("{v} (dev agent at {})", consul.endpoint),
                Err(e) => format!("? ({e:#})"),
            };
            machine.push(("Consul".into(), v));
        }
        let bridge_meta = std::fs::metadata(bridge)
            .map(|m| format!("{} ({:.1} MB)", bridge.display(), m.len() as f64 / 1e6))
            .unwrap_or_else(|_| bridge.display().to_string());
        machine.push(("Bridge binary".into(), bridge_meta));
        Report {
            machine,
            latency: Vec::new(),
            sync: Vec::new(),
            consul_floor: None,
        }
    }

    pub fn markdown(&self, command: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## registrator-bench results\n");
        header(&mut out, "| Machine | |");
        for (k, v) in &self.machine {
            row(&mut out, &[k, v]);
        }
        let _ = writeln!(out, "\nCommand: `{command}`\n");
        if !self.latency.is_empty() {
            self.latency_tables(&mut out);
        }
        if let Some(floor) = &self.consul_floor {
            consul_floor_table(&mut out, floor);
        }
        for sync in &self.sync {
            sync_table(&mut out, sync);
        }
        self.targets_table(&mut out);
        out
    }

    fn latency_tables(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "### Event-to-store latency (start event `timeNano` → record seen on an etcd watch or a Consul blocking query)\n"
        );
        header(out, "| Path | n | p50 ms | p90 ms | p99 ms | max ms | mean ms | event delivery p50 ms | RSS after (peak) | load 1m before/after |");
        for run in &self.latency {
            let lat = Stats::of(run.samples.iter().map(Sample::latency_ns));
            let delivery = Stats::of(run.samples.iter().map(|s| s.recv_ns - s.time_nano));
            let rss = run
                .rss_kib
                .map(|(r, h)| format!("{} ({})", mib(r), mib(h)))
                .unwrap_or_else(|| "-".into());
            let load = format!("{:.2}/{:.2}", run.load.0, run.load.1);
            let (name, n) = (run.name.clone(), lat.n.to_string());
            let (p50, p90, p99, max, mean) = (lat.p50, lat.p90, lat.p99, lat.max, lat.mean);
            let [p50, p90, p99, max, mean, delivery] =
                [p50, p90, p99, max, mean, delivery.p50].map(ms);
            row(
                out,
                &[name, n, p50, p90, p99, max, mean, delivery, rss, load],
            );
        }
        for run in &self.latency {
            let floor: Vec<(&Sample, &FloorTiming)> = run
                .samples
                .iter()
                .filter_map(|s| s.floor.as_ref().map(|f| (s, f)))
                .collect();
            if floor.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "\n#### Where the time goes: {} ({} starts)\n",
                run.name,
                floor.len()
            );
            header(out, "| Step | p50 ms | p99 ms | max ms |");
            let rows: [(&str, Stats); 5] = [
                (
                    "trigger event received (relative to the start's timeNano)",
                    Stats::of(floor.iter().map(|(s, f)| f.recv_ns - s.time_nano)),
                ),
                (
                    "inspect (GET /containers/{id}/json)",
                    Stats::of(floor.iter().map(|(_, f)| f.inspect_ns)),
                ),
                (
                    "etcd put (with lease)",
                    Stats::of(floor.iter().map(|(_, f)| f.put_ns)),
                ),
                (
                    "watch delivery (put acknowledged → watch response at the bench)",
                    Stats::of(floor.iter().map(|(s, f)| s.arrival_ns - f.done_ns)),
                ),
                (
                    "total",
                    Stats::of(floor.iter().map(|(s, _)| s.latency_ns())),
                ),
            ];
            for (name, st) in rows {
                row(out, &[name.into(), ms(st.p50), ms(st.p99), ms(st.max)]);
            }
        }
    }

    fn targets_table(&self, out: &mut String) {
        let _ = writeln!(out, "\n### Against the targets\n");
        header(out, "| Metric | Target | Registrator v7.4.0 | Measured | |");
        for (name, label, p50_target, p50_ref, p99_target, p99_ref) in LATENCY_TARGETS {
            let Some(run) = self.latency.iter().find(|r| r.name.starts_with(name)) else {
                continue;
            };
            let lat = Stats::of(run.samples.iter().map(Sample::latency_ns));
            let p50 = label.replace("{p}", "p50");
            verdict(out, &p50, p50_target, p50_ref, lat.p50 / 1e6, "ms");
            let p99 = label.replace("{p}", "p99");
            match p99_target {
                Some(t) => verdict(out, &p99, t, p99_ref, lat.p99 / 1e6, "ms"),
                None => {
                    let measured = format!("{:.3} ms", lat.p99 / 1e6);
                    row(out, &[p99.as_str(), "-", p99_ref, &measured, ""]);
                }
            }
        }
        for sync in &self.sync {
            let (target, reference) = match sync.name.as_str() {
                SYNC_CONSUL_BOTH_CATALOG => (TARGET_CATALOG_SYNC_S, "1.45 s"),
                SYNC_ETCD => (TARGET_SYNC_S, "0.42–0.64 s (Consul KV)"),
                _ => (TARGET_SYNC_S, "0.42–0.64 s"),
            };
            let times = Stats::of(sync.runs.iter().map(|r| r.elapsed_ns));
            let label = format!(
                "{} containers synced (median), {}",
                sync.containers, sync.name
            );
            verdict(out, &label, target, reference, times.p50 / 1e9, "s");
            if let Some(worst) = sync.runs.iter().map(|r| r.rss_kib).max() {
                let label = format!("RSS with {} containers, {}", sync.containers, sync.name);
                let rss = worst as f64 / 1024.0;
                verdict(out, &label, TARGET_RSS_MB, "15 MB", rss, "MiB");
            }
        }
    }
}

fn consul_floor_table(out: &mut String, floor: &ConsulFloor) {
    let _ = writeln!(
        out,
        "\n### Consul store-only floor (the bench writes, its blocking query sees)\n"
    );
    header(out, "| Write | n | ack p50 ms | ack p99 ms | seen p50 ms | seen p90 ms | seen p99 ms | seen max ms | seen − ack p50 ms |");
    let rows = [
        (
            "KV: `/v1/txn` delete + lock (session) → KV blocking query",
            &floor.kv,
        ),
        (
            "catalog: `/v1/agent/service/register` (TTL check) → catalog blocking query",
            &floor.catalog,
        ),
    ];
    for (name, steps) in rows {
        let ack = Stats::of(steps.iter().map(|s| s.ack_ns));
        let seen = Stats::of(steps.iter().map(|s| s.seen_ns));
        let gap = Stats::of(steps.iter().map(|s| s.seen_ns - s.ack_ns));
        let times = [
            ack.p50, ack.p99, seen.p50, seen.p90, seen.p99, seen.max, gap.p50,
        ]
        .map(ms);
        let mut cells = vec![name.to_string(), seen.n.to_string()];
        cells.extend(times);
        row(out, &cells);
    }
    if let Some(b) = floor.bulk {
        let _ = writeln!(
            out,
            "\n{} registrations at once (16 at a time, as the bridge): all acknowledged after {} ms, all in the catalog after {} ms.",
            b.count,
            ms(b.ack_ns as f64),
            ms(b.seen_ns as f64)
        );
    }
    let _ = writeln!(
        out,
        "\nload 1m {:.2} before, {:.2} after.",
        floor.load.0, floor.load.1
    );
}

fn sync_table(out: &mut String, sync: &SyncSummary) {
    let _ = writeln!(
        out,
        "\n### Initial sync of {} running containers, {} (bridge spawned → last record seen)\n",
        sync.containers, sync.name
    );
    header(
        out,
        "| Run | time ms | records under the prefix | RSS after | peak RSS |",
    );
    for (i, r) in sync.runs.iter().enumerate() {
        let time = format!("{:.1}", r.elapsed_ns as f64 / 1e6);
        let (run, records) = ((i + 1).to_string(), r.total_records.to_string());
        row(out, &[run, time, records, mib(r.rss_kib), mib(r.hwm_kib)]);
    }
    let times = Stats::of(sync.runs.iter().map(|r| r.elapsed_ns));
    let _ = writeln!(
        out,
        "\nmin {} ms, median {} ms, max {} ms; load 1m {:.2} before, {:.2} after.",
        ms(times.min),
        ms(times.p50),
        ms(times.max),
        sync.load.0,
        sync.load.1
    );
    let _ = writeln!(
        out,
        "\nBridge RSS idle: {} (with {} containers of anybody running on the engine).",
        mib(sync.idle_rss_kib),
        sync.idle_containers
    );
}

/// A row of a Markdown table (an empty cell is written `| |`).
fn row<S: AsRef<str>>(out: &mut String, cells: &[S]) {
    let cells: Vec<String> = cells
        .iter()
        .map(|c| match c.as_ref() {
            "" => " ".to_string(),
            c => format!(" {c} "),
        })
        .collect();
    let _ = writeln!(out, "|{}|", cells.join("|"));
}

/// The header row of a Markdown table (`| a | b |`) and its rule.
fn header(out: &mut String, line: &str) {
    let columns = line.matches('|').count().saturating_sub(1);
    let _ = writeln!(out, "{line}\n|{}", "---|".repeat(columns));
}

fn verdict(out: &mut String, metric: &str, target: f64, reference: &str, value: f64, unit: &str) {
    let ok = if value < target { "met" } else { "**missed**" };
    let (target, value) = (format!("< {target} {unit}"), format!("{value:.3} {unit}"));
    row(out, &[metric, &target, reference, &value, ok]);
}

fn ms(ns: f64) -> String {
    if ns.is_nan() {
        "-".into()
    } else {
        format!("{:.3}", ns / 1e6)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Order statistics (nearest rank) of a set of nanosecond values.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Stats {
    pub fn of(values: impl Iterator<Item = i64>) -> Stats {
        let mut v: Vec<i64> = values.collect();
        v.sort_unstable();
        let n = v.len();
        let rank = |q: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            // Nearest rank: the smallest value with at least q of the values at or below it.
            let r = ((q * n as f64).ceil() as usize).clamp(1, n);
            v[r - 1] as f64
        };
        let mean = if n == 0 {
            f64::NAN
        } else {
            v.iter().map(|x| *x as f64).sum::<f64>() / n as f64
        };
        Stats {
            n,
            min: rank(0.0),
            p50: rank(0.5),
            p90: rank(0.9),
            p99: rank(0.99),
            max: rank(1.0),
            mean,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_a_rule_under_the_header_and_keep_empty_cells() {
        let mut out = String::new();
        header(&mut out, "| Metric | Target | |");
        row(&mut out, &["p50", "< 2 ms", ""]);
        assert_eq!(
            out,
            "| Metric | Target | |\n|---|---|---|\n| p50 | < 2 ms | |\n"
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of(1..=200);
        assert_eq!((s.min, s.p50, s.p99, s.max), (1.0, 100.0, 198.0, 200.0));
        let s = Stats::of([5].into_iter());
        assert_eq!((s.p50, s.p99), (5.0, 5.0));
        assert!(Stats::of(std::iter::empty()).p50.is_nan());
    }
}
