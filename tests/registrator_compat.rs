//! Registrator's features that its users rely on, against the real Docker engine and the real
//! Consul dev agent of the test services (`scripts/services up`): `SERVICE_CHECK_*` health
//! checks that the agent runs, `--tags`, `--use-ip-from-label`, `--ipv6`.
//!
//! The agent runs on the host and the containers on a Docker bridge network, so the checks
//! use what the agent can reach: a port published on 127.0.0.1 (`-p 127.0.0.1::8080`), which
//! is what the bridge publishes for a plain container without `--internal`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const CONVERGE: Duration = Duration::from_secs(60);

/// The statuses of the agent's checks of the service instance `id`, by check id.
async fn agent_checks(id: &str) -> Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Check {
        #[serde(rename = "ServiceID")]
        service_id: String,
        #[serde(rename = "Status")]
        status: String,
    }
    let url = format!("http://{}/v1/agent/checks", consul_endpoint());
    let checks: BTreeMap<String, Check> = reqwest::get(&url)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    Ok(checks
        .into_iter()
        .filter(|(_, c)| c.service_id == id)
        .map(|(k, c)| (k, c.status))
        .collect())
}

/// Waits until the agent's checks of `id` have exactly these statuses.
async fn await_checks(what: &str, id: &str, want: &[(&str, &str)]) {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    wait_for(what, CONVERGE, || async {
        let got = agent_checks(id).await?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await
}

/// The Registrator instance id of a plain container's port on this engine.
async fn plain_id(container: &str, port: u16) -> String {
    let hostname = docker(&["info", "--format", "{{.Name}}"]).await;
    format!("{hostname}:{container}:{port}")
}

/// A container of `local/busybox` that serves HTTP on port 8080 (busybox `httpd`, in the
/// background, so that it can be killed while the container keeps running), published on
/// 127.0.0.1, with the `docker run` options `extra`.
async fn http_container(cleanup: &mut Cleanup, name: &str, service: &str, extra: &[&str]) {
    let mut args = vec!["-p", "127.0.0.1::8080"];
    args.extend_from_slice(extra);
    let serve =
        "mkdir -p /www && echo ok > /www/index.html && httpd -p 8080 -h /www && exec sleep 86400";
    plain_container(cleanup, name, service, &args, &["sh", "-c", serve]).await;
}

/// A bridge on the test's prefix of the shared Consul (a full sync every second) and an
/// [`http_container`] with the options `extra`: the names, the clean-up, the bridge, the
/// container's name, its service and its instance id.
async fn bridge_and_web(
    tag: &str,
    extra: &[&str],
) -> (Names, Cleanup, BridgeProcess, String, String, String) {
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, tag);
    let bridge = BridgeProcess::start(&Backend::Consul.uri(&names), &["--resync", "1"]).await;
    let web = names.name("web");
    let svc = names.name("websvc");
    http_container(&mut cleanup, &web, &svc, extra).await;
    let id = plain_id(&web, 8080).await;
    (names, cleanup, bridge, web, svc, id)
}

#[tokio::test]
async fn service_check_http_is_run_by_the_agent_beside_the_ttl_check() {
    let (names, _cleanup, bridge, web, svc, id) = bridge_and_web(
        "chkhttp",
        &[
            "-e",
            "SERVICE_CHECK_HTTP=/index.html",
            "-e",
            "SERVICE_CHECK_INTERVAL=1s",
            "-e",
            "SERVICE_CHECK_TIMEOUT=1s",
        ],
    )
    .await;
    let ttl_check = format!("service:{id}");
    let own_check = format!("service:{id}:check");
    await_checks(
        "the HTTP check to pass beside the TTL check",
        &id,
        &[(&ttl_check, "passing"), (&own_check, "passing")],
    )
    .await;

    // The server goes; the container keeps running (and Docker has no healthcheck to tell).
    docker(&["exec", &web, "killall", "httpd"]).await;
    await_checks(
        "the HTTP check to become critical while the TTL check passes",
        &id,
        &[(&ttl_check, "passing"), (&own_check, "critical")],
    )
    .await;
    let running = docker(&["inspect", "--format", "{{.State.Running}}", &web]).await;
    assert_eq!(running, "true");

    // The check keys are the check, not attributes: not in the record, not in the meta.
    let store = Backend::Consul.store().await;
    let records = store.records(&names.layout(), &svc).await.expect("records");
    let record = records.get(&id).expect("the container's record");
    assert!(
        record.attrs.keys().all(|k| !k.starts_with("check_")),
        "{record:?}"
    );
    let check = record.check.as_ref().expect("the record has its check");
    assert_eq!(check.source, "SERVICE_CHECK_HTTP");
    drop(bridge);
}

#[tokio::test]
async fn a_malformed_check_value_is_warned_about_once_and_the_service_still_registered() {
    let (_names, _cleanup, bridge, web, _svc, id) = bridge_and_web(
        "chkbad",
        &[
            "-e",
            "SERVICE_CHECK_HTTP=/index.html",
            "--label",
            "SERVICE_CHECK_INTERVAL=every second",
        ],
    )
    .await;
    let ttl_check = format!("service:{id}");
    await_checks(
        "the service registered with its TTL check only",
        &id,
        &[(&ttl_check, "passing")],
    )
    .await;
    // Several full syncs later, the warning has still been given once.
    let syncs = bridge.syncs().await;
    bridge.wait_synced(syncs + 3, CONVERGE).await;
    let log = bridge.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("without its check") && l.contains(&web))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("SERVICE_CHECK_INTERVAL"),
        "{}",
        warnings[0]
    );
    assert_eq!(
        bridge
            .metric("swarm_registrator_checks_left_out_total")
            .await,
        Ok(1.0)
    );
}

