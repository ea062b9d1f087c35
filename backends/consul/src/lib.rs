//! The Consul backend.
//!
//! Publishing, to two places:
//!
//! * **KV**: the records under exactly the etcd layout and JSON, each *acquired* with this
//!   bridge's session (`Behavior: delete`), so when the session dies the records go with it.
//!   A record is written as one transaction of `delete` + `lock`: atomic for readers, and it
//!   also takes over a key still locked by the previous bridge of the node (a rolling update),
//!   without the key disappearing in between.
//! * **Catalog**: each record is also an agent service (ID = instance id, Name = service)
//!   with a TTL check that the bridge passes at every renewal, set `critical` when Docker
//!   reports the container unhealthy, and `DeregisterCriticalServiceAfter`, so
//!   `consul watch -type=service`, `/v1/health/service/<svc>?passing` and DNS work.
//!
//! Watching: blocking queries on `/v1/kv/<prefix>?recurse`, following Consul's rules for the
//! index (reset when it goes backwards, never below 1), turned into the same
//! snapshot-plus-changes stream as the etcd watcher.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use backend_core::{
    BackendError, Backoff, Coordinator, Health, KeyLayout, KvEntry, Leadership, NodeRecord,
    Publisher, ServiceKey, ServiceRecord, WatchEvent, Watcher,
};
use base64::Engine as _;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, Mutex};

const STORE: &str = "consul";

/// Consul refuses session TTLs below 10 s.
pub const MIN_TTL: Duration = backend_core::StoreKind::Consul.min_session_ttl();

/// Consul's limit on the operations of one transaction.
pub const MAX_TXN_OPS: usize = 64;

/// How many agent calls (catalog registrations, check updates) run at once.
const AGENT_CONCURRENCY: usize = 16;

/// How long one request may take, blocking queries aside.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An ACL token and where it came from. Its value is never printed.
pub type Token = backend_core::Secret;

/// How to reach Consul and what to publish there.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    pub token: Option<Token>,
    /// `CONSUL_CACERT`: a PEM file of the CA that signed the agent's certificate.
    pub ca_cert: Option<PathBuf>,
    /// `CONSUL_CLIENT_CERT` and `CONSUL_CLIENT_KEY`: PEM files for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Write the records into KV.
    pub kv: bool,
    /// Register the records as agent services.
    pub catalog: bool,
    /// How long a catalog service may stay critical before Consul removes it (at least 1 m).
    pub deregister_critical_after: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            token: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            kv: true,
            catalog: true,
            deregister_critical_after: Duration::from_secs(60),
        }
    }
}

/// A Consul agent.
pub struct ConsulStore {
    http: reqwest::Client,
    base: String,
    endpoint: String,
    layout: KeyLayout,
    options: ConsulOptions,
    session: Mutex<Option<Session>>,
    /// Catalog registrations of this bridge, by service id, for the TTL checks.
    registered: Mutex<BTreeMap<String, ServiceRecord>>,
    /// The running round of TTL-check updates, so that rounds never overlap.
    check_round: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Debug, Clone)]
struct Session {
    id: String,
    ttl: Duration,
}

impl std::fmt::Debug for ConsulStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulStore")
            .field("base", &self.base)
            .field("layout", &self.layout)
            .field("kv", &self.options.kv)
            .field("catalog", &self.options.catalog)
            .finish_non_exhaustive()
    }
}

/// A configuration that cannot work, found before any request.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a valid PEM file: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be given together")]
    HalfIdentity,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.clone(),
        source,
    })
}

