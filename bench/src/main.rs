//! `registrator-bench`: measures swarm-registrator on the real Docker engine, etcd and Consul of
//! this machine, and prints a Markdown summary.
//!
//! Parts (all by default, `--parts` picks):
//!
//! * `plain`: event-to-store latency of plain containers (`--internal`, an exposed port), one
//!   container at a time: from the `start` event's `timeNano` to the arrival of the record on an
//!   etcd watch of the bridge's prefix. Also the bridge's RSS with those containers published.
//! * `swarm`: the same for swarm tasks: one service on an overlay network, scaled up one task at
//!   a time; from the task container's `start` event.
//! * `floor`: the same as `plain` for a minimal path inside the bench (see [`floor`]).
//! * `sync`: the bridge's RSS idle, then with `--sync-containers` plain containers running, the
//!   time from spawning the bridge until all their records are on the watch; repeated.
//!
//! The Consul parts (not in the default list; they need a Consul agent, `--consul`) run the
//! bridge as `consul://<agent>/<prefix> --internal --explicit --cleanup` on containers labelled
//! `SERVICE_NAME=rbench-<run>-<part>`, and see records through blocking queries (see
//! [`consul`]):
//!
//! * `consul-kv`: like `plain`, the bridge with `--no-consul-catalog`, seen in KV.
//! * `consul`: like `plain`, the bridge with KV and catalog (its default), each start timed
//!   twice: seen in KV, seen in the catalog.
//! * `consul-catalog`: like `plain`, the bridge with `--no-consul-kv`, seen in the catalog.
//! * `consul-floor`: Consul's own share: the bench writes records itself (the bridge's KV
//!   transaction; an agent service registration) and times its blocking queries.
//! * `consul-sync`: like `sync`, each run twice: KV only, then KV + catalog.
//!
//! Every part runs on one harness ([`harness`]): observe, spawn, wait until ready (a bridge's
//! `/metrics` shows a completed sync), drive the engine, pair starts with records, clean up.
//!
//! Progress goes to stderr, the summary to stdout.

mod consul;
mod floor;
mod harness;
mod lab;
mod observe;
mod report;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::time::Instant;

use crate::harness::{Harness, Seen, Starter, Subject};
use crate::lab::Lab;
use crate::observe::Via;
use crate::report::{LatencyRun, Report, SyncRun, SyncSummary};

/// Benchmarks swarm-registrator against the local Docker engine, etcd and Consul.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    agent: Option<Agent>,

    /// The bridge binary to run.
    #[arg(long, default_value = "target/release/swarm-registrator")]
    bridge: PathBuf,

    /// etcd endpoint (host:port).
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd: String,

    /// Consul agent (host:port), for the consul-* parts.
    #[arg(long, default_value = "127.0.0.1:8500")]
    consul: String,

    /// The image of every container the bench starts (must have `sleep`).
    #[arg(long, default_value = "local/busybox")]
    image: String,

    /// Measured container starts per latency part.
    #[arg(short = 'n', long, default_value_t = 200)]
    count: usize,

    /// Measured task starts of the swarm part (default: --count).
    #[arg(long)]
    swarm_count: Option<usize>,

    /// Unmeasured starts before each latency part.
    #[arg(long, default_value_t = 5)]
    warmup: usize,

    /// Containers running for the initial-sync part.
    #[arg(long, default_value_t = 300)]
    sync_containers: usize,

    /// How many times the initial sync is measured.
    #[arg(long, default_value_t = 5)]
    sync_runs: usize,

    /// Which parts to run (consul-floor, consul-kv, consul, consul-catalog and consul-sync
    /// need a Consul agent).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,floor,floor-connect,swarm,sync"
    )]
    parts: Vec<Part>,

    /// Seconds to wait for any one thing (a record, an event, a bridge to be ready).
    #[arg(long, default_value_t = 15)]
    timeout: u64,

    /// Where the bridge's and the floor agent's logs go.
    #[arg(long, default_value = "/tmp")]
    log_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Agent {
    /// The floor agent (started by the bench itself).
    #[command(hide = true)]
    Floor {
        #[arg(long)]
        etcd: String,
        #[arg(long)]
        prefix: String,
        /// Also act on `network connect` events, as the bridge does.
        #[arg(long)]
        early: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Plain,
    Swarm,
    Floor,
    /// The floor, also acting on `network connect` (the bridge's trigger).
    FloorConnect,
    Sync,
    /// The bench's own Consul writes, seen by its blocking queries.
    ConsulFloor,
    /// The bridge with --no-consul-catalog, seen in Consul KV.
    ConsulKv,
    /// The bridge with KV and catalog, seen in both.
    Consul,
    /// The bridge with --no-consul-kv, seen in the catalog.
    ConsulCatalog,
    /// Initial sync into Consul: KV only, then KV + catalog.
    ConsulSync,
}

impl Part {
    /// The name on the command line.
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    fn uses_consul(self) -> bool {
        self.name().starts_with("consul")
    }

    fn runs_bridge(self) -> bool {
        !matches!(self, Part::Floor | Part::FloorConnect | Part::ConsulFloor)
    }
}

/// What a Consul bridge publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsulMode {
    /// `--no-consul-catalog`
    Kv,
    /// `--no-consul-kv`
    Catalog,
    /// The default: both.
    Both,
}

