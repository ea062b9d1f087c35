//! What the in-memory store adds to the contract: expiry exactly on tokio's clock, and the
//! controls a test uses.

use std::time::Duration;

use backend_core::{
    BackendError, Coordinator, KeyLayout, Publisher, ServiceRecord, WatchEvent, Watcher,
};
use futures::StreamExt;

use crate::MemoryCluster;

const TTL: Duration = Duration::from_secs(10);

fn record(id: &str) -> ServiceRecord {
    test_support::contract::plain_record("db", id)
}

async fn next(
    watch: &mut futures::stream::BoxStream<'static, Result<WatchEvent, BackendError>>,
) -> Result<WatchEvent, BackendError> {
    watch.next().await.expect("the watch never ends")
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_session_not_renewed_ends_at_its_ttl_and_takes_its_records() {
    let layout = KeyLayout::new("t");
    let s = MemoryCluster::new().client(layout.clone());
    s.open_session(TTL).await.expect("session");
    s.publish(&[record("a")]).await.expect("publish");
    let mut watch = s.watch_prefix(layout.services_prefix());
    assert!(matches!(next(&mut watch).await, Ok(WatchEvent::Restarted(e)) if e.len() == 1));

    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        s.list_services().await.expect("list").len(),
        1,
        "alive before the TTL"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        next(&mut watch).await.expect("event"),
        WatchEvent::Deleted(layout.service_key("db", "a"))
    );
    assert!(s.list_services().await.expect("list").is_empty());
    let err = s.renew_session().await.expect_err("expired");
    assert!(matches!(err, BackendError::SessionLost { .. }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn renewals_keep_a_session_alive_past_its_ttl() {
    let s = MemoryCluster::new().client(KeyLayout::new("t"));
    s.open_session(TTL).await.expect("session");
    s.publish(&[record("a")]).await.expect("publish");
    for _ in 0..5 {
        tokio::time::advance(TTL / 2).await;
        s.renew_session().await.expect("renew");
    }
    assert_eq!(s.list_services().await.expect("list").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn injected_failures_are_transient_and_counted_per_call() {
    let s = MemoryCluster::named("10.9.8.7:2379").client(KeyLayout::new("t"));
    s.open_session(TTL).await.expect("session");
    s.cluster().fail_next(2);
    for _ in 0..2 {
        let err = s.publish(&[record("a")]).await.expect_err("injected");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("10.9.8.7:2379"), "{err}");
    }
    s.publish(&[record("a")])
        .await
        .expect("the third call goes through");
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_reports_it_and_lists_again() {
    let layout = KeyLayout::new("t");
    let s = MemoryCluster::new().client(layout.clone());
    s.open_session(TTL).await.expect("session");
    let mut watch = s.watch_prefix(layout.services_prefix());
    assert_eq!(
        next(&mut watch).await.expect("snapshot"),
        WatchEvent::Restarted(vec![])
    );
    s.cluster().break_watches();
    let err = next(&mut watch).await.expect_err("broken");
    assert!(err.is_transient(), "{err}");
    // A change while the watcher backs off is in the new list, not lost.
    s.publish(&[record("a")]).await.expect("publish");
    match next(&mut watch).await.expect("relist") {
        WatchEvent::Restarted(entries) => {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].key, layout.service_key("db", "a"));
        }
        other => panic!("expected a relist, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_record_taken_over_by_a_new_session_outlives_the_old_one() {
    let cluster = MemoryCluster::new();
    let layout = KeyLayout::new("t");
    let old = cluster.client(layout.clone());
    let new = cluster.client(layout.clone());
    old.open_session(TTL).await.expect("session");
    old.publish(&[record("a")]).await.expect("publish");
    new.open_session(TTL).await.expect("session");
    new.publish(&[record("a")]).await.expect("take over");
    let key = layout.service_key("db", "a");
    assert_eq!(cluster.holder_of(&key), new.session());
    old.expire_session_now();
    assert_eq!(
        cluster.holder_of(&key),
        new.session(),
        "still the new session's"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_survives_an_outage_shorter_than_its_ttl_and_loses_after_a_longer_one() {
    let cluster = MemoryCluster::new();
    let a = cluster.client(KeyLayout::new("t"));
    let mut leading = a
        .campaign("t/leader".into(), "a".into(), TTL)
        .await
        .expect("campaign");
    assert_eq!(cluster.get("t/leader"), Some(b"a".to_vec()));

    cluster.set_unavailable(true);
    tokio::time::advance(TTL / 2).await;
    cluster.set_unavailable(false);
    let lost = tokio::time::timeout(TTL * 3, leading.lost()).await;
    assert!(lost.is_err(), "renewed once the store was back");

    cluster.set_unavailable(true);
    let reason = tokio::time::timeout(TTL + Duration::from_millis(1), leading.lost())
        .await
        .expect("lost once the TTL ran out without a renewal");
    assert!(reason.contains("TTL"), "{reason}");
    assert_eq!(
        cluster.get("t/leader"),
        Some(b"a".to_vec()),
        "given up before the session can have expired"
    );
    tokio::time::sleep(TTL).await;
    cluster.set_unavailable(false);
    assert_eq!(
        cluster.get("t/leader"),
        None,
        "the key went with the session"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_leadership_frees_the_key_at_the_ttl_not_before() {
    let cluster = MemoryCluster::new();
    let a = cluster.client(KeyLayout::new("t"));
    let first = a
        .campaign("t/leader".into(), "a".into(), TTL)
        .await
        .expect("campaign");
    drop(first);
    tokio::time::advance(TTL - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(cluster.get("t/leader"), Some(b"a".to_vec()));
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(cluster.get("t/leader"), None);
    assert!(cluster.sessions().is_empty());
}
