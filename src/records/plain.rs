//! Records of plain containers, by Registrator's rules: published host ports with the
//! host's address, or with `--internal` the container's own address and exposed ports.

use std::net::IpAddr;

use backend_core::{Protocol, ServiceRecord};

use super::task::choose_network;
use super::{
    base_record, check_segments, ip_from_label, metadata, set_check, tags, BuildOptions,
    NodeIdentity, SkipReason, LABEL_NETWORK,
};
use crate::container::{ContainerInfo, PortSpec};
use crate::metadata::BadCheck;

/// One port of a plain container, as Registrator sees it.
struct PlainPort {
    spec: PortSpec,
    ip: IpAddr,
    port: u16,
}

pub(super) fn plain_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
    bad_checks: &mut Vec<BadCheck>,
) -> Result<Vec<ServiceRecord>, SkipReason> {
    let host_ip = opts
        .host_ip
        .or(node.address)
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let mut ports: Vec<PlainPort> = Vec::new();
    if c.network_mode == "host" {
        // Host networking: the exposed ports are the host's ports.
        for spec in &c.exposed {
            ports.push(PlainPort {
                spec: *spec,
                ip: host_ip,
                port: spec.port,
            });
        }
    } else if opts.internal {
        let mut specs = c.exposed.clone();
        specs.extend(c.published.iter().map(|p| p.container));
        specs.sort();
        specs.dedup();
        if !specs.is_empty() {
            let wanted = c.label(LABEL_NETWORK).or(opts.network.as_deref());
            let ip = choose_network(c, wanted, None, opts.ipv6)?;
            ports.extend(specs.into_iter().map(|spec| PlainPort {
                spec,
                ip,
                port: spec.port,
            }));
        }
    } else {
        // The first binding of each published container port.
        for p in &c.published {
            if ports.iter().any(|q| q.spec == p.container) {
                continue;
            }
            ports.push(PlainPort {
                spec: p.container,
                ip: opts.host_ip.or(p.host_ip).unwrap_or(host_ip),
                port: p.host_port,
            });
        }
    }

    let label_ip = ip_from_label(c, opts)?;
    let default_name = image_base_name(&c.image);
    let several = ports.len() > 1;
    let mut records = Vec::with_capacity(ports.len());
    for p in ports {
        let exposed = p.spec.port.to_string();
        let meta = metadata(c, &exposed);
        if meta.ignored() {
            continue;
        }
        let mut service = match meta.get("name") {
            Some(name) => name.to_string(),
            None if opts.explicit => continue,
            None => default_name.clone(),
        };
        if several && !meta.from_port("name") {
            service = format!("{service}-{exposed}");
        }
        let mut tags = tags(c, &meta, opts);
        let mut id = format!("{}:{}:{}", node.hostname, c.name, exposed);
        if p.spec.protocol != Protocol::Tcp {
            id = format!("{id}:{}", p.spec.protocol);
            tags.push(p.spec.protocol.to_string());
        }
        if let Some(custom) = meta.get("id") {
            id = custom.to_string();
        }
        let mut r = base_record(c, node);
        r.service = service;
        r.id = id;
        r.ip = label_ip.unwrap_or(p.ip);
        r.port = p.port;
        r.protocol = p.spec.protocol;
        r.tags = tags;
        r.attrs = meta.attrs();
        set_check(&mut r, &meta, bad_checks);
        records.push(check_segments(r, c)?);
    }
    Ok(records)
}

/// Registrator's default service name: the image's last path segment without its tag or
/// digest (`registry:5000/team/redis:7@sha256:..` is `redis`).
pub(super) fn image_base_name(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last).to_string()
}
