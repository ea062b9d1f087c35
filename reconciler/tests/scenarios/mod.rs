//! The reconcile loop's scenarios against the replica-set simulator and a real store, run once
//! per backend (`reconcile_etcd.rs`, `reconcile_consul.rs`) through [`suite`]. Records are
//! written into the store as the bridge would write them, pointing at simulated members on
//! loopback.

/// Declares one `#[tokio::test]` per scenario for a backend.
macro_rules! suite {
    ($backend:expr) => {
        test_support::each_scenario!(scenarios, $backend;
            a_fresh_service_becomes_a_set_and_grows_one_voter_at_a_time,
            a_rescheduled_slot_keeps_its_id_with_a_new_host,
            eight_to_three_removes_one_member_per_step_with_a_primary_throughout,
            a_store_glitch_removes_nothing,
            a_record_with_invalid_json_is_ignored,
            two_reconcilers_one_leads_and_the_other_takes_over,
            a_majority_write_survives_a_primary_killed_during_a_scale_up,
            eight_members_have_seven_voters,
            a_set_that_lost_its_majority_says_so_and_recovers,
            allow_force_reconfigures_to_the_members_that_are_up,
            a_whole_restart_under_new_addresses_keeps_the_set_and_its_data,
            members_that_lost_their_data_are_not_initiated_again,
            a_refused_login_is_reported_as_such_and_the_right_one_initiates,
            a_newer_record_never_takes_the_slot_of_a_live_member,
            a_member_moved_onto_an_older_volume_gets_no_vote_and_no_write_is_lost,
            a_whole_restart_onto_older_volumes_waits_for_the_member_with_the_writes,
            a_member_back_empty_at_its_address_has_no_vote_while_it_syncs);
    };
}
pub(crate) use suite;

mod slots;
mod volumes;
pub use slots::a_newer_record_never_takes_the_slot_of_a_live_member;
pub use volumes::{
    a_member_back_empty_at_its_address_has_no_vote_while_it_syncs,
    a_member_moved_onto_an_older_volume_gets_no_vote_and_no_write_is_lost,
    a_whole_restart_onto_older_volumes_waits_for_the_member_with_the_writes,
};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendUri, Coordinator, KeyLayout, Publisher, ServiceKey, Watcher};
use backend_core::{NextKind, ReplSetStatus};
use backend_store::StoreOptions;
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::{Credentials, Members};
use replset_reconciler::records::Selector;
use replset_sim::{Cluster, Event};
use test_support::contract::{mongo_task_record, unique_layout};
use test_support::wait_for;
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(60);

fn etcd_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

fn consul_endpoint() -> String {
    std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into())
}

/// The store a scenario runs against (each test binary uses one of them).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Etcd,
    Consul,
}

/// The project's client of that store.
#[derive(Clone)]
struct Store(Arc<backend_store::Store>);

impl Store {
    async fn open(b: Backend, layout: &KeyLayout) -> Store {
        let uri = match b {
            Backend::Etcd => format!("etcd://{}/{}", etcd_endpoint(), layout.prefix()),
            Backend::Consul => format!("consul://{}/{}", consul_endpoint(), layout.prefix()),
        };
        let options = StoreOptions {
            // The records are written as plain values here; no catalog registrations.
            consul_catalog: false,
            ..StoreOptions::default()
        };
        let store = backend_store::Store::open(&BackendUri::parse(&uri).expect("a URI"), &options)
            .await
            .expect("a client");
        Store(Arc::new(store))
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) {
        self.0.put_value(key, value).await.expect("put");
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.0.get_value(key).await.map_err(|e| e.to_string())
    }

    async fn unpublish(&self, key: ServiceKey) {
        self.0.unpublish(&[key]).await.expect("delete");
    }
}

struct Harness {
    store: Store,
    layout: KeyLayout,
    shutdown: CancellationToken,
    metrics: Arc<replset_reconciler::metrics::Metrics>,
}

impl Harness {
    async fn start(b: Backend, set: &str) -> Harness {
        Harness::start_as(b, set, unique_layout("reconcile"), "test").await
    }

    /// A reconciler named `holder` for `set` under `layout`.
    async fn start_as(b: Backend, set: &str, layout: KeyLayout, holder: &str) -> Harness {
        Harness::start_with(b, set, layout, holder, None).await
    }

    /// The same, with `--allow-force --force-after <force_after>` when given.
    async fn start_with(
        b: Backend,
        set: &str,
        layout: KeyLayout,
        holder: &str,
        force_after: Option<Duration>,
    ) -> Harness {
        Harness::start_full(b, set, layout, holder, force_after, None).await
    }

