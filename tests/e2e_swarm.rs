//! End to end: the whole system as swarm services, deployed from `compose/stack.yml` (etcd) and
//! `compose/stack.consul.yml` (Consul) on Docker-in-Docker nodes from `scripts/swarm-nodes`,
//! with the offline images of `scripts/images` (the replica-set simulator in place of mongod).
//! Both on 3 managers (each holds one member of the store's cluster: an etcd member, or a
//! Consul server beside the Consul agent that every node runs) and 1 worker.
//!
//! One walk-through per store of what operators do and what goes wrong in production: scaling
//! with `replset-reconciler scale`, a task removed by hand, the reconciler leader killed, the
//! bridge service removed and re-deployed, and a manager lost: the one with a store member,
//! the reconciler leader and (where it can be arranged) the primary. After each step the replica
//! set (as the leader reports it from the primary) equals the service's running tasks, the URI
//! in the store lists exactly them, and a `w: "majority"` write made at the start is still
//! readable through that URI from the example application's container on the overlay network.
//!
//! Heavy (3 to 4 minutes each): `scripts/test` runs them in their own pass, after
//! `scripts/images`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use test_support::dind::Swarm;
use test_support::stack::{
    Deployment, StackOptions, Store, APP, BRIDGE, CONVERGE, MONGO, PROXY, RECONCILER,
};
use test_support::wait_for;

