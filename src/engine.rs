//! The local container engine: what the bridge asks of it ([`Engine`]), and Docker through
//! bollard behind it ([`DockerEngine`]).
//!
//! The bridge asks four things: who this node is (swarm node id, hostname, advertised
//! address), which containers run, what one container looks like (its labels, ports and
//! networks, from `docker inspect`), and the stream of container and network events. Only
//! endpoints that work on swarm workers are used: `/info`, `/containers/json`,
//! `/containers/{id}/json` and `/events`. The manager-only `/tasks` API is never called, so the
//! bridge runs the same on every node of a global service.
//!
//! The trait exists so that the bridge's timing (renewals, repairs, resyncs, reconnects) can be
//! unit-tested with paused time against an in-memory engine; the real-engine suites
//! (`tests/bridge_*.rs`) show what only Docker can.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use bollard::Docker;
use futures::stream::BoxStream;
use futures::StreamExt;

use crate::container::ContainerInfo;
use crate::records::NodeIdentity;

#[cfg(test)]
pub(crate) mod fake;

/// An error talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot connect to the Docker engine at {host}: {source}; mount the socket (-v /var/run/docker.sock:/var/run/docker.sock:ro) or set DOCKER_HOST")]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("Docker engine request {request} failed: {source}")]
    Request {
        request: &'static str,
        #[source]
        source: bollard::errors::Error,
    },
}

/// What the bridge does with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The container may have something new to publish (start, unpause, a health change, a
    /// network connected or disconnected, ...): inspect it and publish what it has now.
    Refresh,
    /// The container stopped running: remove its records (subject to `--deregister`).
    Died,
    /// The container is gone, or paused: remove its records.
    Removed,
}

/// One container event the bridge acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    pub container_id: String,
    pub action: String,
    pub kind: EventKind,
    /// The engine's timestamp in nanoseconds since the epoch.
    pub time_nano: i64,
    /// For `die`: the exit code.
    pub exit_code: Option<i64>,
}

/// The stream of events of an engine: `Ok(None)` for an event the bridge ignores. It ends when
/// the engine goes away.
pub type EventStream = BoxStream<'static, Result<Option<EngineEvent>, EngineError>>;

/// What the bridge asks of the local container engine.
pub trait Engine: Send + Sync + 'static {
    /// Where the engine is, for logs (`unix:///var/run/docker.sock`).
    fn host(&self) -> &str;

    /// Who this node is: the swarm node id (or the engine id outside a swarm), the hostname,
    /// the swarm's advertised address; and the engine version.
    fn identity(
        &self,
    ) -> impl Future<Output = Result<(NodeIdentity, Option<String>), EngineError>> + Send;

    /// The ids of the running containers.
    fn running_container_ids(
        &self,
    ) -> impl Future<Output = Result<Vec<String>, EngineError>> + Send;

    /// Inspects one container (labels, env, ports, networks, state); `None` when it no longer
    /// exists.
    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, EngineError>> + Send;

    /// Container and network events from `since` (seconds since the epoch, fractional) on.
    fn events(&self, since: Option<f64>) -> EventStream;
}

/// The local Docker engine, through bollard.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    host: String,
    /// Whether each network id seen is the swarm's ingress network (its `Ingress` flag,
    /// which never changes for a network id).
    ingress: Arc<Mutex<HashMap<String, bool>>>,
}

impl DockerEngine {
    /// Connects (unix socket or `DOCKER_HOST`) and negotiates the API version down to the
    /// engine's.
    pub async fn connect() -> Result<DockerEngine, EngineError> {
        let host =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let connect_err = |source| EngineError::Connect {
            host: host.clone(),
            source,
        };
        let docker = Docker::connect_with_defaults().map_err(connect_err)?;
        let docker = docker.negotiate_version().await.map_err(connect_err)?;
        Ok(DockerEngine {
            docker,
            host,
            ingress: Arc::default(),
        })
    }

    /// Marks the container's ingress networks by their `Ingress` flag, asking the engine
    /// (`GET /networks/{id}`, which works on workers too) once per network id. A network the
    /// engine cannot tell about keeps the guess from its name.
    async fn mark_ingress(&self, c: &mut ContainerInfo) {
        for n in &c.networks {
            let known = self.known_ingress(&n.network_id).is_some();
            if n.network_id.is_empty() || known {
                continue;
            }
            match self.docker.inspect_network(&n.network_id, None).await {
                Ok(net) => {
                    let flag = net.ingress.unwrap_or(false);
                    if let Ok(mut map) = self.ingress.lock() {
                        map.insert(n.network_id.clone(), flag);
                    }
                }
                Err(e) => {
                    tracing::debug!(network = %n.name, error = %e, "cannot inspect network; judging ingress by its name")
                }
            }
        }
        c.set_ingress(|id| self.known_ingress(id));
    }

    fn known_ingress(&self, network_id: &str) -> Option<bool> {
        self.ingress.lock().ok()?.get(network_id).copied()
    }
}

