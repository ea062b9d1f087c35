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

pub use test_support::{
    consul_bin, free_port, http_get, run_ok, wait_for, PrivateConsul, PrivateEtcd, TempDir,
};

use backend_core::WatchEvent;
use futures::StreamExt;

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

/// Runs the bridge binary with `args` and `env` to its end (no stdin, `NO_COLOR`); its exit
/// code and its stderr.
pub async fn run_bridge<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"))
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the bridge runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `docker` with these arguments; panics with its stderr when it fails.
pub async fn docker(args: &[&str]) -> String {
    let mut command = tokio::process::Command::new("docker");
    command.args(args);
    let out = run_ok(&mut command, &format!("docker {}", args.join(" "))).await;
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
    prefixes: Vec<(Backend, String)>,
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
    /// Deletes the keys under `prefix` in the shared store of `backend`.
    pub fn prefix(&mut self, backend: Backend, prefix: &str) {
        self.prefixes.push((backend, prefix.to_string()));
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
        for (backend, p) in &self.prefixes {
            let mut cmd = match backend {
                Backend::Etcd => {
                    let mut c = std::process::Command::new("etcdctl");
                    c.env("ETCDCTL_API", "3").args([
                        "--endpoints",
                        &etcd_endpoint(),
                        "del",
                        "--prefix",
                        &format!("{p}/"),
                    ]);
                    c
                }
                Backend::Consul => {
                    let mut c = std::process::Command::new("curl");
                    c.args([
                        "-sf",
                        "-X",
                        "DELETE",
                        &format!("http://{}/v1/kv/{p}/?recurse=true", consul_endpoint()),
                    ]);
                    c
                }
            };
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        }
    }
}

/// Creates an attachable overlay network.
pub async fn overlay(cleanup: &mut Cleanup, name: &str) {
    docker(&["network", "create", "-d", "overlay", "--attachable", name]).await;
    cleanup.network(name);
}

/// Names under `tag`, and a clean-up that also removes their key prefix from `b`'s store.
pub fn names_and_cleanup(b: Backend, tag: &str) -> (Names, Cleanup) {
    let names = Names::new(tag);
    let mut cleanup = Cleanup::default();
    cleanup.prefix(b, &names.prefix());
    (names, cleanup)
}

/// What most tests of a swarm service start from: names under `tag`, a clean-up that also removes their key
/// prefix, an overlay network (`net`), the name of a service (`db`, not created yet), and a
/// client of the store with the layout of the prefix.
pub async fn scene(b: Backend, tag: &str) -> (Names, Cleanup, String, String, Store, KeyLayout) {
    let (names, mut cleanup) = names_and_cleanup(b, tag);
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let store = b.store().await;
    let layout = names.layout();
    (names, cleanup, net, svc, store, layout)
}

/// Starts a plain container `name` of `local/busybox` that exposes port 8080 and sets
/// `SERVICE_NAME=<service>`, with the `docker run` options `extra` and the command `cmd`.
/// Returns its id; `cleanup` removes it.
pub async fn plain_container(
    cleanup: &mut Cleanup,
    name: &str,
    service: &str,
    extra: &[&str],
    cmd: &[&str],
) -> String {
    cleanup.container(name);
    let service_name = format!("SERVICE_NAME={service}");
    let mut args = vec!["run", "-d", "--name", name, "--expose", "8080"];
    args.extend_from_slice(&["-e", &service_name]);
    args.extend_from_slice(extra);
    args.push("local/busybox");
    args.extend_from_slice(cmd);
    docker(&args).await
}

/// Starts a plain container (as [`plain_container`]) that creates the file `flag` and is
/// healthy while it exists: checked every second, unhealthy after one failure.
pub async fn healthchecked_container(
    cleanup: &mut Cleanup,
    name: &str,
    service: &str,
    flag: &str,
) -> String {
    let test = format!("test -f {flag}");
    let cmd = format!("touch {flag}; sleep 86400");
    let health = [
        "--health-cmd",
        &test,
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
    ];
    plain_container(cleanup, name, service, &health, &["sh", "-c", &cmd]).await
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

/// Waits up to `within` until `n` task containers of `service` run on `network`.
pub async fn wait_for_tasks(service: &str, network: &str, n: usize, within: Duration) {
    wait_for(&format!("{n} running tasks"), within, || async {
        let running = task_containers(service, network).await.len();
        if running == n {
            Ok(())
        } else {
            Err(format!("{running} tasks"))
        }
    })
    .await;
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

/// The store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Etcd,
    Consul,
}

/// The Consul agent of the test services.
pub fn consul_endpoint() -> String {
    std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into())
}

