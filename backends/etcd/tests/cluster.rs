//! The etcd client on a 3-member cluster of real etcd processes on loopback: a watch and a
//! publisher keep working while the leader is killed, a member hangs (SIGSTOP) and a member is
//! restarted; the watch loses no event and reports nothing stale. How fast it leaves a hung
//! member is measured by `cargo bench -p backend-etcd --bench hung_member`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{Publisher, Watcher};
use backend_etcd::EtcdStore;
use common::{publish_within, put_elsewhere, watch_until, writer, View};
use test_support::contract::unique_layout;
use test_support::PrivateEtcdCluster;

#[tokio::test]
async fn watch_and_publish_survive_a_lost_a_hung_and_a_restarted_member() {
    let mut cluster = PrivateEtcdCluster::start(3).await;
    let layout = unique_layout("etcd-cluster");
    let prefix = layout.services_prefix();
    let store = EtcdStore::connect(&cluster.endpoints(), layout.clone())
        .await
        .expect("client");
    store
        .open_session(Duration::from_secs(30))
        .await
        .expect("a lease");
    let mut stream = store.watch_prefix(prefix.clone());
    let mut view = View::default();
    watch_until(&mut stream, &mut view, "the first list", |v| v.restarts > 0).await;

    // 1. The leader killed: a write through another member arrives, and a put through the
    // store succeeds.
    let leader = cluster.leader().await;
    cluster.kill(leader).await;
    let key = format!("{prefix}a/after-leader-lost");
    put_elsewhere(&cluster, &[leader], &key, "1").await;
    watch_until(
        &mut stream,
        &mut view,
        "the write after the leader was lost",
        |v| v.keys.contains_key(&key),
    )
    .await;
    let record = test_support::contract::record("a", "r1");
    publish_within(&store, &record).await;
    cluster.restart(leader).await;

    // 2. A member hangs (SIGSTOP), one at a time, each: the write made through the others
    // arrives, and the store's puts go through.
    for frozen in 0..3 {
        cluster.freeze(frozen).await;
        let key = format!("{prefix}a/while-{frozen}-hangs");
        put_elsewhere(&cluster, &[frozen], &key, "1").await;
        let took = watch_until(
            &mut stream,
            &mut view,
            "the write while a member hangs",
            |v| v.keys.contains_key(&key),
        )
        .await;
        eprintln!("member {frozen} hung: the watch saw the write after {took:?}");
        let took = publish_within(&store, &record).await;
        eprintln!("member {frozen} hung: a publish went through after {took:?}");
        store.renew_session().await.ok();
        cluster.thaw(frozen).await;
    }

    // 3. A member restarted: nothing lost, nothing stale.
    cluster.kill(1).await;
    let key = format!("{prefix}a/while-1-down");
    put_elsewhere(&cluster, &[1], &key, "1").await;
    cluster.restart(1).await;
    let deleted = format!("{prefix}a/after-leader-lost");
    put_elsewhere(&cluster, &[], &format!("{prefix}a/last"), "1").await;
    let mut c = writer(&cluster, cluster.leader().await).await;
    c.delete(deleted.as_str(), None).await.expect("delete");
    let (truth, _) = store.list_prefix(&prefix).await.expect("list");
    let truth: BTreeMap<String, Vec<u8>> = truth.into_iter().map(|e| (e.key, e.value)).collect();
    watch_until(
        &mut stream,
        &mut view,
        "the watch to match the store",
        |v| !v.keys.contains_key(&deleted) && v.keys.contains_key(&format!("{prefix}a/last")),
    )
    .await;
    assert_eq!(view.keys, truth, "the watch's view is the store's");
    assert!(store.renew_session().await.is_ok() || store.renew_session().await.is_ok());
}
