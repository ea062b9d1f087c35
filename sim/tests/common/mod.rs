//! What the simulator's integration tests share: the result types, tracing, free ports, the
//! `replset-sim` binary as a child process, driver clients and the server's error codes,
//! waiting for a condition, temporary directories, and the external clients (pymongo, Node.js
//! scripts). Each test binary includes this module and uses a part of it.
#![allow(dead_code)]

use bson::{doc, Bson, Document};
use mongodb::options::{AuthMechanism, ClientOptions, Credential};
use mongodb::Client;
use replset_sim::Cluster;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestResult = Result<(), BoxError>;

/// How long a set may take to elect a primary and settle.
pub const SETTLE: Duration = Duration::from_secs(20);

/// Logs of the simulator (`RUST_LOG`) in the test's output.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A set of `n` in-process members, initiated, with a primary; returns it and the primary.
pub async fn stable_set(n: usize) -> Result<(Cluster, usize), BoxError> {
    init_tracing();
    let c = Cluster::start(n).await?;
    c.initiate().await?;
    let p = c.wait_for_stable(SETTLE).await?;
    Ok((c, p))
}

/// The config member `i` answers `replSetGetConfig` with.
pub async fn config_of(c: &Cluster, i: usize) -> Result<Document, BoxError> {
    let r = c.command_ok(i, doc! {"replSetGetConfig": 1}).await?;
    Ok(r.get_document("config")?.clone())
}

/// Raises a config document's version by one, as the next reconfig must.
pub fn bump_version(cfg: &mut Document) -> TestResult {
    let v = cfg.get_i32("version")?;
    cfg.insert("version", v + 1);
    Ok(())
}

/// A free port: bind port 0, note it, release it.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A number that differs from one call to the next (nanoseconds since the epoch).
pub fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A fresh, empty directory under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!(
            "replset-sim-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `replset-sim --port PORT --replSet SET`, its output discarded, killed when dropped; the
/// caller adds what else it needs and spawns it.
pub fn member_command(port: u16, set: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_replset-sim"));
    cmd.args(["--port", &port.to_string(), "--replSet", set])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Kills a child like `kill -9` and waits for it.
pub async fn sigkill(child: &mut Child) -> TestResult {
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}

/// Runs `f` until it succeeds or 20 s pass.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> Result<T, BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BoxError>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(format!("{what}: {e}").into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs `cmd` on `c`'s admin database until it succeeds (as [`eventually`]); its reply.
pub async fn command_eventually(
    what: &str,
    c: &Client,
    cmd: Document,
) -> Result<Document, BoxError> {
    eventually(what, || {
        let (c, cmd) = (c.clone(), cmd.clone());
        async move { Ok(c.database("admin").run_command(cmd).await?) }
    })
    .await
}

/// `127.0.0.1:PORT` for each port.
pub fn loopback_hosts(ports: &[u16]) -> Vec<String> {
    ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
}

/// `replSetInitiate` of the members at `hosts` (`_id` 0, 1, ...) sent to the first, retried
/// while the processes may still be binding their ports.
pub async fn initiate_hosts(set: &str, hosts: &[String]) -> TestResult {
    let first = hosts.first().ok_or("no hosts")?;
    let first = client(&format!("mongodb://{first}/?directConnection=true")).await?;
    let members: Vec<Bson> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| Bson::Document(doc! {"_id": i as i32, "host": h}))
        .collect();
    eventually("initiate", || {
        let first = first.clone();
        let members = members.clone();
        async move {
            first
                .database("admin")
                .run_command(doc! {"replSetInitiate": {"_id": set, "members": members}})
                .await?;
            Ok(())
        }
    })
    .await
}

/// A driver client with a short server selection timeout and fast heartbeats.
pub async fn client(uri: &str) -> Result<Client, mongodb::error::Error> {
    client_as(uri, None).await
}

/// [`client`], authenticated as `(user, password, source, mechanism)` when given.
pub async fn client_as(
    uri: &str,
    user: Option<(&str, &str, &str, AuthMechanism)>,
) -> Result<Client, mongodb::error::Error> {
    let mut opts = ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(15));
    opts.heartbeat_freq = Some(Duration::from_millis(500));
    if let Some((name, pwd, source, mech)) = user {
        opts.credential = Some(
            Credential::builder()
                .username(name.to_string())
                .password(pwd.to_string())
                .source(source.to_string())
                .mechanism(mech)
                .build(),
        );
    }
    Client::with_options(opts)
}

