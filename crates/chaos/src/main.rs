//! `replset-chaos`: the stack under faults, judged by its history, in the manner of Jepsen.
//!
//! ```text
//! replset-chaos --seed S --minutes M [--nodes N] [--store etcd|consul] [--clients C]
//! replset-chaos --seed S --minutes M --schedule-only     # print the seed's faults, run nothing
//! ```
//!
//! It deploys the stack (`compose/stack.yml` or `compose/stack.consul.yml`) on a swarm of N
//! Docker-in-Docker nodes (3 managers, each with a store member; the rest workers), starts C
//! clients (`replset-demo-app workload` on node 1) that write (`w: "majority"`, unique ids) and
//! read (read concern majority) for the whole run and record every call with its start, end
//! and outcome, and polls every mongo task for its state, term and config. From the seed, the
//! nemesis ([`schedule`], [`nemesis`]) injects faults for M minutes, one at a time and
//! overlapping. Then it heals everything, waits until the set equals the tasks again, stops
//! the clients, reads the final state, and judges the whole history ([`history`]):
//! acknowledged writes kept, no phantom or rolled-back reads, no client going back in time, at
//! most one voter changed per committed config, never two primaries in one term, the set equal
//! to the tasks and the URI to the set.
//!
//! The last line says `faults F, writes A acknowledged, L lost, U unsafe configs`; any
//! violation makes the exit code 1. `scripts/chaos` builds what it needs and runs it.

mod history;
mod nemesis;
mod report;
mod schedule;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use test_support::dind::Swarm;
use test_support::stack::{Deployment, StackOptions, Store, BRIDGE, MONGO, PROXY, RECONCILER};

use crate::report::{FaultRun, Report};
use crate::schedule::{Class, Planned};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StoreArg {
    Etcd,
    Consul,
}

/// Runs the stack under a seeded schedule of faults and checks the history of its clients.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The schedule's seed: the same seed gives the same faults at the same times.
    #[arg(long)]
    seed: u64,
    /// How long the nemesis injects faults (the heal, the convergence and the check come after).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    minutes: u64,
    /// Swarm nodes: 3 managers (each with a store member) and the rest workers; a node can
    /// only be killed (and made anew) when there is a worker.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(3..=7))]
    nodes: u64,
    /// The store of the stack.
    #[arg(long, value_enum, default_value_t = StoreArg::Etcd)]
    store: StoreArg,
    /// Concurrent clients, each with its own connection to the set.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=32))]
    clients: u64,
    /// Let members run on any node (the stack's default) instead of pinning them to as many
    /// labelled nodes as members (MONGO_NODES, the last three nodes): with a spare node, a
    /// member that restarts may start there, away from its data (docs/reliability.md).
    #[arg(long)]
    any_node: bool,
    /// Print the schedule of the seed and exit.
    #[arg(long)]
    schedule_only: bool,
    /// Where a run that finds a violation keeps the logs of the stack's services (one file
    /// each, in a directory named after the seed), before the swarm is removed.
    #[arg(long, default_value = "target/chaos")]
    logs: std::path::PathBuf,
}

/// The clients' container (on node 1) and the one-off that reads the final state.
const CLIENTS: &str = "chaos-clients";
const DUMP: &str = "chaos-dump";
/// How long the set may take to equal the tasks again after the heal.
const CONVERGE: Duration = Duration::from_secs(300);
/// How long the clients keep going after the nemesis at most (the runner stops them once the
/// set has converged).
const CLIENTS_AFTER: Duration = Duration::from_secs(1200);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let length = Duration::from_secs(cli.minutes * 60);
    let plan = schedule::schedule(cli.seed, length);
    let mut head = format!(
        "seed {}: {} faults in {} min (re-run: {})\n",
        cli.seed,
        plan.len(),
        cli.minutes,
        rerun(&cli)
    );
    for p in &plan {
        head.push_str(&format!("  at {:>6.1}s  {}\n", p.at.as_secs_f64(), p.fault));
    }
    if !say(&head) || cli.schedule_only {
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replset-chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(run(&cli, plan));
    say(&format!("{}\n", report.render()));
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "replset-chaos: violations found; re-run with: {}",
            rerun(&cli)
        );
        ExitCode::FAILURE
    }
}

