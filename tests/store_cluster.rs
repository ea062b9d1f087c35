//! The whole system on a private etcd cluster of 3 real members on loopback: a real bridge
//! process publishing the tasks of a real swarm service on the local Docker engine (simulated
//! mongod members of the `local/mongo-sim` image, on a swarm-scoped bridge network that the
//! host can reach) and the reconciler's controller, as `replset-reconciler` runs it, making
//! them a replica set.
//!
//! - `the_system_survives_a_lost_a_hung_and_a_restarted_store_member`: while the etcd leader is
//!   killed, a member hangs (SIGSTOP) for 15 s and a member is restarted, the service scales;
//!   at the end the records equal the tasks, no record of a task that kept running was ever
//!   deleted (a watch of the prefix records every delete throughout), the set's committed
//!   config equals the records (member `_id` = slot, an odd number voting) and the published URI equals
//!   the set.
//! - `the_set_keeps_serving_while_the_store_is_down_and_both_resume_after`: with every member
//!   of the store killed for 20 s, the set keeps a primary and takes majority writes and its
//!   config does not change (a task started meanwhile is not added); once the store is back
//!   the bridge publishes again, the reconciler adds that member, then applies a change made
//!   after.
//!
//! The reconciler runs in the test process (the library's `Controller`, which is all the
//! binary's `run` does after parsing its flags): a root-crate test has no `CARGO_BIN_EXE_` for
//! another package's binary, and building it from here rebuilds shared dependencies with other
//! features on every run.
//!
//! Needs the shared Docker engine in swarm mode (`scripts/services up`), the `local/mongo-sim`
//! image (`scripts/images`) and `etcd` (`ETCD_BIN`). docs/operations.md ("When the store is
//! down") describes what these tests show.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use backend_core::{BackendUri, KeyLayout, ServiceRecord, WatchEvent, Watcher};
use bson::{doc, Document};
use common::{docker, task_containers, wait_for, wait_for_tasks, BridgeProcess, Cleanup, Names};
use etcd_client::GetOptions;
use futures::StreamExt;
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::Members;
use replset_reconciler::records::Selector;
use replset_sim::peer::{Network, PeerClient};
use test_support::PrivateEtcdCluster;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SET: &str = "rs0";
const PORT: u16 = 27017;
/// How long one change may take to reach the set; generous, as the machine is shared.
const CONVERGE: Duration = Duration::from_secs(60);
/// How long a stopped member of the store hangs.
const HANG: Duration = Duration::from_secs(15);
/// How long the whole store stays down: longer than the bridge's TTL (5 s) and the
/// reconciler's leader TTL (10 s), so that both lose what they held.
const OUTAGE: Duration = Duration::from_secs(20);

/// The two tests share one engine and two cores: one at a time (under `cargo test`; `cargo
/// nextest` runs each test in its own process, and .config/nextest.toml groups them).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the reconciler's log goes: one file in cargo's scratch directory for integration
/// tests (`target/tmp`), made anew by each run; both tests write to it, one after the other.
fn reconciler_log() -> &'static PathBuf {
    static LOG: OnceLock<PathBuf> = OnceLock::new();
    LOG.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("store_cluster-reconciler.log");
        let file = std::fs::File::create(&path).expect("the reconciler's log file");
        let filter = tracing_subscriber::EnvFilter::new("info,replset_reconciler=debug");
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(Mutex::new(file))
            .try_init();
        path
    })
}

/// The reconciler's controller, configured as `replset-reconciler <uri> --service <service>
/// --replset rs0 --removal-grace 3s --debounce 300ms --leader-ttl 10s` runs it, until dropped.
struct Reconciler {
    shutdown: CancellationToken,
}

impl Reconciler {
    async fn start(uri: &BackendUri, service: &str) -> Reconciler {
        reconciler_log();
        let store = backend_store::Store::open(uri, &backend_store::StoreOptions::default())
            .await
            .expect("the reconciler's client of the store");
        let config = ControllerConfig {
            layout: uri.layout().clone(),
            selectors: vec![Selector::Service {
                service: service.into(),
                set: SET.into(),
                port: None,
            }],
            removal_grace: Duration::from_secs(3),
            debounce: Duration::from_millis(300),
            // The binary's.
            resync: Duration::from_secs(15),
            leader_ttl: Duration::from_secs(10),
            holder: "store-cluster-test".into(),
            dry_run: false,
            metrics: Arc::new(replset_reconciler::metrics::Metrics::default()),
            force_after: None,
        };
        let shutdown = CancellationToken::new();
        let controller = Controller::start(
            Arc::new(store),
            Arc::new(Members::new(None)),
            config,
            shutdown.clone(),
        );
        tokio::spawn(controller.run());
        Reconciler { shutdown }
    }
}

