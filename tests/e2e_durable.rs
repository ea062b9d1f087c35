//! Data that survives: the stack (`compose/stack.yml`, etcd) on a 3-node swarm of
//! Docker-in-Docker nodes, with a volume per slot, the image's healthcheck (PRIMARY or
//! SECONDARY) and a health-gated `update_config`, while a writer makes `w: "majority"` writes
//! the whole time and the members' configs are recorded ([`Deployment::observe`]).
//!
//! The simulator's initial sync is slowed (`--sim-initial-sync-floor-ms`, through the stack's
//! MONGO_EXTRA_ARGS) so that a member with an empty volume needs tens of seconds, as a real one
//! with data would. Walk-through:
//! - (a) `docker service update --force`: every task replaced; each keeps its volume on its
//!   node and is ready again without an initial sync (sooner after the reconciler moved it to
//!   its new address than a sync takes);
//! - (b) `docker service update --image` to another tag of the same image: the same;
//! - (e) a task's node drained: the task starts on another node with an empty volume,
//!   initial-syncs, and only then gets its vote back.
//!
//! After each: every acknowledged write readable with read concern majority; no config with
//! more than one voter changed from the one before; never more than one member not ready at
//! once (swarm waited for each new member's health before stopping the next); the set equals
//! the tasks and the URI lists them.
//!
//! Heavy (about 9 minutes): `scripts/test` runs it in the multi-node pass, after
//! `scripts/images`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use test_support::dind::Swarm;
use test_support::stack::{
    Deployment, Observed, SetState, StackOptions, Store, Task, MONGO, MONGO_IMAGE, SIM_HEALTHCHECK,
};
use test_support::wait_for;

/// How long a new member's initial sync takes at least.
const SYNC_FLOOR: Duration = Duration::from_secs(20);
/// How long one step (an update of 3 tasks, a reschedule) may take.
const STEP: Duration = Duration::from_secs(360);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stack_keeps_every_write_through_updates_and_reschedules() {
    // One member per node (the stack's default), and a spare node for (e).
    let swarm = Swarm::up(4).await;
    let mut options = StackOptions::new("5s");
    options.mongo_extra_args = format!("--sim-initial-sync-floor-ms {}", SYNC_FLOOR.as_millis());
    let d = Deployment::deploy_with(swarm, Store::Etcd, options).await;
    d.wait_converged(3, "deploy").await;
    assert_stack_shape(&d).await;
    d.start_probe().await;
    wait_for("a first majority write", Duration::from_secs(90), || {
        d.probe_write("start")
    })
    .await;
    let mut acknowledged = vec!["start".to_string()];

    // --- (a) every task replaced by `docker service update --force`
    let seen = rolling_update(&d, "force", &["--force"]).await;
    acknowledged.extend(seen.acknowledged());

    // --- (b) another tag of the same image
    let v2 = format!("{MONGO_IMAGE}:durable-v2");
    d.tag_image_everywhere(MONGO_IMAGE, &v2).await;
    let seen = rolling_update(&d, "image", &["--image", &v2]).await;
    acknowledged.extend(seen.acknowledged());
    let image = d
        .manager()
        .docker(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.TaskTemplate.ContainerSpec.Image}}",
            MONGO,
        ])
        .await
        .expect("service inspect");
    assert!(image.starts_with(&v2), "the service runs {image}, not {v2}");

    // --- (e) a task rescheduled to another node: an empty volume there
    let seen = reschedule(&d).await;
    acknowledged.extend(seen.acknowledged());

    // --- (c) scale to 0 and back: every task at once, new addresses, the volumes' data
    let seen = whole_restart(&d, "scale 0 -> 3", Restart::ScaleToZero).await;
    acknowledged.extend(seen.acknowledged());

    // --- (d) every node's dockerd restarted at once
    let seen = whole_restart(&d, "every dockerd restarted", Restart::EveryDockerd).await;
    acknowledged.extend(seen.acknowledged());

    // Every write acknowledged since the start, read back once more at the end.
    let lost = d.unreadable(&acknowledged).await;
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are not readable at the end: {lost:?}",
        lost.len(),
        acknowledged.len()
    );
    eprintln!(
        "[durable] all {} acknowledged writes readable at the end",
        acknowledged.len()
    );

    // --- without the data: the volumes removed while every task is down. The store still
    // knows the set: the reconciler refuses to initiate, says so, and keeps the old URI.
    refuses_a_new_set_over_the_old_one(&d).await;
    d.swarm.down().await;
}

