//! Prometheus metrics of the bridge, and the state `/healthz` reports.
//!
//! The bridge updates them only through [`crate::internal_events`]: every decision is one event
//! that logs one line and bumps its metrics, so that the log and the metrics tell the same
//! story.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    pub cause: &'static str,
}

/// The bridge's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Docker events acted on, by action.
    pub events: Family<ActionLabel, Counter>,
    pub records_published: Counter,
    pub records_removed: Counter,
    /// Records this bridge currently holds in the store.
    pub records: Gauge,
    /// Containers skipped because of bad labels or no address; see the log for which.
    pub containers_skipped: Counter,
    /// `SERVICE_CHECK_*` checks left out of records because of a malformed value.
    pub checks_left_out: Counter,
    /// Failed containers whose records are kept (`--deregister on-success`).
    pub containers_kept: Counter,
    /// Failed store operations, by operation.
    pub backend_errors: Family<OperationLabel, Counter>,
    /// Failed engine requests (list, inspect), by operation.
    pub engine_errors: Family<OperationLabel, Counter>,
    /// Retries at start, by what was not reachable (docker engine, store).
    pub startup_retries: Family<CauseLabel, Counter>,
    /// Reconnections to the Docker event stream.
    pub docker_reconnects: Counter,
    /// Lease or session renewals, by result (ok, error, lost).
    pub session_renewals: Family<ResultLabel, Counter>,
    /// New leases or sessions opened (the first one, then one per loss).
    pub sessions_opened: Counter,
    /// Full syncs of the engine against the store that completed.
    pub syncs: Counter,
    /// Full syncs that failed, by cause (engine, store).
    pub sync_failures: Family<CauseLabel, Counter>,
    /// Repairs (a full sync scheduled after a failed write) begun.
    pub repairs: Counter,
    /// One completed full sync.
    pub sync_seconds: Histogram,
    /// From the Docker event's timestamp to the store's acknowledgement of the write.
    pub event_to_publish_seconds: Histogram,
    /// One `docker inspect` of a container, as the bridge sees it.
    pub inspect_seconds: Histogram,
    /// One write (publish or unpublish of one container's records) to the store.
    pub store_write_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            events: Family::default(),
            records_published: Counter::default(),
            records_removed: Counter::default(),
            records: Gauge::default(),
            containers_skipped: Counter::default(),
            checks_left_out: Counter::default(),
            containers_kept: Counter::default(),
            backend_errors: Family::default(),
            engine_errors: Family::default(),
            startup_retries: Family::default(),
            docker_reconnects: Counter::default(),
            session_renewals: Family::default(),
            sessions_opened: Counter::default(),
            syncs: Counter::default(),
            sync_failures: Family::default(),
            repairs: Counter::default(),
            // 1 ms to about 33 s.
            sync_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            // 100 µs to about 3.3 s.
            event_to_publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            inspect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            store_write_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
        }
    }

    /// Registers every metric under the `swarm_registrator_` prefix.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("swarm_registrator");
        r.register("events", "Docker events acted on", self.events.clone());
        r.register(
            "records_published",
            "Records written to the store",
            self.records_published.clone(),
        );
        r.register(
            "records_removed",
            "Records deleted from the store",
            self.records_removed.clone(),
        );
        r.register(
            "records",
            "Records this bridge currently holds in the store",
            self.records.clone(),
        );
        r.register(
            "containers_skipped",
            "Containers not published because of malformed labels or no usable address",
            self.containers_skipped.clone(),
        );
        r.register(
            "checks_left_out",
            "SERVICE_CHECK_* checks left out of records because of a malformed value",
            self.checks_left_out.clone(),
        );
        r.register(
            "containers_kept",
            "Failed containers whose records are kept (--deregister on-success)",
            self.containers_kept.clone(),
        );
        r.register(
            "backend_errors",
            "Failed store operations",
            self.backend_errors.clone(),
        );
        r.register(
            "engine_errors",
            "Failed Docker engine requests",
            self.engine_errors.clone(),
        );
        r.register(
            "startup_retries",
            "Retries at start while the engine or the store is not reachable",
            self.startup_retries.clone(),
        );
        r.register(
            "docker_reconnects",
            "Reconnections to the Docker event stream",
            self.docker_reconnects.clone(),
        );
        r.register(
            "session_renewals",
            "Lease or session renewals by result",
            self.session_renewals.clone(),
        );
        r.register(
            "sessions_opened",
            "Leases or sessions opened",
            self.sessions_opened.clone(),
        );
        r.register(
            "syncs",
            "Full syncs of engine and store that completed",
            self.syncs.clone(),
        );
        r.register(
            "sync_failures",
            "Full syncs of engine and store that failed, by cause",
            self.sync_failures.clone(),
        );
        r.register(
            "repairs",
            "Repairs of the store begun after a failed write",
            self.repairs.clone(),
        );
        r.register(
            "sync_seconds",
            "Time of one completed full sync",
            self.sync_seconds.clone(),
        );
        r.register(
            "event_to_publish_seconds",
            "Latency from a Docker event to the store's acknowledgement",
            self.event_to_publish_seconds.clone(),
        );
        r.register(
            "inspect_seconds",
            "Time of one docker inspect of a container after an event",
            self.inspect_seconds.clone(),
        );
        r.register(
            "store_write_seconds",
            "Time of one write of a container's records to the store",
            self.store_write_seconds.clone(),
        );
    }

    pub fn backend_error(&self, operation: &'static str) {
        self.backend_errors
            .get_or_create(&OperationLabel { operation })
            .inc();
    }
}

/// What `/healthz` reports: healthy while the event stream is connected and the store session
/// is alive.
#[derive(Debug, Default)]
pub struct Health {
    pub engine_connected: AtomicBool,
    pub session_alive: AtomicBool,
}

impl Health {
    /// `Ok` when healthy, else what is wrong.
    pub fn check(&self) -> Result<(), String> {
        match (
            self.engine_connected.load(Ordering::Relaxed),
            self.session_alive.load(Ordering::Relaxed),
        ) {
            (true, true) => Ok(()),
            (false, _) => Err("not connected to the Docker event stream".into()),
            (true, false) => Err("no live session with the store".into()),
        }
    }

    pub fn set_engine(&self, up: bool) {
        self.engine_connected.store(up, Ordering::Relaxed);
    }

    pub fn set_session(&self, up: bool) {
        self.session_alive.store(up, Ordering::Relaxed);
    }
}
