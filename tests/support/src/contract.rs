//! The contract every backend's [`Publisher`] and [`Watcher`] must keep, written once and run
//! by each backend crate's tests against its real store.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use backend_core::{
    BackendError, Coordinator, KeyLayout, KvEntry, Protocol, Publisher, ServiceKey, ServiceRecord,
    WatchEvent, Watcher, SCHEMA_VERSION,
};
use futures::stream::BoxStream;
use futures::StreamExt;

/// A store a test can take away and bring back.
pub trait Outage {
    fn stop(&mut self) -> impl Future<Output = ()>;
    fn resume(&mut self) -> impl Future<Output = ()>;
}

impl Outage for crate::PrivateEtcd {
    async fn stop(&mut self) {
        crate::PrivateEtcd::stop(self).await
    }
    async fn resume(&mut self) {
        crate::PrivateEtcd::resume(self).await
    }
}

impl Outage for crate::PrivateConsul {
    async fn stop(&mut self) {
        crate::PrivateConsul::stop(self).await
    }
    async fn resume(&mut self) {
        crate::PrivateConsul::resume(self).await
    }
}

/// A layout of its own for one test.
pub fn unique_layout(tag: &str) -> KeyLayout {
    KeyLayout::new(&format!("test/{tag}-{:08x}", rand::random::<u32>()))
}

/// A task record, with a non-ASCII label.
pub fn record(service: &str, id: &str) -> ServiceRecord {
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
        started_at: None,
    }
}

fn key(service: &str, id: &str) -> ServiceKey {
    ServiceKey {
        service: service.into(),
        id: id.into(),
    }
}

/// Writes need a session; records round-trip (300 of them, more than one transaction); a
/// record can be removed; closing the session with `revoke` removes the rest.
pub async fn records_live_with_the_session_and_go_with_it<S: Publisher>(s: &S, ttl: Duration) {
    assert!(matches!(
        s.publish(&[record("db", "x")]).await,
        Err(BackendError::NoSession { .. })
    ));
    s.open_session(ttl).await.expect("session");
    let records: Vec<ServiceRecord> = (0..300)
        .map(|i| record("db", &format!("t{i:03}")))
        .collect();
    s.publish(&records).await.expect("publish");
    let listed = s.list_services().await.expect("list");
    assert_eq!(listed.len(), 300);
    let mut back: Vec<ServiceRecord> = listed
        .iter()
        .map(|e| ServiceRecord::from_json(&e.value).expect("decodes"))
        .collect();
    back.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        back, records,
        "records round-trip, non-ASCII labels included"
    );

    s.unpublish(&[key("db", "t000")]).await.expect("unpublish");
    assert_eq!(s.list_services().await.expect("list").len(), 299);
    s.renew_session().await.expect("renew");
    s.close_session(true).await.expect("close");
    assert!(
        s.list_services().await.expect("list").is_empty(),
        "ending the session removes the records"
    );
}

/// When someone else ends the session, renewing says so; a new session can be opened.
pub async fn a_lost_session_is_reported_and_a_new_one_can_be_opened<S, F>(
    s: &S,
    ttl: Duration,
    end_sessions: F,
) where
    S: Publisher,
    F: Future<Output = ()>,
{
    s.open_session(ttl).await.expect("session");
    s.publish(&[record("db", "a")]).await.expect("publish");
    s.renew_session().await.expect("renew");
    end_sessions.await;
    let err = s.renew_session().await.expect_err("the session is gone");
    assert!(matches!(err, BackendError::SessionLost { .. }), "{err}");
    assert!(matches!(
        s.publish(&[record("db", "a")]).await,
        Err(BackendError::NoSession { .. })
    ));
    s.open_session(ttl).await.expect("a new session");
    s.publish(&[record("db", "a")])
        .await
        .expect("publish again");
    assert_eq!(s.list_services().await.expect("list").len(), 1);
    s.close_session(true).await.expect("close");
}

