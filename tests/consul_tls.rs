//! The bridge against a Consul agent that speaks only HTTPS and requires client certificates
//! (`consul+https://` with `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`).
//!
//! Each test generates its own CA, server and client certificates (`test_support::pki`, nothing
//! from the machine) and starts its own Consul dev agent with plain HTTP turned off, on free ports.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::Value;
use test_support::pki::Pki;

const CONVERGE: Duration = Duration::from_secs(60);
/// How long a bridge that cannot work may take to give up with `--retry-attempts 1`.
const GIVE_UP: Duration = Duration::from_secs(30);

/// The test's own HTTPS client, trusting only the test CA and presenting the client cert.
fn https_client(pki: &Pki) -> reqwest::Client {
    let ca = std::fs::read(&pki.ca).expect("CA file");
    let mut identity = std::fs::read(&pki.client_cert).expect("client cert");
    identity.push(b'\n');
    identity.extend(std::fs::read(&pki.client_key).expect("client key"));
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA cert"))
        .identity(reqwest::Identity::from_pem(&identity).expect("identity"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTPS client")
}

/// The environment that gives the bridge the whole TLS setup.
fn tls_env(pki: &Pki) -> Vec<(&'static str, String)> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        ("CONSUL_CACERT", s(&pki.ca)),
        ("CONSUL_CLIENT_CERT", s(&pki.client_cert)),
        ("CONSUL_CLIENT_KEY", s(&pki.client_key)),
    ]
}

/// A private Consul dev agent serving its HTTP API over HTTPS only, with client certificates
/// required (`verify_incoming_https`), on free ports. Killed when dropped.
struct TlsConsul {
    https_port: u16,
    log: PathBuf,
    http: reqwest::Client,
    _child: tokio::process::Child,
    _dir: TempDir,
}

/// A fresh PKI, a TLS agent on it, names under `tag`, and the bridge's `consul+https` URI of
/// the agent with their prefix.
async fn tls_agent(tag: &str) -> (Pki, TlsConsul, Names, String) {
    let pki = Pki::generate();
    let agent = TlsConsul::start(&pki).await;
    let names = Names::new(tag);
    let uri = format!("consul+https://{}/{}", agent.https_addr(), names.prefix());
    (pki, agent, names, uri)
}

impl TlsConsul {
    async fn start(pki: &Pki) -> TlsConsul {
        let dir = TempDir::new("consul-tls-agent");
        let https_port = free_port();
        let config = format!(
            r#"
ports {{
  http = -1
  https = {https_port}
  dns = -1
  grpc = -1
  serf_lan = {serf_lan}
  serf_wan = {serf_wan}
  server = {server}
}}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
verify_incoming_https = true
"#,
            serf_lan = free_port(),
            serf_wan = free_port(),
            server = free_port(),
            ca = pki.ca.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        let config_file = dir.path().join("tls.hcl");
        std::fs::write(&config_file, config).expect("agent config");
        let log = dir.path().join("consul.log");
        let mut command = test_support::consul_dev_agent(&format!("tls-{https_port}"));
        command.arg("-config-file").arg(&config_file);
        let child = test_support::spawn_logged(&mut command, &log, "the TLS Consul agent");
        let agent = TlsConsul {
            https_port,
            log,
            http: https_client(pki),
            _child: child,
            _dir: dir,
        };
        let log = agent.log.clone();
        wait_for(
            "the TLS Consul agent to have a leader (over HTTPS)",
            Duration::from_secs(30),
            || async {
                match agent.get("/v1/status/leader").await {
                    Ok(v) if v.as_str().is_some_and(|s| !s.is_empty()) => Ok(()),
                    Ok(v) => Err(format!("leader: {v}")),
                    Err(e) => Err(format!(
                        "{e}; agent log tail: {}",
                        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 5)
                    )),
                }
            },
        )
        .await;
        agent
    }

    fn https_addr(&self) -> String {
        format!("127.0.0.1:{}", self.https_port)
    }

    /// GET over HTTPS with the client certificate; the JSON body of a 2xx.
    async fn get(&self, path: &str) -> Result<Value, String> {
        let resp = self
            .http
            .get(format!("https://{}{path}", self.https_addr()))
            .send()
            .await
            .map_err(|e| backend_core::error_chain(&e))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts a plain container that the bridge publishes with `--internal` as `service`.
async fn container(cleanup: &mut Cleanup, name: &str, service: &str) -> String {
    plain_container(cleanup, name, service, &[], &["sleep", "86400"]).await
}

/// Runs a bridge that is expected to give up; returns its exit code and log.
async fn failing_bridge(uri: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut bridge = BridgeProcess::start_with_env(
        uri,
        &[
            "--internal",
            "--retry-attempts",
            "1",
            "--retry-interval",
            "50",
        ],
        env,
    )
    .await;
    let code = bridge.wait(GIVE_UP).await;
    (code, bridge.log_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_into_kv_and_catalog_over_https_with_client_certificates() {
    let (pki, agent, names, uri) = tls_agent("ctls").await;
    let mut cleanup = Cleanup::default();
    let svc = names.name("web");
    let cname = names.name("c");
    let container_id = container(&mut cleanup, &cname, &svc).await;
    let ip = docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &container_id,
    ])
    .await;

    let env = tls_env(&pki);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bridge = BridgeProcess::start_with_env(&uri, &["--internal", "--cleanup"], &env).await;

    // The record, read back from the agent's KV over HTTPS.
    let kv_path = format!("/v1/kv/{}/services/{svc}?recurse=true", names.prefix());
    let record = wait_for("the record in Consul KV over HTTPS", CONVERGE, || async {
        let entries = agent
            .get(&kv_path)
            .await
            .map_err(|e| format!("{e}; bridge log tail: {}", tail(&bridge.log_text(), 3)))?;
        let entries = entries.as_array().cloned().unwrap_or_default();
        if entries.len() != 1 {
            return Err(format!("{} entries: {entries:?}", entries.len()));
        }
        let value = entries[0]["Value"].as_str().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|e| e.to_string())?;
        let record: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        // Tied to the bridge's session.
        if entries[0]["Session"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        {
            return Err(format!("no session on {entries:?}"));
        }
        Ok(record)
    })
    .await;
    assert_eq!(record["service"], Value::from(svc.clone()), "{record}");
    assert_eq!(record["port"], Value::from(8080), "{record}");
    assert_eq!(record["ip"], Value::from(ip.clone()), "{record}");
    assert_eq!(
        record["container_id"],
        Value::from(container_id.clone()),
        "{record}"
    );

    // The catalog registration.
    let catalog = wait_for(
        "the service in the catalog over HTTPS",
        CONVERGE,
        || async {
            let v = agent.get(&format!("/v1/catalog/service/{svc}")).await?;
            match v.as_array() {
                Some(a) if a.len() == 1 => Ok(a[0].clone()),
                _ => Err(v.to_string()),
            }
        },
    )
    .await;
    assert_eq!(catalog["ServiceName"], Value::from(svc.clone()));
    assert_eq!(catalog["ServicePort"], Value::from(8080));
    assert_eq!(catalog["ServiceAddress"], Value::from(ip));

    // An independent client (the consul CLI, Go's TLS stack) sees the same record.
    let key = format!(
        "{}/services/{svc}/{}",
        names.prefix(),
        record["id"].as_str().expect("record id")
    );
    let mut kv_get = tokio::process::Command::new(consul_bin());
    kv_get
        .args(["kv", "get", "-http-addr"])
        .arg(format!("https://{}", agent.https_addr()))
        .arg("-ca-file")
        .arg(&pki.ca)
        .arg("-client-cert")
        .arg(&pki.client_cert)
        .arg("-client-key")
        .arg(&pki.client_key)
        .arg(&key);
    let out = run_ok(&mut kv_get, &format!("consul kv get {key}")).await;
    let cli_record: Value = serde_json::from_slice(&out.stdout).expect("JSON from consul kv get");
    assert_eq!(cli_record, record);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_consul_cacert_the_bridge_stops_on_the_unknown_certificate() {
    let (pki, agent, names, uri) = tls_agent("ctlsnoca").await;
    let cert = pki.client_cert.to_string_lossy().into_owned();
    let key = pki.client_key.to_string_lossy().into_owned();
    // The client identity is given; only the CA is missing, so the agent's certificate cannot
    // be verified against the built-in roots.
    let started = std::time::Instant::now();
    let (code, log) = failing_bridge(
        &uri,
        &[("CONSUL_CLIENT_CERT", &cert), ("CONSUL_CLIENT_KEY", &key)],
    )
    .await;
    eprintln!(
        "bridge without CONSUL_CACERT exited {code:?} after {:?}:\n{log}",
        started.elapsed()
    );
    assert_eq!(code, Some(1), "non-zero exit; log:\n{log}");
    let lower = log.to_lowercase();
    assert!(
        lower.contains("certificate"),
        "the error names the certificate problem; log:\n{log}"
    );
    assert!(
        log.contains("UnknownIssuer"),
        "rustls reports the agent's certificate as signed by an unknown issuer; log:\n{log}"
    );
    // Nothing reached the agent's KV.
    let kv = agent
        .get(&format!("/v1/kv/{}/?recurse=true", names.prefix()))
        .await;
    assert!(kv.is_err(), "no keys under the prefix: {kv:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_the_agent_refuses_the_bridge() {
    let (pki, _agent, _, uri) = tls_agent("ctlsnocert").await;
    let ca = pki.ca.to_string_lossy().into_owned();
    // The agent is trusted, but the bridge has no identity to show: `verify_incoming_https`
    // makes the agent end the handshake with a `bad_certificate` alert.
    let (code, log) = failing_bridge(&uri, &[("CONSUL_CACERT", &ca)]).await;
    eprintln!("bridge without a client certificate exited {code:?}:\n{log}");
    assert_eq!(code, Some(1), "non-zero exit; log:\n{log}");
    assert!(
        log.contains("BadCertificate"),
        "the error carries the agent's bad_certificate alert; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_cacert_that_is_not_pem_is_a_clear_error() {
    let (pki, _agent, _, uri) = tls_agent("ctlsbadca").await;
    let cert = pki.client_cert.to_string_lossy().into_owned();
    let key = pki.client_key.to_string_lossy().into_owned();
    let cases = [
        ("not-a-ca.pem", "this is not a certificate\n"),
        (
            "armored-garbage.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        ),
    ];
    let mut unclear = Vec::new();
    for (file, content) in cases {
        let bad = pki.dir.path().join(file);
        std::fs::write(&bad, content).expect("write");
        let bad = bad.to_string_lossy().into_owned();
        let started = std::time::Instant::now();
        let (code, log) = failing_bridge(
            &uri,
            &[
                ("CONSUL_CACERT", &bad),
                ("CONSUL_CLIENT_CERT", &cert),
                ("CONSUL_CLIENT_KEY", &key),
            ],
        )
        .await;
        eprintln!(
            "bridge with CONSUL_CACERT={file} exited {code:?} after {:?}:\n{log}",
            started.elapsed()
        );
        assert_eq!(code, Some(1), "{file}: non-zero exit; log:\n{log}");
        if !(log.contains("CONSUL_CACERT") && log.contains(&bad)) {
            unclear.push(format!("{file}:\n{log}"));
        }
    }
    // Both a file with no PEM section and one whose PEM does not decode must be named.
    assert!(
        unclear.is_empty(),
        "the error names CONSUL_CACERT and the file; it does not for:\n{}",
        unclear.join("\n")
    );
}
