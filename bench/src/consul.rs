//! Consul, as seen by the bench: the HTTP client, the two blocking-query observers (KV and
//! catalog), the store-only floor (written through backend-consul, the bridge's own writer),
//! and the clean-up of what the bench and its bridges leave there.
//!
//! Both observers follow Consul's blocking-query rules: every answer's `X-Consul-Index` is the
//! `index` of the next query (reset to 0 when it goes backwards, never below 1), so each change
//! wakes the query at once. A record counts as seen when the HTTP answer carrying it arrives
//! (its headers; Consul writes the whole answer at once), before the bench parses the body.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backend_consul::{ConsulOptions, ConsulStore};
use backend_core::{KeyLayout, Publisher, ServiceRecord};
use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::now_ns;
use crate::observe::{RecordSeen, Via};
use crate::report::{BulkFloor, ConsulFloor, FloorStep};

/// How long one blocking query waits for a change.
const WAIT: &str = "30s";
/// The timeout of a blocking query (its wait, Consul's jitter of wait/16, and a margin).
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(40);
/// The timeout of any other request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Consul agent's HTTP API.
#[derive(Debug, Clone)]
pub struct Consul {
    http: reqwest::Client,
    /// `http://host:port`
    base: String,
    /// `host:port`
    pub endpoint: String,
}

fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")
}

