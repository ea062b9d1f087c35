//! TLS (`--tlsMode requireTLS`), with clients nobody here wrote: the Rust `mongodb` driver,
//! pymongo and mongosh reach a set of three `replset-sim` processes with `tls=true` and
//! `tlsCAFile`, write with `w: majority` and read back. A plain-text client is refused the
//! way mongod refuses it (the connection closes without an answer), a client without a
//! certificate is refused where the server wants one, a member whose certificate comes from
//! another CA cannot join, the healthcheck probe works over TLS, and bad certificate files stop
//! the member at start. Every certificate is made here, with rcgen.
//!
//! mongosh is `$REPLSET_SIM_NODE_MODULES/.bin/mongosh` (scripts/node-clients installs it),
//! pymongo `$REPLSET_SIM_PYTHON` (scripts/test makes the venv); without them the test fails and
//! says so.

mod common;

use bson::{doc, Bson, Document};
use common::{free_port, output_text, pymongo_python, rand_suffix, BoxError, TempDir, TestResult};
use mongodb::options::{ClientOptions, WriteConcern};
use mongodb::Client;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// A test CA and the certificates it signs, as PEM files in a temporary directory.
struct Ca {
    dir: TempDir,
    name: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Result<Ca, BoxError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("replset-sim test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let ca = Ca {
            dir: TempDir::new(&format!("tls-{name}"))?,
            name: name.to_string(),
            cert,
            key,
        };
        std::fs::write(ca.ca_file(), ca.cert.pem())?;
        Ok(ca)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// One PEM with a certificate and its key (`--tlsCertificateKeyFile`, the drivers'
    /// `tlsCertificateKeyFile`): a member's is made out to 127.0.0.1 and localhost and serves
    /// both ends; a client's is a client's only.
    fn issue(&self, file: &str, member: bool) -> Result<PathBuf, BoxError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{file}.{}", self.name));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if member {
            params.subject_alt_names = vec![
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanType::DnsName("localhost".try_into()?),
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let path = self.dir.path().join(format!("{file}.pem"));
        std::fs::write(&path, format!("{}{}", cert.pem(), key.serialize_pem()))?;
        Ok(path)
    }
}

/// `--tlsMode requireTLS` with `pem` and the CA's file.
fn tls_args(ca: &Ca, pem: &Path) -> Vec<String> {
    vec![
        "--tlsMode".into(),
        "requireTLS".into(),
        "--tlsCertificateKeyFile".into(),
        pem.display().to_string(),
        "--tlsCAFile".into(),
        ca.ca_file().display().to_string(),
    ]
}

