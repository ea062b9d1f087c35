//! The least-privilege roles of docs/security.md ("The store: etcd and Consul"), against real
//! stores that each test starts on free loopback ports:
//!
//! - an etcd with TLS only (`--client-cert-auth`, certificates made here with rcgen) and
//!   authentication enabled (a root user, then one user and role per program, made with
//!   etcd-client's auth API);
//! - a Consul agent with ACLs enabled, `default_policy = "deny"`, a master token, and one
//!   policy and token per program made through the ACL API.
//!
//! Each program's store is opened the way the programs open it: their shared store flags
//! (`StoreArgs`) parsed by clap, with the secrets in files. Each is shown to do its work with
//! its role (the bridge: publish under a lease or session, the catalog; the reconciler: watch,
//! campaign, write the set's keys; the application: read its set's URI), and to be refused
//! outside it with an error that names the key and says "permission denied", after which the
//! same client still does what it may.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use backend_core::{
    BackendError, BackendUri, Coordinator, KeyLayout, NodeRecord, Publisher, WatchEvent, Watcher,
};
use backend_store::{Store, StoreArgs};
use clap::Parser;
use common::*;
use etcd_client::{Certificate, ConnectOptions, Identity, Permission, TlsOptions};
use futures::StreamExt;
use test_support::contract::record;
use test_support::pki::Pki;

const TTL: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(30);

/// The backend URI and the store flags, parsed as every program parses them.
#[derive(Debug, Parser)]
struct Flags {
    #[arg(value_parser = backend_store::BackendUriParser)]
    backend: BackendUri,
    #[command(flatten)]
    store: StoreArgs,
}

/// The store that a program given `args` (the URI first) would open.
async fn open(args: &[String]) -> Store {
    let flags =
        Flags::try_parse_from(std::iter::once("program".to_string()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("flags {args:?}: {e}"));
    let options = flags.store.options(&flags.backend).expect("store options");
    Store::open(&flags.backend, &options)
        .await
        .expect("a store client")
}

/// Asserts that `result` is a refusal that names `key` and says "permission denied".
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, BackendError>, key: &str) {
    match result {
        Err(e @ BackendError::Rejected { .. }) => {
            let text = backend_core::error_chain(&e);
            assert!(text.contains(key), "the refusal names {key}: {text}");
            assert!(
                text.to_lowercase().contains("permission denied"),
                "the refusal says permission denied: {text}"
            );
        }
        other => panic!("expected a permission refusal on {key}, got {other:?}"),
    }
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        schema_version: backend_core::SCHEMA_VERSION,
        node_id: id.into(),
        hostname: format!("host-{id}"),
        version: "test".into(),
        started_at: "2026-01-01T00:00:00Z".into(),
        engine_version: None,
    }
}

/// The first event of a watch, within [`WAIT`].
async fn first_event(
    stream: &mut futures::stream::BoxStream<'static, Result<WatchEvent, BackendError>>,
) -> Result<WatchEvent, BackendError> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a watch event in time")
        .expect("the watch goes on")
}

// ---------------------------------------------------------------------------------------------
// The roles, the same in both stores

/// The programs whose roles are tested.
#[derive(Debug, Clone, Copy)]
enum Program {
    Bridge,
    Reconciler,
    /// An application of the set `rs0`.
    App,
}

impl Program {
    /// The name of its etcd role and user, and of its Consul policy (those of docs/security.md).
    fn role(self) -> &'static str {
        match self {
            Program::Bridge => "registrator-bridge",
            Program::Reconciler => "registrator-reconciler",
            Program::App => "registrator-app-rs0",
        }
    }
}