/// Percent-encodes a key for a URL path, keeping `/`.
fn encode(key: &str) -> String {
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

fn consul_index(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The next blocking-query index after an answer with `new` (Consul's rules).
fn next_index(old: u64, new: u64) -> u64 {
    if new < old {
        0
    } else {
        new.max(1)
    }
}

impl Consul {
    /// Connects to the agent at `endpoint` (`host:port`) and checks that it answers.
    pub async fn connect(endpoint: &str) -> Result<Consul> {
        let consul = Consul {
            http: client()?,
            base: format!("http://{endpoint}"),
            endpoint: endpoint.to_string(),
        };
        consul
            .version()
            .await
            .with_context(|| format!("cannot reach Consul at {endpoint}"))?;
        Ok(consul)
    }

    /// The agent's version (`/v1/agent/self`).
    pub async fn version(&self) -> Result<String> {
        let v: Value = self
            .http
            .get(format!("{}/v1/agent/self", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v.pointer("/Config/Version")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string())
    }

    async fn put_empty(&self, path: &str) -> Result<reqwest::StatusCode> {
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("PUT {path}"))?;
        Ok(resp.status())
    }

    /// The keys under `prefix` and the sessions holding any of them.
    async fn keys_and_sessions(&self, prefix: &str) -> Result<(usize, Vec<String>)> {
        let resp = self
            .http
            .get(format!(
                "{}/v1/kv/{}?recurse=true",
                self.base,
                encode(prefix)
            ))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("cannot list Consul keys under {prefix}"))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok((0, Vec::new()));
        }
        let entries: Vec<Value> = resp
            .error_for_status()
            .with_context(|| format!("cannot list Consul keys under {prefix}"))?
            .json()
            .await
            .context("unreadable KV listing")?;
        let mut sessions: Vec<String> = entries
            .iter()
            .filter_map(|e| e.get("Session").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        sessions.sort();
        sessions.dedup();
        Ok((entries.len(), sessions))
    }

    /// How many keys there are under `prefix`.
    pub async fn count_keys(&self, prefix: &str) -> Result<usize> {
        Ok(self.keys_and_sessions(prefix).await?.0)
    }

    /// Deletes every key under `prefix`, after destroying the sessions that hold any of them
    /// (a bridge killed by the bench leaves its session behind until its TTL).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let (_, sessions) = self.keys_and_sessions(prefix).await?;
        for s in sessions {
            let status = self.put_empty(&format!("/v1/session/destroy/{s}")).await?;
            if !status.is_success() {
                crate::log(&format!("warning: cannot destroy session {s}: {status}"));
            }
        }
        let resp = self
            .http
            .delete(format!(
                "{}/v1/kv/{}?recurse=true",
                self.base,
                encode(prefix)
            ))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .with_context(|| format!("cannot delete Consul keys under {prefix}"))?;
        resp.error_for_status()
            .with_context(|| format!("cannot delete Consul keys under {prefix}"))?;
        Ok(())
    }

    /// The ids of the agent's services whose name starts with `name_prefix`.
    pub async fn agent_services(&self, name_prefix: &str) -> Result<Vec<String>> {
        let services: HashMap<String, Value> = self
            .http
            .get(format!("{}/v1/agent/services", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .context("cannot list the agent's services")?
            .error_for_status()
            .context("cannot list the agent's services")?
            .json()
            .await
            .context("unreadable agent service list")?;
        Ok(services
            .into_iter()
            .filter(|(_, s)| {
                s.get("Service")
                    .and_then(Value::as_str)
                    .is_some_and(|n| n.starts_with(name_prefix))
            })
            .map(|(id, _)| id)
            .collect())
    }

    /// Deregisters the agent's services whose name starts with `name_prefix`; returns how many.
    pub async fn deregister_services(&self, name_prefix: &str) -> Result<usize> {
        let ids = self.agent_services(name_prefix).await?;
        for id in &ids {
            let status = self
                .put_empty(&format!("/v1/agent/service/deregister/{}", encode(id)))
                .await?;
            if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
                crate::log(&format!(
                    "warning: cannot deregister service {id}: {status}"
                ));
            }
        }
        Ok(ids.len())
    }

    /// How many instances of `service` the catalog has.
    pub async fn catalog_count(&self, service: &str) -> Result<usize> {
        let list: Vec<Value> = self
            .http
            .get(format!(
                "{}/v1/catalog/service/{}",
                self.base,
                encode(service)
            ))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .context("cannot read the catalog")?
            .error_for_status()
            .context("cannot read the catalog")?
            .json()
            .await
            .context("unreadable catalog answer")?;
        Ok(list.len())
    }
}

/// Reports every record that appears under `prefix` (a KV blocking query on
/// `/v1/kv/<prefix>?recurse`), as [`Via::Kv`]. Returns after the first answer.
pub async fn watch_kv(
    consul: &Consul,
    prefix: &str,
    tx: mpsc::UnboundedSender<RecordSeen>,
) -> Result<JoinHandle<()>> {
    let http = client()?;
    let url = format!("{}/v1/kv/{}?recurse=true", consul.base, encode(prefix));
    spawn_watch(http, url, Via::Kv, tx, kv_entries).await
}

/// Reports every instance of `service` that appears in the catalog (a blocking query on
/// `/v1/catalog/service/<service>`), as [`Via::Catalog`]. Returns after the first answer.
pub async fn watch_catalog(
    consul: &Consul,
    service: &str,
    tx: mpsc::UnboundedSender<RecordSeen>,
) -> Result<JoinHandle<()>> {
    let http = client()?;
    let url = format!("{}/v1/catalog/service/{}?", consul.base, encode(service));
    spawn_watch(http, url, Via::Catalog, tx, catalog_entries).await
}

/// One entry of an answer: a unique key, its version, and the record's `container_id`.
type Entry = (String, u64, String);

/// The entries of a blocking query's answer: `id` names each entry's unique key, `container_id`
/// reads the record's container id out of an entry.
fn entries(body: &[u8], id: &str, container_id: impl Fn(&Value) -> Option<String>) -> Vec<Entry> {
    let Ok(list) = serde_json::from_slice::<Vec<Value>>(body) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let key = e.get(id)?.as_str()?.to_string();
            let modify = e.get("ModifyIndex").and_then(Value::as_u64).unwrap_or(0);
            Some((key, modify, container_id(e).unwrap_or_default()))
        })
        .collect()
}

/// KV entries: key, ModifyIndex, `container_id` of the base64 JSON value.
fn kv_entries(body: &[u8]) -> Vec<Entry> {
    entries(body, "Key", |e| {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(e.get("Value")?.as_str()?)
            .ok()?;
        let v = serde_json::from_slice::<Value>(&raw).ok()?;
        Some(v.get("container_id")?.as_str()?.to_string())
    })
}

/// Catalog instances: ServiceID, ModifyIndex, `ServiceMeta.container_id`.
fn catalog_entries(body: &[u8]) -> Vec<Entry> {
    entries(body, "ServiceID", |e| {
        Some(
            e.pointer("/ServiceMeta/container_id")?
                .as_str()?
                .to_string(),
        )
    })
}

