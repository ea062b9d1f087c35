//! The Consul catalog: each record as an agent service with a TTL check, and the rules of
//! service meta.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{BackendError, Health, ServiceRecord};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::client::{expect_success, Client};
use crate::kv::encode_key;
use crate::STORE;

/// How many agent calls (catalog registrations, check updates) run at once.
pub(crate) const AGENT_CONCURRENCY: usize = 16;

impl Client {
    /// Registers one record as an agent service with a TTL check.
    pub(crate) async fn register(
        &self,
        r: &ServiceRecord,
        ttl: Duration,
        deregister_after: Duration,
    ) -> Result<(), BackendError> {
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
                    format!("{}s", deregister_after.as_secs()),
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
    pub(crate) async fn update_check(
        &self,
        r: &ServiceRecord,
        ttl: Duration,
        deregister_after: Duration,
    ) -> Result<(), BackendError> {
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
        self.register(r, ttl, deregister_after).await
    }

    pub(crate) async fn deregister(&self, id: &str) -> Result<(), BackendError> {
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
