//! The drivers' default server monitoring (the streaming hello protocol of the SDAM
//! monitoring spec: `exhaustAllowed`, `moreToCome`, `topologyVersion`, `maxAwaitTimeMS`)
//! against three `replset-sim` processes: the Node.js driver (npm `mongodb`), the Rust driver
//! and pymongo, each with its defaults, for 30 s without a heartbeat failure, and the
//! Node.js driver on through a SIGKILL of the primary.
//!
//! The Node.js driver is `target/node` (installed by `scripts/node-clients`, which this test
//! runs when it is missing), or `$REPLSET_SIM_NODE_DIR`; pymongo is `$REPLSET_SIM_PYTHON` as in
//! tests/pymongo.rs.

use bson::doc;
use mongodb::event::sdam::SdamEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;
use mongodb::Client;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const QUIET_SECS: u64 = 30;

struct Member {
    port: u16,
    child: Child,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_set(set: &str) -> Result<Vec<Member>, Box<dyn std::error::Error + Send + Sync>> {
    let mut members = Vec::new();
    for _ in 0..3 {
        let port = free_port()?;
        let child = Command::new(env!("CARGO_BIN_EXE_replset-sim"))
            .args(["--port", &port.to_string(), "--replSet", set])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        members.push(Member { port, child });
    }
    let hosts: Vec<String> = members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.port))
        .collect();
    let mut opts =
        ClientOptions::parse(format!("mongodb://{}/?directConnection=true", hosts[0])).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    let direct = Client::with_options(opts)?;
    let cfg_members: Vec<bson::Bson> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| bson::Bson::Document(doc! {"_id": i as i32, "host": h}))
        .collect();
    // The members may still be binding their ports: retry the initiate until they answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = direct
            .database("admin")
            .run_command(doc! {"replSetInitiate": {"_id": set, "members": cfg_members.clone()}})
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "initiate not yet possible");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(members)
}

fn uri(members: &[Member], set: &str) -> String {
    let hosts: Vec<String> = members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.port))
        .collect();
    format!("mongodb://{}/?replicaSet={set}", hosts.join(","))
}

/// The directory holding `node_modules/mongodb`: `$REPLSET_SIM_NODE_DIR`, else `target/node`,
/// installed there by `scripts/node-clients` (with mongosh) when missing.
async fn node_driver_dir() -> Result<PathBuf, Box<dyn std::error::Error + Send + Sync>> {
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
async fn rust_client(
    uri: &str,
) -> Result<(Client, Arc<AtomicUsize>, Arc<AtomicUsize>), Box<dyn std::error::Error + Send + Sync>>
{
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
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let node_dir = node_driver_dir().await?;
    let set = "rsmon";
    let mut members = start_set(set).await?;
    let uri = uri(&members, set);

    // The Rust driver with its defaults, beside the Node.js driver, over the quiet period.
    let (rust, rust_failed, rust_awaited) = rust_client(&uri).await?;
    rust.database("app")
        .collection::<bson::Document>("rust")
        .insert_one(doc! {"x": 1})
        .await?;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node/monitor.js");
    let mut child = Command::new("node")
        .arg(&script)
        .arg(&uri)
        .arg(QUIET_SECS.to_string())
        .arg("15")
        .env("NODE_DRIVER_DIR", &node_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(stdout).lines();
    let primary = next_line(&mut lines, "PRIMARY").await?;
    let primary = primary
        .strip_prefix("PRIMARY ")
        .ok_or("bad PRIMARY line")?
        .to_string();
    let quiet = next_line(&mut lines, "QUIET").await?;
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
    let idx = members
        .iter()
        .position(|m| format!("127.0.0.1:{}", m.port) == primary)
        .ok_or_else(|| format!("primary {primary} is none of the members"))?;
    members[idx].child.start_kill()?;
    members[idx].child.wait().await?;
    stdin.write_all(b"go\n").await?;
    let done = next_line(&mut lines, "DONE").await?;
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
    child.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_streams_with_its_defaults() -> TestResult {
    let py = std::env::var("REPLSET_SIM_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let probe = Command::new(&py)
        .args(["-c", "import pymongo"])
        .output()
        .await?;
    assert!(
        probe.status.success(),
        "{py} cannot import pymongo: see tests/pymongo.rs for how to get it"
    );
    let set = "rspymon";
    let members = start_set(set).await?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/monitor_pymongo.py");
    let out = tokio::time::timeout(
        Duration::from_secs(QUIET_SECS + 60),
        Command::new(&py)
            .arg(&script)
            .arg(uri(&members, set))
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