impl Backend {
    /// The shared store of the test services.
    pub fn endpoint(self) -> String {
        match self {
            Backend::Etcd => etcd_endpoint(),
            Backend::Consul => consul_endpoint(),
        }
    }

    /// The bridge's backend URI for a test's prefix on the shared store.
    pub fn uri(self, names: &Names) -> String {
        self.uri_at(&self.endpoint(), names)
    }

    pub fn uri_at(self, endpoint: &str, names: &Names) -> String {
        format!("{}://{endpoint}/{}", self.scheme(), names.prefix())
    }

    fn scheme(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::Consul => "consul",
        }
    }

    /// The shortest TTL the store accepts, as a flag value.
    pub fn short_ttl(self) -> &'static str {
        match self {
            Backend::Etcd => "3",
            Backend::Consul => "10",
        }
    }

    /// How long records may outlive a killed bridge with [`Backend::short_ttl`]: etcd expires a
    /// lease within about its TTL, Consul may take up to twice the TTL; plus a margin.
    pub fn expiry_bound(self) -> Duration {
        match self {
            Backend::Etcd => Duration::from_secs(15),
            Backend::Consul => Duration::from_secs(45),
        }
    }

    pub async fn store(self) -> Store {
        self.store_at(&self.endpoint()).await
    }

    pub async fn store_at(self, endpoint: &str) -> Store {
        match self {
            Backend::Etcd => Store::Etcd(Box::new(
                Client::connect([format!("http://{endpoint}")], None)
                    .await
                    .expect("etcd client"),
            )),
            Backend::Consul => Store::Consul {
                http: reqwest::Client::new(),
                base: format!("http://{endpoint}"),
            },
        }
    }

    /// A private instance of the store that the test may stop and start.
    pub async fn private(self) -> PrivateStore {
        match self {
            Backend::Etcd => PrivateStore::Etcd(PrivateEtcd::start().await),
            Backend::Consul => PrivateStore::Consul(PrivateConsul::start().await),
        }
    }

    /// The project's own watcher of a prefix on this store.
    pub fn watch(
        self,
        endpoint: &str,
        layout: &KeyLayout,
        prefix: String,
    ) -> futures::stream::BoxStream<'static, Result<WatchEvent, backend_core::BackendError>> {
        use backend_core::Watcher;
        let uri = backend_core::BackendUri::parse(&format!(
            "{}://{endpoint}/{}",
            self.scheme(),
            layout.prefix()
        ))
        .expect("a valid URI");
        Box::pin(
            futures::stream::once(async move {
                backend_store::Store::open(&uri, &backend_store::StoreOptions::default())
                    .await
                    .expect("a client")
                    .watch_prefix(prefix)
            })
            .flatten(),
        )
    }
}

/// A private etcd or Consul.
#[derive(Debug)]
pub enum PrivateStore {
    Etcd(PrivateEtcd),
    Consul(PrivateConsul),
}

impl PrivateStore {
    pub fn endpoint(&self) -> String {
        match self {
            PrivateStore::Etcd(e) => e.endpoint(),
            PrivateStore::Consul(c) => c.endpoint(),
        }
    }
    pub async fn stop(&mut self) {
        match self {
            PrivateStore::Etcd(e) => e.stop().await,
            PrivateStore::Consul(c) => c.stop().await,
        }
    }
    pub async fn resume(&mut self) {
        match self {
            PrivateStore::Etcd(e) => e.resume().await,
            PrivateStore::Consul(c) => c.resume().await,
        }
    }
}

/// A client for reading what the bridge wrote, in etcd or Consul KV.
pub enum Store {
    Etcd(Box<Client>),
    Consul { http: reqwest::Client, base: String },
}

#[derive(serde::Deserialize)]
struct ConsulKv {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
}

