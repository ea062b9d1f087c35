//! What the bridge needs to know about one container, independent of the Docker client.
//!
//! [`ContainerInfo::from_inspect`] reads it out of `docker inspect`; the record building in
//! [`crate::records`] is a pure function of it, so it is unit-tested without an engine.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use backend_core::{Health, Protocol};
use bollard::models::{ContainerInspectResponse, HealthStatusEnum};

/// A container port with its protocol, as in `27017/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

impl PortSpec {
    /// Parses `27017`, `27017/tcp` or `53/udp`.
    pub fn parse(s: &str) -> Option<PortSpec> {
        let s = s.trim();
        let (port, protocol) = match s.split_once('/') {
            Some((p, proto)) => (p, Protocol::parse(&proto.to_ascii_lowercase())?),
            None => (s, Protocol::Tcp),
        };
        let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
        Some(PortSpec { port, protocol })
    }
}

/// A container port published on the host (`-p`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPort {
    pub container: PortSpec,
    /// The host address it is bound to; `None` for all addresses (`0.0.0.0`, `::`).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
}

/// The swarm's default routing-mesh network. Another name can be the ingress network too
/// (`docker network create --ingress`): the network's own `Ingress` flag says.
pub const DEFAULT_INGRESS: &str = "ingress";

/// The container's address on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAttachment {
    pub name: String,
    /// The network's id (empty when the engine did not say).
    pub network_id: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Whether it is the swarm's routing-mesh network, never a task's own address.
    /// [`ContainerInfo::from_inspect`] can only guess from the name ([`DEFAULT_INGRESS`]); the
    /// engine sets it from the network's `Ingress` flag ([`ContainerInfo::set_ingress`]).
    pub ingress: bool,
}

impl NetworkAttachment {
    /// The address to publish: IPv4 where there is one, else the global IPv6 address.
    pub fn address(&self) -> Option<IpAddr> {
        self.address_preferring(false)
    }

    /// The address to publish, with `ipv6` the global IPv6 address where there is one (a
    /// dual-stack network), else IPv4 first.
    pub fn address_preferring(&self, ipv6: bool) -> Option<IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        let v6 = self.ipv6.map(IpAddr::V6);
        if ipv6 {
            v6.or(v4)
        } else {
            v4.or(v6)
        }
    }
}

/// One container, as far as publishing it is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub image: String,
    /// The container's own hostname (`Config.Hostname`).
    pub hostname: String,
    pub running: bool,
    pub paused: bool,
    pub labels: BTreeMap<String, String>,
    pub env: Vec<String>,
    /// Exposed ports, sorted.
    pub exposed: Vec<PortSpec>,
    /// Published ports, sorted by container port.
    pub published: Vec<PublishedPort>,
    /// Sorted by network name.
    pub networks: Vec<NetworkAttachment>,
    pub network_mode: String,
    /// `None` when the container has no healthcheck.
    pub health: Option<Health>,
    /// Docker's `State.StartedAt`; `None` when the engine did not say.
    pub started_at: Option<String>,
    /// Docker's `State.ExitCode`: how the container last exited (meaningful only while it
    /// is not running).
    pub exit_code: Option<i64>,
}

impl ContainerInfo {
    /// Reads a `docker inspect` answer. Missing fields are treated as empty: the engine decides
    /// what it reports, and a container with nothing to publish yields no record.
    pub fn from_inspect(c: ContainerInspectResponse) -> ContainerInfo {
        let state = c.state.unwrap_or_default();
        let config = c.config.unwrap_or_default();
        let settings = c.network_settings.unwrap_or_default();
        let host_config = c.host_config.unwrap_or_default();

        let mut exposed: Vec<PortSpec> = config
            .exposed_ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| PortSpec::parse(p))
            .collect();
        exposed.sort();
        exposed.dedup();

        let mut published = Vec::new();
        for (port, bindings) in settings.ports.unwrap_or_default() {
            let Some(container) = PortSpec::parse(&port) else {
                continue;
            };
            for binding in bindings.unwrap_or_default() {
                let Some(host_port) = binding
                    .host_port
                    .as_deref()
                    .and_then(|p| p.parse::<u16>().ok())
                    .filter(|p| *p != 0)
                else {
                    continue;
                };
                let host_ip = binding
                    .host_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .filter(|ip| !ip.is_unspecified());
                published.push(PublishedPort {
                    container,
                    host_ip,
                    host_port,
                });
            }
        }
        published.sort_by(|a, b| {
            (a.container, a.host_port, a.host_ip).cmp(&(b.container, b.host_port, b.host_ip))
        });

        let mut networks: Vec<NetworkAttachment> = settings
            .networks
            .unwrap_or_default()
            .into_iter()
            .map(|(name, ep)| NetworkAttachment {
                ingress: name == DEFAULT_INGRESS,
                name,
                network_id: ep.network_id.clone().unwrap_or_default(),
                ipv4: ep.ip_address.as_deref().and_then(|s| s.parse().ok()),
                ipv6: ep
                    .global_ipv6_address
                    .as_deref()
                    .and_then(|s| s.parse().ok()),
            })
            .collect();
        networks.sort_by(|a, b| a.name.cmp(&b.name));

