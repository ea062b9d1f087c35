//! The project's stack (`compose/stack.yml` or `compose/stack.consul.yml`) deployed on a
//! [`Swarm`] of Docker-in-Docker nodes with the offline images of `scripts/images`, and the
//! checks that end-to-end tests and benchmarks make on it: the running tasks of a service as
//! the manager reports them, the store's keys (read inside the store's own container, which is
//! only on the overlay network), "the replica set equals the tasks", and the example
//! application's reads and writes through the published connection string.
//!
//! ```no_run
//! # async fn example() {
//! use test_support::dind::Swarm;
//! use test_support::stack::{Deployment, Store};
//! let swarm = Swarm::up(3).await;
//! let d = Deployment::deploy(swarm, Store::Etcd, "5s").await; // loads the images too
//! let state = d.wait_converged(3, "deploy").await; // members = the 3 tasks, all voting
//! d.scale(5).await; // replset-reconciler scale, as operators run it
//! # let _ = state;
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use backend_core::ReplSetStatus;
use serde_json::Value;

use crate::dind::{host_docker, Node, Swarm};
use crate::wait_for;

mod observe;
pub use observe::{ConfigSeen, ConfigStep, MemberHealth, MemberSeen, Observed, Round, WriteSeen};

/// The stack's name; every [`Swarm`] is its own, so it need not be unique.
pub const STACK: &str = "e2e";
/// The replicated mongo service of the stack.
pub const MONGO: &str = "e2e_mongo";
/// The stack's overlay network.
pub const NETWORK: &str = "e2e_replset";
/// What one-off containers get, as the stack's services do: the name of their node, where the
/// Consul stack's agent listens (`consul://host.docker.internal:8500/...`).
const NODE_HOST: &str = "host.docker.internal:host-gateway";
/// The leader-elected reconciler service of the stack.
pub const RECONCILER: &str = "e2e_reconciler";
/// The global bridge service of the stack.
pub const BRIDGE: &str = "e2e_registrator";
/// The global Docker API proxy the bridges read their engines through.
pub const PROXY: &str = "e2e_docker-proxy";
/// The example application's service.
pub const APP: &str = "e2e_app";
/// How long one step may take to converge; generous, as the machine is shared.
pub const CONVERGE: Duration = Duration::from_secs(240);
/// How long `replset-reconciler scale` may take (each step waits for the set to converge).
const SCALE: Duration = Duration::from_secs(600);

/// The simulator image's healthcheck (the stack's MONGO_HEALTHCHECK): its own binary asks the
/// member `hello` and exits 0 only for PRIMARY or SECONDARY.
pub const SIM_HEALTHCHECK: &str = "mongod --sim-probe --port 27017";
/// The mongo image the stack starts with.
pub const MONGO_IMAGE: &str = "local/mongo-sim";

/// The probe container of [`Deployment::start_probe`].
const PROBE: &str = "e2e-probe";
const STATUS_KEY: &str = "registrator/replsets/rs0/status";
const URI_KEY: &str = "registrator/replsets/rs0/uri";

/// Which store the stack runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Etcd,
    Consul,
}

impl Store {
    fn stack_file(self) -> &'static str {
        match self {
            Store::Etcd => "compose/stack.yml",
            Store::Consul => "compose/stack.consul.yml",
        }
    }

    /// The backend URI as the stack's services write it.
    pub fn backend(self) -> &'static str {
        match self {
            Store::Etcd => "etcd://etcd1:2379,etcd2:2379,etcd3:2379/registrator",
            Store::Consul => "consul://host.docker.internal:8500/registrator",
        }
    }

    /// The store's members, one service each (each pinned by the node label
    /// `registrator.<member>=true`, see [`Store::member_label`]): etcd's members, Consul's
    /// servers (the Consul agent on every node is the service `e2e_consul-agent`).
    pub fn services(self) -> &'static [&'static str] {
        match self {
            Store::Etcd => &["e2e_etcd1", "e2e_etcd2", "e2e_etcd3"],
            Store::Consul => &["e2e_consul1", "e2e_consul2", "e2e_consul3"],
        }
    }

    /// The node label that places the store's member `k` (1-based): `registrator.etcd<k>`
    /// or `registrator.consul<k>`.
    pub fn member_label(self, k: usize) -> String {
        match self {
            Store::Etcd => format!("registrator.etcd{k}"),
            Store::Consul => format!("registrator.consul{k}"),
        }
    }

    /// The offline images the stack needs with this store.
    pub fn images(self) -> [&'static str; 6] {
        [
            "local/swarm-registrator",
            "local/docker-socket-proxy",
            "local/replset-reconciler",
            "local/replset-demo-app",
            "local/mongo-sim",
            match self {
                Store::Etcd => "local/etcd",
                Store::Consul => "local/consul",
            },
        ]
    }
}

/// One running task of a service, as the manager reports it.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub slot: i64,
    /// The node's index in the [`Swarm`] (1 = manager).
    pub node: usize,
    pub container: String,
    /// The task's address on the stack's overlay network.
    pub ip: String,
}

/// How many of `n` members vote in a converged set: every one, but at most 7 and an odd
/// number from 3 on (docs/reconciler.md, rule 4; MongoDB allows 7 voters at most, and a fourth
/// voter of four adds no fault tolerance).
pub fn voters_of(n: usize) -> usize {
    let n = n.min(7);
    if n % 2 == 0 && n > 2 {
        n - 1
    } else {
        n
    }
}

/// The replica set as the reconciler leader reported it last, once it equals the tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct SetState {
    /// member `_id` (= slot) to host
    pub members: BTreeMap<i64, String>,
    pub config_version: i64,
    pub primary: String,
}

/// The manager a manager-loss test kills ([`Deployment::arrange_manager_loss`]).
#[derive(Debug, Clone)]
pub struct ManagerLoss {
    /// The node's index.
    pub node: usize,
    /// The reconciler task that leads, on that node.
    pub leader: Task,
    /// Whether the primary runs there too.
    pub primary_there: bool,
    /// The store's member services on that node (e.g. `e2e_etcd2`).
    pub store_members: Vec<String>,
}

