//! The controller's timing, with paused time (`tokio::time::pause`): removal grace,
//! `--force-after`, debounce, leadership loss and fencing. The store is backend-memory's
//! in-memory store (sessions, watches and elections on tokio's clock); the MongoDB side is
//! [`FakeSet`], a small fake of the reconciler's [`ReplSetClient`] that answers from a config
//! and a set of members that are down and installs whatever step it is given. What the real
//! server does with a step is the scenarios' business (tests/scenarios, against the
//! simulator); here only *when* the controller acts is tested. Assertions are on the
//! controller's metrics and on the steps the fake received, never on log lines.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend_core::{
    Coordinator, Fence, FenceToken, KeyLayout, LeaseDeadline, Publisher, ReplSetStatus, ServiceKey,
    Watcher, LEASE_SAFETY_MARGIN,
};
use backend_memory::{MemoryCluster, MemoryStore};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use replset_reconciler::metrics::{Metrics, ReasonLabels, SetLabels, StepLabels};
use replset_reconciler::model::{majority, MemberState};
use replset_reconciler::mongo::{MongoError, Observed, ReplSetClient};
use replset_reconciler::records::Selector;
use replset_reconciler::{
    reconcile, Change, ConfigView, Context, Controller, ControllerConfig, MemberConfig,
    MemberStatus, Observation, ReconcileError, Records, SetState, Step,
};
use test_support::contract::mongo_task_record;
use tokio_util::sync::CancellationToken;

const SET: &str = "rs0";

fn host(id: i64) -> String {
    format!("10.0.0.{id}:27017")
}

/// A replica set as the reconciler sees it: a config, the members that are down, and the
/// steps it was given.
#[derive(Debug)]
struct FakeSet {
    state: Mutex<FakeState>,
}

#[derive(Debug)]
struct FakeState {
    config: ConfigView,
    down: BTreeSet<i64>,
    /// No member answers at all: the observation has no config.
    unreachable: bool,
    applied: Vec<Step>,
    observations: usize,
}

