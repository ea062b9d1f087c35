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

/// A port on 127.0.0.1 that nothing listens on now, for a process a test starts.
///
/// It is picked at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), never from it: a port the kernel hands out
/// for `bind(0)` is also one it may give the next outgoing connection as its local port, and
/// with hundreds of connections a second under a parallel test run, one did take an etcd
/// member's port before the member bound it. No port is handed out twice by one process.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (low, _) = ephemeral_range();
    let floor = 10_000u16;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    if low > floor + 1_000 {
        for _ in 0..1_000 {
            let port = rand::random_range(floor..low);
            if given.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    // No room below the range (a tuned kernel): the kernel's pick, as a last resort.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    given.insert(port);
    port
}

/// The kernel's ephemeral port range, `(first, last)`; Linux's default when it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
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

/// A private etcd cluster of several members on loopback, for tests that lose one: kill it,
/// hang it (SIGSTOP: its connections stay open and answer nothing), wake it, restart it.
#[derive(Debug)]
pub struct PrivateEtcdCluster {
    members: Vec<ClusterMember>,
    dir: TempDir,
    initial_cluster: String,
}

#[derive(Debug)]
struct ClusterMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<tokio::process::Child>,
}

impl PrivateEtcdCluster {
    /// Starts `n` members (3 or 5 make sense) and waits until the cluster answers a
    /// linearizable read through every member.
    pub async fn start(n: usize) -> PrivateEtcdCluster {
        // A member that cannot bind its ports (another process took one between the pick and
        // the bind) exits at once; the cluster is then started anew on other ports.
        let mut last = String::new();
        for _ in 0..3 {
            let mut cluster = PrivateEtcdCluster::spawn_all(n);
            let mut started = true;
            for i in 0..n {
                if let Err(e) = cluster.answers(i).await {
                    last = e;
                    started = false;
                    break;
                }
            }
            if started {
                return cluster;
            }
            cluster.kill_all().await;
        }
        panic!("an etcd cluster of {n} did not start three times; last: {last}");
    }

    fn spawn_all(n: usize) -> PrivateEtcdCluster {
        let members: Vec<ClusterMember> = (0..n)
            .map(|i| ClusterMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = PrivateEtcdCluster {
            members,
            dir: TempDir::new("etcd-cluster"),
            initial_cluster,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster
    }

    /// The client endpoints (`127.0.0.1:port`) of every member, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// The process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().and_then(|c| c.id())
    }

    fn spawn(&mut self, i: usize) {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let token = self
            .dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let data = self.dir.path().join(&m.name);
        let mut command = tokio::process::Command::new(bin);
        // On a restart with its data dir, etcd ignores the --initial-* flags.
        command.args([
            "--name",
            &m.name,
            "--data-dir",
            &data.to_string_lossy(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &token,
        ]);
        let log = self.dir.path().join(format!("{}.log", m.name));
        let child = spawn_logged(&mut command, &log, "an etcd member");
        self.members[i].child = Some(child);
    }

    /// Waits until member `i` answers a linearizable read (so it has a leader); panics after
    /// 60 s, or as soon as the member has exited, with its log.
    async fn wait_answers(&mut self, i: usize) {
        if let Err(e) = self.answers(i).await {
            panic!("{e}");
        }
    }

    /// [`PrivateEtcdCluster::wait_answers`], with the failure returned.
    async fn answers(&mut self, i: usize) -> Result<(), String> {
        let endpoint = self.endpoint(i);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = match probe(&endpoint).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let exited = match self.members[i].child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                Some(Ok(None)) | None => None,
            };
            if let Some(status) = exited {
                return Err(format!(
                    "etcd member {i} exited ({status}) before it answered; its log:\n{}",
                    self.log_tail(i)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out after 60s waiting for etcd member {i} to answer with a leader; \
                     last seen: {last}; its log:\n{}",
                    self.log_tail(i)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of member `i`'s log.
    fn log_tail(&self, i: usize) -> String {
        let log = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills member `i` (SIGKILL): a member lost.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Hangs member `i` (SIGSTOP): its TCP connections stay open and nothing answers.
    pub async fn freeze(&self, i: usize) {
        self.signal(i, "STOP").await;
    }

    /// Wakes member `i` after [`PrivateEtcdCluster::freeze`] (SIGCONT).
    pub async fn thaw(&self, i: usize) {
        self.signal(i, "CONT").await;
    }

    async fn signal(&self, i: usize, signal: &str) {
        let pid = self.pid(i).expect("the member runs");
        run_ok(
            tokio::process::Command::new("kill").args([format!("-{signal}"), pid.to_string()]),
            &format!("kill -{signal} etcd member {i}"),
        )
        .await;
    }

    /// Starts member `i` again (after [`PrivateEtcdCluster::kill`]) on its ports and data,
    /// and waits until it answers with a leader.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.spawn(i);
        self.wait_answers(i).await;
    }

    /// Kills every member (SIGKILL): the whole store down.
    pub async fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i).await;
        }
    }

    /// Starts every member that is not running again, on its ports and data, and waits until
    /// each answers with a leader (after [`PrivateEtcdCluster::kill_all`]: members started one
    /// at a time could not elect a leader before a majority runs).
    pub async fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.members.len() {
            self.wait_answers(i).await;
        }
    }

    /// The index of the member that leads now, as the members that answer see it (the
    /// maintenance status API); waits until one is known (an election may be under way).
    pub async fn leader(&self) -> usize {
        wait_for("an etcd leader", Duration::from_secs(30), || async {
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                let Ok(Ok(Some(found))) =
                    tokio::time::timeout(Duration::from_secs(2), self.leader_seen_by(i)).await
                else {
                    continue;
                };
                return Ok(found);
            }
            Err("no member names a leader it knows".to_string())
        })
        .await
    }

    /// The member that member `i` sees as leader: its status names the leader's id, and each
    /// member's own status its id.
    async fn leader_seen_by(&self, i: usize) -> Result<Option<usize>, etcd_client::Error> {
        let mut c = Client::connect([format!("http://{}", self.endpoint(i))], None).await?;
        let leader = c.status().await?.leader();
        if leader == 0 {
            return Ok(None);
        }
        for j in 0..self.members.len() {
            if self.members[j].child.is_none() {
                continue;
            }
            let ep = format!("http://{}", self.endpoint(j));
            let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(2), Client::connect([ep], None)).await
            else {
                continue;
            };
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
            else {
                continue;
            };
            if status.header().map(|h| h.member_id()) == Some(leader) {
                return Ok(Some(j));
            }
        }
        Ok(None)
    }
}

/// A linearizable read through `endpoint` alone, within 3 s.
async fn probe(endpoint: &str) -> Result<(), String> {
    let read = async {
        let mut c = Client::connect([format!("http://{endpoint}")], None)
            .await
            .map_err(|e| e.to_string())?;
        c.get("health-probe", None)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(3), read)
        .await
        .map_err(|_| format!("no answer from {endpoint} within 3 s"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_never_one_the_kernel_may_give_an_outgoing_connection() {
        let (low, high) = ephemeral_range();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let port = free_port();
            assert!(
                !(low..=high).contains(&port),
                "port {port} is in the ephemeral range {low}-{high}"
            );
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }
}
