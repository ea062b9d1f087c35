//! A multi-node Docker Swarm on one machine for end-to-end tests: Docker-in-Docker nodes made
//! by `scripts/swarm-nodes` (the recipe is in that script and in docs/architecture.md, "The
//! test environment").
//!
//! ```no_run
//! # async fn example() {
//! use test_support::dind::Swarm;
//! let swarm = Swarm::up(3).await; // dnode1 = manager, dnode2.. = workers, all Ready
//! swarm.load_images(&["local/busybox"]).await; // from the host engine into every node
//! let mgr = swarm.manager();
//! mgr.docker(&["service", "create", "-d", "--name", "web", "local/busybox", "sleep", "1d"])
//!     .await
//!     .expect("service create");
//! // any node: `docker ps`, `docker exec`, `docker rm -f` through its own socket
//! let on_2 = swarm.node(2).docker(&["ps", "-q"]).await.expect("docker ps");
//! swarm.kill_node(3).await; // a node lost (its container is killed)
//! swarm.down().await; // or let Drop do it
//!
//! // 3 managers (dnode1..3) and a worker: a manager can be lost and the swarm keeps its quorum
//! let ha = Swarm::up_with_managers(4, 3).await;
//! ha.kill_node(1).await; // from now on `ha.manager()` is dnode2
//! ha.repair().await; // dnode1 made anew and joined as a manager again
//! # let _ = on_2;
//! # }
//! ```
//!
//! Every [`Swarm`] has its own name (`sr<random>`), so tests may run several at once; its host
//! objects are the containers `<name>-dnode<i>`, the bridge network `<name>-net` and
//! `.services/swarm-nodes/<name>/`, all removed by [`Swarm::down`] or on drop. Set
//! `SWARM_NODES_KEEP=1` to keep a swarm after the test for a look (the test prints how to reach
//! it and how to remove it).
//!
//! Needs root and the host's dockerd (`scripts/services up`). Measured on this project's
//! 2-core test machines:
//! - the node image `local/dind` is built once (debootstrap + import): 41 to 86 s;
//! - `Swarm::up(3)`: the nodes' dockerd answer after about 1 s, all 3 Ready after 2.5 s;
//! - `load_images`: busybox 0.6 s, a 100 MB image about 1.5 s (all nodes at once);
//! - the nodes' storage driver is overlay2 (on their tmpfs); vfs works too
//!   (`SWARM_NODES_STORAGE_DRIVER=vfs`) but costs about 150 ms more per container per 100 MB;
//! - a killed worker is seen `Down` by the manager 10.6 to 16.5 s after `docker kill`, and
//!   its task of a replicated service runs elsewhere about 5.4 s after that (the service's
//!   default restart delay of 5 s), 16 to 18 s after the kill.
//!
//! Images: nothing can be pulled; `docker service create` warns that the image "could not be
//! accessed on a registry" and each node uses its local copy, so load images before deploying.
//! busybox-static's `wget` crashes here; use `nc` for HTTP checks inside busybox containers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The script that makes, loads and removes the nodes.
pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/swarm-nodes")
}

/// How long one `docker` command through a node's socket may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `scripts/swarm-nodes up` may take (it may build the node image first).
const UP_TIMEOUT: Duration = Duration::from_secs(900);

/// A running swarm of Docker-in-Docker nodes; removed by [`Swarm::down`] or when dropped.
#[derive(Debug)]
pub struct Swarm {
    name: String,
    nodes: usize,
    /// Nodes 1..=managers are managers.
    managers: usize,
    /// Nodes killed by [`Swarm::kill_node`] and not yet repaired.
    lost: Mutex<BTreeSet<usize>>,
    down: bool,
}

/// One node of a [`Swarm`]: nodes 1 to [`Swarm::managers`] are managers.
#[derive(Debug, Clone)]
pub struct Node {
    index: usize,
    container: String,
    docker_host: String,
}

impl Swarm {
    /// Makes a swarm of `nodes` nodes (1 manager and `nodes - 1` workers) and waits until every
    /// node is Ready. Panics with the script's output if it cannot.
    pub async fn up(nodes: usize) -> Swarm {
        Swarm::up_with_managers(nodes, 1).await
    }

    /// Makes a swarm of `nodes` nodes of which the first `managers` are managers (an odd
    /// number, so that losing fewer than half of them keeps the swarm's raft quorum: 3 managers
    /// survive the loss of one), and waits until every node is Ready.
    pub async fn up_with_managers(nodes: usize, managers: usize) -> Swarm {
        assert!((1..=9).contains(&nodes), "Swarm::up({nodes}): 1 to 9 nodes");
        assert!(
            (1..=nodes).contains(&managers),
            "Swarm::up_with_managers({nodes}, {managers}): 1 to {nodes} managers"
        );
        let name = format!("sr{:08x}", rand::random::<u32>());
        let swarm = Swarm {
            name,
            nodes,
            managers,
            lost: Mutex::new(BTreeSet::new()),
            down: false,
        };
        let started = Instant::now();
        match swarm.run_script(&swarm.up_args()).await {
            Ok(out) => eprintln!(
                "[dind] swarm {} with {nodes} nodes ({managers} managers) up in {:.1}s\n{out}",
                swarm.name,
                started.elapsed().as_secs_f64()
            ),
            // `swarm` drops here and removes whatever `up` made before it failed
            Err(e) => panic!(
                "scripts/swarm-nodes up failed for swarm {}: {e}",
                swarm.name
            ),
        }
        swarm
    }

