//! End to end: the whole system as swarm services, deployed from `compose/stack.yml` on a
//! 3-node swarm (1 manager, 2 workers; Docker-in-Docker nodes from `scripts/swarm-nodes`), with
//! the offline images of `scripts/images` (the replica-set simulator in place of mongod).
//!
//! One test walks through what operators do and what goes wrong in production: scaling with
//! `replset-reconciler scale`, a task removed by hand, the reconciler leader killed, the bridge
//! service removed and re-deployed, and a worker node lost. After each step the replica set (as
//! the leader reports it from the primary) equals the service's running tasks, the URI in the
//! store lists exactly them, and a `w: "majority"` write made at the start is still readable
//! through that URI from the example application's container on the overlay network.
//!
//! Heavy (about 4 minutes): `scripts/test` runs it in its own pass. Needs `scripts/images` first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::dind::{host_docker, Node, Swarm};
use test_support::wait_for;

const STACK: &str = "e2e";
const MONGO: &str = "e2e_mongo";
const NETWORK: &str = "e2e_replset";
const BACKEND: &str = "etcd://etcd:2379/registrator";
const IMAGES: [&str; 5] = [
    "local/swarm-registrator",
    "local/replset-reconciler",
    "local/replset-demo-app",
    "local/mongo-sim",
    "local/etcd",
];
/// The reconciler's removal grace in this stack: short, so that scaling down is quick.
const REMOVAL_GRACE: &str = "5s";
/// How long one step may take to converge; generous, as the machine is shared.
const CONVERGE: Duration = Duration::from_secs(240);

/// One running task of a service, as the manager reports it.
#[derive(Debug, Clone)]
struct Task {
    id: String,
    slot: i64,
    node: usize,
    container: String,
    /// The task's address on the stack's overlay network.
    ip: String,
}

/// The replica set as the reconciler leader reported it last, once it equals the tasks.
#[derive(Debug, Clone, PartialEq)]
struct SetState {
    /// member `_id` (= slot) to host
    members: BTreeMap<i64, String>,
    config_version: i64,
}

struct Deployment {
    swarm: Swarm,
    /// Node id (as the swarm knows it) to node index (1 = manager).
    node_index: BTreeMap<String, usize>,
}

impl Deployment {
    async fn deploy(swarm: Swarm) -> Deployment {
        let mut d = Deployment {
            swarm,
            node_index: BTreeMap::new(),
        };
        let nodes = d
            .manager()
            .docker(&["node", "ls", "--format", "{{.ID}} {{.Hostname}}"])
            .await
            .expect("docker node ls");
        for line in nodes.lines() {
            let (id, host) = line.split_once(' ').expect("node ls line");
            let index = host
                .trim_start_matches("dnode")
                .parse()
                .expect("node hostnames are dnode<i>");
            d.node_index.insert(id.to_string(), index);
        }
        d.stack_deploy().await;
        d
    }

    fn manager(&self) -> Node {
        self.swarm.manager()
    }

    /// `docker stack deploy` of compose/stack.yml with the offline images (also re-deploys).
    async fn stack_deploy(&self) {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compose/stack.yml");
        let file = file.to_str().expect("utf-8 path");
        let env = [
            ("STACK", STACK),
            ("REGISTRATOR_IMAGE", "local/swarm-registrator"),
            ("RECONCILER_IMAGE", "local/replset-reconciler"),
            ("DEMO_APP_IMAGE", "local/replset-demo-app"),
            ("MONGO_IMAGE", "local/mongo-sim"),
            ("ETCD_IMAGE", "local/etcd"),
            ("REMOVAL_GRACE", REMOVAL_GRACE),
        ];
        self.manager()
            .docker_with_env(
                &env,
                &[
                    "stack",
                    "deploy",
                    "--resolve-image",
                    "never",
                    "-c",
                    file,
                    STACK,
                ],
            )
            .await
            .expect("docker stack deploy");
    }