/// A store a test started with authentication, as the roles' scenarios see it.
trait SecuredStore {
    /// Whether a listing of keys the client may not read is hidden (Consul filters a recursive
    /// read) rather than refused (etcd).
    const HIDES_LISTINGS: bool;
    fn layout(&self) -> KeyLayout {
        KeyLayout::new(PREFIX)
    }
    /// The store of the program whose role is `role`, opened with its own credentials.
    async fn store_of_role(&self, role: &str) -> Store;
    /// The store of `program`.
    async fn store_of(&self, program: Program) -> Store {
        self.store_of_role(program.role()).await
    }
    /// The keys under `prefix`, sorted, read with full rights.
    async fn keys(&self, prefix: &str) -> Vec<String>;
    /// Whether someone leads the election of `key`.
    async fn leader_held(&self, key: &str) -> bool;
}

/// One test per `$name => $scenario`: a fresh store from `$start`, the scenario run on it.
macro_rules! role_tests {
    ($start:expr; $($name:ident => $scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $start.await;
                $scenario(&store).await;
            }
        )*
    };
}

/// The key prefix of the roles in both stores.
const PREFIX: &str = "sa";

/// The service of the records in the scenarios.
const SERVICE: &str = "sadb";

/// The bridge publishes two records and its node record under its session, and is refused
/// the reconciler's keys, then goes on publishing. Returns it with its session open.
async fn publishes_as_a_bridge_and_nothing_else<S: SecuredStore>(s: &S) -> Store {
    let layout = s.layout();
    let bridge = s.store_of(Program::Bridge).await;
    bridge.open_session(TTL).await.expect("a session");
    bridge
        .publish(&[record(SERVICE, "t1"), record(SERVICE, "t2")])
        .await
        .expect("publish");
    bridge.publish_node(&node("n1")).await.expect("node record");
    bridge.renew_session().await.expect("renew");
    assert_eq!(bridge.list_services().await.expect("list").len(), 2);
    assert_eq!(
        s.keys(&format!("{}/", layout.prefix())).await,
        vec![
            layout.node_key("n1"),
            layout.service_key(SERVICE, "t1"),
            layout.service_key(SERVICE, "t2"),
        ]
    );

    let uri_key = layout.replset_uri_key("rs0");
    refused(
        bridge.put_value(&uri_key, b"mongodb://x".to_vec()).await,
        &uri_key,
    );
    refused(bridge.get_value(&uri_key).await, &uri_key);
    let leader = layout.replset_leader_key("rs0");
    refused(
        bridge.campaign(leader.clone(), "bridge".into(), TTL).await,
        &leader,
    );

    bridge
        .publish(&[record(SERVICE, "t3")])
        .await
        .expect("publish after a refusal");
    bridge
        .unpublish(&[backend_core::ServiceKey {
            service: SERVICE.into(),
            id: "t3".into(),
        }])
        .await
        .expect("unpublish");
    bridge
}

