//! What only Consul has: its catalog and health API, the `consul watch` CLI, ACL tokens.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);

async fn consul_get(path: &str) -> Result<Value, String> {
    let resp = reqwest::get(format!("http://{}{path}", consul_endpoint()))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_in_the_catalog_and_the_health_api_with_their_addresses() {
    let (names, mut cleanup, net, svc, store, layout) = scene(Backend::Consul, "catalog").await;
    let _bridge = BridgeProcess::start(&Backend::Consul.uri(&names), &["--cleanup"]).await;
    service(
        &mut cleanup,
        &svc,
        &net,
        2,
        &[
            "--container-label",
            "note=grüße ✓",
            "--container-label",
            "SERVICE_TAGS=primary,v1",
        ],
    )
    .await;
    let tasks = wait_for("2 KV records", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;
    let records = store.records(&layout, &svc).await.expect("records");
    assert!(records
        .values()
        .all(|r| r.labels.get("note").map(String::as_str) == Some("grüße ✓")));

    let path = format!("/v1/health/service/{svc}?passing=true");
    let entries = wait_for(
        "2 passing instances in the health API",
        CONVERGE,
        || async {
            let v = consul_get(&path).await?;
            match v.as_array() {
                Some(a) if a.len() == 2 => Ok(a.clone()),
                _ => Err(v.to_string()),
            }
        },
    )
    .await;
    for t in &tasks {
        let e = entries
            .iter()
            .find(|e| e["Service"]["ID"].as_str() == Some(t.task_id.as_str()))
            .unwrap_or_else(|| panic!("no instance for task {}: {entries:?}", t.task_id));
        assert_eq!(e["Service"]["Address"], Value::from(t.ip.clone()));
        assert_eq!(e["Service"]["Port"], Value::from(8080));
        assert_eq!(e["Service"]["Tags"], serde_json::json!(["primary", "v1"]));
        let meta = &e["Service"]["Meta"];
        assert_eq!(meta["task_slot"], Value::from(t.slot.to_string()));
        assert_eq!(meta["registrator_port"], Value::from("8080"));
        assert_eq!(meta["note"], Value::from("grüße ✓"));
    }

    let out = tokio::process::Command::new(consul_bin())
        .args(["catalog", "services", "-http-addr", &consul_endpoint()])
        .output()
        .await
        .expect("consul catalog runs");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == svc),
        "consul catalog services lists {svc}: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Scaled down: the catalog follows.
    docker(&["service", "scale", "--detach", &format!("{svc}=1")]).await;
    wait_for("1 instance in the catalog", CONVERGE, || async {
        let v = consul_get(&format!("/v1/catalog/service/{svc}")).await?;
        match v.as_array() {
            Some(a) if a.len() == 1 => Ok(()),
            _ => Err(v.to_string()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_container_is_critical_in_consul() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, "chealth");
    let name = names.name("web");
    let svc = names.name("websvc");
    let flag = "/tmp/healthy";
    let _bridge =
        BridgeProcess::start(&Backend::Consul.uri(&names), &["--internal", "--cleanup"]).await;
    healthchecked_container(&mut cleanup, &name, &svc, flag).await;
    let status_is = |want: &'static str| {
        let svc = svc.clone();
        async move {
            let v = consul_get(&format!("/v1/health/service/{svc}")).await?;
            let status = v[0]["Checks"]
                .as_array()
                .and_then(|checks| {
                    checks.iter().find(|c| {
                        c["CheckID"]
                            .as_str()
                            .is_some_and(|id| id.starts_with("service:"))
                    })
                })
                .and_then(|c| c["Status"].as_str())
                .unwrap_or("absent")
                .to_string();
            if status == want {
                Ok(())
            } else {
                Err(status)
            }
        }
    };
    wait_for("a passing check", CONVERGE, || status_is("passing")).await;
    docker(&["exec", &name, "rm", flag]).await;
    wait_for("a critical check once unhealthy", CONVERGE, || {
        status_is("critical")
    })
    .await;
    let passing = consul_get(&format!("/v1/health/service/{svc}?passing=true"))
        .await
        .expect("health");
    assert_eq!(passing.as_array().map(Vec::len), Some(0), "{passing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_watch_sees_records_appear_and_go() {
    let (names, mut cleanup, net, svc, _, layout) = scene(Backend::Consul, "cwatch").await;
    let dir = TempDir::new("cwatch");
    let out_path = dir.path().join("watch.out");
    // The handler gets the key prefix's contents as JSON on stdin at every change.
    let handler = format!("cat >> {}", out_path.display());
    let _watch = tokio::process::Command::new(consul_bin())
        .args([
            "watch",
            "-http-addr",
            &consul_endpoint(),
            "-type",
            "keyprefix",
            "-prefix",
            &layout.service_prefix(&svc),
            &handler,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("consul watch runs");
    let mut bridge = BridgeProcess::start(&Backend::Consul.uri(&names), &["--cleanup"]).await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    // The last JSON document consul watch printed.
    let last_seen = || {
        let out_path = out_path.clone();
        async move {
            let text = std::fs::read_to_string(&out_path).map_err(|e| e.to_string())?;
            let last = serde_json::Deserializer::from_str(&text)
                .into_iter::<Value>()
                .filter_map(Result::ok)
                .last()
                .ok_or_else(|| "nothing printed yet".to_string())?;
            Ok::<Value, String>(last)
        }
    };
    let seen = wait_for("consul watch to print both records", CONVERGE, || async {
        let v = last_seen().await?;
        match v.as_array() {
            Some(a) if a.len() == 2 => Ok(a.clone()),
            _ => Err(v.to_string()),
        }
    })
    .await;
    let tasks = task_containers(&svc, &net).await;
    for t in &tasks {
        assert!(
            seen.iter()
                .any(|kv| kv["Key"].as_str() == Some(layout.service_key(&svc, &t.task_id).as_str())),
            "{seen:?}"
        );
    }
    // The bridge stops with --cleanup: its session ends and the records go.
    bridge.signal("TERM").await;
    bridge.wait(Duration::from_secs(10)).await;
    wait_for(
        "consul watch to print the prefix empty",
        CONVERGE,
        || async {
            let v = last_seen().await?;
            if v.is_null() || v.as_array().is_some_and(Vec::is_empty) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_acl_token_is_a_clear_error_naming_its_source() {
    let consul = PrivateConsul::start_with_acl("root-token-for-tests").await;
    let names = Names::new("acl");
    let uri = Backend::Consul.uri_at(&consul.endpoint(), &names);
    let dir = TempDir::new("acl");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "wrong-token-from-file\n").expect("token file");

    // (environment, arguments, the token source the error must name)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<String>, String);
    let cases: Vec<Case> = vec![
        (
            vec![("CONSUL_HTTP_TOKEN", "wrong-token-from-env")],
            vec![],
            "CONSUL_HTTP_TOKEN".to_string(),
        ),
        (
            vec![],
            vec![
                "--consul-token-file".into(),
                token_file.display().to_string(),
            ],
            format!("--consul-token-file {}", token_file.display()),
        ),
    ];
    for (env, args, source) in cases {
        let args: Vec<&str> = std::iter::once(uri.as_str())
            .chain(args.iter().map(String::as_str))
            .collect();
        let (code, stderr) = run_bridge(&args, &env).await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("permission denied"), "{stderr}");
        assert!(stderr.contains(&source), "names {source}: {stderr}");
        assert!(
            !stderr.contains("wrong-token"),
            "the token itself is never logged: {stderr}"
        );
    }
    // The right token works.
    let mut ok =
        BridgeProcess::start_with_env(&uri, &[], &[("CONSUL_HTTP_TOKEN", "root-token-for-tests")])
            .await;
    ok.wait_synced(1, CONVERGE).await;
    ok.signal("TERM").await;
    assert_eq!(ok.wait(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_ttls_below_its_floor_are_refused() {
    let (code, stderr) = run_bridge(&["consul://127.0.0.1:8500/x", "--ttl", "5"], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--ttl 10"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_gets_its_catalog_and_kv_back_without_a_bridge_restart() {
    let mut consul = PrivateConsul::start().await;
    let names = Names::new("crestart");
    let mut cleanup = Cleanup::default();
    let net = names.name("net");
    let svc = names.name("db");
    overlay(&mut cleanup, &net).await;
    service(&mut cleanup, &svc, &net, 2, &[]).await;
    let _bridge = BridgeProcess::start(
        &Backend::Consul.uri_at(&consul.endpoint(), &names),
        &["--ttl", "10", "--resync", "600"],
    )
    .await;
    let endpoint = consul.endpoint();
    let catalog_has = |n: usize| {
        let endpoint = endpoint.clone();
        let svc = svc.clone();
        async move {
            let resp = reqwest::get(format!(
                "http://{endpoint}/v1/health/service/{svc}?passing=true"
            ))
            .await
            .map_err(|e| e.to_string())?;
            let v: Value = resp.json().await.map_err(|e| e.to_string())?;
            match v.as_array() {
                Some(a) if a.len() == n => Ok(()),
                _ => Err(v.to_string()),
            }
        }
    };
    wait_for("2 passing instances", CONVERGE, || catalog_has(2)).await;

    // A dev agent restarts empty: no KV, no session, no services.
    consul.stop().await;
    consul.resume().await;
    let store = Backend::Consul.store_at(&consul.endpoint()).await;
    let layout = names.layout();
    wait_for("the KV records back", CONVERGE, || {
        records_match_tasks(&store, &layout, &svc, &net, 2)
    })
    .await;
    wait_for("the catalog back", CONVERGE, || catalog_has(2)).await;
}