impl FakeSet {
    /// An initiated set of `n` voting members, all up.
    fn voting(n: i64) -> Arc<FakeSet> {
        let members = (1..=n)
            .map(|id| MemberConfig {
                votes: 1,
                priority: 1.0,
                ..MemberConfig::new_non_voter(id, &host(id))
            })
            .collect();
        Arc::new(FakeSet {
            state: Mutex::new(FakeState {
                config: ConfigView {
                    set_name: SET.into(),
                    version: 1,
                    term: 1,
                    replica_set_id: None,
                    members,
                },
                down: BTreeSet::new(),
                unreachable: false,
                applied: Vec::new(),
                observations: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake set")
    }

    fn stop(&self, id: i64) {
        self.lock().down.insert(id);
    }

    fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    fn applied(&self) -> Vec<Step> {
        self.lock().applied.clone()
    }

    fn observations(&self) -> usize {
        self.lock().observations
    }
}

impl ReplSetClient for FakeSet {
    async fn observe(&self, set_name: &str, _hosts: &[String], desired: &[String]) -> Observed {
        let mut s = self.lock();
        s.observations += 1;
        if s.unreachable {
            return Observed::default();
        }
        let up = |id: i64| !s.down.contains(&id);
        let voters: Vec<i64> = s.config.voters().map(|m| m.id).collect();
        let healthy_voters = voters.iter().filter(|&&id| up(id)).count();
        // The lowest voter that is up leads, while a majority of the voters is up.
        let primary = (healthy_voters >= majority(voters.len()))
            .then(|| voters.iter().copied().find(|&id| up(id)))
            .flatten();
        let mut observation = Observation {
            committed: primary.is_some(),
            primary,
            config: Some(s.config.clone()),
            ..Default::default()
        };
        for m in &s.config.members {
            let state = if !up(m.id) {
                MemberState::Down
            } else if Some(m.id) == primary {
                MemberState::Primary
            } else {
                MemberState::Secondary
            };
            observation.status.insert(
                m.id,
                MemberStatus {
                    healthy: up(m.id),
                    state,
                },
            );
            if up(m.id) && desired.contains(&m.host) {
                observation
                    .hello
                    .insert(m.host.clone(), Some(set_name.to_string()));
            }
        }
        Observed {
            primary_host: primary.map(host),
            observation,
            ..Observed::default()
        }
    }

    async fn apply(
        &self,
        _set_name: &str,
        step: &Step,
        _observed: &Observed,
    ) -> Result<(), MongoError> {
        let mut s = self.lock();
        s.applied.push(step.clone());
        if let Step::Reconfig { config, .. } | Step::ForceReconfig { config, .. } = step {
            s.config = config.clone();
        }
        Ok(())
    }
}

/// A reconciler (the library's controller) on the in-memory store, and a bridge publishing
/// records there.
struct Rig {
    set: Arc<FakeSet>,
    metrics: Arc<Metrics>,
    cluster: MemoryCluster,
    bridge: MemoryStore,
    layout: KeyLayout,
    shutdown: CancellationToken,
    stopped: tokio::task::JoinHandle<()>,
}

/// The settings of the reconciler under test: the binary's defaults.
fn config(layout: &KeyLayout, holder: &str, force_after: Option<Duration>) -> ControllerConfig {
    ControllerConfig {
        layout: layout.clone(),
        selectors: vec![Selector::Service {
            service: "mongo".into(),
            set: SET.into(),
            port: None,
        }],
        removal_grace: Duration::from_secs(30),
        debounce: Duration::from_secs(1),
        resync: Duration::from_secs(15),
        leader_ttl: Duration::from_secs(15),
        holder: holder.into(),
        dry_run: false,
        metrics: Arc::new(Metrics::default()),
        force_after,
    }
}

fn start(
    cluster: &MemoryCluster,
    layout: &KeyLayout,
    set: Arc<FakeSet>,
    config: ControllerConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let store = Arc::new(cluster.client(layout.clone()));
    let controller = Controller::start(store, set, config, shutdown.clone());
    (shutdown, tokio::spawn(controller.run()))
}

/// A bridge's publisher on `cluster` with the records of members 1 to 3.
async fn bridge_of_three(cluster: &MemoryCluster, layout: &KeyLayout) -> MemoryStore {
    let bridge = cluster.client(layout.clone());
    // Longer than any test: the bridge's renewals are not what is tested here.
    bridge
        .open_session(Duration::from_secs(24 * 3600))
        .await
        .expect("session");
    for id in 1..=3 {
        publish(&bridge, id).await;
    }
    bridge
}

async fn publish(bridge: &MemoryStore, id: i64) {
    let record = mongo_task_record(id as u64, &host(id)).expect("record");
    bridge.publish(&[record]).await.expect("publish");
}

impl Rig {
    /// A set of 3 voting members with their records, and one reconciler with `config`.
    async fn new(set: Arc<FakeSet>, config: ControllerConfig) -> Rig {
        let layout = config.layout.clone();
        let metrics = config.metrics.clone();
        let cluster = MemoryCluster::new();
        let bridge = bridge_of_three(&cluster, &layout).await;
        let (shutdown, stopped) = start(&cluster, &layout, set.clone(), config);
        Rig {
            set,
            metrics,
            cluster,
            bridge,
            layout,
            shutdown,
            stopped,
        }
    }

    /// [`Rig::new`] on 3 voting members, with `force_after`, once converged with 3.
    async fn converged(force_after: Option<Duration>) -> Rig {
        let config = config(&KeyLayout::new("paused"), "a", force_after);
        let rig = Rig::new(FakeSet::voting(3), config).await;
        rig.converged_with(3).await;
        rig
    }

    async fn publish(&self, id: i64) {
        publish(&self.bridge, id).await;
    }

    async fn unpublish(&self, id: i64) {
        let key = ServiceKey {
            service: "mongo".into(),
            id: format!("task{id}"),
        };
        self.bridge.unpublish(&[key]).await.expect("unpublish");
    }

    fn status(&self) -> Option<ReplSetStatus> {
        self.cluster
            .get(&self.layout.replset_status_key(SET))
            .and_then(|v| ReplSetStatus::from_json(&v).ok())
    }

    /// Waits (on the paused clock) until the published status says converged with `n`.
    async fn converged_with(&self, n: usize) {
        for _ in 0..600 {
            if self.status().is_some_and(|s| s.converged_with(n)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not converged with {n}: {:?}", self.status());
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.stopped.await.expect("the controller stopped");
    }
}

fn applied(metrics: &Metrics, step: &'static str) -> u64 {
    let labels = StepLabels {
        set: SET.into(),
        step,
    };
    metrics.steps_applied.get_or_create(&labels).get()
}

/// The count of a family by reason (`metrics.waits`, `metrics.blocked`) for the set.
fn by_reason(family: &Family<ReasonLabels, Counter>, reason: &'static str) -> u64 {
    let labels = ReasonLabels {
        set: SET.into(),
        reason,
    };
    family.get_or_create(&labels).get()
}

fn removals(set: &FakeSet) -> Vec<i64> {
    set.applied()
        .iter()
        .filter_map(|s| match s {
            Step::Reconfig {
                change: Change::Remove { id, .. },
                ..
            } => Some(*id),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_down_member_is_removed_only_after_its_record_has_been_gone_for_the_grace() {
    let rig = Rig::converged(None).await;
    let (set, metrics) = (&rig.set, &rig.metrics);
    assert!(set.applied().is_empty(), "{:?}", set.applied());

    // Member 3 stops and its record goes.
    set.stop(3);
    rig.unpublish(3).await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(removals(set), Vec::<i64>::new(), "removed within the grace");
    assert_eq!(applied(metrics, "remove"), 0);
    assert!(by_reason(&metrics.waits, "removal_grace") > 0);

    // The grace (30 s, counted from the first reconcile after the record went) runs out.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(removals(set), vec![3]);
    assert_eq!(applied(metrics, "remove"), 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_record_that_comes_back_within_the_grace_keeps_its_member() {
    let rig = Rig::converged(None).await;
    let (set, metrics) = (&rig.set, &rig.metrics);
    set.stop(3);
    rig.unpublish(3).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    rig.publish(3).await;
    // Long past the grace: the clock started again when the record came back.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(removals(set), Vec::<i64>::new());
    assert_eq!(applied(metrics, "remove"), 0);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lost_majority_is_forced_only_with_allow_force_and_after_force_after() {
    for force_after in [Some(Duration::from_secs(120)), None] {
        let rig = Rig::converged(force_after).await;
        let (set, metrics) = (&rig.set, &rig.metrics);
        // Two of three voters stop; their records stay (swarm would restart them). Nothing
        // changes in the store, so the loss is noticed at the next resync (15 s) at the latest.
        set.stop(2);
        set.stop(3);
        tokio::time::sleep(Duration::from_secs(100)).await;
        let blocked = by_reason(&metrics.blocked, "lost_majority");
        assert!(blocked > 0, "{force_after:?}");
        assert_eq!(applied(metrics, "force_reconfig"), 0, "{force_after:?}");
        assert!(rig
            .status()
            .is_some_and(|s| s.next.reason == "lost_majority"));

        // 120 s after it was noticed.
        tokio::time::sleep(Duration::from_secs(40)).await;
        let forced: Vec<Vec<i64>> = set
            .applied()
            .iter()
            .filter_map(|s| match s {
                Step::ForceReconfig { dropped, .. } => Some(dropped.clone()),
                _ => None,
            })
            .collect();
        match force_after {
            Some(_) => {
                assert_eq!(forced, vec![vec![2, 3]]);
                assert_eq!(applied(metrics, "force_reconfig"), 1);
            }
            None => {
                // Without --allow-force, never, however long the loss lasts.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                assert!(set.applied().is_empty(), "{:?}", set.applied());
            }
        }
        rig.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn records_are_followed_only_once_they_have_been_quiet_for_the_debounce() {
    let rig = Rig::converged(None).await;
    let (set, metrics) = (&rig.set, &rig.metrics);
    let observed = set.observations();
    // A burst of writes, 500 ms apart for 5 s (a bridge's resync rewriting its records).
    for _ in 0..10 {
        rig.publish(4).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(set.observations(), observed, "observed during the burst");
    assert_eq!(applied(metrics, "add"), 0);
    // Quiet for a whole debounce period (1 s; the first one that starts after the last write
    // ends by 2 s after it): the new member is added, once.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(applied(metrics, "add"), 1);
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_loses_its_lease_stops_acting_and_the_other_takes_over() {
    let set = FakeSet::voting(3);
    let layout = KeyLayout::new("paused");
    let config_a = config(&layout, "a", None);
    let metrics_a = config_a.metrics.clone();
    let rig = Rig::new(set.clone(), config_a).await;
    rig.converged_with(3).await;
    let config_b = config(&layout, "b", None);
    let metrics_b = config_b.metrics.clone();
    let (shutdown_b, stopped_b) = start(&rig.cluster, &layout, set.clone(), config_b);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let of_set = |family: &Family<SetLabels, Counter>| {
        family.get_or_create(&SetLabels { set: SET.into() }).get()
    };
    let leads = |m: &Metrics| of_set(&m.leadership_gained);
    let lost = |m: &Metrics| of_set(&m.leadership_lost);
    assert_eq!((leads(&metrics_a), leads(&metrics_b)), (1, 0));

    // The store ends a's session (its lease expired): a stops, b leads.
    let key = layout.replset_leader_key(SET);
    let session = rig.cluster.holder_of(&key).expect("a holds the leader key");
    rig.cluster.expire_session(session);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lost(&metrics_a), 1);
    assert_eq!(leads(&metrics_b), 1);

    // A new member: only the leader, b, adds it.
    rig.publish(4).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(applied(&metrics_b, "add"), 1);
    assert_eq!(applied(&metrics_a, "add"), 0);
    assert_eq!(leads(&metrics_a), 1, "a campaigns again but must wait");

    shutdown_b.cancel();
    stopped_b.await.expect("b stopped");
    rig.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_resigns_and_stops_everything_the_controller_started() {
    let set = FakeSet::voting(3);
    let layout = KeyLayout::new("paused");
    let cluster = MemoryCluster::new();
    let _bridge = bridge_of_three(&cluster, &layout).await;
    let shutdown = CancellationToken::new();
    let controller = Controller::start(
        Arc::new(cluster.client(layout.clone())),
        set,
        config(&layout, "a", None),
        shutdown.clone(),
    );
    let ops = controller
        .serve_ops("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("ops server");
    let stopped = tokio::spawn(controller.run());
    let key = layout.replset_leader_key(SET);
    for _ in 0..100 {
        if cluster.holder_of(&key).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.holder_of(&key).is_some(), "a leader");
    assert!(tokio::net::TcpStream::connect(ops).await.is_ok());

    shutdown.cancel();
    stopped.await.expect("run returns once everything stopped");
    // Resigned at once (not left to the TTL), and the ops server is closed.
    assert_eq!(cluster.holder_of(&key), None);
    assert!(tokio::net::TcpStream::connect(ops).await.is_err());
}

/// The leader's lease TTL in the fencing tests (the binary's default).
const FENCE_TTL: Duration = Duration::from_secs(15);

/// The records of members `ids` (slot = id), as the watch would deliver them.
fn records_of(layout: &KeyLayout, ids: impl IntoIterator<Item = i64>) -> Records {
    let entries = ids
        .into_iter()
        .map(|id| {
            let r = mongo_task_record(id as u64, &host(id)).expect("record");
            (layout.service_key(&r.service, &r.id), r.to_json())
        })
        .collect();
    Records {
        entries,
        trusted: true,
        generation: 1,
    }
}

fn of_set(family: &Family<SetLabels, Counter>) -> u64 {
    family.get_or_create(&SetLabels { set: SET.into() }).get()
}

/// Fencing (safety rule 12), the time side: with the leader key still held, but less time
/// surely left on the lease than one step can take (no renewal got through, say the process
/// was paused), the step is withheld; once the lease is renewed, the same step is sent.
#[tokio::test(start_paused = true)]
async fn a_step_is_withheld_while_the_lease_has_less_time_left_than_a_step_can_take() {
    let layout = KeyLayout::new("paused-withheld");
    let cluster = MemoryCluster::new();
    let store = Arc::new(cluster.client(layout.clone()));
    let key = layout.replset_leader_key(SET);
    let leadership = store
        .campaign(key.clone(), "a".into(), FENCE_TTL)
        .await
        .expect("a leads");
    // The lease as this process knows it, granted now and not renewed since (the store's
    // session is renewed meanwhile: the key stays held, only the time runs out).
    let deadline = LeaseDeadline::new(tokio::time::Instant::now(), FENCE_TTL);
    let fence = Fence {
        deadline: deadline.clone(),
        ..leadership.fence().clone()
    };
    let set = FakeSet::voting(3);
    let config = config(&layout, "a", None);
    let metrics = config.metrics.clone();
    let ctx = Context {
        store,
        members: set.clone(),
        config,
    };
    // Member 4 has a record: the plan is to add it.
    let records = records_of(&layout, 1..=4);
    let mut state = SetState::new(SET);

    // A millisecond less left than a step can take.
    let step_timeout = set.step_timeout();
    tokio::time::sleep(FENCE_TTL - LEASE_SAFETY_MARGIN - step_timeout + Duration::from_millis(1))
        .await;
    assert!(fence.valid_for() < step_timeout, "{:?}", fence.valid_for());
    reconcile(&mut state, &records, &ctx, Some(&fence))
        .await
        .expect("a reconcile that withholds its step is not an error");
    assert_eq!(of_set(&metrics.steps_withheld), 1);
    assert!(set.applied().is_empty(), "sent: {:?}", set.applied());
    assert_eq!(applied(&metrics, "add"), 0);
    assert_eq!(holder(&cluster, &key), store_session(&leadership));

    // Renewed: a whole TTL ahead, the same step goes out.
    deadline.renewed(tokio::time::Instant::now());
    reconcile(&mut state, &records, &ctx, Some(&fence))
        .await
        .expect("the step is sent");
    assert_eq!(applied(&metrics, "add"), 1);
    assert_eq!(set.applied().len(), 1, "{:?}", set.applied());
    assert_eq!(of_set(&metrics.steps_withheld), 1);
    assert_eq!(of_set(&metrics.writes_fenced), 0);
    leadership.resign().await;
}

/// The session in a leadership's fence (the in-memory store's token).
fn store_session(leadership: &backend_core::Leadership) -> Option<String> {
    match &leadership.fence().token {
        FenceToken::Session(id) => Some(id.clone()),
        FenceToken::CreateRevision(_) => None,
    }
}

/// The session that holds `key` now.
fn holder(cluster: &MemoryCluster, key: &str) -> Option<String> {
    cluster.holder_of(key).map(|id| id.to_string())
}

/// Fencing, the store side: a leader whose lease expired while it was not running (paused,
/// SIGSTOP) and that has not noticed yet writes as leader; the store refuses each write (the
/// leader key is another's now), the reconcile says so ([`ReconcileError::Fenced`]: stop
/// acting), no step is sent, and nothing under the set's keys changes: the new leader's
/// connection string and status stay.
#[tokio::test(start_paused = true)]
async fn a_write_after_the_lease_expired_is_fenced_and_leaves_the_store_unchanged() {
    let layout = KeyLayout::new("paused-fenced");
    let cluster = MemoryCluster::new();
    let key = layout.replset_leader_key(SET);
    let store_a = Arc::new(cluster.client(layout.clone()));
    let leadership_a = store_a
        .campaign(key.clone(), "a".into(), FENCE_TTL)
        .await
        .expect("a leads");
    // a stops: nothing renews its session (its renewal task is gone; its fence is all that is
    // left), and the store ends the session after the TTL.
    let fence_a = leadership_a.fence().clone();
    drop(leadership_a);
    tokio::time::sleep(FENCE_TTL + Duration::from_secs(1)).await;
    assert_eq!(holder(&cluster, &key), None, "a's session expired");

    // b leads and publishes the set's outputs.
    let set = FakeSet::voting(3);
    let store_b = Arc::new(cluster.client(layout.clone()));
    let leadership_b = store_b
        .campaign(key.clone(), "b".into(), FENCE_TTL)
        .await
        .expect("b leads");
    let config_b = config(&layout, "b", None);
    let ctx_b = Context {
        store: store_b.clone(),
        members: set.clone(),
        config: config_b,
    };
    reconcile(
        &mut SetState::new(SET),
        &records_of(&layout, 1..=3),
        &ctx_b,
        Some(leadership_b.fence()),
    )
    .await
    .expect("b publishes");
    let outputs = [
        layout.replset_uri_key(SET),
        layout.replset_status_key(SET),
        layout.replset_identity_key(SET),
    ];
    let before: Vec<Option<Vec<u8>>> = outputs.iter().map(|k| cluster.get(k)).collect();
    assert!(before[0].is_some() && before[1].is_some(), "b published");

    // Every write from now on, even one of the same bytes.
    let mut writes = store_b.watch_prefix(format!("{}/replsets/{SET}/", layout.prefix()));
    assert!(matches!(
        writes.next().await,
        Some(Ok(backend_core::WatchEvent::Restarted(_)))
    ));

    // a runs again with what it knew: its records (member 4 published since, it thinks) and
    // its old fence.
    let config_a = config(&layout, "a", None);
    let metrics_a = config_a.metrics.clone();
    let ctx_a = Context {
        store: store_a,
        members: set.clone(),
        config: config_a,
    };
    let outcome = reconcile(
        &mut SetState::new(SET),
        &records_of(&layout, 1..=4),
        &ctx_a,
        Some(&fence_a),
    )
    .await;
    assert!(
        matches!(outcome, Err(ReconcileError::Fenced { .. })),
        "{outcome:?}"
    );
    assert_eq!(of_set(&metrics_a.writes_fenced), 1);
    assert_eq!(
        of_set(&metrics_a.steps_withheld),
        1,
        "its lease had no time left"
    );
    assert!(set.applied().is_empty(), "sent: {:?}", set.applied());
    let after: Vec<Option<Vec<u8>>> = outputs.iter().map(|k| cluster.get(k)).collect();
    assert_eq!(after, before);
    let written = tokio::time::timeout(Duration::from_secs(1), writes.next()).await;
    assert!(written.is_err(), "a wrote: {written:?}");
    assert_eq!(holder(&cluster, &key), store_session(&leadership_b));
    leadership_b.resign().await;
}

#[tokio::test(start_paused = true)]
async fn a_dry_run_never_campaigns_writes_or_applies_and_leaves_the_set_to_the_leader() {
    let set = FakeSet::voting(3);
    let layout = KeyLayout::new("paused");
    let cluster = MemoryCluster::new();
    let bridge = bridge_of_three(&cluster, &layout).await;
    // A fourth task: a leader would add it.
    publish(&bridge, 4).await;
    let dry = ControllerConfig {
        dry_run: true,
        ..config(&layout, "dry", None)
    };
    let metrics_dry = dry.metrics.clone();
    let (shutdown_dry, stopped_dry) = start(&cluster, &layout, set.clone(), dry);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let would_add = StepLabels {
        set: SET.into(),
        step: "add",
    };
    assert!(
        metrics_dry.steps_dry_run.get_or_create(&would_add).get() > 0,
        "the dry run decides (and logs) the step a leader would take"
    );
    assert!(set.observations() > 0);
    assert_eq!(set.applied(), Vec::<Step>::new(), "and applies nothing");
    assert_eq!(
        cluster.list(&format!("{}/replsets/", layout.prefix())),
        Vec::new(),
        "no leader key, URI, status or identity is written"
    );

    // The reconciler that acts is not kept from leading by it.
    let (shutdown, stopped) = start(&cluster, &layout, set.clone(), config(&layout, "a", None));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(removals(&set), Vec::<i64>::new());
    assert!(
        set.applied().iter().any(|s| matches!(
            s,
            Step::Reconfig {
                change: Change::Add { .. },
                ..
            }
        )),
        "the leader adds the fourth member: {:?}",
        set.applied()
    );
    for (shutdown, stopped) in [(shutdown_dry, stopped_dry), (shutdown, stopped)] {
        shutdown.cancel();
        stopped.await.expect("stopped");
    }
}

#[tokio::test(start_paused = true)]
async fn the_status_says_when_it_was_observed_what_failed_and_which_records_are_gone() {
    let rig = Rig::converged(None).await;
    let seen = rig.status().expect("a status");
    let observed_at = seen.observed_at.expect("observed_at");
    assert!(
        seen.error.is_empty() && seen.records_gone.is_empty(),
        "{seen:?}"
    );

    // Member 3's record goes: the status names it, and since when.
    rig.unpublish(3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let gone = rig.status().expect("a status").records_gone;
    assert_eq!(
        gone.iter()
            .map(|g| (g.id, g.host.as_str()))
            .collect::<Vec<_>>(),
        vec![(3, host(3).as_str())]
    );
    assert!(gone[0].since >= observed_at, "{gone:?}");
    rig.publish(3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(rig.status().expect("a status").records_gone, Vec::new());

    // No member answers: the last status stays as what was last seen, not converged, with
    // what failed, and its observed_at does not move.
    let before = rig.status().expect("a status");
    rig.set.set_unreachable(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let failed = rig.status().expect("a status");
    assert!(!failed.converged, "{failed:?}");
    assert!(!failed.converged_with(3));
    assert!(!failed.error.is_empty(), "{failed:?}");
    assert_eq!(failed.observed_at, before.observed_at);
    assert_eq!(failed.members, before.members);

    // Once the set answers again, the status is current again.
    rig.set.set_unreachable(false);
    rig.converged_with(3).await;
    assert!(rig.status().expect("a status").error.is_empty());
    rig.stop().await;
}
