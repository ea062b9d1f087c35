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