impl Store {
    /// Every key and value under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        match self {
            Store::Etcd(client) => {
                let mut client = (**client).clone();
                let resp = client
                    .get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| format!("etcd get: {e}"))?;
                Ok(resp
                    .kvs()
                    .iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(kv.key()).to_string(),
                            kv.value().to_vec(),
                        )
                    })
                    .collect())
            }
            Store::Consul { http, base } => {
                let resp = http
                    .get(format!("{base}/v1/kv/{prefix}?recurse=true"))
                    .send()
                    .await
                    .map_err(|e| format!("consul get: {e}"))?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(Vec::new());
                }
                let pairs: Vec<ConsulKv> = resp.json().await.map_err(|e| e.to_string())?;
                use base64::Engine as _;
                Ok(pairs
                    .into_iter()
                    .map(|p| {
                        let value = p
                            .value
                            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                            .unwrap_or_default();
                        (p.key, value)
                    })
                    .collect())
            }
        }
    }

    /// Every record of `service` under `layout`, by instance id. A value that does not decode
    /// is an error.
    pub async fn records(
        &self,
        layout: &KeyLayout,
        service: &str,
    ) -> Result<BTreeMap<String, ServiceRecord>, String> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(&layout.service_prefix(service)).await? {
            let record = ServiceRecord::from_json(&value).map_err(|e| format!("{key}: {e}"))?;
            out.insert(record.id.clone(), record);
        }
        Ok(out)
    }

    /// Every key under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        self.list(prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    pub async fn put(&self, key: &str, value: &str) {
        match self {
            Store::Etcd(client) => {
                let mut client = (**client).clone();
                client.put(key, value, None).await.expect("etcd put");
            }
            Store::Consul { http, base } => {
                let resp = http
                    .put(format!("{base}/v1/kv/{key}"))
                    .body(value.to_string())
                    .send()
                    .await
                    .expect("consul put");
                assert!(resp.status().is_success(), "consul put: {}", resp.status());
            }
        }
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.list(key)
            .await
            .expect("get")
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Ends every lease or session of the store, as an operator (or an expiry) would.
    pub async fn end_all_sessions(&self) {
        match self {
            Store::Etcd(client) => {
                let mut client = (**client).clone();
                for lease in client.leases().await.expect("leases").leases() {
                    client.lease_revoke(lease.id()).await.expect("revoke");
                }
            }
            Store::Consul { http, base } => test_support::destroy_consul_sessions(http, base).await,
        }
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

/// A bridge process, killed when dropped. Its log goes to a file; it serves `/metrics` and
/// `/healthz` on `metrics_addr` (a free port unless the test passes `--metrics-addr`).
pub struct BridgeProcess {
    pub child: tokio::process::Child,
    pub log: PathBuf,
    pub metrics_addr: String,
    _dir: TempDir,
}

impl BridgeProcess {
    /// Starts `swarm-registrator <uri> <args>`.
    pub async fn start(uri: &str, args: &[&str]) -> BridgeProcess {
        BridgeProcess::start_with_env(uri, args, &[]).await
    }

    /// Starts `swarm-registrator <uri> <args>` with extra environment variables.
    pub async fn start_with_env(uri: &str, args: &[&str], env: &[(&str, &str)]) -> BridgeProcess {
        let dir = TempDir::new("bridge");
        let log = dir.path().join("bridge.log");
        let file = std::fs::File::create(&log).expect("log file");
        let given = args
            .iter()
            .position(|a| *a == "--metrics-addr")
            .and_then(|i| args.get(i + 1));
        let metrics_addr = match given {
            Some(addr) => addr.to_string(),
            None => format!("127.0.0.1:{}", free_port()),
        };
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"));
        command.arg(uri).args(args);
        if given.is_none() {
            command.args(["--metrics-addr", &metrics_addr]);
        }
        let child = command
            .env("RUST_LOG", "info,swarm_registrator=debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("the bridge starts");
        BridgeProcess {
            child,
            log,
            metrics_addr,
            _dir: dir,
        }
    }

    /// The value of a metric, from `/metrics`; `name` includes the labels of a labelled one.
    pub async fn metric(&self, name: &str) -> Result<f64, String> {
        let (status, body) = http_get(&self.metrics_addr, "/metrics").await?;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /metrics"))
    }

    /// The full syncs of engine and store the bridge completed
    /// (`swarm_registrator_syncs_total`); 0 while it does not answer yet.
    pub async fn syncs(&self) -> u64 {
        self.metric("swarm_registrator_syncs_total")
            .await
            .map(|n| n as u64)
            .unwrap_or(0)
    }

    /// Waits until the bridge has completed at least `n` full syncs (the first one: it is up
    /// and the store holds what the engine runs).
    pub async fn wait_synced(&self, n: u64, timeout: Duration) {
        self.wait_metric("swarm_registrator_syncs_total", n as f64, timeout)
            .await
    }

    /// Waits until the metric `name` (with its labels, as in
    /// `swarm_registrator_session_renewals_total{result="lost"}`) is at least `at_least`.
    pub async fn wait_metric(&self, name: &str, at_least: f64, timeout: Duration) {
        wait_for(&format!("{name} >= {at_least}"), timeout, || async {
            match self.metric(name).await {
                Ok(v) if v >= at_least => Ok(()),
                other => Err(format!(
                    "{other:?}; last log line: {}",
                    self.log_text().lines().last().unwrap_or_default()
                )),
            }
        })
        .await
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
