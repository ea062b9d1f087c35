//! The command line: flags, and the one-shot --dry-run.

mod common;

use std::time::Duration;

use common::*;

const CONVERGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["etcd://127.0.0.1:2379/x", "--ttl", "abc"], "--ttl"),
        (&["etcd://127.0.0.1:2379/x", "--ttl", "1"], "--ttl"),
        (&["etcd://127.0.0.1:2379/x", "--ttl", "1500ms"], "--ttl"),
        (&["etcd://127.0.0.1:2379/x", "--ttl", "15 s"], "--ttl"),
        (
            &["etcd://127.0.0.1:2379/x", "--retry-interval", "5"],
            "--retry-interval",
        ),
        (&["etcd://127.0.0.1:2379/x", "--resync", "0s"], "--resync"),
        (
            &["etcd://127.0.0.1:2379/x", "--deregister", "never"],
            "--deregister",
        ),
        (&["etcd://127.0.0.1:2379/x", "--ip", "10.0.0"], "--ip"),
        (&["127.0.0.1:2379"], "etcd://"),
        (&["zk://h/p"], "etcd://"),
        (&["etcd://h:99999/p"], "port"),
    ];
    for (args, mentions) in cases {
        let (code, stderr) = run_bridge(args, &[]).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(mentions),
            "{args:?} should mention {mentions}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_records_and_writes_nothing() {
    let (names, mut cleanup, net, svc, store, _) = scene(Backend::Etcd, "dryrun").await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    wait_for_tasks(&svc, &net, 2, CONVERGE).await;
    let mut dry_run = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"));
    dry_run.args([&Backend::Etcd.uri(&names), "--dry-run"]);
    let out = run_ok(&mut dry_run, "swarm-registrator --dry-run").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tasks = task_containers(&svc, &net).await;
    for t in &tasks {
        let key = names.layout().service_key(&svc, &t.task_id);
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no line for {key} in:\n{stdout}"));
        let json = line.split_once(' ').map(|x| x.1).unwrap_or_default();
        let record = backend_core::ServiceRecord::from_json(json.as_bytes()).expect("a record");
        assert_eq!(record.ip.to_string(), t.ip);
    }
    assert!(store.keys(&format!("{}/", names.prefix())).await.is_empty());
}
