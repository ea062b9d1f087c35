#![allow(dead_code)] // Each of the test and the bench uses part of this module.

//! What the cluster test and the hung-member benchmark share: a watch's view, writers through
//! single members, and waits with a generous deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{KvEntry, Publisher, WatchEvent};
use backend_etcd::EtcdStore;
use futures::StreamExt;
use test_support::PrivateEtcdCluster;
use tokio::time::Instant;

/// A generous deadline for each step: the goal (under 10 s) is measured, not asserted.
pub const STEP: Duration = Duration::from_secs(40);

/// What a watch says the keys are: the last `Restarted` with the events after it.
#[derive(Default)]
pub struct View {
    pub keys: BTreeMap<String, Vec<u8>>,
    pub restarts: usize,
}

impl View {
    pub fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Restarted(entries) => {
                self.restarts += 1;
                self.keys = entries.into_iter().map(|e| (e.key, e.value)).collect();
            }
            WatchEvent::Put(KvEntry { key, value }) => {
                self.keys.insert(key, value);
            }
            WatchEvent::Deleted(key) => {
                self.keys.remove(&key);
            }
        }
    }
}

/// A direct client on member `i` alone, as another writer would be.
pub async fn writer(cluster: &PrivateEtcdCluster, i: usize) -> etcd_client::Client {
    etcd_client::Client::connect([format!("http://{}", cluster.endpoint(i))], None)
        .await
        .expect("a client of one member")
}

/// Puts `key` through the members other than `not`, until one accepts it.
pub async fn put_elsewhere(cluster: &PrivateEtcdCluster, not: &[usize], key: &str, value: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        for i in (0..3).filter(|i| !not.contains(i)) {
            let mut c = writer(cluster, i).await;
            let put = tokio::time::timeout(Duration::from_secs(3), c.put(key, value, None));
            if let Ok(Ok(_)) = put.await {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no member took the put of {key}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the watch into `view` until `done` holds of it; returns how long it took.
pub async fn watch_until(
    stream: &mut futures::stream::BoxStream<'static, backend_core::Result<WatchEvent>>,
    view: &mut View,
    what: &str,
    done: impl Fn(&View) -> bool,
) -> Duration {
    let started = Instant::now();
    while !done(view) {
        let next = tokio::time::timeout_at(started + STEP, stream.next()).await;
        match next {
            Ok(Some(Ok(event))) => view.apply(event),
            Ok(Some(Err(e))) => eprintln!("watch error (transient, it lists again): {e}"),
            Ok(None) => panic!("the watch ended waiting for {what}"),
            Err(_) => panic!("timed out after {STEP:?} waiting for {what}"),
        }
    }
    started.elapsed()
}

/// Publishes `record` until it goes through; returns how long that took.
pub async fn publish_within(store: &EtcdStore, record: &backend_core::ServiceRecord) -> Duration {
    let started = Instant::now();
    loop {
        match store.publish(std::slice::from_ref(record)).await {
            Ok(()) => return started.elapsed(),
            Err(e) => {
                assert!(started.elapsed() < STEP, "publish failed for {STEP:?}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