/// Blocking queries on `url` in a loop; every entry not seen before (by key) is reported once.
async fn spawn_watch(
    http: reqwest::Client,
    url: String,
    via: Via,
    tx: mpsc::UnboundedSender<RecordSeen>,
    parse: fn(&[u8]) -> Vec<Entry>,
) -> Result<JoinHandle<()>> {
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut index: u64 = 0;
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut failures = 0u32;
        loop {
            let full = if index > 0 {
                let sep = if url.ends_with('?') { "" } else { "&" };
                format!("{url}{sep}index={index}&wait={WAIT}")
            } else {
                url.clone()
            };
            let answer = http.get(&full).timeout(BLOCKING_TIMEOUT).send().await;
            let arrival_ns = now_ns();
            let resp = match answer {
                Ok(r) => r,
                Err(e) => {
                    failures += 1;
                    crate::log(&format!("warning: Consul blocking query failed: {e}"));
                    if failures > 20 || tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let new_index = consul_index(&resp).unwrap_or(0);
            let status = resp.status();
            let body = if status.is_success() {
                match resp.bytes().await {
                    Ok(b) => b.to_vec(),
                    Err(e) => {
                        crate::log(&format!("warning: Consul answer unreadable: {e}"));
                        continue;
                    }
                }
            } else if status == reqwest::StatusCode::NOT_FOUND {
                // KV: nothing under the prefix yet.
                Vec::new()
            } else {
                failures += 1;
                crate::log(&format!("warning: Consul blocking query: {status}"));
                if failures > 20 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            failures = 0;
            index = next_index(index, new_index);
            for (key, modify, container_id) in parse(&body) {
                if seen.get(&key) == Some(&modify) {
                    continue;
                }
                let first = seen.insert(key, modify).is_none();
                if first {
                    let record = RecordSeen {
                        container_id,
                        arrival_ns,
                        via,
                    };
                    if tx.send(record).is_err() {
                        return;
                    }
                }
            }
            if let Some(r) = ready.take() {
                r.send(()).ok();
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(())) => Ok(task),
        _ => {
            task.abort();
            Err(anyhow!(
                "Consul did not answer the first query of {via:?} within 10 s"
            ))
        }
    }
}

/// Waits for the record of `container_id` on `rx`.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<RecordSeen>,
    container_id: &str,
    within: Duration,
) -> Result<RecordSeen> {
    let deadline = Instant::now() + within;
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) if r.container_id == container_id => return Ok(r),
                Some(_) => {}
                None => bail!("the Consul blocking query ended"),
            },
            _ = tokio::time::sleep_until(deadline) => bail!("{container_id} not seen within {} s", within.as_secs()),
        }
    }
}

/// A record for the floor: service `service`, id and container id `<service>-<i>`.
fn floor_record(service: &str, i: usize) -> ServiceRecord {
    let id = format!("{service}-{i}");
    ServiceRecord {
        schema_version: backend_core::SCHEMA_VERSION,
        service: service.into(),
        id: id.clone(),
        ip: std::net::IpAddr::from([127, 0, 0, 1]),
        port: 8080,
        protocol: backend_core::Protocol::Tcp,
        tags: vec![],
        labels: Default::default(),
        attrs: Default::default(),
        container_id: id.clone(),
        container_name: id,
        node_id: "registrator-bench".into(),
        hostname: "registrator-bench".into(),
        task_id: None,
        task_slot: None,
        service_id: None,
        stack: None,
        health: None,
        started_at: None,
    }
}

/// A publisher of backend-consul, as the bridge's, writing into KV only or the catalog only,
/// with a session of its own.
async fn floor_store(consul: &Consul, prefix: &str, kv: bool) -> Result<ConsulStore> {
    let options = ConsulOptions {
        kv,
        catalog: !kv,
        ..ConsulOptions::default()
    };
    let store = ConsulStore::new(&consul.endpoint, false, KeyLayout::new(prefix), options)
        .context("cannot set up backend-consul")?;
    store
        .open_session(Duration::from_secs(300))
        .await
        .context("cannot open a Consul session")?;
    Ok(store)
}

/// Writes `warmup + count` records one at a time through `store`, `pause` apart, and times
/// each write's acknowledgement and its arrival on `rx`.
async fn floor_steps(
    store: &ConsulStore,
    service: &str,
    rx: &mut mpsc::UnboundedReceiver<RecordSeen>,
    count: usize,
    warmup: usize,
    timeout: Duration,
) -> Result<Vec<FloorStep>> {
    let pause = Duration::from_millis(30);
    let mut steps = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let record = floor_record(service, i);
        tokio::time::sleep(pause).await;
        let t0 = now_ns();
        store.publish(std::slice::from_ref(&record)).await?;
        let ack = now_ns();
        let seen = wait_for(rx, &record.container_id, timeout).await?;
        if i >= warmup {
            steps.push(FloorStep {
                ack_ns: ack - t0,
                seen_ns: seen.arrival_ns - t0,
            });
        }
    }
    Ok(steps)
}