/// How to deploy the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The reconciler's removal grace, e.g. "5s".
    pub removal_grace: String,
    /// More mongod flags for the stack's MONGO_EXTRA_ARGS, e.g. the simulator's
    /// `--sim-initial-sync-floor-ms 20000` for a new member that needs 20 s to sync.
    pub mongo_extra_args: String,
    /// More than one member per node (a swarm with fewer nodes than members): the stack's
    /// MONGO_MAX_PER_NODE=0 and a volume per slot (MONGO_VOLUME_SUFFIX). Off: the stack's
    /// default, one member per node and a volume per node.
    pub several_per_node: bool,
    /// The nodes that may run a member (labelled `registrator.mongo=true`, and the stack's
    /// MONGO_NODES constraint set to that label): as many as members keep each member on its
    /// node's data. Empty: any node (the stack's default).
    pub mongo_nodes: Vec<usize>,
}

impl StackOptions {
    pub fn new(removal_grace: &str) -> StackOptions {
        StackOptions {
            removal_grace: removal_grace.to_string(),
            mongo_extra_args: String::new(),
            several_per_node: false,
            mongo_nodes: Vec::new(),
        }
    }
}

/// The stack, deployed on a swarm.
#[derive(Debug)]
pub struct Deployment {
    pub swarm: Swarm,
    pub store: Store,
    options: StackOptions,
    /// The image of the mongo service in the stack file (a re-deploy keeps what an update set).
    mongo_image: std::sync::Mutex<String>,
    /// Node id (as the swarm knows it) to node index (1 = the first manager); read again
    /// after a repair (a node made anew has a new id).
    node_index: std::sync::Mutex<BTreeMap<String, usize>>,
    /// The node of the probe container ([`Deployment::start_probe_on`]).
    probe_node: std::sync::atomic::AtomicUsize,
    /// The stack's secrets (`scripts/stack-secrets`), removed on drop.
    secrets: Secrets,
    /// The nodes labelled `registrator.mongo=true` ([`StackOptions::mongo_nodes`], then
    /// [`Deployment::set_mongo_label`]).
    mongo_labelled: std::sync::Mutex<BTreeSet<usize>>,
}

/// The directory of the stack's secrets, made by `scripts/stack-secrets`; removed on drop.
#[derive(Debug)]
struct Secrets(PathBuf);