        let started_at = state
            .started_at
            .clone()
            .filter(|t| !t.is_empty() && !t.starts_with("0001-"));
        let health = state.health.and_then(|h| h.status).and_then(|s| match s {
            HealthStatusEnum::STARTING => Some(Health::Starting),
            HealthStatusEnum::HEALTHY => Some(Health::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });

        ContainerInfo {
            id: c.id.unwrap_or_default(),
            name: c
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            image: config.image.unwrap_or_default(),
            hostname: config.hostname.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            paused: state.paused.unwrap_or(false),
            labels: config.labels.unwrap_or_default().into_iter().collect(),
            env: config.env.unwrap_or_default(),
            exposed,
            published,
            networks,
            network_mode: host_config.network_mode.unwrap_or_default(),
            health,
            started_at,
            exit_code: state.exit_code,
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// Sets which networks are the ingress network from what the engine says of each network
    /// id (`GET /networks/{id}`'s `Ingress`); a network it says nothing of keeps the guess
    /// from its name.
    pub fn set_ingress(&mut self, is_ingress: impl Fn(&str) -> Option<bool>) {
        for n in &mut self.networks {
            if let Some(flag) = is_ingress(&n.network_id) {
                n.ingress = flag;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        assert_eq!(
            PortSpec::parse("53/UDP"),
            Some(PortSpec {
                port: 53,
                protocol: Protocol::Udp
            })
        );
        assert_eq!(
            PortSpec::parse(" 27017 "),
            Some(PortSpec {
                port: 27017,
                protocol: Protocol::Tcp
            })
        );
        for bad in ["", "0", "70000", "80/icmp", "eighty", "80/"] {
            assert_eq!(PortSpec::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn reads_an_inspect_answer() {
        let json = serde_json::json!({
            "Id": "abc",
            "Name": "/web-1",
            "State": {"Running": true, "Paused": false, "Health": {"Status": "healthy"},
                      "StartedAt": "2026-11-26T19:04:30.757991713Z"},
            "Config": {
                "Image": "nginx:1.25",
                "Labels": {"SERVICE_NAME": "web"},
                "Env": ["SERVICE_TAGS=a"],
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}}
            },
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {
                "Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"},
                                      {"HostIp": "::", "HostPort": "8080"}],
                          "53/udp": null},
                "Networks": {"bridge": {"IPAddress": "172.17.0.2", "GlobalIPv6Address": ""},
                             "v6only": {"IPAddress": "", "GlobalIPv6Address": "fd00::2"}}
            }
        });
        let inspect: ContainerInspectResponse = serde_json::from_value(json).expect("parses");
        let c = ContainerInfo::from_inspect(inspect);
        assert_eq!(c.name, "web-1");
        assert!(c.running);
        assert_eq!(c.health, Some(Health::Healthy));
        assert_eq!(
            c.started_at.as_deref(),
            Some("2026-11-26T19:04:30.757991713Z")
        );
        assert_eq!(c.exposed.len(), 2);
        assert_eq!(c.published.len(), 2);
        assert!(c
            .published
            .iter()
            .all(|p| p.host_ip.is_none() && p.host_port == 8080));
        assert_eq!(c.networks[0].address(), "172.17.0.2".parse().ok());
        assert_eq!(c.networks[1].address(), "fd00::2".parse().ok());
    }

    #[test]
    fn the_ingress_flag_not_the_name_marks_the_ingress_network() {
        let json = serde_json::json!({
            "Id": "abc",
            "Name": "/web.1.t1",
            "State": {"Running": true},
            "NetworkSettings": {"Networks": {
                "mesh": {"NetworkID": "n-mesh", "IPAddress": "10.0.0.5"},
                "ingress": {"NetworkID": "n-user", "IPAddress": "10.9.0.5"},
                "backend": {"NetworkID": "n-back", "IPAddress": "10.0.1.7"}
            }}
        });
        let inspect: ContainerInspectResponse = serde_json::from_value(json).expect("parses");
        let mut c = ContainerInfo::from_inspect(inspect);
        let ingress = |c: &ContainerInfo| -> Vec<String> {
            c.networks
                .iter()
                .filter(|n| n.ingress)
                .map(|n| n.name.clone())
                .collect()
        };
        assert_eq!(
            ingress(&c),
            vec!["ingress"],
            "before the engine says: the name"
        );
        c.set_ingress(|id| match id {
            "n-mesh" => Some(true),
            "n-user" => Some(false),
            _ => None,
        });
        assert_eq!(ingress(&c), vec!["mesh"]);
    }

    #[test]
    fn a_dual_stack_network_gives_ipv6_only_when_asked() {
        let json = serde_json::json!({
            "Id": "abc",
            "Name": "/web-1",
            "State": {"Running": true},
            "NetworkSettings": {"Networks": {
                "dual": {"IPAddress": "172.30.0.2", "GlobalIPv6Address": "fd00:c0de:1::2"}
            }}
        });
        let inspect: ContainerInspectResponse = serde_json::from_value(json).expect("parses");
        let c = ContainerInfo::from_inspect(inspect);
        let dual = &c.networks[0];
        assert_eq!(dual.address(), "172.30.0.2".parse().ok());
        assert_eq!(dual.address_preferring(true), "fd00:c0de:1::2".parse().ok());
        let v4_only = NetworkAttachment {
            ipv6: None,
            ..dual.clone()
        };
        assert_eq!(v4_only.address_preferring(true), "172.30.0.2".parse().ok());
    }
}