/// The bridge ends its session: its records go with it.
async fn its_records_go_with_its_session<S: SecuredStore>(s: &S, bridge: Store) {
    bridge.close_session(true).await.expect("end the session");
    let prefix = format!("{}/", s.layout().prefix());
    wait_for("the records to go with the session", WAIT, || async {
        let keys = s.keys(&prefix).await;
        if keys.is_empty() {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await;
}

/// A bridge that has published the record `t1` under its session.
async fn a_bridge_with_one_record<S: SecuredStore>(s: &S) -> Store {
    let bridge = s.store_of(Program::Bridge).await;
    bridge.open_session(TTL).await.expect("a session");
    bridge
        .publish(&[record(SERVICE, "t1")])
        .await
        .expect("publish");
    bridge
}

/// The reconciler watches the records, leads its set, writes the set's keys, and is refused
/// the bridges' keys, after which its watch and its writes go on.
async fn reconciles_and_nothing_else<S: SecuredStore>(s: &S) {
    let layout = s.layout();
    let bridge = a_bridge_with_one_record(s).await;

    let reconciler = s.store_of(Program::Reconciler).await;
    let mut watch = reconciler.watch_prefix(layout.services_prefix());
    match first_event(&mut watch).await {
        Ok(WatchEvent::Restarted(entries)) => assert_eq!(entries.len(), 1, "{entries:?}"),
        other => panic!("the listing of services/: {other:?}"),
    }
    let published = |id: &'static str| {
        let bridge = &bridge;
        async move {
            bridge
                .publish(&[record(SERVICE, id)])
                .await
                .expect("publish");
        }
    };
    published("t2").await;
    match first_event(&mut watch).await {
        Ok(WatchEvent::Put(e)) => assert_eq!(e.key, layout.service_key(SERVICE, "t2")),
        other => panic!("the new record: {other:?}"),
    }

    let leader_key = layout.replset_leader_key("rs0");
    let leadership = tokio::time::timeout(
        WAIT,
        reconciler.campaign(leader_key.clone(), "reconciler-a".into(), TTL),
    )
    .await
    .expect("elected in time")
    .expect("elected");
    assert!(s.leader_held(&leader_key).await, "it leads {leader_key}");
    for key in [
        layout.replset_uri_key("rs0"),
        layout.replset_status_key("rs0"),
        layout.replset_identity_key("rs0"),
    ] {
        reconciler
            .put_value(&key, b"value".to_vec())
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        assert_eq!(
            reconciler.get_value(&key).await.expect("read back"),
            Some(b"value".to_vec())
        );
    }

    // A lease or session it may have: what it may write with it is the question.
    reconciler.open_session(TTL).await.expect("a session");
    let record_key = layout.service_key(SERVICE, "forged");
    refused(
        reconciler.publish(&[record(SERVICE, "forged")]).await,
        &record_key,
    );
    let node_key = layout.node_key("n1");
    refused(
        reconciler.put_value(&node_key, b"{}".to_vec()).await,
        &node_key,
    );
    let bridges_record = layout.service_key(SERVICE, "t1");
    refused(
        reconciler.delete_value(&bridges_record).await,
        &bridges_record,
    );

    published("t3").await;
    match first_event(&mut watch).await {
        Ok(WatchEvent::Put(e)) => assert_eq!(e.key, layout.service_key(SERVICE, "t3")),
        other => panic!("the record after the refusals: {other:?}"),
    }
    let status = layout.replset_status_key("rs0");
    reconciler
        .put_value(&status, b"after".to_vec())
        .await
        .expect("status after the refusals");
    leadership.resign().await;
    assert!(!s.leader_held(&leader_key).await, "resigned {leader_key}");
}

/// The application reads its set's URI and nothing else, and still reads it after refusals.
async fn reads_its_uri_and_nothing_else<S: SecuredStore>(s: &S) {
    let layout = s.layout();
    let reconciler = s.store_of(Program::Reconciler).await;
    let uri = b"mongodb://10.0.0.1:27017,10.0.0.2:27017/?replicaSet=rs0".to_vec();
    let uri_key = layout.replset_uri_key("rs0");
    let status_key = layout.replset_status_key("rs0");
    let other_set = layout.replset_uri_key("rs1");
    for key in [&uri_key, &status_key, &other_set] {
        reconciler.put_value(key, uri.clone()).await.expect("put");
    }
    // Held, so that its session and the record stay.
    let _bridge = a_bridge_with_one_record(s).await;

    let app = s.store_of(Program::App).await;
    assert_eq!(
        app.get_value(&uri_key).await.expect("its URI"),
        Some(uri.clone())
    );
    refused(app.get_value(&status_key).await, &status_key);
    refused(app.get_value(&other_set).await, &other_set);
    refused(
        app.put_value(&uri_key, b"mongodb://evil".to_vec()).await,
        &uri_key,
    );
    let record_key = layout.service_key(SERVICE, "t1");
    refused(app.get_value(&record_key).await, &record_key);
    let mut watch = app.watch_prefix(layout.services_prefix());
    let listing = first_event(&mut watch).await;
    if S::HIDES_LISTINGS {
        // Consul filters a recursive read to what the token may read (unless the agent sets
        // acl.enable_key_list_policy): the records stay hidden.
        match listing {
            Ok(WatchEvent::Restarted(entries)) => assert_eq!(entries, vec![], "hidden"),
            other => panic!("a filtered listing: {other:?}"),
        }
    } else {
        refused(listing, &layout.services_prefix());
    }
    drop(watch);
    assert_eq!(app.get_value(&uri_key).await.expect("its URI"), Some(uri));
}

// ---------------------------------------------------------------------------------------------
// etcd

/// The roles of docs/security.md for `prefix`: (role, permissions).
fn etcd_roles(prefix: &str) -> Vec<(&'static str, Vec<Permission>)> {
    vec![
        (
            "registrator-bridge",
            vec![
                Permission::read_write(format!("{prefix}/services/")).with_prefix(),
                // Nobody reads the node records back: the bridge writes its own only.
                Permission::write(format!("{prefix}/nodes/")).with_prefix(),
            ],
        ),
        (
            "registrator-reconciler",
            vec![
                Permission::read(format!("{prefix}/services/")).with_prefix(),
                Permission::read_write(format!("{prefix}/replsets/")).with_prefix(),
            ],
        ),
        (
            "registrator-app-rs0",
            vec![Permission::read(format!("{prefix}/replsets/rs0/uri"))],
        ),
    ]
}

/// A private etcd serving clients over TLS only, requiring client certificates, with
/// authentication enabled; the users `bridge`, `reconciler` and `app` hold the roles of
/// [`etcd_roles`] under [`PREFIX`]. Killed when dropped.
struct SecureEtcd {
    port: u16,
    pki: Pki,
    dir: TempDir,
    _child: tokio::process::Child,
}

impl SecureEtcd {
    const ROOT_PASSWORD: &'static str = "root-password-for-tests";

    async fn start() -> SecureEtcd {
        SecureEtcd::start_with(&[]).await
    }

    /// [`SecureEtcd::start`] with more etcd flags.
    async fn start_with(extra: &[&str]) -> SecureEtcd {
        let pki = Pki::generate();
        let dir = TempDir::new("etcd-auth");
        let (port, peer) = (free_port(), free_port());
        let client_url = format!("https://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut command = tokio::process::Command::new(bin);
        command
            .args(["--name", "auth", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("auth={peer_url}")])
            .arg("--cert-file")
            .arg(&pki.server_cert)
            .arg("--key-file")
            .arg(&pki.server_key)
            .arg("--trusted-ca-file")
            .arg(&pki.ca)
            .arg("--client-cert-auth")
            .args(extra);
        let log = dir.path().join("etcd.log");
        let child = test_support::spawn_logged(&mut command, &log, "etcd (ETCD_BIN)");
        let etcd = SecureEtcd {
            port,
            pki,
            dir,
            _child: child,
        };
        let mut admin = wait_for("the TLS etcd to answer", WAIT, || async {
            let mut c = etcd.client(None).await?;
            c.get("probe", None).await.map_err(|e| e.to_string())?;
            Ok(c)
        })
        .await;
        // etcd enables authentication only with a root user holding the root role.
        admin
            .user_add("root", SecureEtcd::ROOT_PASSWORD, None)
            .await
            .expect("user add root");
        admin.role_add("root").await.expect("role add root");
        admin
            .user_grant_role("root", "root")
            .await
            .expect("grant root");
        admin.auth_enable().await.expect("auth enable");
        let mut root = etcd.root().await;
        for (role, permissions) in etcd_roles(PREFIX) {
            root.role_add(role).await.expect("role add");
            for p in permissions {
                root.role_grant_permission(role, p)
                    .await
                    .expect("grant permission");
            }
        }
        for (user, role) in
            [Program::Bridge, Program::Reconciler, Program::App].map(|p| (p.role(), p.role()))
        {
            root.user_add(user, etcd.password(user), None)
                .await
                .expect("user add");
            root.user_grant_role(user, role).await.expect("grant role");
        }
        etcd
    }

    /// The password of `user`, made up for this etcd.
    fn password(&self, user: &str) -> String {
        format!("{user}-password-{}", self.port)
    }

    /// A client of the test's own over TLS (as root's certificate), logged in as `user`.
    async fn client(&self, user: Option<(&str, &str)>) -> Result<etcd_client::Client, String> {
        let read = |p: &PathBuf| std::fs::read(p).expect("a PEM file");
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.pki.ca)))
            .identity(Identity::from_pem(
                read(&self.pki.client_cert),
                read(&self.pki.client_key),
            ));
        let mut options = ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(Duration::from_secs(5));
        if let Some((name, password)) = user {
            options = options.with_user(name, password);
        }
        etcd_client::Client::connect([format!("https://127.0.0.1:{}", self.port)], Some(options))
            .await
            .map_err(|e| e.to_string())
    }

    async fn root(&self) -> etcd_client::Client {
        self.client(Some(("root", SecureEtcd::ROOT_PASSWORD)))
            .await
            .expect("root client")
    }

    /// The flags of a program that is `user`: the URI, the CA, a client certificate of its
    /// own, the user and its password file.
    fn flags(&self, user: &str, password: &str) -> Vec<String> {
        let (cert, key) = self.pki.client(user);
        let password_file = self.dir.path().join(format!("{user}-password"));
        std::fs::write(&password_file, format!("{password}\n")).expect("password file");
        let s = |p: &PathBuf| p.display().to_string();
        vec![
            format!("etcd+https://127.0.0.1:{}/{}", self.port, PREFIX),
            "--etcd-ca-file".into(),
            s(&self.pki.ca),
            "--etcd-client-cert".into(),
            s(&cert),
            "--etcd-client-key".into(),
            s(&key),
            "--etcd-username".into(),
            user.into(),
            "--etcd-password-file".into(),
            s(&password_file),
        ]
    }

    /// The store of the program that is `user`, with its right password.
    async fn store_of_user(&self, user: &str) -> Store {
        open(&self.flags(user, &self.password(user))).await
    }

    /// The keys under `prefix`, read as root, with their leases.
    async fn keys_with_leases(&self, prefix: &str) -> Vec<(String, i64)> {
        let resp = self
            .root()
            .await
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .expect("get as root");
        resp.kvs()
            .iter()
            .map(|kv| (kv.key_str().expect("UTF-8").to_string(), kv.lease()))
            .collect()
    }
}

