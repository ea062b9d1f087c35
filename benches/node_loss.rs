//! How long the stack takes to recover from a lost worker node, measured end to end.
//!
//!     cargo bench --bench node_loss -- [--runs 5] [--store etcd|consul]
//!
//! Each run makes a fresh 3-node swarm of Docker-in-Docker nodes (`scripts/swarm-nodes`),
//! deploys the stack (`compose/stack.yml` or `stack.consul.yml`) with the offline images of
//! `scripts/images`, waits until the replica set equals the 3 mongo tasks, starts a probe client
//! on the manager, and then `docker kill`s a worker node: the one with the primary where the
//! primary is on a worker, otherwise one with a secondary. It reports, from the kill:
//! - `write`: the first `w: "majority"` write through the published URI that succeeds, from a
//!   new client on the manager (a fresh process per attempt, as an application restarting
//!   would be); with a primary lost this is the election, otherwise it is immediate;
//! - `down`: the manager marks the node Down (swarm's own detection);
//! - `whole`: every slot runs on a live node and the replica set equals those tasks again
//!   (records expired, tasks rescheduled, members moved to their new hosts, votes back).
//!
//! Prints a Markdown table on stdout; progress on stderr. Needs root, `scripts/services up`
//! and `scripts/images`.

use std::time::{Duration, Instant};

use test_support::dind::Swarm;
use test_support::stack::{Deployment, Store, CONVERGE, MONGO};
use test_support::wait_for;

struct Args {
    runs: usize,
    store: Store,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        runs: 5,
        store: Store::Etcd,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs takes a number above 0")?
            }
            "--store" => {
                args.store = match it.next().as_deref() {
                    Some("etcd") => Store::Etcd,
                    Some("consul") => Store::Consul,
                    _ => return Err("--store takes etcd or consul".into()),
                }
            }
            // cargo bench passes --bench
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

struct Run {
    primary_lost: bool,
    leader_lost: bool,
    write: Duration,
    down: Duration,
    whole: Duration,
}

async fn one_run(store: Store) -> Run {
    // A spare node: with one member per node (the stack's default) the lost node's task
    // starts on it.
    let swarm = Swarm::up(4).await;
    let d = Deployment::deploy(swarm, store, "30s").await;
    d.wait_converged(3, "deploy").await;
    d.start_probe().await;
    // the probe itself can write before the loss
    wait_for("a first write", Duration::from_secs(60), || {
        d.probe_write("before")
    })
    .await;
    let (lost, primary_lost) = d.worker_to_lose().await.expect("a worker to lose");
    let hostname = d.swarm.node(lost).hostname();
    // Whether the reconciler that leads runs there too (the other must take over first).
    let holder = d.leader().await.expect("a reconciler leader");
    let leader_lost = d
        .tasks("e2e_reconciler")
        .await
        .expect("reconciler tasks")
        .iter()
        .any(|t| t.node == lost && t.container.starts_with(&holder));

    d.swarm.kill_node(lost).await;
    let t0 = Instant::now();
    eprintln!("[node-loss] killed {hostname} (primary there: {primary_lost}, reconciler leader there: {leader_lost})");

    let mut k = 0;
    let write = wait_for("a majority write after the loss", CONVERGE, || {
        k += 1;
        let id = format!("after-{k}");
        let d = &d;
        async move { d.probe_write(&id).await.map(|()| t0.elapsed()) }
    })
    .await;
    let down = wait_for("the node seen Down", CONVERGE, || async {
        let states = d.swarm.node_states().await?;
        match states.iter().find(|(h, _, _)| *h == hostname) {
            Some((_, status, _)) if status == "Down" => Ok(t0.elapsed()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let whole = wait_for(
        "the set to equal the rescheduled tasks",
        CONVERGE,
        || async {
            let tasks = d.tasks(MONGO).await?;
            if tasks.iter().any(|t| t.node == lost) {
                return Err("a task is still listed on the lost node".into());
            }
            d.check_converged(3).await.map(|_| t0.elapsed())
        },
    )
    .await;
    d.swarm.down().await;
    Run {
        primary_lost,
        leader_lost,
        write,
        down,
        whole,
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
            eprintln!("node_loss: {e}\nusage: cargo bench --bench node_loss -- [--runs N] [--store etcd|consul]");
            std::process::exit(2);
        }
    };
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        eprintln!("[node-loss] run {i}/{} ({:?})", args.runs, args.store);
        runs.push(one_run(args.store).await);
    }
    println!(
        "### Node loss ({:?}, {} runs, bridge TTL 15 s)\n",
        args.store,
        runs.len()
    );
    println!("| run | primary on the lost node | reconciler leader on the lost node | majority write after | node Down after | set whole after |");
    println!("|---|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} s | {} s | {} s |",
            i + 1,
            if r.primary_lost { "yes" } else { "no" },
            if r.leader_lost { "yes" } else { "no" },
            secs(r.write),
            secs(r.down),
            secs(r.whole)
        );
    }
    let max = |f: fn(&Run) -> Duration| runs.iter().map(f).max().unwrap_or_default();
    println!(
        "\nWorst: majority write {} s, node Down {} s, set whole {} s.",
        secs(max(|r| r.write)),
        secs(max(|r| r.down)),
        secs(max(|r| r.whole))
    );
}
