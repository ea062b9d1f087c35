//! Benchmark (not a test): a whole restart of a replica set, every member replaced at once
//! with its data under a new address (a scale to 0 and back, every node rebooted), until
//! `w: "majority"` writes succeed again. The reconciler's loop against the replica-set
//! simulator and the etcd of the test services. Run with
//! `cargo bench -p replset-reconciler --bench whole_restart`.
//!
//! For 3 and 5 members, each of 5 runs: the set holds 200 documents written with
//! `w: "majority"`; every member is killed, restarted on a new port with its data, and its
//! record rewritten with the new address; the clock starts when the last record is written.
//! It stops (1) when a new client's `w: "majority"` insert through the new addresses succeeds
//! (tried every 50 ms, each try with a 1 s server selection timeout) and (2) when the
//! primary's config names every new address. Every run checks that all documents are still
//! there. What it leaves out: the time swarm takes to start the tasks, and the simulator's
//! election timeout (2 s here; MongoDB's default is 10 s) bounds part of (1).

mod common;

use std::time::{Duration, Instant};

use bson::doc;
use common::{latest_config, p50_max, wait_until, Bench, BenchResult};
use mongodb::options::{Acknowledgment, ClientOptions, ReadConcern, WriteConcern};
use replset_sim::Cluster;

const RUNS: usize = 5;
const DOCS: i64 = 200;

fn majority() -> WriteConcern {
    WriteConcern::builder().w(Acknowledgment::Majority).build()
}

async fn client(cluster: &Cluster) -> BenchResult<mongodb::Client> {
    let mut options = ClientOptions::parse(cluster.uri()).await?;
    options.server_selection_timeout = Some(Duration::from_secs(1));
    options.write_concern = Some(majority());
    options.read_concern = Some(ReadConcern::majority());
    Ok(mongodb::Client::with_options(options)?)
}

/// Until one `w: "majority"` insert through the set's current addresses succeeds.
async fn until_writable(cluster: &Cluster, id: i64) -> BenchResult<Duration> {
    let started = Instant::now();
    let client = client(cluster).await?;
    let coll = client.database("bench").collection("docs");
    while started.elapsed() < Duration::from_secs(120) {
        if coll.insert_one(doc! {"_id": id}).await.is_ok() {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("no majority write within 120 s".into())
}

async fn run(members: usize) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
    let mut cluster = Cluster::start(members).await?;
    let bench = Bench::start(
        "whole-restart",
        cluster.set_name(),
        Duration::from_millis(200),
    )
    .await?;
    for (i, host) in cluster.hosts().into_iter().enumerate() {
        bench.publish(i as u64 + 1, &host).await?;
    }
    wait_until(Duration::from_secs(120), || {
        latest_config(&cluster) == (members, members)
    })
    .await
    .ok_or("the set was not formed")?;
    let coll = client(&cluster)
        .await?
        .database("bench")
        .collection::<bson::Document>("docs");
    for id in 0..DOCS {
        coll.insert_one(doc! {"_id": id}).await?;
    }
    let (mut writable, mut readdressed) = (Vec::new(), Vec::new());
    let mut next_id = DOCS;
    for run in 0..RUNS {
        for i in 0..members {
            cluster.kill(i)?;
        }
        for i in 0..members {
            cluster.restart_elsewhere(i, true).await?;
        }
        for i in 0..members {
            bench.publish(i as u64 + 1, cluster.host(i)?).await?;
        }
        let started = Instant::now();
        let w = until_writable(&cluster, next_id).await?;
        next_id += 1;
        let hosts = cluster.hosts();
        let all_new = || {
            cluster.primary().is_some_and(|p| {
                cluster.node(p).is_ok_and(|n| {
                    n.config().is_some_and(|c| {
                        hosts.iter().all(|h| c.members.iter().any(|m| &m.host == h))
                    })
                })
            })
        };
        wait_until(Duration::from_secs(120), all_new)
            .await
            .ok_or("the config never named the new addresses")?;
        let r = started.elapsed();
        let client = client(&cluster).await?;
        let found = client
            .database("bench")
            .collection::<bson::Document>("docs")
            .count_documents(doc! {})
            .await?;
        if found != next_id as u64 {
            return Err(format!("run {run}: {found} documents, {next_id} written").into());
        }
        eprintln!("{members} members, run {run}: writable after {w:?}, re-addressed after {r:?}");
        writable.push(w);
        readdressed.push(r);
    }
    bench.stop().await?;
    Ok((writable, readdressed))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BenchResult<()> {
    for members in [3, 5] {
        let (mut writable, mut readdressed) = run(members).await?;
        let (w50, wmax) = p50_max(&mut writable);
        let (r50, rmax) = p50_max(&mut readdressed);
        println!(
            "whole restart of {members} members under new addresses: majority writes again after p50 {:.2} s, max {:.2} s; config re-addressed after p50 {:.2} s, max {:.2} s ({RUNS} runs, nothing lost)",
            w50.as_secs_f64(),
            wmax.as_secs_f64(),
            r50.as_secs_f64(),
            rmax.as_secs_f64()
        );
    }
    Ok(())
}
