//! What the reconciler's benchmarks share: the library's loop against the etcd of the test
//! services, and records written as the bridge writes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_core::{Coordinator, KeyLayout};
use backend_etcd::EtcdStore;
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::Members;
use replset_reconciler::records::Selector;
use replset_sim::{Cluster, Event};
use test_support::contract::mongo_task_record;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// A reconciler (the library's loop, as the binary runs it) for `set`, under a prefix of its
/// own in the test services' etcd.
pub struct Bench {
    pub store: Arc<EtcdStore>,
    pub layout: KeyLayout,
    shutdown: CancellationToken,
    running: JoinHandle<()>,
}

impl Bench {
    pub async fn start(name: &str, set: &str, debounce: Duration) -> BenchResult<Bench> {
        let endpoint = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
        let layout = KeyLayout::new(&format!("bench/{name}-{:08x}", rand::random::<u32>()));
        let store = Arc::new(EtcdStore::connect(&[endpoint], layout.clone()).await?);
        let shutdown = CancellationToken::new();
        let config = ControllerConfig {
            layout: layout.clone(),
            selectors: vec![Selector::Service {
                service: "mongo".into(),
                set: set.into(),
                port: None,
            }],
            removal_grace: Duration::from_secs(30),
            debounce,
            resync: Duration::from_secs(15),
            leader_ttl: Duration::from_secs(10),
            holder: "bench".into(),
            dry_run: false,
            metrics: Arc::new(Default::default()),
            force_after: None,
        };
        let controller = Controller::start(
            store.clone(),
            Arc::new(Members::new(None)),
            config,
            shutdown.clone(),
        );
        let running = tokio::spawn(controller.run());
        Ok(Bench {
            store,
            layout,
            shutdown,
            running,
        })
    }

    /// Writes slot `slot`'s record with `host`, as the bridge would.
    pub async fn publish(&self, slot: u64, host: &str) -> BenchResult<()> {
        let r = mongo_task_record(slot, host).ok_or("bad host")?;
        self.store
            .put_value(&self.layout.service_key(&r.service, &r.id), r.to_json())
            .await?;
        Ok(())
    }

    /// Stops the loop and deletes the prefix.
    pub async fn stop(self) -> BenchResult<()> {
        self.shutdown.cancel();
        self.running.await?;
        let mut client = self.store.client();
        let _ = client
            .delete(
                format!("{}/", self.layout.prefix()),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
        Ok(())
    }
}

/// The members and voters of the latest config a member installed.
pub fn latest_config(cluster: &Cluster) -> (usize, usize) {
    cluster
        .history()
        .configs()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            Event::ConfigInstalled { config, voters, .. } => Some((
                config.get_array("members").map(Vec::len).unwrap_or(0),
                voters.len(),
            )),
            _ => None,
        })
        .unwrap_or((0, 0))
}

/// Waits (polling every 2 ms) until `done` holds; how long that took.
pub async fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if done() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// p50 and max of `times`, sorted in place.
pub fn p50_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[times.len() - 1])
}
