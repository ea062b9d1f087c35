//! The Consul catalog: each record as an agent service with a TTL check (and the check its
//! container asks for with Registrator's `SERVICE_CHECK_*`), and the rules of service meta.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{BackendError, Health, Result, ServiceCheck, ServiceRecord};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::client::{consul_index, expect_success, successful, Client, REQUEST_TIMEOUT};
use crate::kv::encode_key;
use crate::STORE;

/// The meta key of a registration that holds the key prefix of the bridge that made it: a
/// catalog-only resync lists only the registrations of its own prefix.
pub const PREFIX_META: &str = "registrator_prefix";

/// How many agent calls (catalog registrations, check updates) run at once.
pub(crate) const AGENT_CONCURRENCY: usize = 16;

/// How the agent checks this publisher's registrations: the TTL the bridge passes each check
/// within, how long a critical one stays before the agent removes it, and the key prefix that
/// marks a registration as this publisher's.
#[derive(Debug, Clone)]
pub(crate) struct TtlCheck {
    pub ttl: Duration,
    pub deregister_after: Duration,
    pub prefix: String,
}

/// One instance of a service in the catalog, as `/v1/catalog/service/<name>` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CatalogInstance {
    #[serde(rename = "ServiceID")]
    pub id: String,
    /// The index of the instance's last change.
    #[serde(rename = "ModifyIndex", default)]
    pub modify_index: u64,
    #[serde(rename = "ServiceMeta", default)]
    pub meta: Option<BTreeMap<String, String>>,
}

/// One service of the agent, as `/v1/agent/services` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Service")]
    pub service: String,
    #[serde(rename = "Address", default)]
    pub address: String,
    #[serde(rename = "Port", default)]
    pub port: u16,
    #[serde(rename = "Tags", default)]
    pub tags: Option<Vec<String>>,
    #[serde(rename = "Meta", default)]
    pub meta: Option<BTreeMap<String, String>>,
}

impl Client {
    /// Every service registered with this agent.
    pub async fn agent_services(&self) -> Result<Vec<AgentService>, BackendError> {
        let resp = self
            .send(
                self.request(Method::GET, "/v1/agent/services"),
                "list agent services",
            )
            .await?;
        let resp = successful(resp, "list agent services").await?;
        let services: BTreeMap<String, AgentService> =
            self.decode(resp, "list agent services").await?;
        Ok(services.into_values().collect())
    }