impl ConsulStore {
    /// A client for the agent at `endpoint` (`host:port`), over HTTPS when `tls`.
    pub fn new(
        endpoint: &str,
        tls: bool,
        layout: KeyLayout,
        options: ConsulOptions,
    ) -> Result<ConsulStore, ConfigError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        if let Some(path) = &options.ca_cert {
            let pem = read("CONSUL_CACERT", path)?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ConfigError::Pem {
                    what: "CONSUL_CACERT",
                    path: path.clone(),
                    detail: error_chain(&e),
                })?;
            if certs.is_empty() {
                return Err(ConfigError::Pem {
                    what: "CONSUL_CACERT",
                    path: path.clone(),
                    detail: "it holds no certificate".into(),
                });
            }
            // Like Consul's own clients: the given CA, and only it.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&options.client_cert, &options.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read("CONSUL_CLIENT_CERT", cert)?;
                pem.push(b'\n');
                pem.extend(read("CONSUL_CLIENT_KEY", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| ConfigError::Pem {
                    what: "CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY",
                    path: cert.clone(),
                    detail: e.to_string(),
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(ConfigError::HalfIdentity),
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError::Client(error_chain(&e)))?;
        let scheme = if tls { "https" } else { "http" };
        Ok(ConsulStore {
            http,
            base: format!("{scheme}://{endpoint}"),
            endpoint: endpoint.to_string(),
            layout,
            options,
            session: Mutex::new(None),
            registered: Mutex::new(BTreeMap::new()),
            check_round: Mutex::new(None),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT);
        match &self.options.token {
            Some(t) => rb.header("X-Consul-Token", t.expose()),
            None => rb,
        }
    }

    /// Sends a request; maps transport errors and refusals. Returns the response for any
    /// 2xx and for 404 (which callers interpret).
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, BackendError> {
        send(rb, what, &self.endpoint, self.options.token.as_ref()).await
    }

    async fn session_id(&self) -> Result<String, BackendError> {
        self.session
            .lock()
            .await
            .as_ref()
            .map(|s| s.id.clone())
            .ok_or(BackendError::NoSession { store: STORE })
    }

    /// Runs KV operations in transactions of at most [`MAX_TXN_OPS`], never splitting the
    /// operations of one key. `session`: the session the operations lock with, if any.
    async fn txn(
        &self,
        per_key: Vec<Vec<serde_json::Value>>,
        session: Option<&str>,
    ) -> Result<(), BackendError> {
        for batch in txn_batches(per_key) {
            self.run_txn(batch, session).await?;
        }
        Ok(())
    }

    async fn run_txn(
        &self,
        ops: Vec<serde_json::Value>,
        session: Option<&str>,
    ) -> Result<(), BackendError> {
        let resp = self
            .send(
                self.request(Method::PUT, "/v1/txn").json(&ops),
                "KV transaction",
            )
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        // A lock is refused when its session is gone: ask Consul whether it is.
        if let Some(id) = session {
            if !self.session_exists(id).await? {
                return Err(BackendError::SessionLost {
                    store: STORE,
                    detail: format!("session {id} is gone: {}", body.trim()),
                });
            }
        }
        Err(BackendError::Rejected {
            store: STORE,
            detail: format!("transaction failed: {body}"),
        })
    }

    /// Whether Consul still knows the session (`/v1/session/info` answers `null` or `[]` for
    /// one it does not).
    async fn session_exists(&self, id: &str) -> Result<bool, BackendError> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/v1/session/info/{id}")),
                "session info",
            )
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !resp.status().is_success() {
            expect_success(resp, "session info").await?;
            return Ok(false);
        }
        let sessions: Option<Vec<serde_json::Value>> =
            resp.json().await.map_err(|e| BackendError::Unavailable {
                store: STORE,
                endpoints: self.endpoint.clone(),
                detail: format!("session info: unreadable answer: {e}"),
            })?;
        Ok(sessions.is_some_and(|s| !s.is_empty()))
    }

