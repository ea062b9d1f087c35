//! Fencing (safety rule 12) with real parts: two `replset-reconciler` processes against the
//! real etcd, then the real Consul, of the test services, and simulated members on loopback.
//! One leads; it is stopped (SIGSTOP) for longer than its lease TTL, so the store expires its
//! lease or session and the other takes over and changes the set (a fourth member, from a
//! new record). Then the first runs again (SIGCONT) believing it leads. Before it notices
//! that it does not, it must neither reconfigure the set nor write to the store:
//!
//! * the simulated set's config history stays what the new leader made it;
//! * the set's keys (`uri`, `status`, `identity`) keep the revision (etcd `mod_revision`,
//!   Consul `ModifyIndex`) of the new leader's last write;
//! * the first process's /metrics count the leadership lost, and no step applied or refused
//!   since it was stopped; its withheld steps and fenced writes are printed.
//!
//! The first process's lines on how it noticed (printed) say it gave up on its own clock
//! ("no renewal succeeded in time"): on SIGCONT its give-up instant has long passed.
//!
//! The assertions fail when the resumed process acts on its stale leadership: with fencing
//! taken out (no give-up instant, no step withheld, plain writes, the loss ignored), it rewrote the connection string and the status at
//! once (their last versions of its own name three members), and the test failed on the
//! moved revisions, for both stores. Which safeguard stops it first is a race on a real
//! machine; the paused tests (tests/paused.rs) show each alone: a step withheld when the
//! lease has too little time left, a write refused by the store after the lease expired.
//!
//! `cargo test -p replset-reconciler --test fencing`: 12 to 16 s for etcd and 21 to 25 s for
//! Consul (run in parallel), most of it the TTL and, for Consul, the up to 2 x TTL the server
//! takes to end a session.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use backend_core::{BackendUri, Coordinator, KeyLayout, ReplSetStatus};
use backend_store::StoreOptions;
use replset_sim::{Cluster, Event};
use test_support::contract::{mongo_task_record, unique_layout};
use test_support::{free_port, http_get, run_ok, spawn_logged, wait_for, TempDir};

/// The leader TTL of both processes: the least Consul takes, and more than a step can take
/// (5 s) plus the safety margin (1 s) plus a renewal interval (TTL/3), so that a leader that
/// renews on time never withholds a step.
const TTL: Duration = Duration::from_secs(10);

/// How long any one condition may take to come true.
const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Etcd,
    Consul,
}

impl Backend {
    fn uri(self, layout: &KeyLayout) -> String {
        match self {
            Backend::Etcd => format!("etcd://{}/{}", etcd_endpoint(), layout.prefix()),
            Backend::Consul => format!("consul://{}/{}", consul_endpoint(), layout.prefix()),
        }
    }
}

fn etcd_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

fn consul_endpoint() -> String {
    std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8500".into())
}

/// The store as the test reads and writes it: the project's client for the records, the
/// store's own API for the revisions of keys.
struct Store {
    backend: Backend,
    layout: KeyLayout,
    client: backend_store::Store,
    http: reqwest::Client,
}

impl Store {
    async fn open(backend: Backend, layout: &KeyLayout) -> Store {
        let options = StoreOptions {
            consul_catalog: false,
            ..StoreOptions::default()
        };
        let uri = BackendUri::parse(&backend.uri(layout)).expect("a URI");
        let client = backend_store::Store::open(&uri, &options)
            .await
            .expect("a client of the store");
        Store {
            backend,
            layout: layout.clone(),
            client,
            http: reqwest::Client::new(),
        }
    }

    /// The record of `host` in `slot`, as the bridge writes it.
    async fn publish(&self, slot: u64, host: &str) {
        let r = mongo_task_record(slot, host).expect("host:port");
        self.client
            .put_value(&self.layout.service_key(&r.service, &r.id), r.to_json())
            .await
            .expect("put a record");
    }

    async fn status(&self, set: &str) -> Result<ReplSetStatus, String> {
        let v = self
            .client
            .get_value(&self.layout.replset_status_key(set))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no status yet")?;
        ReplSetStatus::from_json(&v).map_err(|e| e.to_string())
    }

    async fn uri(&self, set: &str) -> Result<String, String> {
        let v = self
            .client
            .get_value(&self.layout.replset_uri_key(set))
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no connection string yet")?;
        String::from_utf8(v).map_err(|e| e.to_string())
    }