impl ConsulMode {
    fn kv(self) -> bool {
        self != ConsulMode::Catalog
    }
    fn catalog(self) -> bool {
        self != ConsulMode::Kv
    }
}

/// Wall-clock nanoseconds since the epoch (dockerd's `timeNano` clock).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub fn log(msg: &str) {
    eprintln!("[bench] {msg}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Agent::Floor {
        etcd,
        prefix,
        early,
    }) = &cli.agent
    {
        return match floor::main(etcd, prefix, *early) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("floor agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match daemon::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(cli: Cli) -> Result<()> {
    if cli.parts.iter().any(|p| p.runs_bridge()) && !cli.bridge.is_file() {
        bail!(
            "no bridge binary at {}; build it with `cargo build --release -p swarm-registrator` or pass --bridge",
            cli.bridge.display()
        );
    }
    let consul = cli
        .parts
        .iter()
        .any(|p| p.uses_consul())
        .then_some(cli.consul.as_str());
    let lab = Lab::connect(&cli.etcd, consul, &cli.image).await?;
    log(&format!(
        "run {}: containers labelled {}, etcd/Consul keys under rbench/{}-*, Consul services rbench-{}-*",
        lab.run_id,
        lab.run_label(),
        lab.run_id,
        lab.run_id
    ));
    let mut report = Report::new(&lab, &cli.bridge).await;

    // SIGINT or SIGTERM: stop measuring, clean up the lab, print what was measured.
    let shutdown = daemon::shutdown_on_signals();
    let outcome = tokio::select! {
        r = run_parts(&cli, &lab, &mut report) => r,
        () = shutdown.cancelled() => Err(anyhow!("interrupted")),
    };
    log("cleaning up");
    lab.clean_up().await;
    if let Err(e) = &outcome {
        // Print what was measured before the failure anyway.
        log(&format!("stopped early: {e:#}"));
    }
    print!("{}", report.markdown(&cli_line(&cli)));
    outcome
}

fn cli_line(cli: &Cli) -> String {
    let parts: Vec<String> = cli.parts.iter().map(|p| p.name()).collect();
    let consul = if cli.parts.iter().any(|p| p.uses_consul()) {
        format!(" --consul {}", cli.consul)
    } else {
        String::new()
    };
    format!(
        "{} --bridge {}{consul} -n {} --swarm-count {} --warmup {} --sync-containers {} --sync-runs {} --parts {}",
        std::env::args()
            .next()
            .unwrap_or_else(|| "registrator-bench".into()),
        cli.bridge.display(),
        cli.count,
        cli.swarm_count.unwrap_or(cli.count),
        cli.warmup,
        cli.sync_containers,
        cli.sync_runs,
        parts.join(",")
    )
}

async fn run_parts(cli: &Cli, lab: &Lab, report: &mut Report) -> Result<()> {
    let h = Harness {
        lab,
        bridge: &cli.bridge,
        log_dir: &cli.log_dir,
        timeout: Duration::from_secs(cli.timeout),
        warmup: cli.warmup,
    };
    for (i, part) in cli.parts.iter().enumerate() {
        if i > 0 {
            // Let the engine settle after the previous part's clean-up.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let load_before = report::loadavg();
        log(&format!("part {}", part.name()));
        let mut latency = Vec::new();
        let mut sync = Vec::new();
        match part {
            Part::Plain | Part::Floor | Part::FloorConnect | Part::Swarm => {
                latency.push(latency_etcd(cli, &h, *part).await?)
            }
            Part::Sync => {
                let sinks: [(Sink, &[&str]); 1] = [(Sink::Etcd, &[report::SYNC_ETCD])];
                sync.extend(sync_part(cli, &h, "sync", &sinks).await?)
            }
            Part::ConsulFloor => {
                let c = lab.consul()?;
                let (prefix, service) = (lab.prefix("cfloor"), lab.service_name("cfloor"));
                let floor = consul::floor(
                    c,
                    &prefix,
                    &service,
                    cli.count,
                    cli.warmup,
                    cli.sync_containers,
                    h.timeout,
                )
                .await;
                c.delete_prefix(&prefix).await.ok();
                c.deregister_services(&service).await.ok();
                let mut floor = floor?;
                floor.load = (load_before, report::loadavg());
                report.consul_floor = Some(floor);
            }
            Part::ConsulKv => latency.extend(latency_consul(cli, &h, ConsulMode::Kv).await?),
            Part::Consul => latency.extend(latency_consul(cli, &h, ConsulMode::Both).await?),
            Part::ConsulCatalog => {
                latency.extend(latency_consul(cli, &h, ConsulMode::Catalog).await?)
            }
            Part::ConsulSync => {
                let kv_only: &[&str] = &[report::SYNC_CONSUL_KV_ONLY];
                let both: &[&str] = &[
                    report::SYNC_CONSUL_BOTH_KV,
                    report::SYNC_CONSUL_BOTH_CATALOG,
                ];
                let sinks = [
                    (Sink::Consul(ConsulMode::Kv), kv_only),
                    (Sink::Consul(ConsulMode::Both), both),
                ];
                sync.extend(sync_part(cli, &h, "csync", &sinks).await?)
            }
        }
        let load = (load_before, report::loadavg());
        for mut run in latency {
            run.load = load;
            report.latency.push(run);
        }
        for mut s in sync {
            s.load = load;
            report.sync.push(s);
        }
    }
    Ok(())
}

/// A bridge into etcd under `prefix`.
fn etcd_bridge(lab: &Lab, prefix: &str, internal: bool) -> Subject {
    let mut args = vec!["--resync".to_string(), "3600".into()];
    if internal {
        args.push("--internal".into());
    }
    Subject::Bridge {
        uri: format!("etcd://{}/{prefix}", lab.etcd_endpoint),
        args,
        graceful: false,
    }
}

/// A bridge into Consul under `prefix`. `--explicit` keeps it to the bench's containers (they
/// set SERVICE_NAME), so it never registers other people's containers in the shared agent;
/// `--cleanup` makes its graceful stop remove its KV keys and catalog services.
fn consul_bridge(lab: &Lab, prefix: &str, mode: ConsulMode) -> Result<Subject> {
    let mut args: Vec<String> = ["--resync", "3600", "--internal", "--explicit", "--cleanup"]
        .map(String::from)
        .to_vec();
    match mode {
        ConsulMode::Kv => args.push("--no-consul-catalog".into()),
        ConsulMode::Catalog => args.push("--no-consul-kv".into()),
        ConsulMode::Both => {}
    }
    Ok(Subject::Bridge {
        uri: format!("consul://{}/{prefix}", lab.consul()?.endpoint),
        args,
        graceful: true,
    })
}

fn consul_seen(mode: ConsulMode, service: &str) -> Seen<'_> {
    Seen::Consul {
        kv: mode.kv(),
        catalog: mode.catalog(),
        service,
    }
}

/// Removes this run's containers, so each part starts from the same engine.
async fn remove_own_containers(lab: &Lab) -> Result<()> {
    let ids = lab.own_containers().await?;
    lab.remove_containers(&ids).await;
    Ok(())
}

/// Latency into etcd: plain containers through the bridge (`--internal`) or the floor agent,
/// or swarm tasks of one service on an overlay network, scaled up one task at a time.
async fn latency_etcd(cli: &Cli, h: &Harness<'_>, part: Part) -> Result<LatencyRun> {
    let lab = h.lab;
    let (tag, name) = match part {
        Part::Floor => ("floor", "floor: start event → 1 inspect → 1 put"),
        Part::FloorConnect => (
            "floorc",
            "floor, early: connect or start event → 1 inspect → 1 put",
        ),
        Part::Swarm => (
            "swarm",
            "bridge, swarm tasks (overlay network, registrator.port label)",
        ),
        _ => (
            "plain",
            "bridge, plain containers (--internal, exposed port)",
        ),
    };
    let prefix = lab.prefix(tag);
    let service = format!("rbench-{}-svc", lab.run_id);
    let (subject, starter, n) = match part {
        Part::Plain => (
            etcd_bridge(lab, &prefix, true),
            Starter::Plain { service: None },
            cli.count,
        ),
        Part::Swarm => {
            let network = format!("rbench-{}-net", lab.run_id);
            lab.create_overlay(&network).await?;
            lab.create_service(&service, &network).await?;
            let n = cli.swarm_count.unwrap_or(cli.count);
            let starter = Starter::Task { service: &service };
            (etcd_bridge(lab, &prefix, false), starter, n)
        }
        _ => {
            let etcd = lab.etcd_endpoint.clone();
            let early = part == Part::FloorConnect;
            let starter = Starter::Plain { service: None };
            (Subject::Floor { etcd, early }, starter, cli.count)
        }
    };
    let outcome = h.latency(&subject, &prefix, Seen::Etcd, starter, n).await;
    if part == Part::Swarm {
        log("  removing the service and its tasks");
        lab.clean_up().await;
    } else {
        remove_own_containers(lab).await?;
        lab.delete_prefix(&prefix).await?;
    }
    let mut m = outcome?;
    Ok(LatencyRun {
        name: name.into(),
        samples: m.samples.remove(0),
        rss_kib: m.rss_kib,
        load: Default::default(),
    })
}

/// Latency of plain containers through a Consul bridge: one row per observer (KV, catalog).
async fn latency_consul(cli: &Cli, h: &Harness<'_>, mode: ConsulMode) -> Result<Vec<LatencyRun>> {
    let lab = h.lab;
    let tag = match mode {
        ConsulMode::Kv => "ckv",
        ConsulMode::Catalog => "ccat",
        ConsulMode::Both => "cboth",
    };
    let (prefix, service) = (lab.prefix(tag), lab.service_name(tag));
    let subject = consul_bridge(lab, &prefix, mode)?;
    let seen = consul_seen(mode, &service);
    let starter = Starter::Plain {
        service: Some(&service),
    };
    let outcome = h.latency(&subject, &prefix, seen, starter, cli.count).await;
    remove_own_containers(lab).await?;
    let consul = lab.consul()?;
    consul.delete_prefix(&prefix).await?;
    consul.deregister_services(&service).await?;
    let m = outcome?;
    let names = seen.vias().into_iter().map(|via| match (mode, via) {
        (ConsulMode::Kv, _) => report::CONSUL_KV_ONLY,
        (ConsulMode::Catalog, _) => report::CONSUL_CATALOG_ONLY,
        (ConsulMode::Both, Via::Catalog) => report::CONSUL_BOTH_CATALOG,
        (ConsulMode::Both, _) => report::CONSUL_BOTH_KV,
    });
    Ok(names
        .zip(m.samples)
        .map(|(name, samples)| LatencyRun {
            name: name.into(),
            samples,
            rss_kib: m.rss_kib,
            load: Default::default(),
        })
        .collect())
}

/// Starts `--sync-containers` plain containers for the sync parts.
async fn start_sync_containers(
    cli: &Cli,
    lab: &Lab,
    tag: &str,
    service: Option<&str>,
) -> Result<Vec<String>> {
    let m = cli.sync_containers;
    log(&format!("  starting {m} containers"));
    let started = Instant::now();
    let base = format!("rbench-{}-{tag}", lab.run_id);
    let ids = lab.run_many_plain(&base, m, service).await?;
    log(&format!(
        "  {m} containers running after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(ids)
}

fn summary(name: &str, containers: usize, idle: (u64, usize)) -> SyncSummary {
    SyncSummary {
        name: name.into(),
        containers,
        idle_rss_kib: idle.0,
        idle_containers: idle.1,
        runs: Vec::new(),
        load: Default::default(),
    }
}

/// Waits until the catalog has no instance of `service` (an agent deregistration reaches the
/// catalog through the agent's sync).
async fn wait_catalog_empty(lab: &Lab, service: &str, within: Duration) -> Result<()> {
    let consul = lab.consul()?;
    let deadline = Instant::now() + within;
    loop {
        consul.deregister_services(service).await?;
        let left = consul.catalog_count(service).await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{left} instances of {service} still in the catalog after {} s",
                within.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The bridge of a sync part: into etcd, or into Consul in a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Etcd,
    Consul(ConsulMode),
}

impl Sink {
    fn tag(self) -> &'static str {
        match self {
            Sink::Etcd => "",
            Sink::Consul(ConsulMode::Kv) => "kv",
            Sink::Consul(_) => "both",
        }
    }

    fn bridge(self, lab: &Lab, prefix: &str) -> Result<Subject> {
        match self {
            Sink::Etcd => Ok(etcd_bridge(lab, prefix, true)),
            Sink::Consul(mode) => consul_bridge(lab, prefix, mode),
        }
    }

    fn seen(self, service: &str) -> Seen<'_> {
        match self {
            Sink::Etcd => Seen::Etcd,
            Sink::Consul(mode) => consul_seen(mode, service),
        }
    }

    async fn delete_prefix(self, lab: &Lab, prefix: &str) -> Result<()> {
        match self {
            Sink::Etcd => lab.delete_prefix(prefix).await,
            Sink::Consul(_) => lab.consul()?.delete_prefix(prefix).await,
        }
    }
}

/// How many records of this run `via` shows: keys under `services`, or instances of `service`.
async fn count_seen(lab: &Lab, via: Via, services: String, service: String) -> Result<i64> {
    Ok(match via {
        Via::Etcd => lab.count_keys(&services).await?,
        Via::Kv => lab.consul()?.count_keys(&services).await? as i64,
        Via::Catalog => lab.consul()?.catalog_count(&service).await? as i64,
    })
}

/// Idle RSS (a bridge of the last sink, with none of this run's containers), then the initial
/// sync of `--sync-containers` plain containers, `--sync-runs` times: each run spawns one bridge
/// per sink and adds its times to that sink's summaries (named in `sinks`, one per observer).
async fn sync_part(
    cli: &Cli,
    h: &Harness<'_>,
    tag: &str,
    sinks: &[(Sink, &[&str])],
) -> Result<Vec<SyncSummary>> {
    let lab = h.lab;
    let consul = sinks.iter().any(|(sink, _)| *sink != Sink::Etcd);
    let service = lab.service_name(tag);
    let idle_sink = sinks.last().map_or(Sink::Etcd, |(sink, _)| *sink);
    let idle_containers = lab.running_containers().await?;
    let prefix = lab.prefix(&format!("{tag}idle"));
    let idle_rss = h.idle_rss(&idle_sink.bridge(lab, &prefix)?, &prefix).await;
    idle_sink.delete_prefix(lab, &prefix).await?;
    let (idle, m) = ((idle_rss?.0, idle_containers), cli.sync_containers);
    let mut summaries: Vec<Vec<SyncSummary>> = sinks
        .iter()
        .map(|(_, names)| names.iter().map(|name| summary(name, m, idle)).collect())
        .collect();

    let ids = start_sync_containers(cli, lab, tag, consul.then_some(service.as_str())).await?;
    let ours: HashSet<String> = ids.iter().cloned().collect();
    let outcome: Result<()> = async {
        for r in 0..cli.sync_runs {
            for ((sink, _), targets) in sinks.iter().zip(summaries.iter_mut()) {
                let prefix = lab.prefix(&format!("{tag}{r}{}", sink.tag()));
                let services = format!("{prefix}/services/");
                if consul {
                    wait_catalog_empty(lab, &service, h.timeout).await?;
                }
                let subject = sink.bridge(lab, &prefix)?;
                let (run, totals) = h
                    .initial_sync(&subject, &prefix, sink.seen(&service), &ours, |via| {
                        count_seen(lab, via, services.clone(), service.clone())
                    })
                    .await?;
                sink.delete_prefix(lab, &prefix).await?;
                let ms: Vec<String> = run
                    .elapsed_ns
                    .iter()
                    .map(|ns| format!("{:.1} ms", *ns as f64 / 1e6))
                    .collect();
                let run_name = format!("run {} {}", r + 1, sink.tag());
                log(&format!(
                    "  {}: {m} records after {} (one time per observer), RSS {} KiB (peak {} KiB)",
                    run_name.trim_end(),
                    ms.join(", "),
                    run.rss_kib,
                    run.hwm_kib
                ));
                for ((target, elapsed_ns), total_records) in
                    targets.iter_mut().zip(&run.elapsed_ns).zip(&totals)
                {
                    target.runs.push(SyncRun {
                        elapsed_ns: *elapsed_ns,
                        rss_kib: run.rss_kib,
                        hwm_kib: run.hwm_kib,
                        total_records: *total_records,
                    });
                }
            }
        }
        Ok(())
    }
    .await;
    lab.remove_containers(&ids).await;
    if consul {
        wait_catalog_empty(lab, &service, h.timeout).await.ok();
    }
    outcome?;
    Ok(summaries.into_iter().flatten().collect())
}
