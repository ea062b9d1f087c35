//! The etcd v3 backend.
//!
//! Publishing: one lease per bridge process. Every record is put with that lease, so when the
//! bridge stops renewing it (the process or its node died) etcd deletes the records after the
//! TTL. Writes of many records are batched into transactions of at most [`MAX_TXN_OPS`]
//! operations (etcd's default `--max-txn-ops`).
//!
//! Watching: list the prefix at a revision, then watch from the next revision. When the watch
//! breaks (etcd restarted, the connection dropped) or etcd says the revision was compacted, the
//! watcher backs off, lists again and yields [`WatchEvent::Restarted`].
//!
//! A cluster of several members (`etcd://a:2379,b:2379,c:2379/prefix`): every request and
//! watch requires a leader (gRPC metadata `hasleader=true`), so a member cut off from its
//! cluster refuses instead of answering with what it last knew. The publishing and watching
//! paths talk to one member at a time and move to the next after a failure (a refusal, a
//! broken connection, a deadline passed), so that a member that hangs (SIGSTOP, a dropped
//! link: its connections stay open and answer nothing) is left after one deadline, not
//! picked again at random. The deadlines and keepalives are explained at [`REQUEST_TIMEOUT`].
//!
//! Security ([`EtcdOptions`]): TLS with a CA of its own and a client certificate (etcd's
//! `--client-cert-auth`), and a user of etcd's RBAC with its password. The client logs in on
//! its first request (not when it is made, so that an etcd that is down at start is a
//! transient error like any other) and logs in again when etcd says the token expired. A
//! request etcd refuses for want of permission is [`BackendError::Rejected`], naming the key.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backend_core::keepalive::{keep_alive, Renew, Renewal};
use backend_core::{
    error_chain, is_tls_failure, BackendError, Backoff, Coordinator, KeyLayout, KvEntry,
    Leadership, NodeRecord, Publisher, Result, Secret, ServiceKey, ServiceRecord, WatchEvent,
    Watcher,
};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, ResignOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures::stream::BoxStream;
use futures::FutureExt;
use tokio::sync::{mpsc, Mutex};

const STORE: &str = "etcd";

/// etcd's default limit on the operations of one transaction (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// How many keys one range request reads when listing.
const LIST_PAGE: i64 = 1000;

/// The most keys and values one transaction of this program carries: under etcd's request
/// limit (`--max-request-bytes`, 1.5 MiB by default), and small enough that the watch event
/// of one transaction stays under the client's 4 MiB answer limit.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// How long one request may take before the member it went to is considered unreachable, and
/// the next one tried. A request that goes through takes milliseconds, even one that waits for
/// a quorum; 3 s leaves room for a slow disk's fsync and still lets a client leave a hung
/// member, try another and succeed well within 10 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// HTTP/2 keepalive: a ping after this long without a frame from the member, on a connection
/// with a request or watch open. Not shorter: etcd refuses pings closer than its
/// `--grpc-keepalive-min-time` (5 s by default) and closes the connection (GOAWAY
/// `too_many_pings`). Not sent on an idle connection, which etcd counts as abuse too.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long the answer to a keepalive ping may take before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A watch asks its member for a progress report (etcd's `RequestProgress`) this often; the
/// member answers with its revision even when nothing changed. A watch is the one request
/// that may legitimately hear nothing for hours: this is how it notices a member that hangs.
const WATCH_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A watch that has heard nothing from its member (no event, no progress report) for this
/// long is broken, and the watcher lists again through the next member. With the probe every
/// second, a hung member is noticed after 4 to 5 s.
const WATCH_SILENCE: Duration = Duration::from_secs(4);

/// How to reach a secured etcd: TLS files and a user. The default is plain etcd without
/// authentication.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Speak TLS (`etcd+https://`); `ca_file` is then required.
    pub tls: bool,
    /// A PEM file of the CA that signed etcd's certificate; only it is trusted.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate and its key, for etcd's `--client-cert-auth`.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The RBAC user and its password.
    pub user: Option<(String, Secret)>,
}

/// A configuration that cannot work, found before any request.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {option} {path}: {source}")]
    Read {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {path} holds no PEM {label}; give the PEM file (-----BEGIN {label}-----)")]
    NotPem {
        option: &'static str,
        path: PathBuf,
        label: &'static str,
    },
    #[error(
        "etcd over TLS needs a CA file (--etcd-ca-file): the CA that signed etcd's certificate"
    )]
    NoCa,
    #[error("--etcd-client-cert and --etcd-client-key must be given together")]
    HalfIdentity,
    #[error("cannot set up the etcd client")]
    Client(#[source] BackendError),
}

