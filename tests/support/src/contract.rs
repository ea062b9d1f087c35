//! The contract every backend's [`Publisher`] and [`Watcher`] must keep, written once and run
//! by each backend crate's tests against its real store.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use backend_core::{
    BackendError, Coordinator, KeyLayout, KvEntry, Publisher, ServiceKey, ServiceRecord,
    WatchEvent, Watcher,
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
        labels: BTreeMap::from([("note".to_string(), "ünïcödé ✓".to_string())]),
        ..plain_record(service, id)
    }
}

/// A task record with no labels, at 10.0.0.1:27017 on node `node-a`.
pub fn plain_record(service: &str, id: &str) -> ServiceRecord {
    ServiceRecord {
        container_id: format!("c-{id}"),
        container_name: id.into(),
        node_id: "node-a".into(),
        hostname: "host-a".into(),
        task_id: Some(id.into()),
        task_slot: Some(1),
        ..ServiceRecord::new(service, id, "10.0.0.1".parse().expect("ip"), 27017)
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

/// Nothing listening: the error keeps the client library's error `E` as its cause, for a caller
/// to look at instead of parsing the message.
pub async fn an_unreachable_store_keeps_the_client_error_as_the_cause<E, S>(s: &S, ttl: Duration)
where
    E: std::error::Error + 'static,
    S: Publisher,
{
    let err = s.open_session(ttl).await.expect_err("nothing listens");
    let cause = std::error::Error::source(&err).expect("a cause");
    assert!(cause.downcast_ref::<E>().is_some(), "{cause:?}");
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
        container_id: format!("c{slot}"),
        container_name: format!("mongo.{slot}.task{slot}"),
        node_id: "node1".into(),
        hostname: "host1".into(),
        task_id: Some(format!("task{slot}")),
        task_slot: Some(slot),
        service_id: Some("svc".into()),
        ..ServiceRecord::new(
            "mongo",
            format!("task{slot}"),
            ip.parse().ok()?,
            port.parse().ok()?,
        )
    })
}

/// The contract's tests on the in-memory store, for a test file run with paused time: TTLs,
/// backoffs and the contract's timeouts all run on tokio's clock. `$client` makes a client of
/// a `backend_memory::MemoryCluster` for a layout: backend-memory runs the suite on its own
/// type, backend-store through its `Store` enum. The calling crate depends on backend-memory.
#[macro_export]
macro_rules! memory_suite {
    ($client:expr) => {
        use std::time::Duration;

        use backend_memory::MemoryCluster;
        use $crate::contract::{self, unique_layout};

        /// The TTLs the real suites use (etcd's; Consul's leader TTLs are 10 s).
        const TTL: Duration = Duration::from_secs(30);
        const LEADER_TTL: Duration = Duration::from_secs(2);

        /// The store taken away and brought back, as a private etcd or Consul is stopped and
        /// resumed.
        struct Down(MemoryCluster);

        impl contract::Outage for Down {
            async fn stop(&mut self) {
                self.0.set_unavailable(true);
            }
            async fn resume(&mut self) {
                self.0.set_unavailable(false);
            }
        }

        /// A cluster of its own and a layout of its own.
        fn fresh(tag: &str) -> (MemoryCluster, backend_core::KeyLayout) {
            (MemoryCluster::new(), unique_layout(tag))
        }

        #[tokio::test(start_paused = true)]
        async fn records_live_with_the_session_and_go_with_it() {
            let s = ($client)(&MemoryCluster::new(), unique_layout("memory-session"));
            contract::records_live_with_the_session_and_go_with_it(&s, TTL).await;
        }

        #[tokio::test(start_paused = true)]
        async fn a_lost_session_is_reported_and_a_new_one_can_be_opened() {
            let cluster = MemoryCluster::new();
            let s = ($client)(&cluster, unique_layout("memory-lost"));
            contract::a_lost_session_is_reported_and_a_new_one_can_be_opened(&s, TTL, async {
                cluster.expire_all_sessions()
            })
            .await;
        }

        #[tokio::test(start_paused = true)]
        async fn an_unreachable_store_is_a_transient_error() {
            let cluster = MemoryCluster::named(&format!("127.0.0.1:{}", $crate::free_port()));
            cluster.set_unavailable(true);
            let s = ($client)(&cluster, unique_layout("memory-down"));
            contract::an_unreachable_store_is_a_transient_error(&s, TTL).await;
        }

        #[tokio::test(start_paused = true)]
        async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
            let cluster = MemoryCluster::new();
            let s = ($client)(&cluster, unique_layout("memory-watch"));
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
            let (cluster, layout) = fresh("memory-elect");
            let a = ($client)(&cluster, layout.clone());
            let b = ($client)(&cluster, layout.clone());
            let key = layout.replset_leader_key("rs0");
            contract::one_leader_at_a_time_and_a_resign_hands_over(&a, &b, &key, LEADER_TTL).await;
        }

        #[tokio::test(start_paused = true)]
        async fn coordinator_a_dead_leader_is_replaced_after_its_ttl() {
            let (cluster, layout) = fresh("memory-dead");
            contract::a_dead_leader_is_replaced_after_its_ttl(
                &($client)(&cluster, layout.clone()),
                &($client)(&cluster, layout.clone()),
                &layout.replset_leader_key("rs0"),
                LEADER_TTL,
                Duration::from_secs(15),
            )
            .await;
        }

        #[tokio::test(start_paused = true)]
        async fn coordinator_a_leader_learns_that_it_lost() {
            let (cluster, layout) = fresh("memory-lost-leader");
            let a = ($client)(&cluster, layout.clone());
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
            let a = ($client)(&MemoryCluster::new(), layout.clone());
            contract::values_round_trip(&a, &layout.replset_uri_key("rs0")).await;
        }
    };
}

