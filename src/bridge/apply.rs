//! The bridge's writes: one container after an event, and the full sync of engine and store.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backend_core::{BackendError, Publisher, ServiceKey, ServiceRecord};
use futures::StreamExt;

use super::{Bridge, Deregister};
use crate::container::ContainerInfo;
use crate::engine::{Engine, EngineError, EngineEvent, EventKind};
use crate::internal_events::{
    CheckLeftOut, ContainerSkipped, DockerEventReceived, FailedContainerKept, ForeignValueLeft,
    InspectFailed, InternalEvent, RecordsPublished, RecordsRemoved, StoreWriteFailed, SyncFailed,
    Synced,
};
use crate::records::{build, BuildOptions, Built, NodeIdentity};
use crate::sync::plan_sync;

/// How many containers are inspected at once during a full sync.
const INSPECT_CONCURRENCY: usize = 32;

/// Lists and inspects every running container, building its records. Containers that cannot
/// be published are returned with the reason.
pub async fn scan_engine<E: Engine>(
    engine: &E,
    options: &BuildOptions,
    node: &NodeIdentity,
) -> Result<Vec<(ContainerInfo, Result<Built, crate::records::SkipReason>)>, EngineError> {
    let ids = engine.running_container_ids().await?;
    let inspected: Vec<Result<Option<ContainerInfo>, EngineError>> = futures::stream::iter(ids)
        .map(|id| async move { engine.inspect(&id).await })
        .buffer_unordered(INSPECT_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::with_capacity(inspected.len());
    for c in inspected {
        // A container removed between list and inspect is simply gone.
        let Some(c) = c? else { continue };
        let built = build(&c, options, node);
        out.push((c, built));
    }
    out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    Ok(out)
}

impl<P: Publisher, E: Engine> Bridge<P, E> {
    /// Inspects the container of one event and writes the difference.
    pub(super) async fn on_event(&mut self, event: EngineEvent) {
        DockerEventReceived {
            action: &event.action,
        }
        .emit(&self.metrics);
        let desired = match event.kind {
            EventKind::Removed => {
                if event.action != "pause" {
                    self.retained.remove(&event.container_id);
                }
                Vec::new()
            }
            EventKind::Died => {
                if self.config.deregister == Deregister::OnSuccess
                    && event.exit_code.is_some_and(|c| c != 0)
                {
                    if self.retained.contains_key(&event.container_id) {
                        return;
                    }
                    if let Some(records) = self.published.get(&event.container_id) {
                        self.retained
                            .insert(event.container_id.clone(), records.clone());
                    }
                    FailedContainerKept {
                        container_id: &event.container_id,
                        exit_code: event.exit_code,
                    }
                    .emit(&self.metrics);
                    return;
                }
                Vec::new()
            }
            EventKind::Refresh => match self.timed_inspect(&event.container_id).await {
                Ok(Some(c)) if c.running => {
                    self.retained.remove(&c.id);
                    self.records_of(&c)
                }
                Ok(Some(c)) => {
                    // The engine may report the exit (a network `disconnect`, a `kill`)
                    // before its `die` event: keep a failed container's records already.
                    self.keep_if_failed(&c);
                    match self.retained.get(&c.id) {
                        Some(kept) => kept.clone(),
                        None => Vec::new(),
                    }
                }
                Ok(None) => {
                    self.retained.remove(&event.container_id);
                    Vec::new()
                }
                Err(e) => {
                    // The event stream will report a broken engine; resync catches up.
                    InspectFailed {
                        container_id: &event.container_id,
                        error: &e,
                    }
                    .emit(&self.metrics);
                    self.needs_repair = true;
                    return;
                }
            },
        };
        if self
            .apply_container(&event.container_id, desired, &event.action)
            .await
        {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0);
            if event.time_nano > 0 && now >= event.time_nano {
                self.metrics
                    .event_to_publish_seconds
                    .observe((now - event.time_nano) as f64 / 1e9);
            }
        }
    }

    async fn timed_inspect(&self, id: &str) -> Result<Option<ContainerInfo>, EngineError> {
        let started = Instant::now();
        let result = self.engine.inspect(id).await;
        self.metrics
            .inspect_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Builds a container's records, logging a skip once per container and reason.
    fn records_of(&mut self, c: &ContainerInfo) -> Vec<ServiceRecord> {
        match build(c, &self.config.build, &self.node) {
            Ok(built) => {
                self.skipped.remove(&c.id);
                self.note_bad_checks(c, &built);
                built.records
            }
            Err(reason) => {
                let text = reason.to_string();
                if self.skipped.get(&c.id) != Some(&text) {
                    ContainerSkipped {
                        container: &c.name,
                        reason: &text,
                    }
                    .emit(&self.metrics);
                    self.skipped.insert(c.id.clone(), text);
                }
                Vec::new()
            }
        }
    }

    /// Logs each check left out of a container's records once, until its labels change.
    fn note_bad_checks(&mut self, c: &ContainerInfo, built: &Built) {
        if built.bad_checks.is_empty() {
            self.bad_checks.remove(&c.id);
            return;
        }
        let texts: Vec<String> = built.bad_checks.iter().map(|b| b.to_string()).collect();
        let known = self.bad_checks.get(&c.id);
        for text in &texts {
            if !known.is_some_and(|k| k.contains(text)) {
                CheckLeftOut {
                    container: &c.name,
                    problem: text,
                }
                .emit(&self.metrics);
            }
        }
        self.bad_checks.insert(c.id.clone(), texts);
    }

    /// Makes the store hold `desired` for one container. Returns whether anything was written.
    async fn apply_container(
        &mut self,
        container_id: &str,
        desired: Vec<ServiceRecord>,
        why: &str,
    ) -> bool {
        let current = self
            .published
            .get(container_id)
            .cloned()
            .unwrap_or_default();
        let put: Vec<ServiceRecord> = desired
            .iter()
            .filter(|r| !current.contains(r))
            .cloned()
            .collect();
        let delete: Vec<ServiceKey> = current
            .iter()
            .filter(|old| {
                !desired
                    .iter()
                    .any(|r| r.service == old.service && r.id == old.id)
            })
            .map(key_of)
            .collect();
        if put.is_empty() && delete.is_empty() {
            return false;
        }
        let mut ok = true;
        let started = Instant::now();
        if !put.is_empty() {
            if let Err(e) = self.publish(&put, Some(why)).await {
                ok = false;
                self.write_failed("publish", &e);
            }
        }
        if !delete.is_empty() {
            if let Err(e) = self.unpublish(&delete, Some(why)).await {
                ok = false;
                self.write_failed("unpublish", &e);
            }
        }
        self.metrics
            .store_write_seconds
            .observe(started.elapsed().as_secs_f64());
        if ok {
            if desired.is_empty() {
                self.published.remove(container_id);
            } else {
                self.published.insert(container_id.to_string(), desired);
            }
            self.metrics
                .records
                .set(self.published.values().map(Vec::len).sum::<usize>() as i64);
        }
        ok
    }

    /// Writes `records` into the store and says so (`why`: the event that caused it; none for a
    /// sync).
    async fn publish(
        &self,
        records: &[ServiceRecord],
        why: Option<&str>,
    ) -> Result<(), BackendError> {
        self.store.publish(records).await?;
        RecordsPublished { why, records }.emit(&self.metrics);
        Ok(())
    }

    /// Removes `keys` from the store and says so, as [`Self::publish`].
    async fn unpublish(&self, keys: &[ServiceKey], why: Option<&str>) -> Result<(), BackendError> {
        self.store.unpublish(keys).await?;
        RecordsRemoved { why, keys }.emit(&self.metrics);
        Ok(())
    }

    fn write_failed(&mut self, operation: &'static str, e: &BackendError) {
        self.needs_repair = true;
        if matches!(e, BackendError::SessionLost { .. }) {
            self.health.set_session(false);
        }
        StoreWriteFailed {
            store: self.store.store_name(),
            operation,
            error: e,
        }
        .emit(&self.metrics);
    }

    /// Under `--deregister on-success`, keeps the published records of a container that has
    /// stopped with a failure, whichever report of its exit comes first.
    fn keep_if_failed(&mut self, c: &ContainerInfo) {
        if self.config.deregister != Deregister::OnSuccess
            || c.running
            || c.exit_code.is_none_or(|code| code == 0)
            || self.retained.contains_key(&c.id)
        {
            return;
        }
        if let Some(records) = self.published.get(&c.id) {
            self.retained.insert(c.id.clone(), records.clone());
            FailedContainerKept {
                container_id: &c.id,
                exit_code: c.exit_code,
            }
            .emit(&self.metrics);
        }
    }

    /// Lists the engine and the store and makes this node's records equal to the engine.
    pub(super) async fn full_sync(&mut self, put_all: bool) -> Result<(), SyncError> {
        let started = Instant::now();
        let scanned = scan_engine(&self.engine, &self.config.build, &self.node)
            .await
            .map_err(SyncError::Engine)?;
        let mut by_container: HashMap<String, Vec<ServiceRecord>> = HashMap::new();
        let mut desired = Vec::new();
        // What runs by its inspection: a container can exit between the list and its
        // inspection, and is then treated as any stopped one below.
        let running: std::collections::HashSet<String> = scanned
            .iter()
            .filter(|(c, _)| c.running)
            .map(|(c, _)| c.id.clone())
            .collect();
        // Forget kept records of containers removed meanwhile.
        let kept: Vec<String> = self.retained.keys().cloned().collect();
        for id in kept {
            if !running.contains(&id) && matches!(self.engine.inspect(&id).await, Ok(None)) {
                self.retained.remove(&id);
            }
        }
        // A published container that stopped with a failure whose `die` event is still on
        // its way: under --deregister on-success the event would keep its records, so the
        // resync must not delete them first.
        if self.config.deregister == Deregister::OnSuccess {
            let stopped: Vec<String> = self
                .published
                .keys()
                .filter(|id| !running.contains(*id) && !self.retained.contains_key(*id))
                .cloned()
                .collect();
            for id in stopped {
                let seen = scanned.iter().find(|(c, _)| c.id == id).map(|(c, _)| c);
                match seen {
                    Some(c) => self.keep_if_failed(c),
                    None => match self.engine.inspect(&id).await {
                        Ok(Some(c)) => self.keep_if_failed(&c),
                        Ok(None) => {}
                        Err(e) => {
                            // Unknown yet: its records stay until an inspection tells.
                            InspectFailed {
                                container_id: &id,
                                error: &e,
                            }
                            .emit(&self.metrics);
                            if let Some(records) = self.published.get(&id) {
                                desired.extend(records.iter().cloned());
                                by_container.insert(id.clone(), records.clone());
                            }
                        }
                    },
                }
            }
        }
        // Failed containers kept under --deregister on-success, unless they run again.
        for (id, records) in &self.retained {
            if !running.contains(id) {
                desired.extend(records.iter().cloned());
                by_container.insert(id.clone(), records.clone());
            }
        }
        for (c, result) in scanned {
            let records = match result {
                Ok(built) => {
                    self.skipped.remove(&c.id);
                    self.note_bad_checks(&c, &built);
                    built.records
                }
                Err(_) => self.records_of(&c),
            };
            if !records.is_empty() {
                desired.extend(records.iter().cloned());
                by_container.insert(c.id.clone(), records);
            }
        }
        let stored = self
            .store
            .list_services()
            .await
            .map_err(SyncError::store("list"))?;
        let plan = plan_sync(
            self.store.layout(),
            &self.node.node_id,
            &desired,
            &stored,
            put_all,
        );
        for (key, why) in &plan.foreign {
            ForeignValueLeft { key, reason: why }.emit(&self.metrics);
        }
        if !plan.put.is_empty() {
            let published = self.publish(&plan.put, None).await;
            published.map_err(SyncError::store("publish"))?;
        }
        if !plan.delete.is_empty() {
            let removed = self.unpublish(&plan.delete, None).await;
            removed.map_err(SyncError::store("unpublish"))?;
        }
        self.store
            .publish_node(&self.node_record)
            .await
            .map_err(SyncError::store("publish_node"))?;
        self.published = by_container;
        self.needs_repair = false;
        Synced {
            containers: self.published.len(),
            records: desired.len(),
            written: plan.put.len(),
            deleted: plan.delete.len(),
            foreign: plan.foreign.len(),
            elapsed: started.elapsed(),
        }
        .emit(&self.metrics);
        Ok(())
    }
}

/// Why a full sync failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum SyncError {
    #[error("cannot list the Docker engine")]
    Engine(#[source] EngineError),
    #[error("store operation {operation} failed")]
    Store {
        operation: &'static str,
        #[source]
        source: BackendError,
    },
}

impl SyncError {
    fn store(operation: &'static str) -> impl FnOnce(BackendError) -> SyncError {
        move |source| SyncError::Store { operation, source }
    }

    /// The event that reports this failure; `next` is what follows (`"reconnect"` of the
    /// engine, `"repair"` of the store) after `retry_in`.
    pub(super) fn event(&self, next: &'static str, retry_in: Duration) -> SyncFailed<'_> {
        match self {
            SyncError::Engine(e) => SyncFailed {
                cause: "engine",
                operation: None,
                error: e,
                next,
                retry_in,
            },
            SyncError::Store { operation, source } => SyncFailed {
                cause: "store",
                operation: Some(operation),
                error: source,
                next,
                retry_in,
            },
        }
    }
}

fn key_of(r: &ServiceRecord) -> ServiceKey {
    ServiceKey {
        service: r.service.clone(),
        id: r.id.clone(),
    }
}