impl Drop for Reconciler {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Prints the last lines of the logs when the test fails.
struct LogsOnPanic(Vec<(&'static str, PathBuf)>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (what, path) in &self.0 {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                eprintln!("--- {what} log ---\n{}", tail(&text));
            }
        }
    }
}

/// Every delete of a record the watch saw, and its current view of the records.
#[derive(Debug, Default)]
struct Deletes {
    view: BTreeSet<String>,
    deleted: Vec<(String, Duration)>,
}

/// Watches `prefix` through the project's own watcher for the rest of the test, recording
/// every delete (also one a re-list reveals: a key the new list no longer has).
fn watch_deletes(uri: &BackendUri, prefix: String) -> Arc<Mutex<Deletes>> {
    let log = Arc::new(Mutex::new(Deletes::default()));
    let (uri, out) = (uri.clone(), log.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let store = backend_store::Store::open(&uri, &backend_store::StoreOptions::default())
            .await
            .expect("a client of the store");
        let mut stream = store.watch_prefix(prefix);
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            let mut d = out.lock().expect("the delete log");
            match event {
                WatchEvent::Restarted(entries) => {
                    let now: BTreeSet<String> = entries.into_iter().map(|e| e.key).collect();
                    let gone: Vec<String> = d.view.difference(&now).cloned().collect();
                    for key in gone {
                        d.deleted.push((key, started.elapsed()));
                    }
                    d.view = now;
                }
                WatchEvent::Put(entry) => {
                    d.view.insert(entry.key);
                }
                WatchEvent::Deleted(key) => {
                    d.view.remove(&key);
                    d.deleted.push((key, started.elapsed()));
                }
            }
        }
    });
    log
}

/// One test's world: the store cluster, the service, and how to check the system.
struct Scene {
    cleanup: Cleanup,
    cluster: PrivateEtcdCluster,
    uri: String,
    layout: KeyLayout,
    service: String,
    network: String,
    /// Task ids of the tasks this test's scale-downs ended (their deletes are expected).
    removed: BTreeSet<String>,
    peer: PeerClient,
}

impl Scene {
    async fn new(tag: &str) -> Scene {
        let names = Names::new(tag);
        let mut cleanup = Cleanup::default();
        let network = names.name("net");
        // A swarm-scoped bridge network: swarm tasks on it have addresses the host reaches.
        docker(&[
            "network",
            "create",
            "-d",
            "bridge",
            "--scope",
            "swarm",
            "--attachable",
            &network,
        ])
        .await;
        cleanup.network(&network);
        let cluster = PrivateEtcdCluster::start(3).await;
        let uri = format!(
            "etcd://{}/{}",
            cluster.endpoints().join(","),
            names.prefix()
        );
        Scene {
            layout: names.layout(),
            service: names.name("db"),
            network,
            cleanup,
            cluster,
            uri,
            removed: BTreeSet::new(),
            peer: PeerClient::new("store-cluster-test".into(), Network::default()),
        }
    }

    fn backend_uri(&self) -> BackendUri {
        BackendUri::parse(&self.uri).expect("a backend URI")
    }

    /// Creates the service of simulated members with `replicas` tasks and waits for them.
    async fn create_service(&mut self, replicas: usize) {
        let replicas_arg = replicas.to_string();
        let port = PORT.to_string();
        let label = format!("registrator.port={PORT}");
        self.cleanup.service(&self.service);
        docker(&[
            "service",
            "create",
            "--detach",
            "--quiet",
            "--name",
            &self.service,
            "--replicas",
            &replicas_arg,
            "--network",
            &self.network,
            "--container-label",
            &label,
            "--stop-grace-period",
            "1s",
            "local/mongo-sim",
            // The image's mongod is the simulator; in memory, without --dbpath.
            "mongod",
            "--bind_ip_all",
            "--port",
            &port,
            "--replSet",
            SET,
        ])
        .await;
        wait_for_tasks(&self.service, &self.network, replicas, CONVERGE).await;
    }

