//! The fault-injection subcommands as a runner uses them: the app's binary runs `workload` for a
//! few seconds against a simulated three-member set (in process) whose connection string is in
//! the test services' etcd, then `dump`; the test parses every line of both and checks the
//! history: acknowledged writes are all in the dump with their values, writes that certainly
//! failed are not, nothing is in the dump that was not written, and reads of acknowledged
//! writes find them. One run is quiet (and the URI appears only after the workload started);
//! one kills the primary in the middle.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use backend_core::{BackendUri, Coordinator};
use replset_sim::Cluster;
use serde_json::Value;
use test_support::contract::unique_layout;

/// A simulated set, initiated, with a primary.
async fn set() -> Cluster {
    let cluster = Cluster::start(3).await.expect("simulated members");
    cluster.initiate().await.expect("initiate");
    cluster
        .wait_for_stable(Duration::from_secs(30))
        .await
        .expect("a primary");
    cluster
}

/// A fresh prefix in the test services' etcd: the backend URI for the app, the key of the
/// set's connection string, and a client to write it with.
async fn store(tag: &str, set: &str) -> (String, String, backend_store::Store) {
    let endpoint = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let endpoint = endpoint.split(',').next().unwrap_or("127.0.0.1:2379");
    let layout = unique_layout(tag);
    let backend = format!("etcd://{endpoint}/{}", layout.prefix());
    let store = backend_store::Store::open(
        &BackendUri::parse(&backend).expect("a URI"),
        &backend_store::StoreOptions::default(),
    )
    .await
    .expect("an etcd client (scripts/services up)");
    (backend, layout.replset_uri_key(set), store)
}

/// Publishes the connection string of `hosts` (as the reconciler does); returns it.
async fn publish(store: &backend_store::Store, key: &str, hosts: &[String], set: &str) -> String {
    let uri = format!("mongodb://{}/?replicaSet={set}", hosts.join(","));
    store
        .put_value(key, uri.clone().into_bytes())
        .await
        .expect("put the URI");
    uri
}

/// Runs the app's binary with `args`; its exit code, stdout and stderr.
async fn demo_app<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_replset-demo-app"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the demo app runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One operation of the history.
#[derive(Debug, Clone)]
struct Op {
    client: u64,
    write: bool,
    id: String,
    value: Option<String>,
    start_ms: u64,
    end_ms: u64,
    outcome: String,
    error: Option<String>,
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

fn text(v: &Value, field: &str, line: &str) -> Option<String> {
    match &v[field] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("{field} is neither a string nor null ({other}): {line}"),
    }
}

fn number(v: &Value, field: &str, line: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number: {line}"))
}