impl EtcdOptions {
    /// The TLS configuration of these options: the files read and checked to be PEM.
    fn tls_config(&self) -> Result<Option<TlsOptions>, ConfigError> {
        if !self.tls {
            return Ok(None);
        }
        let ca = self.ca_file.as_ref().ok_or(ConfigError::NoCa)?;
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(
            "--etcd-ca-file",
            ca,
            "CERTIFICATE",
        )?));
        match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => {
                let cert = read_pem("--etcd-client-cert", cert, "CERTIFICATE")?;
                let key = read_pem("--etcd-client-key", key, "PRIVATE KEY")?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => return Err(ConfigError::HalfIdentity),
        }
        Ok(Some(tls))
    }
}

/// The contents of the PEM file at `path`, given by `option`, which must hold a section whose
/// label ends with `label` (`CERTIFICATE`; `PRIVATE KEY` also matches `RSA PRIVATE KEY`).
fn read_pem(
    option: &'static str,
    path: &PathBuf,
    label: &'static str,
) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::Read {
        option,
        path: path.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    let has_section = text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !has_section {
        return Err(ConfigError::NotPem {
            option,
            path: path.clone(),
            label,
        });
    }
    Ok(pem)
}

/// One etcd client over every endpoint and, when etcd has authentication enabled, the login
/// it needs before its first request. Cheap to clone (the channels and the tokens are shared).
///
/// Every request goes through one client per endpoint, the one in use (`pinned`), and moves
/// on to the next endpoint when a request through it fails for want of the member
/// ([`Conn::failed`]). The client balanced over every endpoint is only for
/// [`EtcdStore::client`]: it picks an endpoint at random for each request, so a hung member
/// would go on receiving a share of them until a keepalive closes its connection (and a new one
/// to it, which the kernel accepts for a stopped process, hangs again); and after the members
/// come back it can go on failing with `tcp connect error` for several requests.
#[derive(Clone)]
struct Conn {
    client: Client,
    pinned: Arc<Pinned>,
    login: Option<Arc<Login>>,
}

/// One client per endpoint, each logged in on its first use, and the index of the one in use.
struct Pinned {
    clients: Vec<(String, Client, tokio::sync::OnceCell<()>)>,
    current: std::sync::atomic::AtomicUsize,
}

/// A user to log in as, once per client (etcd-client refreshes an expired token by itself
/// after that).
struct Login {
    user: String,
    password: Secret,
}

impl Conn {
    /// The client of the endpoint in use, logged in, and its index for [`Conn::failed`].
    async fn pinned(&self) -> Result<(usize, Client), BackendError> {
        use std::sync::atomic::Ordering;
        let n = self.pinned.clients.len();
        let i = self.pinned.current.load(Ordering::Relaxed) % n;
        let (endpoint, client, done) = &self.pinned.clients[i];
        if let Some(login) = &self.login {
            let logged_in = done
                .get_or_try_init(|| log_in(client, login, endpoint))
                .await;
            if let Err(e) = logged_in {
                self.failed(i, &e);
                return Err(e);
            }
        }
        Ok((i, client.clone()))
    }

    /// A request through the endpoint of index `used` failed with `err`: when the member may
    /// be at fault (unreachable, hung, without a leader), the next request goes to the next
    /// endpoint. Only once for concurrent failures through the same endpoint.
    fn failed(&self, used: usize, err: &BackendError) {
        if matches!(err, BackendError::Unavailable { .. }) {
            self.move_on(used, err);
        }
    }

    /// The endpoint of index `used` did not answer: the next request goes to the next one.
    fn move_on(&self, used: usize, err: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering;
        let n = self.pinned.clients.len();
        if n < 2 {
            return;
        }
        let next = (used + 1) % n;
        let moved = self
            .pinned
            .current
            .compare_exchange(used, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if moved {
            tracing::warn!(
                store = STORE,
                from = %self.pinned.clients[used].0,
                to = %self.pinned.clients[next].0,
                error = %err,
                "etcd member failed a request; moving to the next endpoint"
            );
        }
    }

    /// The endpoint of index `i`, for errors.
    fn endpoint(&self, i: usize) -> &str {
        &self.pinned.clients[i].0
    }
}

/// Logs `client` in as `login`'s user.
async fn log_in(client: &Client, login: &Login, endpoints: &str) -> Result<(), BackendError> {
    let mut client = client.clone();
    let creds = (login.user.clone(), login.password.expose().to_string());
    client.update_user(Some(creds)).await.map_err(|e| {
        let what = format!(
            "log in as user {:?} with the password from {}",
            login.user,
            login.password.source()
        );
        map_error(endpoints, &what, e)
    })?;
    tracing::info!(store = STORE, user = %login.user, %endpoints, "logged in to etcd");
    Ok(())
}

/// An etcd cluster, seen through one client.
pub struct EtcdStore {
    client: Conn,
    /// A client without a request timeout, for calls that block by design (a campaign).
    long_client: Conn,
    endpoints: String,
    layout: KeyLayout,
    lease: Mutex<Option<Lease>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// The lease that ties this process's records to it.
struct Lease {
    id: i64,
    /// The keep-alive stream, opened on the first renewal and re-opened after an error, and the
    /// index of the endpoint it goes to.
    keeper: Option<(usize, (LeaseKeeper, LeaseKeepAliveStream))>,
}

impl EtcdStore {
    /// A client for these endpoints (`host:port`). No connection is made yet: the first request
    /// connects, so an etcd that is down at start is reported by that request, and retried by
    /// the caller.
    pub async fn connect(endpoints: &[String], layout: KeyLayout) -> Result<Self, BackendError> {
        match EtcdStore::connect_with(endpoints, layout, &EtcdOptions::default()).await {
            Ok(store) => Ok(store),
            Err(ConfigError::Client(e)) => Err(e),
            Err(other) => Err(BackendError::Rejected {
                store: STORE,
                detail: other.to_string(),
                source: Some(Box::new(other)),
            }),
        }
    }