    /// The swarm's name: the prefix of its host containers and network.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes
    }

    /// The number of managers: nodes 1 to this are managers, the others workers.
    pub fn managers(&self) -> usize {
        self.managers
    }

    /// Whether node `i` is a manager.
    pub fn is_manager(&self, i: usize) -> bool {
        (1..=self.managers).contains(&i)
    }

    /// The nodes killed by [`Swarm::kill_node`] since the last [`Swarm::repair`].
    pub fn lost(&self) -> BTreeSet<usize> {
        self.lost.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn up_args(&self) -> Vec<String> {
        vec![
            "up".into(),
            "--nodes".into(),
            self.nodes.to_string(),
            "--managers".into(),
            self.managers.to_string(),
        ]
    }

    /// Always false: a swarm has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes == 0
    }

    /// Node `i`, counted from 1 (node 1 is the first manager).
    pub fn node(&self, i: usize) -> Node {
        assert!(
            (1..=self.nodes).contains(&i),
            "node({i}): the swarm has nodes 1..={}",
            self.nodes
        );
        Node {
            index: i,
            container: format!("{}-dnode{i}", self.name),
            docker_host: format!(
                "unix://{}/.services/swarm-nodes/{}/dnode{i}/docker.sock",
                repo_root().display(),
                self.name
            ),
        }
    }

    /// A manager for `docker service`, `docker stack deploy`, `docker node ls`: the first one
    /// not lost ([`Swarm::kill_node`]), node 1 unless it was killed. With every manager lost,
    /// node 1 (whose commands then fail).
    pub fn manager(&self) -> Node {
        let lost = self.lost();
        let i = (1..=self.managers).find(|i| !lost.contains(i)).unwrap_or(1);
        self.node(i)
    }

    /// All nodes, manager first.
    pub fn nodes(&self) -> Vec<Node> {
        (1..=self.nodes).map(|i| self.node(i)).collect()
    }

    /// Copies images of the host engine (or every `docker save` tar in a directory) into every
    /// running node; a node that has the same image id already is skipped. Panics on failure.
    pub async fn load_images(&self, images: &[&str]) {
        let mut args = vec!["load".to_string()];
        args.extend(images.iter().map(|i| i.to_string()));
        let started = Instant::now();
        if let Err(e) = self.run_script(&args).await {
            panic!("loading {images:?} into swarm {}: {e}", self.name);
        }
        eprintln!(
            "[dind] loaded {images:?} into swarm {} in {:.1}s",
            self.name,
            started.elapsed().as_secs_f64()
        );
    }

    /// Kills node `i`'s container (`docker kill`): the node is lost with everything on it.
    /// The manager sees it `Down` 10 to 17 s later (see [`Swarm::node_states`]). A manager
    /// killed is no longer [`Swarm::manager`]: the next live one is.
    pub async fn kill_node(&self, i: usize) {
        let node = self.node(i);
        if let Err(e) = host_docker(&["kill", &node.container]).await {
            panic!("docker kill {} (node {i}): {e}", node.container);
        }
        if let Ok(mut lost) = self.lost.lock() {
            lost.insert(i);
        }
    }

    /// Restarts every node's dockerd at the same moment (SIGTERM; the node's entry point
    /// starts it again), as a host reboot or an engine upgrade does to a node's containers:
    /// they stop, and swarm replaces them once the engine is back. The node keeps its images,
    /// volumes and swarm state. Returns once every node's engine answers again.
    pub async fn restart_every_dockerd(&self) {
        let stops = self.nodes().into_iter().map(|node| async move {
            host_docker(&["exec", &node.container, "pkill", "-TERM", "-x", "dockerd"])
                .await
                .unwrap_or_else(|e| panic!("stopping dockerd on {}: {e}", node.container));
        });
        futures::future::join_all(stops).await;
        for node in self.nodes() {
            crate::wait_for(
                "the node's dockerd to answer again",
                std::time::Duration::from_secs(120),
                || async {
                    node.docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])
                        .await
                },
            )
            .await;
        }
    }

    /// Runs `up` again: makes killed nodes anew (empty) and joins them to the swarm (a lost
    /// manager as a manager, through one still alive), removes the swarm's entries of the lost
    /// ones (a manager demoted first, then `docker node rm --force`), and waits until all
    /// nodes are Ready. Load images again afterwards (the new nodes have none), and give a
    /// re-made node its labels again. With a single manager, a lost manager means a new,
    /// empty swarm that the workers rejoin; with 3, the swarm (services, secrets) lives on.
    pub async fn repair(&self) {
        let started = Instant::now();
        match self.run_script(&self.up_args()).await {
            Ok(out) => eprintln!(
                "[dind] swarm {} repaired in {:.1}s\n{out}",
                self.name,
                started.elapsed().as_secs_f64()
            ),
            Err(e) => panic!(
                "scripts/swarm-nodes up (repair) of swarm {}: {e}",
                self.name
            ),
        }
        if let Ok(mut lost) = self.lost.lock() {
            lost.clear();
        }
    }

    /// The manager's view of the nodes: `(hostname, status, availability)`, e.g.
    /// `("dnode3", "Down", "Active")`.
    pub async fn node_states(&self) -> Result<Vec<(String, String, String)>, String> {
        let out = self
            .manager()
            .docker(&[
                "node",
                "ls",
                "--format",
                "{{.Hostname}} {{.Status}} {{.Availability}}",
            ])
            .await?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                    w.next()?.to_string(),
                ))
            })
            .collect())
    }

    /// Removes the nodes, their network and state (also done on drop).
    pub async fn down(mut self) {
        self.down = true;
        if let Err(e) = self.run_script(&["down".to_string()]).await {
            panic!("scripts/swarm-nodes down of swarm {}: {e}", self.name);
        }
    }

    async fn run_script(&self, args: &[String]) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(script());
        cmd.args(["--name", &self.name])
            .args(args)
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(UP_TIMEOUT, cmd.output())
            .await
            .map_err(|_| format!("no answer after {UP_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{} ({}; it needs root and the host's dockerd: scripts/services up)\n{text}",
                out.status,
                script().display()
            ))
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::env::var_os("SWARM_NODES_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "[dind] SWARM_NODES_KEEP=1: keeping swarm {name}; reach its manager with \
                 `eval \"$(scripts/swarm-nodes --name {name} env)\"`, remove it with \
                 `scripts/swarm-nodes --name {name} down`",
                name = self.name
            );
            return;
        }
        let out = std::process::Command::new(script())
            .args(["--name", &self.name, "down"])
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "[dind] scripts/swarm-nodes --name {} down failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("[dind] cannot run {}: {e}", script().display()),
        }
    }
}

