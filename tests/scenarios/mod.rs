//! The scenarios every backend must pass, against a real Docker engine in swarm mode and a
//! real store. `tests/bridge_etcd.rs` and `tests/bridge_consul.rs` run them, once per backend,
//! through [`suite`].
//!
//! Each scenario starts its own bridge process with its own key prefix; tests run in parallel
//! on the shared engine, so they look only at their own services' records.

use std::time::Duration;

use crate::common::*;

/// Declares one `#[tokio::test]` per scenario for a backend.
macro_rules! suite {
    ($backend:expr) => {
        test_support::each_scenario!(scenarios, $backend;
            replicated_service_is_published_and_follows_scaling,
            a_removed_task_container_is_replaced_in_the_same_slot,
            a_plain_container_gets_a_registrator_compatible_record,
            malformed_labels_skip_one_container_with_a_warning_and_foreign_records_stay,
            a_killed_bridge_loses_its_records_after_the_ttl_and_a_new_one_restores_them,
            a_graceful_stop_hands_records_over_to_the_next_bridge_without_a_gap,
            cleanup_removes_the_records_on_a_graceful_stop,
            a_store_outage_longer_than_the_ttl_is_repaired_without_a_restart,
            an_unreachable_store_at_start_is_retried_then_reported,
            the_docker_health_status_is_published_and_follows_the_healthcheck,
            deregister_on_success_keeps_a_failed_containers_record_until_it_is_removed,
            an_oversized_record_is_refused_alone_and_the_others_of_its_batch_are_written);
    };
}
pub(crate) use suite;

const CONVERGE: Duration = Duration::from_secs(60);

