//! From a container to the records that publish it: a pure function, unit-tested.
//!
//! Two kinds of container:
//!
//! * **Swarm tasks** (they carry `com.docker.swarm.task.id`): one record per task, or one per
//!   port where it has several, with the task's address on its overlay network. Published
//!   ports are not used: the routing mesh does not identify a task.
//! * **Plain containers**: Registrator's rules. Published host ports with the host's address,
//!   or with `--internal` the container's own address and exposed ports.

use std::net::IpAddr;

use backend_core::layout::valid_segment;
use backend_core::{Protocol, ServiceRecord, SCHEMA_VERSION};

use crate::container::{ContainerInfo, NetworkAttachment, PortSpec};
use crate::metadata::Metadata;

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

/// The swarm's routing-mesh network: never a task's own address.
const INGRESS: &str = "ingress";

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
    #[error("container {container}: task name {task_name:?} does not have the form <service>.<slot>.<task-id>")]
    BadTaskName {
        container: String,
        task_name: String,
    },
}

/// The records that publish `c`; empty when it is not running, is paused, or is ignored.
pub fn build_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
) -> Result<Vec<ServiceRecord>, SkipReason> {
    if !c.running || c.paused {
        return Ok(Vec::new());
    }
    if c.label(LABEL_TASK_ID).is_some() {
        task_records(c, opts, node)
    } else {
        plain_records(c, opts, node)
    }
}

fn metadata(c: &ContainerInfo, port: &str) -> Metadata {
    Metadata::collect(
        c.env.iter().map(String::as_str),
        c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        port,
    )
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
        schema_version: SCHEMA_VERSION,
        service: String::new(),
        id: String::new(),
        ip: IpAddr::from([0, 0, 0, 0]),
        port: 0,
        protocol: Protocol::Tcp,
        tags: Vec::new(),
        labels: record_labels(c),
        attrs: Default::default(),
        container_id: c.id.clone(),
        container_name: c.name.clone(),
        node_id: node.node_id.clone(),
        hostname: node.hostname.clone(),
        task_id: None,
        task_slot: None,
        service_id: None,
        stack: None,
        health: c.health,
        started_at: c.started_at.clone(),
    }
}

fn task_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
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
    let ip = task_address(c, opts, stack.as_deref())?;
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
        r.tags = meta.tags();
        r.attrs = meta.attrs();
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
    choose_network(c, wanted, stack)
}

