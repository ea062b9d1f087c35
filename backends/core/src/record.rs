//! The records the bridge writes: a public contract, documented in `docs/key-layout.md`.
//!
//! Field names are fixed. New optional fields may be added without changing
//! [`SCHEMA_VERSION`]; a change that breaks readers (a renamed or re-typed field) bumps it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The version of the record schema written in every record's `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// The most one record's JSON may take. The stores' own limits are larger but apply to a
/// whole write (etcd's request limit, 1.5 MiB by default, and its clients' 4 MiB answer limit;
/// Consul's 512 KiB per value and per transaction), so a publisher batches records by size
/// too, and a record over this cap is refused by the bridge alone, naming its container.
pub const RECORD_MAX_BYTES: usize = 64 * 1024;

/// Splits `items` into batches of at most `max_items` and, as far as one item allows, at most
/// `max_bytes` by `size`, in order: a publisher's writes of many records. An item larger than
/// `max_bytes` goes alone.
pub fn batches<T>(
    items: impl IntoIterator<Item = T>,
    max_items: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for item in items {
        let n = size(&item);
        if !batch.is_empty() && (batch.len() >= max_items || bytes + n > max_bytes) {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += n;
        batch.push(item);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// The transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses Docker's port suffix (`80/tcp`); anything unknown is `None`.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Docker's health status of a container that has a healthcheck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn parse(s: &str) -> Option<Health> {
        match s {
            "starting" => Some(Health::Starting),
            "healthy" => Some(Health::Healthy),
            "unhealthy" => Some(Health::Unhealthy),
            _ => None,
        }
    }
}

/// One published instance: `<prefix>/services/<service>/<id>`.
///
/// For a swarm task, `id` is the task id (with `:<port>[:udp]` appended when the task publishes
/// several ports) and the `task_*`, `service_id` and `stack` fields are set. For a plain
/// container, `id` is Registrator's `<hostname>:<container-name>:<port>[:udp]` and they are
/// absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub schema_version: u32,
    pub service: String,
    pub id: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// `SERVICE_TAGS`, split on commas.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The container's labels, except Docker's own `com.docker.swarm.*` and
    /// `com.docker.stack.*` (their content is in the fields below).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Registrator's attributes: every `SERVICE_<KEY>` / `SERVICE_<port>_<KEY>` of the
    /// container other than NAME, ID, TAGS, IGNORE, PORT and the `CHECK_*` keys (those are
    /// in `check`), with the key lower-cased.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
    pub container_id: String,
    pub container_name: String,
    /// The swarm node id of the bridge that wrote this record, or the engine's id when the
    /// engine is not in a swarm. A bridge only ever deletes records carrying its own node id.
    pub node_id: String,
    /// The hostname of the node.
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_slot: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<String>,
    /// Present only when the container has a healthcheck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// When the container started, as Docker reports it (RFC 3339, UTC, e.g.
    /// `2026-11-26T19:04:30.757991713Z`). Tells the newer of two tasks that claim one slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// The health check a Consul agent runs for this instance, from Registrator's
    /// `SERVICE_CHECK_*` keys; absent when the container sets none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<ServiceCheck>,
}

/// A health check of one instance, as Registrator's `SERVICE_CHECK_*` keys describe it: exactly
/// one of `http`, `tcp`, `script` and `ttl` is set. Durations are Go durations (`10s`,
/// `1m30s`), as Consul reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCheck {
    /// The URL the agent GETs (`http://` or `https://`): passing on a 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// The `host:port` the agent connects to: passing when the connection opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// A shell command the agent runs (`sh -c`) on its own host: exit 0 passing, 1 warning,
    /// anything else critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// A TTL check that the service itself must pass within this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// How often the agent runs an HTTP, TCP or script check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `passing`, `warning` or `critical`: the status before the first run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_status: Option<String>,
    /// How long the check may stay critical before the agent removes the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deregister_after: Option<String>,
    /// The key that asked for this check, as the container wrote it
    /// (`SERVICE_CHECK_HTTP`, `SERVICE_8080_CHECK_TCP`): the check's name in Consul.
    pub source: String,
}

/// Why a value in the store is not a record this crate understands.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON record of swarm-registrator: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record schema_version {found} is newer than this program understands ({SCHEMA_VERSION}); upgrade it")]
    NewerSchema { found: u32 },
    #[error("record says service {service:?} id {id:?}, but its key says {key:?}")]
    KeyMismatch {
        key: String,
        service: String,
        id: String,
    },
}

