//! How long the stack takes to recover from a lost worker node, or a lost manager, measured
//! end to end.
//!
//!     cargo bench --bench node_loss -- [--runs 5] [--store etcd|consul] [--lose worker|manager]
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
//! `--lose manager`: a swarm of 3 managers and 1 worker (each manager holds one of the store's
//! 3 members: an etcd member or a Consul server); the manager killed is the one with the
//! reconciler leader, and the primary's where that can be arranged (see
//! `Deployment::arrange_manager_loss`); the probe runs on another manager. It also reports
//! `store`, the first write through each of the two members left that both read back (the
//! store's quorum, kept or regained), and `leader`, the other reconciler leading.
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
    manager: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        runs: 5,
        store: Store::Etcd,
        manager: false,
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
            "--lose" => {
                args.manager = match it.next().as_deref() {
                    Some("worker") => false,
                    Some("manager") => true,
                    _ => return Err("--lose takes worker or manager".into()),
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
    /// With a manager lost: the store's writes through the members left, the other leader.
    store: Option<Duration>,
    leader: Option<Duration>,
}

/// A manager lost: the one with the reconciler leader and a store member.
async fn manager_run(store: Store) -> Run {
    let swarm = Swarm::up_with_managers(4, 3).await;
    let d = Deployment::deploy(swarm, store, "30s").await;
    d.wait_converged(3, "deploy").await;
    let plan = d
        .arrange_manager_loss(3)
        .await
        .expect("a manager with the reconciler leader");
    let lost = plan.node;
    let keeper = (1..=d.swarm.managers())
        .find(|i| *i != lost)
        .expect("another manager");
    d.start_probe_on(keeper).await;
    wait_for("a first write", Duration::from_secs(60), || {
        d.probe_write("before")
    })
    .await;
    d.check_store_quorum("bench/quorum", "before")
        .await
        .expect("the store before the loss");
    let hostname = d.swarm.node(lost).hostname();
    d.swarm.kill_node(lost).await;
    let t0 = Instant::now();
    eprintln!(
        "[node-loss] killed manager {hostname} (store members {:?}, primary there: {})",
        plan.store_members, plan.primary_there
    );
    let mut k = 0;
    let write = wait_for("a majority write after the loss", CONVERGE, || {
        k += 1;
        let id = format!("after-{k}");
        let d = &d;
        async move { d.probe_write(&id).await.map(|()| t0.elapsed()) }
    })
    .await;
    let store = wait_for("the store's writes", CONVERGE, || async {
        d.check_store_quorum("bench/quorum", "after")
            .await
            .map(|_| t0.elapsed())
    })
    .await;
    let leader = wait_for("the other reconciler to lead", CONVERGE, || async {
        let t = d.leader_task().await?;
        if t.node == lost || t.container == plan.leader.container {
            Err(format!("still {}", t.container))
        } else {
            Ok(t0.elapsed())
        }
    })
    .await;
    let down = wait_down(&d, &hostname, t0).await;
    let whole = wait_whole(&d, lost, t0).await;
    d.swarm.down().await;
    Run {
        primary_lost: plan.primary_there,
        leader_lost: true,
        write,
        down,
        whole,
        store: Some(store),
        leader: Some(leader),
    }
}

async fn wait_down(d: &Deployment, hostname: &str, t0: Instant) -> Duration {
    wait_for("the node seen Down", CONVERGE, || async {
        let states = d.swarm.node_states().await?;
        match states.iter().find(|(h, _, _)| *h == hostname) {
            Some((_, status, _)) if status == "Down" => Ok(t0.elapsed()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

async fn wait_whole(d: &Deployment, lost: usize, t0: Instant) -> Duration {
    wait_for(
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
    .await
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
    let down = wait_down(&d, &hostname, t0).await;
    let whole = wait_whole(&d, lost, t0).await;
    d.swarm.down().await;
    Run {
        primary_lost,
        leader_lost,
        write,
        down,
        whole,
        store: None,
        leader: None,
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
            eprintln!("node_loss: {e}\nusage: cargo bench --bench node_loss -- [--runs N] [--store etcd|consul] [--lose worker|manager]");
            std::process::exit(2);
        }
    };
    let mut runs = Vec::new();
    for i in 1..=args.runs {
        eprintln!("[node-loss] run {i}/{} ({:?})", args.runs, args.store);
        runs.push(if args.manager {
            manager_run(args.store).await
        } else {
            one_run(args.store).await
        });
    }
    if args.manager {
        println!(
            "### Manager loss ({:?}, {} runs, 3 managers + 1 worker, bridge TTL 15 s)\n",
            args.store,
            runs.len()
        );
        println!("| run | primary on the lost node | majority write after | store writes after | other reconciler leads after | node Down after | set whole after |");
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!(
            "### Node loss ({:?}, {} runs, bridge TTL 15 s)\n",
            args.store,
            runs.len()
        );
        println!("| run | primary on the lost node | reconciler leader on the lost node | majority write after | node Down after | set whole after |");
        println!("|---|---|---|---|---|---|");
    }
    for (i, r) in runs.iter().enumerate() {
        let yes = |b: bool| if b { "yes" } else { "no" };
        match (r.store, r.leader) {
            (Some(store), Some(leader)) => println!(
                "| {} | {} | {} s | {} s | {} s | {} s | {} s |",
                i + 1,
                yes(r.primary_lost),
                secs(r.write),
                secs(store),
                secs(leader),
                secs(r.down),
                secs(r.whole)
            ),
            _ => println!(
                "| {} | {} | {} | {} s | {} s | {} s |",
                i + 1,
                yes(r.primary_lost),
                yes(r.leader_lost),
                secs(r.write),
                secs(r.down),
                secs(r.whole)
            ),
        }
    }
    let max = |f: fn(&Run) -> Duration| runs.iter().map(f).max().unwrap_or_default();
    println!(
        "\nWorst: majority write {} s, node Down {} s, set whole {} s.",
        secs(max(|r| r.write)),
        secs(max(|r| r.down)),
        secs(max(|r| r.whole))
    );
}