    /// [`Harness::start_with`], logging in to the members with `credentials` when given.
    async fn start_full(
        b: Backend,
        set: &str,
        layout: KeyLayout,
        holder: &str,
        force_after: Option<Duration>,
        credentials: Option<Credentials>,
    ) -> Harness {
        let store = Store::open(b, &layout).await;
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(replset_reconciler::metrics::Metrics::default());
        let config = ControllerConfig {
            layout: layout.clone(),
            selectors: vec![Selector::Service {
                service: "mongo".into(),
                set: set.into(),
                port: None,
            }],
            removal_grace: Duration::from_secs(2),
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(2),
            // Consul's floor is 10 s.
            leader_ttl: Duration::from_secs(10),
            holder: holder.into(),
            dry_run: false,
            metrics: metrics.clone(),
            force_after,
        };
        spawn_loop(store.0.clone(), config, credentials, &shutdown);
        Harness {
            store,
            layout,
            shutdown,
            metrics,
        }
    }

    async fn unpublish(&self, slot: u64) {
        self.store
            .unpublish(ServiceKey {
                service: "mongo".into(),
                id: format!("task{slot}"),
            })
            .await;
    }

    /// The records of `hosts` in slots 1, 2, ...
    async fn publish_all(&self, hosts: &[String]) {
        for (i, host) in hosts.iter().enumerate() {
            self.publish(i as u64 + 1, host).await;
        }
    }

    async fn publish(&self, slot: u64, host: &str) {
        let r = mongo_task_record(slot, host).expect("host:port");
        self.store
            .put_value(&self.layout.service_key(&r.service, &r.id), r.to_json())
            .await;
    }
}