    /// Scales the service to `n` and waits until `n` tasks run; remembers the tasks that ended.
    async fn scale(&mut self, n: usize) {
        let before = self.task_ids().await;
        docker(&[
            "service",
            "scale",
            "--detach",
            &format!("{}={n}", self.service),
        ])
        .await;
        wait_for_tasks(&self.service, &self.network, n, CONVERGE).await;
        let after = self.task_ids().await;
        self.removed.extend(before.difference(&after).cloned());
    }

    async fn task_ids(&self) -> BTreeSet<String> {
        task_containers(&self.service, &self.network)
            .await
            .into_iter()
            .map(|t| t.task_id)
            .collect()
    }

    /// The running tasks: slot to `ip:port`, and record key to `ip:port`.
    async fn tasks(&self) -> (BTreeMap<i64, String>, BTreeMap<String, String>) {
        let tasks = task_containers(&self.service, &self.network).await;
        let slots = tasks
            .iter()
            .map(|t| (t.slot as i64, format!("{}:{PORT}", t.ip)))
            .collect();
        let keys = tasks
            .iter()
            .map(|t| {
                (
                    self.layout.service_key(&self.service, &t.task_id),
                    format!("{}:{PORT}", t.ip),
                )
            })
            .collect();
        (slots, keys)
    }