    /// Reads every key under `prefix` (`recurse`), with the index of the answer.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, u64), BackendError> {
        let path = format!("/v1/kv/{}?recurse=true", encode_key(prefix));
        list(self, self.request(Method::GET, &path)).await
    }

    /// Registers one record as an agent service with a TTL check.
    async fn register(&self, r: &ServiceRecord, ttl: Duration) -> Result<(), BackendError> {
        let (status, output) = check_status(r.health);
        let body = json!({
            "ID": r.id,
            "Name": r.service,
            "Address": r.ip.to_string(),
            "Port": r.port,
            "Tags": r.tags,
            "Meta": catalog_meta(r),
            "Check": {
                "CheckID": check_id(&r.id),
                "Name": "swarm-registrator TTL",
                "TTL": format!("{}s", ttl.as_secs()),
                "Status": status,
                "Notes": output,
                "DeregisterCriticalServiceAfter":
                    format!("{}s", self.options.deregister_critical_after.as_secs()),
            },
        });
        let resp = self
            .send(
                self.request(Method::PUT, "/v1/agent/service/register")
                    .json(&body),
                "register service",
            )
            .await?;
        expect_success(resp, "register service").await
    }

    /// Sets one registration's TTL check; registers the service again when the agent no longer
    /// knows it (an agent restart).
    async fn update_check(&self, r: &ServiceRecord, ttl: Duration) -> Result<(), BackendError> {
        let (status, output) = check_status(r.health);
        let path = format!("/v1/agent/check/update/{}", encode_key(&check_id(&r.id)));
        let resp = self
            .send(
                self.request(Method::PUT, &path)
                    .json(&json!({"Status": status, "Output": output})),
                "update check",
            )
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        tracing::info!(store = STORE, id = %r.id, status = %resp.status(), "the agent lost a registration; registering it again");
        self.register(r, ttl).await
    }

    async fn deregister(&self, id: &str) -> Result<(), BackendError> {
        let path = format!("/v1/agent/service/deregister/{}", encode_key(id));
        let resp = self
            .send(self.request(Method::PUT, &path), "deregister service")
            .await?;
        // Already gone is fine.
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        expect_success(resp, "deregister service").await
    }

    async fn ttl(&self) -> Result<Duration, BackendError> {
        self.session
            .lock()
            .await
            .as_ref()
            .map(|s| s.ttl)
            .ok_or(BackendError::NoSession { store: STORE })
    }
}

async fn send(
    rb: reqwest::RequestBuilder,
    what: &str,
    endpoint: &str,
    token: Option<&Token>,
) -> Result<reqwest::Response, BackendError> {
    let resp = rb.send().await.map_err(|e| {
        let chain = error_chain(&e);
        if is_tls_failure(&e) {
            // Retrying cannot fix a certificate: say what to check, and stop.
            BackendError::Rejected {
                store: STORE,
                detail: format!(
                    "{what}: TLS handshake with {endpoint} failed: {chain}; check CONSUL_CACERT \
                     (the CA of the agent's certificate) and CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY"
                ),
            }
        } else {
            BackendError::Unavailable {
                store: STORE,
                endpoints: endpoint.to_string(),
                detail: format!("{what}: {chain}"),
            }
        }
    })?;
    match resp.status() {
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            let body = resp.text().await.unwrap_or_default();
            let source = token
                .map(|t| format!("the ACL token from {}", t.source()))
                .unwrap_or_else(|| {
                    "no ACL token (set CONSUL_HTTP_TOKEN or --consul-token-file)".to_string()
                });
            Err(BackendError::Rejected {
                store: STORE,
                detail: format!("{what}: permission denied with {source}: {}", body.trim()),
            })
        }
        s if s.is_server_error() => {
            let body = resp.text().await.unwrap_or_default();
            Err(BackendError::Unavailable {
                store: STORE,
                endpoints: endpoint.to_string(),
                detail: format!("{what}: {s}: {}", body.trim()),
            })
        }
        _ => Ok(resp),
    }
}

/// Whether a request failed in the TLS handshake (an unknown CA, a refused client
/// certificate), as opposed to the network: a rustls error somewhere in its causes, itself or
/// inside an I/O error (as tokio-rustls reports it).
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cause = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn expect_success(resp: reqwest::Response, what: &str) -> Result<(), BackendError> {
    if resp.status().is_success() {
        return Ok(());
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(BackendError::Rejected {
        store: STORE,
        detail: format!("{what}: {status}: {}", body.trim()),
    })
}

#[derive(Deserialize)]
struct KvPair {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
}

/// One `GET /v1/kv/...?recurse` (blocking or not): the entries and `X-Consul-Index`.
async fn list(
    store: &ConsulStore,
    rb: reqwest::RequestBuilder,
) -> Result<(Vec<KvEntry>, u64), BackendError> {
    let resp = store.send(rb, "KV read").await?;
    let index = resp
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if resp.status() == StatusCode::NOT_FOUND {
        return Ok((Vec::new(), index));
    }
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        return Err(BackendError::Rejected {
            store: STORE,
            detail: format!("KV read: {status}: {}", body.trim()),
        });
    }
    let pairs: Vec<KvPair> = resp.json().await.map_err(|e| BackendError::Unavailable {
        store: STORE,
        endpoints: store.endpoint.clone(),
        detail: format!("KV read: unreadable answer: {e}"),
    })?;
    let entries = pairs
        .into_iter()
        .map(|p| KvEntry {
            key: p.key,
            value: p
                .value
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                .unwrap_or_default(),
        })
        .collect();
    Ok((entries, index))
}

