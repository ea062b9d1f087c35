//! The bridge behind docker-socket-proxy (crates/socket-proxy), against the real engine and
//! the real etcd of the test services: it publishes and withdraws a container with nothing
//! but the proxy's socket, the event stream passes as it happens, and the requests that make
//! the socket root on the node (create, exec, delete, swarm, secrets, a hijacked stream) are
//! refused with 403 and leave nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    docker, names_and_cleanup, plain_container, wait_for, Backend, BridgeProcess, Cleanup, Names,
    TempDir,
};
use docker_socket_proxy::{AllowList, ListenAddr, Listener, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// How long a record takes to appear or go.
const CONVERGE: Duration = Duration::from_secs(30);

/// A proxy in this process on a socket of its own, in front of the shared engine; stopped
/// when dropped.
struct RunningProxy {
    proxy: Proxy,
    socket: PathBuf,
    stop: CancellationToken,
    _dir: TempDir,
}

impl RunningProxy {
    async fn start() -> RunningProxy {
        let dir = TempDir::new("socket-proxy");
        let socket = dir.path().join("docker.sock");
        let engine = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        let proxy = Proxy::new(engine, AllowList::for_bridge(&[]));
        let listener = Listener::bind(&ListenAddr::Unix(socket.clone()), 0o600)
            .await
            .expect("the proxy listens");
        let stop = CancellationToken::new();
        let (p, s) = (proxy.clone(), stop.clone());
        tokio::spawn(async move { p.serve(listener, s).await });
        RunningProxy {
            proxy,
            socket,
            stop,
            _dir: dir,
        }
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One request over the unix socket `socket` (`Connection: close`): status, head and body.
async fn request(
    socket: &Path,
    method: &str,
    target: &str,
    headers: &str,
    body: &str,
) -> (u16, String, String) {
    let mut stream = UnixStream::connect(socket).await.expect("connects");
    let content = if body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    stream
        .write_all(
            format!(
                "{method} {target} HTTP/1.1\r\nHost: docker\r\n{headers}{content}Connection: close\r\n\r\n{body}"
            )
            .as_bytes(),
        )
        .await
        .expect("writes");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut raw))
        .await
        .expect("the answer comes in time")
        .expect("reads");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    (status, head.to_string(), body.to_string())
}

/// Asserts a 403 in the engine's error form, `{"message": "...docker-socket-proxy..."}`.
fn assert_refused(what: &str, (status, head, body): &(u16, String, String)) {
    assert_eq!(*status, 403, "{what}: {head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{what}: {head}"
    );
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    let message = json["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("docker-socket-proxy"),
        "{what}: the message says who refused: {body}"
    );
}

/// A plain container `name` that sleeps, for this test's clean-up to remove.
async fn sleeper(cleanup: &mut Cleanup, names: &Names, name: &str) -> String {
    plain_container(cleanup, name, &names.name("svc"), &[], &["sleep", "86400"]).await
}

/// Reads what comes next on an open stream into `seen`; panics, naming `what` it waited
/// for, when nothing comes within 20 s or the stream ends.
async fn read_more(stream: &mut UnixStream, seen: &mut String, what: &str) {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what} did not come through the open stream: {seen}"))
        .expect("reads");
    assert!(n > 0, "the stream ended before {what}: {seen}");
    seen.push_str(&String::from_utf8_lossy(&buf[..n]));
}