    /// Reads every key under `prefix` through any member that answers.
    async fn read(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
        let endpoints: Vec<String> = self
            .cluster
            .endpoints()
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let read = async {
            let mut c = etcd_client::Client::connect(endpoints, None)
                .await
                .map_err(|e| e.to_string())?;
            let resp = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| e.to_string())?;
            Ok(resp
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        kv.value().to_vec(),
                    )
                })
                .collect())
        };
        tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .map_err(|_| "no answer from the store within 3 s".to_string())?
    }

    /// The service's records: key to `ip:port`.
    async fn records(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = BTreeMap::new();
        for (key, value) in self
            .read(&self.layout.service_prefix(&self.service))
            .await?
        {
            let r = ServiceRecord::from_json(&value).map_err(|e| format!("{key}: {e}"))?;
            out.insert(key, format!("{}:{}", r.ip, r.port));
        }
        Ok(out)
    }

    /// Runs `cmd` on the member at `host`; the reply if it says `ok: 1`.
    async fn command(&self, host: &str, cmd: Document) -> Result<Document, String> {
        let reply = self
            .peer
            .run(host, &cmd, Duration::from_secs(3))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        if number(&reply, "ok") == Some(1) {
            Ok(reply)
        } else {
            Err(format!("{host}: {reply}"))
        }
    }

    /// The member of a running task that is primary.
    async fn primary(&self) -> Result<String, String> {
        let mut seen = Vec::new();
        for host in self.tasks().await.0.into_values() {
            match self.command(&host, doc! {"hello": 1, "$db": "admin"}).await {
                Ok(r) if r.get_bool("isWritablePrimary").unwrap_or(false) => return Ok(host),
                Ok(_) => seen.push(format!("{host}: not primary")),
                Err(e) => seen.push(e),
            }
        }
        Err(format!("no primary: {}", seen.join("; ")))
    }

    /// The primary's config, once committed: its version and its members, `_id` to host and
    /// votes.
    async fn config(&self) -> Result<(i64, BTreeMap<i64, (String, i64)>), String> {
        let primary = self.primary().await?;
        let cmd = doc! {"replSetGetConfig": 1, "commitmentStatus": true, "$db": "admin"};
        let reply = self.command(&primary, cmd).await?;
        if !reply.get_bool("commitmentStatus").unwrap_or(false) {
            return Err(format!("the config is not committed yet: {reply}"));
        }
        let config = reply
            .get_document("config")
            .map_err(|e| format!("{e}: {reply}"))?;
        let version = number(config, "version").ok_or_else(|| format!("{config}"))?;
        let mut members = BTreeMap::new();
        for m in config.get_array("members").map_err(|e| e.to_string())? {
            let m = m.as_document().ok_or("a member that is no document")?;
            let id = number(m, "_id").ok_or_else(|| format!("{m}"))?;
            let host = m.get_str("host").map_err(|e| e.to_string())?.to_string();
            members.insert(id, (host, number(m, "votes").unwrap_or(1)));
        }
        Ok((version, members))
    }

    /// The hosts of the connection string the reconciler published.
    async fn published_hosts(&self) -> Result<BTreeSet<String>, String> {
        let key = self.layout.replset_uri_key(SET);
        let value = self
            .read(&key)
            .await?
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
            .ok_or("no URI yet")?;
        let hosts = value
            .strip_prefix("mongodb://")
            .and_then(|rest| rest.strip_suffix(&format!("/?replicaSet={SET}")))
            .ok_or_else(|| format!("not a connection string of {SET}: {value}"))?;
        Ok(hosts.split(',').map(str::to_string).collect())
    }

    /// The whole system agrees: the records are the running tasks, the set's committed config
    /// is their slots at their hosts with as many voters as rule 4 allows, and the URI names
    /// them.
    async fn check_converged(&self) -> Result<i64, String> {
        let (slots, want) = self.tasks().await;
        let records = self.records().await?;
        if records != want {
            return Err(format!("records {records:?}, tasks {want:?}"));
        }
        let (version, members) = self.config().await?;
        let hosts_by_id: BTreeMap<i64, String> = members
            .iter()
            .map(|(id, (host, _))| (*id, host.clone()))
            .collect();
        // Rule 4: an odd number of voters, at most 7 (4 members: 3 vote).
        let voters = members.values().filter(|(_, votes)| *votes == 1).count();
        let want_voters = match slots.len().min(7) {
            n if n % 2 == 0 => n - 1,
            n => n,
        };
        if hosts_by_id != slots || voters != want_voters {
            return Err(format!(
                "config {version} {members:?} ({voters} voting), tasks {slots:?} \
                 ({want_voters} to vote)"
            ));
        }
        let published = self.published_hosts().await?;
        let hosts: BTreeSet<String> = slots.into_values().collect();
        if published != hosts {
            return Err(format!("URI {published:?}, set {hosts:?}"));
        }
        Ok(version)
    }

    /// Waits until [`Scene::check_converged`]; returns the config version and how long it took.
    async fn converged(&self, what: &str) -> (i64, Duration) {
        let t = Instant::now();
        let version = wait_for(what, CONVERGE, || self.check_converged()).await;
        let took = t.elapsed();
        eprintln!("[store_cluster] {what}: converged after {took:.1?} (config {version})");
        (version, took)
    }

    /// A majority write through the primary.
    async fn write(&self, n: i64) -> Result<(), String> {
        let primary = self.primary().await?;
        let cmd = doc! {
            "insert": "outage",
            "documents": [{"_id": n}],
            "writeConcern": {"w": "majority", "wtimeout": 5000},
            "$db": "app",
        };
        let reply = self.command(&primary, cmd).await?;
        if reply.contains_key("writeErrors") || reply.contains_key("writeConcernError") {
            return Err(format!("{primary}: {reply}"));
        }
        Ok(())
    }

    /// Asserts that the watch saw the final records and that every delete it saw was of a task
    /// this test's scale-downs ended.
    async fn assert_nothing_removed_by_mistake(&self, deletes: &Arc<Mutex<Deletes>>) {
        let records: BTreeSet<String> =
            self.records().await.expect("records").into_keys().collect();
        let prefix = self.layout.service_prefix(&self.service);
        wait_for("the watch to see the records", CONVERGE, || async {
            let d = deletes.lock().expect("the delete log");
            let view: BTreeSet<String> = d
                .view
                .iter()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            if view == records {
                Ok(())
            } else {
                Err(format!("watch {view:?}, store {records:?}"))
            }
        })
        .await;
        let d = deletes.lock().expect("the delete log");
        let ended: BTreeSet<String> = self
            .removed
            .iter()
            .map(|id| self.layout.service_key(&self.service, id))
            .collect();
        let mine: Vec<&(String, Duration)> = d
            .deleted
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .collect();
        let wrong: Vec<&&(String, Duration)> = mine
            .iter()
            .filter(|(key, _)| !ended.contains(key))
            .collect();
        assert!(
            wrong.is_empty(),
            "records of running tasks were deleted: {wrong:?}"
        );
        eprintln!("[store_cluster] deletes seen (key, since the watch began): {mine:?}");
    }
}

