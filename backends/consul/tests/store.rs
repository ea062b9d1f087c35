//! The Consul backend keeps the backend contract (test-support's `contract`) against a real
//! Consul: the shared dev agent of the test services, and private ones for the tests that end
//! every session or restart the agent.

use std::time::Duration;

use backend_consul::{ConsulOptions, ConsulStore};
use backend_core::KeyLayout;
use test_support::contract::{self, unique_layout};
use test_support::{free_port, PrivateConsul};

const TTL: Duration = Duration::from_secs(30);

fn shared_endpoint() -> String {
    std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into())
}

/// A KV-only store: the contract is about records and watches; the catalog has its own tests.
fn store(endpoint: &str, layout: KeyLayout) -> ConsulStore {
    let options = ConsulOptions {
        catalog: false,
        ..ConsulOptions::default()
    };
    ConsulStore::new(endpoint, false, layout, options).expect("client")
}

async fn open(endpoint: &str, layout: KeyLayout) -> ConsulStore {
    store(endpoint, layout)
}

/// Destroys every session of the agent.
async fn destroy_all(endpoint: String) {
    test_support::destroy_consul_sessions(&reqwest::Client::new(), &format!("http://{endpoint}"))
        .await;
}

test_support::server_suite! {
    store: open,
    shared: shared_endpoint(),
    private: PrivateConsul,
    end_sessions: destroy_all,
    tag: "consul",
    ttl: TTL,
    leader_ttl: Duration::from_secs(10),
    // Consul may reap a session up to twice its TTL late.
    dead_leader_within: Duration::from_secs(40),
}

#[tokio::test]
async fn ttls_below_consuls_floor_are_refused() {
    let s = store(&shared_endpoint(), unique_layout("consul-ttl"));
    let err = backend_core::Publisher::open_session(&s, Duration::from_secs(5))
        .await
        .expect_err("5 s is below the floor");
    assert!(err.to_string().contains("10 s"), "{err}");
}

#[tokio::test]
async fn a_write_with_a_session_consul_ended_is_a_lost_session() {
    let consul = PrivateConsul::start().await;
    let s = store(&consul.endpoint(), unique_layout("consul-write-lost"));
    backend_core::Publisher::open_session(&s, TTL)
        .await
        .expect("session");
    destroy_all(consul.endpoint()).await;
    let err = backend_core::Publisher::publish(&s, &[contract::record("db", "a")])
        .await
        .expect_err("the lock's session is gone");
    assert!(
        matches!(err, backend_core::BackendError::SessionLost { .. }),
        "{err}"
    );
}

/// Catalog only (`--no-consul-kv`): the catalog is the store, so a new publisher (a restarted
/// bridge) lists the registrations an earlier one made under its prefix, as records it can
/// compare and remove; registrations of another prefix are not listed.
#[tokio::test]
async fn catalog_only_lists_the_registrations_of_its_prefix_for_a_resync() {
    let consul = PrivateConsul::start().await;
    let catalog_only = |layout: KeyLayout| {
        let options = ConsulOptions {
            kv: false,
            ..ConsulOptions::default()
        };
        ConsulStore::new(&consul.endpoint(), false, layout, options).expect("client")
    };
    use backend_core::Publisher;
    let layout = unique_layout("consul-catalog");
    let earlier = catalog_only(layout.clone());
    earlier.open_session(TTL).await.expect("session");
    let (a, b) = (
        contract::record("db", "orphan-a"),
        contract::record("db", "kept-b"),
    );
    earlier
        .publish(&[a.clone(), b.clone()])
        .await
        .expect("publish");
    let other = catalog_only(unique_layout("consul-catalog-other"));
    other.open_session(TTL).await.expect("session");
    other
        .publish(&[contract::record("db", "other-c")])
        .await
        .expect("publish");
    drop(earlier); // a bridge gone without cleaning up

    let later = catalog_only(layout.clone());
    let listed = later.list_services().await.expect("list");
    let mut keys: Vec<&str> = listed.iter().map(|e| e.key.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            layout.service_key("db", "kept-b").as_str(),
            layout.service_key("db", "orphan-a").as_str()
        ],
        "the registrations of this prefix, and only them"
    );
    let orphan = listed
        .iter()
        .find(|e| e.key == layout.service_key("db", "orphan-a"))
        .map(|e| backend_core::ServiceRecord::from_json(&e.value).expect("a record"))
        .expect("listed");
    assert_eq!(
        (orphan.node_id.as_str(), orphan.ip, orphan.port),
        (a.node_id.as_str(), a.ip, a.port),
        "the node that owns it, so a resync may remove it"
    );
    later
        .unpublish(&[backend_core::ServiceKey {
            service: "db".into(),
            id: "orphan-a".into(),
        }])
        .await
        .expect("remove the orphan");
    let left: Vec<String> = later
        .list_services()
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(left, vec![layout.service_key("db", "kept-b")]);
}

#[tokio::test]
async fn an_unreachable_store_keeps_the_http_error_as_the_cause() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let s = store(&endpoint, unique_layout("consul-cause"));
    contract::an_unreachable_store_keeps_the_client_error_as_the_cause::<reqwest::Error, _>(
        &s, TTL,
    )
    .await;
}
