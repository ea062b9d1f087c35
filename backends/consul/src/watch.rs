//! Watching a prefix: blocking queries on `/v1/kv/<prefix>?recurse`, following Consul's
//! index rules, diffed into the same snapshot-plus-changes stream as the etcd watcher.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backend_core::{BackendError, Backoff, KvEntry, WatchEvent, Watcher};
use futures::stream::BoxStream;
use reqwest::Method;
use tokio::sync::mpsc;

use crate::client::{Client, REQUEST_TIMEOUT};
use crate::kv::{encode_key, list, next_index};
use crate::{ConsulStore, STORE};

/// How long a blocking query waits for a change.
pub(crate) const WATCH_WAIT: Duration = Duration::from_secs(60);
/// The least time between two blocking queries, so a busy prefix cannot make us spin.
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(50);

impl Watcher for ConsulStore {
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>> {
        let (tx, rx) = mpsc::channel(256);
        let watcher = self.client.clone();
        tokio::spawn(async move { run_watch(watcher, prefix, tx).await });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

type WatchSender = mpsc::Sender<Result<WatchEvent, BackendError>>;

/// Blocking queries in a loop, diffed into events.
async fn run_watch(store: Client, prefix: String, tx: WatchSender) {
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    let mut known: Option<BTreeMap<String, Vec<u8>>> = None;
    let mut index: u64 = 0;
    loop {
        let started = Instant::now();
        // `consistent`: the reconciler acts on what this watch says, so the answer must come
        // from a leader that a quorum still follows, never a server's stale copy.
        let mut path = format!("/v1/kv/{}?recurse=true&consistent", encode_key(&prefix));
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}s", WATCH_WAIT.as_secs()));
        }
        // Consul adds up to wait/16 of jitter to a blocking query.
        let timeout = WATCH_WAIT + WATCH_WAIT / 16 + REQUEST_TIMEOUT;
        let rb = store.request(Method::GET, &path).timeout(timeout);
        let what = format!("watch {prefix}");
        let result = tokio::select! {
            r = list(&store, rb, &what) => r,
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
pub(crate) fn diff(
    old: &BTreeMap<String, Vec<u8>>,
    new: &BTreeMap<String, Vec<u8>>,
) -> Vec<WatchEvent> {
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
