//! Helpers shared by the integration tests of the workspace's crates: polling with a
//! deadline, temporary directories, free ports, a private etcd that a test may stop and start,
//! a tiny HTTP GET, and a multi-node Docker Swarm of Docker-in-Docker nodes ([`dind`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use etcd_client::Client;
use tokio::time::Instant;

pub mod contract;
pub mod dind;
pub mod mongo_tls;
pub mod pki;
pub mod stack;

/// Polls `check` every 100 ms until it returns `Ok`, or panics after `timeout` with `what`
/// and the last error it returned. Time is tokio's, so a test with paused time polls on the
/// paused clock.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() > deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A temporary directory, removed when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "swarm-registrator-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
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

/// A private etcd on free ports, for tests that stop and start it.
#[derive(Debug)]
pub struct PrivateEtcd {
    pub client_port: u16,
    peer_port: u16,
    dir: TempDir,
    child: Option<tokio::process::Child>,
}

impl PrivateEtcd {
    pub async fn start() -> PrivateEtcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let (dir, child) = (TempDir::new("etcd"), None);
        let mut etcd = PrivateEtcd {
            client_port,
            peer_port,
            dir,
            child,
        };
        etcd.resume().await;
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Starts (again) on the same ports and data.
    pub async fn resume(&mut self) {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = tokio::process::Command::new(bin);
        command.args([
            "--name",
            "private",
            "--data-dir",
            &self.dir.path().join("data").to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("private={peer}"),
        ]);
        let log = self.dir.path().join("etcd.log");
        self.child = Some(spawn_logged(&mut command, &log, "etcd"));
        let endpoint = self.endpoint();
        wait_for(
            "the private etcd to answer",
            Duration::from_secs(30),
            || {
                let endpoint = endpoint.clone();
                async move {
                    let mut c = Client::connect([format!("http://{endpoint}")], None)
                        .await
                        .map_err(|e| e.to_string())?;
                    c.get("health-probe", None)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(())
                }
            },
        )
        .await;
    }

    /// Kills it (SIGKILL): an outage.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// A free TCP port on loopback.
/// Runs `command` to its end with no stdin and asserts that it succeeded, naming `what` and
/// its stderr when it did not; returns its output.
pub async fn run_ok(command: &mut tokio::process::Command, what: &str) -> std::process::Output {
    let out = command
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `command` for a test: no stdin, its output appended to `log`, killed when dropped.
/// Panics naming `what` when it does not start.
pub fn spawn_logged(
    command: &mut tokio::process::Command,
    log: &Path,
    what: &str,
) -> tokio::process::Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("the log of {what} at {}: {e}", log.display()));
    let copy = file.try_clone().expect("a second handle on the log");
    command
        .stdin(Stdio::null())
        .stdout(copy)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"))
}

/// The consul binary: `CONSUL_BIN` (from `scripts/services env`), or `consul` on the path.
pub fn consul_bin() -> String {
    std::env::var("CONSUL_BIN").unwrap_or_else(|_| "consul".into())
}

/// `consul agent -dev` on 127.0.0.1 as node `node` (`CONSUL_BIN` from `scripts/services env`,
/// or `consul`); the caller adds ports and configuration.
pub fn consul_dev_agent(node: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(consul_bin());
    command.args([
        "agent",
        "-dev",
        "-bind",
        "127.0.0.1",
        "-client",
        "127.0.0.1",
        "-node",
        node,
    ]);
    command
}

