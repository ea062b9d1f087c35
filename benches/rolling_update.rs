//! How long a rolling update of the mongo service takes, and what applications see meanwhile.
//!
//!     cargo bench --bench rolling_update -- [--members 3,5] [--runs 1] [--sync-floor-ms MS]
//!
//! Each run makes a fresh 3-node swarm of Docker-in-Docker nodes (`scripts/swarm-nodes`),
//! deploys `compose/stack.yml` with the offline images of `scripts/images` (the simulator as
//! mongod, with its healthcheck and a volume per slot), grows the set to the wanted size with
//! `docker service scale`, waits until the set equals the tasks, and then runs
//! `docker service update --force <stack>_mongo` (every task replaced, one at a time, each
//! keeping its volume on its node) while a writer makes `w: "majority"` writes, each a new
//! client process on the manager, and a poller asks every member for its state and config
//! (see `test_support::stack::Deployment::observe`). It reports, from the update command:
//! - `total`: every task replaced and the set equal to the new tasks again (members moved to
//!   the new addresses, voting, the URI updated);
//! - `no primary`: the longest time in which no member said PRIMARY (poller rounds, about
//!   0.5 s apart);
//! - `refused`: the writes that failed, of those made (each write waits up to 15 s);
//! - whether every acknowledged write was readable afterwards (read concern majority), and
//!   whether any reconfig changed more than one voter.
//!
//! Prints a Markdown table on stdout; progress on stderr. Needs root, `scripts/services up`
//! and `scripts/images`.

use std::collections::BTreeSet;
use std::time::Duration;

use test_support::dind::Swarm;
use test_support::stack::{Deployment, StackOptions, Store, MONGO};
use test_support::wait_for;

/// How long a whole rolling update may take.
const UPDATE: Duration = Duration::from_secs(900);

struct Args {
    members: Vec<usize>,
    runs: usize,
    sync_floor_ms: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        members: vec![3, 5],
        runs: 1,
        sync_floor_ms: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--members" => {
                args.members = it
                    .next()
                    .ok_or("--members takes a list, e.g. 3,5")?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--members: {e}"))?;
                if args.members.iter().any(|n| !(1..=7).contains(n)) {
                    return Err("--members: 1 to 7 each".into());
                }
            }
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs takes a number above 0")?
            }
            "--sync-floor-ms" => {
                args.sync_floor_ms = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .ok_or("--sync-floor-ms takes milliseconds")?,
                )
            }
            // cargo bench passes --bench
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

struct Run {
    members: usize,
    total: Duration,
    no_primary: Duration,
    writes: usize,
    refused: usize,
    lost: usize,
    bad_configs: usize,
}

async fn one_run(members: usize, sync_floor_ms: Option<u64>) -> Run {
    // One member per node, as the stack deploys it by default.
    let swarm = Swarm::up(members).await;
    let mut options = StackOptions::new("5s");
    if let Some(ms) = sync_floor_ms {
        options.mongo_extra_args = format!("--sim-initial-sync-floor-ms {ms}");
    }
    let d = Deployment::deploy_with(swarm, Store::Etcd, options).await;
    d.wait_converged(3, "deploy").await;
    if members != 3 {
        // Swarm's own scale: growing is safe (new members join without a vote), and it keeps
        // the service's spec as it is (`replset-reconciler scale` drops the healthcheck today:
        // bollard reads the spec's `Healthcheck` as `HealthCheck`).
        d.swarm_scale_mongo(members).await;
        d.wait_converged(members, "scaled").await;
    }
    d.start_probe().await;
    wait_for("a first write", Duration::from_secs(90), || {
        d.probe_write("before")
    })
    .await;
    let before: BTreeSet<String> = d.mongo_task_ids().await.expect("tasks");
    let ((), seen) = d
        .observe("rolling-update", async {
            d.update_mongo(&["--force"]).await;
            d.wait_update_done(members, &before, UPDATE, "rolling update")
                .await;
        })
        .await;
    let lost = d.unreadable(&seen.acknowledged()).await;
    if !lost.is_empty() {
        eprintln!("[rolling-update] NOT READABLE after the update: {lost:?}");
    }
    let bad = seen.more_than_one_voter_changed();
    if !bad.is_empty() {
        eprintln!("[rolling-update] configs with more than one voter changed: {bad:#?}");
    }
    let tasks = d.tasks(MONGO).await.map(|t| t.len()).unwrap_or(0);
    eprintln!(
        "[rolling-update] {members} members ({tasks} tasks): {}",
        seen.summary()
    );
    d.swarm.down().await;
    Run {
        members,
        total: seen.took,
        no_primary: seen.longest_without_primary(),
        writes: seen.writes.len(),
        refused: seen.refused(),
        lost: lost.len(),
        bad_configs: bad.len(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rolling_update: {e}\nusage: cargo bench --bench rolling_update -- [--members 3,5] [--runs N] [--sync-floor-ms MS]");
            std::process::exit(2);
        }
    };
    let mut runs = Vec::new();
    for &members in &args.members {
        for i in 1..=args.runs {
            eprintln!("[rolling-update] {members} members, run {i}/{}", args.runs);
            runs.push(one_run(members, args.sync_floor_ms).await);
        }
    }
    println!("### Rolling update (`docker service update --force`, etcd)\n");
    println!("| members | total | longest without a primary | writes refused / made | acknowledged writes lost | reconfigs changing >1 voter |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} s | {} s | {} / {} | {} | {} |",
            r.members,
            secs(r.total),
            secs(r.no_primary),
            r.refused,
            r.writes,
            r.lost,
            r.bad_configs
        );
    }
}