/// The contract's tests against a real store, for a backend crate's test file. The caller
/// names an `async fn(&str, KeyLayout)` that opens a client of the store at an endpoint
/// (`store`), the endpoint of the shared test service (`shared`), the private server type that
/// tests which end every session or take the store away start (`private`, an [`Outage`] with
/// `start()` and `endpoint()`), an `async fn(String)` that ends every session of the store at an
/// endpoint (`end_sessions`), a tag for the layouts, the session TTL, the leader TTL and how
/// long a dead leader may take to be replaced.
#[macro_export]
macro_rules! server_suite {
    (
        store: $store:path,
        shared: $shared:expr,
        private: $private:ty,
        end_sessions: $end:path,
        tag: $tag:literal,
        ttl: $ttl:expr,
        leader_ttl: $leader_ttl:expr,
        dead_leader_within: $within:expr $(,)?
    ) => {
        #[tokio::test]
        async fn records_live_with_the_session_and_go_with_it() {
            let layout = $crate::contract::unique_layout(concat!($tag, "-session"));
            let s = $store(&$shared, layout).await;
            $crate::contract::records_live_with_the_session_and_go_with_it(&s, $ttl).await;
        }

        #[tokio::test]
        async fn a_lost_session_is_reported_and_a_new_one_can_be_opened() {
            // A private store: ending every session of the shared one would disturb other
            // tests.
            let private = <$private>::start().await;
            let layout = $crate::contract::unique_layout(concat!($tag, "-lost"));
            let s = $store(&private.endpoint(), layout).await;
            $crate::contract::a_lost_session_is_reported_and_a_new_one_can_be_opened(
                &s,
                $ttl,
                $end(private.endpoint()),
            )
            .await;
        }

        #[tokio::test]
        async fn an_unreachable_store_is_a_transient_error() {
            let endpoint = format!("127.0.0.1:{}", $crate::free_port());
            let layout = $crate::contract::unique_layout(concat!($tag, "-down"));
            let s = $store(&endpoint, layout).await;
            $crate::contract::an_unreachable_store_is_a_transient_error(&s, $ttl).await;
        }

        #[tokio::test]
        async fn a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage() {
            let mut private = <$private>::start().await;
            let endpoint = private.endpoint();
            let layout = $crate::contract::unique_layout(concat!($tag, "-watch"));
            let s = $store(&endpoint, layout).await;
            $crate::contract::a_watch_gives_a_snapshot_then_changes_and_relists_after_an_outage(
                &s,
                $ttl,
                &mut private,
                || $end(endpoint.clone()),
            )
            .await;
        }

        #[tokio::test]
        async fn coordinator_one_leader_at_a_time_and_a_resign_hands_over() {
            let layout = $crate::contract::unique_layout(concat!($tag, "-elect"));
            let a = $store(&$shared, layout.clone()).await;
            let b = $store(&$shared, layout.clone()).await;
            let key = layout.replset_leader_key("rs0");
            $crate::contract::one_leader_at_a_time_and_a_resign_hands_over(
                &a,
                &b,
                &key,
                $leader_ttl,
            )
            .await;
        }

        #[tokio::test]
        async fn coordinator_a_dead_leader_is_replaced_after_its_ttl() {
            let layout = $crate::contract::unique_layout(concat!($tag, "-dead"));
            $crate::contract::a_dead_leader_is_replaced_after_its_ttl(
                &$store(&$shared, layout.clone()).await,
                &$store(&$shared, layout.clone()).await,
                &layout.replset_leader_key("rs0"),
                $leader_ttl,
                $within,
            )
            .await;
        }

        #[tokio::test]
        async fn coordinator_a_leader_learns_that_it_lost() {
            let private = <$private>::start().await;
            let layout = $crate::contract::unique_layout(concat!($tag, "-lost-leader"));
            let a = $store(&private.endpoint(), layout.clone()).await;
            $crate::contract::a_leader_learns_that_it_lost(
                &a,
                &layout.replset_leader_key("rs0"),
                $leader_ttl,
                $end(private.endpoint()),
            )
            .await;
        }

        #[tokio::test]
        async fn coordinator_values_round_trip() {
            let layout = $crate::contract::unique_layout(concat!($tag, "-values"));
            let a = $store(&$shared, layout.clone()).await;
            $crate::contract::values_round_trip(&a, &layout.replset_uri_key("rs0")).await;
        }
    };
}