/// How every mongo task is replaced at once.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// `docker service scale <mongo>=0`, then back to 3.
    ScaleToZero,
    /// Every node's dockerd restarted at the same moment: every task stops, and swarm starts
    /// new ones (new containers, new addresses) once the engines are back.
    EveryDockerd,
}

/// (c), (d): every mongo task replaced at once. Each member comes back with its node's volume
/// under a new address, and the reconciler re-addresses the set: the same replica set id, no
/// new set, every acknowledged write readable, no voter changed by any config.
async fn whole_restart(d: &Deployment, what: &str, how: Restart) -> Observed {
    let before = d.tasks(MONGO).await.expect("tasks");
    let before_ids: BTreeSet<String> = before.iter().map(|t| t.id.clone()).collect();
    let before_identity = identity(d).await;
    let (_, seen) = d
        .observe(what, async {
            match how {
                Restart::ScaleToZero => {
                    d.swarm_scale_mongo(0).await;
                    wait_for("no mongo task running", STEP, || async {
                        let n = d.tasks(MONGO).await?.len();
                        if n == 0 {
                            Ok(())
                        } else {
                            Err(format!("{n} running"))
                        }
                    })
                    .await;
                    d.swarm_scale_mongo(3).await;
                }
                Restart::EveryDockerd => {
                    d.swarm.restart_every_dockerd().await;
                    // The writer's container stopped with the manager's engine.
                    d.restart_probe().await;
                }
            }
            wait_for("the set re-addressed at the new tasks", STEP, || async {
                let tasks = d.tasks(MONGO).await?;
                if let Some(t) = tasks.iter().find(|t| before_ids.contains(&t.id)) {
                    return Err(format!("slot {} still runs its old task", t.slot));
                }
                d.check_converged(3).await
            })
            .await
        })
        .await;
    let after = identity(d).await;
    assert_eq!(
        after.replica_set_id, before_identity.replica_set_id,
        "{what}: the set's replica set id changed: a new set was initiated"
    );
    // A forced reconfig raises the version by 10000 or more (MongoDB's rule): the set was
    // re-addressed, not rebuilt.
    assert!(
        after.config_version >= before_identity.config_version + 10_000,
        "{what}: config version {} -> {}: no re-addressing",
        before_identity.config_version,
        after.config_version
    );
    assert_step_kept_everything(d, what, &seen, false).await;
    eprintln!(
        "[durable] {what}: re-addressed, replica set id {}, config version {} -> {}",
        after.replica_set_id, before_identity.config_version, after.config_version
    );
    seen
}

/// What the reconciler remembers of the set (`replsets/rs0/identity`).
async fn identity(d: &Deployment) -> backend_core::SetIdentity {
    let raw = d
        .store_get("registrator/replsets/rs0/identity")
        .await
        .expect("the set's identity in the store");
    backend_core::SetIdentity::from_json(raw.as_bytes())
        .unwrap_or_else(|e| panic!("identity {raw:?}: {e}"))
}

/// Every volume removed while the service is at 0, then back to 3: the members are empty, and
/// the reconciler refuses to initiate over the set the store remembers.
async fn refuses_a_new_set_over_the_old_one(d: &Deployment) {
    let id = identity(d).await.replica_set_id;
    let uri = d
        .store_get("registrator/replsets/rs0/uri")
        .await
        .expect("the URI");
    d.swarm_scale_mongo(0).await;
    wait_for(
        "every mongo task stopped and its volumes removed",
        STEP,
        || async {
            let n = d.tasks(MONGO).await?.len();
            if n > 0 {
                return Err(format!("{n} tasks still running"));
            }
            d.remove_mongo_volumes().await.map(|_| ())
        },
    )
    .await;
    d.swarm_scale_mongo(3).await;
    let status = wait_for("the refusal in the status", STEP, || async {
        let s = d.status().await?;
        if s.next.reason == "known_set_without_data" {
            Ok(s)
        } else {
            Err(format!("{:?}", s.next))
        }
    })
    .await;
    assert!(
        status.next.detail.contains(&id) && status.next.detail.contains("forget-set"),
        "the refusal names the set and the way out: {}",
        status.next.detail
    );
    assert_eq!(status.config_version, 0, "no config: nothing was initiated");
    assert_eq!(
        d.store_get("registrator/replsets/rs0/uri")
            .await
            .expect("the URI"),
        uri,
        "no URI for an empty set in place of the old one"
    );
    assert_eq!(identity(d).await.replica_set_id, id, "the identity is kept");
    eprintln!(
        "[durable] without the data: refused, {}",
        status.next.detail
    );
}

