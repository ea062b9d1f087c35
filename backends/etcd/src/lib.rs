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

use std::time::Duration;

use backend_core::keepalive::{keep_alive, Renew, Renewal};
use backend_core::{
    BackendError, Backoff, Coordinator, KeyLayout, KvEntry, Leadership, NodeRecord, Publisher,
    Result, ServiceKey, ServiceRecord, WatchEvent, Watcher,
};
use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    ResignOptions, Txn, TxnOp, WatchOptions,
};
use futures::stream::BoxStream;
use futures::FutureExt;
use tokio::sync::{mpsc, Mutex};

const STORE: &str = "etcd";

/// etcd's default limit on the operations of one transaction (`--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// How many keys one range request reads when listing.
const LIST_PAGE: i64 = 1000;

/// How long one request may take before the store is considered unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An etcd cluster, seen through one client.
pub struct EtcdStore {
    client: Client,
    /// A client without a request timeout, for calls that block by design (a campaign).
    long_client: Client,
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
    /// The keep-alive stream, opened on the first renewal and re-opened after an error.
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdStore {
    /// A client for these endpoints (`host:port`). No connection is made yet: the first request
    /// connects, so an etcd that is down at start is reported by that request, and retried by
    /// the caller.
    pub async fn connect(endpoints: &[String], layout: KeyLayout) -> Result<Self, BackendError> {
        let urls: Vec<String> = endpoints.iter().map(|e| format!("http://{e}")).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let joined = endpoints.join(",");
        let client = Client::connect(&urls, Some(options))
            .await
            .map_err(|e| map_error(&joined, e))?;
        let long_options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let long_client = Client::connect(&urls, Some(long_options))
            .await
            .map_err(|e| map_error(&joined, e))?;
        Ok(EtcdStore {
            client,
            long_client,
            endpoints: joined,
            layout,
            lease: Mutex::new(None),
        })
    }

    /// The client, for callers that need more of etcd than the traits offer (tests, tools).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn lease_id(&self) -> Result<i64, BackendError> {
        self.lease
            .lock()
            .await
            .as_ref()
            .map(|l| l.id)
            .ok_or(BackendError::NoSession { store: STORE })
    }

    /// Puts key/value pairs with the lease, in transactions of at most [`MAX_TXN_OPS`].
    async fn put_with_lease(&self, kvs: Vec<(String, Vec<u8>)>) -> Result<(), BackendError> {
        let lease = self.lease_id().await?;
        let mut client = self.client.clone();
        let mut kvs = kvs.into_iter().peekable();
        while kvs.peek().is_some() {
            let ops: Vec<TxnOp> = kvs
                .by_ref()
                .take(MAX_TXN_OPS)
                .map(|(k, v)| TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease))))
                .collect();
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| map_lease_error(&self.endpoints, lease, e))?;
        }
        Ok(())
    }

    /// Reads every key under `prefix` at one revision, page by page. Returns the entries and
    /// the revision they were read at.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, i64), BackendError> {
        list_prefix(&self.client, &self.endpoints, prefix).await
    }
}

