//! Tests that restart the shared Docker engine. They run on their own, after the other tests
//! (`scripts/test` runs this binary in a second, serial pass), since every other test on the
//! engine would be disturbed.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reconnects_after_dockerd_restarts_and_repairs_the_store() {
    let names = Names::new("dockerd");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(Backend::Etcd, &names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let store = Backend::Etcd.store().await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut bridge = BridgeProcess::start(
        &format!("etcd://{}/{}", etcd_endpoint(), names.prefix()),
        &["--metrics-addr", &metrics_addr, "--retry-interval", "200"],
    )
    .await;
    let before = wait_for("2 records", Duration::from_secs(60), || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    let mut restart = tokio::process::Command::new(repo_root().join("scripts/services"));
    restart.arg("restart-docker");
    run_ok(&mut restart, "restarting dockerd").await;

    bridge
        .wait_for_log("Docker event stream", Duration::from_secs(60))
        .await;
    // After the restart swarm starts the tasks again (as new containers or the same ones
    // restarted); the store must follow whatever the engine now runs.
    let after = wait_for(
        "the store to equal the engine again",
        Duration::from_secs(120),
        || records_match_tasks(&store, &layout, &svc, &net, 2),
    )
    .await;
    assert!(
        bridge.child.try_wait().expect("try_wait").is_none(),
        "the bridge kept running through the restart"
    );
    let (_, metrics) = http_get(&metrics_addr, "/metrics").await.expect("metrics");
    let reconnects = metrics
        .lines()
        .find_map(|l| l.strip_prefix("swarm_registrator_docker_reconnects_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("reconnect counter");
    assert!(reconnects >= 1.0, "{metrics}");
    let (status, _) = http_get(&metrics_addr, "/healthz").await.expect("healthz");
    assert_eq!(status, 200);
    eprintln!("tasks before: {before:?}\ntasks after: {after:?}");
}

/// Where Docker runs as a system service (`apt install docker.io` on a systemd machine),
/// `scripts/services restart-docker` restarts it through systemd, so that `scripts/test` works
/// there too. This machine has no systemd, so a stand-in `systemctl` first on the `PATH` plays
/// systemd's part for the real dockerd: it answers `is-active` and `show -p MainPID`, and
/// `restart` stops dockerd and starts it again, as systemd does. The script's own pid file is
/// moved aside for the test, so that the dockerd is not the script's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_docker_restarts_a_dockerd_run_by_systemd_through_systemctl() {
    let root = repo_root();
    let ours = root.join(".services/dockerd.pid");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("systemd-stand-in");
    std::fs::create_dir_all(&dir).expect("a directory for the stand-in");
    let main_pid = dir.join("docker.service.pid");
    let calls = dir.join("calls");
    let _ = std::fs::remove_file(&calls);
    std::fs::rename(&ours, &main_pid).expect("the script's dockerd pid file (scripts/services up)");
    // Puts the pid file back, naming the dockerd that runs now, even when the test fails.
    struct Restore(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::rename(&self.0, &self.1);
        }
    }
    let _restore = Restore(main_pid.clone(), ours.clone());
    let before = std::fs::read_to_string(&main_pid).expect("the pid");
    let systemctl = dir.join("systemctl");
    std::fs::write(
        &systemctl,
        format!(
            r#"#!/usr/bin/env bash
# A stand-in for systemd's systemctl, for docker.service only.
set -eu
echo "$*" >> {calls:?}
pidfile={main_pid:?}
case "$*" in
"is-active --quiet docker.service") kill -0 "$(cat "$pidfile")" ;;
"show -p MainPID --value docker.service") cat "$pidfile" ;;
"restart docker.service")
	pid=$(cat "$pidfile")
	kill -TERM "$pid"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
	setsid dockerd >> {log:?} 2>&1 < /dev/null &
	echo $! > "$pidfile" ;;
*) echo "stand-in systemctl: unexpected: $*" >&2; exit 2 ;;
esac
"#,
            log = root.join(".services/dockerd.log"),
        ),
    )
    .expect("write the stand-in");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the stand-in");

    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut restart = tokio::process::Command::new(root.join("scripts/services"));
    restart.arg("restart-docker").env("PATH", path);
    let out = run_ok(&mut restart, "restart-docker with dockerd under systemd").await;
    let said = String::from_utf8_lossy(&out.stdout);

    let after = std::fs::read_to_string(&main_pid).expect("the new pid");
    assert_ne!(before.trim(), after.trim(), "dockerd was restarted");
    assert!(said.contains("restarted by systemd"), "{said}");
    let calls = std::fs::read_to_string(&calls).expect("the stand-in was called");
    assert!(
        calls.lines().any(|l| l == "restart docker.service"),
        "{calls}"
    );
    let info = tokio::process::Command::new("docker")
        .args(["info", "--format", "{{.Swarm.LocalNodeState}}"])
        .output()
        .await
        .expect("docker info");
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), "active");
    // The new dockerd is a grandchild of the script: it must not hold the script's lock, or
    // every later `scripts/services up` or `down` waits for it in vain.
    let lock = root.join(".services/lock");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", after.trim())).expect("dockerd's fds");
    let held: Vec<_> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| *target == lock)
        .collect();
    assert!(
        held.is_empty(),
        "the restarted dockerd holds {}",
        lock.display()
    );
}