    /// [`EtcdStore::connect`] with TLS and a user. The files are read now; the login happens on
    /// the first request.
    pub async fn connect_with(
        endpoints: &[String],
        layout: KeyLayout,
        options: &EtcdOptions,
    ) -> Result<Self, ConfigError> {
        let tls = options.tls_config()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        // In errors: `https://` names the TLS endpoints (see `map_error`).
        let joined = if tls.is_some() {
            urls.join(",")
        } else {
            endpoints.join(",")
        };
        let conn = |timeout: Option<Duration>| {
            let mut connect = ConnectOptions::new()
                .with_connect_timeout(REQUEST_TIMEOUT)
                .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
                .with_keep_alive_while_idle(false)
                // A member without a leader refuses (`etcdserver: no leader`) instead of
                // answering from what it last knew; a watch on it is cancelled.
                .with_require_leader(true)
                // An expired token (etcd's --auth-token-ttl) is renewed and the request retried.
                .with_auto_token_refresh(true);
            if let Some(timeout) = timeout {
                connect = connect.with_timeout(timeout);
            }
            if let Some(tls) = &tls {
                connect = connect.with_tls(tls.clone());
            }
            let (urls, joined) = (urls.clone(), joined.clone());
            async move {
                // Without a user in the options this makes no request: the first call connects.
                let client = Client::connect(&urls, Some(connect.clone()))
                    .await
                    .map_err(|e| ConfigError::Client(map_error(&joined, "connect", e)))?;
                let mut clients = Vec::with_capacity(urls.len());
                for url in &urls {
                    let one = Client::connect([url], Some(connect.clone()))
                        .await
                        .map_err(|e| ConfigError::Client(map_error(url, "connect", e)))?;
                    clients.push((url.clone(), one, tokio::sync::OnceCell::new()));
                }
                // Clients of one store start on different members, spreading the load.
                let first = rand::random::<u32>() as usize % clients.len().max(1);
                let pinned = Arc::new(Pinned {
                    clients,
                    current: first.into(),
                });
                let login = options.user.as_ref().map(|(user, password)| {
                    Arc::new(Login {
                        user: user.clone(),
                        password: password.clone(),
                    })
                });
                Ok::<Conn, ConfigError>(Conn {
                    client,
                    pinned,
                    login,
                })
            }
        };
        Ok(EtcdStore {
            client: conn(Some(REQUEST_TIMEOUT)).await?,
            long_client: conn(None).await?,
            endpoints: joined,
            layout,
            lease: Mutex::new(None),
        })
    }

    /// A client balanced over every endpoint, for callers that need more of etcd than the
    /// traits offer (tests, tools). It is not logged in: for a store without users.
    pub fn client(&self) -> Client {
        self.client.client.clone()
    }

    /// The endpoint that the publishing and watching requests go to now (`http://host:port`);
    /// it moves to the next one after a failure.
    pub fn current_endpoint(&self) -> String {
        let i = self
            .client
            .pinned
            .current
            .load(std::sync::atomic::Ordering::Relaxed);
        let n = self.client.pinned.clients.len();
        self.client.endpoint(i % n).to_string()
    }

    async fn lease_id(&self) -> Result<i64, BackendError> {
        self.lease
            .lock()
            .await
            .as_ref()
            .map(|l| l.id)
            .ok_or(BackendError::NoSession { store: STORE })
    }

