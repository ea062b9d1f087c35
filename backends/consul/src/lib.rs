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
//!
//! The modules follow the concerns: [`client`] (HTTP, errors, TLS), [`kv`], [`catalog`],
//! [`session`], [`election`], [`watch`]. A [`ConsulStore`] owns one publisher's session and
//! registrations; background tasks hold a clone of its [`Client`], never of its state.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{
    BackendError, KeyLayout, KvEntry, NodeRecord, Publisher, ServiceKey, ServiceRecord,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::sync::Mutex;

pub mod catalog;
pub mod client;
pub mod election;
pub mod kv;
pub mod session;
pub mod watch;

pub use catalog::{catalog_meta, record_from_agent, AgentService, CatalogInstance};
pub use client::{Client, ConfigError, ConsulOptions, Token};
pub use kv::{encode_key, lock_ops, next_index, txn_batches, MAX_TXN_OPS};
pub use session::MIN_TTL;

use catalog::AGENT_CONCURRENCY;
use client::expect_success;

const STORE: &str = "consul";

/// A Consul agent.
pub struct ConsulStore {
    client: Client,
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
            .field("client", &self.client)
            .field("layout", &self.layout)
            .field("kv", &self.options.kv)
            .field("catalog", &self.options.catalog)
            .finish_non_exhaustive()
    }
}

impl ConsulStore {
    /// How the agent checks the registrations of a session with `ttl`.
    fn ttl_check(&self, ttl: Duration) -> catalog::TtlCheck {
        catalog::TtlCheck {
            ttl,
            deregister_after: self.options.deregister_critical_after,
            prefix: self.layout.prefix().to_string(),
        }
    }

    /// A client for the agent at `endpoint` (`host:port`), over HTTPS when `tls`.
    pub fn new(
        endpoint: &str,
        tls: bool,
        layout: KeyLayout,
        options: ConsulOptions,
    ) -> Result<ConsulStore, ConfigError> {
        Ok(ConsulStore {
            client: Client::new(endpoint, tls, &options)?,
            layout,
            options,
            session: Mutex::new(None),
            registered: Mutex::new(BTreeMap::new()),
            check_round: Mutex::new(None),
        })
    }

    /// The HTTP client, for callers that need more of Consul than the traits offer.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Without KV, the catalog is the store: this agent's registrations of this program, as
    /// records under their KV keys, so that a resync finds (and removes) the ones whose
    /// container is gone, registered by an earlier bridge of the node. A registration this
    /// publisher made itself is listed as the record it registered.
    async fn list_catalog(&self) -> Result<Vec<KvEntry>, BackendError> {
        let services = self.client.agent_services().await?;
        let registered = self.registered.lock().await;
        Ok(services
            .iter()
            .filter_map(|s| {
                let record = registered
                    .get(&s.id)
                    .filter(|r| r.service == s.service)
                    .cloned()
                    .or_else(|| catalog::record_from_agent(s, self.layout.prefix()))?;
                Some(KvEntry {
                    key: self.layout.service_key(&record.service, &record.id),
                    value: record.to_json(),
                })
            })
            .collect())
    }

    /// Reads every key under `prefix` (`recurse`), with the index of the answer.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, u64), BackendError> {
        self.client.list_prefix(prefix).await
    }

    /// The open session's id and TTL.
    async fn current_session(&self) -> Result<(String, Duration), BackendError> {
        let session = self.session.lock().await;
        let open = session
            .as_ref()
            .ok_or(BackendError::NoSession { store: STORE })?;
        Ok((open.id.clone(), open.ttl))
    }
}

