//! `replset-sim --sim-probe`, the simulator image's healthcheck, against real simulator
//! processes: it fails while there is nothing to ask, while the member has no config and while
//! a new member is in its (slowed) initial sync, and passes once it is PRIMARY or SECONDARY.

use bson::{doc, Bson};
use mongodb::options::ClientOptions;
use mongodb::Client;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), BoxError>;

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(port: u16, extra: &[&str]) -> std::io::Result<Child> {
    Command::new(env!("CARGO_BIN_EXE_replset-sim"))
        .args(["--port", &port.to_string(), "--replSet", "rsprobe"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
}

/// Runs the probe; its exit code and its stderr.
async fn probe(port: u16) -> Result<(bool, String), BoxError> {
    let out = Command::new(env!("CARGO_BIN_EXE_replset-sim"))
        .args(["--sim-probe", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        stderr.lines().count(),
        1,
        "the probe prints one line: {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    Ok((out.status.success(), stderr))
}

/// Polls the probe until its line contains `says` (returns whether it passed, and the line),
/// or fails after `within`.
async fn probe_until(port: u16, says: &str, within: Duration) -> Result<(bool, String), BoxError> {
    let deadline = Instant::now() + within;
    loop {
        let (ok, line) = probe(port).await?;
        if line.contains(says) {
            return Ok((ok, line));
        }
        if Instant::now() > deadline {
            return Err(format!("probe of {port} still says {line:?} after {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Relaxed extended JSON back into BSON (the driver's own parser of it).
/// The documents `--sim-probe-config` printed, one per line of stdout.
fn documents(stdout: &str) -> Vec<bson::Document> {
    stdout
        .lines()
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
            match Bson::try_from(value).ok()? {
                Bson::Document(d) => Some(d),
                _ => None,
            }
        })
        .collect()
}

/// The config among them (the document with `members`).
fn config_from_json(stdout: &str) -> Option<bson::Document> {
    documents(stdout)
        .into_iter()
        .find(|d| d.contains_key("members"))
}

/// The `hello` answer among them (the document with `isWritablePrimary`).
fn hello_from_json(stdout: &str) -> Option<bson::Document> {
    documents(stdout)
        .into_iter()
        .find(|d| d.contains_key("isWritablePrimary"))
}

async fn direct(port: u16) -> Result<Client, BoxError> {
    let mut opts =
        ClientOptions::parse(format!("mongodb://127.0.0.1:{port}/?directConnection=true")).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    Ok(Client::with_options(opts)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_only_for_primary_and_secondary() -> TestResult {
    let (p1, p2) = (free_port()?, free_port()?);

    // nothing listens yet
    let (ok, line) = probe(p1).await?;
    assert!(!ok, "{line}");
    assert!(line.contains("cannot connect"), "{line}");

    let _m1 = spawn(p1, &[])?;
    // A new member copies its data for at least 3 s: the probe must fail meanwhile.
    let _m2 = spawn(p2, &["--sim-initial-sync-floor-ms", "3000"])?;
    // Until it listens the probe cannot connect; then the member answers that it has no
    // config. Never healthy meanwhile.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let (ok, l) = probe(p1).await?;
        assert!(!ok, "healthy before initiate: {l}");
        if l.contains("no replica set config") {
            break l;
        }
        if Instant::now() > deadline {
            return Err(format!("no answer from the member: {l}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("before initiate: {line}");

    let first = direct(p1).await?;
    first
        .database("admin")
        .run_command(doc! {"replSetInitiate": {"_id": "rsprobe", "members": [
            {"_id": 0, "host": format!("127.0.0.1:{p1}")},
        ]}})
        .await?;
    let (ok, line) = probe_until(p1, ": PRIMARY", Duration::from_secs(20)).await?;
    assert!(ok, "{line}");
    assert_eq!(line, format!("port {p1}: PRIMARY: healthy"));

    // Add the slow member as votes 0, as the reconciler does: in initial sync, not healthy.
    let config = first
        .database("admin")
        .run_command(doc! {"replSetGetConfig": 1})
        .await?;
    let mut config = config.get_document("config")?.clone();
    let version = config.get_i32("version")?;
    let mut members = config.get_array("members")?.clone();
    members.push(Bson::Document(
        doc! {"_id": 1, "host": format!("127.0.0.1:{p2}"), "votes": 0, "priority": 0},
    ));
    config.insert("members", members);
    config.insert("version", version + 1);
    first
        .database("admin")
        .run_command(doc! {"replSetReconfig": config})
        .await?;
    let added = Instant::now();
    let (ok, syncing) =
        probe_until(p2, "neither PRIMARY nor SECONDARY", Duration::from_secs(2)).await?;
    assert!(!ok, "healthy in initial sync: {syncing}");
    // Polled until SECONDARY: never healthy before.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, line) = probe(p2).await?;
        if line.contains(": SECONDARY") {
            assert!(ok, "{line}");
            break;
        }
        assert!(!ok, "healthy but not SECONDARY: {line}");
        if Instant::now() > deadline {
            return Err(format!("still {line:?} after 30 s").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        added.elapsed() >= Duration::from_secs(3),
        "healthy after {:?}, before the 3 s initial sync ended",
        added.elapsed()
    );

    // --sim-probe-config: the member's config, then its `hello` answer, each as one line of
    // JSON on stdout.
    let out = Command::new(env!("CARGO_BIN_EXE_replset-sim"))
        .args([
            "--sim-probe",
            "--sim-probe-config",
            "--port",
            &p2.to_string(),
        ])
        .output()
        .await?;
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout)?;
    let shown = config_from_json(&line).ok_or(format!("not a JSON document: {line:?}"))?;
    assert_eq!(shown.get_str("_id")?, "rsprobe", "{line}");
    assert_eq!(shown.get_array("members")?.len(), 2, "{line}");
    assert!(shown.get_i32("version")? > version, "{line}");
    let hello = hello_from_json(&line).ok_or(format!("no hello answer in {line:?}"))?;
    assert!(!hello.get_bool("isWritablePrimary")?, "{line}");
    assert!(hello.get_bool("secondary")?, "{line}");
    Ok(())
}

/// With authentication on (`--keyFile`), `replSetGetConfig` needs a login: `--sim-probe-config`
/// given the key file reads the config as a member would; without it, it shows none (while the
/// health check itself, `hello`, needs no login).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_config_logs_in_with_the_key_file() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir =
        std::env::temp_dir().join(format!("probe-key-{}-{}", std::process::id(), free_port()?));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key");
    std::fs::write(&key, "cHJvYmVrZXlmaWxl")?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400))?;
    let key = key.to_str().ok_or("utf-8 path")?.to_string();
    let port = free_port()?;
    let _member = spawn(port, &["--keyFile", &key])?;
    // The localhost exception (no user yet) lets the test initiate.
    let client = direct(port).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .database("admin")
        .run_command(doc! {"replSetInitiate": {}})
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "could not initiate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    probe_until(port, "PRIMARY", Duration::from_secs(20)).await?;
    let run = |with_key: bool| {
        let key = key.clone();
        async move {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_replset-sim"));
            cmd.args([
                "--sim-probe",
                "--sim-probe-config",
                "--port",
                &port.to_string(),
            ]);
            if with_key {
                cmd.args(["--keyFile", &key]);
            }
            cmd.output().await
        }
    };
    let out = run(true).await?;
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout)?;
    let shown = config_from_json(&line).ok_or(format!("not a JSON document: {line:?}"))?;
    assert_eq!(shown.get_str("_id")?, "rsprobe", "{line}");
    // A primary's answer names its term in electionId (OID::fromTerm: 0x7fffffff, the term).
    let hello = hello_from_json(&line).ok_or(format!("no hello answer in {line:?}"))?;
    assert!(hello.get_bool("isWritablePrimary")?, "{line}");
    let election = hello.get_object_id("electionId")?.bytes();
    assert_eq!(election[..4], [0x7f, 0xff, 0xff, 0xff], "{line}");
    assert!(i64::from_be_bytes(election[4..].try_into()?) >= 1, "{line}");
    let out = run(false).await?;
    assert!(out.status.success(), "hello needs no login");
    let stdout = String::from_utf8(out.stdout)?;
    assert!(config_from_json(&stdout).is_none());
    assert!(hello_from_json(&stdout).is_some(), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
