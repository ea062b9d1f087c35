//! The bridge's timing with paused time: a [`FakeEngine`] and an in-memory store, so
//! renewals, session loss, repair backoff, resyncs and reconnects run in milliseconds on
//! tokio's clock. What only a real engine and store can show stays in `tests/bridge_*.rs`.

use std::sync::Arc;
use std::time::Duration;

use backend_core::{KeyLayout, ServiceRecord};
use backend_memory::{MemoryCluster, SessionId};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::container::ContainerInfo;
use crate::engine::fake::{web_container, FakeEngine};
use crate::engine::EventKind;
use crate::metrics::{CauseLabel, ResultLabel};

const TTL: Duration = Duration::from_secs(15);
const RESYNC: Duration = Duration::from_secs(60);

#[test]
fn rfc3339_dates() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_795_702_245), "2026-11-26T14:10:45Z");
}

/// A running bridge over a fake engine and an in-memory store, and the test's handles on both.
struct Running {
    engine: FakeEngine,
    store: MemoryCluster,
    layout: KeyLayout,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BridgeError>>,
}

fn config(deregister: Deregister) -> BridgeConfig {
    BridgeConfig {
        build: BuildOptions {
            internal: true,
            ..BuildOptions::default()
        },
        ttl: TTL,
        resync: RESYNC,
        retry_attempts: Some(3),
        retry_interval: Duration::from_secs(1),
        deregister,
        cleanup: false,
    }
}

impl Running {
    /// Starts a bridge on an engine that already runs `containers`, and waits until it is
    /// healthy (first sync done).
    async fn with(containers: &[&ContainerInfo], config: BridgeConfig) -> Running {
        let engine = FakeEngine::default();
        for c in containers {
            engine.add((*c).clone());
        }
        let store = MemoryCluster::new();
        let layout = KeyLayout::new("t");
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::default());
        let shutdown = CancellationToken::new();
        let bridge = Bridge::start_with(
            engine.clone(),
            store.client(layout.clone()),
            config,
            metrics.clone(),
            health.clone(),
            &shutdown,
        )
        .await
        .expect("the bridge starts")
        .expect("not shut down");
        let task = tokio::spawn(bridge.run(shutdown.clone()));
        let running = Running {
            engine,
            store,
            layout,
            metrics,
            health,
            shutdown,
            task,
        };
        running
            .until_healthy("the bridge is healthy", Duration::from_secs(1))
            .await;
        running
    }

    /// Waits until container `id` has a record in the store; returns how long it took.
    async fn until_held(&self, what: &str, id: &str, within: Duration) -> Duration {
        until(what, within, || self.has_record(id)).await
    }

    /// Waits until container `id` has no record in the store; returns how long it took.
    async fn until_gone(&self, what: &str, id: &str, within: Duration) -> Duration {
        until(what, within, || !self.has_record(id)).await
    }

    /// Starts container `c` on the engine and waits (1 s at most) until it is published.
    async fn start(&self, c: &ContainerInfo) {
        self.engine.start(c.clone());
        self.until_held("the record is published", &c.id, Duration::from_secs(1))
            .await;
    }

    /// Removes container `id` from the engine and waits (1 s at most) until its records go.
    async fn remove(&self, id: &str) {
        self.engine.remove(id);
        self.until_gone(
            "the record goes with the container",
            id,
            Duration::from_secs(1),
        )
        .await;
    }

    async fn until_healthy(&self, what: &str, within: Duration) {
        until(what, within, || self.health.check().is_ok()).await;
    }

    /// The records of container `id` in the store, with the session each is tied to.
    fn records_of(&self, id: &str) -> Vec<(ServiceRecord, Option<SessionId>)> {
        self.store
            .list(&self.layout.services_prefix())
            .into_iter()
            .filter_map(|e| {
                let r = ServiceRecord::from_json(&e.value).ok()?;
                (r.container_id == id).then(|| (r, self.store.holder_of(&e.key)))
            })
            .collect()
    }

    fn has_record(&self, id: &str) -> bool {
        !self.records_of(id).is_empty()
    }

    fn sync_failures(&self, cause: &'static str) -> u64 {
        self.metrics
            .sync_failures
            .get_or_create(&CauseLabel { cause })
            .get()
    }

    fn renewals(&self, result: &'static str) -> u64 {
        self.metrics
            .session_renewals
            .get_or_create(&ResultLabel { result })
            .get()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("the bridge task ends")
            .expect("the bridge stops cleanly");
    }
}