impl Publisher for ConsulStore {
    fn store_name(&self) -> &'static str {
        STORE
    }

    async fn open_session(&self, ttl: Duration) -> Result<(), BackendError> {
        backend_core::require_ttl(STORE, ttl, MIN_TTL, "Consul's session TTL is at least 10 s")?;
        let id = self.client.create_session("swarm-registrator", ttl).await?;
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
                .client
                .send(self.client.request(Method::PUT, &path), "renew session")
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
                let store = self.client.clone();
                let check = self.ttl_check(session.ttl);
                *round = Some(tokio::spawn(async move {
                    let calls: Vec<_> = registered
                        .iter()
                        .map(|r| store.update_check(r, &check))
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
                .client
                .send(self.client.request(Method::PUT, &path), "destroy session")
                .await?;
            expect_success(resp, "destroy session").await?;
            let ids: Vec<String> = self.registered.lock().await.keys().cloned().collect();
            for id in ids {
                self.client.deregister(&id).await?;
            }
            self.registered.lock().await.clear();
            tracing::info!(store = STORE, session = %session.id, "destroyed session and deregistered services");
        }
        Ok(())
    }

    async fn publish(&self, records: &[ServiceRecord]) -> Result<(), BackendError> {
        let (session, ttl) = self.current_session().await?;
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
            self.client.txn(ops, Some(&session)).await
        };
        let catalog = async {
            if !self.options.catalog {
                return Ok(());
            }
            let check = self.ttl_check(ttl);
            let calls: Vec<_> = records
                .iter()
                .map(|r| self.client.register(r, &check))
                .collect();
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
            self.client.txn(ops, None).await?;
        }
        if self.options.catalog {
            for k in keys {
                self.client.deregister(&k.id).await?;
                self.registered.lock().await.remove(&k.id);
            }
        }
        Ok(())
    }

    async fn publish_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        if !self.options.kv {
            return Ok(());
        }
        let (session, _) = self.current_session().await?;
        let ops = vec![lock_ops(
            &self.layout.node_key(&node.node_id),
            &node.to_json(),
            &session,
        )];
        self.client.txn(ops, Some(&session)).await
    }

    async fn list_services(&self) -> Result<Vec<KvEntry>, BackendError> {
        if !self.options.kv {
            return self.list_catalog().await;
        }
        Ok(self
            .client
            .list_prefix(&self.layout.services_prefix())
            .await?
            .0)
    }

    fn layout(&self) -> &KeyLayout {
        &self.layout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::diff;
    use backend_core::WatchEvent;

    #[test]
    fn catalog_instances_decode_with_or_without_meta() {
        let answer = r#"[{"ServiceID":"a","ModifyIndex":3,"ServiceMeta":{"container_id":"c2"}},{"ServiceID":"b"}]"#;
        let list: Vec<CatalogInstance> = serde_json::from_str(answer).expect("decodes");
        let meta = BTreeMap::from([("container_id".to_string(), "c2".to_string())]);
        assert_eq!(
            list,
            vec![
                CatalogInstance {
                    id: "a".into(),
                    modify_index: 3,
                    meta: Some(meta),
                },
                CatalogInstance {
                    id: "b".into(),
                    modify_index: 0,
                    meta: None,
                },
            ]
        );
    }

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
            labels,
            container_id: "c".into(),
            container_name: "n".into(),
            node_id: "n1".into(),
            hostname: "h".into(),
            task_id: Some("t1".into()),
            task_slot: Some(2),
            ..ServiceRecord::new("db", "t1", "10.0.0.1".parse().expect("ip"), 1)
        };
        let meta = catalog_meta(&r, "prod/registrator");
        assert_eq!(meta.len(), 64);
        assert_eq!(meta.get("task_slot").map(String::as_str), Some("2"));
        assert_eq!(
            meta.get("registrator_prefix").map(String::as_str),
            Some("prod/registrator")
        );
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
    fn transactions_stay_under_the_request_limit() {
        let value = vec![b'x'; 60 * 1024];
        let per_key: Vec<Vec<serde_json::Value>> = (0..10)
            .map(|i| lock_ops(&format!("k{i}"), &value, "s"))
            .collect();
        let batches = txn_batches(per_key);
        assert!(batches.len() > 1, "{} batches", batches.len());
        for batch in &batches {
            let bytes: usize = batch.iter().map(|op| op.to_string().len()).sum();
            assert!(bytes <= kv::MAX_TXN_BYTES, "{bytes} bytes");
            assert_eq!(batch.len() % 2, 0, "a key's two operations stay together");
        }
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 20);
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