pub async fn replicated_service_is_published_and_follows_scaling(b: Backend) {
    let (names, mut cleanup, net, svc, store, layout) = scene(b, "scale").await;
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _bridge = BridgeProcess::start(&b.uri(&names), &["--metrics-addr", &metrics_addr]).await;

    service(&mut cleanup, &svc, &net, 3, &[]).await;
    let tasks = wait_for("3 records equal to the 3 tasks", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 3)
    })
    .await;
    let slots: Vec<u64> = tasks.iter().map(|t| t.slot).collect();
    assert_eq!(slots, vec![1, 2, 3]);
    let records = store.records(&layout, &svc).await.expect("records decode");
    for r in records.values() {
        assert_eq!(r.stack, None);
        assert!(r.service_id.is_some());
        assert_eq!(
            r.labels.get("registrator.port").map(String::as_str),
            Some("8080")
        );
        assert!(!r.labels.keys().any(|k| k.starts_with("com.docker.swarm.")));
    }

    docker(&["service", "scale", "--detach", &format!("{svc}=5")]).await;
    wait_for("5 records after scaling up", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 5)
    })
    .await;

    docker(&["service", "scale", "--detach", &format!("{svc}=2")]).await;
    wait_for("2 records after scaling down", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    // The node record and the metrics tell the same story.
    let node_keys = store.keys(&layout.nodes_prefix()).await;
    assert_eq!(node_keys.len(), 1, "one node record: {node_keys:?}");
    let (status, body) = http_get(&metrics_addr, "/healthz").await.expect("healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(&metrics_addr, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let published = metric(&body, "swarm_registrator_records_published_total");
    let removed = metric(&body, "swarm_registrator_records_removed_total");
    assert!(published >= 5.0, "published {published}\n{body}");
    assert!(removed >= 3.0, "removed {removed}\n{body}");
    assert!(body.contains("swarm_registrator_event_to_publish_seconds_bucket"));
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

pub async fn a_removed_task_container_is_replaced_in_the_same_slot(b: Backend) {
    let (names, mut cleanup, net, svc, store, layout) = scene(b, "resched").await;
    let _bridge = BridgeProcess::start(&b.uri(&names), &[]).await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let before = wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    let victim = before[0].clone();
    docker(&["rm", "-f", &victim.container_id]).await;
    let after = wait_for("the replacement task's record", CONVERGE, || async {
        let tasks = records_match_tasks(&store, &layout, &svc, &net, 2).await?;
        if tasks.iter().any(|t| t.task_id == victim.task_id) {
            return Err("the removed task is still listed".into());
        }
        Ok(tasks)
    })
    .await;
    let replacement = after
        .iter()
        .find(|t| t.slot == victim.slot)
        .expect("the slot is filled again");
    assert_ne!(replacement.task_id, victim.task_id);
    assert_ne!(
        replacement.ip, victim.ip,
        "swarm gave the new task a new address"
    );
    let records = store.records(&layout, &svc).await.expect("records");
    assert!(
        !records.contains_key(&victim.task_id),
        "the old record is gone"
    );
    assert_eq!(records[&replacement.task_id].task_slot, Some(victim.slot));
}

pub async fn a_plain_container_gets_a_registrator_compatible_record(b: Backend) {
    let (names, mut cleanup) = names_and_cleanup(b, "plain");
    let name = names.name("web");
    let svc = names.name("websvc");
    let _bridge = BridgeProcess::start(&b.uri(&names), &[]).await;
    cleanup.container(&name);
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::8080",
        "--label",
        &format!("SERVICE_NAME={svc}"),
        "-e",
        "SERVICE_TAGS=primary,v1",
        "-e",
        "SERVICE_REGION=eu",
        "local/busybox",
        "sleep",
        "86400",
    ])
    .await;
    let host_port: u16 = docker(&["port", &name, "8080/tcp"])
        .await
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("a published host port");
    let hostname = docker(&["info", "--format", "{{.Name}}"]).await;
    let store = b.store().await;
    let layout = names.layout();
    let records = wait_for("the container's record", CONVERGE, || async {
        let r = store.records(&layout, &svc).await?;
        if r.len() == 1 {
            Ok(r)
        } else {
            Err(format!("{} records", r.len()))
        }
    })
    .await;
    let (id, r) = records.iter().next().expect("one record");
    assert_eq!(id, &format!("{hostname}:{name}:8080"));
    assert_eq!(r.ip.to_string(), "127.0.0.1");
    assert_eq!(r.port, host_port);
    assert_eq!(r.tags, vec!["primary", "v1"]);
    assert_eq!(r.attrs.get("region").map(String::as_str), Some("eu"));
    assert_eq!(r.task_id, None);
    assert_eq!(r.task_slot, None);

    docker(&["stop", "-t", "1", &name]).await;
    wait_for(
        "the record to go when the container stops",
        CONVERGE,
        || async {
            let r = store.records(&layout, &svc).await?;
            if r.is_empty() {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    )
    .await;
}

pub async fn malformed_labels_skip_one_container_with_a_warning_and_foreign_records_stay(
    b: Backend,
) {
    let (names, mut cleanup) = names_and_cleanup(b, "badlabel");
    let net = names.name("net");
    let good = names.name("good");
    let bad = names.name("bad");
    overlay(&mut cleanup, &net).await;
    let store = b.store().await;
    let layout = names.layout();
    // A value someone else wrote under the services prefix.
    let foreign_key = layout.service_key("legacy", "by-hand");
    store.put(&foreign_key, "10.9.9.9:27017").await;

    let bridge = BridgeProcess::start(&b.uri(&names), &["--resync", "1"]).await;
    service(
        &mut cleanup,
        &bad,
        &net,
        1,
        &["--container-label", "SERVICE_8080_NAME=a/b"],
    )
    .await;
    service(&mut cleanup, &good, &net, 2, &[]).await;
    wait_for("the good service's records", CONVERGE, || {
        records_match_tasks(&store, &layout, &good, &net, 2)
    })
    .await;
    bridge
        .wait_for_log("not publishing container", CONVERGE)
        .await;
    let log = bridge.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("not publishing container"))
        .expect("a warning");
    assert!(
        warning.contains(&bad) && warning.contains("SERVICE_NAME"),
        "{warning}"
    );
    // Several resyncs later: still one warning for the container, not one per resync.
    bridge.wait_synced(3, CONVERGE).await;
    let warnings = bridge
        .log_text()
        .lines()
        .filter(|l| l.contains("not publishing container") && l.contains(&bad))
        .count();
    assert_eq!(warnings, 1, "one warning per container and reason");
    assert!(store
        .records(&layout, &bad)
        .await
        .expect("decodes")
        .is_empty());
    assert_eq!(
        store.get(&foreign_key).await.as_deref(),
        Some(&b"10.9.9.9:27017"[..]),
        "a value the bridge did not write is left alone"
    );
}

/// A container whose labels would make a record of 2.4 MiB (over etcd's 1.5 MiB request limit
/// and Consul's 512 KiB value limit) beside three ordinary ones, all running before the bridge
/// starts, so that its first sync writes them in one batch.
pub async fn an_oversized_record_is_refused_alone_and_the_others_of_its_batch_are_written(
    b: Backend,
) {
    let (names, mut cleanup) = names_and_cleanup(b, "oversized");
    let big = names.name("big");
    let svc_big = names.name("svc-big");
    let svc_small = names.name("svc-small");
    let store = b.store().await;
    let layout = names.layout();
    // 40 labels of 60 KiB: each line under the CLI's 64 KiB line limit of --label-file.
    let dir = test_support::TempDir::new("oversized");
    let labels = dir.path().join("labels");
    let line = "x".repeat(60 * 1024);
    let text: String = (0..40).map(|i| format!("blob{i:02}={line}\n")).collect();
    std::fs::write(&labels, text).expect("label file");
    let label_file = labels.to_string_lossy().to_string();
    plain_container(
        &mut cleanup,
        &big,
        &svc_big,
        &["--label-file", &label_file],
        &["sleep", "86400"],
    )
    .await;
    for i in 0..3 {
        let name = names.name(&format!("small{i}"));
        plain_container(&mut cleanup, &name, &svc_small, &[], &["sleep", "86400"]).await;
    }
    let bridge = BridgeProcess::start(&b.uri(&names), &["--internal", "--resync", "1"]).await;
    wait_for("the three ordinary records", CONVERGE, || async {
        let n = store.records(&layout, &svc_small).await?.len();
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{n} records"))
        }
    })
    .await;
    bridge
        .wait_for_log("not publishing container", CONVERGE)
        .await;
    bridge.wait_synced(3, CONVERGE).await;
    let log = bridge.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not publishing container") && l.contains(&big))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, naming the container: {warnings:?}"
    );
    assert!(warnings[0].contains("65536"), "{}", warnings[0]);
    assert!(store
        .records(&layout, &svc_big)
        .await
        .expect("decodes")
        .is_empty());
    assert!(
        !log.contains("sync failed"),
        "no batch failed: {}",
        log.lines()
            .filter(|l| l.contains("sync failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

pub async fn a_killed_bridge_loses_its_records_after_the_ttl_and_a_new_one_restores_them(
    b: Backend,
) {
    let (names, mut cleanup, net, svc, store, layout) = scene(b, "sigkill").await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let mut bridge = BridgeProcess::start(&b.uri(&names), &["--ttl", b.short_ttl()]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    bridge.signal("KILL").await;
    bridge.wait(Duration::from_secs(10)).await;
    let killed_at = std::time::Instant::now();
    // etcd expires a lease within about its TTL, Consul a session within twice its TTL.
    wait_for(
        "the records to expire with the lease",
        b.expiry_bound(),
        || async {
            let r = store.records(&layout, &svc).await?;
            let nodes = store.keys(&layout.nodes_prefix()).await;
            if r.is_empty() && nodes.is_empty() {
                Ok(())
            } else {
                Err(format!("{} records, {} node records", r.len(), nodes.len()))
            }
        },
    )
    .await;
    let ttl: u64 = b.short_ttl().parse().expect("a number");
    assert!(
        killed_at.elapsed() >= Duration::from_secs(ttl - 1),
        "records outlived the process by about the TTL, not less: {:?}",
        killed_at.elapsed()
    );

    let _again = BridgeProcess::start(&b.uri(&names), &["--ttl", b.short_ttl()]).await;
    wait_for("the records to be published again", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;
}

pub async fn a_graceful_stop_hands_records_over_to_the_next_bridge_without_a_gap(b: Backend) {
    let (names, mut cleanup, net, svc, store, layout) = scene(b, "handover").await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let mut first = BridgeProcess::start(&b.uri(&names), &["--ttl", b.short_ttl()]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    // Follow the service's keys, with the project's own watcher, for any delete from here on.
    let mut watch = b.watch(&b.endpoint(), &layout, layout.service_prefix(&svc));
    match tokio::time::timeout(CONVERGE, futures::StreamExt::next(&mut watch)).await {
        Ok(Some(Ok(backend_core::WatchEvent::Restarted(entries)))) => assert_eq!(entries.len(), 2),
        other => panic!("expected the watch's snapshot, got {other:?}"),
    }
    first.signal("TERM").await;
    assert_eq!(first.wait(Duration::from_secs(10)).await, Some(0));
    let second = BridgeProcess::start(&b.uri(&names), &["--ttl", b.short_ttl()]).await;
    second.wait_synced(1, CONVERGE).await;
    // Until the first bridge's session has surely expired (Consul: up to twice the TTL).
    let ttl: u64 = b.short_ttl().parse().expect("a number");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2 * ttl + 5);
    loop {
        tokio::select! {
            event = futures::StreamExt::next(&mut watch) => match event {
                Some(Ok(backend_core::WatchEvent::Deleted(key))) => {
                    panic!("a record was deleted during the handover: {key}")
                }
                Some(Ok(backend_core::WatchEvent::Restarted(entries))) => {
                    assert_eq!(entries.len(), 2, "a relisted watch sees every record")
                }
                Some(Ok(backend_core::WatchEvent::Put(_))) => {}
                Some(Err(e)) => panic!("the watch failed: {e}"),
                None => panic!("the watch ended"),
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    records_match_tasks(&store, &layout, &svc, &net, 2)
        .await
        .expect("records intact after the first bridge's lease expired");
}

pub async fn cleanup_removes_the_records_on_a_graceful_stop(b: Backend) {
    let (names, mut cleanup, net, svc, store, layout) = scene(b, "cleanup").await;
    service(&mut cleanup, &svc, &net, 1, &[]).await;
    let mut bridge = BridgeProcess::start(&b.uri(&names), &["--ttl", "60", "--cleanup"]).await;
    wait_for("1 record", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 1)
    })
    .await;
    bridge.signal("TERM").await;
    assert_eq!(bridge.wait(Duration::from_secs(10)).await, Some(0));
    // The TTL is 60 s: only the revoked lease can have removed them now.
    let r = store.records(&layout, &svc).await.expect("records");
    assert!(r.is_empty(), "records left after --cleanup: {r:?}");
}

pub async fn a_store_outage_longer_than_the_ttl_is_repaired_without_a_restart(b: Backend) {
    let names = Names::new("outage");
    let mut cleanup = Cleanup::default();
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    // A private store: this test stops it. (A Consul dev agent loses everything on a restart.)
    let mut private = b.private().await;
    let uri = b.uri_at(&private.endpoint(), &names);
    let store = b.store_at(&private.endpoint()).await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let bridge = BridgeProcess::start(&uri, &["--ttl", b.short_ttl(), "--resync", "600"]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    // The store goes away for longer than the TTL, and the service changes meanwhile.
    private.stop().await;
    docker(&["service", "scale", "--detach", &format!("{svc}=3")]).await;
    wait_for_tasks(&svc, &net, 3, CONVERGE).await;
    bridge
        .wait_metric(
            r#"swarm_registrator_backend_errors_total{operation="publish"}"#,
            1.0,
            CONVERGE,
        )
        .await;
    // The outage itself, not a condition: it must outlast the TTL.
    let ttl: u64 = b.short_ttl().parse().expect("a number");
    tokio::time::sleep(Duration::from_secs(ttl + 1)).await;
    private.resume().await;
    let store = b.store_at(&private.endpoint()).await;
    wait_for("the store to be repaired", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 3)
    })
    .await;

    // An operator ends the session: the records go, and the bridge writes them again.
    store.end_all_sessions().await;
    wait_for("the records after the session was ended", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 3)
    })
    .await;
    bridge
        .wait_metric(
            r#"swarm_registrator_session_renewals_total{result="lost"}"#,
            1.0,
            CONVERGE,
        )
        .await;
}

pub async fn an_unreachable_store_at_start_is_retried_then_reported(b: Backend) {
    let port = free_port(); // nothing listens here
    let names = Names::new("unreach");
    let uri = b.uri_at(&format!("127.0.0.1:{port}"), &names);
    let mut bridge =
        BridgeProcess::start(&uri, &["--retry-attempts", "2", "--retry-interval", "50"]).await;
    let code = bridge.wait(Duration::from_secs(60)).await;
    assert_eq!(code, Some(1));
    let log = bridge.log_text();
    assert_eq!(
        log.matches("not reachable yet; retrying").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("gave up opening a session with the store after 3 attempts"),
        "{log}"
    );
    assert!(
        log.contains(&format!("127.0.0.1:{port}")),
        "the error names the address: {log}"
    );
}

pub async fn the_docker_health_status_is_published_and_follows_the_healthcheck(b: Backend) {
    let (names, mut cleanup) = names_and_cleanup(b, "health");
    let name = names.name("web");
    let svc = names.name("websvc");
    let flag = format!("/tmp/{}-healthy", names.base);
    let _bridge = BridgeProcess::start(&b.uri(&names), &["--internal"]).await;
    // Healthy while the flag file exists.
    healthchecked_container(&mut cleanup, &name, &svc, &flag).await;
    let store = b.store().await;
    let layout = names.layout();
    let health_is = |want: backend_core::Health| {
        let store = &store;
        let layout = &layout;
        let svc = &svc;
        async move {
            let r = store.records(layout, svc).await?;
            match r.values().next() {
                Some(r) if r.health == Some(want) => Ok(r.clone()),
                other => Err(format!("{:?}", other.map(|r| r.health))),
            }
        }
    };
    let r = wait_for("a healthy record", CONVERGE, || {
        health_is(backend_core::Health::Healthy)
    })
    .await;
    let ip = docker(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        &name,
    ])
    .await;
    assert_eq!(
        (r.ip.to_string(), r.port),
        (ip, 8080),
        "--internal uses the container's address"
    );
    docker(&["exec", &name, "rm", &flag]).await;
    wait_for("an unhealthy record", CONVERGE, || {
        health_is(backend_core::Health::Unhealthy)
    })
    .await;
}

pub async fn deregister_on_success_keeps_a_failed_containers_record_until_it_is_removed(
    b: Backend,
) {
    let (names, mut cleanup) = names_and_cleanup(b, "onsuccess");
    let failed = names.name("failed");
    let clean = names.name("clean");
    let svc_failed = names.name("svc-failed");
    let svc_clean = names.name("svc-clean");
    let bridge = BridgeProcess::start(
        &b.uri(&names),
        &["--internal", "--deregister", "on-success", "--resync", "1"],
    )
    .await;
    let store = b.store().await;
    let layout = names.layout();
    // Each exits once the flag file is removed: the first with a failure, the second cleanly.
    for (name, svc, code) in [(&failed, &svc_failed, 3), (&clean, &svc_clean, 0)] {
        let cmd = format!("touch /tmp/run; while [ -f /tmp/run ]; do sleep 0.1; done; exit {code}");
        plain_container(&mut cleanup, name, svc, &[], &["sh", "-c", &cmd]).await;
    }
    for svc in [&svc_failed, &svc_clean] {
        wait_for("a record", CONVERGE, || async {
            let n = store.records(&layout, svc).await?.len();
            if n == 1 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        })
        .await;
    }
    for name in [&failed, &clean] {
        docker(&["exec", name, "rm", "/tmp/run"]).await;
    }
    wait_for("the clean exit's record to go", CONVERGE, || async {
        let n = store.records(&layout, &svc_clean).await?.len();
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} records"))
        }
    })
    .await;
    let exit = docker(&["wait", &failed]).await;
    assert_eq!(exit, "3");
    // Kept across several resyncs.
    let syncs = bridge.syncs().await;
    bridge.wait_synced(syncs + 2, CONVERGE).await;
    assert_eq!(
        store
            .records(&layout, &svc_failed)
            .await
            .expect("records")
            .len(),
        1
    );
    docker(&["rm", &failed]).await;
    wait_for(
        "the failed container's record to go once it is removed",
        CONVERGE,
        || async {
            let n = store.records(&layout, &svc_failed).await?.len();
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        },
    )
    .await;
}