    /// The catalog's instances of `service` and the answer's index. With `index` above 0, a
    /// blocking query: Consul answers once the catalog's index passes `index`, or after `wait`.
    pub async fn catalog_service(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<CatalogInstance>, u64)> {
        // `consistent`, as the KV reads: no answer from a server that may have lost its leader.
        let mut path = format!("/v1/catalog/service/{}?consistent", encode_key(service));
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}s", wait.as_secs()));
        }
        // Consul adds up to wait/16 of jitter to a blocking query.
        let timeout = wait + wait / 16 + REQUEST_TIMEOUT;
        let rb = self.request(Method::GET, &path).timeout(timeout);
        let resp = self.send(rb, "catalog read").await?;
        let index = consul_index(&resp);
        let resp = successful(resp, "catalog read").await?;
        Ok((self.decode(resp, "catalog read").await?, index))
    }

    /// Registers one record as an agent service with a TTL check, and the record's own check
    /// when it has one. Should the agent refuse the registration with that check (a script
    /// check on an agent without `enable_script_checks`, say), the service is registered
    /// without it, so that it is not lost for its check.
    pub(crate) async fn register(&self, r: &ServiceRecord, check: &TtlCheck) -> Result<()> {
        let with_own = self.put_registration(&registration(r, check, true)).await;
        match (with_own, &r.check) {
            (Err(BackendError::Rejected { detail, .. }), Some(own)) => {
                tracing::warn!(store = STORE, id = %r.id, check = %own.source, answer = %detail,
                    "the agent refused the service's check; registering the service without it");
                self.put_registration(&registration(r, check, false)).await
            }
            (result, _) => result,
        }
    }

    async fn put_registration(&self, body: &serde_json::Value) -> Result<()> {
        let resp = self
            .send(
                self.request(Method::PUT, "/v1/agent/service/register")
                    .json(body),
                "register service",
            )
            .await?;
        expect_success(resp, "register service").await
    }

    /// Sets one registration's TTL check; registers the service again when the agent no longer
    /// knows it (an agent restart).
    pub(crate) async fn update_check(&self, r: &ServiceRecord, check: &TtlCheck) -> Result<()> {
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
        self.register(r, check).await
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

/// The check a registration's container asks for (`SERVICE_CHECK_*`).
fn own_check_id(service_id: &str) -> String {
    format!("service:{service_id}:check")
}

/// The body of `/v1/agent/service/register` for `r`: the bridge's TTL check, which carries
/// Docker's health, and with `own` the record's own check, both in `Checks`.
fn registration(r: &ServiceRecord, check: &TtlCheck, own: bool) -> serde_json::Value {
    let (status, output) = check_status(r.health);
    let mut checks = vec![json!({
        "CheckID": check_id(&r.id),
        "Name": "swarm-registrator TTL",
        "TTL": format!("{}s", check.ttl.as_secs()),
        "Status": status,
        "Notes": output,
        "DeregisterCriticalServiceAfter": format!("{}s", check.deregister_after.as_secs()),
    })];
    if let Some(c) = r.check.as_ref().filter(|_| own) {
        checks.push(agent_check(&r.id, c));
    }
    json!({
        "ID": r.id,
        "Name": r.service,
        "Address": r.ip.to_string(),
        "Port": r.port,
        "Tags": r.tags,
        "Meta": catalog_meta(r, &check.prefix),
        "Checks": checks,
    })
}

/// A record's own check as the agent's check definition. A script runs as `/bin/sh -c`.
pub fn agent_check(service_id: &str, c: &ServiceCheck) -> serde_json::Value {
    let mut def = serde_json::Map::new();
    def.insert("CheckID".into(), json!(own_check_id(service_id)));
    def.insert("Name".into(), json!(c.source));
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            def.insert(k.into(), json!(v));
        }
    };
    put("HTTP", &c.http);
    put("TCP", &c.tcp);
    put("TTL", &c.ttl);
    put("Interval", &c.interval);
    put("Timeout", &c.timeout);
    put("Status", &c.initial_status);
    put("DeregisterCriticalServiceAfter", &c.deregister_after);
    if let Some(script) = &c.script {
        def.insert("Args".into(), json!(["/bin/sh", "-c", script]));
    }
    serde_json::Value::Object(def)
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
/// `registrator_prefix`, `task_id`, `task_slot`, `stack`), then attributes, then `registrator.*` labels, then the
/// other labels, up to 64 keys.
pub fn catalog_meta(r: &ServiceRecord, prefix: &str) -> BTreeMap<String, String> {
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
    add(PREFIX_META, prefix);
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

/// The record a registration of this program under `prefix` stands for, as far as the catalog
/// keeps it: the fields of its meta ([`catalog_meta`] writes `node_id` and `container_id` first, always), its
/// address, port and tags; `None` for a service this program did not register. The labels are
/// not all in the meta, so the record may differ from the one first published: a caller that
/// compares it with the record it wants writes that one again.
pub fn record_from_agent(s: &AgentService, prefix: &str) -> Option<ServiceRecord> {
    let meta = s.meta.as_ref()?;
    if meta.get(PREFIX_META).map(String::as_str) != Some(prefix) {
        return None;
    }
    let node_id = meta.get("node_id")?.clone();
    let container_id = meta.get("container_id")?.clone();
    Some(ServiceRecord {
        tags: s.tags.clone().unwrap_or_default(),
        container_id,
        node_id,
        task_id: meta.get("task_id").cloned(),
        task_slot: meta.get("task_slot").and_then(|v| v.parse().ok()),
        stack: meta.get("stack").cloned(),
        ..ServiceRecord::new(&s.service, &s.id, s.address.parse().ok()?, s.port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ttl() -> TtlCheck {
        TtlCheck {
            ttl: Duration::from_secs(15),
            deregister_after: Duration::from_secs(60),
            prefix: "registrator".into(),
        }
    }

    #[test]
    fn a_record_without_a_check_gets_the_ttl_check_only() {
        let r = ServiceRecord::new("web", "h:web:80", "127.0.0.1".parse().expect("ip"), 8080);
        let body = registration(&r, &ttl(), true);
        let checks = body["Checks"].as_array().expect("Checks");
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0]["CheckID"], json!("service:h:web:80"));
        assert_eq!(checks[0]["TTL"], json!("15s"));
        assert!(body.get("Check").is_none());
    }

    #[test]
    fn the_records_check_is_registered_beside_the_ttl_check() {
        let mut r = ServiceRecord::new("web", "h:web:80", "127.0.0.1".parse().expect("ip"), 8080);
        r.attrs.insert("region".into(), "eu".into());
        r.check = Some(ServiceCheck {
            http: Some("http://127.0.0.1:8080/health".into()),
            interval: Some("2s".into()),
            timeout: Some("1s".into()),
            initial_status: Some("critical".into()),
            deregister_after: Some("5m".into()),
            source: "SERVICE_CHECK_HTTP".into(),
            ..ServiceCheck::default()
        });
        let body = registration(&r, &ttl(), true);
        let checks = body["Checks"].as_array().expect("Checks");
        assert_eq!(checks.len(), 2);
        assert_eq!(
            checks[1],
            json!({
                "CheckID": "service:h:web:80:check",
                "Name": "SERVICE_CHECK_HTTP",
                "HTTP": "http://127.0.0.1:8080/health",
                "Interval": "2s",
                "Timeout": "1s",
                "Status": "critical",
                "DeregisterCriticalServiceAfter": "5m",
            })
        );
        let meta = body["Meta"].as_object().expect("Meta");
        assert!(meta.keys().all(|k| !k.starts_with("check")), "{meta:?}");
        assert_eq!(
            registration(&r, &ttl(), false)["Checks"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );

        let script = ServiceCheck {
            script: Some("nc -z 10.0.0.3 6379".into()),
            interval: Some("10s".into()),
            source: "SERVICE_CHECK_SCRIPT".into(),
            ..ServiceCheck::default()
        };
        assert_eq!(
            agent_check("x", &script)["Args"],
            json!(["/bin/sh", "-c", "nc -z 10.0.0.3 6379"])
        );
    }
}