/// Destroys every session of the Consul agent at `base` (`http://host:port`), as a lost bridge
/// or an operator would.
pub async fn destroy_consul_sessions(http: &reqwest::Client, base: &str) {
    let sessions: Vec<serde_json::Value> = http
        .get(format!("{base}/v1/session/list"))
        .send()
        .await
        .expect("list sessions")
        .json()
        .await
        .expect("sessions");
    for s in sessions {
        let id = s["ID"].as_str().expect("a session id");
        http.put(format!("{base}/v1/session/destroy/{id}"))
            .send()
            .await
            .expect("destroy");
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Fetches `http://addr/path` and returns status and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_get_with(addr, path, "").await
}

/// [`http_get`] with extra header lines (`"Name: value\r\n"` each).
pub async fn http_get_with(addr: &str, path: &str, headers: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = String::new();
    stream
        .read_to_string(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let status = buf
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad response: {buf}"))?;
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    Ok((status, body))
}

/// A private Consul dev agent on free ports, for tests that stop and restart it. A dev agent
/// keeps everything in memory: a restart starts it empty, like a lost agent.
#[derive(Debug)]
pub struct PrivateConsul {
    pub http_port: u16,
    /// With ACLs enabled (default deny), the management token.
    acl_master: Option<String>,
    ports: [u16; 3],
    dir: TempDir,
    child: Option<tokio::process::Child>,
}

impl PrivateConsul {
    pub async fn start() -> PrivateConsul {
        PrivateConsul::start_inner(None).await
    }

    /// A private agent with ACLs enabled, default policy deny, and this management token.
    pub async fn start_with_acl(master_token: &str) -> PrivateConsul {
        PrivateConsul::start_inner(Some(master_token.to_string())).await
    }

    async fn start_inner(acl_master: Option<String>) -> PrivateConsul {
        let mut consul = PrivateConsul {
            http_port: free_port(),
            acl_master,
            ports: [free_port(), free_port(), free_port()],
            dir: TempDir::new("consul"),
            child: None,
        };
        consul.resume().await;
        consul
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.http_port)
    }

    /// Starts (again) on the same ports.
    pub async fn resume(&mut self) {
        let mut extra = Vec::new();
        if let Some(master) = &self.acl_master {
            extra.push("-hcl".to_string());
            extra.push(format!(
                "acl {{ enabled = true default_policy = \"deny\" tokens {{ master = \"{master}\" agent = \"{master}\" }} }}"
            ));
        }
        let mut command = consul_dev_agent(&format!("private-{}", self.http_port));
        command
            .args([
                "-http-port",
                &self.http_port.to_string(),
                "-dns-port",
                "-1",
                "-grpc-port",
                "-1",
                "-serf-lan-port",
                &self.ports[0].to_string(),
                "-serf-wan-port",
                &self.ports[1].to_string(),
                "-server-port",
                &self.ports[2].to_string(),
            ])
            .args(&extra);
        let log = self.dir.path().join("consul.log");
        let what = "consul (CONSUL_BIN from scripts/services env)";
        self.child = Some(spawn_logged(&mut command, &log, what));
        let endpoint = self.endpoint();
        // Ready once it has a leader and has registered its own node and the node's serfHealth
        // check, which sessions are tied to by default (before that, creating a session fails
        // with 500 "Missing node registration" or "Missing check 'serfHealth' registration").
        let node_path = format!("/v1/health/node/private-{}", self.http_port);
        let headers = match &self.acl_master {
            Some(t) => format!("X-Consul-Token: {t}\r\n"),
            None => String::new(),
        };
        wait_for(
            "the private Consul to have a leader and its node and serfHealth registered",
            Duration::from_secs(30),
            || {
                let endpoint = endpoint.clone();
                let node_path = node_path.clone();
                let headers = headers.clone();
                async move {
                    let (status, body) = http_get(&endpoint, "/v1/status/leader").await?;
                    if status != 200 || body.trim().len() <= 2 {
                        return Err(format!("leader: {status} {body}"));
                    }
                    let (status, body) = http_get_with(&endpoint, &node_path, &headers).await?;
                    if status == 200 && body.contains("\"serfHealth\"") {
                        Ok(())
                    } else {
                        Err(format!("node: {status} {body}"))
                    }
                }
            },
        )
        .await;
    }

    /// Kills it (SIGKILL): an outage that also loses all its state.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// One multi-threaded `#[tokio::test]` per scenario: `$name()` runs `$module::$name($backend)`,
/// so that a scenario suite written once runs once per backend (`$module` is the suite's module
/// where the macro is called).
#[macro_export]
macro_rules! each_scenario {
    ($module:ident, $backend:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $module::$name($backend).await
            }
        )*
    };
}