/// The command that runs the same schedule on the same kind of deployment.
fn rerun(cli: &Cli) -> String {
    let mut cmd = format!(
        "scripts/chaos --seed {} --minutes {} --nodes {} --clients {}",
        cli.seed, cli.minutes, cli.nodes, cli.clients
    );
    if let StoreArg::Consul = cli.store {
        cmd.push_str(" --store consul");
    }
    if cli.any_node {
        cmd.push_str(" --any-node");
    }
    cmd
}

/// Writes to stdout; false when it is closed (`| head`): the reader has seen enough.
fn say(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn run(cli: &Cli, plan: Vec<Planned>) -> Report {
    let store = match cli.store {
        StoreArg::Etcd => Store::Etcd,
        StoreArg::Consul => Store::Consul,
    };
    let swarm = Swarm::up_with_managers(cli.nodes as usize, 3).await;
    let mut options = StackOptions::new("5s");
    if !cli.any_node {
        let n = cli.nodes as usize;
        options.mongo_nodes = (n - 2..=n).collect();
    }
    let d = Arc::new(Deployment::deploy_with(swarm, store, options).await);
    d.wait_converged(3, "deploy").await;
    let run_id = format!("s{}", cli.seed);
    let clients_for = format!("{}s", (cli.minutes * 60) + CLIENTS_AFTER.as_secs());
    let clients = cli.clients.to_string();
    d.start_app_container(
        1,
        CLIENTS,
        &[
            "workload",
            "--clients",
            &clients,
            "--for",
            &clients_for,
            "--run-id",
            &run_id,
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("starting the clients: {e}"));
    let mut report = Report::new(cli.seed, cli.minutes);

    // The nemesis and the heal run while the poller records every member's state and config.
    let nemesis = {
        let d = d.clone();
        async move {
            let faults = run_schedule(&d, plan).await;
            let healed = nemesis::heal_everything(&d).await;
            let converged = wait_converged(&d).await;
            (faults, healed, converged)
        }
    };
    let ((faults, healed, converged), observed) = d.poll_while(nemesis).await;
    report.faults = faults;
    report.healed = healed;
    report.converged = converged;
    report.observed(&observed);

    let manager = d.swarm.node(1);
    let _ = manager.docker(&["stop", "-t", "30", CLIENTS]).await;
    match manager.docker_output(&["logs", CLIENTS]).await {
        Ok(out) => match history::parse_ops(&out.stdout) {
            Ok(ops) => report.ops = ops,
            Err(e) => report.problems.push(format!("the clients' history: {e}")),
        },
        Err(e) => report
            .problems
            .push(format!("docker logs {CLIENTS} on dnode1: {e}")),
    }
    match final_state(&d, &run_id).await {
        Ok(state) => report.check(&state),
        Err(e) => report.problems.push(e),
    }
    if !report.clean() {
        keep_logs(
            &d,
            &cli.logs.join(format!("seed-{}-{}", cli.seed, unix_ms())),
        )
        .await;
    }
    // SWARM_NODES_KEEP=1 keeps the swarm for a look (its drop says how to reach it).
    if std::env::var_os("SWARM_NODES_KEEP").is_none_or(|v| v != "1") {
        if let Ok(d) = Arc::try_unwrap(d) {
            d.swarm.down().await;
        }
    }
    report
}

/// The services whose logs a failed run keeps, and how many of the reconciler's last lines it
/// prints (where a CI log is all there is).
const LOGGED: [&str; 4] = [RECONCILER, BRIDGE, MONGO, PROXY];
const RECONCILER_TAIL: usize = 30;

/// Writes each service's logs (every task's, those of nodes still up) to `dir`, and prints the
/// reconciler's last decisions (info and above, in time order) on stderr.
async fn keep_logs(d: &Deployment, dir: &std::path::Path) {
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!(
            "[chaos] cannot keep the stack's logs in {}: {e}",
            dir.display()
        );
        return;
    }
    for service in LOGGED {
        let out = match d
            .manager()
            .docker_output(&["service", "logs", "--raw", "--no-trunc", service])
            .await
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("[chaos] docker service logs {service}: {e}");
                continue;
            }
        };
        // Each task's lines in turn: sorted, they read as one story (each starts with its time).
        let mut lines: Vec<&str> = out.stdout.lines().chain(out.stderr.lines()).collect();
        lines.sort_unstable();
        let path = dir.join(format!("{service}.log"));
        if let Err(e) = std::fs::write(&path, lines.join("\n")) {
            eprintln!("[chaos] cannot write {}: {e}", path.display());
            continue;
        }
        if service == RECONCILER {
            let decisions: Vec<&&str> = lines
                .iter()
                .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
                .collect();
            eprintln!("[chaos] the reconciler's last decisions:");
            for l in &decisions[decisions.len().saturating_sub(RECONCILER_TAIL)..] {
                eprintln!("  {l}");
            }
        }
    }
    eprintln!("[chaos] the stack's logs: {}", dir.display());
}

