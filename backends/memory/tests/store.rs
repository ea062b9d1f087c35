//! The in-memory store keeps the backend contract (test-support's `contract`), the same suite
//! the etcd and Consul backends run against their real stores, here with paused time: TTLs,
//! backoffs and the contract's timeouts all run on tokio's clock.

use std::time::Duration;

use backend_memory::MemoryCluster;
use test_support::contract::{self, unique_layout, Outage};

/// The TTLs the real suites use (etcd's; Consul's leader TTLs are 10 s).
const TTL: Duration = Duration::from_secs(30);
const LEADER_TTL: Duration = Duration::from_secs(2);

/// The store taken away and brought back, as a private etcd or Consul is stopped and resumed.
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
    let s = MemoryCluster::new().client(unique_layout("memory-session"));
    contract::records_live_with_the_session_and_go_with_it(&s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_is_reported_and_a_new_one_can_be_opened() {
    let cluster = MemoryCluster::new();
    let s = cluster.client(unique_layout("memory-lost"));
    contract::a_lost_session_is_reported_and_a_new_one_can_be_opened(&s, TTL, async {
        cluster.expire_all_sessions()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_store_is_a_transient_error() {
    let cluster = MemoryCluster::named(&format!("127.0.0.1:{}", test_support::free_port()));
    cluster.set_unavailable(true);
    let s = cluster.client(unique_layout("memory-down"));
    contract::an_unreachable_store_is_a_transient_error(&s, TTL).await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
    let cluster = MemoryCluster::new();
    let s = cluster.client(unique_layout("memory-watch"));
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
    let layout = unique_layout("memory-elect");
    let a = cluster.client(layout.clone());
    let b = cluster.client(layout.clone());
    let key = layout.replset_leader_key("rs0");
    contract::one_leader_at_a_time_and_a_resign_hands_over(&a, &b, &key, LEADER_TTL).await;
}

#[tokio::test(start_paused = true)]
async fn coordinator_a_dead_leader_is_replaced_after_its_ttl() {
    let cluster = MemoryCluster::new();
    let layout = unique_layout("memory-dead");
    let a = cluster.client(layout.clone());
    let b = cluster.client(layout.clone());
    let key = layout.replset_leader_key("rs0");
    contract::a_dead_leader_is_replaced_after_its_ttl(
        &a,
        &b,
        &key,
        LEADER_TTL,
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coordinator_a_leader_learns_that_it_lost() {
    let cluster = MemoryCluster::new();
    let layout = unique_layout("memory-lost-leader");
    let a = cluster.client(layout.clone());
    contract::a_leader_learns_that_it_lost(
        &a,
        &layout.replset_leader_key("rs0"),
        LEADER_TTL,
        async { cluster.expire_all_sessions() },
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn coordinator_values_round_trip() {
    let layout = unique_layout("memory-values");
    let a = MemoryCluster::new().client(layout.clone());
    contract::values_round_trip(&a, &layout.replset_uri_key("rs0")).await;
}