/// The TTL check of a registration.
fn check_id(service_id: &str) -> String {
    format!("service:{service_id}")
}

/// Docker's health as a Consul check status: unhealthy is critical, starting is warning.
fn check_status(health: Option<Health>) -> (&'static str, &'static str) {
    match health {
        None => ("passing", "running (no Docker healthcheck)"),
        Some(Health::Healthy) => ("passing", "Docker healthcheck: healthy"),
        Some(Health::Starting) => ("warning", "Docker healthcheck: starting"),
        Some(Health::Unhealthy) => ("critical", "Docker healthcheck: unhealthy"),
    }
}

/// Consul's rules for service meta: at most 64 keys; keys of at most 128 characters from
/// `[A-Za-z0-9_-]`, not starting with `consul-`; values of at most 512 characters.
///
/// Labels become meta with every other character replaced by `_` (`registrator.port` is
/// `registrator_port`), a `consul-` prefix written `x-consul-`, values cut at 512 bytes (on a
/// character boundary). The record's own fields come first (`node_id`, `container_id`,
/// `task_id`, `task_slot`, `stack`), then attributes, then `registrator.*` labels, then the
/// other labels, up to 64 keys.
pub fn catalog_meta(r: &ServiceRecord) -> BTreeMap<String, String> {
    let mut meta = BTreeMap::new();
    let mut add = |k: &str, v: &str| {
        if meta.len() >= 64 {
            return;
        }
        let mut key: String = k
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if key.starts_with("consul-") {
            key = format!("x-{key}");
        }
        if key.is_empty() {
            return;
        }
        truncate(&mut key, 128);
        let mut value = v.to_string();
        truncate(&mut value, 512);
        meta.entry(key).or_insert(value);
    };
    add("node_id", &r.node_id);
    add("container_id", &r.container_id);
    if let Some(t) = &r.task_id {
        add("task_id", t);
    }
    if let Some(s) = r.task_slot {
        add("task_slot", &s.to_string());
    }
    if let Some(s) = &r.stack {
        add("stack", s);
    }
    for (k, v) in &r.attrs {
        add(k, v);
    }
    // This project's own labels before the rest, should the 64 keys run out.
    let (ours, others): (Vec<_>, Vec<_>) = r
        .labels
        .iter()
        .partition(|(k, _)| k.starts_with("registrator."));
    for (k, v) in ours.into_iter().chain(others) {
        add(k, v);
    }
    meta
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// The index of the next blocking query after an answer with `X-Consul-Index: new`, by
/// Consul's rules: reset to 0 (a full read) when it went backwards, never below 1.
pub fn next_index(old: u64, new: u64) -> u64 {
    if new < old {
        0
    } else {
        new.max(1)
    }
}

/// The operations of one `/v1/txn` that write `value` at `key` held by `session`: `delete`
/// then `lock`, atomic for readers, and taking over a key still held by another session.
pub fn lock_ops(key: &str, value: &[u8], session: &str) -> Vec<serde_json::Value> {
    let value = base64::engine::general_purpose::STANDARD.encode(value);
    vec![
        json!({"KV": {"Verb": "delete", "Key": key}}),
        json!({"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": session}}),
    ]
}