/// Runs every planned fault at its time, each in a task of its own; faults of one class
/// wait for each other ([`schedule::Fault::class`]).
async fn run_schedule(d: &Arc<Deployment>, plan: Vec<Planned>) -> Vec<FaultRun> {
    let start = tokio::time::Instant::now();
    let node = Arc::new(tokio::sync::Mutex::new(()));
    let service = Arc::new(tokio::sync::Mutex::new(()));
    let mut running = Vec::new();
    for p in plan {
        let (d, node, service) = (d.clone(), node.clone(), service.clone());
        running.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + p.at).await;
            let _guard = match p.fault.class() {
                Class::Node => Some(node.lock_owned().await),
                Class::Service => Some(service.lock_owned().await),
                Class::Process => None,
            };
            let started_ms = unix_ms();
            let began = Instant::now();
            eprintln!("[chaos] {:>6.1}s {}", p.at.as_secs_f64(), p.fault);
            // A fault's own checks panic when the stack does not recover in time: caught by
            // its task, recorded as the fault's error.
            let inner = {
                let fault = p.fault.clone();
                tokio::spawn(async move { nemesis::inject(&d, &fault).await })
            };
            let outcome = match inner.await {
                Ok(r) => r,
                Err(e) => Err(format!("the fault's step failed: {e}")),
            };
            eprintln!(
                "[chaos] {:>6.1}s {} done after {:.1}s: {outcome:?}",
                p.at.as_secs_f64(),
                p.fault,
                began.elapsed().as_secs_f64()
            );
            FaultRun {
                planned: p,
                started_ms,
                took: began.elapsed(),
                outcome,
            }
        }));
    }
    let mut out = Vec::new();
    for r in running {
        if let Ok(f) = r.await {
            out.push(f);
        }
    }
    out
}

/// Waits until the set equals the tasks (as many as the service's spec says: a scale back
/// refused under a fault leaves one more) and the URI the set; the last reason if not.
async fn wait_converged(d: &Deployment) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < CONVERGE {
        let converged = match nemesis::replicas(d).await {
            Ok(n) => d.check_converged(n).await,
            Err(e) => Err(e),
        };
        match converged {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stuck = match d.tasks_not_running().await {
        Ok(t) if t.is_empty() => "none".to_string(),
        Ok(t) => t.join("; "),
        Err(e) => format!("unknown ({e})"),
    };
    Err(format!(
        "the set did not equal the tasks within {}s of the heal: {last}; \
         tasks swarm wants running that are not: {stuck}",
        CONVERGE.as_secs()
    ))
}

/// Every document of the run, read with read concern majority by a one-off client (a few
/// tries: a read can meet an election).
async fn final_state(
    d: &Deployment,
    run_id: &str,
) -> Result<std::collections::BTreeMap<String, Option<String>>, String> {
    let node = d.swarm.node(1);
    let mut last = String::new();
    for _ in 0..5 {
        let _ = node.docker(&["rm", "-f", DUMP]).await;
        if let Err(e) = d
            .start_app_container(1, DUMP, &["dump", "--prefix", run_id])
            .await
        {
            last = e;
            continue;
        }
        let code = node.docker(&["wait", DUMP]).await.unwrap_or_default();
        let out = node.docker_output(&["logs", DUMP]).await?;
        if code.trim() == "0" {
            match history::parse_final(&out.stdout) {
                Ok(state) => return Ok(state),
                Err(e) => last = e.to_string(),
            }
        } else {
            last = format!("exit {}: {}", code.trim(), out.stderr.trim());
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Err(format!("the final state could not be read: {last}"))
}