/// A client of the member on `port` alone (`directConnection=true`).
pub async fn direct(port: u16) -> Result<Client, BoxError> {
    Ok(client(&format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true"
    ))
    .await?)
}

/// The server's code of a driver error: a command error, a write error, the first write
/// error of an insertMany, or the saslStart / saslContinue error that the driver keeps as the
/// source of its authentication error.
pub fn code_of(e: &mongodb::error::Error) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        let me = x.downcast_ref::<mongodb::error::Error>().or_else(|| {
            x.downcast_ref::<Box<mongodb::error::Error>>()
                .map(|b| b.as_ref())
        });
        if let Some(me) = me {
            use mongodb::error::{ErrorKind, WriteFailure};
            match me.kind.as_ref() {
                ErrorKind::Command(c) => return Some(c.code),
                ErrorKind::Write(WriteFailure::WriteError(w)) => return Some(w.code),
                ErrorKind::InsertMany(m) => {
                    return m
                        .write_errors
                        .as_ref()
                        .and_then(|w| w.first())
                        .map(|w| w.code)
                }
                _ => {}
            }
        }
        cur = x.source();
    }
    None
}

/// The code and message of a command error.
pub fn command_error(e: &mongodb::error::Error) -> Option<(i32, String)> {
    match *e.kind {
        mongodb::error::ErrorKind::Command(ref c) => Some((c.code, c.message.clone())),
        _ => None,
    }
}

/// Field `field` of every member of a config (`members`) or status document.
pub fn member_fields<'a>(d: &'a Document, field: &str) -> Result<Vec<&'a str>, BoxError> {
    Ok(d.get_array("members")?
        .iter()
        .filter_map(|m| m.as_document()?.get_str(field).ok())
        .collect())
}

/// The `code` of a command reply that failed.
pub fn reply_code(r: &Document) -> Option<i32> {
    r.get_i32("code").ok()
}

/// The Python with pymongo (`$REPLSET_SIM_PYTHON`, else `python3`); fails the test when it
/// cannot import pymongo.
pub async fn pymongo_python() -> Result<String, BoxError> {
    let py = std::env::var("REPLSET_SIM_PYTHON").unwrap_or_else(|_| "python3".to_string());
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
    Ok(py)
}

/// A file of this crate (`sim/...`).
pub fn crate_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A client script run as a child that the test talks to line by line: its stdin, and its
/// stdout as lines.
pub struct Script {
    pub child: Child,
    pub stdin: ChildStdin,
    pub lines: Lines<BufReader<ChildStdout>>,
}

impl Script {
    /// Spawns `cmd` with piped stdin and stdout, killed when dropped.
    pub fn spawn(cmd: &mut Command) -> Result<Script, BoxError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        Ok(Script {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }
}

/// The output of a finished command, stdout then stderr, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The stack's users file (`compose/mongo-users.json`), with each `passwordFile` moved into
/// `dir` and holding `<user>-pw`. Returns the path of the rewritten file.
pub fn stack_users_file(dir: &Path) -> Result<PathBuf, BoxError> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(crate_file("../compose/mongo-users.json"))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)?;
    let users = json
        .get_mut("users")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or("compose/mongo-users.json has no users array")?;
    for u in users {
        let user = u["user"]
            .as_str()
            .ok_or("a user without a name")?
            .to_string();
        let name = u["passwordFile"]
            .as_str()
            .and_then(|p| Path::new(p).file_name())
            .ok_or("a user without a passwordFile")?
            .to_owned();
        let path = dir.join(name);
        std::fs::write(&path, format!("{user}-pw\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
        u["passwordFile"] = serde_json::Value::String(path.display().to_string());
    }
    let out = dir.join("users.json");
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    Ok(out)
}
