//! From a container to the records that publish it: a pure function, unit-tested.
//!
//! Two kinds of container:
//!
//! * **Swarm tasks** (they carry `com.docker.swarm.task.id`): one record per task, or one per
//!   port where it has several, with the task's address on its overlay network. Published
//!   ports are not used: the routing mesh does not identify a task.
//! * **Plain containers**: Registrator's rules. Published host ports with the host's address,
//!   or with `--internal` the container's own address and exposed ports.

mod plain;
mod task;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use backend_core::layout::valid_segment;
use backend_core::ServiceRecord;

use crate::container::ContainerInfo;
use crate::metadata::{BadCheck, Metadata, TagTemplate};
use plain::plain_records;
pub use task::parse_port_list;
use task::task_records;

pub const LABEL_TASK_ID: &str = "com.docker.swarm.task.id";
pub const LABEL_TASK_NAME: &str = "com.docker.swarm.task.name";
pub const LABEL_SERVICE_NAME: &str = "com.docker.swarm.service.name";
pub const LABEL_SERVICE_ID: &str = "com.docker.swarm.service.id";
pub const LABEL_NODE_ID: &str = "com.docker.swarm.node.id";
pub const LABEL_STACK: &str = "com.docker.stack.namespace";
/// The ports of a swarm task: `27017` or `27017/tcp,28017/udp`.
pub const LABEL_PORT: &str = "registrator.port";
/// The network whose address to publish.
pub const LABEL_NETWORK: &str = "registrator.network";

/// The bridge's settings that shape records.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Publish plain containers with their own address and exposed ports.
    pub internal: bool,
    /// The address to publish for host ports (`--ip`).
    pub host_ip: Option<IpAddr>,
    /// The network whose address to publish (`--network`); a `registrator.network` label on
    /// the container beats it.
    pub network: Option<String>,
    /// Publish only containers that set `SERVICE_NAME` (`--explicit`).
    pub explicit: bool,
    /// Publish a container's IPv6 address on a network that has one (`--ipv6`).
    pub ipv6: bool,
    /// Tags added after every record's own (`--tags`).
    pub tags: Vec<TagTemplate>,
    /// The container label whose address to publish when a container sets it
    /// (`--use-ip-from-label`).
    pub ip_label: Option<String>,
}

/// The node the bridge runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The swarm node id, or the engine id outside a swarm.
    pub node_id: String,
    pub hostname: String,
    /// The address other nodes reach this one at (the swarm's advertised address), used for
    /// host ports when `--ip` is not given.
    pub address: Option<IpAddr>,
}

/// Why a container is not published. Each names the container and what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("container {container}: label or variable {key}={value:?} is not a valid port list; write it like 27017 or 27017/tcp,28017/udp")]
    BadPort {
        container: String,
        key: &'static str,
        value: String,
    },
    #[error("container {container}: swarm task has no port to publish; set the container label {LABEL_PORT}=<port> (docker service create --container-label) or EXPOSE one in the image")]
    NoPort { container: String },
    #[error("container {container}: is not attached to network {wanted:?} (attached: {attached}); fix --network or the {LABEL_NETWORK} label")]
    NetworkNotFound {
        container: String,
        wanted: String,
        attached: String,
    },
    #[error("container {container}: has no address on any network but ingress; attach it to an overlay network")]
    NoAddress { container: String },
    #[error("container {container}: service name {name:?} cannot be used as a key segment (no '/', no control characters, not '.' or '..'); fix SERVICE_NAME")]
    BadName { container: String, name: String },
    #[error("container {container}: instance id {id:?} cannot be used as a key segment (no '/', no control characters); fix SERVICE_ID")]
    BadId { container: String, id: String },
    #[error("container {container}: label {label}={value:?} (--use-ip-from-label) is not an IP address; write it like 10.0.0.5 or 10.0.0.5/24")]
    BadIpLabel {
        container: String,
        label: String,
        value: String,
    },
    #[error("container {container}: task name {task_name:?} does not have the form <service>.<slot>.<task-id>")]
    BadTaskName {
        container: String,
        task_name: String,
    },
    #[error("container {container}: its record for {key} would take {bytes} bytes, more than the {max} a record may; its labels and SERVICE_* values are copied into it: make them smaller (large data belongs in a volume or a config, not a label)")]
    TooLarge {
        container: String,
        key: String,
        bytes: usize,
        max: usize,
    },
}

