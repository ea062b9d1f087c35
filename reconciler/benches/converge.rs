//! Benchmark (not a test): from a record appearing in the store to its member being in the
//! replica set's config, with the reconciler's loop against the replica-set simulator and the
//! etcd of the test services. Run with `cargo bench -p replset-reconciler --bench converge`.
//!
//! For each of 20 runs a new simulated member is started, its record is written, and the clock
//! stops when a config that includes the member is installed by the primary (the history of
//! the simulator, polled every 2 ms). The member's catch-up (and so its vote) is not included:
//! adding it without a vote does not wait for it. The debounce is reported separately.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_core::{Coordinator, KeyLayout};
use backend_etcd::EtcdStore;
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::Members;
use replset_reconciler::records::Selector;
use replset_sim::{Cluster, Event};
use test_support::contract::mongo_task_record;
use tokio_util::sync::CancellationToken;

const RUNS: usize = 20;
const DEBOUNCE: Duration = Duration::from_millis(200);

fn members_in_latest_config(cluster: &Cluster) -> usize {
    cluster
        .history()
        .configs()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            Event::ConfigInstalled { config, .. } => {
                Some(config.get_array("members").map(Vec::len).unwrap_or(0))
            }
            _ => None,
        })
        .unwrap_or(0)
}

async fn wait_members(cluster: &Cluster, n: usize, deadline: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if members_in_latest_config(cluster) >= n {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let layout = KeyLayout::new(&format!("bench/converge-{:08x}", rand::random::<u32>()));
    let store = Arc::new(EtcdStore::connect(&[endpoint], layout.clone()).await?);
    let mut cluster = Cluster::start(3).await?;
    let set = cluster.set_name().to_string();
    let shutdown = CancellationToken::new();
    let config = ControllerConfig {
        layout: layout.clone(),
        selectors: vec![Selector::Service {
            service: "mongo".into(),
            set: set.clone(),
            port: None,
        }],
        removal_grace: Duration::from_secs(30),
        debounce: DEBOUNCE,
        resync: Duration::from_secs(15),
        leader_ttl: Duration::from_secs(10),
        holder: "bench".into(),
        dry_run: false,
        metrics: Arc::new(Default::default()),
        force_after: None,
    };
    // The library's loop, as the binary runs it.
    let controller = Controller::start(
        store.clone(),
        Arc::new(Members::new(None)),
        config,
        shutdown.clone(),
    );
    let running = tokio::spawn(controller.run());
    let publish = |slot: u64, host: String| {
        let store = store.clone();
        let layout = layout.clone();
        async move {
            let r = mongo_task_record(slot, &host).ok_or("bad host")?;
            store
                .put_value(&layout.service_key(&r.service, &r.id), r.to_json())
                .await
                .map_err(|e| e.to_string())
        }
    };
    for (i, host) in cluster.hosts().into_iter().enumerate() {
        publish(i as u64 + 1, host).await?;
    }
    wait_members(&cluster, 3, Duration::from_secs(60))
        .await
        .ok_or("the set of 3 was not formed")?;

    let mut times = Vec::new();
    for run in 0..RUNS {
        let i = cluster.add_member().await?;
        let host = cluster.host(i)?.to_string();
        // Let the previous member's vote settle, so each run starts from a converged set.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        publish(i as u64 + 1, host).await?;
        wait_members(&cluster, i + 1, Duration::from_secs(60))
            .await
            .ok_or("the member was not added")?;
        let took = started.elapsed();
        eprintln!("run {run}: member {} in the config after {took:?}", i + 1);
        times.push(took);
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let max = times[times.len() - 1];
    println!(
        "record written -> member in the config: p50 {:.0} ms, max {:.0} ms over {RUNS} runs (debounce {} ms; beyond the debounce p50 {:.0} ms)",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        DEBOUNCE.as_millis(),
        (p50.saturating_sub(DEBOUNCE)).as_secs_f64() * 1e3
    );
    shutdown.cancel();
    running.await?;
    let mut client = store.client();
    let _ = client
        .delete(
            format!("{}/", layout.prefix()),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await;
    Ok(())
}