/// Groups the operations of several keys into transactions of at most [`MAX_TXN_OPS`], never
/// splitting the operations of one key.
pub fn txn_batches(per_key: Vec<Vec<serde_json::Value>>) -> Vec<Vec<serde_json::Value>> {
    let mut batches = Vec::new();
    let mut batch: Vec<serde_json::Value> = Vec::new();
    for ops in per_key {
        if !batch.is_empty() && batch.len() + ops.len() > MAX_TXN_OPS {
            batches.push(std::mem::take(&mut batch));
        }
        batch.extend(ops);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Percent-encodes a key for a URL path, keeping `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Publisher for ConsulStore {
    fn store_name(&self) -> &'static str {
        STORE
    }

    fn layout(&self) -> &KeyLayout {
        &self.layout
    }

    async fn open_session(&self, ttl: Duration) -> Result<(), BackendError> {
        if ttl < MIN_TTL {
            return Err(BackendError::InvalidTtl {
                store: STORE,
                ttl,
                detail: "Consul's session TTL is at least 10 s".into(),
            });
        }
        let id = self.create_session("swarm-registrator", ttl).await?;
        tracing::info!(store = STORE, session = %id, ttl_secs = ttl.as_secs(), "created session");
        *self.session.lock().await = Some(Session { id, ttl });
        Ok(())
    }

    async fn renew_session(&self) -> Result<(), BackendError> {
        let Some(session) = self.session.lock().await.clone() else {
            return Err(BackendError::NoSession { store: STORE });
        };
        if self.options.kv {
            let path = format!("/v1/session/renew/{}", session.id);
            let resp = self
                .send(self.request(Method::PUT, &path), "renew session")
                .await?;
            if resp.status() == StatusCode::NOT_FOUND {
                *self.session.lock().await = None;
                return Err(BackendError::SessionLost {
                    store: STORE,
                    detail: format!("session {} is gone", session.id),
                });
            }
            expect_success(resp, "renew session").await?;
        }
        if self.options.catalog {
            // One agent call per registration: done in the background, so that a caller (the
            // bridge's event loop) is not held up by hundreds of them. A round still running
            // from the last renewal is not doubled.
            let mut round = self.check_round.lock().await;
            if round.as_ref().is_none_or(|h| h.is_finished()) {
                let registered: Vec<ServiceRecord> =
                    self.registered.lock().await.values().cloned().collect();
                let store = self.sibling();
                let ttl = session.ttl;
                *round = Some(tokio::spawn(async move {
                    let calls: Vec<_> = registered
                        .iter()
                        .map(|r| store.update_check(r, ttl))
                        .collect();
                    let failed = futures::stream::iter(calls)
                        .buffer_unordered(AGENT_CONCURRENCY)
                        .filter(|r| futures::future::ready(r.is_err()))
                        .count()
                        .await;
                    if failed > 0 {
                        tracing::warn!(
                            store = STORE,
                            failed,
                            "some TTL checks could not be updated; retrying at the next renewal"
                        );
                    }
                }));
            }
        }
        Ok(())
    }

    async fn close_session(&self, revoke: bool) -> Result<(), BackendError> {
        let Some(session) = self.session.lock().await.take() else {
            return Ok(());
        };
        if revoke {
            let path = format!("/v1/session/destroy/{}", session.id);
            let resp = self
                .send(self.request(Method::PUT, &path), "destroy session")
                .await?;
            expect_success(resp, "destroy session").await?;
            let ids: Vec<String> = self.registered.lock().await.keys().cloned().collect();
            for id in ids {
                self.deregister(&id).await?;
            }
            self.registered.lock().await.clear();
            tracing::info!(store = STORE, session = %session.id, "destroyed session and deregistered services");
        }
        Ok(())
    }

    async fn publish(&self, records: &[ServiceRecord]) -> Result<(), BackendError> {
        let session = self.session_id().await?;
        let ttl = self.ttl().await?;
        // KV first: it is the contract other tools watch, and a catalog registration running at
        // the same time on the same agent slows it (measured: docs/benchmarks.md).
        let kv = async {
            if !self.options.kv {
                return Ok(());
            }
            let ops = records
                .iter()
                .map(|r| {
                    lock_ops(
                        &self.layout.service_key(&r.service, &r.id),
                        &r.to_json(),
                        &session,
                    )
                })
                .collect();
            self.txn(ops, Some(&session)).await
        };
        let catalog = async {
            if !self.options.catalog {
                return Ok(());
            }
            let calls: Vec<_> = records.iter().map(|r| self.register(r, ttl)).collect();
            let results: Vec<Result<(), BackendError>> = futures::stream::iter(calls)
                .buffer_unordered(AGENT_CONCURRENCY)
                .collect()
                .await;
            results.into_iter().collect::<Result<Vec<()>, _>>()?;
            let mut registered = self.registered.lock().await;
            for r in records {
                registered.insert(r.id.clone(), r.clone());
            }
            Ok(())
        };
        kv.await?;
        catalog.await
    }

    async fn unpublish(&self, keys: &[ServiceKey]) -> Result<(), BackendError> {
        if self.options.kv {
            let ops = keys
                .iter()
                .map(|k| {
                    vec![json!({"KV": {"Verb": "delete",
                        "Key": self.layout.service_key(&k.service, &k.id)}})]
                })
                .collect();
            self.txn(ops, None).await?;
        }
        if self.options.catalog {
            for k in keys {
                self.deregister(&k.id).await?;
                self.registered.lock().await.remove(&k.id);
            }
        }
        Ok(())
    }

    async fn publish_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        if !self.options.kv {
            return Ok(());
        }
        let session = self.session_id().await?;
        let ops = vec![lock_ops(
            &self.layout.node_key(&node.node_id),
            &node.to_json(),
            &session,
        )];
        self.txn(ops, Some(&session)).await
    }

    async fn list_services(&self) -> Result<Vec<KvEntry>, BackendError> {
        if !self.options.kv {
            // Without KV, the catalog is the store: list this agent's services as records.
            return Ok(Vec::new());
        }
        Ok(self.list_prefix(&self.layout.services_prefix()).await?.0)
    }
}

impl ConsulStore {
    /// A copy that shares the HTTP client but no session or registrations.
    fn sibling(&self) -> ConsulStore {
        ConsulStore {
            http: self.http.clone(),
            base: self.base.clone(),
            endpoint: self.endpoint.clone(),
            layout: self.layout.clone(),
            options: self.options.clone(),
            session: Mutex::new(None),
            registered: Mutex::new(BTreeMap::new()),
            check_round: Mutex::new(None),
        }
    }

    /// Creates a session: `Behavior: delete` (its keys go with it), no lock delay.
    async fn create_session(&self, name: &str, ttl: Duration) -> Result<String, BackendError> {
        let body = json!({
            "Name": name,
            "TTL": format!("{}s", ttl.as_secs().max(MIN_TTL.as_secs())),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let resp = self
            .send(
                self.request(Method::PUT, "/v1/session/create").json(&body),
                "create session",
            )
            .await?;
        if !resp.status().is_success() {
            expect_success(resp, "create session").await?;
            return Err(BackendError::Rejected {
                store: STORE,
                detail: "create session failed".into(),
            });
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        let created: Created = resp.json().await.map_err(|e| BackendError::Rejected {
            store: STORE,
            detail: format!("create session: unreadable answer: {e}"),
        })?;
        Ok(created.id)
    }

    /// Tries to acquire `key` for `session`; `Ok(true)` when it holds the lock.
    async fn try_acquire(
        &self,
        key: &str,
        session: &str,
        holder: &str,
    ) -> Result<bool, BackendError> {
        let path = format!("/v1/kv/{}?acquire={session}", encode_key(key));
        let resp = self
            .send(
                self.request(Method::PUT, &path).body(holder.to_string()),
                "acquire lock",
            )
            .await?;
        if !resp.status().is_success() {
            expect_success(resp, "acquire lock").await?;
            return Ok(false);
        }
        let text = resp.text().await.unwrap_or_default();
        Ok(text.trim() == "true")
    }

    /// Waits (blocking query) until `key` changes or `wait` passes, and says whether it is
    /// held by a session now.
    async fn wait_for_free_lock(
        &self,
        key: &str,
        index: &mut u64,
    ) -> Result<LockState, BackendError> {
        #[derive(Deserialize)]
        struct Pair {
            #[serde(rename = "Session")]
            session: Option<String>,
        }
        let mut path = format!("/v1/kv/{}", encode_key(key));
        if *index > 0 {
            path.push_str(&format!("?index={index}&wait={}s", WATCH_WAIT.as_secs()));
        }
        let timeout = WATCH_WAIT + WATCH_WAIT / 16 + REQUEST_TIMEOUT;
        let resp = self
            .send(
                self.request(Method::GET, &path).timeout(timeout),
                "watch lock",
            )
            .await?;
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        *index = next_index(*index, new_index);
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(LockState::Free);
        }
        let pairs: Vec<Pair> = resp.json().await.unwrap_or_default();
        if pairs.first().and_then(|p| p.session.as_ref()).is_none() {
            return Ok(LockState::Free);
        }
        // Held: the next call blocks on the new index.
        Ok(LockState::Held)
    }
}

/// Whether a lock key is held by a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockState {
    Free,
    Held,
}

impl Coordinator for ConsulStore {
    /// A session with a TTL and a lock on `key` (`?acquire=`), as `consul lock` does.
    async fn campaign(
        &self,
        key: String,
        holder: String,
        ttl: Duration,
    ) -> Result<Leadership, BackendError> {
        let session = self
            .create_session(&format!("swarm-registrator leader {holder}"), ttl)
            .await?;
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        tokio::spawn(keep_session_alive(
            self.sibling(),
            session.clone(),
            ttl.max(MIN_TTL),
            lost_tx,
            stop_rx,
        ));
        let mut index = 0u64;
        loop {
            if self.try_acquire(&key, &session, &holder).await? {
                break;
            }
            // Held by someone else: block until it is free (an error ends the campaign; the
            // caller retries with backoff).
            while self.wait_for_free_lock(&key, &mut index).await? == LockState::Held {}
        }
        tracing::info!(store = STORE, %key, %holder, %session, "elected leader");
        let this = self.sibling();
        let resign = async move {
            let _ = stop_tx.send(());
            let release = format!("/v1/kv/{}?release={session}", encode_key(&key));
            let _ = this
                .send(this.request(Method::PUT, &release), "release lock")
                .await;
            let destroy = format!("/v1/session/destroy/{session}");
            let _ = this
                .send(this.request(Method::PUT, &destroy), "destroy session")
                .await;
        }
        .boxed();
        Ok(Leadership::new(lost_rx, resign))
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let path = format!("/v1/kv/{}", encode_key(key));
        let resp = self
            .send(self.request(Method::PUT, &path).body(value), "KV write")
            .await?;
        expect_success(resp, "KV write").await
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let (entries, _) = list(
            self,
            self.request(
                Method::GET,
                &format!("/v1/kv/{}?recurse=true", encode_key(key)),
            ),
        )
        .await?;
        Ok(entries.into_iter().find(|e| e.key == key).map(|e| e.value))
    }
}

/// Renews a lock session every TTL/3 until `stop` fires or is dropped; reports on `lost` when
/// the session is gone or Consul was unreachable for longer than the TTL.
async fn keep_session_alive(
    store: ConsulStore,
    session: String,
    ttl: Duration,
    lost: futures::channel::oneshot::Sender<String>,
    mut stop: futures::channel::oneshot::Receiver<()>,
) {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        let path = format!("/v1/session/renew/{session}");
        match store
            .send(store.request(Method::PUT, &path), "renew session")
            .await
        {
            Ok(resp) if resp.status() == StatusCode::NOT_FOUND => {
                let _ = lost.send(format!("session {session} was ended"));
                return;
            }
            Ok(resp) if resp.status().is_success() => last_ok = tokio::time::Instant::now(),
            _ => {
                if last_ok.elapsed() > ttl {
                    let _ = lost.send(format!(
                        "Consul unreachable for longer than the {}s TTL",
                        ttl.as_secs()
                    ));
                    return;
                }
            }
        }
    }
}

/// How long a blocking query waits for a change.
const WATCH_WAIT: Duration = Duration::from_secs(60);
/// The least time between two blocking queries, so a busy prefix cannot make us spin.
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(50);

impl Watcher for ConsulStore {
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>> {
        let (tx, rx) = mpsc::channel(256);
        let watcher = self.sibling();
        tokio::spawn(async move { run_watch(watcher, prefix, tx).await });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

type WatchSender = mpsc::Sender<Result<WatchEvent, BackendError>>;

/// Blocking queries in a loop, diffed into events.
async fn run_watch(store: ConsulStore, prefix: String, tx: WatchSender) {
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    let mut known: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut index: u64 = 0;
    loop {
        let started = Instant::now();
        let mut path = format!("/v1/kv/{}?recurse=true", encode_key(&prefix));
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}s", WATCH_WAIT.as_secs()));
        }
        // Consul adds up to wait/16 of jitter to a blocking query.
        let timeout = WATCH_WAIT + WATCH_WAIT / 16 + REQUEST_TIMEOUT;
        let rb = store.request(Method::GET, &path).timeout(timeout);
        let result = tokio::select! {
            r = list(&store, rb) => r,
            _ = tx.closed() => return,
        };
        match result {
            Ok((entries, new_index)) => {
                backoff.reset();
                let current: BTreeMap<String, Vec<u8>> =
                    entries.into_iter().map(|e| (e.key, e.value)).collect();
                let went_back = new_index < index;
                index = next_index(index, new_index);
                let events = match (&known, went_back) {
                    (Some(old), false) => diff(old, &current),
                    _ => vec![WatchEvent::Restarted(
                        current
                            .iter()
                            .map(|(k, v)| KvEntry {
                                key: k.clone(),
                                value: v.clone(),
                            })
                            .collect(),
                    )],
                };
                if went_back {
                    tracing::info!(store = STORE, %prefix, "the index went backwards; listing again");
                }
                known = Some(current);
                for e in events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
            Err(err) => {
                tracing::warn!(store = STORE, %prefix, error = %err, "blocking query failed; will list again");
                if tx.send(Err(err)).await.is_err() {
                    return;
                }
                known = None;
                index = 0;
                let delay = backoff.next_delay(rand::random::<f64>());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tx.closed() => return,
                }
                continue;
            }
        }
        let elapsed = started.elapsed();
        if elapsed < WATCH_MIN_INTERVAL {
            tokio::time::sleep(WATCH_MIN_INTERVAL - elapsed).await;
        }
    }
}

/// The events that turn `old` into `new`.
fn diff(old: &BTreeMap<String, Vec<u8>>, new: &BTreeMap<String, Vec<u8>>) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            events.push(WatchEvent::Put(KvEntry {
                key: k.clone(),
                value: v.clone(),
            }));
        }
    }
    for k in old.keys() {
        if !new.contains_key(k) {
            events.push(WatchEvent::Deleted(k.clone()));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_follows_consuls_rules() {
        let mut labels = BTreeMap::new();
        labels.insert("registrator.port".to_string(), "27017".to_string());
        labels.insert("consul-x".to_string(), "v".to_string());
        labels.insert("long".to_string(), "é".repeat(300));
        for i in 0..100 {
            labels.insert(format!("z{i:03}"), "v".into());
        }
        let r = ServiceRecord {
            schema_version: 1,
            service: "db".into(),
            id: "t1".into(),
            ip: "10.0.0.1".parse().expect("ip"),
            port: 1,
            protocol: backend_core::Protocol::Tcp,
            tags: vec![],
            labels,
            attrs: BTreeMap::new(),
            container_id: "c".into(),
            container_name: "n".into(),
            node_id: "n1".into(),
            hostname: "h".into(),
            task_id: Some("t1".into()),
            task_slot: Some(2),
            service_id: None,
            stack: None,
            health: None,
            started_at: None,
        };
        let meta = catalog_meta(&r);
        assert_eq!(meta.len(), 64);
        assert_eq!(meta.get("task_slot").map(String::as_str), Some("2"));
        assert_eq!(
            meta.get("registrator_port").map(String::as_str),
            Some("27017")
        );
        assert!(meta.contains_key("x-consul-x"));
        assert!(meta.get("long").is_some_and(|v| v.len() <= 512));
        for k in meta.keys() {
            assert!(k.len() <= 128 && !k.starts_with("consul-"));
            assert!(k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        }
    }

    #[test]
    fn diffs() {
        let old = BTreeMap::from([
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"1".to_vec()),
        ]);
        let new = BTreeMap::from([
            ("a".to_string(), b"2".to_vec()),
            ("c".to_string(), b"1".to_vec()),
        ]);
        let events = diff(&old, &new);
        assert_eq!(events.len(), 3);
        assert!(events.contains(&WatchEvent::Deleted("b".into())));
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1, "never below 1");
        assert_eq!(next_index(5, 9), 9);
        assert_eq!(next_index(9, 5), 0, "backwards: read everything again");
    }

    #[test]
    fn transactions_never_split_a_key() {
        let per_key: Vec<Vec<serde_json::Value>> = (0..40)
            .map(|i| lock_ops(&format!("k{i}"), b"v", "s"))
            .collect();
        let batches = txn_batches(per_key);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![64, 16]
        );
        assert_eq!(batches[0][0]["KV"]["Verb"], "delete");
        assert_eq!(batches[0][1]["KV"]["Verb"], "lock");
        assert_eq!(batches[0][1]["KV"]["Value"], "dg==");
    }

    #[test]
    fn keys_are_encoded_for_paths() {
        assert_eq!(
            encode_key("p/services/web/vm:web-1:80"),
            "p/services/web/vm%3Aweb-1%3A80"
        );
        assert_eq!(encode_key("a b"), "a%20b");
    }

    #[test]
    fn tokens_are_never_printed() {
        let t = Token::new("s3cret", "CONSUL_HTTP_TOKEN");
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