/// The reconciler's loop, as the binary runs it: the library's [`Controller`], until the
/// harness's shutdown.
fn spawn_loop<S: Watcher + Coordinator>(
    store: Arc<S>,
    config: ControllerConfig,
    credentials: Option<Credentials>,
    shutdown: &CancellationToken,
) {
    let controller = Controller::start(
        store,
        Arc::new(Members::new(credentials)),
        config,
        shutdown.clone(),
    );
    tokio::spawn(controller.run());
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A config a primary installed, from the simulator's history.
struct Installed {
    version: i64,
    /// `_id`s of the members that count as voters.
    voters: Vec<i64>,
    source: replset_sim::ConfigSource,
    config: bson::Document,
}

impl Installed {
    /// The members, `_id` to host.
    fn members(&self) -> BTreeMap<i64, String> {
        let members = self
            .config
            .get_array("members")
            .cloned()
            .unwrap_or_default();
        members
            .iter()
            .filter_map(|m| m.as_document())
            .filter_map(|m| {
                let id = m
                    .get_i32("_id")
                    .map(i64::from)
                    .or_else(|_| m.get_i64("_id"))
                    .ok()?;
                Some((id, m.get_str("host").ok()?.to_string()))
            })
            .collect()
    }
}

/// Every config a primary installed, oldest first.
fn installed(cluster: &Cluster) -> Vec<Installed> {
    cluster
        .history()
        .configs()
        .into_iter()
        .filter_map(|e| match e {
            Event::ConfigInstalled {
                version,
                voters,
                source,
                config,
                ..
            } => Some(Installed {
                version,
                voters,
                source,
                config,
            }),
            _ => None,
        })
        .collect()
}

/// The version, voters (`_id`) and number of members of the latest config a primary installed.
fn latest(cluster: &Cluster) -> Option<(i64, Vec<i64>, usize)> {
    let last = installed(cluster).pop()?;
    let members = last.members().len();
    Some((last.version, last.voters, members))
}

/// Every config differs from the one before by at most one voter.
fn assert_one_voter_at_a_time(cluster: &Cluster) {
    let mut previous: Option<Vec<i64>> = None;
    for e in cluster.history().configs() {
        if let Event::ConfigInstalled {
            voters, version, ..
        } = e
        {
            if let Some(p) = &previous {
                let added = voters.iter().filter(|v| !p.contains(v)).count();
                let removed = p.iter().filter(|v| !voters.contains(v)).count();
                assert!(
                    added + removed <= 1,
                    "config {version} changed {} voters: {p:?} -> {voters:?}\n{}",
                    added + removed,
                    cluster.history().render()
                );
            }
            previous = Some(voters);
        }
    }
}

pub async fn a_fresh_service_becomes_a_set_and_grows_one_voter_at_a_time(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    set_of_three(&cluster, &h).await;
    cluster.wait_for_primary(CONVERGE).await.expect("a primary");

    // 3 to 5.
    for _ in 0..2 {
        add_published(&mut cluster, &h).await;
    }
    wait_latest(&cluster, "5 voters", 5, 5).await;
    assert_one_voter_at_a_time(&cluster);

    // The connection string lists every member.
    let uri_key = h.layout.replset_uri_key(cluster.set_name());
    let uri = wait_for("the connection string", CONVERGE, || async {
        let v = h
            .store
            .get_value(&uri_key)
            .await
            .map_err(|e| e.to_string())?;
        let uri = String::from_utf8(v.unwrap_or_default()).map_err(|e| e.to_string())?;
        if cluster
            .hosts()
            .iter()
            .all(|host| uri.contains(host.as_str()))
        {
            Ok(uri)
        } else {
            Err(uri)
        }
    })
    .await;
    assert!(
        uri.ends_with(&format!("/?replicaSet={}", cluster.set_name())),
        "{uri}"
    );
}

/// The members (`_id` to host) of the latest config.
fn latest_members(cluster: &Cluster) -> BTreeMap<i64, String> {
    installed(cluster)
        .pop()
        .map(|c| c.members())
        .unwrap_or_default()
}

/// Waits until the latest config has `members` members, `voters` of them voting.
async fn wait_latest(cluster: &Cluster, what: &str, members: usize, voters: usize) {
    wait_for(what, CONVERGE, || async {
        match latest(cluster) {
            Some((_, v, n)) if n == members && v.len() == voters => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Adds a simulated member and publishes its record, as swarm and the bridge would.
async fn add_published(cluster: &mut Cluster, h: &Harness) {
    let i = cluster.add_member().await.expect("a member");
    h.publish(i as u64 + 1, cluster.host(i).expect("host"))
        .await;
}

async fn set_of_three(cluster: &Cluster, h: &Harness) {
    h.publish_all(&cluster.hosts()).await;
    wait_latest(cluster, "an initiated set of 3 voters", 3, 3).await;
}

pub async fn a_rescheduled_slot_keeps_its_id_with_a_new_host(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    set_of_three(&cluster, &h).await;
    // Slot 2's task is rescheduled: its mongod is gone, a new one runs elsewhere.
    cluster.kill(1).expect("kill");
    let new = cluster.add_member().await.expect("a member");
    let new_host = cluster.host(new).expect("host").to_string();
    h.publish(2, &new_host).await;
    wait_for(
        "member 2 at its new host, voting again",
        CONVERGE,
        || async {
            let members = latest_members(&cluster);
            match latest(&cluster) {
                Some((_, voters, 3)) if voters.len() == 3 && members.get(&2) == Some(&new_host) => {
                    Ok(())
                }
                other => Err(format!("{other:?} {members:?}")),
            }
        },
    )
    .await;
    assert_one_voter_at_a_time(&cluster);
}

/// How many times a primary stepped down.
fn stepdowns(cluster: &Cluster) -> usize {
    cluster
        .history()
        .events()
        .iter()
        .filter(|e| matches!(e, Event::SteppedDown { .. }))
        .count()
}

/// The version and members (`_id`s) of every config a primary installed, in order.
fn config_history(cluster: &Cluster) -> Vec<(i64, BTreeSet<i64>)> {
    installed(cluster)
        .iter()
        .map(|c| (c.version, c.members().into_keys().collect()))
        .collect()
}

/// The status the reconciler published for `set`, once it says the set converged with these
/// members ([`ReplSetStatus::converged_with`]: a primary, every member healthy) and the config
/// the set has now.
async fn converged_status(
    h: &Harness,
    cluster: &Cluster,
    set: &str,
    members: &BTreeSet<i64>,
) -> Result<ReplSetStatus, String> {
    let status = read_status(h, set).await?;
    let listed: BTreeSet<i64> = status.members.iter().map(|m| m.id).collect();
    let installed = latest(cluster).map(|(version, _, _)| version);
    if status.converged_with(members.len())
        && &listed == members
        && Some(status.config_version) == installed
    {
        Ok(status)
    } else {
        Err(format!("{status:?} (installed config {installed:?})"))
    }
}

/// The status the reconciler published for `set`.
async fn read_status(h: &Harness, set: &str) -> Result<ReplSetStatus, String> {
    let v = h
        .store
        .get_value(&h.layout.replset_status_key(set))
        .await?
        .ok_or("no status")?;
    ReplSetStatus::from_json(&v).map_err(|e| e.to_string())
}

/// `docker service scale mongo=3` of a set of 8, the way `replset-reconciler scale` does it:
/// one task at a time, its record deleted and its mongod stopped, then wait until the set has
/// converged (the member gone from the config, the status saying so) before the next.
pub async fn eight_to_three_removes_one_member_per_step_with_a_primary_throughout(b: Backend) {
    let mut cluster = Cluster::start(8).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    // 8 members as the reconciler leaves them: slots 1 to 7 voting, slot 8 without a vote.
    let members: Vec<bson::Bson> = cluster
        .hosts()
        .iter()
        .zip(1..)
        .map(|(host, id): (&String, i32)| {
            let m = if id == 8 {
                bson::doc! {"_id": id, "host": host, "votes": 0, "priority": 0}
            } else {
                bson::doc! {"_id": id, "host": host, "votes": 1, "priority": 1}
            };
            bson::Bson::Document(m)
        })
        .collect();
    cluster
        .command_ok(
            0,
            bson::doc! {"replSetInitiate": {"_id": &set, "version": 1, "members": members}},
        )
        .await
        .expect("initiate");
    cluster
        .wait_for_stable(CONVERGE)
        .await
        .expect("a primary and secondaries");
    let h = Harness::start(b, &set).await;
    h.publish_all(&cluster.hosts()).await;
    let mut remaining: BTreeSet<i64> = (1..=8).collect();
    wait_for(
        "the reconciler to find 8 members converged",
        CONVERGE,
        || converged_status(&h, &cluster, &set, &remaining),
    )
    .await;
    assert_eq!(
        latest(&cluster).map(|(v, voters, n)| (v, voters.len(), n)),
        Some((1, 7, 8)),
        "the reconciler changed a converged set"
    );

    // A w: "majority" write through the replica-set URI, as an application makes it.
    let coll = majority_write(&cluster, "before the scale-down").await;

    let started = std::time::Instant::now();
    let elections = cluster.history().elections();
    let stepdowns_before = stepdowns(&cluster);
    let mut configs_before = config_history(&cluster).len();
    let polls = std::cell::Cell::new(0usize);
    let without_primary = std::cell::Cell::new(0usize);
    while remaining.len() > 3 {
        // Swarm stops one task (the test picks one that is not the primary: losing the
        // primary is a failover, another scenario). Its mongod stops, then the bridge deletes
        // its record.
        let primary = cluster.primary().expect("a primary") as i64 + 1;
        let slot = *remaining
            .iter()
            .rev()
            .find(|&&s| s != primary)
            .expect("a member to stop");
        remaining.remove(&slot);
        cluster.kill(slot as usize - 1).expect("kill");
        h.unpublish(slot as u64).await;
        wait_for(
            &format!("member {slot} removed and the set converged"),
            CONVERGE,
            || async {
                polls.set(polls.get() + 1);
                if cluster.primary().is_none() {
                    without_primary.set(without_primary.get() + 1);
                }
                converged_status(&h, &cluster, &set, &remaining).await
            },
        )
        .await;
        // This step's configs: the stopped member removed, nothing else, no member added.
        let configs = config_history(&cluster);
        let step = &configs[configs_before - 1..];
        let mut removed = BTreeSet::new();
        for pair in step.windows(2) {
            let (version, before, after) = (pair[1].0, &pair[0].1, &pair[1].1);
            assert!(
                after.is_subset(before) && before.len() - after.len() <= 1,
                "config {version} changed members {before:?} -> {after:?}\n{}",
                cluster.history().render()
            );
            removed.extend(before.difference(after).copied());
        }
        assert_eq!(
            removed,
            BTreeSet::from([slot]),
            "stopping {slot}:\n{}",
            cluster.history().render()
        );
        configs_before = configs.len();
    }
    let took = started.elapsed();

    assert_one_voter_at_a_time(&cluster);
    let (_, voters, members) = latest(&cluster).expect("a config");
    assert_eq!(members, 3);
    assert_eq!(
        voters.into_iter().collect::<BTreeSet<i64>>(),
        remaining,
        "the 3 members left all vote"
    );
    assert_eq!(
        latest_members(&cluster)
            .keys()
            .copied()
            .collect::<BTreeSet<i64>>(),
        remaining
    );
    // A primary throughout: every poll found one, and nobody was elected or stepped down.
    assert!(polls.get() > 0);
    assert_eq!(
        without_primary.get(),
        0,
        "polls without a primary, of {}",
        polls.get()
    );
    assert_eq!(
        cluster.history().elections(),
        elections,
        "an election during the scale-down:\n{}",
        cluster.history().render()
    );
    assert_eq!(
        stepdowns(&cluster),
        stepdowns_before,
        "a stepdown during the scale-down:\n{}",
        cluster.history().render()
    );
    assert_written(&coll, "before the scale-down").await;
    eprintln!("8 -> 3 in {took:?}");
}

pub async fn a_store_glitch_removes_nothing(b: Backend) {
    let cluster = Cluster::start(3).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    set_of_three(&cluster, &h).await;
    // Every record vanishes while the members keep running: nothing may be removed.
    let before = latest(&cluster);
    for slot in 1..=3u64 {
        h.unpublish(slot).await;
    }
    // Longer than the removal grace (2 s) and several reconciles.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        latest(&cluster),
        before,
        "a member was removed for a missing record"
    );
}

pub async fn a_record_with_invalid_json_is_ignored(b: Backend) {
    let cluster = Cluster::start(1).await.expect("simulated member");
    let h = Harness::start(b, cluster.set_name()).await;
    h.store
        .put_value(
            &h.layout.service_key("mongo", "garbage"),
            b"{not json".to_vec(),
        )
        .await;
    h.publish(1, cluster.host(0).expect("host")).await;
    wait_latest(&cluster, "an initiated set of 1", 1, 1).await;
}

/// The holder of the set's leader key: etcd's election API, or the Consul lock's value.
async fn leader_of(h: &Harness, set: &str) -> Result<String, String> {
    let key = h.layout.replset_leader_key(set);
    match h.store.0.as_etcd() {
        Some(etcd) => {
            let resp = etcd.client().leader(key).await.map_err(|e| e.to_string())?;
            resp.kv()
                .map(|kv| String::from_utf8_lossy(kv.value()).to_string())
                .ok_or_else(|| "no leader".to_string())
        }
        None => {
            let v = h.store.get_value(&key).await?.ok_or("no leader")?;
            Ok(String::from_utf8_lossy(&v).to_string())
        }
    }
}

pub async fn two_reconcilers_one_leads_and_the_other_takes_over(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let layout = unique_layout("two-reconcilers");
    let a = Harness::start_as(b, &set, layout.clone(), "reconciler-a").await;
    let first = wait_for("a leader", CONVERGE, || leader_of(&a, &set)).await;
    let b = Harness::start_as(b, &set, layout.clone(), "reconciler-b").await;
    set_of_three(&cluster, &a).await;
    assert_eq!(
        leader_of(&b, &set).await.as_deref(),
        Ok(first.as_str()),
        "still one leader"
    );

    // The leader stops (it resigns): the other takes over and goes on reconciling.
    let (leader, other) = if first == "reconciler-a" {
        (a, b)
    } else {
        (b, a)
    };
    leader.shutdown.cancel();
    let second = wait_for("the other reconciler to lead", CONVERGE, || async {
        match leader_of(&other, &set).await {
            Ok(l) if l != first => Ok(l),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_ne!(second, first);
    add_published(&mut cluster, &other).await;
    wait_for(
        "the new leader to add the fourth member",
        CONVERGE,
        || async {
            match latest(&cluster) {
                Some((_, _, 4)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    drop(leader);
}

pub async fn a_majority_write_survives_a_primary_killed_during_a_scale_up(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    set_of_three(&cluster, &h).await;
    let primary = cluster.wait_for_primary(CONVERGE).await.expect("a primary");

    // A w: "majority" write through the replica-set URI, as an application makes it.
    let coll = majority_write(&cluster, "first").await;

    // Scale 3 to 5, and kill the primary in the middle.
    add_published(&mut cluster, &h).await;
    cluster.kill(primary).expect("kill");
    add_published(&mut cluster, &h).await;

    // The set elects a new primary and converges to 5 members; the killed member keeps its
    // record (its task would be restarted by swarm), so it stays in the config.
    wait_for("5 members after the election", CONVERGE, || async {
        match latest(&cluster) {
            Some((_, _, 5)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_one_voter_at_a_time(&cluster);
    assert_written(&coll, "first").await;
}

pub async fn eight_members_have_seven_voters(b: Backend) {
    let mut cluster = Cluster::start(5).await.expect("simulated members");
    let h = Harness::start(b, cluster.set_name()).await;
    h.publish_all(&cluster.hosts()).await;
    for _ in 0..3 {
        add_published(&mut cluster, &h).await;
    }
    wait_latest(&cluster, "8 members, 7 of them voting", 8, 7).await;
    assert_one_voter_at_a_time(&cluster);
}

pub async fn a_set_that_lost_its_majority_says_so_and_recovers(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    set_of_three(&cluster, &h).await;
    let primary = cluster.wait_for_primary(CONVERGE).await.expect("a primary");
    // Two of three voters stop at once (as `docker service scale mongo=1` would do).
    let others: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
    cluster.kill(primary).expect("kill");
    cluster.kill(others[0]).expect("kill");
    wait_for(
        "the status to report the lost majority",
        CONVERGE,
        || async {
            let status = read_status(&h, &set).await?;
            if status.next.kind == NextKind::Blocked && status.next.reason == "lost_majority" {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        },
    )
    .await;
    let before = latest(&cluster);
    // The way out: the members come back.
    cluster.restart(primary, true).await.expect("restart");
    cluster.restart(others[0], true).await.expect("restart");
    cluster
        .wait_for_primary(CONVERGE)
        .await
        .expect("a primary again");
    wait_for("the status to clear", CONVERGE, || async {
        let status = read_status(&h, &set).await?;
        if status.converged {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    // Nothing was forced or removed while the majority was gone.
    let (_, voters, members) = latest(&cluster).expect("a config");
    assert_eq!((voters.len(), members), (3, 3), "before: {before:?}");
}

pub async fn allow_force_reconfigures_to_the_members_that_are_up(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start_with(
        b,
        &set,
        unique_layout("force"),
        "test",
        Some(Duration::from_secs(2)),
    )
    .await;
    set_of_three(&cluster, &h).await;
    let primary = cluster.wait_for_primary(CONVERGE).await.expect("a primary");
    let survivor = (0..3).find(|&i| i != primary).expect("a survivor");
    for i in (0..3).filter(|&i| i != survivor) {
        cluster.kill(i).expect("kill");
    }
    // After --force-after without a majority: a forced config of the survivor alone.
    wait_for(
        "a forced config of the member that is up",
        CONVERGE,
        || async {
            let forced = installed(&cluster)
                .into_iter()
                .rev()
                .find(|c| c.source == replset_sim::ConfigSource::ForceReconfig)
                .map(|c| c.members().len());
            match forced {
                Some(1) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let p = cluster
        .wait_for_primary(CONVERGE)
        .await
        .expect("a primary again");
    assert_eq!(p, survivor);
    // A write after the force, then the members come back with their data (the old term's):
    // the set grows back to three voters and keeps the write. The commit point remembered from
    // before the force (which the survivor may stop short of) must not keep them out.
    let coll = majority_write(&cluster, "after the force").await;
    for i in (0..3).filter(|&i| i != survivor) {
        cluster
            .restart(i, true)
            .await
            .expect("restart with its data");
    }
    wait_latest(&cluster, "all three voting again after the force", 3, 3).await;
    assert_written(&coll, "after the force").await;
}

/// Inserts `{_id: 1, item}` into `app.orders` with `w: "majority"` through the set's URI and
/// returns the collection, to read the document back at the end.
/// The majority write of [`majority_write`] is still there, with `item`.
async fn assert_written(coll: &mongodb::Collection<bson::Document>, item: &str) {
    let found = coll
        .find_one(bson::doc! {"_id": 1})
        .await
        .expect("read")
        .expect("the majority write is still there");
    assert_eq!(found.get_str("item").ok(), Some(item));
}

async fn majority_write(cluster: &Cluster, item: &str) -> mongodb::Collection<bson::Document> {
    let client = mongodb::Client::with_uri_str(cluster.uri())
        .await
        .expect("client");
    let coll = client
        .database("app")
        .collection::<bson::Document>("orders");
    let majority = mongodb::options::WriteConcern::builder()
        .w(mongodb::options::Acknowledgment::Majority)
        .build();
    coll.insert_one(bson::doc! {"_id": 1, "item": item})
        .with_options(
            mongodb::options::InsertOneOptions::builder()
                .write_concern(majority)
                .build(),
        )
        .await
        .expect("majority write");
    coll
}

/// The identity the reconciler remembers of `set`.
async fn read_identity(h: &Harness, set: &str) -> Result<backend_core::SetIdentity, String> {
    let v = h
        .store
        .get_value(&h.layout.replset_identity_key(set))
        .await?
        .ok_or("no identity")?;
    backend_core::SetIdentity::from_json(&v).map_err(|e| e.to_string())
}

/// A set of three, converged, its identity recorded, and `n` documents written to it with
/// `w: "majority"`; returns the identity.
async fn set_of_three_with_data(
    cluster: &Cluster,
    h: &Harness,
    n: i32,
) -> backend_core::SetIdentity {
    let set = cluster.set_name().to_string();
    set_of_three(cluster, h).await;
    let ids: BTreeSet<i64> = (1..=3).collect();
    wait_for("converged with 3", CONVERGE, || {
        converged_status(h, cluster, &set, &ids)
    })
    .await;
    let coll = majority_write(cluster, "first").await;
    let majority = mongodb::options::WriteConcern::builder()
        .w(mongodb::options::Acknowledgment::Majority)
        .build();
    for i in 2..=n {
        coll.insert_one(bson::doc! {"_id": i, "item": format!("item {i}")})
            .with_options(
                mongodb::options::InsertOneOptions::builder()
                    .write_concern(majority.clone())
                    .build(),
            )
            .await
            .expect("majority write");
    }
    wait_for("the identity recorded", CONVERGE, || read_identity(h, &set)).await
}

/// Every member killed, then each restarted at a new address (with its data or empty) and its
/// record rewritten: every task of a service replaced at once.
async fn replace_every_member(cluster: &mut Cluster, h: &Harness, keep_data: bool) {
    for i in 0..cluster.len() {
        cluster.kill(i).expect("kill");
    }
    for i in 0..cluster.len() {
        cluster
            .restart_elsewhere(i, keep_data)
            .await
            .expect("restart");
        h.publish(i as u64 + 1, cluster.host(i).expect("host"))
            .await;
    }
}

/// Every task of the service replaced at once (a scale to 0 and back, a whole swarm
/// rebooted): the members come back with their data under new addresses, each holding a config
/// that names the old ones. The reconciler re-addresses them (rule 11) and keeps the set: the
/// same replica set id, every majority write, no initiate, no voter changed.
pub async fn a_whole_restart_under_new_addresses_keeps_the_set_and_its_data(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    let before = set_of_three_with_data(&cluster, &h, 20).await;
    replace_every_member(&mut cluster, &h, true).await;
    let ids: BTreeSet<i64> = (1..=3).collect();
    let status = wait_for("converged at the new addresses", CONVERGE, || async {
        let s = converged_status(&h, &cluster, &set, &ids).await?;
        let hosts: BTreeSet<String> = s.members.iter().map(|m| m.host.clone()).collect();
        if hosts == cluster.hosts().into_iter().collect() {
            Ok(s)
        } else {
            Err(format!("members at {hosts:?}"))
        }
    })
    .await;
    assert!(status.converged_with(3));
    let after = wait_for("the identity of the re-addressed set", CONVERGE, || async {
        let i = read_identity(&h, &set).await?;
        if i.config_version != before.config_version {
            Ok(i)
        } else {
            Err(format!("still {i:?}"))
        }
    })
    .await;
    assert_eq!(after.replica_set_id, before.replica_set_id, "the same set");
    assert_eq!(applied(&h, "readdress"), 1);
    assert_eq!(applied(&h, "initiate"), 1, "initiated once, at the start");
    assert_one_voter_at_a_time(&cluster);
    let client = mongodb::Client::with_uri_str(cluster.uri())
        .await
        .expect("client");
    let coll = client
        .database("app")
        .collection::<bson::Document>("orders");
    let found = coll
        .count_documents(bson::doc! {})
        .read_concern(mongodb::options::ReadConcern::majority())
        .await
        .expect("count");
    assert_eq!(found, 20, "every majority write is still there");
}

/// Every task replaced at once WITHOUT its data (the volumes are gone): the members answer
/// that they have no config. The store remembers the set, so the reconciler refuses to
/// initiate a new, empty one and says so in the status; `forget-set` is the operator's way to
/// start one on purpose.
pub async fn members_that_lost_their_data_are_not_initiated_again(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    let before = set_of_three_with_data(&cluster, &h, 1).await;
    let old_uri = h
        .store
        .get_value(&h.layout.replset_uri_key(&set))
        .await
        .expect("read")
        .expect("a URI");
    replace_every_member(&mut cluster, &h, false).await;
    let refused = wait_for("the refusal in the status", CONVERGE, || async {
        let s = read_status(&h, &set).await?;
        if s.next.kind == NextKind::Blocked && s.next.reason == "known_set_without_data" {
            Ok(s)
        } else {
            Err(format!("{:?}", s.next))
        }
    })
    .await;
    assert!(
        refused.next.detail.contains(&before.replica_set_id)
            && refused.next.detail.contains("forget-set"),
        "the status names the set and the way out: {}",
        refused.next.detail
    );
    assert!(!refused.converged);
    for i in 0..3 {
        let hello = cluster
            .command(i, bson::doc! {"hello": 1})
            .await
            .expect("hello");
        assert!(
            hello.get_str("setName").is_err(),
            "member {i} was initiated: {hello}"
        );
    }
    assert_eq!(applied(&h, "initiate"), 1, "initiated once, at the start");
    let uri = h
        .store
        .get_value(&h.layout.replset_uri_key(&set))
        .await
        .expect("read");
    assert_eq!(
        uri,
        Some(old_uri),
        "no URI for an empty set in place of the old one"
    );

    // The operator's decision: a new, empty set.
    let wrong = replset_reconciler::commands::forget_set(
        &*h.store.0,
        &h.layout,
        &set,
        "000000000000000000000000",
    )
    .await;
    assert!(
        matches!(
            wrong,
            Err(replset_reconciler::commands::ForgetError::WrongId { .. })
        ),
        "{wrong:?}"
    );
    replset_reconciler::commands::forget_set(&*h.store.0, &h.layout, &set, &before.replica_set_id)
        .await
        .expect("forget the set");
    let ids: BTreeSet<i64> = (1..=3).collect();
    wait_for("a new set of 3", CONVERGE, || {
        converged_status(&h, &cluster, &set, &ids)
    })
    .await;
    let after = wait_for("the new set's identity", CONVERGE, || {
        read_identity(&h, &set)
    })
    .await;
    assert_ne!(after.replica_set_id, before.replica_set_id, "a new set");
}

fn applied(h: &Harness, step: &'static str) -> u64 {
    h.metrics
        .steps_applied
        .get_or_create(&replset_reconciler::metrics::StepLabels {
            set: "rs0".into(),
            step,
        })
        .get()
}

/// Members with `--keyFile` (authentication on) and the stack's reconciler user
/// (clusterManager + clusterMonitor, password `reconciler-pw`), as the image's first start
/// makes them.
async fn authenticated_members(n: usize) -> Cluster {
    use replset_sim::auth::initdb::{InitUser, RoleRef};
    use replset_sim::auth::{KeyFile, Security};
    let template = replset_sim::NodeOptions {
        security: Security {
            authorization: true,
            key_file: Some(KeyFile::from_contents("scenariokey").expect("a valid key")),
        },
        ..replset_sim::NodeOptions::default()
    };
    let cluster = Cluster::start_with(n, template)
        .await
        .expect("simulated members");
    let role = |r: &str| RoleRef {
        role: r.into(),
        db: "admin".into(),
    };
    let user = InitUser {
        user: "reconciler".into(),
        db: "admin".into(),
        roles: vec![role("clusterManager"), role("clusterMonitor")],
        password: "reconciler-pw".into(),
    };
    for i in 0..n {
        let node = cluster.node(i).expect("a member");
        assert!(node
            .bootstrap_users(std::slice::from_ref(&user))
            .expect("users"));
    }
    cluster
}

/// A wrong password is an error that names the user and each member, in the status
/// (`blocked`/`access_refused`) and the metrics, never "unreachable", and nothing is
/// initiated; with the right password the same members become a set.
pub async fn a_refused_login_is_reported_as_such_and_the_right_one_initiates(b: Backend) {
    let cluster = authenticated_members(3).await;
    let set = cluster.set_name().to_string();
    let login = |password: &str| {
        Some(Credentials {
            username: "reconciler".into(),
            password: password.into(),
        })
    };
    let wrong = Harness::start_full(
        b,
        &set,
        unique_layout("reconcile-auth"),
        "wrong",
        None,
        login("not-the-password"),
    )
    .await;
    wrong.publish_all(&cluster.hosts()).await;
    let status = wait_for("a status that names the refusal", CONVERGE, || async {
        let status = read_status(&wrong, &set).await?;
        if status.next.reason == "access_refused" {
            Ok(status)
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    assert_eq!(status.next.kind, NextKind::Blocked, "{status:?}");
    assert!(!status.converged);
    assert!(
        status.last_error.contains("\"reconciler\""),
        "{}",
        status.last_error
    );
    for host in cluster.hosts() {
        assert!(
            status.last_error.contains(&host),
            "{} lacks {host}",
            status.last_error
        );
    }
    assert!(!status.last_error.contains("not-the-password"));
    assert!(
        !status.next.detail.contains("unreachable"),
        "{:?}",
        status.next
    );
    assert!(installed(&cluster).is_empty(), "initiated without a login");
    let refused: u64 = wrong
        .metrics
        .access_refused
        .get_or_create(&replset_reconciler::metrics::SetLabels { set: set.clone() })
        .get();
    assert_eq!(refused, 3, "each member's refusal counted once");
    drop(wrong);

    let right = Harness::start_full(
        b,
        &set,
        unique_layout("reconcile-auth"),
        "right",
        None,
        login("reconciler-pw"),
    )
    .await;
    right.publish_all(&cluster.hosts()).await;
    let members: BTreeSet<i64> = [1, 2, 3].into();
    let status = wait_for(
        "the set converged with the right login",
        CONVERGE,
        || async { converged_status(&right, &cluster, &set, &members).await },
    )
    .await;
    assert!(status.last_error.is_empty(), "{status:?}");
}
