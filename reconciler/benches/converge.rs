//! Benchmark (not a test): from a record appearing in the store to its member being in the
//! replica set's config, with the reconciler's loop against the replica-set simulator and the
//! etcd of the test services. Run with `cargo bench -p replset-reconciler --bench converge`.
//!
//! For each of 20 runs a new simulated member is started, its record is written, and the clock
//! stops when a config that includes the member is installed by the primary (the history of
//! the simulator, polled every 2 ms). The member's catch-up (and so its vote) is not included:
//! adding it without a vote does not wait for it. The debounce is reported separately.

mod common;

use std::time::{Duration, Instant};

use common::{latest_config, p50_max, wait_until, Bench, BenchResult};
use replset_sim::Cluster;

const RUNS: usize = 20;
const DEBOUNCE: Duration = Duration::from_millis(200);

async fn wait_members(cluster: &Cluster, n: usize) -> Option<Duration> {
    wait_until(Duration::from_secs(60), || latest_config(cluster).0 >= n).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BenchResult<()> {
    let mut cluster = Cluster::start(3).await?;
    let bench = Bench::start("converge", cluster.set_name(), DEBOUNCE).await?;
    for (i, host) in cluster.hosts().into_iter().enumerate() {
        bench.publish(i as u64 + 1, &host).await?;
    }
    wait_members(&cluster, 3)
        .await
        .ok_or("the set of 3 was not formed")?;

    let mut times = Vec::new();
    for run in 0..RUNS {
        let i = cluster.add_member().await?;
        let host = cluster.host(i)?.to_string();
        // Let the previous member's vote settle, so each run starts from a converged set.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        bench.publish(i as u64 + 1, &host).await?;
        wait_members(&cluster, i + 1)
            .await
            .ok_or("the member was not added")?;
        let took = started.elapsed();
        eprintln!("run {run}: member {} in the config after {took:?}", i + 1);
        times.push(took);
    }
    let (p50, max) = p50_max(&mut times);
    println!(
        "record written -> member in the config: p50 {:.0} ms, max {:.0} ms over {RUNS} runs (debounce {} ms; beyond the debounce p50 {:.0} ms)",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        DEBOUNCE.as_millis(),
        (p50.saturating_sub(DEBOUNCE)).as_secs_f64() * 1e3
    );
    bench.stop().await
}
