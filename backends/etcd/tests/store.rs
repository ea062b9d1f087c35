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

test_support::server_suite! {
    store: store,
    shared: shared_endpoint(),
    private: PrivateEtcd,
    end_sessions: revoke_all,
    tag: "etcd",
    ttl: TTL,
    leader_ttl: Duration::from_secs(2),
    dead_leader_within: Duration::from_secs(15),
}

#[tokio::test]
async fn an_unreachable_store_keeps_the_client_error_as_the_cause() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let s = store(&endpoint, unique_layout("etcd-cause")).await;
    contract::an_unreachable_store_keeps_the_client_error_as_the_cause::<etcd_client::Error, _>(
        &s, TTL,
    )
    .await;
}
