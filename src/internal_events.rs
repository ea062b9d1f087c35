//! The bridge's decisions, each as one type that logs its line and counts its metric in one
//! place (vector's internal events: `src/internal_events/` there).
//!
//! The bridge never calls `tracing` or a metric directly for a decision: it builds one of these
//! and [`emit`](InternalEvent::emit)s it, so the log and the metrics cannot tell different
//! stories, and a test or the benchmark can wait for a metric (or `/healthz`) instead of a log
//! line. The metrics are listed in docs/operations.md.

use std::time::Duration;

use backend_core::{ServiceKey, ServiceRecord};

use crate::engine::EngineError;
use crate::metrics::{ActionLabel, CauseLabel, Metrics, OperationLabel, ResultLabel};

/// One decision of the bridge: logs one line (or none, for the frequent ones) and updates its
/// metrics.
pub trait InternalEvent {
    fn emit(self, metrics: &Metrics);
}

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A Docker event the bridge acts on (not logged: the records it leads to are).
#[derive(Debug)]
pub struct DockerEventReceived<'a> {
    /// Docker's action, e.g. `start` or `health_status: healthy`.
    pub action: &'a str,
}

impl InternalEvent for DockerEventReceived<'_> {
    fn emit(self, metrics: &Metrics) {
        let action = self
            .action
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        metrics.events.get_or_create(&ActionLabel { action }).inc();
    }
}

/// Records written to the store; `why` is the Docker event that led to it, if any.
#[derive(Debug)]
pub struct RecordsPublished<'a> {
    pub why: Option<&'a str>,
    pub records: &'a [ServiceRecord],
}

impl InternalEvent for RecordsPublished<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.records_published.inc_by(self.records.len() as u64);
        if let Some(why) = self.why {
            for r in self.records {
                tracing::info!(event = why, service = %r.service, id = %r.id, ip = %r.ip, port = r.port, "published");
            }
        }
    }
}

/// Records deleted from the store: after a Docker event (`why`), or by a sync because no
/// container backs them.
#[derive(Debug)]
pub struct RecordsRemoved<'a> {
    pub why: Option<&'a str>,
    pub keys: &'a [ServiceKey],
}

impl InternalEvent for RecordsRemoved<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.records_removed.inc_by(self.keys.len() as u64);
        for k in self.keys {
            match self.why {
                Some(why) => {
                    tracing::info!(event = why, service = %k.service, id = %k.id, "removed")
                }
                None => {
                    tracing::info!(service = %k.service, id = %k.id, "removed a record no container backs")
                }
            }
        }
    }
}

/// A container that cannot be published (bad labels, no address); emitted once per container
/// and reason.
#[derive(Debug)]
pub struct ContainerSkipped<'a> {
    pub container: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for ContainerSkipped<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.containers_skipped.inc();
        tracing::warn!(container = %self.container, reason = %self.reason, "not publishing container");
    }
}

/// A `SERVICE_CHECK_*` value that cannot make a check: the container is published without it.
#[derive(Debug)]
pub struct CheckLeftOut<'a> {
    pub container: &'a str,
    pub problem: &'a str,
}

impl InternalEvent for CheckLeftOut<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.checks_left_out.inc();
        tracing::warn!(container = %self.container, problem = %self.problem, "publishing container without its check");
    }
}

/// A container that failed under `--deregister on-success`: its records stay.
#[derive(Debug)]
pub struct FailedContainerKept<'a> {
    pub container_id: &'a str,
    pub exit_code: Option<i64>,
}

impl InternalEvent for FailedContainerKept<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.containers_kept.inc();
        tracing::info!(container = %short(self.container_id), exit_code = ?self.exit_code, "container failed; keeping its records (--deregister on-success)");
    }
}

/// `docker inspect` of the container of an event failed; a repair follows.
#[derive(Debug)]
pub struct InspectFailed<'a> {
    pub container_id: &'a str,
    pub error: &'a EngineError,
}

impl InternalEvent for InspectFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics
            .engine_errors
            .get_or_create(&OperationLabel {
                operation: "inspect",
            })
            .inc();
        tracing::warn!(container = %short(self.container_id), error = %self.error, "inspect failed");
    }
}

/// A write of one container's records failed; a repair follows.
#[derive(Debug)]
pub struct StoreWriteFailed<'a> {
    pub store: &'static str,
    pub operation: &'static str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for StoreWriteFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.backend_error(self.operation);
        tracing::warn!(store = self.store, operation = self.operation, error = %self.error, "store write failed; will repair");
    }
}

/// A full sync made the store equal to the engine.
#[derive(Debug)]
pub struct Synced {
    pub containers: usize,
    pub records: usize,
    pub written: usize,
    pub deleted: usize,
    pub foreign: usize,
    pub elapsed: Duration,
}

impl InternalEvent for Synced {
    fn emit(self, metrics: &Metrics) {
        metrics.syncs.inc();
        metrics.records.set(self.records as i64);
        metrics.sync_seconds.observe(self.elapsed.as_secs_f64());
        tracing::info!(
            containers = self.containers,
            records = self.records,
            written = self.written,
            deleted = self.deleted,
            foreign = self.foreign,
            elapsed_ms = millis(self.elapsed),
            "synced engine and store"
        );
    }
}

/// A full sync failed: the engine could not be listed, or a store operation failed. What
/// follows (`next`) is a reconnect of the engine or a repair, after `retry_in`.
#[derive(Debug)]
pub struct SyncFailed<'a> {
    /// `"engine"` or `"store"`.
    pub cause: &'static str,
    /// The store operation that failed, for a store cause.
    pub operation: Option<&'static str>,
    pub error: &'a dyn std::error::Error,
    pub next: &'static str,
    pub retry_in: Duration,
}