    /// Puts key/value pairs with the lease, in transactions of at most [`MAX_TXN_OPS`] and
    /// [`MAX_TXN_BYTES`].
    async fn put_with_lease(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<(), BackendError> {
        let lease = self.lease_id().await?;
        let (used, mut client) = self.client.pinned().await?;
        let endpoint = self.client.endpoint(used);
        let chunks =
            backend_core::batches(kvs, MAX_TXN_OPS, MAX_TXN_BYTES, |(k, v)| k.len() + v.len());
        for chunk in &chunks {
            let what = puts(chunk.iter().map(|(k, _)| k.as_str()), chunk.len());
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| {
                    let options = PutOptions::new().with_lease(lease);
                    TxnOp::put(k.as_str(), v.clone(), Some(options))
                })
                .collect();
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| map_lease_error(endpoint, &what, lease, e))
                .inspect_err(|e| self.client.failed(used, e))?;
        }
        Ok(())
    }

    /// Reads every key under `prefix` at one revision, page by page. Returns the entries and
    /// the revision they were read at.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, i64), BackendError> {
        list_prefix(&self.client, prefix).await
    }
}

/// What a transaction of puts of `keys` (`n` of them) did, for its errors: the first key,
/// and how many more.
fn puts<'a>(mut keys: impl Iterator<Item = &'a str>, n: usize) -> String {
    match (keys.next(), n) {
        (Some(first), 1) => format!("put {first}"),
        (Some(first), n) => format!("put {first} and {} more keys", n - 1),
        (None, _) => "an empty transaction".to_string(),
    }
}

async fn list_prefix(conn: &Conn, prefix: &str) -> Result<(Vec<KvEntry>, i64), BackendError> {
    let (used, client) = conn.pinned().await?;
    list_prefix_through(conn.endpoint(used), client, prefix)
        .await
        .inspect_err(|e| conn.failed(used, e))
}

/// [`list_prefix`] through `client`, whose endpoint is `endpoints` (for errors).
async fn list_prefix_through(
    endpoints: &str,
    mut client: Client,
    prefix: &str,
) -> Result<(Vec<KvEntry>, i64), BackendError> {
    let what = format!("list {prefix}");
    let end = prefix_range_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut entries = Vec::new();
    let mut limit = LIST_PAGE;
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let resp = match client.get(from.clone(), Some(options)).await {
            Ok(resp) => resp,
            // A page over the client's 4 MiB answer limit (large values someone else wrote):
            // the same page again, in smaller ones.
            Err(etcd_client::Error::GRpcStatus(s))
                if s.code() == tonic::Code::OutOfRange && limit > 1 =>
            {
                limit = (limit / 4).max(1);
                tracing::warn!(store = STORE, %prefix, limit, "a page of the listing was too large; reading smaller pages");
                continue;
            }
            Err(e) => return Err(map_error(endpoints, &what, e)),
        };
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            // Keys this program did not write may not be UTF-8; they cannot be ours.
            if let Ok(key) = kv.key_str() {
                entries.push(KvEntry {
                    key: key.to_string(),
                    value: kv.value().to_vec(),
                });
            }
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok((entries, revision))
}

/// The end of the key range that holds exactly the keys starting with `prefix`, as etcd's
/// clients compute it: the prefix with its last byte below 0xff incremented.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // An empty prefix, or one of only 0xff bytes: to the end of the keyspace.
    vec![0]
}

/// Maps the error of a request made with `lease` (a put with it, a keep-alive, a
/// revocation): etcd answers NotFound for such a request only when the lease is gone.
fn map_lease_error(
    endpoints: &str,
    what: &str,
    lease: i64,
    err: etcd_client::Error,
) -> BackendError {
    match err {
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::NotFound => {
            BackendError::SessionLost {
                store: STORE,
                detail: format!("{what}: lease {lease:x}: {}", status.message()),
            }
        }
        other => map_error(endpoints, what, other),
    }
}

/// etcd's message for a request its RBAC refuses (`rpctypes.ErrGRPCPermissionDenied`). The
/// election and lock services run on an in-process client that loses the status code and
/// answer `Unknown` with this message (etcd-client matches the token error the same way).
const PERMISSION_DENIED: &str = "etcdserver: permission denied";