    /// The revision of the last write of `key` (etcd `mod_revision`, Consul `ModifyIndex`);
    /// `None` when there is no such key.
    async fn revision(&self, key: &str) -> Option<i64> {
        match self.backend {
            Backend::Etcd => {
                let mut etcd = etcd_client::Client::connect([etcd_endpoint()], None)
                    .await
                    .expect("etcd");
                let got = etcd.get(key, None).await.expect("an etcd read");
                got.kvs().first().map(|kv| kv.mod_revision())
            }
            Backend::Consul => {
                let url = format!("http://{}/v1/kv/{key}", consul_endpoint());
                let resp = self.http.get(url).send().await.expect("a Consul read");
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return None;
                }
                let pairs: Vec<serde_json::Value> = resp.json().await.expect("KV pairs");
                pairs.first().and_then(|p| p["ModifyIndex"].as_i64())
            }
        }
    }

    /// The revisions of the keys a leader writes for `set`.
    async fn revisions(&self, set: &str) -> Vec<(String, Option<i64>)> {
        let mut out = Vec::new();
        for key in [
            self.layout.replset_uri_key(set),
            self.layout.replset_status_key(set),
            self.layout.replset_identity_key(set),
        ] {
            let rev = self.revision(&key).await;
            out.push((key, rev));
        }
        out
    }

    /// Removes everything under the test's prefix.
    async fn clean_up(&self) {
        let prefix = format!("{}/", self.layout.prefix());
        match self.backend {
            Backend::Etcd => {
                let mut etcd = etcd_client::Client::connect([etcd_endpoint()], None)
                    .await
                    .expect("etcd");
                etcd.delete(
                    prefix,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await
                .expect("clean up");
            }
            Backend::Consul => {
                let url = format!("http://{}/v1/kv/{prefix}?recurse", consul_endpoint());
                self.http.delete(url).send().await.expect("clean up");
            }
        }
    }
}

/// One `replset-reconciler` process, with its /metrics on a port of its own and its log in
/// the test's directory.
struct Reconciler {
    name: &'static str,
    child: tokio::process::Child,
    metrics: String,
    log: PathBuf,
}

impl Reconciler {
    fn spawn(
        name: &'static str,
        backend: Backend,
        layout: &KeyLayout,
        set: &str,
        dir: &TempDir,
    ) -> Self {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join(format!("{name}.log"));
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_replset-reconciler"));
        command
            .arg(backend.uri(layout))
            .args(["--service", "mongo", "--replset", set])
            .args(["--leader-ttl", &format!("{}s", TTL.as_secs())])
            .args(["--debounce", "200ms", "--removal-grace", "2s"])
            .args(["--metrics-addr", &metrics])
            // The holder named in the leader key.
            .env("HOSTNAME", name)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for var in [
            "RECONCILER_SERVICE",
            "RECONCILER_REPLSET",
            "RECONCILER_PORT",
        ] {
            command.env_remove(var);
        }
        let child = spawn_logged(&mut command, &log, name);
        Reconciler {
            name,
            child,
            metrics,
            log,
        }
    }

    fn pid(&self) -> String {
        self.child.id().expect("the process runs").to_string()
    }

    async fn signal(&self, signal: &str) {
        run_ok(
            tokio::process::Command::new("kill").args([format!("-{signal}"), self.pid()]),
            &format!("kill -{signal} {}", self.name),
        )
        .await;
    }

