//! The bridge's flags that shape what it publishes, each against the real Docker engine and
//! the real stores of the test services: `--explicit`, `--ip`, `--network` (etcd), and
//! `--no-consul-kv`, `--no-consul-catalog`, `--consul-deregister-after` (a private Consul
//! agent, so that no other test's bridge registers the same containers in its catalog).

mod common;

use std::time::Duration;

use backend_core::ServiceRecord;
use common::*;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);

/// Every record under the test's prefix of the container `name`.
async fn records_of(
    store: &Store,
    names: &Names,
    name: &str,
) -> Result<Vec<ServiceRecord>, String> {
    let prefix = names.layout().services_prefix();
    let mut out = Vec::new();
    for (key, value) in store.list(&prefix).await? {
        let r = ServiceRecord::from_json(&value).map_err(|e| format!("{key}: {e}"))?;
        if r.container_name == name {
            out.push(r);
        }
    }
    Ok(out)
}

/// Waits until the container `name` has exactly one record; that record.
async fn one_record(store: &Store, names: &Names, name: &str) -> ServiceRecord {
    wait_for(&format!("one record of {name}"), CONVERGE, || async {
        let mut records = records_of(store, names, name).await?;
        match records.len() {
            1 => Ok(records.remove(0)),
            n => Err(format!("{n} records")),
        }
    })
    .await
}

