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
//! Progress goes to stderr, the summary to stdout.

mod consul;
mod floor;
mod lab;
mod observe;
mod report;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::floor::FloorTiming;
use crate::lab::Lab;
use crate::observe::{follow_starts, short, watch_records, RecordSeen, Tracker, Via};
use crate::report::{LatencyRun, Report, Sample, SyncRun, SyncSummary};

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
    fn name(self) -> &'static str {
        match self {
            Part::Plain => "plain",
            Part::Swarm => "swarm",
            Part::Floor => "floor",
            Part::FloorConnect => "floor-connect",
            Part::Sync => "sync",
            Part::ConsulFloor => "consul-floor",
            Part::ConsulKv => "consul-kv",
            Part::Consul => "consul",
            Part::ConsulCatalog => "consul-catalog",
            Part::ConsulSync => "consul-sync",
        }
    }

    fn uses_consul(self) -> bool {
        matches!(
            self,
            Part::ConsulFloor
                | Part::ConsulKv
                | Part::Consul
                | Part::ConsulCatalog
                | Part::ConsulSync
        )
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
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

    let outcome = tokio::select! {
        r = run_parts(&cli, &lab, &mut report) => r,
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => Err(anyhow!("interrupted")),
            Err(e) => Err(anyhow!("cannot listen for Ctrl-C: {e}")),
        },
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
    let parts: Vec<&str> = cli.parts.iter().map(|p| p.name()).collect();
    let consul = if cli.parts.iter().any(|p| p.uses_consul()) {
        format!(" --consul {}", cli.consul)
    } else {
        String::new()
    };
    format!(
        "target/release/registrator-bench --bridge {}{consul} -n {} --swarm-count {} --warmup {} --sync-containers {} --sync-runs {} --parts {}",
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
    let timeout = Duration::from_secs(cli.timeout);
    for (i, part) in cli.parts.iter().enumerate() {
        if i > 0 {
            // Let the engine settle after the previous part's clean-up.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let load_before = report::loadavg();
        match part {
            Part::Plain => {
                log(&format!(
                    "plain containers through the bridge: {} starts",
                    cli.count
                ));
                let mut run = latency_plain(cli, lab, Target::Bridge, timeout).await?;
                run.load = (load_before, report::loadavg());
                report.latency.push(run);
            }
            Part::Floor => {
                log(&format!(
                    "plain containers through the floor: {} starts",
                    cli.count
                ));
                let mut run = latency_plain(cli, lab, Target::Floor, timeout).await?;
                run.load = (load_before, report::loadavg());
                report.latency.push(run);
            }
            Part::FloorConnect => {
                log(&format!(
                    "plain containers through the floor, acting on connect too: {} starts",
                    cli.count
                ));
                let mut run = latency_plain(cli, lab, Target::FloorConnect, timeout).await?;
                run.load = (load_before, report::loadavg());
                report.latency.push(run);
            }
            Part::Swarm => {
                let n = cli.swarm_count.unwrap_or(cli.count);
                log(&format!("swarm tasks through the bridge: {n} starts"));
                let mut run = latency_swarm(cli, lab, n, timeout).await?;
                run.load = (load_before, report::loadavg());
                report.latency.push(run);
            }
            Part::Sync => {
                log(&format!(
                    "initial sync of {} containers, {} runs",
                    cli.sync_containers, cli.sync_runs
                ));
                let mut sync = initial_sync(cli, lab, timeout).await?;
                sync.load = (load_before, report::loadavg());
                report.sync.push(sync);
            }
            Part::ConsulFloor => {
                log(&format!(
                    "Consul store-only floor: {} KV writes, {} catalog registrations",
                    cli.count, cli.count
                ));
                let mut floor = consul::floor(
                    lab.consul()?,
                    &lab.prefix("cfloor"),
                    &lab.service_name("cfloor"),
                    cli.count,
                    cli.warmup,
                    cli.sync_containers,
                    timeout,
                )
                .await;
                if let Some(c) = &lab.consul {
                    c.delete_prefix(&lab.prefix("cfloor")).await.ok();
                    c.deregister_services(&lab.service_name("cfloor"))
                        .await
                        .ok();
                }
                if let Ok(f) = &mut floor {
                    f.load = (load_before, report::loadavg());
                }
                report.consul_floor = Some(floor?);
            }
            Part::ConsulKv | Part::Consul | Part::ConsulCatalog => {
                let mode = match part {
                    Part::ConsulKv => ConsulMode::Kv,
                    Part::ConsulCatalog => ConsulMode::Catalog,
                    _ => ConsulMode::Both,
                };
                log(&format!(
                    "plain containers through the bridge into Consul ({mode:?}): {} starts",
                    cli.count
                ));
                let runs = latency_consul(cli, lab, mode, timeout).await?;
                let load = (load_before, report::loadavg());
                for mut run in runs {
                    run.load = load;
                    report.latency.push(run);
                }
            }
            Part::ConsulSync => {
                log(&format!(
                    "initial sync into Consul of {} containers, {} runs of each mode",
                    cli.sync_containers, cli.sync_runs
                ));
                let syncs = consul_sync(cli, lab, timeout).await?;
                let load = (load_before, report::loadavg());
                for mut sync in syncs {
                    sync.load = load;
                    report.sync.push(sync);
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Bridge,
    Floor,
    FloorConnect,
}

/// A child process of the bench: a bridge or the floor agent.
#[derive(Debug)]
struct Proc {
    child: Child,
    pid: u32,
    log: PathBuf,
    /// When it was spawned (wall clock, ns).
    spawned_ns: i64,
}

impl Proc {
    fn bridge(cli: &Cli, lab: &Lab, prefix: &str, internal: bool) -> Result<Proc> {
        let uri = format!("etcd://{}/{prefix}", lab.etcd_endpoint);
        let mut cmd = Command::new(&cli.bridge);
        cmd.arg(&uri).args(["--resync", "3600"]);
        if internal {
            cmd.arg("--internal");
        }
        Proc::spawn(cmd, &cli.log_dir, &format!("{prefix}.bridge"), false)
    }

    /// A bridge publishing into Consul under `prefix`. `--explicit` keeps it to the bench's
    /// containers (they set SERVICE_NAME), so it never registers other people's containers in
    /// the shared agent; `--cleanup` makes a graceful stop remove its KV keys and catalog
    /// services.
    fn bridge_consul(cli: &Cli, lab: &Lab, prefix: &str, mode: ConsulMode) -> Result<Proc> {
        let consul = lab.consul()?;
        let uri = format!("consul://{}/{prefix}", consul.endpoint);
        let mut cmd = Command::new(&cli.bridge);
        cmd.arg(&uri)
            .args(["--resync", "3600", "--internal", "--explicit", "--cleanup"]);
        match mode {
            ConsulMode::Kv => {
                cmd.arg("--no-consul-catalog");
            }
            ConsulMode::Catalog => {
                cmd.arg("--no-consul-kv");
            }
            ConsulMode::Both => {}
        }
        Proc::spawn(cmd, &cli.log_dir, &format!("{prefix}.bridge"), false)
    }

    fn floor(cli: &Cli, lab: &Lab, prefix: &str, early: bool) -> Result<Proc> {
        let exe = std::env::current_exe().context("cannot find the bench's own binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["floor", "--etcd", &lab.etcd_endpoint, "--prefix", prefix]);
        if early {
            cmd.arg("--early");
        }
        Proc::spawn(cmd, &cli.log_dir, &format!("{prefix}.floor"), true)
    }

    fn spawn(mut cmd: Command, log_dir: &Path, name: &str, piped: bool) -> Result<Proc> {
        let log = log_dir.join(format!("{}.log", name.replace('/', "_")));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stderr(file)
            .stdout(if piped { Stdio::piped() } else { Stdio::null() })
            .kill_on_drop(true);
        crate::log(&format!("  {name}: log in {}", log.display()));
        let spawned_ns = now_ns();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {name}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        Ok(Proc {
            child,
            pid,
            log,
            spawned_ns,
        })
    }

    /// Fails if the process has exited, quoting the end of its log.
    fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "process {} exited ({status}); end of {}:\n{}",
                self.pid,
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// Waits until a bridge has done its first sync (its node record is written).
    async fn wait_bridge_ready(&mut self, lab: &Lab, prefix: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let nodes = format!("{prefix}/nodes/");
        loop {
            self.check_alive()?;
            if lab.count_keys(&nodes).await? > 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the bridge wrote no node record within {} s",
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a bridge logs its first sync (whatever its store; without Consul KV there is
    /// no node record to look for).
    async fn wait_log_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive()?;
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("synced engine and store") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the bridge logged no first sync within {} s (see {})",
                    within.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, so a `--cleanup` bridge removes what it published; SIGKILL after 15 s.
    async fn stop_gracefully(mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if matches!(term, Ok(s) if s.success()) {
            match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
                Ok(_) => return,
                Err(_) => log(&format!(
                    "warning: bridge {} still running 15 s after SIGTERM; killing it",
                    self.pid
                )),
            }
        }
        self.stop().await;
    }

    /// VmRSS and VmHWM in KiB.
    fn rss_kib(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("cannot read /proc/{}/status", self.pid))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{}/status", self.pid))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    async fn stop(mut self) {
        self.child.start_kill().ok();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            log(&format!(
                "warning: process {} did not exit after SIGKILL",
                self.pid
            ));
        }
    }
}

/// Latency of plain containers, through the bridge (`--internal`) or the floor agent.
async fn latency_plain(
    cli: &Cli,
    lab: &Lab,
    target: Target,
    timeout: Duration,
) -> Result<LatencyRun> {
    let part = match target {
        Target::Bridge => "plain",
        Target::Floor => "floor",
        Target::FloorConnect => "floorc",
    };
    let prefix = lab.prefix(part);
    let (records_rx, _watch) = watch_records(lab, &format!("{prefix}/services/")).await?;
    let (starts_rx, _events) = follow_starts(lab);
    let mut tracker = Tracker::new(starts_rx, records_rx);

    let mut proc = match target {
        Target::Bridge => {
            let mut p = Proc::bridge(cli, lab, &prefix, true)?;
            p.wait_bridge_ready(lab, &prefix, timeout).await?;
            p
        }
        Target::Floor => Proc::floor(cli, lab, &prefix, false)?,
        Target::FloorConnect => Proc::floor(cli, lab, &prefix, true)?,
    };
    // The floor agent reports the time of each step on stdout.
    let floor_lines = match proc.child.stdout.take() {
        Some(out) => {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let reader = tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                let mut timings = Vec::new();
                let mut ready = Some(ready_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("\"ready\"") {
                        if let Some(tx) = ready.take() {
                            tx.send(()).ok();
                        }
                    } else if let Some(t) = FloorTiming::parse(&line) {
                        timings.push(t);
                    }
                }
                timings
            });
            if tokio::time::timeout(timeout, ready_rx).await.is_err() {
                proc.check_alive()?;
                bail!(
                    "the floor agent was not ready within {} s",
                    timeout.as_secs()
                );
            }
            Some(reader)
        }
        None => None,
    };

    let mut samples = Vec::with_capacity(cli.count);
    for i in 0..cli.warmup + cli.count {
        let name = format!("rbench-{}-{part}-{i}", lab.run_id);
        let id = lab.create_plain(&name, None).await?;
        lab.start(&id).await?;
        let start = tracker.start_of(&id, timeout).await?;
        let record = match tracker.record_of(&id, Via::Etcd, timeout).await {
            Ok(r) => r,
            Err(e) => {
                proc.check_alive()?;
                return Err(e);
            }
        };
        if i >= cli.warmup {
            samples.push(Sample {
                container_id: id.clone(),
                time_nano: start.time_nano,
                recv_ns: start.recv_ns,
                arrival_ns: record.arrival_ns,
                floor: None,
            });
        }
        if (i + 1) % 50 == 0 {
            log(&format!("  {part}: {} starts", i + 1));
        }
    }
    let rss = proc.rss_kib().ok();
    if floor_lines.is_some() {
        // The agent prints a start's timings after its put returns, which can be after the
        // record reached the bench's watch: give the last line time to come.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    proc.stop().await;
    if let Some(reader) = floor_lines {
        if let Ok(Ok(timings)) = tokio::time::timeout(Duration::from_secs(5), reader).await {
            for t in timings {
                if let Some(s) = samples
                    .iter_mut()
                    .find(|s| s.container_id == t.container_id)
                {
                    s.floor = Some(t);
                }
            }
        }
    }
    // Remove this part's containers before the next part, so each starts from the same engine.
    let ids = lab.own_containers().await?;
    lab.remove_containers(&ids).await;
    lab.delete_prefix(&prefix).await?;
    Ok(LatencyRun {
        name: match target {
            Target::Bridge => "bridge, plain containers (--internal, exposed port)".into(),
            Target::Floor => "floor: start event → 1 inspect → 1 put".into(),
            Target::FloorConnect => {
                "floor, early: connect or start event → 1 inspect → 1 put".into()
            }
        },
        samples,
        rss_kib: rss,
        load: Default::default(),
    })
}

/// Latency of swarm tasks: one service, scaled up one task at a time.
async fn latency_swarm(cli: &Cli, lab: &Lab, n: usize, timeout: Duration) -> Result<LatencyRun> {
    let prefix = lab.prefix("swarm");
    let network = format!("rbench-{}-net", lab.run_id);
    let service = format!("rbench-{}-svc", lab.run_id);
    lab.create_overlay(&network).await?;
    lab.create_service(&service, &network).await?;

    let (records_rx, _watch) = watch_records(lab, &format!("{prefix}/services/")).await?;
    let (starts_rx, _events) = follow_starts(lab);
    let mut tracker = Tracker::new(starts_rx, records_rx);
    let mut proc = Proc::bridge(cli, lab, &prefix, false)?;
    proc.wait_bridge_ready(lab, &prefix, timeout).await?;

    // A task is scheduled, its network attached and its container created before it starts:
    // give that more time than one record.
    let task_timeout = timeout * 4;
    let mut samples = Vec::with_capacity(n);
    for i in 0..cli.warmup + n {
        lab.scale_service(&service, (i + 1) as i64).await?;
        let start = tracker.next_start(task_timeout).await?;
        let record = match tracker
            .record_of(&start.container_id, Via::Etcd, timeout)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                proc.check_alive()?;
                return Err(e.context(format!(
                    "task container {} started but no record appeared",
                    short(&start.container_id)
                )));
            }
        };
        if i >= cli.warmup {
            samples.push(Sample {
                container_id: start.container_id.clone(),
                time_nano: start.time_nano,
                recv_ns: start.recv_ns,
                arrival_ns: record.arrival_ns,
                floor: None,
            });
        }
        if (i + 1) % 50 == 0 {
            log(&format!("  swarm: {} tasks", i + 1));
        }
    }
    let rss = proc.rss_kib().ok();
    proc.stop().await;
    log("  removing the service and its tasks");
    lab.clean_up().await;
    Ok(LatencyRun {
        name: "bridge, swarm tasks (overlay network, registrator.port label)".into(),
        samples,
        rss_kib: rss,
        load: Default::default(),
    })
}

/// Idle RSS, then the initial sync of `--sync-containers` running containers, repeated.
async fn initial_sync(cli: &Cli, lab: &Lab, timeout: Duration) -> Result<SyncSummary> {
    // Idle: a bridge on an engine without this run's containers.
    let idle_containers = lab.running_containers().await?;
    let prefix = lab.prefix("idle");
    let mut proc = Proc::bridge(cli, lab, &prefix, true)?;
    proc.wait_bridge_ready(lab, &prefix, timeout).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = proc.rss_kib()?;
    proc.stop().await;
    lab.delete_prefix(&prefix).await?;

    let m = cli.sync_containers;
    log(&format!("  starting {m} containers"));
    let started = Instant::now();
    let ids = lab
        .run_many_plain(&format!("rbench-{}-sync", lab.run_id), m, None)
        .await?;
    log(&format!(
        "  {m} containers running after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let ours: std::collections::HashSet<String> = ids.iter().cloned().collect();

    let mut runs = Vec::new();
    for r in 0..cli.sync_runs {
        let prefix = lab.prefix(&format!("sync{r}"));
        let services = format!("{prefix}/services/");
        let (mut records_rx, watch) = watch_records(lab, &services).await?;
        let mut proc = Proc::bridge(cli, lab, &prefix, true)?;
        let deadline = Instant::now() + timeout * 2;
        let mut seen = std::collections::HashSet::new();
        let mut done_ns = None;
        while done_ns.is_none() {
            tokio::select! {
                rec = records_rx.recv() => match rec {
                    Some(rec) => {
                        if ours.contains(&rec.container_id) {
                            seen.insert(rec.container_id);
                            if seen.len() == m {
                                done_ns = Some(rec.arrival_ns);
                            }
                        }
                    }
                    None => bail!("the etcd watch ended during the sync"),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    proc.check_alive()?;
                    bail!("only {} of {m} records after {} s", seen.len(), (timeout * 2).as_secs());
                }
            }
        }
        let elapsed_ns = done_ns.unwrap_or_default() - proc.spawned_ns;
        let total_records = lab.count_keys(&services).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, hwm) = proc.rss_kib()?;
        proc.stop().await;
        watch.abort();
        lab.delete_prefix(&prefix).await?;
        log(&format!(
            "  run {}: {m} records in {:.1} ms, RSS {} KiB (peak {} KiB)",
            r + 1,
            elapsed_ns as f64 / 1e6,
            rss,
            hwm
        ));
        runs.push(SyncRun {
            elapsed_ns,
            rss_kib: rss,
            hwm_kib: hwm,
            total_records,
        });
    }
    lab.remove_containers(&ids).await;
    Ok(SyncSummary {
        name: report::SYNC_ETCD.into(),
        containers: m,
        idle_rss_kib: idle_rss.0,
        idle_containers,
        runs,
        load: Default::default(),
    })
}

/// The Consul observers a bridge of `mode` needs, all sending to one channel.
async fn consul_watches(
    lab: &Lab,
    prefix: &str,
    service: &str,
    mode: ConsulMode,
) -> Result<(
    tokio::sync::mpsc::UnboundedReceiver<RecordSeen>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let consul = lab.consul()?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watches = Vec::new();
    if mode.kv() {
        watches.push(consul::watch_kv(consul, &format!("{prefix}/services/"), tx.clone()).await?);
    }
    if mode.catalog() {
        watches.push(consul::watch_catalog(consul, service, tx).await?);
    }
    Ok((rx, watches))
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

/// Latency of plain containers through a Consul bridge: one row per observer (KV, catalog).
async fn latency_consul(
    cli: &Cli,
    lab: &Lab,
    mode: ConsulMode,
    timeout: Duration,
) -> Result<Vec<LatencyRun>> {
    let part = match mode {
        ConsulMode::Kv => "ckv",
        ConsulMode::Catalog => "ccat",
        ConsulMode::Both => "cboth",
    };
    let prefix = lab.prefix(part);
    let service = lab.service_name(part);
    let (records_rx, watches) = consul_watches(lab, &prefix, &service, mode).await?;
    let (starts_rx, _events) = follow_starts(lab);
    let mut tracker = Tracker::new(starts_rx, records_rx);
    let mut proc = Proc::bridge_consul(cli, lab, &prefix, mode)?;
    let outcome: Result<(Vec<Sample>, Vec<Sample>)> = async {
        proc.wait_log_ready(timeout).await?;
        let mut kv = Vec::with_capacity(cli.count);
        let mut catalog = Vec::with_capacity(cli.count);
        for i in 0..cli.warmup + cli.count {
            let name = format!("rbench-{}-{part}-{i}", lab.run_id);
            let id = lab.create_plain(&name, Some(&service)).await?;
            lab.start(&id).await?;
            let start = tracker.start_of(&id, timeout).await?;
            let mut seen = Vec::new();
            if mode.kv() {
                seen.push(tracker.record_of(&id, Via::Kv, timeout).await);
            }
            if mode.catalog() {
                seen.push(tracker.record_of(&id, Via::Catalog, timeout).await);
            }
            for record in seen {
                let record = match record {
                    Ok(r) => r,
                    Err(e) => {
                        proc.check_alive()?;
                        return Err(e);
                    }
                };
                if i < cli.warmup {
                    continue;
                }
                let sample = Sample {
                    container_id: id.clone(),
                    time_nano: start.time_nano,
                    recv_ns: start.recv_ns,
                    arrival_ns: record.arrival_ns,
                    floor: None,
                };
                match record.via {
                    Via::Catalog => catalog.push(sample),
                    _ => kv.push(sample),
                }
            }
            if (i + 1) % 50 == 0 {
                log(&format!("  {part}: {} starts", i + 1));
            }
        }
        Ok((kv, catalog))
    }
    .await;
    let rss = proc.rss_kib().ok();
    proc.stop_gracefully().await;
    for w in watches {
        w.abort();
    }
    let ids = lab.own_containers().await?;
    lab.remove_containers(&ids).await;
    let consul = lab.consul()?;
    consul.delete_prefix(&prefix).await?;
    consul.deregister_services(&service).await?;
    let (kv, catalog) = outcome?;
    let mut runs = Vec::new();
    let (kv_name, catalog_name) = match mode {
        ConsulMode::Kv => (report::CONSUL_KV_ONLY, ""),
        ConsulMode::Catalog => ("", report::CONSUL_CATALOG_ONLY),
        ConsulMode::Both => (report::CONSUL_BOTH_KV, report::CONSUL_BOTH_CATALOG),
    };
    for (name, samples) in [(kv_name, kv), (catalog_name, catalog)] {
        if samples.is_empty() {
            continue;
        }
        runs.push(LatencyRun {
            name: name.into(),
            samples,
            rss_kib: rss,
            load: Default::default(),
        });
    }
    Ok(runs)
}

/// Initial sync into Consul: each run once KV only, once KV + catalog (the bridge's default).
async fn consul_sync(cli: &Cli, lab: &Lab, timeout: Duration) -> Result<Vec<SyncSummary>> {
    let consul = lab.consul()?;
    let service = lab.service_name("csync");

    // Idle: a bridge (KV + catalog) with none of this run's containers.
    let idle_containers = lab.running_containers().await?;
    let prefix = lab.prefix("cidle");
    let mut proc = Proc::bridge_consul(cli, lab, &prefix, ConsulMode::Both)?;
    proc.wait_log_ready(timeout).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = proc.rss_kib()?;
    proc.stop_gracefully().await;
    consul.delete_prefix(&prefix).await?;

    let m = cli.sync_containers;
    log(&format!("  starting {m} containers"));
    let started = Instant::now();
    let ids = lab
        .run_many_plain(&format!("rbench-{}-csync", lab.run_id), m, Some(&service))
        .await?;
    log(&format!(
        "  {m} containers running after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let ours: std::collections::HashSet<String> = ids.iter().cloned().collect();

    let summary = |name: &str| SyncSummary {
        name: name.into(),
        containers: m,
        idle_rss_kib: idle_rss.0,
        idle_containers,
        runs: Vec::new(),
        load: Default::default(),
    };
    let mut kv_only = summary(report::SYNC_CONSUL_KV_ONLY);
    let mut both_kv = summary(report::SYNC_CONSUL_BOTH_KV);
    let mut both_catalog = summary(report::SYNC_CONSUL_BOTH_CATALOG);

    let outcome: Result<()> = async {
        for r in 0..cli.sync_runs {
            for mode in [ConsulMode::Kv, ConsulMode::Both] {
                let tag = if mode == ConsulMode::Kv { "kv" } else { "both" };
                let prefix = lab.prefix(&format!("csync{r}{tag}"));
                wait_catalog_empty(lab, &service, timeout).await?;
                let (mut rx, watches) = consul_watches(lab, &prefix, &service, mode).await?;
                let mut proc = Proc::bridge_consul(cli, lab, &prefix, mode)?;
                let deadline = Instant::now() + timeout * 2;
                let mut seen_kv = std::collections::HashSet::new();
                let mut seen_catalog = std::collections::HashSet::new();
                let (mut kv_done, mut catalog_done) = (None, None);
                while (mode.kv() && kv_done.is_none()) || (mode.catalog() && catalog_done.is_none())
                {
                    tokio::select! {
                        rec = rx.recv() => match rec {
                            Some(rec) if ours.contains(&rec.container_id) => {
                                let (set, done) = match rec.via {
                                    Via::Catalog => (&mut seen_catalog, &mut catalog_done),
                                    _ => (&mut seen_kv, &mut kv_done),
                                };
                                set.insert(rec.container_id);
                                if set.len() == m && done.is_none() {
                                    *done = Some(rec.arrival_ns);
                                }
                            }
                            Some(_) => {}
                            None => bail!("the Consul blocking queries ended during the sync"),
                        },
                        _ = tokio::time::sleep_until(deadline) => {
                            proc.check_alive()?;
                            bail!(
                                "{tag} sync: {} of {m} records in KV, {} in the catalog after {} s",
                                seen_kv.len(),
                                seen_catalog.len(),
                                (timeout * 2).as_secs()
                            );
                        }
                    }
                }
                let spawned_ns = proc.spawned_ns;
                let services = format!("{prefix}/services/");
                let kv_records = consul.count_keys(&services).await? as i64;
                let catalog_records = consul.catalog_count(&service).await? as i64;
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (rss, hwm) = proc.rss_kib()?;
                proc.stop_gracefully().await;
                for w in watches {
                    w.abort();
                }
                consul.delete_prefix(&prefix).await?;
                let run = |done: Option<i64>, total_records| SyncRun {
                    elapsed_ns: done.map(|d| d - spawned_ns).unwrap_or_default(),
                    rss_kib: rss,
                    hwm_kib: hwm,
                    total_records,
                };
                let ms = |done: Option<i64>| {
                    done.map(|d| format!("{:.1} ms", (d - spawned_ns) as f64 / 1e6))
                        .unwrap_or_else(|| "-".into())
                };
                log(&format!(
                    "  run {} {tag}: {m} records in KV after {}, in the catalog after {}, RSS {} KiB (peak {} KiB)",
                    r + 1,
                    ms(kv_done),
                    ms(catalog_done),
                    rss,
                    hwm
                ));
                match mode {
                    ConsulMode::Kv => kv_only.runs.push(run(kv_done, kv_records)),
                    _ => {
                        both_kv.runs.push(run(kv_done, kv_records));
                        both_catalog.runs.push(run(catalog_done, catalog_records));
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    lab.remove_containers(&ids).await;
    wait_catalog_empty(lab, &service, timeout).await.ok();
    outcome?;
    Ok(vec![kv_only, both_kv, both_catalog])
}
