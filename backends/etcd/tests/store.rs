//! The etcd backend keeps the backend contract (test-support's `contract`) against a real
//! etcd: the shared one of the test services, and a private one for the outage.

use std::time::Duration;

use backend_core::KeyLayout;
use backend_etcd::EtcdStore;
use test_support::contract::{self, unique_layout};
use test_support::{free_port, PrivateEtcd};

const TTL: Duration = Duration::from_secs(30);

fn shared_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

async fn store(endpoint: &str, layout: KeyLayout) -> EtcdStore {
    EtcdStore::connect(&[endpoint.to_string()], layout)
        .await
        .expect("client")
}

/// Revokes every lease of the store, as an operator (or an expiry) would.
async fn revoke_all(endpoint: String) {
    let s = store(&endpoint, KeyLayout::new("unused")).await;
    let mut client = s.client();
    for lease in client.leases().await.expect("leases").leases() {
        client.lease_revoke(lease.id()).await.expect("revoke");
    }
}

#[tokio::test]
async fn records_live_with_the_session_and_go_with_it() {
    let s = store(&shared_endpoint(), unique_layout("etcd-session")).await;
    contract::records_live_with_the_session_and_go_with_it(&s, TTL).await;
}

#[tokio::test]
async fn a_lost_session_is_reported_and_a_new_one_can_be_opened() {
    // A private etcd: revoking every lease of the shared one would disturb other tests.
    let etcd = PrivateEtcd::start().await;
    let s = store(&etcd.endpoint(), unique_layout("etcd-lost")).await;
    contract::a_lost_session_is_reported_and_a_new_one_can_be_opened(
        &s,
        TTL,
        revoke_all(etcd.endpoint()),
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_store_is_a_transient_error() {
    let s = store(
        &format!("127.0.0.1:{}", free_port()),
        unique_layout("etcd-down"),
    )
    .await;
    contract::an_unreachable_store_is_a_transient_error(&s, TTL).await;
}

#[tokio::test]
async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
    let mut etcd = PrivateEtcd::start().await;
    let endpoint = etcd.endpoint();
    let s = store(&endpoint, unique_layout("etcd-watch")).await;
    contract::a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage(
        &s,
        TTL,
        &mut etcd,
        || revoke_all(endpoint.clone()),
    )
    .await;
}

#[tokio::test]
async fn coordinator_one_leader_at_a_time_and_a_resign_hands_over() {
    let layout = unique_layout("etcd-elect");
    let a = store(&shared_endpoint(), layout.clone()).await;
    let b = store(&shared_endpoint(), layout.clone()).await;
    let key = layout.replset_leader_key("rs0");
    contract::one_leader_at_a_time_and_a_resign_hands_over(&a, &b, &key, Duration::from_secs(2))
        .await;
}

#[tokio::test]
async fn coordinator_a_dead_leader_is_replaced_after_its_ttl() {
    let layout = unique_layout("etcd-dead");
    let a = store(&shared_endpoint(), layout.clone()).await;
    let b = store(&shared_endpoint(), layout.clone()).await;
    let key = layout.replset_leader_key("rs0");
    contract::a_dead_leader_is_replaced_after_its_ttl(
        &a,
        &b,
        &key,
        Duration::from_secs(2),
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test]
async fn coordinator_a_leader_learns_that_it_lost() {
    let etcd = PrivateEtcd::start().await;
    let layout = unique_layout("etcd-lost-leader");
    let a = store(&etcd.endpoint(), layout.clone()).await;
    contract::a_leader_learns_that_it_lost(
        &a,
        &layout.replset_leader_key("rs0"),
        Duration::from_secs(2),
        revoke_all(etcd.endpoint()),
    )
    .await;
}

#[tokio::test]
async fn coordinator_values_round_trip() {
    let layout = unique_layout("etcd-values");
    let a = store(&shared_endpoint(), layout.clone()).await;
    contract::values_round_trip(&a, &layout.replset_uri_key("rs0")).await;
}

#[tokio::test]
async fn an_unreachable_store_keeps_the_client_error_as_the_cause() {
    let s = store(
        &format!("127.0.0.1:{}", free_port()),
        unique_layout("etcd-cause"),
    )
    .await;
    let err = backend_core::Publisher::open_session(&s, TTL)
        .await
        .expect_err("nothing listens");
    let cause = std::error::Error::source(&err).expect("a cause");
    assert!(
        cause.downcast_ref::<etcd_client::Error>().is_some(),
        "{cause:?}"
    );
}
