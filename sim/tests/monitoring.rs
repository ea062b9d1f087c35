//! The drivers' default server monitoring (the streaming hello protocol of the SDAM
//! monitoring spec: `exhaustAllowed`, `moreToCome`, `topologyVersion`, `maxAwaitTimeMS`)
//! against three `replset-sim` processes: the Node.js driver (npm `mongodb`), the Rust driver
//! and pymongo, each with its defaults, for 30 s without a heartbeat failure, and the
//! Node.js driver on through a SIGKILL of the primary.
//!
//! The Node.js driver is `target/node` (installed by `scripts/node-clients`, which this test
//! runs when it is missing), or `$REPLSET_SIM_NODE_DIR`; pymongo is `$REPLSET_SIM_PYTHON` as in
//! tests/pymongo.rs.

mod common;

use bson::doc;
use common::{
    crate_file, init_tracing, initiate_hosts, loopback_hosts, member_command, pymongo_python,
    sigkill, BoxError, Script, TestResult,
};
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;
use mongodb::Client;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const QUIET_SECS: u64 = 30;

/// Three `replset-sim` processes initiated as one set; their hosts and the children.
async fn start_set(set: &str) -> Result<(Vec<String>, Vec<Child>), BoxError> {
    let mut ports = Vec::new();
    let mut children = Vec::new();
    for _ in 0..3 {
        let port = common::free_port()?;
        children.push(member_command(port, set).spawn()?);
        ports.push(port);
    }
    let hosts = loopback_hosts(&ports);
    // The members may still be binding their ports: the initiate is retried until they answer.
    initiate_hosts(set, &hosts).await?;
    Ok((hosts, children))
}

fn uri(hosts: &[String], set: &str) -> String {
    format!("mongodb://{}/?replicaSet={set}", hosts.join(","))
}

/// The directory holding `node_modules/mongodb`: `$REPLSET_SIM_NODE_DIR`, else `target/node`,
/// installed there by `scripts/node-clients` (with mongosh) when missing.
async fn node_driver_dir() -> Result<PathBuf, BoxError> {
    if let Ok(d) = std::env::var("REPLSET_SIM_NODE_DIR") {
        return Ok(PathBuf::from(d));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("target/node");
    if !dir.join("node_modules/mongodb/package.json").exists() {
        let out = Command::new(root.join("scripts/node-clients"))
            .output()
            .await?;
        assert!(
            out.status.success(),
            "scripts/node-clients failed (node and npm must be installed): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(dir)
}

/// A Rust driver client with its defaults, counting heartbeat failures and streamed
/// (awaited) heartbeats.
async fn rust_client(uri: &str) -> Result<(Client, Arc<AtomicUsize>, Arc<AtomicUsize>), BoxError> {
    let failed = Arc::new(AtomicUsize::new(0));
    let awaited = Arc::new(AtomicUsize::new(0));
    let mut opts = ClientOptions::parse(uri).await?;
    let (f, a) = (failed.clone(), awaited.clone());
    opts.sdam_event_handler = Some(EventHandler::callback(move |ev: SdamEvent| match ev {
        SdamEvent::ServerHeartbeatFailed(e) => {
            tracing::warn!(server = %e.server_address, error = %e.failure, "rust driver heartbeat failed");
            f.fetch_add(1, Ordering::SeqCst);
        }
        SdamEvent::ServerHeartbeatSucceeded(e) if e.awaited => {
            a.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }));
    Ok((Client::with_options(opts)?, failed, awaited))
}

/// The next line of the Node.js script that starts with `what` (others are echoed).
async fn next_line(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
) -> Result<String, BoxError> {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(QUIET_SECS + 60), lines.next_line())
            .await
            .map_err(|_| format!("no {what} line in time"))??
            .ok_or_else(|| format!("node ended before {what}"))?;
        eprintln!("node: {line}");
        if line.starts_with(what) {
            return Ok(line);
        }
        if line.starts_with("FAIL") {
            return Err(line.into());
        }
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_rust_drivers_stream_without_errors_and_follow_a_sigkill() -> TestResult {
    init_tracing();
    let node_dir = node_driver_dir().await?;
    let set = "rsmon";
    let (hosts, mut children) = start_set(set).await?;
    let uri = uri(&hosts, set);

    // The Rust driver with its defaults, beside the Node.js driver, over the quiet period.
    let (rust, rust_failed, rust_awaited) = rust_client(&uri).await?;
    rust.database("app")
        .collection::<bson::Document>("rust")
        .insert_one(doc! {"x": 1})
        .await?;

    let mut node = Script::spawn(
        Command::new("node")
            .arg(crate_file("node/monitor.js"))
            .arg(&uri)
            .arg(QUIET_SECS.to_string())
            .arg("15")
            .env("NODE_DRIVER_DIR", &node_dir),
    )?;
    let lines = &mut node.lines;
    let primary = next_line(lines, "PRIMARY").await?;
    let primary = primary
        .strip_prefix("PRIMARY ")
        .ok_or("bad PRIMARY line")?
        .to_string();
    let quiet = next_line(lines, "QUIET").await?;
    assert_eq!(field(&quiet, "failures"), Some("0"), "{quiet}");
    assert_eq!(field(&quiet, "pool_cleared"), Some("0"), "{quiet}");
    let awaited: usize = field(&quiet, "awaited").ok_or("no awaited")?.parse()?;
    assert!(awaited > 0, "the Node.js driver never streamed: {quiet}");
    assert_eq!(
        rust_failed.load(Ordering::SeqCst),
        0,
        "Rust driver heartbeat failures"
    );
    assert!(
        rust_awaited.load(Ordering::SeqCst) > 0,
        "the Rust driver never streamed"
    );

    // SIGKILL of the primary's process; the Node.js driver finds the new primary.
    let idx = hosts
        .iter()
        .position(|h| *h == primary)
        .ok_or_else(|| format!("primary {primary} is none of the members"))?;
    sigkill(&mut children[idx]).await?;
    node.stdin.write_all(b"go\n").await?;
    let done = next_line(lines, "DONE").await?;
    let after: usize = field(&done, "writes_after_kill")
        .ok_or("no writes_after_kill")?
        .parse()?;
    assert!(after > 0, "no write succeeded after the kill: {done}");
    assert_eq!(field(&done, "writes"), field(&done, "count"), "{done}");
    // Heartbeats fail only for the killed member.
    let failed_hosts = field(&done, "failed_hosts").unwrap_or("");
    for h in failed_hosts.split(',').filter(|h| !h.is_empty()) {
        assert_eq!(h, primary, "a live member's heartbeat failed: {done}");
    }
    node.child.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_streams_with_its_defaults() -> TestResult {
    let py = pymongo_python().await?;
    let set = "rspymon";
    let (hosts, _children) = start_set(set).await?;
    let out = tokio::time::timeout(
        Duration::from_secs(QUIET_SECS + 60),
        Command::new(&py)
            .arg(crate_file("python/monitor_pymongo.py"))
            .arg(uri(&hosts, set))
            .arg(QUIET_SECS.to_string())
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let done = stdout
        .lines()
        .find(|l| l.starts_with("DONE"))
        .ok_or("pymongo printed no DONE line")?;
    assert_eq!(field(done, "failures"), Some("0"), "{done}");
    let awaited: usize = field(done, "awaited").ok_or("no awaited")?.parse()?;
    assert!(awaited > 0, "pymongo never streamed: {done}");
    Ok(())
}
