//! `Store` passes every call through to its backend: the backend contract, run through the
//! enum on the in-memory store with paused time (the real stores run it on their own types in
//! their crates).

use std::time::Duration;

use backend_memory::MemoryCluster;
use backend_store::Store;
use test_support::contract::{self, unique_layout, Outage};

const TTL: Duration = Duration::from_secs(30);

struct Down(MemoryCluster);

impl Outage for Down {
    async fn stop(&mut self) {
        self.0.set_unavailable(true);
    }
    async fn resume(&mut self) {
        self.0.set_unavailable(false);
    }
}

#[tokio::test(start_paused = true)]
async fn records_live_with_the_session_and_go_with_it() {
    let s = Store::from(MemoryCluster::new().client(unique_layout("store-session")));
    assert_eq!(backend_core::Publisher::store_name(&s), "memory");
    contract::records_live_with_the_session_and_go_with_it(&s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_is_reported_and_a_new_one_can_be_opened() {
    let cluster = MemoryCluster::new();
    let s = Store::from(cluster.client(unique_layout("store-lost")));
    contract::a_lost_session_is_reported_and_a_new_one_can_be_opened(&s, TTL, async {
        cluster.expire_all_sessions()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
    let cluster = MemoryCluster::new();
    let s = Store::from(cluster.client(unique_layout("store-watch")));
    let mut outage = Down(cluster.clone());
    contract::a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage(
        &s,
        TTL,
        &mut outage,
        || {
            let cluster = cluster.clone();
            async move { cluster.expire_all_sessions() }
        },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coordinator_one_leader_at_a_time_and_a_resign_hands_over() {
    let cluster = MemoryCluster::new();
    let layout = unique_layout("store-elect");
    let a = Store::from(cluster.client(layout.clone()));
    let b = Store::from(cluster.client(layout.clone()));
    let key = layout.replset_leader_key("rs0");
    contract::one_leader_at_a_time_and_a_resign_hands_over(&a, &b, &key, Duration::from_secs(2))
        .await;
    contract::values_round_trip(&a, &layout.replset_uri_key("rs0")).await;
}

#[tokio::test]
async fn a_uri_of_a_store_opens_that_store() {
    let uri = backend_core::BackendUri::parse("etcd://127.0.0.1:2379/p").expect("uri");
    let s = Store::open(&uri, &backend_store::StoreOptions::default())
        .await
        .expect("no connection is made yet");
    assert!(s.as_etcd().is_some());
    let uri = backend_core::BackendUri::parse("consul://127.0.0.1:8500/p").expect("uri");
    let s = Store::open(&uri, &backend_store::StoreOptions::default())
        .await
        .expect("no connection is made yet");
    assert!(s.as_consul().is_some());
    assert_eq!(backend_core::Publisher::layout(&s).prefix(), "p");
}
