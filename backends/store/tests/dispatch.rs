//! `Store` passes every call through to its backend: the backend contract, run through the
//! enum on the in-memory store with paused time (the real stores run it on their own types in
//! their crates).

use backend_store::Store;

test_support::memory_suite!(|cluster: &MemoryCluster, layout| Store::from(cluster.client(layout)));

#[test]
fn a_memory_client_is_a_store_named_memory() {
    let s = Store::from(MemoryCluster::new().client(unique_layout("store-name")));
    assert_eq!(backend_core::Publisher::store_name(&s), "memory");
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