/// Nothing listening: a transient error that names the address.
pub async fn an_unreachable_store_is_a_transient_error<S: Publisher>(s: &S, ttl: Duration) {
    let err = s.open_session(ttl).await.expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("127.0.0.1"),
        "names the address: {err}"
    );
}

/// A watch starts with the snapshot, then follows puts and deletes; when the store goes away
/// it reports the error and, once the store is back, lists again; ending the session shows as
/// deletions.
pub async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage<S, O, F>(
    s: &S,
    ttl: Duration,
    outage: &mut O,
    end_sessions: impl Fn() -> F,
) where
    S: Publisher + Watcher,
    O: Outage,
    F: Future<Output = ()>,
{
    let layout = s.layout().clone();
    let k = |id: &str| layout.service_key("db", id);
    s.open_session(ttl).await.expect("session");
    s.publish(&[record("db", "a"), record("db", "b")])
        .await
        .expect("publish");

    let mut watch = s.watch_prefix(layout.services_prefix());
    let first = next(&mut watch).await;
    let WatchEvent::Restarted(entries) = first else {
        panic!("the first event is the snapshot, got {first:?}")
    };
    assert_eq!(keys(&entries), vec![k("a"), k("b")]);

    s.publish(&[record("db", "c")]).await.expect("publish");
    assert_eq!(
        next(&mut watch).await,
        WatchEvent::Put(KvEntry {
            key: k("c"),
            value: record("db", "c").to_json(),
        })
    );
    s.unpublish(&[key("db", "a")]).await.expect("unpublish");
    assert_eq!(next(&mut watch).await, WatchEvent::Deleted(k("a")));

    // The store goes away: the watch reports it, then lists again once it is back.
    outage.stop().await;
    let mut saw_error = false;
    let relisted = loop {
        let item = tokio::time::timeout(Duration::from_secs(90), watch.next())
            .await
            .expect("the watch yields within 90 s")
            .expect("the watch never ends");
        match item {
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                if !saw_error {
                    saw_error = true;
                    outage.resume().await;
                }
            }
            Ok(WatchEvent::Restarted(entries)) => {
                assert!(saw_error, "a relist follows an error");
                break entries;
            }
            Ok(other) => panic!("unexpected event during the outage: {other:?}"),
        }
    };
    // Whatever the store kept (etcd keeps its data; a Consul dev agent starts empty).
    let now = s.list_services().await.expect("list");
    assert_eq!(keys(&relisted), keys(&now));

    // A fresh session and record, then the session ends: the watch sees the deletions. A store
    // just back may refuse for a moment (a Consul agent not yet registered in its own catalog
    // answers 500 "Missing node registration"); callers retry transient errors, and so do we.
    crate::wait_for(
        "a session after the outage",
        Duration::from_secs(30),
        || async {
            match s.open_session(ttl).await {
                Ok(()) => Ok(()),
                Err(e) if e.is_transient() => Err(e.to_string()),
                Err(e) => panic!("not transient: {e}"),
            }
        },
    )
    .await;
    s.publish(&[record("db", "d")]).await.expect("publish");
    loop {
        match next(&mut watch).await {
            WatchEvent::Put(e) if e.key == k("d") => break,
            WatchEvent::Put(_) => {}
            other => panic!("expected the put of d, got {other:?}"),
        }
    }
    let held: Vec<String> = keys(&s.list_services().await.expect("list"));
    end_sessions().await;
    let mut deleted = Vec::new();
    while deleted.len() < held.len() {
        match next(&mut watch).await {
            WatchEvent::Deleted(k) => deleted.push(k),
            other => panic!("expected a deletion, got {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, held);
}

fn keys(entries: &[KvEntry]) -> Vec<String> {
    let mut k: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
    k.sort();
    k
}

async fn next(watch: &mut BoxStream<'static, Result<WatchEvent, BackendError>>) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("an event within 20 s")
        .expect("the watch never ends")
        .expect("no error")
}

// ---- Coordinator ----------------------------------------------------------------------------

/// Two candidates for one key: the first leads, the second waits; when the first resigns, the
/// second leads at once.
pub async fn one_leader_at_a_time_and_a_resign_hands_over<C: Coordinator>(
    a: &C,
    b: &C,
    key: &str,
    ttl: Duration,
) {
    let first = tokio::time::timeout(
        Duration::from_secs(20),
        a.campaign(key.into(), "a".into(), ttl),
    )
    .await
    .expect("an uncontested campaign wins at once")
    .expect("campaign");
    let second = b.campaign(key.into(), "b".into(), ttl);
    tokio::pin!(second);
    // While `a` leads (its lease or session is renewed), `b` must not lead, well past the TTL.
    let waited = tokio::time::timeout(ttl * 2 + Duration::from_secs(1), &mut second).await;
    assert!(waited.is_err(), "a second leader while the first is alive");
    let resigned_at = tokio::time::Instant::now();
    first.resign().await;
    let _second = tokio::time::timeout(Duration::from_secs(10), &mut second)
        .await
        .expect("the other candidate leads once the leader resigned")
        .expect("campaign");
    assert!(
        resigned_at.elapsed() < ttl,
        "took over by the resignation, not by the TTL: {:?}",
        resigned_at.elapsed()
    );
}

/// A leader that dies without resigning (the process is gone: nothing renews) is replaced
/// once its TTL runs out.
pub async fn a_dead_leader_is_replaced_after_its_ttl<C: Coordinator>(
    a: &C,
    b: &C,
    key: &str,
    ttl: Duration,
    bound: Duration,
) {
    let first = a
        .campaign(key.into(), "a".into(), ttl)
        .await
        .expect("campaign");
    drop(first);
    let died_at = tokio::time::Instant::now();
    let _second = tokio::time::timeout(bound, b.campaign(key.into(), "b".into(), ttl))
        .await
        .expect("the other candidate leads after the TTL")
        .expect("campaign");
    assert!(
        died_at.elapsed() >= ttl / 2,
        "took over before the dead leader's TTL could run out: {:?}",
        died_at.elapsed()
    );
}

/// A leader learns that its lease or session was ended by someone else.
pub async fn a_leader_learns_that_it_lost<C, F>(a: &C, key: &str, ttl: Duration, end_sessions: F)
where
    C: Coordinator,
    F: Future<Output = ()>,
{
    let mut leadership = a
        .campaign(key.into(), "a".into(), ttl)
        .await
        .expect("campaign");
    end_sessions.await;
    let reason = tokio::time::timeout(ttl * 2 + Duration::from_secs(5), leadership.lost())
        .await
        .expect("the loss is noticed within the TTL");
    assert!(!reason.is_empty());
}

/// Plain values round-trip.
pub async fn values_round_trip<C: Coordinator>(a: &C, key: &str) {
    assert_eq!(a.get_value(key).await.expect("get"), None);
    let uri = b"mongodb://10.0.0.1:27017,10.0.0.2:27017/?replicaSet=rs0".to_vec();
    a.put_value(key, uri.clone()).await.expect("put");
    assert_eq!(a.get_value(key).await.expect("get"), Some(uri));
}

/// The record the bridge writes for the task of service `mongo` in `slot` whose mongod listens
/// on `host` (`ip:port`); `None` when `host` is not `ip:port`.
pub fn mongo_task_record(slot: u64, host: &str) -> Option<ServiceRecord> {
    let (ip, port) = host.rsplit_once(':')?;
    Some(ServiceRecord {
        schema_version: SCHEMA_VERSION,
        service: "mongo".into(),
        id: format!("task{slot}"),
        ip: ip.parse().ok()?,
        port: port.parse().ok()?,
        protocol: Protocol::Tcp,
        tags: vec![],
        labels: BTreeMap::new(),
        attrs: BTreeMap::new(),
        container_id: format!("c{slot}"),
        container_name: format!("mongo.{slot}.task{slot}"),
        node_id: "node1".into(),
        hostname: "host1".into(),
        task_id: Some(format!("task{slot}")),
        task_slot: Some(slot),
        service_id: Some("svc".into()),
        stack: None,
        health: None,
        started_at: None,
    })
}