/// The deployed service has the simulator's healthcheck and a volume of each kind per task on
/// the task's node.
async fn assert_stack_shape(d: &Deployment) {
    let health = d
        .manager()
        .docker(&[
            "service",
            "inspect",
            "-f",
            "{{json .Spec.TaskTemplate.ContainerSpec.Healthcheck.Test}}",
            MONGO,
        ])
        .await
        .expect("service inspect");
    assert_eq!(
        health,
        serde_json::json!(["CMD-SHELL", SIM_HEALTHCHECK]).to_string()
    );
    for t in d.tasks(MONGO).await.expect("tasks") {
        let volumes = d.mongo_volumes(t.node).await.expect("volume ls");
        for kind in ["db", "configdb"] {
            let name = format!("{MONGO}-{kind}");
            assert!(
                volumes.contains_key(&name),
                "slot {} on dnode{}: no volume {name} there: {volumes:?}",
                t.slot,
                t.node
            );
        }
    }
}

/// The checks after every step: the step's acknowledged writes readable, no config that
/// changed more than one voter, at most one member not ready at a time.
async fn assert_step_kept_everything(
    d: &Deployment,
    what: &str,
    seen: &Observed,
    one_at_a_time: bool,
) {
    assert!(
        !seen.acknowledged().is_empty(),
        "{what}: no write was acknowledged during the step: {:?}",
        seen.writes.last()
    );
    let lost = d.unreadable(&seen.acknowledged()).await;
    assert!(
        lost.is_empty(),
        "{what}: acknowledged writes not readable with read concern majority: {lost:?}"
    );
    let bad = seen.more_than_one_voter_changed();
    assert!(
        bad.is_empty(),
        "{what}: configs that changed more than one voter: {bad:#?}"
    );
    // A rolling update or a reschedule takes one member at a time; a whole restart takes all
    // (that is what it is), and only its writes and configs are judged.
    if one_at_a_time {
        let (most, round) = seen.most_not_ready(&[1, 2, 3]);
        assert!(
            most <= 1,
            "{what}: {most} members were not ready at once: {round:#?}"
        );
    }
}

/// A rolling update of the mongo service with `args`, observed; then the checks of every
/// step, and that each slot kept its node's volume and came back without an initial sync.
async fn rolling_update(d: &Deployment, what: &str, args: &[&str]) -> Observed {
    let before = d.tasks(MONGO).await.expect("tasks");
    let before_ids: BTreeSet<String> = before.iter().map(|t| t.id.clone()).collect();
    let volumes_before = volumes_by_node(d).await;
    let (state, seen) = d
        .observe(what, async {
            d.update_mongo(args).await;
            d.wait_update_done(3, &before_ids, STEP, what).await
        })
        .await;
    assert_step_kept_everything(d, what, &seen, true).await;
    let after = d.tasks(MONGO).await.expect("tasks");
    let volumes_after = volumes_by_node(d).await;
    for t in &after {
        let old = before
            .iter()
            .find(|o| o.slot == t.slot)
            .expect("the same slots");
        let moved = if old.ip == t.ip { "same" } else { "new" };
        eprintln!(
            "[durable] {what}: slot {} dnode{} {} -> dnode{} {} ({moved} address)",
            t.slot, old.node, old.ip, t.node, t.ip
        );
        if t.node != old.node {
            continue;
        }
        // The same node: the same volume (created once, before the update) ...
        let name = format!("{MONGO}-db");
        assert_eq!(
            volumes_after[&t.node].get(&name),
            volumes_before[&t.node].get(&name),
            "{what}: slot {} stayed on dnode{} but its volume {name} is not the one it had",
            t.slot,
            t.node
        );
        // ... and so its data: ready sooner after it started than an initial sync takes.
        assert_ready_without_sync(what, &seen, t, &state);
    }
    seen
}

/// The member of task `t` was ready less than an initial sync after it was first seen in a
/// config at its new address (before that it waits for the reconciler to move it there).
fn assert_ready_without_sync(what: &str, seen: &Observed, t: &Task, state: &SetState) {
    let host = format!("{}:27017", t.ip);
    assert_eq!(state.members.get(&t.slot), Some(&host));
    let in_config = seen.first_in_a_config(t.slot, &host);
    let ready = seen.first_ready(t.slot, &host);
    match (in_config, ready) {
        (Some(c), Some(r)) => {
            assert!(
                r.saturating_sub(c) < SYNC_FLOOR,
                "{what}: slot {} kept its volume but needed {:.1}s from its config to being \
                 ready (an initial sync?)",
                t.slot,
                r.saturating_sub(c).as_secs_f64()
            );
            eprintln!(
                "[durable] {what}: slot {} in its config at {:.1}s, ready at {:.1}s",
                t.slot,
                c.as_secs_f64(),
                r.as_secs_f64()
            );
        }
        // The same address as before (no move), or not seen between two rounds.
        other => eprintln!(
            "[durable] {what}: slot {}: in a config/ready {other:?}",
            t.slot
        ),
    }
}