impl Secrets {
    fn make() -> Secrets {
        let dir = std::env::temp_dir().join(format!(
            "e2e-secrets-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let script = repo_file("scripts/stack-secrets");
        let out = std::process::Command::new(&script)
            .arg(&dir)
            .output()
            .expect("run scripts/stack-secrets");
        assert!(
            out.status.success(),
            "scripts/stack-secrets failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Secrets(dir)
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file of the repository.
fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// The stack's user of the example application (compose/mongo-users.json).
const APP_USER: &str = "app";
/// Where the probe container keeps the application's password.
const PROBE_PASSWORD: &str = "/tmp/app-password";

impl Deployment {
    /// Checks that the images exist on the host engine, loads them into every node and deploys
    /// the stack with the reconciler's removal grace `removal_grace` (e.g. "5s").
    pub async fn deploy(swarm: Swarm, store: Store, removal_grace: &str) -> Deployment {
        Deployment::deploy_with(swarm, store, StackOptions::new(removal_grace)).await
    }

    /// [`Deployment::deploy`] with every option.
    pub async fn deploy_with(swarm: Swarm, store: Store, options: StackOptions) -> Deployment {
        for image in store.images() {
            if host_docker(&["image", "inspect", image]).await.is_err() {
                panic!("image {image} is missing on the host engine: run scripts/images first");
            }
        }
        swarm.load_images(&store.images()).await;
        let mongo_labelled = options.mongo_nodes.iter().copied().collect();
        let d = Deployment {
            swarm,
            store,
            options,
            mongo_image: std::sync::Mutex::new(MONGO_IMAGE.to_string()),
            node_index: std::sync::Mutex::new(BTreeMap::new()),
            probe_node: std::sync::atomic::AtomicUsize::new(1),
            secrets: Secrets::make(),
            mongo_labelled: std::sync::Mutex::new(mongo_labelled),
        };
        d.read_nodes().await.expect("docker node ls");
        d.label_store_nodes().await;
        d.label_mongo_nodes().await;
        d.stack_deploy().await;
        d
    }

    /// A live manager ([`Swarm::manager`]).
    pub fn manager(&self) -> Node {
        self.swarm.manager()
    }

    /// Reads the swarm's node ids again (after [`Swarm::repair`]: a node made anew has a new
    /// id).
    pub async fn read_nodes(&self) -> Result<(), String> {
        let nodes = self
            .manager()
            .docker(&["node", "ls", "--format", "{{.ID}} {{.Hostname}}"])
            .await?;
        let mut index = BTreeMap::new();
        for line in nodes.lines() {
            let (id, host) = line
                .split_once(' ')
                .ok_or_else(|| format!("node ls line {line:?}"))?;
            let i = host
                .trim_start_matches("dnode")
                .parse()
                .map_err(|_| format!("node hostname {host:?} is not dnode<i>"))?;
            index.insert(id.to_string(), i);
        }
        if let Ok(mut known) = self.node_index.lock() {
            *known = index;
        }
        Ok(())
    }

    /// The node that member `k` (1-based) of the store is placed on: the managers in turn
    /// (3 managers: one member each; 1 manager: all three on it, as on the demo's one node).
    pub fn store_member_home(&self, k: usize) -> usize {
        (k - 1) % self.swarm.managers() + 1
    }

    /// Puts the store's placement labels (`registrator.etcd<k>=true`) on the managers, as an
    /// operator does before deploying (compose/stack.yml). Run again after a repair.
    pub async fn label_store_nodes(&self) {
        for k in 1..=self.store.services().len() {
            let label = self.store.member_label(k);
            let host = self.swarm.node(self.store_member_home(k)).hostname();
            self.manager()
                .docker(&[
                    "node",
                    "update",
                    "--label-add",
                    &format!("{label}=true"),
                    &host,
                ])
                .await
                .unwrap_or_else(|e| panic!("docker node update --label-add {label}: {e}"));
        }
    }

    /// Puts the label `registrator.mongo=true` on the nodes that carry it
    /// ([`StackOptions::mongo_nodes`], changed by [`Deployment::set_mongo_label`]). Run again
    /// after a repair (a node made anew has no labels).
    pub async fn label_mongo_nodes(&self) {
        let nodes: Vec<usize> = self
            .mongo_labelled
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default();
        for i in nodes {
            self.set_mongo_label(i, true)
                .await
                .unwrap_or_else(|e| panic!("labelling dnode{i} registrator.mongo=true: {e}"));
        }
    }

    /// Adds (`on`) or removes the label `registrator.mongo=true` of node `i`: with
    /// [`StackOptions::mongo_nodes`], where a member may run.
    pub async fn set_mongo_label(&self, i: usize, on: bool) -> Result<(), String> {
        let host = self.swarm.node(i).hostname();
        let args: [&str; 4] = if on {
            ["update", "--label-add", "registrator.mongo=true", &host]
        } else {
            ["update", "--label-rm", "registrator.mongo", &host]
        };
        self.manager()
            .docker(&["node", args[0], args[1], args[2], args[3]])
            .await?;
        if let Ok(mut l) = self.mongo_labelled.lock() {
            if on {
                l.insert(i);
            } else {
                l.remove(&i);
            }
        }
        Ok(())
    }

    /// The nodes labelled `registrator.mongo=true` by this deployment.
    pub fn mongo_labelled(&self) -> BTreeSet<usize> {
        self.mongo_labelled
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// `docker stack deploy` of the stack file with the offline images (also re-deploys).
    pub async fn stack_deploy(&self) {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(self.store.stack_file());
        let file = file.to_str().expect("utf-8 path");
        let mongo_image = self
            .mongo_image
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|_| MONGO_IMAGE.to_string());
        let secrets = self.secrets.0.to_str().expect("utf-8 path").to_string();
        let env = [
            ("STACK", STACK),
            ("MONGO_SECRETS", secrets.as_str()),
            ("REGISTRATOR_IMAGE", "local/swarm-registrator"),
            ("RECONCILER_IMAGE", "local/replset-reconciler"),
            ("DEMO_APP_IMAGE", "local/replset-demo-app"),
            ("SOCKET_PROXY_IMAGE", "local/docker-socket-proxy"),
            ("MONGO_IMAGE", mongo_image.as_str()),
            ("MONGO_HEALTHCHECK", SIM_HEALTHCHECK),
            ("MONGO_EXTRA_ARGS", self.options.mongo_extra_args.as_str()),
            ("ETCD_IMAGE", "local/etcd"),
            ("CONSUL_IMAGE", "local/consul"),
            ("REMOVAL_GRACE", self.options.removal_grace.as_str()),
            (
                "MONGO_MAX_PER_NODE",
                if self.options.several_per_node {
                    "0"
                } else {
                    "1"
                },
            ),
            (
                "MONGO_NODES",
                if self.options.mongo_nodes.is_empty() {
                    "node.platform.os == linux"
                } else {
                    "node.labels.registrator.mongo == true"
                },
            ),
            (
                "MONGO_VOLUME_SUFFIX",
                if self.options.several_per_node {
                    "-{{.Task.Slot}}"
                } else {
                    ""
                },
            ),
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

    /// The running tasks of `service` (desired and actual state running). With a healthcheck,
    /// a task is running only once healthy.
    pub async fn tasks(&self, service: &str) -> Result<Vec<Task>, String> {
        self.tasks_in(service, &["running"]).await
    }

    /// The tasks of `service` that swarm wants running and that have a container in one of
    /// `states` (e.g. `starting`: started, not yet healthy).
    pub async fn tasks_in(&self, service: &str, states: &[&str]) -> Result<Vec<Task>, String> {
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
            let state = t["Status"]["State"].as_str().unwrap_or_default();
            if !states.contains(&state) {
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
                node: self
                    .node_index
                    .lock()
                    .ok()
                    .and_then(|known| known.get(node).copied())
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

    /// The stack's tasks that swarm wants running but that are not running (or not yet
    /// healthy), one line each: name, node, state and the newest error of that task's slot
    /// (e.g. a node whose engine cannot join a network rejects each new try).
    pub async fn tasks_not_running(&self) -> Result<Vec<String>, String> {
        let out = self
            .manager()
            .docker(&[
                "stack",
                "ps",
                STACK,
                "--no-trunc",
                "--format",
                "{{.Name}}|{{.Node}}|{{.DesiredState}}|{{.CurrentState}}|{{.Error}}",
            ])
            .await?;
        Ok(not_running(&out))
    }

    /// Runs a command in the container of a running task of `service`, on that task's node.
    /// Tasks on a node killed by the test are skipped (the manager lists them as running
    /// until it sees the node down).
    pub async fn exec(&self, service: &str, cmd: &[&str]) -> Result<String, String> {
        let tasks = self.tasks(service).await?;
        let lost = self.swarm.lost();
        let task = tasks
            .iter()
            .find(|t| !t.container.is_empty() && !lost.contains(&t.node))
            .ok_or_else(|| format!("no running task of {service} on a live node"))?;
        let mut args = vec!["exec", task.container.as_str()];
        args.extend(cmd);
        self.swarm.node(task.node).docker(&args).await
    }

    /// Runs a command in a member of the store (etcdctl, consul): the first that answers. Its
    /// own client talks to its own member (etcdctl's default endpoint is 127.0.0.1:2379), and
    /// etcd's reads are linearizable: an answer means that member's cluster has a quorum.
    async fn store_exec(&self, cmd: &[&str]) -> Result<String, String> {
        let mut errors = Vec::new();
        for service in self.store.services() {
            match self.exec(service, cmd).await {
                Ok(out) => return Ok(out),
                Err(e) => errors.push(e),
            }
        }
        Err(format!("no store member answered: {}", errors.join("; ")))
    }

    /// The nodes that run a member of the store: service name to node index.
    pub async fn store_member_nodes(&self) -> Result<BTreeMap<String, usize>, String> {
        let mut out = BTreeMap::new();
        for service in self.store.services() {
            if let Some(t) = self.tasks(service).await?.first() {
                out.insert(service.to_string(), t.node);
            }
        }
        Ok(out)
    }

    /// Through every store member that runs on a live node, one by one: writes `key` = `value`
    /// with that member's own client, then reads the key back through every such member. Ok
    /// with the members that answered, once all of them did: the store has a quorum and every
    /// live member serves it.
    pub async fn check_store_quorum(&self, key: &str, value: &str) -> Result<Vec<String>, String> {
        let lost = self.swarm.lost();
        let mut live = Vec::new();
        for service in self.store.services() {
            let tasks = self.tasks(service).await?;
            if let Some(t) = tasks
                .iter()
                .find(|t| !t.container.is_empty() && !lost.contains(&t.node))
            {
                live.push((service.to_string(), t.clone()));
            }
        }
        if live.is_empty() {
            return Err("no store member on a live node".into());
        }
        for (i, (writer, task)) in live.iter().enumerate() {
            let v = format!("{value}-{i}");
            let put: Vec<&str> = match self.store {
                Store::Etcd => vec!["exec", &task.container, "etcdctl", "put", key, &v],
                Store::Consul => vec!["exec", &task.container, "consul", "kv", "put", key, &v],
            };
            self.swarm
                .node(task.node)
                .docker(&put)
                .await
                .map_err(|e| format!("put through {writer}: {e}"))?;
            for (reader, t) in &live {
                let get: Vec<&str> = match self.store {
                    Store::Etcd => vec![
                        "exec",
                        &t.container,
                        "etcdctl",
                        "get",
                        key,
                        "--print-value-only",
                    ],
                    Store::Consul => vec!["exec", &t.container, "consul", "kv", "get", key],
                };
                let got = self
                    .swarm
                    .node(t.node)
                    .docker(&get)
                    .await
                    .map_err(|e| format!("get through {reader}: {e}"))?;
                if got.trim() != v {
                    return Err(format!("{reader} read {got:?} after {writer} wrote {v:?}"));
                }
            }
        }
        Ok(live.into_iter().map(|(s, _)| s).collect())
    }

    /// A key's value, read inside the store's container.
    pub async fn store_get(&self, key: &str) -> Result<String, String> {
        match self.store {
            Store::Etcd => {
                self.store_exec(&["etcdctl", "get", key, "--print-value-only"])
                    .await
            }
            Store::Consul => self.store_exec(&["consul", "kv", "get", key]).await,
        }
    }

    /// Consul: the nodes whose agents hold the catalog services of `service` (the stack names
    /// each agent after its swarm node's hostname).
    pub async fn catalog_nodes(&self, service: &str) -> Result<BTreeSet<String>, String> {
        let out = self
            .store_exec(&["consul", "catalog", "nodes", "-service", service])
            .await?;
        // a header line (Node ID Address DC), then one line per node
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }

    /// How many records of the mongo service the store holds.
    pub async fn mongo_record_count(&self) -> Result<usize, String> {
        let prefix = format!("registrator/services/{MONGO}/");
        let keys = match self.store {
            Store::Etcd => {
                self.store_exec(&["etcdctl", "get", "--prefix", "--keys-only", &prefix])
                    .await?
            }
            Store::Consul => {
                self.store_exec(&["consul", "kv", "get", "-keys", &prefix])
                    .await?
            }
        };
        Ok(keys.lines().filter(|l| !l.trim().is_empty()).count())
    }

    /// The holder of the reconciler's leadership of rs0: the etcd election's oldest key, or the
    /// value of the Consul lock.
    pub async fn leader(&self) -> Result<String, String> {
        let v = match self.store {
            Store::Etcd => {
                self.store_exec(&[
                    "etcdctl",
                    "get",
                    "--prefix",
                    "--sort-by=CREATE",
                    "--order=ASCEND",
                    "--limit=1",
                    "--print-value-only",
                    "registrator/replsets/rs0/leader/",
                ])
                .await?
            }
            Store::Consul => {
                // -detailed shows the session that holds the lock: no session, no leader
                let out = self
                    .store_exec(&[
                        "consul",
                        "kv",
                        "get",
                        "-detailed",
                        "registrator/replsets/rs0/leader",
                    ])
                    .await?;
                let field = |name: &str| {
                    out.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_default()
                };
                if field("Session").is_empty() || field("Session") == "-" {
                    return Err(format!("the lock is not held: {out}"));
                }
                field("Value")
            }
        };
        let v = v.trim().to_string();
        if v.is_empty() {
            Err("no leader".into())
        } else {
            Ok(v)
        }
    }

    /// The leader's status document.
    pub async fn status(&self) -> Result<ReplSetStatus, String> {
        let raw = self.store_get(STATUS_KEY).await?;
        ReplSetStatus::from_json(raw.as_bytes()).map_err(|e| format!("status {raw:?}: {e}"))
    }

    /// One check of "the replica set equals the service's tasks": `n` running tasks; the
    /// leader's status says converged with `n` members ([`ReplSetStatus::converged_with`]: a
    /// primary, every member healthy), as many voting as [`voters_of`] `n`, and exactly the
    /// tasks' slots and addresses as members; the URI lists exactly them.
    pub async fn check_converged(&self, n: usize) -> Result<SetState, String> {
        let tasks = self.tasks(MONGO).await?;
        if tasks.len() != n || tasks.iter().any(|t| t.ip.is_empty()) {
            return Err(format!("{} running tasks: {tasks:?}", tasks.len()));
        }
        let want: BTreeMap<i64, String> = tasks
            .iter()
            .map(|t| (t.slot, format!("{}:27017", t.ip)))
            .collect();
        let status = self.status().await?;
        let members: BTreeMap<i64, String> = status
            .members
            .iter()
            .map(|m| (m.id, m.host.clone()))
            .collect();
        let voting = status.members.iter().filter(|m| m.votes == 1).count();
        if !status.converged_with(n) || members != want || voting != voters_of(n) {
            return Err(format!("tasks {want:?}; status {status:?}"));
        }
        let uri = self.store_get(URI_KEY).await?;
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
            config_version: status.config_version,
            primary: status.primary.unwrap_or_default(),
        })
    }

    /// Waits (up to [`CONVERGE`]) until [`Deployment::check_converged`] holds; logs how long.
    pub async fn wait_converged(&self, n: usize, after: &str) -> SetState {
        let started = Instant::now();
        let state = wait_for(
            &format!("the replica set to equal the {n} tasks ({after})"),
            CONVERGE,
            || self.check_converged(n),
        )
        .await;
        eprintln!(
            "[stack] {after}: converged with {n} members in {:.1}s (config version {})",
            started.elapsed().as_secs_f64(),
            state.config_version
        );
        state
    }

    /// Writes `{_id: id, value}` with `w: "majority"` through the URI, from the example
    /// application's container.
    pub async fn app_write(&self, id: &str, value: &str) -> Result<String, String> {
        self.exec(APP, &["replset-demo-app", "write", id, "--value", value])
            .await
    }

    /// Reads `id` (read concern majority) through the URI from the application's container.
    pub async fn app_read(&self, id: &str) -> Result<Value, String> {
        let out = self
            .exec(APP, &["replset-demo-app", "read", id, "--wait", "30"])
            .await?;
        serde_json::from_str(&out).map_err(|e| format!("read printed {out:?}: {e}"))
    }

    /// `replset-reconciler scale` as operators run it: a one-off container on the manager, on
    /// the stack's network, with the manager's Docker API. Returns how long it took; panics
    /// when it fails.
    pub async fn scale(&self, n: usize) -> Duration {
        self.try_scale(n).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Deployment::scale`], with a failure (the command's exit code and log) returned.
    pub async fn try_scale(&self, n: usize) -> Result<Duration, String> {
        let started = Instant::now();
        let to = format!("{MONGO}={n}");
        let name = format!("e2e-scale-{n}");
        let manager = self.manager();
        // Detached, so that a slow scale (one step per member, each waiting for the set to
        // converge) is not cut by the CLI's own timeout; its exit code and log tell the result.
        manager
            .docker(&[
                "run",
                "-d",
                "--name",
                &name,
                "--user",
                "0",
                "--network",
                NETWORK,
                "--add-host",
                NODE_HOST,
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "local/replset-reconciler",
                self.store.backend(),
                "--service",
                MONGO,
                "--replset",
                "rs0",
                "scale",
                &to,
            ])
            .await
            .map_err(|e| format!("replset-reconciler scale {to}: {e}"))?;
        let deadline = Instant::now() + SCALE;
        let code = loop {
            let state = manager
                .docker(&[
                    "inspect",
                    "-f",
                    "{{.State.Status}} {{.State.ExitCode}}",
                    &name,
                ])
                .await;
            let last = match state {
                Ok(state) => match state.split_once(' ') {
                    Some(("exited", code)) => break Ok(code.to_string()),
                    _ => state,
                },
                Err(e) => e,
            };
            if Instant::now() > deadline {
                break Err(format!(
                    "replset-reconciler scale {to} did not finish within {SCALE:?}: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        // Both streams: the command's refusals and errors are logged on stderr.
        let log = match manager.docker_output(&["logs", &name]).await {
            Ok(out) => format!("{}\n{}", out.stdout, out.stderr),
            Err(e) => e,
        };
        let _ = manager.docker(&["rm", "-f", &name]).await;
        let code = code.map_err(|e| format!("{e}\n{log}"))?;
        if code != "0" {
            return Err(format!(
                "replset-reconciler scale {to} failed (exit {code}):\n{log}"
            ));
        }
        let took = started.elapsed();
        eprintln!(
            "[stack] replset-reconciler scale {to}: {:.1}s",
            took.as_secs_f64()
        );
        Ok(took)
    }

    /// Starts a probe client, the example application's image as a plain container on the
    /// manager (a node the test does not lose), for [`Deployment::probe_write`].
    pub async fn start_probe(&self) {
        self.start_probe_on(self.manager().index()).await;
    }

    /// [`Deployment::start_probe`] on node `i` (one the test will not lose).
    pub async fn start_probe_on(&self, i: usize) {
        self.probe_node
            .store(i, std::sync::atomic::Ordering::SeqCst);
        self.run_probe().await.expect("start the probe container");
    }

    /// The node of the probe container.
    fn probe(&self) -> Node {
        self.swarm
            .node(self.probe_node.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The probe logs in as the application's user, its password copied in from the stack's
    /// secrets (root in the container, as the file is the owner's only).
    async fn run_probe(&self) -> Result<String, String> {
        self.run_app(&self.probe(), PROBE, &["serve", "--interval", "3600"])
            .await
    }

    /// Starts the example application's image as the container `name` on node `node`, logged
    /// in as the application's user, with `args` (a subcommand and its flags, e.g. the
    /// `workload` of a fault-injection run). Its output is in `docker logs <name>` on that node.
    pub async fn start_app_container(
        &self,
        node: usize,
        name: &str,
        args: &[&str],
    ) -> Result<String, String> {
        self.run_app(&self.swarm.node(node), name, args).await
    }

    async fn run_app(&self, node: &Node, name: &str, args: &[&str]) -> Result<String, String> {
        let mut create = vec![
            "create".to_string(),
            "--name".into(),
            name.into(),
            "--user".into(),
            "0".into(),
            "--network".into(),
            NETWORK.into(),
            "--add-host".into(),
            NODE_HOST.into(),
            "--env".into(),
            format!("DEMO_BACKEND={}", self.store.backend()),
            "--env".into(),
            "DEMO_DATABASE=app".into(),
            "--env".into(),
            format!("DEMO_USERNAME={APP_USER}"),
            "--env".into(),
            format!("DEMO_PASSWORD_FILE={PROBE_PASSWORD}"),
            "local/replset-demo-app".into(),
        ];
        create.extend(args.iter().map(|a| a.to_string()));
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        node.docker(&create).await?;
        let password = self.secrets.0.join("mongo_app_password");
        let password = password.to_str().expect("utf-8 path");
        node.docker(&["cp", password, &format!("{name}:{PROBE_PASSWORD}")])
            .await?;
        node.docker(&["start", name]).await
    }

    /// A read of `id` by a client that does not log in, through the published URI, from a
    /// one-off container on the stack's network: how it ended (it must be refused).
    pub async fn anonymous_read(&self, id: &str) -> Result<crate::dind::CliOutput, String> {
        self.manager()
            .docker_output(&[
                "run",
                "--rm",
                "--network",
                NETWORK,
                "--add-host",
                NODE_HOST,
                "local/replset-demo-app",
                self.store.backend(),
                "--database",
                "app",
                "read",
                id,
                "--wait",
                "30",
            ])
            .await
    }

    /// The values of the stack's secrets (key file and passwords).
    pub fn secret_values(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in [
            "mongo_keyfile",
            "mongo_root_password",
            "mongo_reconciler_password",
            "mongo_app_password",
        ] {
            let text = std::fs::read_to_string(self.secrets.0.join(name)).expect("a secret file");
            out.push((name.to_string(), text.trim().to_string()));
        }
        out
    }

    /// Every place a secret must never be: each service's logs and `docker service inspect`,
    /// the probe's logs, and every key and value in the store. Returns where each secret was
    /// found (empty when none leaked).
    pub async fn secrets_found(&self) -> Result<Vec<String>, String> {
        let manager = self.manager();
        let services = manager
            .docker(&["service", "ls", "--format", "{{.Name}}"])
            .await?;
        let mut places: Vec<(String, String)> = Vec::new();
        for service in services.split_whitespace() {
            let logs = manager
                .docker_output(&["service", "logs", "--raw", "--no-task-ids", service])
                .await?;
            places.push((
                format!("the logs of {service}"),
                format!("{}\n{}", logs.stdout, logs.stderr),
            ));
            let inspect = manager.docker(&["service", "inspect", service]).await?;
            places.push((format!("docker service inspect {service}"), inspect));
        }
        if let Ok(logs) = self.probe().docker_output(&["logs", PROBE]).await {
            places.push((
                "the probe's logs".into(),
                format!("{}\n{}", logs.stdout, logs.stderr),
            ));
        }
        let dump = match self.store {
            Store::Etcd => self.store_exec(&["etcdctl", "get", "--prefix", ""]).await?,
            Store::Consul => self.store_exec(&["consul", "kv", "export", ""]).await?,
        };
        places.push(("the store".into(), dump));
        let mut found = Vec::new();
        for (name, value) in self.secret_values() {
            for (place, text) in &places {
                if text.contains(&value) {
                    found.push(format!("{name} in {place}"));
                }
            }
        }
        Ok(found)
    }

    /// Starts the probe container again after the manager's dockerd restarted (it stopped
    /// with it): retried until the swarm's network can be joined again.
    pub async fn restart_probe(&self) {
        wait_for("the probe container again", CONVERGE, || async {
            let _ = self.probe().docker(&["rm", "-f", PROBE]).await;
            self.run_probe().await
        })
        .await;
    }

    /// One `w: "majority"` write through the URI by a new client process in the probe
    /// container: reads the URI, finds the primary (waiting up to the driver's selection
    /// timeout), writes. Gives up after 15 s.
    pub async fn probe_write(&self, id: &str) -> Result<(), String> {
        let cmd = [
            "exec",
            PROBE,
            "replset-demo-app",
            "write",
            id,
            "--wait",
            "5",
        ];
        match tokio::time::timeout(Duration::from_secs(15), self.probe().docker(&cmd)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the write timed out".into()),
        }
    }

    /// The worker node to lose in a node-loss test: the primary's, where the primary runs on a
    /// worker, otherwise one with a mongo task. Returns the node's index and whether the
    /// primary is there.
    pub async fn worker_to_lose(&self) -> Result<(usize, bool), String> {
        let state = self.check_converged(self.tasks(MONGO).await?.len()).await?;
        let primary_ip = state
            .primary
            .rsplit_once(':')
            .map(|(ip, _)| ip.to_string())
            .unwrap_or_default();
        let tasks = self.tasks(MONGO).await?;
        let on_workers: Vec<&Task> = tasks.iter().filter(|t| t.node != 1).collect();
        let victim = on_workers
            .iter()
            .find(|t| t.ip == primary_ip)
            .or_else(|| on_workers.first())
            .ok_or("no mongo task on a worker")?;
        Ok((victim.node, victim.ip == primary_ip))
    }

    /// The reconciler task that leads (its container's hostname is the election's value).
    pub async fn leader_task(&self) -> Result<Task, String> {
        let leader = self.leader().await?;
        let tasks = self.tasks(RECONCILER).await?;
        tasks
            .iter()
            .find(|t| !t.container.is_empty() && t.container.starts_with(&leader))
            .cloned()
            .ok_or_else(|| format!("leader {leader} is none of the reconciler tasks {tasks:?}"))
    }

    /// The node of the mongo task that the leader reports as the primary.
    pub async fn primary_node(&self) -> Result<usize, String> {
        let status = self.status().await?;
        let primary = status.primary.ok_or("no primary in the status")?;
        let ip = primary
            .rsplit_once(':')
            .map(|(ip, _)| ip)
            .unwrap_or_default();
        self.tasks(MONGO)
            .await?
            .into_iter()
            .find(|t| t.ip == ip)
            .map(|t| t.node)
            .ok_or_else(|| format!("the primary {primary} is no running mongo task"))
    }

    /// Readies a manager-loss test and names the manager to lose: the node of the reconciler
    /// leader, which must be a manager (each manager holds a store member), and where that can
    /// be had one with the primary, or at least with a mongo task. While the leader runs on a
    /// worker, or the other reconciler replica runs on a manager that is a better choice, the
    /// leader is moved: paused until the other replica leads (when that one runs on a
    /// manager), else its task removed (`docker rm -f`); at most `tries` times. Returns the
    /// plan.
    pub async fn arrange_manager_loss(&self, tries: usize) -> Result<ManagerLoss, String> {
        for _ in 0..=tries {
            let leading = wait_for("a reconciler leader", Duration::from_secs(60), || {
                self.leader_task()
            })
            .await;
            let primary = self.primary_node().await?;
            let mongo_nodes: BTreeSet<usize> =
                self.tasks(MONGO).await?.iter().map(|t| t.node).collect();
            // a manager with the primary first, then one with a mongo task
            let worth =
                |n: usize| 2 * usize::from(n == primary) + usize::from(mongo_nodes.contains(&n));
            let others: Vec<usize> = self
                .tasks(RECONCILER)
                .await?
                .into_iter()
                .filter(|t| t.id != leading.id)
                .map(|t| t.node)
                .collect();
            let on_manager = self.swarm.is_manager(leading.node);
            let better = others
                .iter()
                .any(|&n| self.swarm.is_manager(n) && worth(n) > worth(leading.node));
            if on_manager && !better {
                let node = leading.node;
                let store_members = self
                    .store_member_nodes()
                    .await?
                    .into_iter()
                    .filter(|(_, n)| *n == node)
                    .map(|(s, _)| s)
                    .collect();
                return Ok(ManagerLoss {
                    node,
                    leader: leading,
                    primary_there: primary == node,
                    store_members,
                });
            }
            // With the other replica on a manager, the leader is paused (SIGSTOP) until that
            // one leads: a removed leader's replacement could start on the same node and win
            // the election again (Consul's lock goes to whoever asks first after its lock-delay,
            // and swarm favours the node with the fewest tasks). Else it is removed, so that
            // swarm starts its replacement elsewhere.
            let pause = others.iter().any(|&n| self.swarm.is_manager(n));
            eprintln!(
                "[stack] the leader {} runs on dnode{} (primary on dnode{primary}): {} it so \
                 that the other replica leads",
                leading.container,
                leading.node,
                if pause { "pausing" } else { "removing" }
            );
            let node = self.swarm.node(leading.node);
            let stop: &[&str] = if pause {
                &["kill", "--signal", "STOP", &leading.container]
            } else {
                &["rm", "-f", &leading.container]
            };
            node.docker(stop).await?;
            let old = leading.container.clone();
            wait_for(
                "another reconciler to lead",
                Duration::from_secs(120),
                || async {
                    let t = self.leader_task().await?;
                    if t.container == old {
                        Err(format!("still {}", t.container))
                    } else {
                        Ok(())
                    }
                },
            )
            .await;
            if pause {
                node.docker(&["kill", "--signal", "CONT", &leading.container])
                    .await?;
            }
        }
        Err(format!(
            "no reconciler leader on a manager after {tries} moves"
        ))
    }

    // ------------------------------------------------------------ updates, volumes, placement

    /// `docker service update -d <args> e2e_mongo` (e.g. `--force`, or `--image <image>`) on
    /// the manager; returns at once (see [`Deployment::wait_update_done`]).
    pub async fn update_mongo(&self, args: &[&str]) {
        let mut cmd = vec!["service", "update", "-d"];
        cmd.extend_from_slice(args);
        cmd.push(MONGO);
        self.manager()
            .docker(&cmd)
            .await
            .unwrap_or_else(|e| panic!("docker service update {args:?}: {e}"));
        if let Some(i) = args.iter().position(|a| *a == "--image") {
            if let (Some(image), Ok(mut current)) = (args.get(i + 1), self.mongo_image.lock()) {
                *current = image.to_string();
            }
        }
    }

    /// Swarm's own view of the mongo service's last update: `(state, message)`, e.g.
    /// `("completed", "update completed")` or `("paused", "update paused due to failure ...")`.
    pub async fn update_status(&self) -> Result<(String, String), String> {
        let out = self
            .manager()
            .docker(&[
                "service",
                "inspect",
                "-f",
                "{{if .UpdateStatus}}{{.UpdateStatus.State}}|{{.UpdateStatus.Message}}{{end}}",
                MONGO,
            ])
            .await?;
        let (state, message) = out.split_once('|').unwrap_or((&out, ""));
        Ok((state.to_string(), message.to_string()))
    }

    /// Waits (up to `timeout`) until every one of the `n` slots runs a task that is none of
    /// `before` (the task ids before the update: every task replaced) and the set equals the
    /// tasks again. Panics at once if swarm paused the update.
    pub async fn wait_update_done(
        &self,
        n: usize,
        before: &BTreeSet<String>,
        timeout: Duration,
        what: &str,
    ) -> SetState {
        wait_for(
            &format!("every mongo task replaced and the set equal to them ({what})"),
            timeout,
            || async {
                let (state, message) = self.update_status().await?;
                if state.contains("paused") || state.contains("rollback") {
                    panic!("{what}: swarm stopped the update: {state}: {message}");
                }
                let tasks = self.tasks(MONGO).await?;
                if let Some(old) = tasks.iter().find(|t| before.contains(&t.id)) {
                    return Err(format!("slot {} still runs task {}", old.slot, old.id));
                }
                self.check_converged(n).await
            },
        )
        .await
    }

    /// The ids of the running tasks of the mongo service.
    pub async fn mongo_task_ids(&self) -> Result<BTreeSet<String>, String> {
        Ok(self.tasks(MONGO).await?.into_iter().map(|t| t.id).collect())
    }

    /// Tags `image` as `tag` on every node (a second tag of the same image, for an update
    /// that changes the image name only).
    pub async fn tag_image_everywhere(&self, image: &str, tag: &str) {
        for node in self.swarm.nodes() {
            node.docker(&["tag", image, tag])
                .await
                .unwrap_or_else(|e| panic!("docker tag {image} {tag} on {}: {e}", node.hostname()));
        }
    }

    /// The mongo service's volumes on node `i`: name (`e2e_mongo-db`, `e2e_mongo-configdb`; with
    /// a volume per slot `e2e_mongo-db-<slot>`, ...) to creation time, which tells a volume kept from one made
    /// anew under the same name.
    pub async fn mongo_volumes(&self, i: usize) -> Result<BTreeMap<String, String>, String> {
        let node = self.swarm.node(i);
        let names = node
            .docker(&["volume", "ls", "-q", "--filter", &format!("name={MONGO}-")])
            .await?;
        let names: Vec<&str> = names.split_whitespace().collect();
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut args = vec!["volume", "inspect", "-f", "{{.Name}} {{.CreatedAt}}"];
        args.extend(&names);
        let out = node.docker(&args).await?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect())
    }

    /// Removes every volume of the mongo service on every node, as an operator who loses the
    /// data would: every mongo task must be stopped; the stopped containers swarm keeps as the
    /// tasks' history (they still refer to the volumes) are removed first.
    pub async fn remove_mongo_volumes(&self) -> Result<usize, String> {
        let mut removed = 0;
        for i in 1..=self.swarm.len() {
            let service = format!("label=com.docker.swarm.service.name={MONGO}");
            self.swarm
                .node(i)
                .docker(&["container", "prune", "-f", "--filter", &service])
                .await?;
            let names: Vec<String> = self.mongo_volumes(i).await?.into_keys().collect();
            if names.is_empty() {
                continue;
            }
            let mut args = vec!["volume", "rm"];
            args.extend(names.iter().map(String::as_str));
            self.swarm.node(i).docker(&args).await?;
            removed += names.len();
        }
        Ok(removed)
    }

    /// `docker service scale e2e_mongo=<n>` (swarm's own, not the reconciler's one-at-a-time
    /// scale): every task at once, as a whole-service restart is.
    pub async fn swarm_scale_mongo(&self, n: usize) {
        self.manager()
            .docker(&["service", "scale", "-d", &format!("{MONGO}={n}")])
            .await
            .unwrap_or_else(|e| panic!("docker service scale {MONGO}={n}: {e}"));
    }

    /// `docker node update --availability <availability> dnode<i>` (`drain`, `active`): a
    /// drained node's tasks are rescheduled on the others.
    pub async fn set_availability(&self, i: usize, availability: &str) {
        let host = self.swarm.node(i).hostname();
        self.manager()
            .docker(&["node", "update", "--availability", availability, &host])
            .await
            .unwrap_or_else(|e| {
                panic!("docker node update --availability {availability} {host}: {e}")
            });
    }

    /// Reads `id` with read concern majority through the URI, from the probe container.
    pub async fn probe_read(&self, id: &str) -> Result<Value, String> {
        let cmd = ["exec", PROBE, "replset-demo-app", "read", id, "--wait", "5"];
        let out =
            match tokio::time::timeout(Duration::from_secs(30), self.probe().docker(&cmd)).await {
                Ok(r) => r?,
                Err(_) => return Err(format!("reading {id} timed out")),
            };
        serde_json::from_str(&out).map_err(|e| format!("read printed {out:?}: {e}"))
    }

    /// Reads back every id in `ids` (read concern majority, from the probe container, a few at
    /// a time); the ids that cannot be read, with why.
    pub async fn unreadable(&self, ids: &[String]) -> Vec<(String, String)> {
        use futures::StreamExt;
        futures::stream::iter(ids)
            .map(|id| async move {
                // A read can meet an election: a few tries.
                let mut last = String::new();
                for _ in 0..3 {
                    match self.probe_read(id).await {
                        Ok(doc) if doc["_id"] == id.as_str() => return None,
                        Ok(doc) => last = format!("read {id} gave {doc}"),
                        Err(e) => last = e,
                    }
                }
                Some((id.clone(), last))
            })
            .buffer_unordered(6)
            .filter_map(|r| async move { r })
            .collect()
            .await
    }
}

/// The lines of `docker stack ps --format '{{.Name}}|{{.Node}}|{{.DesiredState}}|
/// {{.CurrentState}}|{{.Error}}'` whose task is wanted but not running, with the newest error
/// of its slot ([`Deployment::tasks_not_running`]).
fn not_running(out: &str) -> Vec<String> {
    // Each slot's tasks come newest first: the first is the one swarm works on now.
    let mut slots: Vec<(&str, Vec<Vec<&str>>)> = Vec::new();
    for fields in out
        .lines()
        .map(|l| l.trim().splitn(5, '|').collect::<Vec<_>>())
    {
        if fields.len() < 5 {
            continue;
        }
        match slots.last_mut() {
            Some((name, tries)) if *name == fields[0] => tries.push(fields),
            _ => slots.push((fields[0], vec![fields])),
        }
    }
    slots
        .into_iter()
        .filter_map(|(name, tries)| {
            let now = &tries[0];
            if now[2] == "Shutdown" || now[3].starts_with("Running") {
                return None;
            }
            let error = tries.iter().map(|t| t[4]).find(|e| !e.is_empty());
            Some(format!(
                "{name} on {}: {} (last error: {})",
                now[1],
                now[3],
                error.unwrap_or("none")
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{not_running, voters_of};

    /// Seed 11's 30-minute run ended with four members, three voting, as the reconciler
    /// wants: the check waited for four voters that would never come.
    #[test]
    fn a_converged_set_of_four_has_three_voters() {
        let voters: Vec<usize> = (1..=9).map(voters_of).collect();
        assert_eq!(voters, [1, 2, 3, 3, 5, 5, 7, 7, 7]);
    }

    #[test]
    fn a_task_that_keeps_being_rejected_is_named_with_its_error() {
        let out = "e2e_app.1|dnode1|Running|Running 11 minutes ago|\n\
            e2e_mongo.2|dnode4|Running|Starting 8 minutes ago|\n\
            e2e_mongo.2|dnode4|Shutdown|Failed 9 minutes ago|\"No such container: x\"\n\
            e2e_docker-proxy.w5z|dnode4|Ready|Preparing 1 second ago|\n\
            e2e_docker-proxy.w5z|dnode4|Shutdown|Rejected 6 seconds ago|\"vxlan: file exists\"\n\
            e2e_mongo.4|dnode3|Shutdown|Shutdown 2 minutes ago|\n";
        assert_eq!(
            not_running(out),
            [
                "e2e_mongo.2 on dnode4: Starting 8 minutes ago (last error: \"No such container: x\")",
                "e2e_docker-proxy.w5z on dnode4: Preparing 1 second ago (last error: \"vxlan: file exists\")",
            ]
        );
    }
}
