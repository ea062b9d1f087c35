//! Records of swarm tasks: one per task or per port, on the task's overlay address.

use std::net::IpAddr;

use backend_core::{Protocol, ServiceRecord};

use super::{
    base_record, check_segments, ip_from_label, metadata, set_check, tags, BuildOptions,
    NodeIdentity, SkipReason, LABEL_NETWORK, LABEL_NODE_ID, LABEL_PORT, LABEL_SERVICE_ID,
    LABEL_SERVICE_NAME, LABEL_STACK, LABEL_TASK_ID, LABEL_TASK_NAME,
};
use crate::container::{ContainerInfo, NetworkAttachment, PortSpec};
use crate::metadata::BadCheck;

pub(super) fn task_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
    bad_checks: &mut Vec<BadCheck>,
) -> Result<Vec<ServiceRecord>, SkipReason> {
    let task_id = c.label(LABEL_TASK_ID).unwrap_or_default();
    let swarm_service = c.label(LABEL_SERVICE_NAME).unwrap_or_default();
    let container = || c.name.clone();

    // Ports: the registrator.port label, else SERVICE_PORT, else the image's exposed ports.
    let unscoped = metadata(c, "");
    // An ignored task (SERVICE_IGNORE) needs no port: it is not published at all.
    if unscoped.ignored() {
        return Ok(Vec::new());
    }
    let ports = match (c.label(LABEL_PORT), unscoped.get("port")) {
        (Some(v), _) => parse_port_list(v).ok_or_else(|| SkipReason::BadPort {
            container: container(),
            key: LABEL_PORT,
            value: v.to_string(),
        })?,
        (None, Some(v)) => parse_port_list(v).ok_or_else(|| SkipReason::BadPort {
            container: container(),
            key: "SERVICE_PORT",
            value: v.to_string(),
        })?,
        (None, None) => c.exposed.clone(),
    };
    if ports.is_empty() {
        return Err(SkipReason::NoPort {
            container: container(),
        });
    }

    let stack = c.label(LABEL_STACK).map(str::to_string);
    let ip = match ip_from_label(c, opts)? {
        Some(ip) => ip,
        None => task_address(c, opts, stack.as_deref())?,
    };
    let slot = task_slot(c, swarm_service, task_id, &node.node_id)?;

    let several = ports.len() > 1;
    let mut records = Vec::with_capacity(ports.len());
    for spec in ports {
        let meta = metadata(c, &spec.port.to_string());
        if meta.ignored() {
            continue;
        }
        let service = match meta.get("name") {
            Some(name) => name.to_string(),
            None if opts.explicit => continue,
            None => swarm_service.to_string(),
        };
        let id = match meta.get("id") {
            Some(id) if !several || meta.from_port("id") => id.to_string(),
            _ if several => instance_suffix(task_id, spec),
            _ => task_id.to_string(),
        };
        let mut r = base_record(c, node);
        r.service = service;
        r.id = id;
        r.ip = ip;
        r.port = spec.port;
        r.protocol = spec.protocol;
        r.tags = tags(c, &meta, opts);
        r.attrs = meta.attrs();
        set_check(&mut r, &meta, bad_checks);
        r.task_id = Some(task_id.to_string());
        r.task_slot = slot;
        r.service_id = c.label(LABEL_SERVICE_ID).map(str::to_string);
        r.stack = stack.clone();
        records.push(check_segments(r, c)?);
    }
    Ok(records)
}

/// `<task-id>:<port>` or `<task-id>:<port>:udp`.
fn instance_suffix(task_id: &str, spec: PortSpec) -> String {
    match spec.protocol {
        Protocol::Tcp => format!("{task_id}:{}", spec.port),
        p => format!("{task_id}:{}:{p}", spec.port),
    }
}

/// The slot from the task name `<service>.<slot>.<task-id>`; `None` for a global service's
/// task, whose middle part is the node id.
fn task_slot(
    c: &ContainerInfo,
    service: &str,
    task_id: &str,
    node_id: &str,
) -> Result<Option<u64>, SkipReason> {
    let Some(task_name) = c.label(LABEL_TASK_NAME) else {
        return Ok(None);
    };
    let middle = task_name
        .strip_prefix(service)
        .and_then(|s| s.strip_prefix('.'))
        .and_then(|s| s.strip_suffix(task_id))
        .and_then(|s| s.strip_suffix('.'));
    match middle {
        Some(m) if m.bytes().all(|b| b.is_ascii_digit()) && !m.is_empty() => Ok(m.parse().ok()),
        Some(m) if m == node_id || c.label(LABEL_NODE_ID) == Some(m) => Ok(None),
        _ => Err(SkipReason::BadTaskName {
            container: c.name.clone(),
            task_name: task_name.to_string(),
        }),
    }
}

/// The task's address: on the chosen network (label, then flag), else on the first network
/// other than ingress, by name.
fn task_address(
    c: &ContainerInfo,
    opts: &BuildOptions,
    stack: Option<&str>,
) -> Result<IpAddr, SkipReason> {
    let wanted = c.label(LABEL_NETWORK).or(opts.network.as_deref());
    choose_network(c, wanted, stack, opts.ipv6)
}

pub(super) fn choose_network(
    c: &ContainerInfo,
    wanted: Option<&str>,
    stack: Option<&str>,
    ipv6: bool,
) -> Result<IpAddr, SkipReason> {
    let usable = |n: &&NetworkAttachment| !n.ingress && n.address().is_some();
    let address = |n: &NetworkAttachment| n.address_preferring(ipv6);
    match wanted {
        Some(w) => {
            // A stack's networks are named <stack>_<name>; accept the short name too.
            let stacked = stack.map(|s| format!("{s}_{w}"));
            c.networks
                .iter()
                .filter(usable)
                .find(|n| n.name == w || Some(&n.name) == stacked.as_ref())
                .and_then(address)
                .ok_or_else(|| SkipReason::NetworkNotFound {
                    container: c.name.clone(),
                    wanted: w.to_string(),
                    attached: c
                        .networks
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        }
        None => c
            .networks
            .iter()
            .find(usable)
            .and_then(address)
            .ok_or_else(|| SkipReason::NoAddress {
                container: c.name.clone(),
            }),
    }
}

/// A port list: `27017`, `27017/tcp,28017/udp`. `None` when any entry is invalid or the list
/// is empty.
pub fn parse_port_list(s: &str) -> Option<Vec<PortSpec>> {
    let mut ports: Vec<PortSpec> = s
        .split(',')
        .map(PortSpec::parse)
        .collect::<Option<Vec<_>>>()?;
    ports.sort();
    ports.dedup();
    (!ports.is_empty()).then_some(ports)
}