async fn volumes_by_node(d: &Deployment) -> BTreeMap<usize, BTreeMap<String, String>> {
    let mut all = BTreeMap::new();
    for i in 1..=d.swarm.len() {
        all.insert(i, d.mongo_volumes(i).await.expect("volume ls"));
    }
    all
}

/// (e): drain the node of a mongo task on a worker (the primary's where it is on one); its
/// task starts elsewhere with an empty volume, syncs, and only then votes.
async fn reschedule(d: &Deployment) -> Observed {
    let what = "reschedule";
    let (node, _) = d.worker_to_lose().await.expect("a mongo task on a worker");
    let before = d.tasks(MONGO).await.expect("tasks");
    let moving: Vec<Task> = before.iter().filter(|t| t.node == node).cloned().collect();
    let volumes_before = volumes_by_node(d).await;
    let (state, seen) = d
        .observe(what, async {
            d.set_availability(node, "drain").await;
            wait_for(
                "the drained node's mongo tasks to run elsewhere and the set to follow",
                STEP,
                || async {
                    let tasks = d.tasks(MONGO).await?;
                    if let Some(t) = tasks.iter().find(|t| t.node == node) {
                        return Err(format!("slot {} still on dnode{node}", t.slot));
                    }
                    d.check_converged(3).await
                },
            )
            .await
        })
        .await;
    d.set_availability(node, "active").await;
    assert_step_kept_everything(d, what, &seen, true).await;
    let after = d.tasks(MONGO).await.expect("tasks");
    let volumes_after = volumes_by_node(d).await;
    for old in &moving {
        let t = after
            .iter()
            .find(|t| t.slot == old.slot)
            .expect("the slot runs again");
        let host = format!("{}:27017", t.ip);
        assert_eq!(state.members.get(&t.slot), Some(&host));
        let name = format!("{MONGO}-db");
        // The old node keeps its volume; the new one has its own, made for this task.
        assert_eq!(
            volumes_after[&node].get(&name),
            volumes_before[&node].get(&name),
            "the drained node's volume {name} must stay"
        );
        assert!(
            volumes_after[&t.node].contains_key(&name),
            "no volume {name} on dnode{}",
            t.node
        );
        // A node that never ran a member has an empty volume: an initial sync, so ready no
        // sooner than the sync floor. One that did (a member passed through it during an
        // update) keeps that old copy, and the member catches up from it ...
        let ready = seen
            .first_ready(t.slot, &host)
            .unwrap_or_else(|| panic!("{what}: slot {} never seen ready", t.slot));
        let empty = !volumes_before[&t.node].contains_key(&name);
        assert!(
            !empty || ready >= SYNC_FLOOR,
            "{what}: slot {} on dnode{} with an empty volume was ready after {:.1}s, sooner \
             than its initial sync can take",
            t.slot,
            t.node,
            ready.as_secs_f64()
        );
        // ... and its vote only once it was ready: never seen syncing after a config gave it.
        let voting = seen
            .first_voting_config(t.slot, &host)
            .unwrap_or_else(|| panic!("{what}: no config seen where slot {} votes", t.slot));
        let syncing_after_vote = seen.rounds.iter().find(|r| {
            r.at >= voting.first_seen
                && r.members.iter().any(|m| {
                    m.slot == t.slot
                        && m.host == host
                        && matches!(m.health, test_support::stack::MemberHealth::NotReady(_))
                })
        });
        assert!(
            syncing_after_vote.is_none(),
            "{what}: slot {} had its vote (config version {}) while not ready: {syncing_after_vote:#?}",
            t.slot,
            voting.version
        );
        eprintln!(
            "[durable] {what}: slot {} dnode{} -> dnode{}: ready after {:.1}s, voting from \
             config version {} (seen at {:.1}s)",
            t.slot,
            old.node,
            t.node,
            ready.as_secs_f64(),
            voting.version,
            voting.first_seen.as_secs_f64()
        );
    }
    seen
}