impl InternalEvent for SyncFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics
            .sync_failures
            .get_or_create(&CauseLabel { cause: self.cause })
            .inc();
        match self.operation {
            Some(operation) => metrics.backend_error(operation),
            None => {
                metrics
                    .engine_errors
                    .get_or_create(&OperationLabel { operation: "list" })
                    .inc();
            }
        }
        tracing::warn!(cause = self.cause, operation = self.operation.unwrap_or(""), error = %self.error, next = self.next, retry_in_ms = millis(self.retry_in), "sync failed; will retry");
    }
}

/// A repair (a full sync after a failed write) begins.
#[derive(Debug)]
pub struct RepairStarted;

impl InternalEvent for RepairStarted {
    fn emit(self, metrics: &Metrics) {
        metrics.repairs.inc();
        tracing::info!("repairing the store after a failed write");
    }
}

/// The Docker event stream failed or ended; a reconnect follows after `retry_in`.
#[derive(Debug)]
pub struct EventStreamBroken<'a> {
    pub error: Option<&'a EngineError>,
    pub retry_in: Duration,
}

impl InternalEvent for EventStreamBroken<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.docker_reconnects.inc();
        match self.error {
            Some(e) => {
                tracing::warn!(error = %e, retry_in_ms = millis(self.retry_in), "Docker event stream failed; reconnecting")
            }
            None => tracing::warn!(
                retry_in_ms = millis(self.retry_in),
                "Docker event stream ended (engine restarted?); reconnecting"
            ),
        }
    }
}

/// A new session (etcd lease, Consul session) was opened.
#[derive(Debug)]
pub struct SessionOpened {
    pub store: &'static str,
    pub ttl: Duration,
}

impl InternalEvent for SessionOpened {
    fn emit(self, metrics: &Metrics) {
        metrics.sessions_opened.inc();
        tracing::info!(
            store = self.store,
            ttl_secs = self.ttl.as_secs(),
            "opened a session with the store"
        );
    }
}

/// Opening a new session after a loss failed; retried at the next renewal tick.
#[derive(Debug)]
pub struct SessionOpenFailed<'a> {
    pub store: &'static str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for SessionOpenFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.backend_error("open_session");
        tracing::warn!(store = self.store, error = %self.error, "cannot open a new session yet; retrying at the next tick");
    }
}

/// The outcome of one renewal of the session.
#[derive(Debug)]
pub enum SessionRenewal<'a> {
    Renewed,
    /// The store no longer knows the session: a new one is opened and every record written
    /// again.
    Lost {
        store: &'static str,
    },
    /// The renewal failed (the store is unreachable); retried after `retry_in`.
    Failed {
        store: &'static str,
        error: &'a dyn std::error::Error,
        retry_in: std::time::Duration,
    },
}

impl InternalEvent for SessionRenewal<'_> {
    fn emit(self, metrics: &Metrics) {
        let result = match self {
            SessionRenewal::Renewed => "ok",
            SessionRenewal::Lost { store } => {
                tracing::warn!(
                    store,
                    "session lost; opening a new one and writing every record again"
                );
                "lost"
            }
            SessionRenewal::Failed {
                store,
                error,
                retry_in,
            } => {
                metrics.backend_error("renew");
                tracing::warn!(store, error = %error, retry_in_ms = retry_in.as_millis() as u64, "session renewal failed; retrying soon");
                "error"
            }
        };
        metrics
            .session_renewals
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// At start, the engine or the store is not reachable yet; retried after `retry_in`.
#[derive(Debug)]
pub struct StartupRetry<'a> {
    /// `"docker engine"` or `"store"`.
    pub what: &'static str,
    pub attempt: u32,
    pub retry_in: Duration,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for StartupRetry<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics
            .startup_retries
            .get_or_create(&CauseLabel { cause: self.what })
            .inc();
        tracing::warn!(what = self.what, attempt = self.attempt, retry_in_ms = millis(self.retry_in), error = %self.error, "not reachable yet; retrying");
    }
}

/// The bridge found its engine and knows which node it is on.
#[derive(Debug)]
pub struct EngineConnected<'a> {
    pub host: &'a str,
    pub node: &'a crate::records::NodeIdentity,
    pub engine_version: Option<&'a str>,
}

impl InternalEvent for EngineConnected<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::info!(docker_host = self.host, node_id = %self.node.node_id, hostname = %self.node.hostname, engine_version = ?self.engine_version, "connected to the Docker engine");
    }
}

/// A value under the services prefix that this bridge did not write (foreign, or not a record
/// at all): left alone, at every sync.
#[derive(Debug)]
pub struct ForeignValueLeft<'a> {
    pub key: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for ForeignValueLeft<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::debug!(
            key = self.key,
            reason = self.reason,
            "leaving a value this bridge did not write alone"
        );
    }
}

/// The bridge stopped and ended its session: with `--cleanup` by revoking it (its records go
/// now), else by leaving it to expire after `ttl` (or to the next bridge on this node).
#[derive(Debug)]
pub struct Stopped<'a> {
    pub revoked: bool,
    pub ttl: Duration,
    pub error: Option<&'a dyn std::error::Error>,
}

impl InternalEvent for Stopped<'_> {
    fn emit(self, metrics: &Metrics) {
        match self.error {
            Some(e) => {
                metrics.backend_error("close_session");
                tracing::warn!(error = %e, "stopped; could not end the session cleanly")
            }
            None if self.revoked => {
                tracing::info!("stopped; lease revoked, this node's records removed (--cleanup)")
            }
            None => tracing::info!(
                ttl_secs = self.ttl.as_secs(),
                "stopped; records stay until the lease expires, or until the next bridge on this node takes them over"
            ),
        }
    }
}