/// The record lines of `--dry-run` for the container `name`: `<key> <json>` per record.
fn dry_run_records(stdout: &str, name: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(_, json)| serde_json::from_str::<serde_json::Value>(json).ok())
        .filter(|r| r["container_name"] == name)
        .collect()
}

/// Runs `swarm-registrator <uri> --dry-run <args>` with `env`; its standard output.
async fn dry_run(uri: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_swarm-registrator"))
        .arg(uri)
        .arg("--dry-run")
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("the bridge runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A plain container `<names>-web` that sleeps, with the `docker run` options `extra`; its name.
async fn sleeping_web(names: &Names, cleanup: &mut Cleanup, extra: &[&str]) -> String {
    let web = names.name("web");
    let svc = names.name("websvc");
    plain_container(cleanup, &web, &svc, extra, &["sleep", "86400"]).await;
    web
}

/// The one record of the container `name` that `--dry-run <args>` prints.
async fn dry_run_record(
    uri: &str,
    args: &[&str],
    env: &[(&str, &str)],
    name: &str,
) -> serde_json::Value {
    let out = dry_run(uri, args, env).await;
    let mut records = dry_run_records(&out, name);
    assert_eq!(records.len(), 1, "{out}");
    records.remove(0)
}

#[tokio::test]
async fn tags_and_use_ip_from_label_in_registrator_spelling_and_as_variables() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, "tagsip");
    let labels = [
        "-p",
        "127.0.0.1::8080",
        "-e",
        "SERVICE_TAGS=own",
        "--label",
        "team=blue",
        "--label",
        "com.example.ip=198.51.100.7/24",
    ];
    let web = sleeping_web(&names, &mut cleanup, &labels).await;
    let uri = Backend::Consul.uri(&names);
    let tags = r#"edge,team-{{index .Config.Labels "team"}}"#;
    // Registrator's own spelling, one dash.
    let registrator = ["-tags", tags, "-useIpFromLabel", "com.example.ip"];
    let r = dry_run_record(&uri, &registrator, &[], &web).await;
    assert_eq!(r["tags"], serde_json::json!(["own", "edge", "team-blue"]));
    assert_eq!(r["ip"], "198.51.100.7");
    // The variables.
    let env = [
        ("REGISTRATOR_TAGS", "v2"),
        ("REGISTRATOR_USE_IP_FROM_LABEL", "no.such.label"),
    ];
    let r = dry_run_record(&uri, &[], &env, &web).await;
    assert_eq!(r["tags"], serde_json::json!(["own", "v2"]));
    assert_eq!(
        r["ip"], "127.0.0.1",
        "without the label: the binding's address"
    );
    // A placeholder this program does not fill in is refused at start.
    let (code, stderr) =
        run_bridge(&[uri.as_str(), "--dry-run", "--tags", "{{.Node.ID}}"], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unsupported placeholder"), "{stderr}");
}

#[tokio::test]
async fn ipv6_publishes_the_global_ipv6_address_of_a_dual_stack_network() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, "ipv6");
    let net = names.name("v6");
    // A unique-local /64 per test run.
    let n: u16 = rand::random();
    let subnet = format!("fd00:{n:x}:5eed::/64");
    docker(&["network", "create", "--ipv6", "--subnet", &subnet, &net]).await;
    cleanup.network(&net);
    let web = sleeping_web(&names, &mut cleanup, &["--network", &net]).await;
    let format = format!(
        "{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}} {{{{(index .NetworkSettings.Networks \"{net}\").GlobalIPv6Address}}}}"
    );
    let addresses = docker(&["inspect", "--format", &format, &web]).await;
    let (v4, v6) = addresses.split_once(' ').expect("two addresses");
    assert!(!v6.is_empty(), "the network is dual-stack: {addresses}");
    let uri = Backend::Consul.uri(&names);
    let internal = ["--internal", "--network", net.as_str()];
    let r = dry_run_record(&uri, &internal, &[], &web).await;
    assert_eq!(r["ip"], v4, "IPv4 by default");
    let with_v6 = ["--internal", "--network", net.as_str(), "--ipv6"];
    let r = dry_run_record(&uri, &with_v6, &[], &web).await;
    let ip: std::net::IpAddr = r["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("an address");
    assert_eq!(ip, v6.parse::<std::net::IpAddr>().expect("ipv6"));
}
