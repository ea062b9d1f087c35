//! The bridge against a real Docker engine in swarm mode and a real etcd.
//!
//! Each test starts its own bridge process with its own key prefix; tests run in parallel on
//! the shared engine, so they look only at their own services' records.

mod common;

use std::time::Duration;

use common::*;

const CONVERGE: Duration = Duration::from_secs(60);

fn etcd_uri(names: &Names) -> String {
    format!("etcd://{}/{}", etcd_endpoint(), names.prefix())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_service_is_published_and_follows_scaling() {
    let names = Names::new("scale");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let _bridge = BridgeProcess::start(&etcd_uri(&names), &["--metrics-addr", &metrics_addr]).await;
    let store = Store::connect().await;
    let layout = names.layout();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_task_container_is_replaced_in_the_same_slot() {
    let names = Names::new("resched");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let _bridge = BridgeProcess::start(&etcd_uri(&names), &[]).await;
    let store = Store::connect().await;
    let layout = names.layout();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_container_gets_a_registrator_compatible_record() {
    let names = Names::new("plain");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let name = names.name("web");
    let svc = names.name("websvc");
    let _bridge = BridgeProcess::start(&etcd_uri(&names), &[]).await;
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
    let store = Store::connect().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_labels_skip_one_container_with_a_warning_and_foreign_records_stay() {
    let names = Names::new("badlabel");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let good = names.name("good");
    let bad = names.name("bad");
    overlay(&mut cleanup, &net).await;
    let store = Store::connect().await;
    let layout = names.layout();
    // A value someone else wrote under the services prefix.
    let foreign_key = layout.service_key("legacy", "by-hand");
    store.put(&foreign_key, "10.9.9.9:27017").await;

    let bridge = BridgeProcess::start(&etcd_uri(&names), &["--resync", "1"]).await;
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
    bridge
        .wait_for_log("synced engine and store", CONVERGE)
        .await;
    wait_for("two more resyncs", CONVERGE, || async {
        let n = bridge.log_text().matches("synced engine and store").count();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} syncs"))
        }
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_bridge_loses_its_records_after_the_ttl_and_a_new_one_restores_them() {
    let names = Names::new("sigkill");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let store = Store::connect().await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let mut bridge = BridgeProcess::start(&etcd_uri(&names), &["--ttl", "3"]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    bridge.signal("KILL").await;
    bridge.wait(Duration::from_secs(10)).await;
    let killed_at = std::time::Instant::now();
    // etcd expires a lease within about its TTL; allow a margin for a loaded machine.
    wait_for(
        "the records to expire with the lease",
        Duration::from_secs(15),
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
    assert!(
        killed_at.elapsed() >= Duration::from_secs(2),
        "records outlived the process by about the TTL, not less: {:?}",
        killed_at.elapsed()
    );

    let _again = BridgeProcess::start(&etcd_uri(&names), &["--ttl", "3"]).await;
    wait_for("the records to be published again", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_records_over_to_the_next_bridge_without_a_gap() {
    let names = Names::new("handover");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let store = Store::connect().await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let mut first = BridgeProcess::start(&etcd_uri(&names), &["--ttl", "3"]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    // Watch the service's keys for any delete from here on.
    let mut client = store.client.clone();
    let (_watcher, mut stream) = {
        let ws = client
            .watch(
                layout.service_prefix(&svc),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .expect("watch");
        ws.split()
    };
    first.signal("TERM").await;
    assert_eq!(first.wait(Duration::from_secs(10)).await, Some(0));
    let second = BridgeProcess::start(&etcd_uri(&names), &["--ttl", "3"]).await;
    second
        .wait_for_log("synced engine and store", CONVERGE)
        .await;
    // Past the first bridge's lease TTL: its lease has expired by now.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = msg.expect("watch works").expect("watch open");
                for ev in resp.events() {
                    assert_eq!(ev.event_type(), etcd_client::EventType::Put,
                        "a record was deleted during the handover: {:?}", ev.kv().map(|kv| String::from_utf8_lossy(kv.key()).to_string()));
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    records_match_tasks(&store, &layout, &svc, &net, 2)
        .await
        .expect("records intact after the first bridge's lease expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_records_on_a_graceful_stop() {
    let names = Names::new("cleanup");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let store = Store::connect().await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 1, &[]).await;
    let mut bridge = BridgeProcess::start(&etcd_uri(&names), &["--ttl", "60", "--cleanup"]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_longer_than_the_ttl_is_repaired_without_a_restart() {
    let names = Names::new("outage");
    let mut cleanup = Cleanup::default();
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    let mut etcd = PrivateEtcd::start().await;
    let uri = format!("etcd://{}/{}", etcd.endpoint(), names.prefix());
    let store = Store::connect_to(&etcd.endpoint()).await;
    let layout = names.layout();
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let bridge = BridgeProcess::start(&uri, &["--ttl", "3", "--resync", "600"]).await;
    wait_for("2 records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;

    // etcd goes away for longer than the TTL, and the service changes meanwhile.
    etcd.stop().await;
    docker(&["service", "scale", "--detach", &format!("{svc}=3")]).await;
    wait_for("the third task to run", CONVERGE, || async {
        let n = task_containers(&svc, &net).await.len();
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{n} tasks"))
        }
    })
    .await;
    bridge.wait_for_log("store write failed", CONVERGE).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // the outage must outlast the 3 s TTL
    etcd.resume().await;
    let store = Store::connect_to(&etcd.endpoint()).await;
    wait_for("the store to be repaired", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 3)
    })
    .await;

    // An operator revokes the lease: the records go, and the bridge writes them again.
    let mut client = store.client.clone();
    let leases = client.leases().await.expect("leases");
    for lease in leases.leases() {
        client.lease_revoke(lease.id()).await.expect("revoke");
    }
    wait_for("the records after the lease was revoked", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 3)
    })
    .await;
    bridge.wait_for_log("session lost", CONVERGE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_at_start_is_retried_then_reported() {
    let port = free_port(); // nothing listens here
    let names = Names::new("unreach");
    let uri = format!("etcd://127.0.0.1:{port}/{}", names.prefix());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_2_with_a_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["etcd://127.0.0.1:2379/x", "--ttl", "abc"], "--ttl"),
        (&["etcd://127.0.0.1:2379/x", "--ttl", "1"], "--ttl"),
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
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"))
            .args(*args)
            .output()
            .await
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(mentions),
            "{args:?} should mention {mentions}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_the_records_and_writes_nothing() {
    let names = Names::new("dryrun");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    wait_for("2 running tasks", CONVERGE, || async {
        let n = task_containers(&svc, &net).await.len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} tasks"))
        }
    })
    .await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"))
        .args([&etcd_uri(&names), "--dry-run"])
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    let store = Store::connect().await;
    assert!(store.keys(&format!("{}/", names.prefix())).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_health_status_is_published_and_follows_the_healthcheck() {
    let names = Names::new("health");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let name = names.name("web");
    let svc = names.name("websvc");
    let flag = format!("/tmp/{}-healthy", names.base);
    let _bridge = BridgeProcess::start(&etcd_uri(&names), &["--internal"]).await;
    cleanup.container(&name);
    // Healthy while the flag file exists.
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--expose",
        "8080",
        "-e",
        &format!("SERVICE_NAME={svc}"),
        "--health-cmd",
        &format!("test -f {flag}"),
        "--health-interval",
        "1s",
        "--health-retries",
        "1",
        "local/busybox",
        "sh",
        "-c",
        &format!("touch {flag}; sleep 86400"),
    ])
    .await;
    let store = Store::connect().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_on_success_keeps_a_failed_containers_record_until_it_is_removed() {
    let names = Names::new("onsuccess");
    let mut cleanup = Cleanup::default();
    cleanup.prefix(&names.prefix());
    let failed = names.name("failed");
    let clean = names.name("clean");
    let svc_failed = names.name("svc-failed");
    let svc_clean = names.name("svc-clean");
    let bridge = BridgeProcess::start(
        &etcd_uri(&names),
        &["--internal", "--deregister", "on-success", "--resync", "1"],
    )
    .await;
    let store = Store::connect().await;
    let layout = names.layout();
    // Each exits once the flag file is removed: the first with a failure, the second cleanly.
    for (name, svc, code) in [(&failed, &svc_failed, 3), (&clean, &svc_clean, 0)] {
        cleanup.container(name);
        docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--expose",
            "8080",
            "-e",
            &format!("SERVICE_NAME={svc}"),
            "local/busybox",
            "sh",
            "-c",
            &format!("touch /tmp/run; while [ -f /tmp/run ]; do sleep 0.1; done; exit {code}"),
        ])
        .await;
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
    let syncs = bridge.log_text().matches("synced engine and store").count();
    wait_for("two more resyncs", CONVERGE, || async {
        let n = bridge.log_text().matches("synced engine and store").count();
        if n >= syncs + 2 {
            Ok(())
        } else {
            Err(format!("{n} syncs"))
        }
    })
    .await;
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