/// Parses the workload's stdout, checking the format of every line and the `done` counts.
fn parse_workload(stdout: &str, run: &str, clients: u64) -> Vec<Op> {
    let op_keys = BTreeSet::from([
        "type", "client", "op", "id", "value", "start_ms", "end_ms", "outcome", "error",
    ]);
    let mut ops = Vec::new();
    let mut done = BTreeMap::new();
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        match v["type"].as_str() {
            Some("op") => {
                assert!(done.is_empty(), "an op after a done line: {line}");
                assert_eq!(keys(&v), op_keys, "{line}");
                let op = Op {
                    client: number(&v, "client", line),
                    write: match v["op"].as_str() {
                        Some("write") => true,
                        Some("read") => false,
                        _ => panic!("op is neither write nor read: {line}"),
                    },
                    id: text(&v, "id", line).unwrap_or_else(|| panic!("no id: {line}")),
                    value: text(&v, "value", line),
                    start_ms: number(&v, "start_ms", line),
                    end_ms: number(&v, "end_ms", line),
                    outcome: text(&v, "outcome", line).unwrap_or_default(),
                    error: text(&v, "error", line),
                };
                assert!(
                    ["ok", "fail", "info"].contains(&op.outcome.as_str()),
                    "{line}"
                );
                assert_eq!(op.outcome == "ok", op.error.is_none(), "{line}");
                assert!(op.start_ms <= op.end_ms, "{line}");
                assert!((1..=clients).contains(&op.client), "{line}");
                assert!(
                    op.id.starts_with(&format!("{run}-c{}-", op.client)),
                    "{line}"
                );
                if op.write {
                    let value = op.value.as_deref().unwrap_or_default();
                    let nonce = value
                        .strip_prefix(&format!("{}-", op.id))
                        .unwrap_or_else(|| panic!("the value is not <id>-<hex>: {line}"));
                    assert!(
                        nonce.len() == 8 && nonce.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{line}"
                    );
                }
                ops.push(op);
            }
            Some("done") => {
                assert_eq!(
                    keys(&v),
                    BTreeSet::from(["type", "client", "ops"]),
                    "{line}"
                );
                done.insert(number(&v, "client", line), number(&v, "ops", line));
            }
            _ => panic!("an unknown line: {line}"),
        }
    }
    let expected: BTreeMap<u64, u64> = (1..=clients)
        .map(|k| (k, ops.iter().filter(|o| o.client == k).count() as u64))
        .collect();
    assert_eq!(done, expected, "one done line per client, with its count");
    // The writes of a client are numbered 1, 2, 3, ... and a read is of an id written before.
    for k in 1..=clients {
        let mut written = BTreeSet::new();
        for op in ops.iter().filter(|o| o.client == k) {
            if op.write {
                assert_eq!(op.id, format!("{run}-c{k}-{}", written.len() + 1));
                written.insert(op.id.clone());
            } else {
                assert!(
                    written.contains(&op.id),
                    "a read of an unwritten id: {op:?}"
                );
            }
        }
    }
    ops
}

/// Runs `dump --prefix run` until it succeeds; the documents by id.
async fn dump(base: &[&str], run: &str) -> BTreeMap<String, Option<String>> {
    let mut args = base.to_vec();
    args.extend(["dump", "--prefix", run]);
    let (code, stdout, stderr) = demo_app(&args).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let mut docs = BTreeMap::new();
    let mut count = None;
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        match v["type"].as_str() {
            Some("final") => {
                assert!(count.is_none(), "a final after final_done: {line}");
                assert_eq!(keys(&v), BTreeSet::from(["type", "id", "value"]), "{line}");
                let id = text(&v, "id", line).unwrap_or_else(|| panic!("no id: {line}"));
                assert!(id.starts_with(run), "{line}");
                assert!(docs.insert(id, text(&v, "value", line)).is_none(), "{line}");
            }
            Some("final_done") => count = Some(number(&v, "count", line)),
            _ => panic!("an unknown line: {line}"),
        }
    }
    assert_eq!(count, Some(docs.len() as u64), "{stdout}");
    docs
}