/// A container of `local/busybox` that sleeps, exposes 8080 and sets no SERVICE_NAME (its
/// service is its image's name), with the `docker run` options `extra`.
async fn unnamed_container(cleanup: &mut Cleanup, name: &str, extra: &[&str]) {
    cleanup.container(name);
    let mut args = vec!["run", "-d", "--name", name, "--expose", "8080"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["local/busybox", "sleep", "86400"]);
    docker(&args).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_publishes_only_the_containers_that_set_a_name() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Etcd, "explicit");
    let named = names.name("named");
    let unnamed = names.name("unnamed");
    let svc = names.name("svc");
    plain_container(&mut cleanup, &named, &svc, &[], &["sleep", "86400"]).await;
    unnamed_container(&mut cleanup, &unnamed, &[]).await;
    let store = Backend::Etcd.store().await;

    // Without the flag both are published, the unnamed one under its image's name.
    let (plain_names, _plain_cleanup) = names_and_cleanup(Backend::Etcd, "explicit-off");
    let bridge = BridgeProcess::start(&Backend::Etcd.uri(&plain_names), &["--internal"]).await;
    let r = one_record(&store, &plain_names, &unnamed).await;
    assert_eq!(r.service, "busybox");
    drop(bridge);

    let bridge = BridgeProcess::start(
        &Backend::Etcd.uri(&names),
        &["--internal", "--explicit", "--resync", "1"],
    )
    .await;
    let r = one_record(&store, &names, &named).await;
    assert_eq!(r.service, svc);
    // Several full syncs later the unnamed one is still not published.
    let syncs = bridge.syncs().await;
    bridge.wait_synced(syncs + 2, CONVERGE).await;
    assert_eq!(
        records_of(&store, &names, &unnamed).await.expect("records"),
        Vec::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_is_the_address_published_for_host_ports() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Etcd, "ipflag");
    let web = names.name("web");
    let svc = names.name("svc");
    let publish = ["-p", "127.0.0.1::8080"];
    plain_container(&mut cleanup, &web, &svc, &publish, &["sleep", "86400"]).await;
    let host_port: u16 = docker(&["port", &web, "8080/tcp"])
        .await
        .lines()
        .next()
        .and_then(|l| l.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .expect("a host port");
    let store = Backend::Etcd.store().await;

    // Without the flag: the binding's own address.
    let (plain_names, _plain_cleanup) = names_and_cleanup(Backend::Etcd, "ipflag-off");
    let bridge = BridgeProcess::start(&Backend::Etcd.uri(&plain_names), &[]).await;
    let r = one_record(&store, &plain_names, &web).await;
    assert_eq!(r.ip.to_string(), "127.0.0.1");
    drop(bridge);

    let _bridge = BridgeProcess::start(&Backend::Etcd.uri(&names), &["--ip", "198.51.100.9"]).await;
    let r = one_record(&store, &names, &web).await;
    assert_eq!(r.ip.to_string(), "198.51.100.9");
    assert_eq!(r.port, host_port, "the host port, not the container's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_picks_the_address_on_that_network() {
    let (names, mut cleanup) = names_and_cleanup(Backend::Etcd, "netflag");
    let (first, second) = (names.name("net1"), names.name("net2"));
    for net in [&first, &second] {
        docker(&["network", "create", net]).await;
        cleanup.network(net);
    }
    let web = names.name("web");
    let svc = names.name("svc");
    plain_container(
        &mut cleanup,
        &web,
        &svc,
        &["--network", &first],
        &["sleep", "86400"],
    )
    .await;
    docker(&["network", "connect", &second, &web]).await;
    let address_on = |net: &str| {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
        let web = web.clone();
        async move { docker(&["inspect", "--format", &format, &web]).await }
    };
    let (on_first, on_second) = (address_on(&first).await, address_on(&second).await);
    assert_ne!(on_first, on_second);
    let store = Backend::Etcd.store().await;
    for (net, want) in [(&first, &on_first), (&second, &on_second)] {
        let (names, _cleanup) = names_and_cleanup(Backend::Etcd, "netflag-run");
        let _bridge = BridgeProcess::start(
            &Backend::Etcd.uri(&names),
            &["--internal", "--network", net],
        )
        .await;
        let r = one_record(&store, &names, &web).await;
        assert_eq!(&r.ip.to_string(), want, "--network {net}");
        assert_eq!(r.port, 8080);
    }
}

/// `GET path` of the Consul agent at `endpoint`, as JSON.
async fn consul_get(endpoint: &str, path: &str) -> Result<Value, String> {
    let url = format!("http://{endpoint}{path}");
    let resp = reqwest::get(&url)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{url}: {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("{url}: {e}: {body}"))
}

/// The instances of `service` in the catalog of the agent at `endpoint`.
async fn catalog(endpoint: &str, service: &str) -> Result<Vec<Value>, String> {
    let v = consul_get(endpoint, &format!("/v1/catalog/service/{service}")).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits (up to `within`) until the catalog of the agent at `endpoint` has `n` instances of
/// `service`.
async fn await_instances(what: &str, endpoint: &str, service: &str, n: usize, within: Duration) {
    wait_for(what, within, || async {
        match catalog(endpoint, service).await?.len() {
            got if got == n => Ok(()),
            got => Err(format!("{got} instances")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_consul_kv_and_no_consul_catalog_each_leave_out_one_of_the_two() {
    let consul = Backend::Consul.private().await;
    let endpoint = consul.endpoint();
    let store = Backend::Consul.store_at(&endpoint).await;
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, "kvcat");
    let web = names.name("web");
    let svc = names.name("svc");
    let publish = ["-p", "127.0.0.1::8080"];
    plain_container(&mut cleanup, &web, &svc, &publish, &["sleep", "86400"]).await;

    // --no-consul-kv: in the catalog, nothing in KV.
    let bridge = BridgeProcess::start(
        &Backend::Consul.uri_at(&endpoint, &names),
        &["--no-consul-kv", "--resync", "1", "--cleanup"],
    )
    .await;
    await_instances("the instance in the catalog", &endpoint, &svc, 1, CONVERGE).await;
    let syncs = bridge.syncs().await;
    bridge.wait_synced(syncs + 2, CONVERGE).await;
    assert_eq!(
        store.keys(&names.layout().services_prefix()).await,
        Vec::<String>::new()
    );
    bridge.signal("TERM").await;
    await_instances(
        "the catalog emptied by --cleanup",
        &endpoint,
        &svc,
        0,
        CONVERGE,
    )
    .await;
    drop(bridge);

    // --no-consul-catalog: the record in KV, nothing in the catalog.
    let (kv_names, _kv_cleanup) = names_and_cleanup(Backend::Consul, "kvcat-kv");
    let bridge = BridgeProcess::start(
        &Backend::Consul.uri_at(&endpoint, &kv_names),
        &["--no-consul-catalog", "--resync", "1"],
    )
    .await;
    let r = one_record(&store, &kv_names, &web).await;
    assert_eq!(r.service, svc);
    let syncs = bridge.syncs().await;
    bridge.wait_synced(syncs + 2, CONVERGE).await;
    assert_eq!(
        catalog(&endpoint, &svc).await.expect("catalog"),
        Vec::<Value>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bridges_services_leave_the_catalog_after_consul_deregister_after() {
    let consul = Backend::Consul.private().await;
    let endpoint = consul.endpoint();
    let (names, mut cleanup) = names_and_cleanup(Backend::Consul, "dereg");
    let web = names.name("web");
    let svc = names.name("svc");
    let publish = ["-p", "127.0.0.1::8080"];
    plain_container(&mut cleanup, &web, &svc, &publish, &["sleep", "86400"]).await;
    let bridge = BridgeProcess::start(
        &Backend::Consul.uri_at(&endpoint, &names),
        &["--ttl", "10", "--consul-deregister-after", "1m"],
    )
    .await;
    await_instances("the instance in the catalog", &endpoint, &svc, 1, CONVERGE).await;
    // Killed: nothing deregisters the service but the agent, once its TTL check has been
    // critical for a minute (the agent reaps every 30 s).
    bridge.signal("KILL").await;
    let killed = std::time::Instant::now();
    let health = format!("/v1/health/checks/{svc}");
    wait_for("the TTL check critical", CONVERGE, || async {
        let checks = consul_get(&endpoint, &health).await?;
        let critical = checks
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["Status"] == "critical"));
        if critical {
            Ok(())
        } else {
            Err(format!("{checks}"))
        }
    })
    .await;
    await_instances(
        "the instance gone from the catalog",
        &endpoint,
        &svc,
        0,
        Duration::from_secs(150),
    )
    .await;
    let took = killed.elapsed();
    eprintln!("[bridge_flags] deregistered {took:.1?} after the bridge was killed");
    assert!(
        took >= Duration::from_secs(60),
        "not before the critical time: {took:?}"
    );
}