fn choose_network(
    c: &ContainerInfo,
    wanted: Option<&str>,
    stack: Option<&str>,
) -> Result<IpAddr, SkipReason> {
    let usable = |n: &&NetworkAttachment| n.name != INGRESS && n.address().is_some();
    match wanted {
        Some(w) => {
            // A stack's networks are named <stack>_<name>; accept the short name too.
            let stacked = stack.map(|s| format!("{s}_{w}"));
            c.networks
                .iter()
                .filter(usable)
                .find(|n| n.name == w || Some(&n.name) == stacked.as_ref())
                .and_then(NetworkAttachment::address)
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
            .and_then(NetworkAttachment::address)
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

/// One port of a plain container, as Registrator sees it.
struct PlainPort {
    spec: PortSpec,
    ip: IpAddr,
    port: u16,
}

fn plain_records(
    c: &ContainerInfo,
    opts: &BuildOptions,
    node: &NodeIdentity,
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
            let ip = choose_network(c, wanted, None)?;
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
        let mut tags = meta.tags();
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
        r.ip = p.ip;
        r.port = p.port;
        r.protocol = p.spec.protocol;
        r.tags = tags;
        r.attrs = meta.attrs();
        records.push(check_segments(r, c)?);
    }
    Ok(records)
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

/// Registrator's default service name: the image's last path segment without its tag or
/// digest (`registry:5000/team/redis:7@sha256:..` is `redis`).
fn image_base_name(image: &str) -> String {
    let image = image.split('@').next().unwrap_or(image);
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split(':').next().unwrap_or(last).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use backend_core::Health;

    use super::*;
    use crate::container::PublishedPort;

    fn node() -> NodeIdentity {
        NodeIdentity {
            node_id: "node1".into(),
            hostname: "host1".into(),
            address: Some("192.0.2.10".parse().expect("ip")),
        }
    }

    fn task(labels: &[(&str, &str)]) -> ContainerInfo {
        let mut all: BTreeMap<String, String> = BTreeMap::from([
            (LABEL_TASK_ID.into(), "t1".into()),
            (LABEL_TASK_NAME.into(), "mongo.2.t1".into()),
            (LABEL_SERVICE_NAME.into(), "mongo".into()),
            (LABEL_SERVICE_ID.into(), "svc1".into()),
            (LABEL_NODE_ID.into(), "node1".into()),
            ("app".into(), "db".into()),
        ]);
        for (k, v) in labels {
            all.insert(k.to_string(), v.to_string());
        }
        ContainerInfo {
            id: "c1".into(),
            name: "mongo.2.t1".into(),
            image: "mongo:7".into(),
            running: true,
            labels: all,
            exposed: vec![PortSpec::parse("27017").expect("port")],
            networks: vec![
                NetworkAttachment {
                    name: "ingress".into(),
                    ipv4: Some("10.0.0.5".parse().expect("ip")),
                    ipv6: None,
                },
                NetworkAttachment {
                    name: "mongo-net".into(),
                    ipv4: Some("10.0.1.7".parse().expect("ip")),
                    ipv6: None,
                },
            ],
            ..Default::default()
        }
    }

    fn plain() -> ContainerInfo {
        ContainerInfo {
            id: "c2".into(),
            name: "web-1".into(),
            image: "registry:5000/team/nginx:1.25".into(),
            running: true,
            exposed: vec![PortSpec::parse("80").expect("port")],
            published: vec![PublishedPort {
                container: PortSpec::parse("80").expect("port"),
                host_ip: None,
                host_port: 8080,
            }],
            networks: vec![NetworkAttachment {
                name: "bridge".into(),
                ipv4: Some("172.17.0.2".parse().expect("ip")),
                ipv6: None,
            }],
            network_mode: "bridge".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_task_gives_one_record_with_its_overlay_address_and_slot() {
        let r = build_records(&task(&[]), &BuildOptions::default(), &node()).expect("builds");
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r.service, "mongo");
        assert_eq!(r.id, "t1");
        assert_eq!(r.ip, "10.0.1.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(r.port, 27017);
        assert_eq!(r.task_slot, Some(2));
        assert_eq!(r.service_id.as_deref(), Some("svc1"));
        assert_eq!(r.node_id, "node1");
        assert_eq!(r.labels, BTreeMap::from([("app".into(), "db".into())]));
    }

    #[test]
    fn the_network_label_beats_the_flag_and_stack_names_are_understood() {
        let mut c = task(&[(LABEL_STACK, "prod"), (LABEL_NETWORK, "backend")]);
        c.networks.push(NetworkAttachment {
            name: "prod_backend".into(),
            ipv4: None,
            ipv6: Some("fd00::9".parse().expect("ip")),
        });
        let opts = BuildOptions {
            network: Some("mongo-net".into()),
            ..Default::default()
        };
        let r = build_records(&c, &opts, &node()).expect("builds");
        assert_eq!(r[0].ip, "fd00::9".parse::<IpAddr>().expect("ip"));
        assert_eq!(r[0].stack.as_deref(), Some("prod"));
    }

    #[test]
    fn ingress_is_never_used() {
        let mut c = task(&[]);
        c.networks.retain(|n| n.name == "ingress");
        assert!(matches!(
            build_records(&c, &BuildOptions::default(), &node()),
            Err(SkipReason::NoAddress { .. })
        ));
        let opts = BuildOptions {
            network: Some("ingress".into()),
            ..Default::default()
        };
        assert!(matches!(
            build_records(&c, &opts, &node()),
            Err(SkipReason::NetworkNotFound { .. })
        ));
    }

    #[test]
    fn port_label_and_several_ports() {
        let c = task(&[(LABEL_PORT, "28017/udp, 27017")]);
        let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
        let ids: Vec<_> = r.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, vec!["t1:27017", "t1:28017:udp"]);
        assert!(r
            .iter()
            .all(|r| r.service == "mongo" && r.task_id.as_deref() == Some("t1")));
    }

    #[test]
    fn a_malformed_port_label_names_the_label() {
        let c = task(&[(LABEL_PORT, "27017,http")]);
        let err = build_records(&c, &BuildOptions::default(), &node()).expect_err("bad port");
        let msg = err.to_string();
        assert!(
            msg.contains(LABEL_PORT) && msg.contains("mongo.2.t1"),
            "{msg}"
        );
        let mut c = task(&[("SERVICE_PORT", "0")]);
        c.exposed.clear();
        assert!(matches!(
            build_records(&c, &BuildOptions::default(), &node()),
            Err(SkipReason::BadPort {
                key: "SERVICE_PORT",
                ..
            })
        ));
    }

    #[test]
    fn a_task_without_any_port_is_skipped_with_advice() {
        let mut c = task(&[]);
        c.exposed.clear();
        let err = build_records(&c, &BuildOptions::default(), &node()).expect_err("no port");
        assert!(err.to_string().contains(LABEL_PORT));
    }

    #[test]
    fn service_name_label_overrides_the_swarm_service() {
        let c = task(&[("SERVICE_NAME", "db")]);
        let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
        assert_eq!(r[0].service, "db");
        let c = task(&[("SERVICE_NAME", "a/b")]);
        assert!(matches!(
            build_records(&c, &BuildOptions::default(), &node()),
            Err(SkipReason::BadName { .. })
        ));
    }

    #[test]
    fn global_service_tasks_have_no_slot() {
        let c = task(&[(LABEL_TASK_NAME, "mongo.node1.t1")]);
        let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
        assert_eq!(r[0].task_slot, None);
        let c = task(&[(LABEL_TASK_NAME, "garbage")]);
        assert!(matches!(
            build_records(&c, &BuildOptions::default(), &node()),
            Err(SkipReason::BadTaskName { .. })
        ));
    }

    #[test]
    fn stopped_paused_and_ignored_containers_give_nothing() {
        let mut c = task(&[]);
        c.paused = true;
        assert!(build_records(&c, &BuildOptions::default(), &node())
            .expect("ok")
            .is_empty());
        let mut c = plain();
        c.running = false;
        assert!(build_records(&c, &BuildOptions::default(), &node())
            .expect("ok")
            .is_empty());
        let mut c = plain();
        c.env.push("SERVICE_IGNORE=1".into());
        assert!(build_records(&c, &BuildOptions::default(), &node())
            .expect("ok")
            .is_empty());
        // A swarm task that has no port but says it is ignored is skipped quietly, not refused.
        let mut c = task(&[]);
        c.labels.remove(LABEL_PORT);
        c.exposed.clear();
        assert!(matches!(
            build_records(&c, &BuildOptions::default(), &node()),
            Err(SkipReason::NoPort { .. })
        ));
        c.labels.insert("SERVICE_IGNORE".into(), "true".into());
        assert!(build_records(&c, &BuildOptions::default(), &node())
            .expect("ignored, not an error")
            .is_empty());
    }

    #[test]
    fn a_plain_container_is_published_as_registrator_does() {
        let mut c = plain();
        c.labels.insert("SERVICE_NAME".into(), "web".into());
        c.labels.insert("SERVICE_TAGS".into(), "prod,v1".into());
        c.env.push("SERVICE_REGION=eu".into());
        c.health = Some(Health::Healthy);
        let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r.service, "web");
        assert_eq!(r.id, "host1:web-1:80");
        assert_eq!(r.ip, "192.0.2.10".parse::<IpAddr>().expect("ip"));
        assert_eq!(r.port, 8080);
        assert_eq!(r.tags, vec!["prod", "v1"]);
        assert_eq!(r.attrs.get("region").map(String::as_str), Some("eu"));
        assert_eq!(r.task_id, None);
        assert_eq!(r.health, Some(Health::Healthy));
    }

    #[test]
    fn plain_defaults_internal_and_groups() {
        let mut c = plain();
        let r = build_records(&c, &BuildOptions::default(), &node()).expect("builds");
        assert_eq!(r[0].service, "nginx");

        let internal = BuildOptions {
            internal: true,
            ..Default::default()
        };
        c.exposed.push(PortSpec::parse("53/udp").expect("port"));
        c.env.push("SERVICE_53_NAME=dns".into());
        let r = build_records(&c, &internal, &node()).expect("builds");
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.service.as_str(), r.id.as_str(), r.port))
            .collect();
        assert_eq!(
            got,
            vec![
                ("dns", "host1:web-1:53:udp", 53),
                ("nginx-80", "host1:web-1:80", 80)
            ]
        );
        assert!(r
            .iter()
            .all(|r| r.ip == "172.17.0.2".parse::<IpAddr>().expect("ip")));
        assert!(r[0].tags.contains(&"udp".to_string()));
    }

    #[test]
    fn explicit_mode_publishes_only_named_containers() {
        let opts = BuildOptions {
            explicit: true,
            ..Default::default()
        };
        assert!(build_records(&plain(), &opts, &node())
            .expect("ok")
            .is_empty());
        assert!(build_records(&task(&[]), &opts, &node())
            .expect("ok")
            .is_empty());
        let mut c = plain();
        c.env.push("SERVICE_NAME=web".into());
        assert_eq!(build_records(&c, &opts, &node()).expect("ok").len(), 1);
    }

    #[test]
    fn explicit_ip_and_custom_id() {
        let mut c = plain();
        c.labels.insert("SERVICE_ID".into(), "web-primary".into());
        let opts = BuildOptions {
            host_ip: Some("198.51.100.1".parse().expect("ip")),
            ..Default::default()
        };
        let r = build_records(&c, &opts, &node()).expect("builds");
        assert_eq!(r[0].id, "web-primary");
        assert_eq!(r[0].ip, "198.51.100.1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn image_names() {
        assert_eq!(image_base_name("redis"), "redis");
        assert_eq!(image_base_name("redis:7"), "redis");
        assert_eq!(image_base_name("registry:5000/a/redis:7"), "redis");
        assert_eq!(image_base_name("redis@sha256:abc"), "redis");
    }
}