    /// Its counters now (`replset_reconciler_<name>_total`, summed over the labels).
    async fn counters(&self) -> Result<Counters, String> {
        let (code, body) = http_get(&self.metrics, "/metrics").await?;
        if code != 200 {
            return Err(format!("/metrics of {} answered {code}", self.name));
        }
        let sum = |name: &str| -> u64 {
            let total = format!("replset_reconciler_{name}_total");
            body.lines()
                .filter(|l| {
                    l.strip_prefix(&total)
                        .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        Ok(Counters {
            gained: sum("leadership_gained"),
            lost: sum("leadership_lost"),
            applied: sum("steps_applied"),
            refused: sum("steps_refused"),
            withheld: sum("steps_withheld"),
            fenced: sum("writes_fenced"),
        })
    }

    /// Waits until its counters satisfy `ok`.
    async fn wait_counters(&self, what: &str, ok: impl Fn(&Counters) -> bool) -> Counters {
        wait_for(&format!("{}: {what}", self.name), WAIT, || async {
            let c = self.counters().await?;
            if ok(&c) {
                Ok(c)
            } else {
                Err(format!("{c:?}"))
            }
        })
        .await
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it the way swarm does (SIGTERM: it resigns), then waits for it to exit.
    async fn stop(mut self) {
        self.signal("CONT").await;
        self.signal("TERM").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    gained: u64,
    lost: u64,
    applied: u64,
    refused: u64,
    withheld: u64,
    fenced: u64,
}

/// The version and member `_id`s of every config a primary installed, in order.
fn config_history(cluster: &Cluster) -> Vec<(i64, Vec<i64>)> {
    cluster
        .history()
        .configs()
        .into_iter()
        .filter_map(|e| match e {
            Event::ConfigInstalled {
                version, config, ..
            } => {
                let ids = config
                    .get_array("members")
                    .map(|ms| {
                        ms.iter()
                            .filter_map(|m| m.as_document()?.get_i32("_id").ok())
                            .map(i64::from)
                            .collect()
                    })
                    .unwrap_or_default();
                Some((version, ids))
            }
            _ => None,
        })
        .collect()
}

/// The status says converged with `n` members, on the config the set has now.
async fn converged(store: &Store, cluster: &Cluster, set: &str, n: usize) -> Result<(), String> {
    let status = store.status(set).await?;
    let installed = config_history(cluster).last().map(|(v, _)| *v);
    if status.converged_with(n) && Some(status.config_version) == installed {
        Ok(())
    } else {
        Err(format!("{status:?} (installed config {installed:?})"))
    }
}

async fn a_paused_leader_neither_reconfigures_nor_writes_once_resumed(backend: Backend) {
    let started = Instant::now();
    let dir = TempDir::new("fencing");
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let layout = unique_layout("fencing");
    let store = Store::open(backend, &layout).await;
    for (i, host) in cluster.hosts().iter().enumerate() {
        store.publish(i as u64 + 1, host).await;
    }

    // a starts first and leads; b waits for the leader key.
    let a = Reconciler::spawn("fencing-a", backend, &layout, &set, &dir);
    a.wait_counters("leads", |c| c.gained == 1).await;
    let b = Reconciler::spawn("fencing-b", backend, &layout, &set, &dir);
    b.wait_counters("is up and does not lead", |c| c.gained == 0)
        .await;
    wait_for("a set of 3, converged", WAIT, || {
        converged(&store, &cluster, &set, 3)
    })
    .await;
    let a_before = a.counters().await.expect("a's metrics");
    assert!(a_before.applied > 0, "a initiated the set: {a_before:?}");

    // a hangs past its TTL: the store ends its lease or session, b takes over.
    a.signal("STOP").await;
    let stopped = Instant::now();
    b.wait_counters("leads once a's lease expired", |c| c.gained == 1)
        .await;
    let took_over = stopped.elapsed();
    assert!(
        took_over >= TTL / 2,
        "b led after {took_over:?}, before a's lease could expire"
    );

    // A new task: b adds its member.
    let new = cluster.add_member().await.expect("a fourth member");
    let new_host = cluster.host(new).expect("its host").to_string();
    store.publish(new as u64 + 1, &new_host).await;
    wait_for("b's set of 4, converged", WAIT, || {
        converged(&store, &cluster, &set, 4)
    })
    .await;
    let uri = wait_for("the connection string of 4", WAIT, || async {
        let uri = store.uri(&set).await?;
        if uri.contains(&new_host) {
            Ok(uri)
        } else {
            Err(uri)
        }
    })
    .await;
    let configs = config_history(&cluster);
    let revisions = store.revisions(&set).await;
    let b_before = b.counters().await.expect("b's metrics");
    assert!(b_before.applied > 0, "b added the member: {b_before:?}");

    // a runs again, still believing it leads, until it notices.
    a.signal("CONT").await;
    // Until it says so (leadership lost), or it acted: then the assertions below say how.
    let a_after = wait_for(
        "a to notice it lost the leadership, or to act",
        WAIT,
        || async {
            let c = a.counters().await?;
            let acted = c.applied != a_before.applied
                || c.refused != a_before.refused
                || config_history(&cluster) != configs
                || store.revisions(&set).await != revisions;
            if c.lost >= 1 || acted {
                Ok(c)
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await;
    let a_log = a.log();
    let why = a_log
        .lines()
        .filter(|l| l.contains("lost leadership") || l.contains("refused by the store"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!(
        "{backend:?}: b led {took_over:?} after a was stopped; a, resumed: {a_after:?}; \
         whole test {:?}\n{why}",
        started.elapsed()
    );
    assert_eq!(
        (a_after.applied, a_after.refused),
        (a_before.applied, a_before.refused),
        "a sent a step after it was resumed: {a_after:?}\n{}",
        a.log()
    );
    assert_eq!(
        config_history(&cluster),
        configs,
        "the set's configs changed after a was resumed\n{}",
        cluster.history().render()
    );
    assert_eq!(
        store.revisions(&set).await,
        revisions,
        "a key was written after a was resumed\n{}",
        a.log()
    );
    assert_eq!(store.uri(&set).await.as_deref(), Ok(uri.as_str()));
    converged(&store, &cluster, &set, 4)
        .await
        .expect("still b's status");
    // b still leads; a campaigns again and waits.
    let b_after = b.counters().await.expect("b's metrics");
    assert_eq!((b_after.gained, b_after.lost), (1, 0), "{b_after:?}");
    let a_now = a.counters().await.expect("a's metrics");
    assert_eq!(a_now.gained, 1, "a led again: {a_now:?}\n{}", a.log());

    a.stop().await;
    b.stop().await;
    store.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_paused_leader_neither_reconfigures_nor_writes_once_resumed() {
    a_paused_leader_neither_reconfigures_nor_writes_once_resumed(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_a_paused_leader_neither_reconfigures_nor_writes_once_resumed() {
    a_paused_leader_neither_reconfigures_nor_writes_once_resumed(Backend::Consul).await;
}