async fn list_prefix(
    client: &Client,
    endpoints: &str,
    prefix: &str,
) -> Result<(Vec<KvEntry>, i64), BackendError> {
    let mut client = client.clone();
    let end = prefix_range_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut entries = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let resp = client
            .get(from.clone(), Some(options))
            .await
            .map_err(|e| map_error(endpoints, e))?;
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
fn map_lease_error(endpoints: &str, lease: i64, err: etcd_client::Error) -> BackendError {
    match err {
        etcd_client::Error::GRpcStatus(status) if status.code() == tonic::Code::NotFound => {
            BackendError::SessionLost {
                store: STORE,
                detail: format!("lease {lease:x}: {}", status.message()),
            }
        }
        other => map_error(endpoints, other),
    }
}

/// Maps the client's error onto what the caller can act on, keeping it as the cause.
fn map_error(endpoints: &str, err: etcd_client::Error) -> BackendError {
    use etcd_client::Error as E;
    let unavailable = |detail: String, err: E| BackendError::Unavailable {
        store: STORE,
        endpoints: endpoints.to_string(),
        detail,
        source: Some(Box::new(err)),
    };
    let rejected = |detail: String, err: E| BackendError::Rejected {
        store: STORE,
        detail,
        source: Some(Box::new(err)),
    };
    match &err {
        E::GRpcStatus(status) => {
            use tonic::Code;
            let detail = status.message().to_string();
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Internal => unavailable(detail, err),
                _ => rejected(detail, err),
            }
        }
        E::InvalidArgs(detail) | E::EndpointError(detail) => rejected(detail.clone(), err),
        E::InvalidUri(e) => rejected(format!("invalid endpoint {endpoints:?}: {e}"), err),
        _ => unavailable(err.to_string(), err),
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
        let mut client = self.client.clone();
        let resp = client
            .lease_grant(secs, None)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?;
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
            let mut client = self.client.clone();
            let pair = client
                .lease_keep_alive(lease.id)
                .await
                .map_err(|e| map_lease_error(&self.endpoints, lease.id, e))?;
            lease.keeper = Some(pair);
        }
        let result = match lease.keeper.as_mut() {
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
                    Ok(Err(e)) => Err(map_lease_error(&self.endpoints, lease.id, e)),
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
        if result.is_err() {
            // A broken stream is re-opened on the next renewal.
            lease.keeper = None;
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
            let mut client = self.client.clone();
            client
                .lease_revoke(lease.id)
                .await
                .map_err(|e| map_lease_error(&self.endpoints, lease.id, e))?;
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
        let mut client = self.client.clone();
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(self.layout.service_key(&k.service, &k.id), None))
                .collect();
            client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(|e| map_error(&self.endpoints, e))?;
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
        let client = self.client.clone();
        let endpoints = self.endpoints.clone();
        tokio::spawn(async move { run_watch(client, endpoints, prefix, tx).await });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

type WatchSender = mpsc::Sender<Result<WatchEvent, BackendError>>;

/// List, then watch from the next revision; on any break, back off and list again. Ends when
/// the receiving side is dropped.
async fn run_watch(client: Client, endpoints: String, prefix: String, tx: WatchSender) {
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    loop {
        match list_and_follow(&client, &endpoints, &prefix, &tx, &mut backoff).await {
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
    client: &Client,
    endpoints: &str,
    prefix: &str,
    tx: &WatchSender,
    backoff: &mut Backoff,
) -> Result<(), BackendError> {
    let (entries, revision) = list_prefix(client, endpoints, prefix).await?;
    if tx.send(Ok(WatchEvent::Restarted(entries))).await.is_err() {
        return Ok(());
    }
    let mut client = client.clone();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client
        .watch(prefix, Some(options))
        .await
        .map_err(|e| map_error(endpoints, e))?;
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            _ = tx.closed() => return Ok(()),
        };
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
            Err(e) => return Err(map_error(endpoints, e)),
        };
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
        let mut client = self.long_client.clone();
        let lease = client
            .lease_grant(secs, None)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?
            .id();
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        let renewal = LeaseRenewal {
            client: self.client.clone(),
            lease,
            pair: None,
        };
        tokio::spawn(keep_alive("etcd", ttl, lost_tx, stop_rx, renewal));
        let resp = client
            .campaign(key.clone(), holder.clone(), lease)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?;
        tracing::info!(store = STORE, %key, %holder, lease = format!("{lease:x}"), "elected leader");
        let leader = resp.leader().cloned();
        let resign = async move {
            let _ = stop_tx.send(());
            if let Some(leader) = leader {
                let _ = client
                    .resign(Some(ResignOptions::new().with_leader(leader)))
                    .await;
            }
            let _ = client.lease_revoke(lease).await;
        }
        .boxed();
        Ok(Leadership::new(lost_rx, resign))
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let mut client = self.client.clone();
        client
            .put(key, value, None)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?;
        Ok(())
    }

    async fn delete_value(&self, key: &str) -> Result<(), BackendError> {
        let mut client = self.client.clone();
        client
            .delete(key, None)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?;
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let mut client = self.client.clone();
        let resp = client
            .get(key, None)
            .await
            .map_err(|e| map_error(&self.endpoints, e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }
}

/// The renewal of a campaign's lease, for [`keep_alive`]: the lease is lost when etcd answers
/// with a TTL of 0 (it expired).
struct LeaseRenewal {
    client: Client,
    lease: i64,
    /// The keep-alive stream, opened again after a failure.
    pair: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Renew for LeaseRenewal {
    async fn renew(&mut self) -> Renewal {
        if self.pair.is_none() {
            let mut c = self.client.clone();
            self.pair = c.lease_keep_alive(self.lease).await.ok();
        }
        let answer = match self.pair.as_mut() {
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
                self.pair = None;
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
}