/// Maps the client's error onto what the caller can act on, keeping it as the cause. `what`
/// says what was asked (`put <key>`, `list <prefix>`), so that a refusal names the key.
fn map_error(endpoints: &str, what: &str, err: etcd_client::Error) -> BackendError {
    use etcd_client::Error as E;
    let unavailable = |detail: String, err: E| BackendError::Unavailable {
        store: STORE,
        endpoints: endpoints.to_string(),
        detail: format!("{what}: {detail}"),
        source: Some(Box::new(err)),
    };
    let rejected = |detail: String, err: E| BackendError::Rejected {
        store: STORE,
        detail: format!("{what}: {detail}"),
        source: Some(Box::new(err)),
    };
    // A handshake that failed on our side (an unknown CA) or with the server's alert (a refused
    // client certificate): a status carries the transport error as its source.
    let tls_failure = match &err {
        E::GRpcStatus(status) => is_tls_failure(status),
        other => is_tls_failure(other),
    };
    if tls_failure {
        let detail = format!(
            "TLS handshake with {endpoints} failed: {}; check --etcd-ca-file (the CA of etcd's \
             certificate) and --etcd-client-cert / --etcd-client-key",
            error_chain(&err)
        );
        return rejected(detail, err);
    }
    match &err {
        E::GRpcStatus(status) => {
            use tonic::Code;
            let detail = status.message().to_string();
            match status.code() {
                Code::PermissionDenied => rejected(
                    format!("permission denied ({detail}); the etcd user's roles do not allow it"),
                    err,
                ),
                Code::Unknown if detail == PERMISSION_DENIED => rejected(
                    format!("permission denied ({detail}); the etcd user's roles do not allow it"),
                    err,
                ),
                Code::Unauthenticated => rejected(
                    format!(
                        "{detail}; etcd wants a user: check --etcd-username and \
                         --etcd-password-file"
                    ),
                    err,
                ),
                Code::Unavailable | Code::Cancelled | Code::Unknown => {
                    unavailable(format!("{detail}{}", tls_hint(endpoints)), err)
                }
                Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Internal => unavailable(detail, err),
                _ => rejected(detail, err),
            }
        }
        E::InvalidArgs(detail) | E::EndpointError(detail) => rejected(detail.clone(), err),
        E::InvalidUri(e) => rejected(format!("invalid endpoint {endpoints:?}: {e}"), err),
        _ => unavailable(format!("{}{}", error_chain(&err), tls_hint(endpoints)), err),
    }
}

/// What to check when a connection over TLS fails. Over TLS 1.3 a server refuses a client
/// certificate after the client's side of the handshake is done: the client sees the
/// connection closed, as in an outage. It is retried as one, and says what to check should it
/// go on. Empty for plain endpoints (`endpoints` names TLS ones with `https://`).
fn tls_hint(endpoints: &str) -> &'static str {
    if endpoints.starts_with("https://") {
        "; if this goes on, check --etcd-client-cert / --etcd-client-key (etcd with \
         --client-cert-auth closes the connection of a client without a certificate it \
         trusts) and --etcd-ca-file"
    } else {
        ""
    }
}

impl Publisher for EtcdStore {
    fn store_name(&self) -> &'static str {
        STORE
    }

    async fn open_session(&self, ttl: Duration) -> Result<(), BackendError> {
        let least = Duration::from_secs(1);
        let detail = "etcd leases are granted in whole seconds, at least 1";
        backend_core::require_ttl(STORE, ttl, least, detail)?;
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let (used, mut client) = self.client.pinned().await?;
        let resp = client
            .lease_grant(secs, None)
            .await
            .map_err(|e| map_error(self.client.endpoint(used), "grant a lease", e))
            .inspect_err(|e| self.client.failed(used, e))?;
        if !resp.error().is_empty() {
            return Err(BackendError::Rejected {
                store: STORE,
                detail: resp.error().to_string(),
                source: None,
            });
        }
        tracing::info!(
            store = STORE,
            lease = format!("{:x}", resp.id()),
            ttl_secs = resp.ttl(),
            "granted lease"
        );
        *self.lease.lock().await = Some(Lease {
            id: resp.id(),
            keeper: None,
        });
        Ok(())
    }

    async fn renew_session(&self) -> Result<(), BackendError> {
        let mut guard = self.lease.lock().await;
        let lease = guard
            .as_mut()
            .ok_or(BackendError::NoSession { store: STORE })?;
        if lease.keeper.is_none() {
            let (used, mut client) = self.client.pinned().await?;
            let endpoint = self.client.endpoint(used);
            let pair = client
                .lease_keep_alive(lease.id)
                .await
                .map_err(|e| map_lease_error(endpoint, "keep the lease alive", lease.id, e))
                .inspect_err(|e| self.client.failed(used, e))?;
            lease.keeper = Some((used, pair));
        }
        let used = lease.keeper.as_ref().map(|(used, _)| *used);
        let result = match lease.keeper.as_mut().map(|(_, pair)| pair) {
            Some((keeper, stream)) => {
                let exchange = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
                    Ok(Ok(Some(_))) => Err(BackendError::SessionLost {
                        store: STORE,
                        detail: format!("lease {:x} expired", lease.id),
                    }),
                    Ok(Ok(None)) => Err(BackendError::Unavailable {
                        store: STORE,
                        endpoints: self.endpoints.clone(),
                        detail: "the lease keep-alive stream ended".into(),
                        source: None,
                    }),
                    Ok(Err(e)) => Err(map_lease_error(
                        &self.endpoints,
                        "keep the lease alive",
                        lease.id,
                        e,
                    )),
                    Err(_) => Err(BackendError::Unavailable {
                        store: STORE,
                        endpoints: self.endpoints.clone(),
                        detail: format!("no keep-alive answer within {REQUEST_TIMEOUT:?}"),
                        source: None,
                    }),
                }
            }
            None => Ok(()),
        };
        if let Err(e) = &result {
            // A broken stream is re-opened on the next renewal, through the next member when
            // this one may be at fault.
            lease.keeper = None;
            if let Some(used) = used {
                self.client.failed(used, e);
            }
        }
        if matches!(result, Err(BackendError::SessionLost { .. })) {
            *guard = None;
        }
        result
    }

    async fn close_session(&self, revoke: bool) -> Result<(), BackendError> {
        let Some(lease) = self.lease.lock().await.take() else {
            return Ok(());
        };
        if revoke {
            let (used, mut client) = self.client.pinned().await?;
            let endpoint = self.client.endpoint(used);
            client
                .lease_revoke(lease.id)
                .await
                .map_err(|e| map_lease_error(endpoint, "revoke the lease", lease.id, e))
                .inspect_err(|e| self.client.failed(used, e))?;
            tracing::info!(
                store = STORE,
                lease = format!("{:x}", lease.id),
                "revoked lease"
            );
        }
        Ok(())
    }

    async fn publish(&self, records: &[ServiceRecord]) -> Result<(), BackendError> {
        let kvs = records
            .iter()
            .map(|r| (self.layout.service_key(&r.service, &r.id), r.to_json()))
            .collect();
        self.put_with_lease(kvs).await
    }

    async fn unpublish(&self, keys: &[ServiceKey]) -> Result<(), BackendError> {
        let (used, mut client) = self.client.pinned().await?;
        let endpoint = self.client.endpoint(used);
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|k| self.layout.service_key(&k.service, &k.id))
                .collect();
            let what = format!(
                "delete {}",
                puts(keys.iter().map(String::as_str), keys.len())
            );
            let ops: Vec<TxnOp> = keys.into_iter().map(|k| TxnOp::delete(k, None)).collect();
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| map_error(endpoint, &what, e))
                .inspect_err(|e| self.client.failed(used, e))?;
        }
        Ok(())
    }

    async fn publish_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        self.put_with_lease(vec![(self.layout.node_key(&node.node_id), node.to_json())])
            .await
    }

    async fn list_services(&self) -> Result<Vec<KvEntry>, BackendError> {
        Ok(self.list_prefix(&self.layout.services_prefix()).await?.0)
    }

    fn layout(&self) -> &KeyLayout {
        &self.layout
    }
}

