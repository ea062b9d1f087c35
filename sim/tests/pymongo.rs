//! pymongo (from PyPI) against the simulator: discovery with `replicaset=`, `client.nodes`,
//! a majority write, and finding the new primary after the old one is killed.
//!
//! The interpreter is `$REPLSET_SIM_PYTHON` (scripts/test sets it to a venv with pymongo),
//! else `python3`. Without pymongo the test fails and says how to install it.

mod common;

use common::{crate_file, init_tracing, pymongo_python, stable_set, Script, TestResult, SETTLE};
use replset_sim::Cluster;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_discovers_the_set_and_follows_a_failover() -> TestResult {
    let py = pymongo_python().await?;
    let (mut c, _) = stable_set(3).await?;

    let mut py_script = Script::spawn(
        Command::new(&py)
            .arg(crate_file("python/test_pymongo.py"))
            .arg(c.hosts().join(","))
            .arg(c.set_name()),
    )?;
    let lines = &mut py_script.lines;

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
    py_script.stdin.write_all(b"KILLED\n").await?;
    py_script.stdin.flush().await?;

    let second = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await??
        .ok_or("pymongo script ended early")?;
    let new_host = second
        .strip_prefix("NEWPRIMARY ")
        .ok_or_else(|| format!("unexpected output: {second}"))?;
    assert_ne!(new_host, old_host);
    let status = tokio::time::timeout(Duration::from_secs(30), py_script.child.wait()).await??;
    assert!(status.success(), "pymongo script failed: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_authenticates_with_scram_and_is_refused_what_it_may_not_do() -> TestResult {
    init_tracing();
    let py = pymongo_python().await?;
    let template = replset_sim::NodeOptions {
        security: replset_sim::auth::Security {
            authorization: true,
            key_file: Some(replset_sim::auth::KeyFile::from_contents("pymongokey")?),
        },
        ..replset_sim::NodeOptions::default()
    };
    let c = Cluster::start_with(3, template).await?;
    c.initiate().await?;
    let p = c.wait_for_stable(SETTLE).await?;
    c.command_ok(
        p,
        bson::doc! {"createUser": "admin", "pwd": "adminpw", "roles": ["root"], "$db": "admin"},
    )
    .await?;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new(&py)
            .arg(crate_file("python/test_pymongo_auth.py"))
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