/// Whether the engine knows an object (`docker <kind> inspect <name>` succeeds).
async fn exists(kind: &str, name: &str) -> bool {
    tokio::process::Command::new("docker")
        .args([kind, "inspect", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

#[tokio::test]
async fn the_bridge_publishes_and_withdraws_a_container_through_the_proxy() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Etcd, "sockproxy");
    let proxy = RunningProxy::start().await;
    let host = proxy.docker_host();
    // A resync an hour away: the record can only go on an event, through the proxy.
    let bridge = BridgeProcess::start_with_env(
        &Backend::Etcd.uri(&names),
        &["--internal", "--resync", "1h"],
        &[("DOCKER_HOST", &host)],
    )
    .await;
    bridge.wait_synced(1, CONVERGE).await;

    let svc = names.name("web");
    let name = names.name("c");
    let id = plain_container(&mut cleanup, &name, &svc, &[], &["sleep", "86400"]).await;
    let store = Backend::Etcd.store().await;
    let layout = names.layout();
    let record = wait_for("the container's record", CONVERGE, || async {
        let records = store.records(&layout, &svc).await?;
        match records.values().next() {
            Some(r) if records.len() == 1 => Ok(r.clone()),
            _ => Err(format!("{} records", records.len())),
        }
    })
    .await;
    assert_eq!(
        (record.container_id.as_str(), record.port),
        (id.as_str(), 8080)
    );

    docker(&["rm", "-f", &name]).await;
    wait_for("the record to go", CONVERGE, || async {
        let records = store.records(&layout, &svc).await?;
        if records.is_empty() {
            Ok(())
        } else {
            Err(format!("{} records", records.len()))
        }
    })
    .await;

    let stats = proxy.proxy.stats();
    assert_eq!(
        stats.refused, 0,
        "the bridge asked only for what the proxy allows"
    );
    assert!(
        stats.forwarded >= 5,
        "version, info, list, events, inspect: {stats:?}"
    );
    let log = bridge.log_text();
    assert!(
        !log.contains(" ERROR "),
        "no engine error in the bridge log:\n{log}"
    );
}

#[tokio::test]
async fn writes_swarm_secrets_and_hijacks_are_refused_and_leave_nothing_behind() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Etcd, "sockdeny");
    let proxy = RunningProxy::start().await;
    let sock = proxy.socket.clone();
    let name = names.name("target");
    let id = sleeper(&mut cleanup, &names, &name).await;

    // What the bridge reads passes (the control).
    let (status, _, body) = request(
        &sock,
        "GET",
        &format!("/v1.41/containers/{id}/json"),
        "",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&id), "the engine's inspect answer: {body}");

    let created = names.name("created");
    let create = r#"{"Image":"local/busybox","Cmd":["true"],"HostConfig":{"Binds":["/:/host"]}}"#;
    let answer = request(
        &sock,
        "POST",
        &format!("/v1.41/containers/create?name={created}"),
        "",
        create,
    )
    .await;
    assert_refused("POST /containers/create", &answer);
    cleanup.container(&created);

    let exec = r#"{"Cmd":["touch","/tmp/pwned"],"AttachStdout":true}"#;
    let answer = request(
        &sock,
        "POST",
        &format!("/v1.41/containers/{id}/exec"),
        "",
        exec,
    )
    .await;
    assert_refused("POST /containers/{id}/exec", &answer);

    let answer = request(
        &sock,
        "DELETE",
        &format!("/v1.41/containers/{id}?force=1"),
        "",
        "",
    )
    .await;
    assert_refused("DELETE /containers/{id}", &answer);

    // The swarm's join tokens, and leaving it.
    assert_refused(
        "GET /swarm",
        &request(&sock, "GET", "/v1.41/swarm", "", "").await,
    );
    assert_refused(
        "POST /swarm/leave",
        &request(&sock, "POST", "/v1.41/swarm/leave?force=1", "", "").await,
    );

    let secret = names.name("secret");
    assert_refused(
        "GET /secrets",
        &request(&sock, "GET", "/v1.41/secrets", "", "").await,
    );
    let spec = format!(r#"{{"Name":"{secret}","Data":"aGk="}}"#);
    let answer = request(&sock, "POST", "/v1.41/secrets/create", "", &spec).await;
    assert_refused("POST /secrets/create", &answer);

    // A hijacked stream: the engine's attach, and an upgrade on a path that is allowed.
    let upgrade = "Connection: Upgrade\r\nUpgrade: tcp\r\n";
    let attach = format!("/v1.41/containers/{id}/attach?stream=1&stdin=1&stdout=1");
    assert_refused(
        "attach",
        &request(&sock, "POST", &attach, upgrade, "").await,
    );
    let inspect = format!("/v1.41/containers/{id}/json");
    assert_refused(
        "an upgrade on inspect",
        &request(&sock, "GET", &inspect, upgrade, "").await,
    );
    let ws = format!("/v1.41/containers/{id}/attach/ws?stream=1");
    let websocket = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_refused(
        "attach/ws",
        &request(&sock, "GET", &ws, websocket, "").await,
    );

    // Nothing was created, run or removed.
    assert!(
        !exists("container", &created).await,
        "no container {created}"
    );
    assert!(!exists("secret", &secret).await, "no secret {secret}");
    assert_eq!(
        docker(&[
            "inspect",
            "--format",
            "{{len .ExecIDs}} {{.State.Running}}",
            &id
        ])
        .await,
        "0 true",
        "no exec was made in the target, which still runs"
    );
    assert_eq!(
        docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).await,
        "active",
        "the node is still in the swarm"
    );
    assert_eq!(proxy.proxy.stats().refused, 10);
}

#[tokio::test]
async fn events_pass_the_proxy_as_they_happen() {
    let names = Names::new("sockevents");
    let mut cleanup = Cleanup::default();
    let proxy = RunningProxy::start().await;
    let name = names.name("c");
    // Only this test's container: {"type":["container"],"container":["<name>"]}, escaped.
    let filters =
        format!("%7B%22type%22%3A%5B%22container%22%5D%2C%22container%22%3A%5B%22{name}%22%5D%7D");
    let mut stream = UnixStream::connect(&proxy.socket).await.expect("connects");
    stream
        .write_all(
            format!("GET /v1.41/events?filters={filters} HTTP/1.1\r\nHost: docker\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("writes");
    let mut seen = String::new();
    // The head comes before any event: the engine flushes it, and so does the proxy.
    while !seen.contains("\r\n\r\n") {
        read_more(&mut stream, &mut seen, "the head of the event stream").await;
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");

    sleeper(&mut cleanup, &names, &name).await;
    // The start event arrives while the stream stays open: streamed, not buffered to the end.
    loop {
        read_more(&mut stream, &mut seen, "the start event").await;
        if seen.contains(r#""status":"start""#) && seen.contains(&name) {
            break;
        }
    }
    assert_eq!(proxy.proxy.stats().refused, 0);
}