impl Watcher for EtcdStore {
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>> {
        let (tx, rx) = mpsc::channel(256);
        let conn = self.client.clone();
        tokio::spawn(async move { run_watch(conn, prefix, tx).await });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

type WatchSender = mpsc::Sender<Result<WatchEvent, BackendError>>;

/// List, then watch from the next revision; on any break, back off and list again. Ends when
/// the receiving side is dropped.
async fn run_watch(conn: Conn, prefix: String, tx: WatchSender) {
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    loop {
        match list_and_follow(&conn, &prefix, &tx, &mut backoff).await {
            Ok(()) => return, // the receiver is gone
            Err(err) => {
                tracing::warn!(store = STORE, %prefix, error = %err, "watch broken; will list again");
                if tx.send(Err(err)).await.is_err() {
                    return;
                }
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
    }
}

/// One list-then-watch cycle. `Ok(())` only when the receiver is gone.
async fn list_and_follow(
    conn: &Conn,
    prefix: &str,
    tx: &WatchSender,
    backoff: &mut Backoff,
) -> Result<(), BackendError> {
    // The list and the watch go to the same member; on a failure the next cycle goes to the
    // next one.
    let (used, client) = conn.pinned().await?;
    follow_through(conn.endpoint(used), client, prefix, tx, backoff)
        .await
        .inspect_err(|e| conn.failed(used, e))
}

/// [`list_and_follow`] through `client`, whose endpoint is `endpoints`.
async fn follow_through(
    endpoints: &str,
    mut client: Client,
    prefix: &str,
    tx: &WatchSender,
    backoff: &mut Backoff,
) -> Result<(), BackendError> {
    let what = format!("watch {prefix}");
    let (entries, revision) = list_prefix_through(endpoints, client.clone(), prefix).await?;
    if tx.send(Ok(WatchEvent::Restarted(entries))).await.is_err() {
        return Ok(());
    }
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let (mut requests, mut stream) = client
        .watch(prefix, Some(options))
        .await
        .map_err(|e| map_error(endpoints, &what, e))?
        .split();
    let mut probe = tokio::time::interval(WATCH_PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            _ = probe.tick() => {
                if heard.elapsed() > WATCH_SILENCE {
                    return Err(BackendError::Unavailable {
                        store: STORE,
                        endpoints: endpoints.to_string(),
                        detail: format!(
                            "{what}: no event and no progress report for {WATCH_SILENCE:?}; \
                             the member hangs or is cut off"
                        ),
                        source: None,
                    });
                }
                // The answer is a response without events, like any other one. A send that
                // fails means the stream is broken, which its next message reports.
                let _ = tokio::time::timeout(WATCH_PROBE_INTERVAL, requests.request_progress())
                    .await;
                continue;
            }
            _ = tx.closed() => return Ok(()),
        };
        heard = tokio::time::Instant::now();
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return Err(BackendError::Unavailable {
                    store: STORE,
                    endpoints: endpoints.to_string(),
                    detail: "the watch stream ended".into(),
                    source: None,
                })
            }
            Err(e) => return Err(map_error(endpoints, &what, e)),
        };
        if resp.canceled() && resp.cancel_reason().contains(PERMISSION_DENIED) {
            // etcd checks a watch's permission when it is made, and cancels it if refused.
            return Err(BackendError::Rejected {
                store: STORE,
                detail: format!(
                    "{what}: permission denied ({}); the etcd user's roles do not allow it",
                    resp.cancel_reason()
                ),
                source: None,
            });
        }
        if resp.canceled() {
            let detail = if resp.compact_revision() > 0 {
                format!(
                    "history before revision {} was compacted",
                    resp.compact_revision()
                )
            } else {
                format!("etcd canceled the watch: {}", resp.cancel_reason())
            };
            return Err(BackendError::Unavailable {
                store: STORE,
                endpoints: endpoints.to_string(),
                detail,
                source: None,
            });
        }
        backoff.reset();
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            let item = match event.event_type() {
                EventType::Put => WatchEvent::Put(KvEntry {
                    key: key.to_string(),
                    value: kv.value().to_vec(),
                }),
                EventType::Delete => WatchEvent::Deleted(key.to_string()),
            };
            if tx.send(Ok(item)).await.is_err() {
                return Ok(());
            }
        }
    }
}

