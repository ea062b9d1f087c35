//! The reconciler with TLS to MongoDB (`--mongo-tls-ca-file`): it initiates a set of simulated
//! members that run `--tlsMode requireTLS` (their certificates made here with rcgen, signed by
//! a test CA), against the real etcd of the test services, and publishes a URI with
//! `tls=true` and no file path; an application that adds its own `tlsCAFile` to that URI
//! writes with `w: majority`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendUri, Coordinator, KeyLayout};
use backend_store::StoreOptions;
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::{Members, MongoTls};
use replset_reconciler::records::Selector;
use replset_sim::tls::{Tls, TlsOptions};
use replset_sim::{Cluster, NodeOptions};
use test_support::contract::{mongo_task_record, unique_layout};
use test_support::mongo_tls::MemberPki;
use test_support::wait_for;
use tokio_util::sync::CancellationToken;

const CONVERGE: Duration = Duration::from_secs(60);

/// Members as `mongod --tlsMode requireTLS --tlsCertificateKeyFile member.pem --tlsCAFile
/// ca.pem --tlsAllowConnectionsWithoutCertificates` (the reconciler presents no certificate).
fn tls_members(ca: &Path, member: &Path) -> NodeOptions {
    let tls = Tls::load(&TlsOptions {
        allow_connections_without_certificates: true,
        ..TlsOptions::require_tls(member.to_path_buf(), ca.to_path_buf())
    })
    .expect("the test's certificates load")
    .map(Arc::new);
    NodeOptions {
        tls,
        ..NodeOptions::default()
    }
}

async fn store(layout: &KeyLayout) -> Arc<backend_store::Store> {
    let endpoint = std::env::var("ETCD_ENDPOINTS").unwrap_or_else(|_| "127.0.0.1:2379".into());
    let uri = format!("etcd://{endpoint}/{}", layout.prefix());
    let store = backend_store::Store::open(
        &BackendUri::parse(&uri).expect("a URI"),
        &StoreOptions::default(),
    )
    .await
    .expect("an etcd client");
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_initiates_a_tls_set_and_publishes_tls_true() {
    let pki = MemberPki::generate("reconcile-tls");
    let cluster = Cluster::start_with(3, tls_members(&pki.ca(), &pki.member()))
        .await
        .expect("simulated TLS members");
    let set = cluster.set_name().to_string();
    let layout = unique_layout("reconcile-tls");
    let store = store(&layout).await;
    for (i, host) in cluster.hosts().iter().enumerate() {
        let r = mongo_task_record(i as u64 + 1, host).expect("host:port");
        store
            .put_value(&layout.service_key(&r.service, &r.id), r.to_json())
            .await
            .expect("put a record");
    }

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let config = ControllerConfig {
        layout: layout.clone(),
        selectors: vec![Selector::Service {
            service: "mongo".into(),
            set: set.clone(),
            port: None,
        }],
        removal_grace: Duration::from_secs(2),
        debounce: Duration::from_millis(200),
        resync: Duration::from_secs(2),
        leader_ttl: Duration::from_secs(10),
        holder: "tls-test".into(),
        dry_run: false,
        metrics: Arc::new(replset_reconciler::metrics::Metrics::default()),
        force_after: None,
    };
    let members = Members::new(None).with_tls(Some(MongoTls {
        ca_file: Some(pki.ca()),
    }));
    let controller = Controller::start(store.clone(), Arc::new(members), config, shutdown);
    tokio::spawn(controller.run());

    // The published URI names every member and asks for TLS, with no path of the
    // reconciler's.
    let uri_key = layout.replset_uri_key(&set);
    let uri = wait_for("the published URI", CONVERGE, || async {
        let v = store.get_value(&uri_key).await.map_err(|e| e.to_string())?;
        let uri = String::from_utf8(v.unwrap_or_default()).map_err(|e| e.to_string())?;
        if cluster.hosts().iter().all(|h| uri.contains(h.as_str())) {
            Ok(uri)
        } else {
            Err(uri)
        }
    })
    .await;
    assert!(
        uri.ends_with(&format!("/?replicaSet={set}&tls=true")),
        "{uri}"
    );
    assert!(!uri.contains("tlsCAFile"), "{uri}");
    cluster.wait_for_primary(CONVERGE).await.expect("a primary");

    // The application adds its CA file and writes with w: majority over TLS.
    let app_uri = format!("{uri}&tlsCAFile={}", pki.ca().display());
    let client = mongodb::Client::with_uri_str(&app_uri)
        .await
        .expect("a client");
    let coll = client
        .database("app")
        .collection_with_options::<bson::Document>(
            "docs",
            mongodb::options::CollectionOptions::builder()
                .write_concern(mongodb::options::WriteConcern::majority())
                .build(),
        );
    coll.insert_one(bson::doc! {"_id": 1, "over": "tls"})
        .await
        .expect("a majority write over TLS");
    let got = coll
        .find_one(bson::doc! {"_id": 1})
        .await
        .expect("a read over TLS");
    assert_eq!(
        got.and_then(|d| d.get_str("over").ok().map(String::from)),
        Some("tls".to_string())
    );
}