impl Engine for DockerEngine {
    fn host(&self) -> &str {
        &self.host
    }

    async fn identity(&self) -> Result<(NodeIdentity, Option<String>), EngineError> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|source| EngineError::Request {
                request: "GET /info",
                source,
            })?;
        let swarm = info.swarm.unwrap_or_default();
        let node_id = swarm
            .node_id
            .filter(|id| !id.is_empty())
            .or(info.id)
            .unwrap_or_default();
        let address = swarm
            .node_addr
            .as_deref()
            .and_then(|a| a.parse::<IpAddr>().ok());
        let identity = NodeIdentity {
            node_id,
            hostname: info.name.unwrap_or_default(),
            address,
        };
        Ok((identity, info.server_version))
    }

    async fn running_container_ids(&self) -> Result<Vec<String>, EngineError> {
        let containers = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: false,
                ..Default::default()
            }))
            .await
            .map_err(|source| EngineError::Request {
                request: "GET /containers/json",
                source,
            })?;
        Ok(containers.into_iter().filter_map(|c| c.id).collect())
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, EngineError> {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => {
                let mut c = ContainerInfo::from_inspect(c);
                self.mark_ingress(&mut c).await;
                Ok(Some(c))
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(source) => Err(EngineError::Request {
                request: "GET /containers/{id}/json",
                source,
            }),
        }
    }

    fn events(&self, since: Option<f64>) -> EventStream {
        let filters = HashMap::from([(
            "type".to_string(),
            vec!["container".to_string(), "network".to_string()],
        )]);
        let options = EventsOptions {
            since: since.map(|s| format!("{s:.9}")),
            until: None,
            filters: Some(filters),
        };
        self.docker
            .events(Some(options))
            .map(|item| {
                item.map(classify_event)
                    .map_err(|source| EngineError::Request {
                        request: "GET /events",
                        source,
                    })
            })
            .boxed()
    }
}

/// Maps a raw event onto what the bridge does with it; `None` for events it ignores (exec,
/// create, network events of no container, ...).
fn classify_event(msg: bollard::models::EventMessage) -> Option<EngineEvent> {
    use bollard::models::EventMessageTypeEnum as T;
    let action = msg.action.unwrap_or_default();
    let actor = msg.actor.unwrap_or_default();
    let attributes = actor.attributes.unwrap_or_default();
    let (container_id, kind) = match msg.typ? {
        T::CONTAINER => {
            // health_status events read "health_status: healthy".
            let verb = action.split(':').next().unwrap_or_default().trim();
            let kind = match verb {
                "start" | "unpause" | "restart" | "health_status" | "rename" | "update"
                | "kill" | "stop" => EventKind::Refresh,
                "die" | "oom" => EventKind::Died,
                "destroy" | "pause" => EventKind::Removed,
                _ => return None,
            };
            (actor.id?, kind)
        }
        T::NETWORK => match action.as_str() {
            "connect" | "disconnect" => (attributes.get("container")?.clone(), EventKind::Refresh),
            _ => return None,
        },
        _ => return None,
    };
    let exit_code = attributes.get("exitCode").and_then(|c| c.parse().ok());
    Some(EngineEvent {
        container_id,
        action,
        kind,
        time_nano: msg.time_nano.unwrap_or_default(),
        exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(typ: &str, action: &str, id: &str, attrs: &[(&str, &str)]) -> Option<EngineEvent> {
        let json = serde_json::json!({
            "Type": typ,
            "Action": action,
            "Actor": {"ID": id, "Attributes": attrs.iter().cloned().collect::<HashMap<_, _>>()},
            "timeNano": 1_700_000_000_000_000_000_i64,
        });
        classify_event(serde_json::from_value(json).expect("event parses"))
    }

    #[test]
    fn container_events() {
        assert_eq!(
            event("container", "start", "c1", &[]).map(|e| e.kind),
            Some(EventKind::Refresh)
        );
        assert_eq!(
            event("container", "health_status: unhealthy", "c1", &[]).map(|e| e.kind),
            Some(EventKind::Refresh)
        );
        let die = event("container", "die", "c1", &[("exitCode", "137")]).expect("die");
        assert_eq!((die.kind, die.exit_code), (EventKind::Died, Some(137)));
        assert_eq!(
            event("container", "pause", "c1", &[]).map(|e| e.kind),
            Some(EventKind::Removed)
        );
        assert_eq!(event("container", "exec_start: sh", "c1", &[]), None);
        assert_eq!(event("container", "create", "c1", &[]), None);
    }

    #[test]
    fn network_events_name_the_container() {
        let e = event("network", "connect", "net1", &[("container", "c9")]).expect("event");
        assert_eq!(
            (e.container_id.as_str(), e.kind),
            ("c9", EventKind::Refresh)
        );
        assert_eq!(event("network", "connect", "net1", &[]), None);
        assert_eq!(event("network", "create", "net1", &[]), None);
        assert_eq!(event("image", "pull", "x", &[]), None);
    }
}