impl Coordinator for EtcdStore {
    /// etcd's election API: a lease, kept alive by a task, and a campaign on `key` with it.
    async fn campaign(&self, key: String, holder: String, ttl: Duration) -> Result<Leadership> {
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        // One member's client for the whole campaign, the next one after a failure: the
        // client balanced over every member can go on failing with `tcp connect error` for
        // several requests after the members are back, and a campaign retried with backoff
        // makes few requests.
        let (used, mut client) = self.long_client.pinned().await?;
        let endpoint = self.long_client.endpoint(used).to_string();
        let granted_at = tokio::time::Instant::now();
        let lease = client
            .lease_grant(secs, None)
            .await
            .map_err(|e| map_error(&endpoint, "grant a lease", e))
            .inspect_err(|e| self.long_client.failed(used, e))?
            .id();
        // The lease lives `secs` from when etcd granted it, never before the request started.
        let deadline =
            backend_core::LeaseDeadline::new(granted_at, Duration::from_secs(secs as u64));
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        let renewal = LeaseRenewal {
            conn: self.client.clone(),
            lease,
            pair: None,
        };
        tokio::spawn(keep_alive(
            "etcd",
            deadline.clone(),
            lost_tx,
            stop_rx,
            renewal,
        ));
        let campaign = client.campaign(key.clone(), holder.clone(), lease).await;
        let resp = match campaign {
            Ok(resp) => resp,
            Err(e) => {
                // The lease is of no use now (it would otherwise be kept alive for ever).
                let _ = stop_tx.send(());
                let _ = client.lease_revoke(lease).await;
                let what = format!("campaign for {key} (an election key under {key}/)");
                let err = map_error(&endpoint, &what, e);
                self.long_client.failed(used, &err);
                return Err(err);
            }
        };
        let Some(leader) = resp.leader().cloned() else {
            let _ = stop_tx.send(());
            let _ = client.lease_revoke(lease).await;
            return Err(BackendError::Rejected {
                store: STORE,
                detail: format!("campaign for {key}: etcd answered without the leader key"),
                source: None,
            });
        };
        let fence = backend_core::Fence {
            key: String::from_utf8_lossy(leader.key()).into_owned(),
            token: backend_core::FenceToken::CreateRevision(leader.rev()),
            deadline,
        };
        tracing::info!(
            store = STORE,
            %key,
            %holder,
            lease = format!("{lease:x}"),
            leader_key = %fence.key,
            create_revision = leader.rev(),
            "elected leader"
        );
        let resign = async move {
            let _ = stop_tx.send(());
            let _ = client
                .resign(Some(ResignOptions::new().with_leader(leader)))
                .await;
            let _ = client.lease_revoke(lease).await;
        }
        .boxed();
        Ok(Leadership::new(lost_rx, resign, fence))
    }