/// Waits on tokio's (paused) clock until `cond` holds, checking every millisecond; panics
/// after `within`. Returns how long it took.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < within,
            "{what}: not within {within:?} of tokio's clock"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn publishes_on_start_and_removes_on_destroy() {
    let r = Running::with(&[], config(Deregister::Always)).await;
    let web = web_container("web1", [172, 17, 0, 5]);
    r.start(&web).await;
    let (record, _) = &r.records_of(&web.id)[0];
    assert_eq!(
        (record.service.as_str(), record.ip.to_string(), record.port),
        ("web", "172.17.0.5".into(), 80)
    );
    r.remove(&web.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_session_is_renewed_every_third_of_the_ttl_and_outlives_it() {
    let web = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&web], config(Deregister::Always)).await;
    let session = r.store.sessions();
    assert_eq!(session.len(), 1, "one session: {session:?}");
    // Four TTLs: without renewals the store would have ended the session after one.
    tokio::time::sleep(TTL * 4).await;
    assert_eq!(r.store.sessions(), session, "the same session lives on");
    assert_eq!(r.records_of(&web.id)[0].1, Some(session[0]));
    // One renewal per TTL/3 (5 s): 12 in 60 s, give or take the tick at the boundary.
    let ok = r.renewals("ok");
    assert!((11..=12).contains(&ok), "{ok} renewals in 60 s");
    assert_eq!(r.metrics.sessions_opened.get(), 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_session_is_replaced_and_every_record_written_again() {
    let web = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&web], config(Deregister::Always)).await;
    let old = r.store.sessions()[0];
    // The store ends the session (the bridge was cut off for longer than the TTL): its records
    // go with it.
    r.store.expire_session(old);
    assert!(!r.has_record(&web.id));
    // The next renewal (at most TTL/3 later) finds it gone; a new session is opened and every
    // record written again under it, at once.
    let took = r.until_held("the record is back", &web.id, TTL).await;
    assert!(took <= TTL / 3, "back after {took:?}");
    let new = r.store.sessions();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new[0], old);
    assert_eq!(r.records_of(&web.id)[0].1, Some(new[0]));
    assert_eq!(r.renewals("lost"), 1);
    assert_eq!(r.metrics.sessions_opened.get(), 2);
    assert!(r.health.check().is_ok());
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_repaired_with_doubling_backoff() {
    let r = Running::with(&[], config(Deregister::Always)).await;
    // The publish after the event fails, and so do the first two repairs (their first call,
    // the list of the store): repairs wait 0.25-0.5 s, then 0.5-1 s, then 1-2 s.
    r.store.fail_next(3);
    let web = web_container("web1", [172, 17, 0, 5]);
    r.engine.start(web.clone());
    let took = r
        .until_held("the record is repaired", &web.id, Duration::from_secs(5))
        .await;
    assert!(
        (Duration::from_millis(1750)..=Duration::from_millis(3600)).contains(&took),
        "repaired after {took:?}"
    );
    let failed: u64 = ["publish", "list"]
        .iter()
        .map(|operation| {
            r.metrics
                .backend_errors
                .get_or_create(&crate::metrics::OperationLabel { operation })
                .get()
        })
        .sum();
    assert_eq!(failed, 3);
    // Every failed sync is counted (and logged by the same event), and so is every repair.
    assert_eq!(r.sync_failures("store"), 2);
    assert_eq!(r.metrics.repairs.get(), 3);
    // A success resets the backoff: the next failure is repaired within the first delay.
    r.store.fail_next(1);
    r.engine.remove(&web.id);
    let took = r
        .until_gone("the removal is repaired", &web.id, Duration::from_secs(5))
        .await;
    assert!(
        took <= Duration::from_millis(510),
        "repaired after {took:?}"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_resync_removes_records_no_container_backs() {
    let web = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&web], config(Deregister::Always)).await;
    let syncs = r.metrics.syncs.get();
    // The container goes without an event the bridge sees.
    r.engine.remove_quietly(&web.id);
    tokio::time::sleep(RESYNC - Duration::from_secs(1)).await;
    assert!(
        r.has_record(&web.id),
        "nothing removes it before the resync"
    );
    let took = r
        .until_gone("the resync removes it", &web.id, Duration::from_secs(2))
        .await;
    assert!(took <= Duration::from_secs(1) + Duration::from_millis(5));
    assert_eq!(r.metrics.syncs.get(), syncs + 1);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_broken_event_stream_is_reconnected_with_backoff_and_listed_again() {
    let gone = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&gone], config(Deregister::Always)).await;
    assert!(r.has_record(&gone.id));
    let lists = r.engine.lists();

    // The engine goes down; meanwhile a container goes and another comes, unseen.
    r.engine.set_down(true);
    until("unhealthy", Duration::from_secs(1), || {
        r.health.check().is_err()
    })
    .await;
    r.engine.remove_quietly(&gone.id);
    let new = web_container("web2", [172, 17, 0, 6]);
    r.engine.add(new.clone());
    // Reconnects back off from --retry-interval (1 s), doubling: 0.5-1 s, 1-2 s, 2-4 s, ...
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        r.engine.lists(),
        lists,
        "no list succeeds while the engine is down"
    );
    assert!(
        r.has_record(&gone.id),
        "records stay while the engine is away"
    );
    r.engine.set_down(false);
    // The next attempt (at most 8 s after the previous) lists again and repairs the store.
    r.until_healthy("healthy again", Duration::from_secs(9))
        .await;
    assert!(r.has_record(&new.id));
    assert!(!r.has_record(&gone.id));
    assert_eq!(r.engine.streams(), 1, "one event stream again");
    assert_eq!(r.metrics.docker_reconnects.get(), 1);
    // And it follows the engine's events again.
    r.remove(&new.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_ended_event_stream_is_reconnected() {
    let r = Running::with(&[], config(Deregister::Always)).await;
    // dockerd restarted: the stream ends, the engine answers again at once.
    r.engine.end_streams();
    until("reconnected", Duration::from_secs(2), || {
        r.health.check().is_ok() && r.engine.streams() == 1
    })
    .await;
    assert_eq!(r.metrics.docker_reconnects.get(), 1);
    let web = web_container("web1", [172, 17, 0, 5]);
    r.start(&web).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_success_keeps_the_records_of_a_failed_container_until_it_is_removed() {
    let failing = web_container("web1", [172, 17, 0, 5]);
    let fine = web_container("web2", [172, 17, 0, 6]);
    let r = Running::with(&[&failing, &fine], config(Deregister::OnSuccess)).await;
    r.engine.die(&failing.id, 1);
    r.engine.die(&fine.id, 0);
    r.until_gone(
        "the clean exit is removed",
        &fine.id,
        Duration::from_secs(1),
    )
    .await;
    assert!(r.has_record(&failing.id));
    // A resync keeps it too.
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert!(r.has_record(&failing.id));
    r.remove(&failing.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_success_keeps_a_failed_container_whose_die_event_comes_after_a_resync() {
    let failing = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&failing], config(Deregister::OnSuccess)).await;
    assert!(r.has_record(&failing.id));
    // The container has exited but its `die` event is late: a resync sees it stopped first.
    r.engine.exit_quietly(&failing.id, 3);
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert!(
        r.has_record(&failing.id),
        "a resync keeps a failed container's records"
    );
    r.engine.die(&failing.id, 3);
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert!(r.has_record(&failing.id), "and so does the late event");
    r.remove(&failing.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_success_keeps_a_failed_container_that_exits_while_a_resync_lists() {
    let failing = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&failing], config(Deregister::OnSuccess)).await;
    assert!(r.has_record(&failing.id));
    // The resync's list still names it running; its inspection finds it failed.
    r.engine.exit_after_next_list(&failing.id, 3);
    let lists = r.engine.lists();
    // The second list after it comes once the first resync is done.
    until("two resyncs", 2 * RESYNC + Duration::from_secs(1), || {
        r.engine.lists() > lists + 1
    })
    .await;
    assert!(
        r.has_record(&failing.id),
        "a resync that sees the exit between its list and its inspection keeps the records"
    );
    r.engine.die(&failing.id, 3);
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert!(r.has_record(&failing.id), "and so does the late die event");
    r.remove(&failing.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn on_success_keeps_a_failed_container_whose_die_event_comes_after_a_disconnect() {
    let failing = web_container("web1", [172, 17, 0, 5]);
    let r = Running::with(&[&failing], config(Deregister::OnSuccess)).await;
    assert!(r.has_record(&failing.id));
    // The engine takes the exited container off its networks before it reports `die`.
    r.engine.exit_quietly(&failing.id, 3);
    r.engine
        .send(&failing.id, "disconnect", EventKind::Refresh, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        r.has_record(&failing.id),
        "an event that finds the container failed keeps its records"
    );
    r.engine.die(&failing.id, 3);
    tokio::time::sleep(RESYNC + Duration::from_secs(1)).await;
    assert!(r.has_record(&failing.id), "and so does the late die event");
    r.remove(&failing.id).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_leaves_the_records_to_the_ttl_unless_cleanup() {
    for cleanup in [false, true] {
        let web = web_container("web1", [172, 17, 0, 5]);
        let config = BridgeConfig {
            cleanup,
            ..config(Deregister::Always)
        };
        let r = Running::with(&[&web], config).await;
        let (store, prefix) = (r.store.clone(), r.layout.services_prefix());
        let held = || store.list(&prefix).len();
        assert_eq!(held(), 1);
        r.stop().await;
        if cleanup {
            assert_eq!(held(), 0, "--cleanup removes them at once");
            assert!(store.sessions().is_empty(), "the session is revoked");
        } else {
            assert_eq!(held(), 1, "they stay for the next bridge on this node");
            tokio::time::sleep(TTL + Duration::from_millis(1)).await;
            assert_eq!(held(), 0, "and go with the TTL");
        }
    }
}

/// A store outage (or a failover) shorter than the TTL: a failed renewal is tried again after a
/// second, not a whole TTL/3 later, and once the store answers, the repair that was waiting out
/// its backoff runs at once, so the node's records are back within a second of the store.
#[tokio::test(start_paused = true)]
async fn the_store_back_renews_at_once_and_repairs_without_waiting_out_the_backoff() {
    const LONG_TTL: Duration = Duration::from_secs(60);
    let r = Running::with(
        &[],
        BridgeConfig {
            ttl: LONG_TTL,
            ..config(Deregister::Always)
        },
    )
    .await;
    // The first renewal (TTL/3 = 20 s) succeeds; then the store goes away for 19.5 s.
    until("the first renewal", LONG_TTL, || r.renewals("ok") == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    r.store.set_unavailable(true);
    let web = web_container("web1", [172, 17, 0, 5]);
    r.engine.start(web.clone());
    until("a renewal fails", LONG_TTL, || r.renewals("error") >= 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!r.has_record(&web.id));
    let repairs = r.metrics.repairs.get();
    assert!(repairs >= 4, "repairs backed off meanwhile: {repairs}");

    r.store.set_unavailable(false);
    until(
        "a renewal after the outage",
        Duration::from_millis(1100),
        || r.renewals("ok") == 2,
    )
    .await;
    r.until_held(
        "the record, once the store is back",
        &web.id,
        Duration::from_millis(1100),
    )
    .await;
    assert_eq!(r.metrics.sessions_opened.get(), 1, "the session was kept");
    r.stop().await;
}