impl ServiceRecord {
    /// A TCP record of `service` with `id` at `ip:port` in the current schema, every other
    /// field empty: where a record is built, the fields it knows are set over this one
    /// (`ServiceRecord { node_id, ..ServiceRecord::new(..) }`).
    pub fn new(service: impl Into<String>, id: impl Into<String>, ip: IpAddr, port: u16) -> Self {
        ServiceRecord {
            schema_version: SCHEMA_VERSION,
            service: service.into(),
            id: id.into(),
            ip,
            port,
            protocol: Protocol::Tcp,
            tags: Vec::new(),
            labels: BTreeMap::new(),
            attrs: BTreeMap::new(),
            container_id: String::new(),
            container_name: String::new(),
            node_id: String::new(),
            hostname: String::new(),
            task_id: None,
            task_slot: None,
            service_id: None,
            stack: None,
            health: None,
            started_at: None,
            check: None,
        }
    }

    /// The JSON written into the store.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings, numbers and maps with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a value read from the store, checking the schema version.
    pub fn from_json(value: &[u8]) -> Result<ServiceRecord, DecodeError> {
        let record: ServiceRecord = serde_json::from_slice(value)?;
        if record.schema_version > SCHEMA_VERSION {
            return Err(DecodeError::NewerSchema {
                found: record.schema_version,
            });
        }
        Ok(record)
    }
}

/// One running bridge: `<prefix>/nodes/<node-id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub schema_version: u32,
    pub node_id: String,
    pub hostname: String,
    /// The bridge's version.
    pub version: String,
    /// When this bridge process started, RFC 3339 in UTC.
    pub started_at: String,
    /// The Docker engine version it talks to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
}

impl NodeRecord {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn batches_keep_the_order_and_both_limits() {
        let sizes = [4, 4, 4, 10, 1, 1, 1];
        let got = super::batches(sizes, 2, 8, |n| *n);
        assert_eq!(
            got,
            vec![vec![4, 4], vec![4], vec![10], vec![1, 1], vec![1]]
        );
        assert!(super::batches(Vec::<usize>::new(), 2, 8, |n| *n).is_empty());
    }

    use super::*;

    fn task_record() -> ServiceRecord {
        ServiceRecord {
            labels: BTreeMap::from([("registrator.replset".into(), "rs0".into())]),
            container_id: "c0ffee".into(),
            container_name: "mongo.1.x1y2".into(),
            node_id: "node1".into(),
            hostname: "host1".into(),
            task_id: Some("x1y2".into()),
            task_slot: Some(1),
            service_id: Some("svc".into()),
            ..ServiceRecord::new("mongo", "x1y2", "10.0.1.5".parse().expect("ip"), 27017)
        }
    }

    #[test]
    fn json_uses_the_contract_field_names() {
        let v: serde_json::Value =
            serde_json::from_slice(&task_record().to_json()).expect("valid json");
        for field in [
            "schema_version",
            "service",
            "id",
            "ip",
            "port",
            "protocol",
            "labels",
            "container_id",
            "node_id",
            "hostname",
            "task_id",
            "task_slot",
            "service_id",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["task_slot"], serde_json::json!(1));
        assert_eq!(v["ip"], serde_json::json!("10.0.1.5"));
        assert_eq!(v["protocol"], serde_json::json!("tcp"));
        assert!(
            v.get("stack").is_none(),
            "absent optional fields are omitted"
        );
    }

    #[test]
    fn round_trip() {
        let r = task_record();
        assert_eq!(ServiceRecord::from_json(&r.to_json()).expect("decodes"), r);
    }

    #[test]
    fn ipv6_round_trips() {
        let mut r = task_record();
        r.ip = "fd00::5".parse().expect("ip");
        let back = ServiceRecord::from_json(&r.to_json()).expect("decodes");
        assert_eq!(back.ip, r.ip);
    }

    #[test]
    fn foreign_values_are_rejected_with_a_reason() {
        assert!(matches!(
            ServiceRecord::from_json(b"10.0.0.1:27017"),
            Err(DecodeError::Json(_))
        ));
        let mut v: serde_json::Value =
            serde_json::from_slice(&task_record().to_json()).expect("json");
        v["schema_version"] = serde_json::json!(SCHEMA_VERSION + 1);
        let err = ServiceRecord::from_json(&serde_json::to_vec(&v).expect("json"))
            .expect_err("newer schema");
        assert!(err.to_string().contains("upgrade"), "{err}");
    }
}