/// An integer field of a reply, whatever its BSON type.
fn number(d: &Document, k: &str) -> Option<i64> {
    d.get_i32(k)
        .map(i64::from)
        .or_else(|_| d.get_i64(k))
        .or_else(|_| d.get_f64(k).map(|v| v as i64))
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_survives_a_lost_a_hung_and_a_restarted_store_member() {
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut s = Scene::new("storecl").await;
    s.create_service(3).await;
    let deletes = watch_deletes(&s.backend_uri(), s.layout.services_prefix());
    let bridge = BridgeProcess::start(&s.uri, &[]).await;
    let _reconciler = Reconciler::start(&s.backend_uri(), &s.service).await;
    let _logs = LogsOnPanic(vec![
        ("bridge", bridge.log.clone()),
        ("reconciler", reconciler_log().clone()),
    ]);
    s.converged("a set of 3").await;

    // 1. The store's leader is killed; the service grows meanwhile.
    let leader = s.cluster.leader().await;
    s.cluster.kill(leader).await;
    s.scale(4).await;
    s.converged("4 members, the store's leader killed").await;
    s.cluster.restart(leader).await;

    // 2. The store's (new) leader hangs for 15 s; the service shrinks meanwhile.
    let frozen = s.cluster.leader().await;
    s.cluster.freeze(frozen).await;
    let thaw_at = Instant::now() + HANG;
    s.scale(3).await;
    let (_, took) = s.converged("3 members, a store member hung").await;
    // The hang itself, not a condition: it lasts its 15 s whatever happened meanwhile.
    tokio::time::sleep_until(thaw_at).await;
    s.cluster.thaw(frozen).await;
    eprintln!("[store_cluster] converged {took:.1?} into the {HANG:?} hang");

    // 3. A member of the store is restarted; the service grows meanwhile.
    let restarted = (frozen + 1) % 3;
    s.cluster.kill(restarted).await;
    s.scale(4).await;
    s.cluster.restart(restarted).await;
    s.converged("4 members, a store member restarted").await;

    s.assert_nothing_removed_by_mistake(&deletes).await;
    eprintln!("[store_cluster] whole test {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_set_keeps_serving_while_the_store_is_down_and_both_resume_after() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut s = Scene::new("storedown").await;
    s.create_service(3).await;
    let bridge = BridgeProcess::start(&s.uri, &["--ttl", "5"]).await;
    let _reconciler = Reconciler::start(&s.backend_uri(), &s.service).await;
    let _logs = LogsOnPanic(vec![
        ("bridge", bridge.log.clone()),
        ("reconciler", reconciler_log().clone()),
    ]);
    let (before, _) = s.converged("a set of 3").await;
    let (_, config_before) = s.config().await.expect("the config");

    // The whole store goes down; the service grows meanwhile (nobody can publish the task).
    s.cluster.kill_all().await;
    let down = Instant::now();
    s.scale(4).await;
    let mut writes = 0;
    // The outage itself, not a condition: the set is checked every second throughout.
    while down.elapsed() < OUTAGE {
        let (version, members) = s.config().await.expect("a primary and its config");
        assert_eq!(
            version, before,
            "the config changed while the store was down"
        );
        assert_eq!(
            members, config_before,
            "the members changed while the store was down"
        );
        s.write(writes)
            .await
            .expect("a majority write while the store is down");
        writes += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!("[store_cluster] {writes} majority writes while the store was down {OUTAGE:?}");
    bridge
        .wait_metric(
            r#"swarm_registrator_backend_errors_total{operation="publish"}"#,
            1.0,
            CONVERGE,
        )
        .await;

    // The store comes back: the bridge publishes the new task, the reconciler adds it.
    s.cluster.restart_all().await;
    let back = Instant::now();
    wait_for("the new task's record", CONVERGE, || async {
        let (_, want) = s.tasks().await;
        let records = s.records().await?;
        if records == want {
            Ok(())
        } else {
            Err(format!("records {records:?}, tasks {want:?}"))
        }
    })
    .await;
    let published = back.elapsed();
    let (after, _) = s.converged("4 members once the store is back").await;
    assert!(after > before, "config {after} after {before}");
    eprintln!(
        "[store_cluster] store back: records after {published:.1?}, member added after {:.1?}",
        back.elapsed()
    );

    // A change made after the store returned.
    s.scale(3).await;
    s.converged("3 members after a change made once the store is back")
        .await;
    eprintln!("--- bridge log ---\n{}", tail(&bridge.log_text()));
}

/// The last lines of a log, for the test's output.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}