/// The records of one container, and what of its metadata could not be used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Built {
    pub records: Vec<ServiceRecord>,
    /// Checks left out of the records (the records are published without them).
    pub bad_checks: Vec<BadCheck>,
}

/// The records that publish `c`; empty when it is not running, is paused, or is ignored.
pub fn build_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
) -> Result<Vec<ServiceRecord>, SkipReason> {
    build(c, opts, node).map(|b| b.records)
}

/// [`build_records`], with the values that were left out.
pub fn build(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
) -> Result<Built, SkipReason> {
    let mut built = Built::default();
    if !c.running || c.paused {
        return Ok(built);
    }
    built.records = if c.label(LABEL_TASK_ID).is_some() {
        task_records(c, opts, node, &mut built.bad_checks)?
    } else {
        plain_records(c, opts, node, &mut built.bad_checks)?
    };
    built.bad_checks.dedup();
    if let Some((r, bytes)) = built
        .records
        .iter()
        .map(|r| (r, r.to_json().len()))
        .find(|(_, bytes)| *bytes > backend_core::RECORD_MAX_BYTES)
    {
        return Err(SkipReason::TooLarge {
            container: c.name.clone(),
            key: format!("{}/{}", r.service, r.id),
            bytes,
            max: backend_core::RECORD_MAX_BYTES,
        });
    }
    Ok(built)
}

/// Sets the check of `r` from `meta` (on the record's address and port); a bad one is left
/// out and noted.
fn set_check(r: &mut ServiceRecord, meta: &Metadata, bad: &mut Vec<BadCheck>) {
    match meta.check(r.ip, r.port) {
        Ok(check) => r.check = check,
        Err(e) => bad.push(e),
    }
}

fn metadata(c: &ContainerInfo, port: &str) -> Metadata {
    Metadata::collect(
        c.env.iter().map(String::as_str),
        c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        port,
    )
}

/// The address in the container's `--use-ip-from-label` label (Registrator's rule: a `/prefix`
/// after it is dropped); `None` when the flag or the label is not set.
fn ip_from_label(c: &ContainerInfo, opts: &BuildOptions) -> Result<Option<IpAddr>, SkipReason> {
    let Some(label) = opts.ip_label.as_deref() else {
        return Ok(None);
    };
    let Some(value) = c.label(label).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let address = value.rsplit_once('/').map_or(value, |(a, _)| a);
    address
        .trim()
        .parse()
        .map(Some)
        .map_err(|_| SkipReason::BadIpLabel {
            container: c.name.clone(),
            label: label.to_string(),
            value: value.to_string(),
        })
}

/// The record's tags: its own (`SERVICE_TAGS`), then `--tags` filled in for `c`.
fn tags(c: &ContainerInfo, meta: &Metadata, opts: &BuildOptions) -> Vec<String> {
    let mut tags = meta.tags();
    tags.extend(
        opts.tags
            .iter()
            .map(|t| t.render(c))
            .filter(|t| !t.is_empty()),
    );
    tags
}

/// Labels copied into records: all but Docker's own swarm and stack labels.
fn record_labels(c: &ContainerInfo) -> std::collections::BTreeMap<String, String> {
    c.labels
        .iter()
        .filter(|(k, _)| !k.starts_with("com.docker.swarm.") && !k.starts_with("com.docker.stack."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn base_record(c: &ContainerInfo, node: &NodeIdentity) -> ServiceRecord {
    ServiceRecord {
        labels: record_labels(c),
        container_id: c.id.clone(),
        container_name: c.name.clone(),
        node_id: node.node_id.clone(),
        hostname: node.hostname.clone(),
        health: c.health,
        started_at: c.started_at.clone(),
        ..ServiceRecord::new("", "", IpAddr::from([0, 0, 0, 0]), 0)
    }
}

fn check_segments(r: ServiceRecord, c: &ContainerInfo) -> Result<ServiceRecord, SkipReason> {
    if !valid_segment(&r.service) {
        return Err(SkipReason::BadName {
            container: c.name.clone(),
            name: r.service,
        });
    }
    if !valid_segment(&r.id) {
        return Err(SkipReason::BadId {
            container: c.name.clone(),
            id: r.id,
        });
    }
    Ok(r)
}
