//! pymongo (from PyPI) against the simulator: discovery with `replicaset=`, `client.nodes`,
//! a majority write, and finding the new primary after the old one is killed.
//!
//! The interpreter is `$REPLSET_SIM_PYTHON` (scripts/test sets it to a venv with pymongo),
//! else `python3`. Without pymongo the test fails and says how to install it.

use replset_sim::Cluster;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn python() -> String {
    std::env::var("REPLSET_SIM_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_discovers_the_set_and_follows_a_failover() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import pymongo"])
        .output()
        .await?;
    assert!(
        probe.status.success(),
        "{py} cannot import pymongo: run scripts/test (it makes a venv with pymongo), or \
         `python3 -m venv target/replset-sim-pyenv && target/replset-sim-pyenv/bin/pip install pymongo` \
         and set REPLSET_SIM_PYTHON=target/replset-sim-pyenv/bin/python"
    );

    let mut c = Cluster::start(3).await?;
    c.initiate().await?;
    c.wait_for_stable(Duration::from_secs(20)).await?;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/test_pymongo.py");
    let mut child = Command::new(&py)
        .arg(&script)
        .arg(c.hosts().join(","))
        .arg(c.set_name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(stdout).lines();

    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await??
        .ok_or("pymongo script ended early")?;
    let old_host = first
        .strip_prefix("PRIMARY ")
        .ok_or_else(|| format!("unexpected output: {first}"))?
        .to_string();
    let old = c
        .hosts()
        .iter()
        .position(|h| *h == old_host)
        .ok_or("pymongo's primary is not a member")?;
    assert_eq!(c.primary(), Some(old));
    c.kill(old)?;
    stdin.write_all(b"KILLED\n").await?;
    stdin.flush().await?;

    let second = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await??
        .ok_or("pymongo script ended early")?;
    let new_host = second
        .strip_prefix("NEWPRIMARY ")
        .ok_or_else(|| format!("unexpected output: {second}"))?;
    assert_ne!(new_host, old_host);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(status.success(), "pymongo script failed: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_authenticates_with_scram_and_is_refused_what_it_may_not_do() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import pymongo"])
        .output()
        .await?;
    assert!(
        probe.status.success(),
        "{py} cannot import pymongo: run scripts/test (it makes a venv with pymongo)"
    );
    let template = replset_sim::NodeOptions {
        security: replset_sim::auth::Security {
            authorization: true,
            key_file: Some(replset_sim::auth::KeyFile::from_contents("pymongokey")?),
        },
        ..replset_sim::NodeOptions::default()
    };
    let c = Cluster::start_with(3, template).await?;
    c.initiate().await?;
    let p = c.wait_for_stable(Duration::from_secs(20)).await?;
    c.command_ok(
        p,
        bson::doc! {"createUser": "admin", "pwd": "adminpw", "roles": ["root"], "$db": "admin"},
    )
    .await?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/test_pymongo_auth.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(&py)
            .arg(&script)
            .arg(c.hosts().join(","))
            .arg(c.set_name())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "pymongo script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
