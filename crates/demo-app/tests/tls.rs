//! The demo app with TLS to MongoDB: the store holds the URI the reconciler publishes for a
//! `requireTLS` set (`...&tls=true`, no file path); `--mongo-tls-ca-file` adds the
//! application's CA and the app writes with `w: majority` and reads back; without it the
//! members' certificate is of an unknown CA and the write fails. Members: the simulator, in
//! process, with certificates made here; the store: the test services' etcd.

use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendUri, Coordinator};
use replset_sim::tls::{Tls, TlsOptions};
use replset_sim::{Cluster, NodeOptions};
use test_support::contract::unique_layout;
use test_support::mongo_tls::MemberPki;

/// Runs the app's binary with `args`; its exit code and output.
fn demo_app(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_replset-demo-app"))
        .args(args)
        .output()
        .expect("the demo app runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_adds_its_ca_file_to_the_published_tls_uri() {
    let pki = MemberPki::generate("demo-app-tls");
    let tls = Tls::load(&TlsOptions {
        allow_connections_without_certificates: true,
        ..TlsOptions::require_tls(pki.member(), pki.ca())
    })
    .expect("the test's certificates load")
    .map(Arc::new);
    let cluster = Cluster::start_with(
        3,
        NodeOptions {
            tls,
            ..NodeOptions::default()
        },
    )
    .await
    .expect("simulated TLS members");
    cluster.initiate().await.expect("initiate");
    cluster
        .wait_for_stable(Duration::from_secs(30))
        .await
        .expect("a primary");

    let endpoint = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let layout = unique_layout("demo-app-tls");
    let backend = format!("etcd://{endpoint}/{}", layout.prefix());
    let store = backend_store::Store::open(
        &BackendUri::parse(&backend).expect("a URI"),
        &backend_store::StoreOptions::default(),
    )
    .await
    .expect("an etcd client");
    let set = cluster.set_name().to_string();
    let uri = format!(
        "mongodb://{}/?replicaSet={set}&tls=true",
        cluster.hosts().join(",")
    );
    store
        .put_value(&layout.replset_uri_key(&set), uri.into_bytes())
        .await
        .expect("put the URI");

    let ca = pki.ca().display().to_string();
    let common = ["--replset", set.as_str(), "--wait", "10s"];
    let with_ca = |cmd: &[&str]| {
        let mut args = vec![backend.as_str(), "--mongo-tls-ca-file", ca.as_str()];
        args.extend(common);
        args.extend(cmd);
        demo_app(&args)
    };
    let (code, text) =
        tokio::task::block_in_place(|| with_ca(&["write", "tls-doc", "--value", "over-tls"]));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = tokio::task::block_in_place(|| with_ca(&["read", "tls-doc"]));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("over-tls"), "{text}");

    // Without its CA file the app does not trust the members.
    let mut args = vec![backend.as_str()];
    args.extend(common);
    args.extend(["write", "no-ca", "--value", "x"]);
    let (code, text) = tokio::task::block_in_place(|| demo_app(&args));
    assert_ne!(code, Some(0), "{text}");
    assert!(
        text.contains("UnknownIssuer"),
        "not a certificate failure: {text}"
    );

    // A CA file that does not exist stops the app at start, naming the flag.
    let (code, text) = tokio::task::block_in_place(|| {
        demo_app(&[
            backend.as_str(),
            "--mongo-tls-ca-file",
            "/nonexistent/ca.pem",
            "read",
            "x",
        ])
    });
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("--mongo-tls-ca-file"), "{text}");
}