    /// A transaction: the put happens only if the campaign's key still has the create revision
    /// it had when this process was elected (it is gone once the lease expired or was revoked,
    /// and a new campaign's key has another revision).
    async fn put_value_fenced(
        &self,
        fence: &backend_core::Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), BackendError> {
        let backend_core::FenceToken::CreateRevision(rev) = fence.token else {
            return Err(BackendError::Rejected {
                store: STORE,
                detail: format!("put {key}: the fence is not an etcd leader key"),
                source: None,
            });
        };
        let compare = etcd_client::Compare::create_revision(
            fence.key.as_str(),
            etcd_client::CompareOp::Equal,
            rev,
        );
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, None)]);
        let (used, mut client) = self.client.pinned().await?;
        let resp = client
            .txn(txn)
            .await
            .map_err(|e| {
                map_error(
                    self.client.endpoint(used),
                    &format!("put {key} as leader"),
                    e,
                )
            })
            .inspect_err(|e| self.client.failed(used, e))?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(BackendError::Fenced {
                store: STORE,
                key: key.to_string(),
                leader_key: fence.key.clone(),
            })
        }
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let (used, mut client) = self.client.pinned().await?;
        client
            .put(key, value, None)
            .await
            .map_err(|e| map_error(self.client.endpoint(used), &format!("put {key}"), e))
            .inspect_err(|e| self.client.failed(used, e))?;
        Ok(())
    }

    async fn delete_value(&self, key: &str) -> Result<(), BackendError> {
        let (used, mut client) = self.client.pinned().await?;
        client
            .delete(key, None)
            .await
            .map_err(|e| map_error(self.client.endpoint(used), &format!("delete {key}"), e))
            .inspect_err(|e| self.client.failed(used, e))?;
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let (used, mut client) = self.client.pinned().await?;
        let resp = client
            .get(key, None)
            .await
            .map_err(|e| map_error(self.client.endpoint(used), &format!("get {key}"), e))
            .inspect_err(|e| self.client.failed(used, e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }
}

/// The renewal of a campaign's lease, for [`keep_alive`]: the lease is lost when etcd answers
/// with a TTL of 0 (it expired).
struct LeaseRenewal {
    conn: Conn,
    lease: i64,
    /// The keep-alive stream and the index of the endpoint it goes to, opened again (through
    /// the next endpoint) after a failure.
    pair: Option<(usize, (LeaseKeeper, LeaseKeepAliveStream))>,
}

impl Renew for LeaseRenewal {
    async fn renew(&mut self) -> Renewal {
        if self.pair.is_none() {
            if let Ok((used, mut c)) = self.conn.pinned().await {
                match c.lease_keep_alive(self.lease).await {
                    Ok(pair) => self.pair = Some((used, pair)),
                    Err(e) => self.conn.move_on(used, &e),
                }
            }
        }
        let answer = match self.pair.as_mut().map(|(_, pair)| pair) {
            Some((keeper, stream)) => {
                let exchange = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.ok()
            }
            None => None,
        };
        match answer {
            Some(Ok(Some(resp))) if resp.ttl() > 0 => Renewal::Renewed,
            Some(Ok(Some(_))) => Renewal::Ended(format!("lease {:x} expired", self.lease)),
            _ => {
                if let Some((used, _)) = self.pair.take() {
                    self.conn
                        .move_on(used, &"the keep-alive of a campaign's lease failed");
                }
                Renewal::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_end_of_a_prefix() {
        assert_eq!(prefix_range_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn tls_files_that_cannot_work_are_named() {
        let dir = std::env::temp_dir().join(format!("etcd-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let not_pem = dir.join("not-pem");
        std::fs::write(&not_pem, "hello").expect("write");
        let cert = dir.join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let tls = |ca: &PathBuf, identity: Option<(&PathBuf, &PathBuf)>| EtcdOptions {
            tls: true,
            ca_file: Some(ca.clone()),
            client_cert: identity.map(|(c, _)| c.clone()),
            client_key: identity.map(|(_, k)| k.clone()),
            user: None,
        };
        let err = tls(&not_pem, None).tls_config().expect_err("not PEM");
        let text = err.to_string();
        assert!(
            text.contains("--etcd-ca-file") && text.contains("not-pem"),
            "{text}"
        );
        let err = tls(&cert, Some((&cert, &cert)))
            .tls_config()
            .expect_err("a cert as key");
        assert!(err.to_string().contains("--etcd-client-key"), "{err}");
        let missing = dir.join("missing");
        let err = tls(&missing, None).tls_config().expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        let half = EtcdOptions {
            client_key: None,
            ..tls(&cert, Some((&cert, &cert)))
        };
        assert!(matches!(half.tls_config(), Err(ConfigError::HalfIdentity)));
        assert!(tls(&cert, None).tls_config().expect("a CA").is_some());
        let plain = EtcdOptions::default();
        assert!(plain.tls_config().expect("plain").is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
