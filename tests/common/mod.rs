//! The harness of the integration tests: a real Docker engine in swarm mode and a real etcd,
//! started by `scripts/services up` (the README's test command runs it first).
//!
//! Tests run in parallel against the same engine and etcd, so each one uses its own names
//! (`Names`), its own key prefix, and removes what it created (`Cleanup`, also on panic).
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

pub use test_support::{free_port, http_get, wait_for, PrivateEtcd, TempDir};

use backend_core::{KeyLayout, ServiceRecord};
use etcd_client::{Client, GetOptions};

/// The etcd of the test services.
pub fn etcd_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Unique names for one test: `<tag>-<random>`.
#[derive(Debug, Clone)]
pub struct Names {
    pub base: String,
}

impl Names {
    pub fn new(tag: &str) -> Names {
        let n: u32 = rand::random::<u32>() % 1_000_000;
        Names {
            base: format!("t{tag}-{n:06}"),
        }
    }

    pub fn prefix(&self) -> String {
        format!("test/{}", self.base)
    }

    pub fn layout(&self) -> KeyLayout {
        KeyLayout::new(&self.prefix())
    }

    pub fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.base)
    }
}

/// Runs `docker` with these arguments; panics with its stderr when it fails.
pub async fn docker(args: &[&str]) -> String {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `docker` and ignores failure (for cleanup).
pub fn docker_quiet(args: &[&str]) {
    let _ = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Removes what a test created, when dropped (also when the test panics).
#[derive(Debug, Default)]
pub struct Cleanup {
    services: Vec<String>,
    containers: Vec<String>,
    networks: Vec<String>,
    prefixes: Vec<String>,
}

impl Cleanup {
    pub fn service(&mut self, name: &str) {
        self.services.push(name.to_string());
    }
    pub fn container(&mut self, name: &str) {
        self.containers.push(name.to_string());
    }
    pub fn network(&mut self, name: &str) {
        self.networks.push(name.to_string());
    }
    pub fn prefix(&mut self, prefix: &str) {
        self.prefixes.push(prefix.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in &self.services {
            docker_quiet(&["service", "rm", s]);
        }
        for c in &self.containers {
            docker_quiet(&["rm", "-f", c]);
        }
        // A network can be removed only once its tasks are gone.
        for n in &self.networks {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let ok = std::process::Command::new("docker")
                    .args(["network", "rm", n])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(true);
                if ok {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        for p in &self.prefixes {
            let _ = std::process::Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args([
                    "--endpoints",
                    &etcd_endpoint(),
                    "del",
                    "--prefix",
                    &format!("{p}/"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Creates an attachable overlay network.
pub async fn overlay(cleanup: &mut Cleanup, name: &str) {
    docker(&["network", "create", "-d", "overlay", "--attachable", name]).await;
    cleanup.network(name);
}

/// Creates a replicated service of `local/busybox` that sleeps, publishing `port` through the
/// `registrator.port` container label. Returns at once (`--detach`).
pub async fn service(
    cleanup: &mut Cleanup,
    name: &str,
    network: &str,
    replicas: u32,
    extra: &[&str],
) {
    let replicas = replicas.to_string();
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--quiet",
        "--name",
        name,
        "--replicas",
        &replicas,
        "--network",
        network,
        "--container-label",
        "registrator.port=8080",
        "--stop-grace-period",
        "1s",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["local/busybox", "sleep", "86400"]);
    docker(&args).await;
    cleanup.service(name);
}

/// A running task container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskContainer {
    pub container_id: String,
    pub task_id: String,
    pub slot: u64,
    pub ip: String,
}

/// The running task containers of a service, with their address on `network`.
pub async fn task_containers(service: &str, network: &str) -> Vec<TaskContainer> {
    let ids = docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ])
    .await;
    let mut out = Vec::new();
    for id in ids.lines().filter(|l| !l.is_empty()) {
        let format = format!(
            "{{{{index .Config.Labels \"com.docker.swarm.task.id\"}}}} {{{{index .Config.Labels \"com.docker.swarm.task.name\"}}}} {{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}} {{{{.State.Running}}}}"
        );
        let out_line = tokio::process::Command::new("docker")
            .args(["inspect", "--format", &format, id])
            .output()
            .await
            .expect("docker inspect runs");
        if !out_line.status.success() {
            continue; // removed meanwhile
        }
        let line = String::from_utf8_lossy(&out_line.stdout).trim().to_string();
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 4 || parts[3] != "true" {
            continue;
        }
        let slot = parts[1]
            .split('.')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("task name has a numeric slot");
        out.push(TaskContainer {
            container_id: id.to_string(),
            task_id: parts[0].to_string(),
            slot,
            ip: parts[2].to_string(),
        });
    }
    out.sort_by_key(|t| t.slot);
    out
}

/// An etcd client for reading what the bridge wrote.
pub struct Store {
    pub client: Client,
}

impl Store {
    pub async fn connect() -> Store {
        Store::connect_to(&etcd_endpoint()).await
    }

    pub async fn connect_to(endpoint: &str) -> Store {
        let client = Client::connect([format!("http://{endpoint}")], None)
            .await
            .expect("etcd client");
        Store { client }
    }

    /// Every record of `service` under `layout`, by instance id. A value that does not decode
    /// is an error.
    pub async fn records(
        &self,
        layout: &KeyLayout,
        service: &str,
    ) -> Result<BTreeMap<String, ServiceRecord>, String> {
        let mut client = self.client.clone();
        let resp = client
            .get(
                layout.service_prefix(service),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| format!("etcd get: {e}"))?;
        let mut out = BTreeMap::new();
        for kv in resp.kvs() {
            let record = ServiceRecord::from_json(kv.value())
                .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(kv.key())))?;
            out.insert(record.id.clone(), record);
        }
        Ok(out)
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut client = self.client.clone();
        let resp = client
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .expect("etcd get");
        resp.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).to_string())
            .collect()
    }

    pub async fn put(&self, key: &str, value: &str) {
        let mut client = self.client.clone();
        client.put(key, value, None).await.expect("etcd put");
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut client = self.client.clone();
        let resp = client.get(key, None).await.expect("etcd get");
        resp.kvs().first().map(|kv| kv.value().to_vec())
    }
}

/// Checks that the records of `service` are exactly its running tasks: one record per task,
/// with the task's id, slot and address on `network`. Returns the tasks.
pub async fn records_match_tasks(
    store: &Store,
    layout: &KeyLayout,
    service: &str,
    network: &str,
    expected_tasks: usize,
) -> Result<Vec<TaskContainer>, String> {
    let tasks = task_containers(service, network).await;
    if tasks.len() != expected_tasks {
        return Err(format!(
            "{} running tasks, want {expected_tasks}",
            tasks.len()
        ));
    }
    let records = store.records(layout, service).await?;
    let summary = |r: &BTreeMap<String, ServiceRecord>| {
        r.values()
            .map(|r| format!("{}@{}#{:?}", r.id, r.ip, r.task_slot))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if records.len() != tasks.len() {
        return Err(format!("{} records: {}", records.len(), summary(&records)));
    }
    for t in &tasks {
        let Some(r) = records.get(&t.task_id) else {
            return Err(format!(
                "no record for task {}; records: {}",
                t.task_id,
                summary(&records)
            ));
        };
        if r.ip.to_string() != t.ip
            || r.task_slot != Some(t.slot)
            || r.container_id != t.container_id
            || r.port != 8080
            || r.service != service
        {
            return Err(format!("record {r:?} does not match task {t:?}"));
        }
    }
    Ok(tasks)
}

/// A bridge process, killed when dropped. Its log goes to a file.
pub struct BridgeProcess {
    pub child: tokio::process::Child,
    pub log: PathBuf,
    _dir: TempDir,
}

impl BridgeProcess {
    /// Starts `swarm-registrator <uri> <args>`.
    pub async fn start(uri: &str, args: &[&str]) -> BridgeProcess {
        let dir = TempDir::new("bridge");
        let log = dir.path().join("bridge.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"))
            .arg(uri)
            .args(args)
            .env("RUST_LOG", "info,swarm_registrator=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("the bridge starts");
        BridgeProcess {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child
            .id()
            .map(|p| p as i32)
            .expect("the bridge is running")
    }

    /// Sends a signal (`"KILL"`, `"TERM"`).
    pub async fn signal(&self, signal: &str) {
        let status = tokio::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("the bridge exits in time")
            .expect("wait works")
            .code()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("{needle:?} in the bridge log"),
            timeout,
            || async {
                let text = self.log_text();
                if text.contains(needle) {
                    Ok(())
                } else {
                    Err(text.lines().last().unwrap_or_default().to_string())
                }
            },
        )
        .await
    }
}
