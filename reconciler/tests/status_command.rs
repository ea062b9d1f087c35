//! `replset-reconciler status` against the real etcd of the test services: it reads the status
//! document the leader wrote, prints it, and waits for "converged with N" as
//! `ReplSetStatus::converged_with` defines it.

use std::process::Output;

use backend_core::{NextKind, NextStep, ReplSetStatus, StatusMember, STATUS_SCHEMA_VERSION};
use test_support::contract::unique_layout;

fn etcd_endpoint() -> String {
    std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into())
}

fn status(converged: bool, healthy: &[bool]) -> ReplSetStatus {
    ReplSetStatus {
        schema_version: STATUS_SCHEMA_VERSION,
        set: "rs0".into(),
        config_version: 4,
        primary: Some("10.0.0.1:27017".into()),
        members: healthy
            .iter()
            .zip(1..)
            .map(|(&h, id)| StatusMember {
                id,
                host: format!("10.0.0.{id}:27017"),
                votes: 1,
                priority: 1.0,
                healthy: Some(h),
                state: Some(if id == 1 { "PRIMARY" } else { "SECONDARY" }.into()),
            })
            .collect(),
        converged,
        next: NextStep::new(NextKind::Converged, "", "nothing to do"),
        last_step: String::new(),
        last_error: String::new(),
        observed_at: Some(backend_core::unix_seconds()),
        error: String::new(),
        records_gone: Vec::new(),
    }
}

async fn run(prefix: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_replset-reconciler"))
        .arg(format!("etcd://{}/{prefix}", etcd_endpoint()))
        .args(["--replset", "rs0", "status"])
        .args(args)
        .output()
        .await
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_the_document_and_waits_for_convergence() {
    let layout = unique_layout("status-command");
    let mut etcd = etcd_client::Client::connect([etcd_endpoint()], None)
        .await
        .expect("etcd");
    let key = layout.replset_status_key("rs0");

    // No status yet: exit 1, saying so.
    let out = run(layout.prefix(), &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no status yet"));

    // Three members, one unhealthy: printed, but not converged with 3.
    let written = status(true, &[true, true, false]);
    etcd.put(key.clone(), written.to_json(), None)
        .await
        .expect("put");
    let out = run(layout.prefix(), &["--json"]).await;
    assert!(out.status.success(), "{out:?}");
    let printed = ReplSetStatus::from_json(&out.stdout).expect("the document, as JSON");
    assert_eq!(printed, status(true, &[true, true, false]));
    let out = run(
        layout.prefix(),
        &["--wait-converged", "3", "--timeout", "1s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not converge with 3 members"));

    // All healthy: converged with 3, and not with 4.
    let written = status(true, &[true, true, true]);
    etcd.put(key.clone(), written.to_json(), None)
        .await
        .expect("put");
    let out = run(
        layout.prefix(),
        &["--wait-converged", "3", "--timeout", "0s"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("rs0: 3 members, 3 voting, primary 10.0.0.1:27017, config v4, converged"),
        "{text}"
    );
    let out = run(
        layout.prefix(),
        &["--wait-converged", "4", "--timeout", "0s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");

    // Observed two minutes ago (no leader has rewritten it): stale, so not converged.
    let mut old = status(true, &[true, true, true]);
    old.observed_at = old.observed_at.map(|t| t - 120);
    etcd.put(key.clone(), old.to_json(), None)
        .await
        .expect("put");
    let out = run(
        layout.prefix(),
        &["--wait-converged", "3", "--timeout", "0s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more than 60 s"),
        "{out:?}"
    );
    let out = run(layout.prefix(), &["--max-status-age", "5m"]).await;
    assert!(
        out.status.success(),
        "a longer --max-status-age takes it: {out:?}"
    );

    // The last reconcile could not observe the set: the status says so, and is not converged.
    let mut failed = status(false, &[true, true, true]);
    failed.error = "no config could be read: no member answered".into();
    etcd.put(key.clone(), failed.to_json(), None)
        .await
        .expect("put");
    let out = run(layout.prefix(), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("error: no config could be read"), "{text}");

    etcd.delete(
        format!("{}/", layout.prefix()),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("clean up");
}