/// The history against the final state: acknowledged writes are there with their values,
/// certainly failed ones are not, nothing else is, and acknowledged reads of writes
/// acknowledged before they started found them.
fn check(ops: &[Op], docs: &BTreeMap<String, Option<String>>) {
    let writes: BTreeMap<&str, &Op> = ops
        .iter()
        .filter(|o| o.write)
        .map(|o| (o.id.as_str(), o))
        .collect();
    for w in writes.values() {
        match w.outcome.as_str() {
            "ok" => assert_eq!(
                docs.get(&w.id),
                Some(&w.value),
                "an acknowledged write: {w:?}"
            ),
            "fail" => assert!(!docs.contains_key(&w.id), "a failed write is there: {w:?}"),
            _ => {}
        }
    }
    for (id, value) in docs {
        let w = writes
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} was never written"));
        assert_eq!(value, &w.value, "{id} holds another value than written");
    }
    for r in ops.iter().filter(|o| !o.write && o.outcome == "ok") {
        let w = writes[r.id.as_str()];
        if w.outcome == "ok" && w.end_ms <= r.start_ms {
            assert_eq!(
                r.value, w.value,
                "a read missed an acknowledged write: {r:?} {w:?}"
            );
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn summary(ops: &[Op]) -> BTreeMap<(bool, String), usize> {
    let mut counts = BTreeMap::new();
    for o in ops {
        *counts.entry((o.write, o.outcome.clone())).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_run_acknowledges_writes_that_the_dump_and_the_reads_find() {
    let cluster = set().await;
    let set = cluster.set_name().to_string();
    let (backend, key, store) = store("demo-app-workload", &set).await;
    let run = format!("quiet{:08x}", rand::random::<u32>());
    let base = [backend.as_str(), "--replset", set.as_str()];

    // The workload starts before the connection string exists: its clients wait for it.
    let mut args = base.to_vec();
    args.extend([
        "workload",
        "--clients",
        "2",
        "--for",
        "3s",
        "--pause-ms",
        "20",
        "--run-id",
        run.as_str(),
    ]);
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let workload = tokio::spawn(async move { demo_app(&args).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    publish(&store, &key, &cluster.hosts(), &set).await;
    let (code, stdout, stderr) = workload.await.expect("the workload's task");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("no connection string at"),
        "the wait for the URI is logged: {stderr}"
    );

    let ops = parse_workload(&stdout, &run, 2);
    let counts = summary(&ops);
    assert!(
        ops.iter().all(|o| o.outcome == "ok"),
        "nothing fails in a quiet run: {counts:?}\n{stdout}"
    );
    let reads = ops.iter().filter(|o| !o.write).count();
    assert!(reads > 0 && ops.len() - reads > 10, "{counts:?}");
    let docs = dump(&base, &run).await;
    check(&ops, &docs);
    assert_eq!(docs.len(), ops.len() - reads, "every write is in the dump");
    // The dump reads only its own run.
    assert!(dump(&base, &format!("{run}x")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_through_the_loss_of_the_primary_keeps_every_acknowledged_write() {
    let mut cluster = set().await;
    let set = cluster.set_name().to_string();
    let (backend, key, store) = store("demo-app-workload-kill", &set).await;
    publish(&store, &key, &cluster.hosts(), &set).await;
    let run = format!("kill{:08x}", rand::random::<u32>());
    let base = [backend.as_str(), "--replset", set.as_str()];

    let mut args = base.to_vec();
    args.extend([
        "workload",
        "--clients",
        "3",
        "--for",
        "6s",
        "--pause-ms",
        "10",
        "--run-id",
        run.as_str(),
    ]);
    let args: Vec<String> = args.into_iter().map(String::from).collect();
    let workload = tokio::spawn(async move { demo_app(&args).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = cluster.primary().expect("a primary");
    cluster.kill(old).expect("kill the primary");
    let killed_ms = unix_ms();
    // The set as the reconciler would publish it now, without the dead member: each client
    // reads it within 5 s (its periodic re-read; sooner after a failed operation).
    let rest: Vec<String> = (0..cluster.len())
        .filter(|&i| i != old)
        .filter_map(|i| cluster.host(i).ok().map(str::to_string))
        .collect();
    let new_uri = publish(&store, &key, &rest, &set).await;
    let (code, stdout, stderr) = workload.await.expect("the workload's task");
    assert_eq!(code, Some(0), "{stderr}");
    let ops = parse_workload(&stdout, &run, 3);
    let counts = summary(&ops);
    eprintln!("outcomes (write?, outcome): {counts:?}");
    // Writes went on with the new primary.
    assert!(
        ops.iter()
            .any(|o| o.write && o.outcome == "ok" && o.start_ms > killed_ms),
        "no acknowledged write after the failover: {counts:?}\n{stderr}"
    );
    for k in 1..=3 {
        assert!(
            stderr.lines().any(|l| l.contains("using connection string")
                && l.contains(&format!("client={k} "))
                && l.contains(&new_uri)),
            "client {k} did not switch to {new_uri}: {stderr}"
        );
    }

    cluster
        .wait_for_primary(Duration::from_secs(30))
        .await
        .expect("a new primary");
    let docs = dump(&base, &run).await;
    check(&ops, &docs);
}