impl Node {
    /// 1-based number of the node; 1 is the first manager.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's hostname, which is also its name in `docker node ls`: `dnode<i>`.
    pub fn hostname(&self) -> String {
        format!("dnode{}", self.index)
    }

    /// The node's container in the host engine (for `docker kill`, `docker exec`).
    pub fn container(&self) -> &str {
        &self.container
    }

    /// `unix://...` of the node's dockerd, for `DOCKER_HOST` or bollard.
    pub fn docker_host(&self) -> &str {
        &self.docker_host
    }

    /// Runs the `docker` CLI against this node; its stdout (trimmed) on success, otherwise
    /// the command, exit status and stderr.
    pub async fn docker(&self, args: &[&str]) -> Result<String, String> {
        docker_cli(Some(&self.docker_host), &[], args).await
    }

    /// Runs the `docker` CLI against this node and returns how it ended, whatever its exit
    /// status (for commands whose failure says something, such as a healthcheck's probe run
    /// with `docker exec`); `Err` only when it could not run or did not answer in time.
    pub async fn docker_output(&self, args: &[&str]) -> Result<CliOutput, String> {
        docker_run(Some(&self.docker_host), &[], args)
            .await
            .map(|out| CliOutput {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
    }

    /// [`Node::docker`] with extra environment variables for the CLI (for example those a
    /// stack file substitutes in `docker stack deploy`).
    pub async fn docker_with_env(
        &self,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<String, String> {
        docker_cli(Some(&self.docker_host), env, args).await
    }

    /// The node's IP address on the swarm's bridge network (its swarm advertise address).
    pub async fn ip(&self) -> Result<String, String> {
        host_docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.container,
        ])
        .await
    }
}

/// Runs the `docker` CLI against the host engine (the default socket).
pub async fn host_docker(args: &[&str]) -> Result<String, String> {
    docker_cli(None, &[], args).await
}

/// How a `docker` command ended ([`Node::docker_output`]); outputs trimmed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

async fn docker_cli(
    host: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<String, String> {
    let out = docker_run(host, env, args).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {} on {}: {}: {}",
            args.join(" "),
            host.unwrap_or("the host engine"),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn docker_run(
    host: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<std::process::Output, String> {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.envs(env.iter().copied());
    match host {
        Some(h) => cmd.env("DOCKER_HOST", h),
        None => cmd.env_remove("DOCKER_HOST"),
    };
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let shown = format!("docker {}", args.join(" "));
    let where_ = host.unwrap_or("the host engine");
    tokio::time::timeout(DOCKER_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("{shown} on {where_}: no answer after {DOCKER_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot run {shown}: {e} (is docker.io installed?)"))
}

fn repo_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}