/// A `replset-sim` process on `port`, its logs in the test's output, killed when dropped.
fn member(port: u16, set: &str, args: &[String]) -> Result<Child, BoxError> {
    Ok(Command::new(env!("CARGO_BIN_EXE_replset-sim"))
        .args(["--port", &port.to_string(), "--replSet", set])
        .args([
            "--sim-heartbeat-ms",
            "200",
            "--sim-election-timeout-ms",
            "1000",
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

/// The URI of a TLS client trusting `ca`: `?tls=true&tlsCAFile=...` and `extra`.
fn tls_uri(hosts: &[String], ca: &Ca, extra: &str) -> String {
    format!(
        "mongodb://{}/?tls=true&tlsCAFile={}{extra}",
        hosts.join(","),
        ca.ca_file().display()
    )
}

/// `&tlsCertificateKeyFile=PATH`, or nothing.
fn cert_param(cert: Option<&Path>) -> String {
    cert.map(|p| format!("&tlsCertificateKeyFile={}", p.display()))
        .unwrap_or_default()
}

/// A driver client with short timeouts, for `uri`.
async fn client(uri: &str) -> Result<Client, BoxError> {
    let mut opts = ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(5));
    opts.connect_timeout = Some(Duration::from_secs(5));
    opts.heartbeat_freq = Some(Duration::from_millis(500));
    Ok(Client::with_options(opts)?)
}

/// Three TLS members, initiated through a TLS client, with a primary.
struct TlsSet {
    ca: Ca,
    set: String,
    hosts: Vec<String>,
    /// The certificate a client presents, when the members want one.
    client_cert: Option<PathBuf>,
    _members: Vec<Child>,
}

impl TlsSet {
    /// `anonymous_clients`: `--tlsAllowConnectionsWithoutCertificates`, and clients present no
    /// certificate; else every client presents one of the CA.
    async fn start(anonymous_clients: bool) -> Result<TlsSet, BoxError> {
        common::init_tracing();
        let ca = Ca::new("main")?;
        let set = format!("tls{}", rand_suffix() % 100_000);
        let mut hosts = Vec::new();
        let mut members = Vec::new();
        for i in 0..3 {
            let port = free_port()?;
            let mut args = tls_args(&ca, &ca.issue(&format!("member{i}"), true)?);
            if anonymous_clients {
                args.push("--tlsAllowConnectionsWithoutCertificates".into());
            }
            members.push(member(port, &set, &args)?);
            hosts.push(format!("127.0.0.1:{port}"));
        }
        let client_cert = if anonymous_clients {
            None
        } else {
            Some(ca.issue("admin", false)?)
        };
        let cert_param = cert_param(client_cert.as_deref());
        let first = client(&tls_uri(
            &hosts[..1],
            &ca,
            &format!("&directConnection=true{cert_param}"),
        ))
        .await?;
        let config: Vec<Bson> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Bson::Document(doc! {"_id": i as i32, "host": h}))
            .collect();
        let initiate = doc! {"replSetInitiate": {"_id": &set, "members": config}};
        common::eventually("replSetInitiate over TLS", || {
            let (first, initiate) = (first.clone(), initiate.clone());
            async move {
                first.database("admin").run_command(initiate).await?;
                Ok(())
            }
        })
        .await?;
        let tls_set = TlsSet {
            ca,
            set,
            hosts,
            client_cert,
            _members: members,
        };
        tls_set.wait_for_secondaries(3).await?;
        Ok(tls_set)
    }

    /// The set's URI for a client that trusts the CA.
    fn uri(&self) -> String {
        let cert = cert_param(self.client_cert.as_deref());
        tls_uri(
            &self.hosts,
            &self.ca,
            &format!("&replicaSet={}{cert}", self.set),
        )
    }

    /// Waits until the primary sees `n` members PRIMARY or SECONDARY (all over TLS).
    async fn wait_for_secondaries(&self, n: usize) -> TestResult {
        let c = client(&self.uri()).await?;
        common::eventually("the members over TLS", || {
            let c = c.clone();
            async move {
                let status = c
                    .database("admin")
                    .run_command(doc! {"replSetGetStatus": 1})
                    .await?;
                let up = common::member_fields(&status, "stateStr")?
                    .into_iter()
                    .filter(|s| *s == "PRIMARY" || *s == "SECONDARY")
                    .count();
                if up == n {
                    Ok(())
                } else {
                    Err(format!("{up} of {n} members are up: {status}").into())
                }
            }
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_driver_writes_with_majority_and_reads_over_tls() -> TestResult {
    let s = TlsSet::start(true).await?;
    let c = client(&s.uri()).await?;
    let coll = c.database("app").collection_with_options::<Document>(
        "docs",
        mongodb::options::CollectionOptions::builder()
            .write_concern(WriteConcern::majority())
            .build(),
    );
    let id = rand_suffix() as i64;
    coll.insert_one(doc! {"_id": id, "via": "rust"}).await?;
    let got = coll.find_one(doc! {"_id": id}).await?.ok_or("not found")?;
    assert_eq!(got.get_str("via")?, "rust");
    // The set itself talks TLS: its members' heartbeats and the majority write above went
    // over it, and the hosts the driver found are the config's.
    let hello = c.database("admin").run_command(doc! {"hello": 1}).await?;
    assert_eq!(hello.get_str("setName")?, s.set);
    assert_eq!(hello.get_array("hosts")?.len(), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pymongo_writes_with_majority_and_reads_over_tls() -> TestResult {
    let py = pymongo_python().await?;
    let s = TlsSet::start(true).await?;
    let script = r#"
import sys, pymongo
from pymongo.write_concern import WriteConcern
client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=15000)
coll = client.app.get_collection("docs", write_concern=WriteConcern(w="majority"))
coll.insert_one({"_id": "py", "via": "pymongo"})
print("READ", coll.find_one({"_id": "py"})["via"])
print("PRIMARY", "%s:%d" % client.primary)
"#;
    let out = Command::new(&py)
        .args(["-c", script, &s.uri()])
        .output()
        .await?;
    let text = output_text(&out);
    assert!(out.status.success(), "pymongo failed:\n{text}");
    assert!(text.contains("READ pymongo"), "{text}");
    let primary = text
        .lines()
        .find_map(|l| l.strip_prefix("PRIMARY "))
        .ok_or_else(|| format!("no primary in:\n{text}"))?;
    assert!(s.hosts.iter().any(|h| h == primary), "{primary}: {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongosh_writes_with_majority_and_reads_over_tls() -> TestResult {
    let modules = std::env::var("REPLSET_SIM_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/node/node_modules")
        });
    let mongosh = modules.join(".bin/mongosh");
    assert!(
        mongosh.exists(),
        "{} is missing: run scripts/node-clients (scripts/test does)",
        mongosh.display()
    );
    let s = TlsSet::start(true).await?;
    let mut child = Command::new(&mongosh)
        .arg(s.uri())
        .args(["--quiet", "--norc"])
        .env("MONGOSH_NO_TELEMETRY", "1")
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(
            b"db.getSiblingDB('app').docs.insertOne({_id: 'sh', via: 'mongosh'}, {writeConcern: {w: 'majority'}}).acknowledged\n\
              print('READ ' + db.getSiblingDB('app').docs.findOne({_id: 'sh'}).via)\n\
              print('PRIMARY ' + db.hello().primary)\n\
              exit\n",
        )
        .await?;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    let text = output_text(&out);
    assert!(out.status.success(), "mongosh failed:\n{text}");
    assert!(text.contains("READ mongosh"), "{text}");
    let primary = text
        .lines()
        .find_map(|l| l.split("PRIMARY ").nth(1))
        .ok_or_else(|| format!("no primary in:\n{text}"))?;
    assert!(s.hosts.iter().any(|h| h == primary.trim()), "{text}");
    Ok(())
}

/// One OP_MSG `hello`, as a plain-text driver's first message.
fn plain_hello() -> Result<Vec<u8>, BoxError> {
    Ok(replset_sim::wire::encode_op_msg(
        1,
        0,
        &doc! {"hello": 1, "$db": "admin"},
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_closes_a_plain_text_connection_without_an_answer() -> TestResult {
    common::init_tracing();
    let ca = Ca::new("plain")?;
    let port = free_port()?;
    let mut args = tls_args(&ca, &ca.issue("member", true)?);
    args.push("--tlsAllowConnectionsWithoutCertificates".into());
    let _m = member(port, "rs0", &args)?;
    // The member answers TLS clients (it is up) ...
    let tls = client(&tls_uri(
        &[format!("127.0.0.1:{port}")],
        &ca,
        "&directConnection=true",
    ))
    .await?;
    common::command_eventually("hello over TLS", &tls, doc! {"hello": 1}).await?;

    // ... and closes a plain one after its first message, with no reply.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    raw.write_all(&plain_hello()?).await?;
    let mut buf = [0u8; 64];
    // Closed with the request unread: an end of stream, or a reset.
    match tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf)).await? {
        Ok(n) => assert_eq!(n, 0, "the member answered plain text: {:?}", &buf[..n]),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    // A driver without tls=true finds no server.
    let plain = client(&format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true"
    ))
    .await?;
    let e = plain
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .err()
        .ok_or("a plain-text driver was served by requireTLS")?;
    assert!(
        matches!(*e.kind, mongodb::error::ErrorKind::ServerSelection { .. }),
        "{e}"
    );

    // Nor does a TLS client that does not trust the member's CA.
    let other = Ca::new("untrusted")?;
    let distrust = client(&tls_uri(
        &[format!("127.0.0.1:{port}")],
        &other,
        "&directConnection=true",
    ))
    .await?;
    assert!(distrust
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_ca_file_a_client_needs_a_certificate_unless_allowed() -> TestResult {
    common::init_tracing();
    let ca = Ca::new("clientcert")?;
    let port = free_port()?;
    let _m = member(port, "rs0", &tls_args(&ca, &ca.issue("member", true)?))?;
    let host = [format!("127.0.0.1:{port}")];

    // With its certificate (signed by the CA) the client is served.
    let cert = ca.issue("app", false)?;
    let with_cert = client(&tls_uri(
        &host,
        &ca,
        &format!(
            "&directConnection=true&tlsCertificateKeyFile={}",
            cert.display()
        ),
    ))
    .await?;
    common::command_eventually(
        "hello with a client certificate",
        &with_cert,
        doc! {"hello": 1},
    )
    .await?;

    // Without one it is not (mongod: "no SSL certificate provided by peer; connection
    // rejected").
    let without = client(&tls_uri(&host, &ca, "&directConnection=true")).await?;
    assert!(
        without
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .is_err(),
        "a client without a certificate was served"
    );

    // A certificate of another CA is refused, even with --tlsAllowConnectionsWithoutCertificates.
    let port2 = free_port()?;
    let mut args = tls_args(&ca, &ca.issue("member2", true)?);
    args.push("--tlsAllowConnectionsWithoutCertificates".into());
    let _m2 = member(port2, "rs0", &args)?;
    let host2 = [format!("127.0.0.1:{port2}")];
    let anonymous = client(&tls_uri(&host2, &ca, "&directConnection=true")).await?;
    common::command_eventually("hello without a certificate", &anonymous, doc! {"hello": 1})
        .await?;
    let foreign_ca = Ca::new("foreignclient")?;
    let foreign = foreign_ca.issue("intruder", false)?;
    let forged = client(&tls_uri(
        &host2,
        &ca,
        &format!(
            "&directConnection=true&tlsCertificateKeyFile={}",
            foreign.display()
        ),
    ))
    .await?;
    assert!(
        forged
            .database("admin")
            .run_command(doc! {"ping": 1})
            .await
            .is_err(),
        "a client certificate of another CA was accepted"
    );
    Ok(())
}

/// The primary's `replSetGetStatus` entry of the member on `host`.
async fn status_of(c: &Client, host: &str) -> Result<Document, BoxError> {
    let status = c
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await?;
    status
        .get_array("members")?
        .iter()
        .filter_map(|m| m.as_document())
        .find(|m| m.get_str("name") == Ok(host))
        .cloned()
        .ok_or_else(|| format!("{host} is not in {status}").into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_certificate_of_another_ca_cannot_join() -> TestResult {
    let s = TlsSet::start(false).await?;
    // Two new members: one with a certificate of the set's CA, one of another CA (which it
    // trusts itself).
    let good_port = free_port()?;
    let _good = member(
        good_port,
        &s.set,
        &tls_args(&s.ca, &s.ca.issue("member3", true)?),
    )?;
    let other = Ca::new("other")?;
    let bad_port = free_port()?;
    let _bad = member(
        bad_port,
        &s.set,
        &tls_args(&other, &other.issue("member4", true)?),
    )?;
    let (good, bad) = (
        format!("127.0.0.1:{good_port}"),
        format!("127.0.0.1:{bad_port}"),
    );

    let c = client(&s.uri()).await?;
    for (id, host) in [(3, &good), (4, &bad)] {
        let mut cfg = c
            .database("admin")
            .run_command(doc! {"replSetGetConfig": 1})
            .await?
            .get_document("config")?
            .clone();
        cfg.insert("version", cfg.get_i32("version")? + 1);
        let mut members = cfg.get_array("members")?.clone();
        members.push(Bson::Document(
            doc! {"_id": id, "host": host, "votes": 0, "priority": 0},
        ));
        cfg.insert("members", members);
        common::command_eventually("replSetReconfig", &c, doc! {"replSetReconfig": cfg.clone()})
            .await?;
    }

    // The member of the set's CA becomes SECONDARY; the other is never reached.
    common::eventually("the new member with the set's CA", || {
        let (c, good) = (c.clone(), good.clone());
        async move {
            let m = status_of(&c, &good).await?;
            match m.get_str("stateStr")? {
                "SECONDARY" => Ok(()),
                other => Err(format!("{good} is {other}").into()),
            }
        }
    })
    .await?;
    let refused = common::eventually("the heartbeat to the other CA's member", || {
        let (c, bad) = (c.clone(), bad.clone());
        async move {
            let m = status_of(&c, &bad).await?;
            let message = m.get_str("lastHeartbeatMessage").unwrap_or("").to_string();
            if message.contains("TLS handshake") {
                Ok(m)
            } else {
                Err(format!("no TLS failure yet: {m}").into())
            }
        }
    })
    .await?;
    assert_eq!(
        refused.get("health").and_then(Bson::as_f64),
        Some(0.0),
        "{refused}"
    );
    // It has no config: it never heard from the set.
    let bad_alone = client(&tls_uri(
        std::slice::from_ref(&bad),
        &other,
        &format!(
            "&directConnection=true{}",
            cert_param(Some(&other.issue("admin", false)?))
        ),
    ))
    .await?;
    let hello = bad_alone
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await?;
    assert!(hello.get_str("setName").is_err(), "{hello}");
    assert!(!hello.get_bool("secondary")?, "{hello}");
    Ok(())
}

/// Runs `replset-sim ARGS` to its end; its exit code and output.
async fn run_sim(args: &[String]) -> Result<(Option<i32>, String), BoxError> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(env!("CARGO_BIN_EXE_replset-sim"))
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    Ok((out.status.code(), output_text(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_checks_a_tls_member_with_its_ca() -> TestResult {
    let s = TlsSet::start(true).await?;
    let port = s.hosts[0].rsplit(':').next().ok_or("no port")?.to_string();
    let probe = |extra: Vec<String>| {
        let mut args = vec!["--sim-probe".to_string(), "--port".into(), port.clone()];
        args.extend(extra);
        run_sim_owned(args)
    };
    let ca = s.ca.ca_file().display().to_string();
    let (code, text) = probe(vec![
        "--tlsMode".into(),
        "requireTLS".into(),
        "--tlsCAFile".into(),
        ca.clone(),
    ])
    .await?;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("PRIMARY: healthy") || text.contains("SECONDARY: healthy"),
        "{text}"
    );

    // Without TLS the member closes the probe's connection: not healthy.
    let (code, text) = probe(vec![]).await?;
    assert_eq!(code, Some(1), "{text}");
    // With TLS but no CA it says which flag is missing.
    let (code, text) = probe(vec!["--tlsMode".into(), "requireTLS".into()]).await?;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("--tlsCAFile"), "{text}");
    // A CA that did not sign the member's certificate fails the handshake.
    let other = Ca::new("probe-other")?;
    let (code, text) = probe(vec![
        "--tlsMode".into(),
        "requireTLS".into(),
        "--tlsCAFile".into(),
        other.ca_file().display().to_string(),
    ])
    .await?;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("TLS handshake"), "{text}");
    Ok(())
}

async fn run_sim_owned(args: Vec<String>) -> Result<(Option<i32>, String), BoxError> {
    run_sim(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_stop_the_member_at_start() -> TestResult {
    let ca = Ca::new("files")?;
    let good = ca.issue("member", true)?;
    let dir = ca.dir.path();
    let cert_only = dir.join("cert-only.pem");
    let pem = std::fs::read_to_string(&good)?;
    let cut = pem
        .find("-----BEGIN PRIVATE KEY")
        .ok_or("no key in the PEM")?;
    std::fs::write(&cert_only, &pem[..cut])?;
    // The certificate of one pair with the key of another.
    let other = std::fs::read_to_string(ca.issue("other", true)?)?;
    let mismatched = dir.join("mismatched.pem");
    let other_key = other
        .find("-----BEGIN PRIVATE KEY")
        .ok_or("no key in the PEM")?;
    std::fs::write(
        &mismatched,
        format!("{}{}", &pem[..cut], &other[other_key..]),
    )?;
    let missing = dir.join("missing.pem");

    let start = |pem: &Path, ca_file: Option<&Path>| {
        let mut args = vec![
            "--port".to_string(),
            "0".into(),
            "--replSet".into(),
            "rs0".into(),
            "--tlsMode".into(),
            "requireTLS".into(),
            "--tlsCertificateKeyFile".into(),
            pem.display().to_string(),
        ];
        if let Some(ca_file) = ca_file {
            args.extend(["--tlsCAFile".into(), ca_file.display().to_string()]);
        }
        run_sim_owned(args)
    };
    let ca_file = ca.ca_file();
    // (certificate key file, CA file, what the error says, the file it names)
    for (pem, ca_file, want, names) in [
        (
            &missing,
            Some(&ca_file),
            "cannot read --tlsCertificateKeyFile",
            &missing,
        ),
        (
            &cert_only,
            Some(&ca_file),
            "holds no private key",
            &cert_only,
        ),
        (
            &mismatched,
            Some(&ca_file),
            "is not the key of the certificate",
            &mismatched,
        ),
        (&good, None, "needs --tlsCAFile", &ca_file),
        (&good, Some(&missing), "cannot read --tlsCAFile", &missing),
    ] {
        let (code, text) = start(pem, ca_file.map(PathBuf::as_path)).await?;
        assert_eq!(code, Some(1), "{}: {text}", pem.display());
        assert!(text.contains(want), "want {want:?}, got: {text}");
        if ca_file.is_some() {
            assert!(
                text.contains(&names.display().to_string()),
                "the error does not name {}: {text}",
                names.display()
            );
        }
    }
    Ok(())
}