    /// The running tasks of `service` (desired and actual state running).
    async fn tasks(&self, service: &str) -> Result<Vec<Task>, String> {
        let ids = self
            .manager()
            .docker(&[
                "service",
                "ps",
                service,
                "--filter",
                "desired-state=running",
                "--no-trunc",
                "-q",
            ])
            .await?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["inspect"];
        args.extend(&ids);
        let out = self.manager().docker(&args).await?;
        let tasks: Vec<Value> =
            serde_json::from_str(&out).map_err(|e| format!("docker inspect of tasks: {e}"))?;
        let mut running = Vec::new();
        for t in tasks {
            if t["Status"]["State"] != "running" {
                continue;
            }
            let node = t["NodeID"].as_str().unwrap_or_default();
            let ip = t["NetworksAttachments"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["Network"]["Spec"]["Name"] == NETWORK)
                .and_then(|a| a["Addresses"][0].as_str())
                .and_then(|cidr| cidr.split('/').next())
                .unwrap_or_default()
                .to_string();
            running.push(Task {
                id: t["ID"].as_str().unwrap_or_default().to_string(),
                slot: t["Slot"].as_i64().unwrap_or(0),
                node: *self
                    .node_index
                    .get(node)
                    .ok_or_else(|| format!("task on unknown node {node}"))?,
                container: t["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ip,
            });
        }
        Ok(running)
    }

    /// Runs a command in the container of a running task of `service`, on that task's node.
    async fn exec(&self, service: &str, cmd: &[&str]) -> Result<String, String> {
        let tasks = self.tasks(service).await?;
        let task = tasks
            .iter()
            .find(|t| !t.container.is_empty())
            .ok_or_else(|| format!("no running task of {service}"))?;
        let mut args = vec!["exec", task.container.as_str()];
        args.extend(cmd);
        self.swarm.node(task.node).docker(&args).await
    }

    async fn etcd_get(&self, key: &str) -> Result<String, String> {
        self.exec("e2e_etcd", &["etcdctl", "get", key, "--print-value-only"])
            .await
    }

    async fn mongo_record_count(&self) -> Result<usize, String> {
        let keys = self
            .exec(
                "e2e_etcd",
                &[
                    "etcdctl",
                    "get",
                    "--prefix",
                    "--keys-only",
                    &format!("registrator/services/{MONGO}/"),
                ],
            )
            .await?;
        Ok(keys.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// The holder of the reconciler's leadership of rs0 (the etcd election's oldest key).
    async fn leader(&self) -> Result<String, String> {
        self.exec(
            "e2e_etcd",
            &[
                "etcdctl",
                "get",
                "--prefix",
                "--sort-by=CREATE",
                "--order=ASCEND",
                "--limit=1",
                "--print-value-only",
                "registrator/replsets/rs0/leader/",
            ],
        )
        .await
        .and_then(|v| {
            let v = v.trim().to_string();
            if v.is_empty() {
                Err("no leader".into())
            } else {
                Ok(v)
            }
        })
    }

    /// One check of "the replica set equals the service's tasks": `n` running tasks; the
    /// leader's status says converged, with a primary, every member healthy and voting, and
    /// exactly the tasks' slots and addresses as members; the URI lists exactly them.
    async fn check_converged(&self, n: usize) -> Result<SetState, String> {
        let tasks = self.tasks(MONGO).await?;
        if tasks.len() != n || tasks.iter().any(|t| t.ip.is_empty()) {
            return Err(format!("{} running tasks: {tasks:?}", tasks.len()));
        }
        let want: BTreeMap<i64, String> = tasks
            .iter()
            .map(|t| (t.slot, format!("{}:27017", t.ip)))
            .collect();
        let raw = self.etcd_get("registrator/replsets/rs0/status").await?;
        let status: Value =
            serde_json::from_str(&raw).map_err(|e| format!("status {raw:?}: {e}"))?;
        let members: BTreeMap<i64, String> = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["_id"].as_i64().unwrap_or(-1),
                    m["host"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let all_healthy_voters = status["members"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|m| m["healthy"] == true && m["votes"] == 1);
        if status["converged"] != true
            || status["primary"].is_null()
            || members != want
            || !all_healthy_voters
        {
            return Err(format!("tasks {want:?}; status {status}"));
        }
        let uri = self.etcd_get("registrator/replsets/rs0/uri").await?;
        let hosts: BTreeSet<&str> = uri
            .trim()
            .strip_prefix("mongodb://")
            .and_then(|rest| rest.split('/').next())
            .map(|h| h.split(',').collect())
            .unwrap_or_default();
        let want_hosts: BTreeSet<&str> = want.values().map(String::as_str).collect();
        if hosts != want_hosts || !uri.contains("replicaSet=rs0") {
            return Err(format!("uri {uri:?}, tasks {want:?}"));
        }
        Ok(SetState {
            members,
            config_version: status["config_version"].as_i64().unwrap_or(-1),
        })
    }

    async fn wait_converged(&self, n: usize, after: &str) -> SetState {
        let started = Instant::now();
        let state = wait_for(
            &format!("the replica set to equal the {n} tasks ({after})"),
            CONVERGE,
            || self.check_converged(n),
        )
        .await;
        eprintln!(
            "[e2e] {after}: converged with {n} members in {:.1}s (config version {})",
            started.elapsed().as_secs_f64(),
            state.config_version
        );
        state
    }

    /// Reads `id` through the URI from the example application's container.
    async fn app_read(&self, id: &str) -> Result<Value, String> {
        let out = self
            .exec("e2e_app", &["replset-demo-app", "read", id, "--wait", "30"])
            .await?;
        serde_json::from_str(&out).map_err(|e| format!("read printed {out:?}: {e}"))
    }

    async fn assert_start_doc_readable(&self, after: &str) {
        let doc = wait_for(
            &format!("the start document through the URI ({after})"),
            Duration::from_secs(90),
            || self.app_read("e2e-start"),
        )
        .await;
        assert_eq!(doc["value"], "written-at-start", "{after}: {doc}");
    }

    /// `replset-reconciler scale` as operators run it: a one-off container on the manager, on
    /// the stack's network, with the manager's Docker API.
    async fn scale(&self, n: usize) {
        let started = Instant::now();
        let to = format!("{MONGO}={n}");
        self.manager()
            .docker(&[
                "run",
                "--rm",
                "--user",
                "0",
                "--network",
                NETWORK,
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "local/replset-reconciler",
                BACKEND,
                "--service",
                MONGO,
                "--replset",
                "rs0",
                "scale",
                &to,
            ])
            .await
            .unwrap_or_else(|e| panic!("replset-reconciler scale {to}: {e}"));
        eprintln!(
            "[e2e] replset-reconciler scale {to}: {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_keeps_the_replica_set_equal_to_the_service_through_scaling_and_failures() {
    for image in IMAGES {
        if host_docker(&["image", "inspect", image]).await.is_err() {
            panic!("image {image} is missing on the host engine: run scripts/images first");
        }
    }
    let swarm = Swarm::up(3).await;
    swarm.load_images(&IMAGES).await;
    let d = Deployment::deploy(swarm).await;

    // --- deployed: 3 members, and a majority write to check at every step
    let initial = d.wait_converged(3, "deploy").await;
    wait_for(
        "a w: majority write through the URI",
        Duration::from_secs(90),
        || {
            d.exec(
                "e2e_app",
                &[
                    "replset-demo-app",
                    "write",
                    "e2e-start",
                    "--value",
                    "written-at-start",
                ],
            )
        },
    )
    .await;
    d.assert_start_doc_readable("deploy").await;

    // --- scale 3 -> 5 -> 3, one member at a time
    d.scale(5).await;
    let five = d.wait_converged(5, "scale to 5").await;
    assert!(five.config_version > initial.config_version);
    d.assert_start_doc_readable("scale to 5").await;
    d.scale(3).await;
    d.wait_converged(3, "scale back to 3").await;
    d.assert_start_doc_readable("scale back to 3").await;

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
        "[e2e] slot {} rescheduled: {} -> {} (same member _id)",
        victim.slot, victim.ip, replacement.ip
    );
    d.assert_start_doc_readable("task removed by hand").await;

    // --- kill the reconciler leader's task: the other replica takes over
    let leader = wait_for("a reconciler leader", Duration::from_secs(60), || {
        d.leader()
    })
    .await;
    let reconcilers = d.tasks("e2e_reconciler").await.expect("reconciler tasks");
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
        "[e2e] reconciler leader {leader} killed; {new_leader} leads after {:.1}s",
        killed_at.elapsed().as_secs_f64()
    );

    // --- remove and re-deploy the bridge service: the records expire, but every member is still
    // up, so nothing is removed and no reconfig happens at all
    let before = d.wait_converged(3, "before the bridge flap").await;
    d.manager()
        .docker(&["service", "rm", "e2e_registrator"])
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
        let raw = d
            .etcd_get("registrator/replsets/rs0/status")
            .await
            .expect("status");
        let status: Value = serde_json::from_str(&raw).expect("status JSON");
        assert_eq!(
            status["members"].as_array().map(Vec::len),
            Some(3),
            "a member was removed while the records were gone: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.stack_deploy().await;
    let after = d.wait_converged(3, "bridge re-deployed").await;
    assert_eq!(after, before, "the bridge flap changed the replica set");
    d.assert_start_doc_readable("bridge re-deployed").await;

    // --- lose a worker node: the one with the primary where the primary is on a worker
    // A probe on the manager (never lost) writes through the URI, as a new client would.
    d.manager()
        .docker(&[
            "run",
            "-d",
            "--name",
            "e2e-probe",
            "--network",
            NETWORK,
            "local/replset-demo-app",
            BACKEND,
            "serve",
            "--interval",
            "3600",
        ])
        .await
        .expect("start the probe container");
    let tasks = d.tasks(MONGO).await.expect("tasks");
    let raw = d
        .etcd_get("registrator/replsets/rs0/status")
        .await
        .expect("status");
    let status: Value = serde_json::from_str(&raw).expect("status JSON");
    let primary_ip = status["primary"]
        .as_str()
        .and_then(|h| h.rsplit_once(':'))
        .map(|(ip, _)| ip.to_string())
        .unwrap_or_default();
    let on_workers: Vec<&Task> = tasks.iter().filter(|t| t.node != 1).collect();
    let lost = on_workers
        .iter()
        .find(|t| t.ip == primary_ip)
        .or_else(|| on_workers.first())
        .expect("a mongo task on a worker")
        .node;
    let lost_slots: BTreeSet<i64> = tasks
        .iter()
        .filter(|t| t.node == lost)
        .map(|t| t.slot)
        .collect();
    let had_primary = tasks.iter().any(|t| t.node == lost && t.ip == primary_ip);
    let before_loss = d
        .check_converged(3)
        .await
        .expect("converged before the loss");
    d.swarm.kill_node(lost).await;
    let lost_at = Instant::now();
    eprintln!("[e2e] killed node dnode{lost} (slots {lost_slots:?}, primary there: {had_primary})");

    let mut k = 0;
    let primary_back = wait_for(
        "a primary (a w: majority write through the URI)",
        CONVERGE,
        || {
            k += 1;
            let id = format!("after-loss-{k}");
            let manager = d.manager();
            async move {
                let cmd = [
                    "exec",
                    "e2e-probe",
                    "replset-demo-app",
                    "write",
                    &id,
                    "--wait",
                    "5",
                ];
                match tokio::time::timeout(Duration::from_secs(15), manager.docker(&cmd)).await {
                    Ok(Ok(_)) => Ok(lost_at.elapsed()),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("write timed out".into()),
                }
            }
        },
    )
    .await;
    // Until the manager sees the node down, it still lists the lost tasks as running: wait for
    // every slot to run on a live node, and for the set to equal those tasks.
    let whole = wait_for(
        "the lost slots to run elsewhere and the set to follow them",
        CONVERGE,
        || async {
            let tasks = d.tasks(MONGO).await?;
            if let Some(t) = tasks.iter().find(|t| t.node == lost) {
                return Err(format!("task {} still on the lost node", t.id));
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
        "[e2e] node loss: a primary took writes after {:.1}s; the set equalled the tasks again \
         after {:.1}s",
        primary_back.as_secs_f64(),
        whole_after.as_secs_f64()
    );
    d.assert_start_doc_readable("node lost").await;
    d.manager()
        .docker(&["rm", "-f", "e2e-probe"])
        .await
        .expect("remove the probe container");

    d.swarm.down().await;
}
