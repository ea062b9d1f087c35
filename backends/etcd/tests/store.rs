//! The etcd backend against a real etcd: the shared one of the test services for most tests,
//! a private one for the tests that stop it.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{
    BackendError, KeyLayout, KvEntry, Protocol, Publisher, ServiceKey, ServiceRecord, WatchEvent,
    Watcher, SCHEMA_VERSION,
};
use backend_etcd::EtcdStore;
use futures::StreamExt;
use test_support::{free_port, PrivateEtcd};

fn shared_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

fn unique_layout(tag: &str) -> KeyLayout {
    KeyLayout::new(&format!("test/etcd-{tag}-{:08x}", rand::random::<u32>()))
}

fn record(service: &str, id: &str) -> ServiceRecord {
    ServiceRecord {
        schema_version: SCHEMA_VERSION,
        service: service.into(),
        id: id.into(),
        ip: "10.0.0.1".parse().expect("ip"),
        port: 27017,
        protocol: Protocol::Tcp,
        tags: vec![],
        labels: BTreeMap::from([("note".to_string(), "ünïcödé ✓".to_string())]),
        attrs: BTreeMap::new(),
        container_id: format!("c-{id}"),
        container_name: id.into(),
        node_id: "node-a".into(),
        hostname: "host-a".into(),
        task_id: Some(id.into()),
        task_slot: Some(1),
        service_id: None,
        stack: None,
        health: None,
    }
}

async fn store(endpoint: &str, layout: &KeyLayout) -> EtcdStore {
    EtcdStore::connect(&[endpoint.to_string()], layout.clone())
        .await
        .expect("client")
}

async fn count(store: &EtcdStore, layout: &KeyLayout) -> usize {
    store
        .list_prefix(&format!("{}/", layout.prefix()))
        .await
        .expect("list")
        .0
        .len()
}

#[tokio::test]
async fn records_live_with_the_session_and_go_with_it() {
    let layout = unique_layout("session");
    let s = store(&shared_endpoint(), &layout).await;
    assert!(matches!(
        s.publish(&[record("db", "x")]).await,
        Err(BackendError::NoSession { .. })
    ));
    s.open_session(Duration::from_secs(30))
        .await
        .expect("lease");
    // More than one transaction's worth, to exercise the batching.
    let records: Vec<ServiceRecord> = (0..300)
        .map(|i| record("db", &format!("t{i:03}")))
        .collect();
    s.publish(&records).await.expect("publish");
    let listed = s.list_services().await.expect("list");
    assert_eq!(listed.len(), 300);
    let back = ServiceRecord::from_json(&listed[0].value).expect("decodes");
    assert_eq!(back, records[0], "non-ASCII labels round-trip");

    s.unpublish(&[ServiceKey {
        service: "db".into(),
        id: "t000".into(),
    }])
    .await
    .expect("unpublish");
    assert_eq!(s.list_services().await.expect("list").len(), 299);

    s.renew_session().await.expect("renew");
    s.close_session(true).await.expect("revoke");
    assert_eq!(
        count(&s, &layout).await,
        0,
        "revoking the lease removes the records"
    );
}

#[tokio::test]
async fn a_revoked_lease_is_reported_as_lost_and_a_new_one_can_be_opened() {
    let layout = unique_layout("lost");
    let s = store(&shared_endpoint(), &layout).await;
    s.open_session(Duration::from_secs(30))
        .await
        .expect("lease");
    s.publish(&[record("db", "a")]).await.expect("publish");
    s.renew_session().await.expect("renew");

    // Someone else revokes every lease that holds our keys.
    let mut client = s.client();
    let resp = client
        .get(layout.service_key("db", "a"), None)
        .await
        .expect("get");
    let lease = resp.kvs()[0].lease();
    client.lease_revoke(lease).await.expect("revoke");

    let err = s.renew_session().await.expect_err("lease is gone");
    assert!(matches!(err, BackendError::SessionLost { .. }), "{err}");
    assert!(matches!(
        s.publish(&[record("db", "a")]).await,
        Err(BackendError::NoSession { .. })
    ));
    s.open_session(Duration::from_secs(30))
        .await
        .expect("new lease");
    s.publish(&[record("db", "a")])
        .await
        .expect("publish again");
    assert_eq!(count(&s, &layout).await, 1);
    s.close_session(true).await.expect("revoke");
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_transient_error() {
    let layout = unique_layout("down");
    let s = store(&format!("127.0.0.1:{}", free_port()), &layout).await;
    let err = s
        .open_session(Duration::from_secs(10))
        .await
        .expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1"),
        "names the address: {err}"
    );
}

#[tokio::test]
async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
    let mut etcd = PrivateEtcd::start().await;
    let layout = unique_layout("watch");
    let s = store(&etcd.endpoint(), &layout).await;
    s.open_session(Duration::from_secs(30))
        .await
        .expect("lease");
    s.publish(&[record("db", "a"), record("db", "b")])
        .await
        .expect("publish");

    let mut watch = s.watch_prefix(layout.services_prefix());
    let first = next(&mut watch).await;
    let WatchEvent::Restarted(entries) = first else {
        panic!("the first event is the snapshot, got {first:?}")
    };
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![layout.service_key("db", "a"), layout.service_key("db", "b")]
    );

    s.publish(&[record("db", "c")]).await.expect("publish");
    assert_eq!(
        next(&mut watch).await,
        WatchEvent::Put(KvEntry {
            key: layout.service_key("db", "c"),
            value: record("db", "c").to_json(),
        })
    );
    s.unpublish(&[ServiceKey {
        service: "db".into(),
        id: "a".into(),
    }])
    .await
    .expect("unpublish");
    assert_eq!(
        next(&mut watch).await,
        WatchEvent::Deleted(layout.service_key("db", "a"))
    );

    // etcd goes away: the watch reports the error, then lists again once etcd is back.
    etcd.stop().await;
    let mut saw_error = false;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("the watch yields within a minute")
            .expect("the watch never ends");
        match item {
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                if !saw_error {
                    saw_error = true;
                    etcd.resume().await;
                }
            }
            Ok(WatchEvent::Restarted(entries)) => {
                assert!(saw_error, "a relist follows an error");
                let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
                assert_eq!(
                    keys,
                    vec![layout.service_key("db", "b"), layout.service_key("db", "c")]
                );
                break;
            }
            Ok(other) => panic!("unexpected event during the outage: {other:?}"),
        }
    }

    // Expiring the lease deletes the records, which the watch reports.
    let mut client = s.client();
    for lease in client.leases().await.expect("leases").leases() {
        client.lease_revoke(lease.id()).await.expect("revoke");
    }
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next(&mut watch).await {
            WatchEvent::Deleted(k) => deleted.push(k),
            other => panic!("expected a deletion, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(
        deleted,
        vec![layout.service_key("db", "b"), layout.service_key("db", "c")]
    );
}

async fn next(
    watch: &mut futures::stream::BoxStream<'static, Result<WatchEvent, BackendError>>,
) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch never ends")
        .expect("no error")
}