/// The reconciler's removal grace in this stack: short, so that scaling down is quick.
const REMOVAL_GRACE: &str = "5s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stack_keeps_the_replica_set_equal_to_the_service() {
    walk_through(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_stack_keeps_the_replica_set_equal_to_the_service() {
    walk_through(Store::Consul).await;
}

async fn assert_start_doc_readable(d: &Deployment, after: &str) {
    let doc = wait_for(
        &format!("the start document through the URI ({after})"),
        Duration::from_secs(90),
        || d.app_read("e2e-start"),
    )
    .await;
    assert_eq!(doc["value"], "written-at-start", "{after}: {doc}");
}

async fn walk_through(store: Store) {
    // a manager can be lost: the swarm keeps its raft quorum, the store its own
    let swarm = Swarm::up_with_managers(4, 3).await;
    // Up to 5 members on 3 or 4 nodes: several per node, a volume per slot.
    let mut options = StackOptions::new(REMOVAL_GRACE);
    options.several_per_node = true;
    let d = Deployment::deploy_with(swarm, store, options).await;

    // --- deployed: 3 members, and a majority write to check at every step. The bridges have
    // no Docker socket of their own: they see their engines through each node's docker-proxy.
    let mounts = d
        .manager()
        .docker(&[
            "service",
            "inspect",
            BRIDGE,
            "--format",
            "{{json .Spec.TaskTemplate.ContainerSpec.Mounts}}",
        ])
        .await
        .expect("inspect the bridge's service");
    assert!(
        !mounts.contains("docker.sock"),
        "the bridge mounts the socket: {mounts}"
    );
    let initial = d.wait_converged(3, "deploy").await;
    // The proxies are on no overlay network: a node whose engine cannot join one (Docker's
    // "error creating vxlan interface: file exists" after a dockerd restart) keeps its proxy,
    // so its bridge still sees its tasks.
    let proxies = d
        .manager()
        .docker(&[
            "service",
            "ps",
            PROXY,
            "--filter",
            "desired-state=running",
            "-q",
        ])
        .await
        .expect("list the proxies' tasks");
    let mut args = vec![
        "inspect",
        "--format",
        "{{range .NetworksAttachments}}{{.Network.Spec.Name}}/{{.Network.DriverState.Name}} {{end}}",
    ];
    args.extend(proxies.split_whitespace());
    let networks = d
        .manager()
        .docker(&args)
        .await
        .expect("inspect the proxies' tasks");
    assert_eq!(
        networks.lines().count(),
        4,
        "one proxy per node: {networks}"
    );
    for task in networks.lines() {
        assert_eq!(task.trim(), "host/host", "a proxy's networks: {networks}");
    }
    if store == Store::Consul {
        // Each bridge registers its node's tasks with its own node's agent.
        wait_for(
            "each mongo task in the catalog under its own node",
            Duration::from_secs(60),
            || async {
                let tasks = d.tasks(MONGO).await?;
                let want: BTreeSet<String> = tasks
                    .iter()
                    .map(|t| d.swarm.node(t.node).hostname())
                    .collect();
                let got = d.catalog_nodes(MONGO).await?;
                if got == want {
                    Ok(())
                } else {
                    Err(format!("catalog nodes {got:?}, task nodes {want:?}"))
                }
            },
        )
        .await;
    }
    wait_for(
        "a w: majority write through the URI",
        Duration::from_secs(90),
        || d.app_write("e2e-start", "written-at-start"),
    )
    .await;
    assert_start_doc_readable(&d, "deploy").await;

    // --- authentication is on: a client that does not log in is refused (13), the app's
    // user (above) is not.
    let anonymous = d
        .anonymous_read("e2e-start")
        .await
        .expect("run a one-off client");
    assert!(!anonymous.success, "read without a login: {anonymous:?}");
    assert!(
        anonymous.stderr.contains("requires authentication"),
        "refused for want of a login: {anonymous:?}"
    );

    // --- scale 3 -> 5 -> 3, one member at a time
    d.scale(5).await;
    let five = d.wait_converged(5, "scale to 5").await;
    assert!(five.config_version > initial.config_version);
    assert_start_doc_readable(&d, "scale to 5").await;
    d.scale(3).await;
    d.wait_converged(3, "scale back to 3").await;
    assert_start_doc_readable(&d, "scale back to 3").await;

    // --- `docker rm -f` of a mongo task on a worker: the slot comes back with a new task and
    // the same member `_id` gets the new host
    let tasks = d.tasks(MONGO).await.expect("tasks");
    let victim = tasks
        .iter()
        .find(|t| t.node != 1)
        .expect("a mongo task on a worker")
        .clone();
    d.swarm
        .node(victim.node)
        .docker(&["rm", "-f", &victim.container])
        .await
        .expect("docker rm -f");
    let after_rm = wait_for(
        "the removed task's slot to run again as a new task",
        CONVERGE,
        || async {
            let state = d.check_converged(3).await?;
            let tasks = d.tasks(MONGO).await?;
            match tasks.iter().find(|t| t.slot == victim.slot) {
                Some(t) if t.id != victim.id => Ok((state, t.clone())),
                other => Err(format!("slot {}: {other:?}", victim.slot)),
            }
        },
    )
    .await;
    let (state, replacement) = after_rm;
    assert_eq!(
        state.members.get(&victim.slot),
        Some(&format!("{}:27017", replacement.ip)),
        "member {} follows its slot to the new task",
        victim.slot
    );
    eprintln!(
        "[e2e {store:?}] slot {} rescheduled: {} -> {} (same member _id)",
        victim.slot, victim.ip, replacement.ip
    );
    assert_start_doc_readable(&d, "task removed by hand").await;

    // --- kill the reconciler leader's task: the other replica takes over
    let leader = wait_for("a reconciler leader", Duration::from_secs(60), || {
        d.leader()
    })
    .await;
    let reconcilers = d.tasks(RECONCILER).await.expect("reconciler tasks");
    let leading = reconcilers
        .iter()
        .find(|t| t.container.starts_with(&leader))
        .unwrap_or_else(|| panic!("leader {leader} is none of {reconcilers:?}"))
        .clone();
    d.swarm
        .node(leading.node)
        .docker(&["rm", "-f", &leading.container])
        .await
        .expect("docker rm -f the leader");
    let killed_at = Instant::now();
    let new_leader = wait_for(
        "another reconciler to lead",
        Duration::from_secs(120),
        || async {
            match d.leader().await {
                Ok(l) if l != leader => Ok(l),
                Ok(l) => Err(format!("still {l}")),
                Err(e) => Err(e),
            }
        },
    )
    .await;
    eprintln!(
        "[e2e {store:?}] reconciler leader {leader} killed; {new_leader} leads after {:.1}s",
        killed_at.elapsed().as_secs_f64()
    );

    // --- remove and re-deploy the bridge service: the records expire, but every member is still
    // up, so nothing is removed and no reconfig happens at all
    let before = d.wait_converged(3, "reconciler leader killed").await;
    assert_start_doc_readable(&d, "reconciler leader killed").await;
    d.manager()
        .docker(&["service", "rm", BRIDGE])
        .await
        .expect("docker service rm");
    wait_for(
        "the mongo records to expire with the bridges' lease",
        Duration::from_secs(90),
        || async {
            match d.mongo_record_count().await? {
                0 => Ok(()),
                n => Err(format!("{n} records")),
            }
        },
    )
    .await;
    // Longer than the removal grace plus the debounce: a member would have been removed by now
    // if missing records alone were enough.
    let window = Instant::now() + Duration::from_secs(10);
    while Instant::now() < window {
        let status = d.status().await.expect("status");
        assert_eq!(
            status.members.len(),
            3,
            "a member was removed while the records were gone: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.stack_deploy().await;
    let after = d.wait_converged(3, "bridge re-deployed").await;
    assert_eq!(after, before, "the bridge flap changed the replica set");
    assert_start_doc_readable(&d, "bridge re-deployed").await;

    lose_a_manager(&d).await;

    // --- after all of it, no secret is in any log, any service's spec, or the store.
    let leaked = d
        .secrets_found()
        .await
        .expect("read the logs, specs and store");
    assert!(leaked.is_empty(), "secrets leaked: {leaked:?}");

    d.swarm.down().await;
}

/// A manager lost (3 managers + 1 worker): the one that holds a store member and the
/// reconciler leader, and the primary where that could be arranged. The store keeps its quorum
/// (every key readable and writable through the two members left), the other reconciler
/// leads, the lost tasks run elsewhere, the set equals the tasks again, and every write
/// acknowledged before and during the loss is still there.
async fn lose_a_manager(d: &Deployment) {
    let plan = d
        .arrange_manager_loss(3)
        .await
        .expect("a manager with the reconciler leader");
    let lost = plan.node;
    assert!(
        !plan.store_members.is_empty(),
        "dnode{lost} holds no store member: {plan:?}"
    );
    // The probe on a manager that stays, writing through the URI as a new client would.
    let keeper = (1..=d.swarm.managers())
        .find(|i| *i != lost)
        .expect("another manager");
    d.start_probe_on(keeper).await;
    let mut acknowledged = Vec::new();
    for k in 0..5 {
        let id = format!("before-manager-loss-{k}");
        wait_for("a write before the loss", Duration::from_secs(60), || {
            d.probe_write(&id)
        })
        .await;
        acknowledged.push(id);
    }
    let all_members = d
        .check_store_quorum("e2e/quorum", "before")
        .await
        .expect("the store cluster before the loss");
    assert_eq!(all_members.len(), 3, "3 store members: {all_members:?}");
    let tasks = d.tasks(MONGO).await.expect("tasks");
    let lost_slots: BTreeSet<i64> = tasks
        .iter()
        .filter(|t| t.node == lost)
        .map(|t| t.slot)
        .collect();
    let before_loss = d
        .check_converged(3)
        .await
        .expect("converged before the loss");

    d.swarm.kill_node(lost).await;
    let lost_at = Instant::now();
    eprintln!(
        "[e2e {:?}] killed manager dnode{lost}: store members {:?}, reconciler leader {}, \
         slots {lost_slots:?}, primary there: {}",
        d.store, plan.store_members, plan.leader.container, plan.primary_there
    );

    // The store: 2 of 3 members are a quorum; a write through each is read through both.
    let (members_left, store_at) = wait_for(
        "the store to take writes through the members left",
        CONVERGE,
        || async {
            let left = d.check_store_quorum("e2e/quorum", "after").await?;
            Ok::<_, String>((left, lost_at.elapsed()))
        },
    )
    .await;
    assert_eq!(
        members_left.len(),
        2,
        "the members on the live managers: {members_left:?}"
    );
    for member in &plan.store_members {
        assert!(!members_left.contains(member), "{member} was lost");
    }

    // The other reconciler leads (the lost one's lease expires with its node).
    let new_leader = wait_for("the other reconciler to lead", CONVERGE, || async {
        let t = d.leader_task().await?;
        if t.container == plan.leader.container || t.node == lost {
            Err(format!("still {} on dnode{}", t.container, t.node))
        } else {
            Ok((t, lost_at.elapsed()))
        }
    })
    .await;

    let mut k = 0;
    let primary_back = wait_for(
        "a primary (a w: majority write through the URI)",
        CONVERGE,
        || {
            k += 1;
            let id = format!("after-manager-loss-{k}");
            async move { d.probe_write(&id).await.map(|()| (id, lost_at.elapsed())) }
        },
    )
    .await;
    acknowledged.push(primary_back.0.clone());

    // Every task of the stack that ran on the lost node runs elsewhere (the store member
    // pinned there excepted), and the set equals the mongo tasks.
    let whole = wait_for(
        "the lost tasks to run elsewhere and the set to follow them",
        CONVERGE,
        || async {
            for (service, want) in [(MONGO, 3), (RECONCILER, 2), (APP, 1)] {
                let tasks = d.tasks(service).await?;
                if let Some(t) = tasks.iter().find(|t| t.node == lost) {
                    return Err(format!("{service}: task {} still on the lost node", t.id));
                }
                if tasks.len() != want {
                    return Err(format!("{service}: {} running tasks", tasks.len()));
                }
            }
            d.check_converged(3).await
        },
    )
    .await;
    let whole_after = lost_at.elapsed();
    for slot in &lost_slots {
        assert_ne!(
            whole.members.get(slot),
            before_loss.members.get(slot),
            "slot {slot} was on the lost node and must have moved to a new host"
        );
    }
    eprintln!(
        "[e2e {:?}] manager loss: the store took writes after {:.1}s; {} leads after {:.1}s; a \
         primary took writes after {:.1}s; the set equalled the tasks again after {:.1}s",
        d.store,
        store_at.as_secs_f64(),
        new_leader.0.container,
        new_leader.1.as_secs_f64(),
        primary_back.1.as_secs_f64(),
        whole_after.as_secs_f64()
    );
    assert_start_doc_readable(d, "manager lost").await;
    let missing = d.unreadable(&acknowledged).await;
    assert!(
        missing.is_empty(),
        "acknowledged writes lost with the manager: {missing:?}"
    );
}
