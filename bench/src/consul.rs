//! Consul, as seen by the bench: the HTTP client, the two observers, the store-only floor
//! (written through backend-consul, the bridge's own writer), and the clean-up of what the bench
//! and its bridges leave there.
//!
//! The KV observer is backend-consul's own watch. The catalog observer (backend-consul has no
//! catalog watch) is a loop of backend-consul's blocking catalog query with its index rule
//! ([`next_index`]), so each change wakes the query at once.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backend_consul::{encode_key, next_index, ConsulOptions, ConsulStore};
use backend_core::{KeyLayout, Publisher, ServiceRecord};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::now_ns;
use crate::observe::{watch_store, RecordSeen, Via};
use crate::report::{BulkFloor, ConsulFloor, FloorStep};

/// How long one blocking query waits for a change.
const WAIT: Duration = Duration::from_secs(30);
/// The timeout of any other request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A Consul agent's HTTP API.
#[derive(Debug, Clone)]
pub struct Consul {
    http: reqwest::Client,
    /// backend-consul's client of the agent, for what it reads already.
    agent: backend_consul::Client,
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

impl Consul {
    /// Connects to the agent at `endpoint` (`host:port`) and checks that it answers.
    pub async fn connect(endpoint: &str) -> Result<Consul> {
        let agent = backend_consul::Client::new(endpoint, false, &ConsulOptions::default())
            .context("cannot set up backend-consul's client")?;
        let consul = Consul {
            http: client()?,
            agent,
            base: format!("http://{endpoint}"),
            endpoint: endpoint.to_string(),
        };
        consul
            .version()
            .await
            .with_context(|| format!("cannot reach Consul at {endpoint}"))?;
        Ok(consul)
    }

    /// `GET <path>` read as JSON; `None` when Consul answers 404. `what` names it in errors.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<Option<T>> {
        let resp = self.send(reqwest::Method::GET, path, what).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let resp = resp
            .error_for_status()
            .with_context(|| format!("cannot read {what}"))?;
        let value = resp
            .json()
            .await
            .with_context(|| format!("unreadable {what}"))?;
        Ok(Some(value))
    }

    /// The agent's version (`/v1/agent/self`).
    pub async fn version(&self) -> Result<String> {
        let v: Option<Value> = self.get_json("/v1/agent/self", "the agent's self").await?;
        Ok(v.as_ref()
            .and_then(|v| v.pointer("/Config/Version"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string())
    }

    /// One request to `path` without a body; `what` names it in errors.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        what: &str,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let request = self.http.request(method, url).timeout(REQUEST_TIMEOUT);
        request
            .send()
            .await
            .with_context(|| format!("cannot send {what}"))
    }

    async fn put_empty(&self, path: &str) -> Result<reqwest::StatusCode> {
        Ok(self.send(reqwest::Method::PUT, path, path).await?.status())
    }

    /// The keys under `prefix` and the sessions holding any of them.
    async fn keys_and_sessions(&self, prefix: &str) -> Result<(usize, Vec<String>)> {
        let path = format!("/v1/kv/{}?recurse=true", encode_key(prefix));
        let what = format!("the Consul keys under {prefix}");
        let entries: Vec<Value> = self.get_json(&path, &what).await?.unwrap_or_default();
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
        let path = format!("/v1/kv/{}?recurse=true", encode_key(prefix));
        let what = format!("the deletion of the Consul keys under {prefix}");
        let resp = self.send(reqwest::Method::DELETE, &path, &what).await?;
        resp.error_for_status()
            .with_context(|| format!("cannot delete Consul keys under {prefix}"))?;
        Ok(())
    }

    /// The ids of the agent's services whose name starts with `name_prefix`.
    pub async fn agent_services(&self, name_prefix: &str) -> Result<Vec<String>> {
        let services = self
            .agent
            .agent_services()
            .await
            .context("cannot list the agent's services")?;
        Ok(services
            .into_iter()
            .filter(|s| s.service.starts_with(name_prefix))
            .map(|s| s.id)
            .collect())
    }

    /// Deregisters the agent's services whose name starts with `name_prefix`; returns how many.
    pub async fn deregister_services(&self, name_prefix: &str) -> Result<usize> {
        let ids = self.agent_services(name_prefix).await?;
        for id in &ids {
            let status = self
                .put_empty(&format!("/v1/agent/service/deregister/{}", encode_key(id)))
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
        let (instances, _) = self
            .agent
            .catalog_service(service, 0, Duration::ZERO)
            .await
            .context("cannot read the catalog")?;
        Ok(instances.len())
    }
}

/// Reports every record that appears under `prefix`, as [`Via::Kv`], through backend-consul's
/// own watch ([`watch_store`]). Returns after the first answer.
pub async fn watch_kv(
    consul: &Consul,
    prefix: &str,
    tx: mpsc::UnboundedSender<RecordSeen>,
) -> Result<JoinHandle<()>> {
    let layout = KeyLayout::new(prefix);
    let store = ConsulStore::new(&consul.endpoint, false, layout, ConsulOptions::default())
        .context("cannot set up backend-consul")?;
    watch_store(&store, prefix, Via::Kv, tx).await
}

/// Reports every instance of `service` that appears in the catalog, as [`Via::Catalog`]:
/// blocking queries of backend-consul's client in a loop, with its index rule; every instance
/// not seen before (by ServiceID) is reported once, when the answer carrying it arrives.
/// Returns after the first answer.
pub async fn watch_catalog(
    consul: &Consul,
    service: &str,
    tx: mpsc::UnboundedSender<RecordSeen>,
) -> Result<JoinHandle<()>> {
    let (agent, service) = (consul.agent.clone(), service.to_string());
    let (ready_tx, ready_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut index: u64 = 0;
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut failures = 0u32;
        loop {
            let answer = agent.catalog_service(&service, index, WAIT).await;
            let arrival_ns = now_ns();
            let (instances, new_index) = match answer {
                Ok(a) => a,
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
            failures = 0;
            index = next_index(index, new_index);
            for instance in instances {
                if seen.insert(instance.id, instance.modify_index).is_none() {
                    let container_id = instance.meta.and_then(|mut m| m.remove("container_id"));
                    let record = RecordSeen {
                        container_id: container_id.unwrap_or_default(),
                        arrival_ns,
                        via: Via::Catalog,
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
                "Consul did not answer the first catalog query within 10 s"
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
        container_id: id.clone(),
        container_name: id.clone(),
        node_id: "registrator-bench".into(),
        hostname: "registrator-bench".into(),
        ..ServiceRecord::new(service, id, std::net::IpAddr::from([127, 0, 0, 1]), 8080)
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
    let pause = Duration::from_millis(60);
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
/// Writes are 60 ms apart so the blocking query is waiting again before each one, as it is
/// between two container starts (backend-consul's watch starts its queries at least 50 ms
/// apart).
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