impl SecuredStore for SecureEtcd {
    const HIDES_LISTINGS: bool = false;

    async fn store_of_role(&self, role: &str) -> Store {
        self.store_of_user(role).await
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        let keys = self.keys_with_leases(prefix).await;
        keys.into_iter().map(|(k, _)| k).collect()
    }

    /// etcd's election keys are `<key>/<lease>`, one a candidate.
    async fn leader_held(&self, key: &str) -> bool {
        !self.keys(&format!("{key}/")).await.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_bridge_role_publishes_under_its_lease_and_nothing_else() {
    let etcd = SecureEtcd::start().await;
    let bridge = publishes_as_a_bridge_and_nothing_else(&etcd).await;
    let keys = etcd
        .keys_with_leases(&format!("{}/", etcd.layout().prefix()))
        .await;
    assert!(
        keys.iter().all(|(_, lease)| *lease != 0),
        "every record is tied to the bridge's lease: {keys:?}"
    );
    its_records_go_with_its_session(&etcd, bridge).await;
}

role_tests!(SecureEtcd::start();
    etcd_reconciler_role_watches_leads_and_writes_its_sets_keys_only => reconciles_and_nothing_else,
    etcd_application_role_reads_its_sets_uri_only => reads_its_uri_and_nothing_else,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_an_expired_token_is_renewed_without_the_program_noticing() {
    // etcd forgets a simple token that has not been used for --auth-token-ttl.
    let ttl = Duration::from_secs(1);
    let etcd = SecureEtcd::start_with(&["--auth-token-ttl", "1"]).await;
    let layout = etcd.layout();
    let bridge = etcd.store_of(Program::Bridge).await;
    let reconciler = etcd.store_of(Program::Reconciler).await;
    bridge.open_session(TTL).await.expect("a lease");
    let uri_key = layout.replset_uri_key("rs0");
    reconciler
        .put_value(&uri_key, b"u".to_vec())
        .await
        .expect("put");
    for round in 0..2 {
        // Nothing to wait for but time: the tokens must be left unused past their TTL.
        tokio::time::sleep(ttl * 3).await;
        bridge
            .publish(&[record(SERVICE, "t1")])
            .await
            .unwrap_or_else(|e| panic!("round {round}: publish with an expired token: {e}"));
        bridge.renew_session().await.expect("renew");
        assert_eq!(
            reconciler.get_value(&uri_key).await.expect("get"),
            Some(b"u".to_vec())
        );
        let leadership = reconciler
            .campaign(layout.replset_leader_key("rs0"), "r".into(), TTL)
            .await
            .unwrap_or_else(|e| panic!("round {round}: campaign with an expired token: {e}"));
        leadership.resign().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_wrong_password_or_no_client_certificate_is_a_clear_error() {
    let etcd = SecureEtcd::start().await;
    let key = etcd.layout().replset_uri_key("rs0");

    let wrong = "not-the-app-password";
    let user = Program::App.role();
    let flags = etcd.flags(user, wrong);
    let password_file = flags.last().expect("the password file").clone();
    let app = open(&flags).await;
    let err = app.get_value(&key).await.expect_err("a wrong password");
    let text = backend_core::error_chain(&err);
    assert!(
        !err.is_transient(),
        "retrying cannot fix a password: {text}"
    );
    assert!(
        text.contains(&format!("{user:?}")),
        "names the user: {text}"
    );
    assert!(
        text.contains(&password_file),
        "names the password file: {text}"
    );
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(wrong), "never the password: {text}");
    assert!(!format!("{app:?} {err:?}").contains(wrong), "nor in Debug");

    // The CA, the user and the password, but no client certificate: etcd closes the
    // connection once the handshake is done (TLS 1.3), which looks like an outage to the client
    // and is retried like one; the error says what to check.
    let flags: Vec<String> = etcd.flags(user, &etcd.password(user));
    let mut without_cert = vec![flags[0].clone()];
    for pair in flags[1..].chunks(2) {
        if !pair[0].starts_with("--etcd-client-") {
            without_cert.extend_from_slice(pair);
        }
    }
    let app = open(&without_cert).await;
    let err = app
        .get_value(&key)
        .await
        .expect_err("no client certificate");
    let text = backend_core::error_chain(&err);
    assert!(
        text.contains("https://127.0.0.1:"),
        "names the TLS endpoint: {text}"
    );
    assert!(
        text.contains("--etcd-client-cert"),
        "says what to check: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Consul

/// The policies of docs/security.md for `prefix`: (name, rules).
fn consul_policies(prefix: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "registrator-bridge",
            format!(
                r#"key_prefix "{prefix}/services/" {{ policy = "write" }}
key_prefix "{prefix}/nodes/" {{ policy = "write" }}
session_prefix "" {{ policy = "write" }}
service_prefix "" {{ policy = "write" }}"#
            ),
        ),
        (
            "registrator-reconciler",
            format!(
                r#"key_prefix "{prefix}/services/" {{ policy = "read" }}
key_prefix "{prefix}/replsets/" {{ policy = "write" }}
session_prefix "" {{ policy = "write" }}"#
            ),
        ),
        (
            "registrator-app-rs0",
            format!(r#"key "{prefix}/replsets/rs0/uri" {{ policy = "read" }}"#),
        ),
    ]
}

/// A private Consul agent with ACLs in default-deny, and a token per program of
/// [`consul_policies`] under [`PREFIX`]. Killed when dropped.
struct AclConsul {
    consul: PrivateConsul,
    http: reqwest::Client,
    dir: TempDir,
}

impl AclConsul {
    const MASTER: &'static str = "master-token-for-store-auth";

    async fn start() -> AclConsul {
        let consul = PrivateConsul::start_with_acl(AclConsul::MASTER).await;
        let acl = AclConsul {
            consul,
            http: reqwest::Client::new(),
            dir: TempDir::new("consul-acl"),
        };
        for (name, rules) in consul_policies(PREFIX) {
            acl.master_put(
                "/v1/acl/policy",
                serde_json::json!({"Name": name, "Rules": rules}),
            )
            .await;
        }
        acl
    }

    /// A PUT with the master token; the JSON answer of a 2xx.
    async fn master_put(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        let resp = self
            .http
            .put(format!("http://{}{path}", self.consul.endpoint()))
            .header("X-Consul-Token", AclConsul::MASTER)
            .json(&body)
            .send()
            .await
            .expect("the ACL API answers");
        let status = resp.status();
        let text = resp.text().await.expect("a body");
        assert!(status.is_success(), "PUT {path} {body}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// A GET with the master token; the JSON answer (null for a 404).
    async fn master_get(&self, path: &str) -> serde_json::Value {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.consul.endpoint()))
            .header("X-Consul-Token", AclConsul::MASTER)
            .send()
            .await
            .expect("the agent answers");
        resp.json().await.unwrap_or(serde_json::Value::Null)
    }

    /// The store of a program holding a new token of `policy`, given in a token file.
    async fn store_with_policy(&self, policy: &str) -> Store {
        open(&self.flags(policy).await).await
    }

    /// The flags of a program holding a new token of `policy`: the URI and the token file.
    async fn flags(&self, policy: &str) -> Vec<String> {
        let token = self
            .master_put(
                "/v1/acl/token",
                serde_json::json!({"Description": policy, "Policies": [{"Name": policy}]}),
            )
            .await;
        let secret = token["SecretID"].as_str().expect("a SecretID");
        let file = self.dir.path().join(format!("{policy}-token"));
        std::fs::write(&file, format!("{secret}\n")).expect("token file");
        vec![
            format!("consul://{}/{}", self.consul.endpoint(), PREFIX),
            "--consul-token-file".into(),
            file.display().to_string(),
        ]
    }
}

impl SecuredStore for AclConsul {
    const HIDES_LISTINGS: bool = true;

    async fn store_of_role(&self, role: &str) -> Store {
        self.store_with_policy(role).await
    }

    /// The lock's key is held by a session.
    async fn leader_held(&self, key: &str) -> bool {
        let held = self.master_get(&format!("/v1/kv/{key}")).await;
        !held[0]["Session"].is_null()
    }

    /// The keys under `prefix`, read with the master token.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let v = self.master_get(&format!("/v1/kv/{prefix}?keys=true")).await;
        let mut keys: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_bridge_policy_publishes_kv_and_catalog_and_nothing_else() {
    let consul = AclConsul::start().await;
    let bridge = publishes_as_a_bridge_and_nothing_else(&consul).await;
    let services = consul.master_get("/v1/agent/services").await;
    assert!(
        services["t1"]["Service"] == SERVICE && services["t2"]["Service"] == SERVICE,
        "both in the catalog: {services}"
    );
    its_records_go_with_its_session(&consul, bridge).await;
}

role_tests!(AclConsul::start();
    consul_reconciler_policy_watches_leads_and_writes_its_sets_keys_only => reconciles_and_nothing_else,
    consul_application_policy_reads_its_sets_uri_only => reads_its_uri_and_nothing_else,
);

// ---------------------------------------------------------------------------------------------
// The bridge program itself, with its role's flags

/// Runs the bridge binary with `flags` (the URI first) and `--internal`, next to a plain
/// container of its own, until `published(service)` finds the container's record (and its
/// node record) in the store; then stops it gracefully and returns its log.
async fn bridge_publishes_a_container<F, Fut>(flags: &[String], tag: &str, published: F) -> String
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let names = Names::new(tag);
    let mut cleanup = Cleanup::default();
    let svc = names.name("web");
    let container = names.name("c");
    plain_container(&mut cleanup, &container, &svc, &[], &["sleep", "86400"]).await;
    let args: Vec<&str> = std::iter::once("--internal")
        .chain(flags[1..].iter().map(String::as_str))
        .collect();
    let mut bridge = BridgeProcess::start_with_env(&flags[0], &args, &[]).await;
    wait_for("the bridge's records in the store", WAIT, || {
        let check = published(svc.clone());
        let bridge = &bridge;
        async move {
            check
                .await
                .map_err(|e| format!("{e}; bridge log: {}", bridge.log_text()))
        }
    })
    .await;
    bridge.signal("TERM").await;
    assert_eq!(bridge.wait(Duration::from_secs(10)).await, Some(0));
    bridge.log_text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_publishes_into_a_secured_etcd_with_its_flags() {
    let etcd = SecureEtcd::start().await;
    let layout = etcd.layout();
    let user = Program::Bridge.role();
    let flags = etcd.flags(user, &etcd.password(user));
    let log = bridge_publishes_a_container(&flags, "sauth", |svc| {
        let (etcd, layout) = (&etcd, &layout);
        async move {
            let records = etcd.keys_with_leases(&layout.service_prefix(&svc)).await;
            let nodes = etcd.keys_with_leases(&layout.nodes_prefix()).await;
            match (records.as_slice(), nodes.as_slice()) {
                // Both under the bridge's lease.
                ([(_, a)], [(_, b)]) if *a != 0 && *b != 0 => Ok(()),
                _ => Err(format!("records {records:?}, nodes {nodes:?}")),
            }
        }
    })
    .await;
    assert!(
        !log.contains(&etcd.password(user)),
        "never the password: {log}"
    );
    assert!(log.contains("logged in to etcd"), "{log}");

    // With a wrong password it stops at once, naming the user and the file, not the password.
    let wrong = etcd.flags(user, "a-wrong-password");
    let mut args = wrong.clone();
    args.extend(["--retry-attempts".into(), "1".into()]);
    let (code, stderr) = run_bridge(&args, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("authentication failed"), "{stderr}");
    // (The log line quotes the error, so the user's name is in escaped quotes.)
    assert!(
        stderr.contains(&format!(r#"as user \"{user}\""#)),
        "names the user: {stderr}"
    );
    assert!(
        stderr.contains(wrong.last().expect("file")),
        "names the file: {stderr}"
    );
    assert!(
        !stderr.contains("a-wrong-password"),
        "never the password: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_publishes_into_an_acl_consul_with_its_policys_token() {
    let consul = AclConsul::start().await;
    let layout = consul.layout();
    let flags = consul.flags(Program::Bridge.role()).await;
    let log = bridge_publishes_a_container(&flags, "sauthc", |svc| {
        let (consul, layout) = (&consul, &layout);
        async move {
            let records = consul.keys(&layout.service_prefix(&svc)).await;
            let nodes = consul.keys(&layout.nodes_prefix()).await;
            let catalog = consul
                .master_get(&format!("/v1/catalog/service/{svc}"))
                .await;
            match (records.len(), nodes.len(), catalog.as_array().map(Vec::len)) {
                (1, 1, Some(1)) => Ok(()),
                _ => Err(format!(
                    "records {records:?}, nodes {nodes:?}, catalog {catalog}"
                )),
            }
        }
    })
    .await;
    assert!(
        !log.to_lowercase().contains("permission denied"),
        "nothing was refused: {log}"
    );
}
