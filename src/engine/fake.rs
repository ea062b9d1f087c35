//! An engine in memory, for the bridge's unit tests with paused time.
//!
//! It holds containers and sends the events Docker would send when a test starts, stops or
//! removes one. A test can also take the engine down (every call fails, the event stream
//! errors) and end the event stream (dockerd restarted). Nothing here sleeps or does I/O, so
//! under `tokio::time::pause` the runtime advances the clock as soon as the bridge is idle.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::channel::mpsc;
use futures::StreamExt;

use super::{Engine, EngineError, EngineEvent, EventKind, EventStream};
use crate::container::{ContainerInfo, NetworkAttachment, PortSpec};
use crate::records::NodeIdentity;

type Sender = mpsc::UnboundedSender<Result<Option<EngineEvent>, EngineError>>;

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<String, ContainerInfo>,
    subscribers: Vec<Sender>,
    down: bool,
    /// Calls of `running_container_ids`: one per full sync.
    lists: usize,
    /// Containers that exit, with this code, right after the next list has named them.
    exit_after_list: Vec<(String, i64)>,
}

/// The engine of one node, in memory. Clones share the same engine.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeEngine {
    state: Arc<Mutex<State>>,
}

/// The error a down engine answers with.
fn down(request: &'static str) -> EngineError {
    EngineError::Request {
        request,
        source: bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "the engine is down".into(),
        },
    }
}

/// A running plain container `name` with `SERVICE_NAME=web`, exposing 80/tcp at `ip` on the
/// default bridge network: published by a bridge with `--internal`.
pub(crate) fn web_container(name: &str, ip: [u8; 4]) -> ContainerInfo {
    ContainerInfo {
        id: format!("{name}-0123456789abcdef"),
        name: name.into(),
        image: "local/web".into(),
        running: true,
        env: vec!["SERVICE_NAME=web".into()],
        exposed: vec![PortSpec::parse("80/tcp").expect("a port")],
        networks: vec![NetworkAttachment {
            name: "bridge".into(),
            network_id: String::new(),
            ingress: false,
            ipv4: Some(Ipv4Addr::from(ip)),
            ipv6: None,
        }],
        network_mode: "bridge".into(),
        ..ContainerInfo::default()
    }
}

impl FakeEngine {
    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn send(
        &self,
        container_id: &str,
        action: &str,
        kind: EventKind,
        exit_code: Option<i64>,
    ) {
        let time_nano = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let event = EngineEvent {
            container_id: container_id.into(),
            action: action.into(),
            kind,
            time_nano,
            exit_code,
        };
        self.state()
            .subscribers
            .retain(|tx| tx.unbounded_send(Ok(Some(event.clone()))).is_ok());
    }

    /// Adds a container that is already running, without an event (it ran before the bridge).
    pub(crate) fn add(&self, c: ContainerInfo) {
        self.state().containers.insert(c.id.clone(), c);
    }

    /// Starts a container: it runs, and a `start` event follows.
    pub(crate) fn start(&self, mut c: ContainerInfo) {
        c.running = true;
        let id = c.id.clone();
        self.add(c);
        self.send(&id, "start", EventKind::Refresh, None);
    }

    /// The container exits with `code`: a `die` event.
    pub(crate) fn die(&self, id: &str, code: i64) {
        self.exit_quietly(id, code);
        self.send(id, "die", EventKind::Died, Some(code));
    }

    /// The container exits with `code`, and its `die` event is not delivered yet (the engine
    /// reports the exit before the bridge has read the event).
    pub(crate) fn exit_quietly(&self, id: &str, code: i64) {
        if let Some(c) = self.state().containers.get_mut(id) {
            c.running = false;
            c.exit_code = Some(code);
        }
    }

    /// The container exits with `code` between the next list and the inspect that follows it
    /// (the list names it running, its inspection finds it stopped); no event.
    pub(crate) fn exit_after_next_list(&self, id: &str, code: i64) {
        self.state().exit_after_list.push((id.into(), code));
    }

    /// The container is removed: a `destroy` event.
    pub(crate) fn remove(&self, id: &str) {
        self.state().containers.remove(id);
        self.send(id, "destroy", EventKind::Removed, None);
    }

    /// Removes a container without an event (one the bridge missed).
    pub(crate) fn remove_quietly(&self, id: &str) {
        self.state().containers.remove(id);
    }

    /// Ends every event stream, as a restarting dockerd does.
    pub(crate) fn end_streams(&self) {
        self.state().subscribers.clear();
    }

    /// Takes the engine down (every request fails, event streams end with an error) or up.
    pub(crate) fn set_down(&self, is_down: bool) {
        let mut state = self.state();
        state.down = is_down;
        if is_down {
            for tx in state.subscribers.drain(..) {
                tx.unbounded_send(Err(down("GET /events"))).ok();
            }
        }
    }

    /// How many times the containers were listed (once per full sync).
    pub(crate) fn lists(&self) -> usize {
        self.state().lists
    }

    /// How many event streams are open.
    pub(crate) fn streams(&self) -> usize {
        self.state().subscribers.len()
    }
}

impl Engine for FakeEngine {
    fn host(&self) -> &str {
        "fake://engine"
    }

    async fn identity(&self) -> Result<(NodeIdentity, Option<String>), EngineError> {
        if self.state().down {
            return Err(down("GET /info"));
        }
        let node = NodeIdentity {
            node_id: "node-1".into(),
            hostname: "host-1".into(),
            address: Some(IpAddr::from([192, 0, 2, 1])),
        };
        Ok((node, Some("20.10.0".into())))
    }

    async fn running_container_ids(&self) -> Result<Vec<String>, EngineError> {
        let mut state = self.state();
        if state.down {
            return Err(down("GET /containers/json"));
        }
        state.lists += 1;
        let ids = state
            .containers
            .values()
            .filter(|c| c.running)
            .map(|c| c.id.clone())
            .collect();
        for (id, code) in std::mem::take(&mut state.exit_after_list) {
            if let Some(c) = state.containers.get_mut(&id) {
                c.running = false;
                c.exit_code = Some(code);
            }
        }
        Ok(ids)
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, EngineError> {
        let state = self.state();
        if state.down {
            return Err(down("GET /containers/{id}/json"));
        }
        Ok(state.containers.get(id).cloned())
    }

    fn events(&self, _since: Option<f64>) -> EventStream {
        let (tx, rx) = mpsc::unbounded();
        let mut state = self.state();
        if state.down {
            tx.unbounded_send(Err(down("GET /events"))).ok();
        } else {
            state.subscribers.push(tx);
        }
        rx.boxed()
    }
}
