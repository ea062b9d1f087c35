//! The two ends of every measurement, observed by the bench itself:
//!
//! * the `start` events of this run's containers, from the Docker events stream, with the
//!   engine's `timeNano` and the moment the bench received each;
//! * the records that appear under a prefix, through the store's own watch (etcd or Consul KV,
//!   [`watch_store`]), with the moment each arrived (wall clock, the same clock as dockerd's on
//!   this machine); the Consul catalog's blocking query is in [`crate::consul`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use backend_core::{KvEntry, ServiceRecord, WatchEvent, Watcher};
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::lab::Lab;
use crate::now_ns;

/// A container `start` event.
#[derive(Debug, Clone)]
pub struct StartSeen {
    pub container_id: String,
    /// The engine's timestamp of the event.
    pub time_nano: i64,
    /// When the bench received it.
    pub recv_ns: i64,
}

/// Where a record was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// backend-etcd's watch.
    Etcd,
    /// backend-consul's KV watch.
    Kv,
    /// A Consul catalog blocking query.
    Catalog,
}

/// A record put under the watched prefix.
#[derive(Debug, Clone)]
pub struct RecordSeen {
    /// The record's `container_id` field ("" when it has none).
    pub container_id: String,
    /// When the watch delivered it.
    pub arrival_ns: i64,
    pub via: Via,
}

/// Follows this run's container `start` events.
pub fn follow_starts(lab: &Lab) -> (mpsc::UnboundedReceiver<StartSeen>, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        ("event".to_string(), vec!["start".to_string()]),
        ("label".to_string(), vec![lab.run_label()]),
    ]);
    // `since` makes the engine replay what happened between now and the moment the stream is
    // really open, so no start is missed.
    let since = now_ns() as f64 / 1e9;
    let options = EventsOptions {
        since: Some(format!("{since:.9}")),
        until: None,
        filters: Some(filters),
    };
    let mut events = lab.docker.events(Some(options));
    let task = tokio::spawn(async move {
        while let Some(item) = events.next().await {
            let recv_ns = now_ns();
            let msg = match item {
                Ok(msg) => msg,
                Err(e) => {
                    crate::log(&format!("warning: Docker event stream failed: {e}"));
                    return;
                }
            };
            let (Some(container_id), Some(time_nano)) =
                (msg.actor.and_then(|a| a.id), msg.time_nano)
            else {
                continue;
            };
            let seen = StartSeen {
                container_id,
                time_nano,
                recv_ns,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// Reports every record that appears under `prefix`, once per key, as `via`, through the
/// store's own watch (backend-etcd's or backend-consul's, the bridge's code) and backend-core's
/// record decoding. A record counts as seen when its event leaves the watch. Returns once the
/// watch has listed the prefix (from then on no put is missed).
pub async fn watch_store(
    store: &impl Watcher,
    prefix: &str,
    via: Via,
    tx: mpsc::UnboundedSender<RecordSeen>,
) -> Result<JoinHandle<()>> {
    let mut events = store.watch_prefix(prefix.to_string());
    let mut seen = HashSet::new();
    let mut report = move |entries: Vec<KvEntry>| {
        let arrival_ns = now_ns();
        entries
            .into_iter()
            .filter(|e| seen.insert(e.key.clone()))
            .all(|e| {
                let container_id = ServiceRecord::from_json(&e.value)
                    .map(|r| r.container_id)
                    .unwrap_or_default();
                let record = RecordSeen {
                    container_id,
                    arrival_ns,
                    via,
                };
                tx.send(record).is_ok()
            })
    };
    match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        Ok(Some(Ok(WatchEvent::Restarted(entries)))) => {
            report(entries);
        }
        Ok(Some(Err(e))) => return Err(e).with_context(|| format!("cannot watch {prefix}")),
        _ => bail!("the watch of {prefix} did not list it within 10 s"),
    }
    Ok(tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let go_on = match event {
                Ok(WatchEvent::Put(entry)) => report(vec![entry]),
                Ok(WatchEvent::Restarted(entries)) => report(entries),
                Ok(WatchEvent::Deleted(_)) => true,
                Err(e) => {
                    crate::log(&format!("warning: the watch of the store failed: {e}"));
                    true
                }
            };
            if !go_on {
                return;
            }
        }
    }))
}

/// Pairs start events with records, by container id.
#[derive(Debug)]
pub struct Tracker {
    starts_rx: mpsc::UnboundedReceiver<StartSeen>,
    records_rx: mpsc::UnboundedReceiver<RecordSeen>,
    starts: HashMap<String, StartSeen>,
    start_order: VecDeque<String>,
    /// The first record seen of each container, per observer.
    records: HashMap<(Via, String), RecordSeen>,
}

impl Tracker {
    pub fn new(
        starts_rx: mpsc::UnboundedReceiver<StartSeen>,
        records_rx: mpsc::UnboundedReceiver<RecordSeen>,
    ) -> Self {
        Tracker {
            starts_rx,
            records_rx,
            starts: HashMap::new(),
            start_order: VecDeque::new(),
            records: HashMap::new(),
        }
    }

    /// Takes in one item from either stream; fails at the deadline or when both ended.
    async fn pump(&mut self, deadline: Instant, what: &str) -> Result<()> {
        tokio::select! {
            s = self.starts_rx.recv() => match s {
                Some(s) => {
                    // A restarted container starts again: keep the latest start.
                    if !self.starts.contains_key(&s.container_id) {
                        self.start_order.push_back(s.container_id.clone());
                    }
                    self.starts.insert(s.container_id.clone(), s);
                    Ok(())
                }
                None => bail!("the Docker event stream ended while waiting for {what}"),
            },
            r = self.records_rx.recv() => match r {
                Some(r) => {
                    self.records.entry((r.via, r.container_id.clone())).or_insert(r);
                    Ok(())
                }
                None => bail!("the store watch ended while waiting for {what}"),
            },
            _ = tokio::time::sleep_until(deadline) => bail!("timed out waiting for {what}"),
        }
    }

    /// The start event of one container.
    pub async fn start_of(&mut self, id: &str, within: Duration) -> Result<StartSeen> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.starts.remove(id) {
                self.start_order.retain(|x| x != id);
                return Ok(s);
            }
            self.pump(deadline, &format!("the start event of {}", short(id)))
                .await?;
        }
    }

    /// The next start event not taken yet (for swarm tasks, whose ids the bench does not choose).
    pub async fn next_start(&mut self, within: Duration) -> Result<StartSeen> {
        let deadline = Instant::now() + within;
        loop {
            while let Some(id) = self.start_order.pop_front() {
                if let Some(s) = self.starts.remove(&id) {
                    return Ok(s);
                }
            }
            self.pump(deadline, "the start event of a new task").await?;
        }
    }

    /// The first record of one container seen `via` one observer.
    pub async fn record_of(
        &mut self,
        container_id: &str,
        via: Via,
        within: Duration,
    ) -> Result<RecordSeen> {
        let deadline = Instant::now() + within;
        let key = (via, container_id.to_string());
        loop {
            if let Some(r) = self.records.get(&key) {
                return Ok(r.clone());
            }
            self.pump(
                deadline,
                &format!("the record of {} ({via:?})", short(container_id)),
            )
            .await?;
        }
    }
}

pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