/// The store-only floor: the bench publishes records itself through backend-consul's
/// `ConsulStore` (the bridge's own writer, with a session), and times the write's
/// acknowledgement and the blocking query's answer.
///
/// * KV (a store with `kv` only): one `/v1/txn` of `delete` + `lock` per record, seen by a
///   blocking query on `<prefix>/services/?recurse`.
/// * Catalog (a store with `catalog` only): one `/v1/agent/service/register` with a TTL check
///   per record, seen by a blocking query on `/v1/catalog/service/<service>`.
///
/// Writes are 30 ms apart so the blocking query is waiting again before each one, as it is
/// between two container starts.
///
/// Then, for the initial sync's share: `bulk` records in one publish of a catalog store (the
/// bridge's agent concurrency, 16 at a time), timed until it returns and until the catalog
/// shows all of them. Each store's session is destroyed and its services deregistered at the
/// end (`close_session` with revoke).
pub async fn floor(
    consul: &Consul,
    prefix: &str,
    service: &str,
    count: usize,
    warmup: usize,
    bulk: usize,
    timeout: Duration,
) -> Result<ConsulFloor> {
    // KV.
    let store = floor_store(consul, prefix, true).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch = watch_kv(consul, &format!("{prefix}/services/"), tx).await?;
    let kv = floor_steps(&store, service, &mut rx, count, warmup, timeout).await;
    watch.abort();
    store.close_session(true).await.ok();
    let kv = kv?;

    // Catalog.
    let store = floor_store(consul, prefix, false).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch = watch_catalog(consul, service, tx).await?;
    let catalog = floor_steps(&store, service, &mut rx, count, warmup, timeout).await;
    watch.abort();
    store.close_session(true).await.ok();
    let catalog = catalog?;

    // Bulk catalog registrations.
    let bulk_service = format!("{service}-bulk");
    let store = floor_store(consul, prefix, false).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watch = watch_catalog(consul, &bulk_service, tx).await?;
    let records: Vec<ServiceRecord> = (0..bulk).map(|i| floor_record(&bulk_service, i)).collect();
    let t0 = now_ns();
    let published = store.publish(&records).await;
    let acked = now_ns();
    let outcome: Result<i64> = async {
        published?;
        let deadline = Instant::now() + timeout * 2;
        let mut seen = std::collections::HashSet::new();
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => {
                        seen.insert(r.container_id);
                        if seen.len() == bulk {
                            return Ok(r.arrival_ns);
                        }
                    }
                    None => bail!("the Consul blocking query ended"),
                },
                _ = tokio::time::sleep_until(deadline) => bail!("only {} of {bulk} bulk registrations in the catalog", seen.len()),
            }
        }
    }
    .await;
    watch.abort();
    store.close_session(true).await.ok();
    let all_seen = outcome?;
    Ok(ConsulFloor {
        kv,
        catalog,
        bulk: Some(BulkFloor {
            count: bulk,
            ack_ns: acked - t0,
            seen_ns: all_seen - t0,
        }),
        load: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(5, 9), 9);
        assert_eq!(next_index(9, 5), 0);
    }

    #[test]
    fn parses_answers() {
        let value = base64::engine::general_purpose::STANDARD.encode(r#"{"container_id":"c1"}"#);
        let kv = format!(
            r#"[{{"Key":"p/services/s/1","ModifyIndex":7,"Value":"{value}"}},{{"Key":"p/x","Value":null}}]"#
        );
        assert_eq!(
            kv_entries(kv.as_bytes()),
            vec![
                ("p/services/s/1".to_string(), 7, "c1".to_string()),
                ("p/x".to_string(), 0, String::new())
            ]
        );
        let cat = br#"[{"ServiceID":"a","ModifyIndex":3,"ServiceMeta":{"container_id":"c2"}}]"#;
        assert_eq!(
            catalog_entries(cat),
            vec![("a".to_string(), 3, "c2".to_string())]
        );
        assert!(kv_entries(b"not json").is_empty());
        assert_eq!(encode("a b:c/d"), "a%20b%3Ac/d");
    }
}
