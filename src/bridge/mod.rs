//! The bridge: follows the local engine and keeps this node's records in the store equal to it.
//!
//! One task owns all state and reacts, in a `select!`, to:
//!
//! * a Docker event: inspect that one container and write the difference;
//! * the renewal tick (TTL/3): renew the lease; if it is lost, open a new one and write every
//!   record again; a failed renewal is tried again after 1 s, and the first one that succeeds
//!   after it (the store is back) runs a pending repair at once instead of after its backoff;
//! * the resync tick (`--resync`), and a repair after any failed write: list the engine and the
//!   store and make the store equal to the engine, deleting this node's records that no
//!   container backs;
//! * the end of the event stream (dockerd restarted): reconnect with backoff and jitter,
//!   re-list, repair;
//! * shutdown.
//!
//! A graceful stop does not delete records by default: they stay until the lease's TTL runs
//! out, and a bridge started on the same node in that time (a rolling update of the bridge
//! itself) writes them again under its own lease, so consumers see no record disappear.
//! `--cleanup` revokes the lease on stop instead, removing this node's records at once.

mod apply;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backend_core::keepalive::RETRY_AFTER_FAILURE;
use backend_core::{BackendError, Backoff, NodeRecord, Publisher, ServiceRecord};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub use self::apply::scan_engine;
use self::apply::SyncError;
use crate::engine::{DockerEngine, Engine, EngineError, EventStream};
use crate::internal_events::{
    EngineConnected, EventStreamBroken, InternalEvent, RepairStarted, SessionOpenFailed,
    SessionOpened, SessionRenewal, StartupRetry, Stopped,
};
use crate::metrics::{Health, Metrics};
use crate::records::{BuildOptions, NodeIdentity};

/// When to remove the records of a container that exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deregister {
    /// Always (the default).
    Always,
    /// Only when it exited with code 0; a failed container keeps its records until it is
    /// removed or restarted (Registrator's `-deregister on-success`).
    OnSuccess,
}

/// The bridge's settings.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub build: BuildOptions,
    pub ttl: Duration,
    pub resync: Duration,
    /// How many times to retry connecting at start; `None` retries for ever.
    pub retry_attempts: Option<u32>,
    /// The first retry delay; it doubles (with jitter) up to 30 s.
    pub retry_interval: Duration,
    pub deregister: Deregister,
    pub cleanup: bool,
}

/// Errors that stop the bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("gave up connecting to the Docker engine after {attempts} attempts: {last}")]
    EngineUnreachable { attempts: u32, last: EngineError },
    #[error("gave up opening a session with the store after {attempts} attempts: {last}")]
    StoreUnreachable { attempts: u32, last: BackendError },
    #[error("the store refused the bridge's session: {0}")]
    Store(BackendError),
}

/// Retries `op` with backoff until it succeeds, `attempts` run out or `shutdown` fires
/// (`Ok(None)`). Only errors for which `transient` holds are retried.
async fn retry<T, E: std::error::Error, F, Fut>(
    what: &'static str,
    metrics: &Metrics,
    attempts: Option<u32>,
    interval: Duration,
    shutdown: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<Option<T>, (u32, E)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(interval, Duration::from_secs(30));
    let mut tries = 0u32;
    loop {
        tries += 1;
        match op().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if !transient(&e) => return Err((tries, e)),
            Err(e) if attempts.is_some_and(|max| tries > max) => return Err((tries, e)),
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                StartupRetry {
                    what,
                    attempt: tries,
                    retry_in: delay,
                    error: &e,
                }
                .emit(metrics);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
}

/// [`retry`] of an engine request, as configured; every error is retried.
async fn retry_engine<T, F, Fut>(
    config: &BridgeConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    op: F,
) -> Result<Option<T>, BridgeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, EngineError>>,
{
    let (attempts, interval) = (config.retry_attempts, config.retry_interval);
    retry(
        "docker engine",
        metrics,
        attempts,
        interval,
        shutdown,
        |_| true,
        op,
    )
    .await
    .map_err(|(attempts, last)| BridgeError::EngineUnreachable { attempts, last })
}

/// The running bridge, over a store `P` and an engine `E` (Docker unless a test says
/// otherwise).
pub struct Bridge<P: Publisher, E: Engine = DockerEngine> {
    engine: E,
    store: P,
    config: BridgeConfig,
    node: NodeIdentity,
    node_record: NodeRecord,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// What this bridge has written, by container id.
    published: HashMap<String, Vec<ServiceRecord>>,
    /// Containers skipped for a reason already logged, so each is warned about once.
    skipped: HashMap<String, String>,
    /// The checks left out of each container's records, already logged.
    bad_checks: HashMap<String, Vec<String>>,
    /// Set when a write failed: the store may differ from `published`.
    needs_repair: bool,
    /// Containers that exited with a failure under `--deregister on-success`: their records
    /// are kept until the container is removed or runs again.
    retained: HashMap<String, Vec<ServiceRecord>>,
}

impl<P: Publisher, E: Engine> std::fmt::Debug for Bridge<P, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("node", &self.node)
            .field("containers", &self.published.len())
            .finish_non_exhaustive()
    }
}

/// Connects to the local Docker engine for [`Bridge::start_with`], retrying as configured.
/// `Ok(None)` when shutdown was requested meanwhile.
pub async fn connect_engine(
    config: &BridgeConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Option<DockerEngine>, BridgeError> {
    retry_engine(config, metrics, shutdown, DockerEngine::connect).await
}

impl<P: Publisher, E: Engine> Bridge<P, E> {
    /// Asks `engine` who this node is and opens a session with the store, retrying as
    /// configured. `Ok(None)` when shutdown was requested meanwhile.
    pub async fn start_with(
        engine: E,
        store: P,
        config: BridgeConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, BridgeError> {
        let identity = retry_engine(&config, &metrics, shutdown, || engine.identity());
        let Some((node, engine_version)) = identity.await? else {
            return Ok(None);
        };
        EngineConnected {
            host: engine.host(),
            node: &node,
            engine_version: engine_version.as_deref(),
        }
        .emit(&metrics);

        match retry(
            "store",
            &metrics,
            config.retry_attempts,
            config.retry_interval,
            shutdown,
            BackendError::is_transient,
            || store.open_session(config.ttl),
        )
        .await
        {
            Ok(Some(())) => {}
            Ok(None) => return Ok(None),
            Err((attempts, last)) if last.is_transient() => {
                return Err(BridgeError::StoreUnreachable { attempts, last })
            }
            Err((_, last)) => return Err(BridgeError::Store(last)),
        }
        SessionOpened {
            store: store.store_name(),
            ttl: config.ttl,
        }
        .emit(&metrics);
        health.set_session(true);

        let node_record = NodeRecord {
            schema_version: backend_core::SCHEMA_VERSION,
            node_id: node.node_id.clone(),
            hostname: node.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: rfc3339_now(),
            engine_version,
        };
        Ok(Some(Bridge {
            engine,
            store,
            config,
            node,
            node_record,
            metrics,
            health,
            published: HashMap::new(),
            skipped: HashMap::new(),
            bad_checks: HashMap::new(),
            needs_repair: false,
            retained: HashMap::new(),
        }))
    }

    /// Follows the engine until `shutdown`, then ends the session as configured.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let mut reconnect = Backoff::new(self.config.retry_interval, Duration::from_secs(30));
        let mut events: Option<EventStream> = None;
        // The first connection happens at once.
        let mut reconnect_at = tokio::time::Instant::now();
        let mut renew = tokio::time::interval(self.config.ttl / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.reset();
        let mut resync = tokio::time::interval(self.config.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        let mut repair_backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(15));
        let mut repair_at: Option<tokio::time::Instant> = None;
        // Whether the next sync must write every record (a new session).
        let mut put_all = true;
        // Whether the last renewal failed (the store did not answer).
        let mut renew_failed = false;

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,

                // (Re)connect the event stream, then sync.
                _ = tokio::time::sleep_until(reconnect_at), if events.is_none() => {
                    let since = unix_now();
                    let stream = self.engine.events(Some(since));
                    match self.full_sync(put_all).await {
                        Ok(()) => {
                            put_all = false;
                            events = Some(stream);
                            self.health.set_engine(true);
                            reconnect.reset();
                        }
                        Err(e @ SyncError::Engine(_)) => {
                            let delay = reconnect.next_delay(rand::random::<f64>());
                            e.event("reconnect", delay).emit(&self.metrics);
                            reconnect_at = tokio::time::Instant::now() + delay;
                        }
                        Err(e @ SyncError::Store { .. }) => {
                            // The engine answered: follow it, and repair the store later.
                            let delay = repair_backoff.next_delay(rand::random::<f64>());
                            e.event("repair", delay).emit(&self.metrics);
                            events = Some(stream);
                            self.health.set_engine(true);
                            repair_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }

                item = next_event(&mut events), if events.is_some() => {
                    match item {
                        Some(Ok(Some(event))) => self.on_event(event).await,
                        Some(Ok(None)) => {}
                        end => {
                            let delay = reconnect.next_delay(rand::random::<f64>());
                            let error = match &end {
                                Some(Err(e)) => Some(e),
                                _ => None,
                            };
                            EventStreamBroken { error, retry_in: delay }.emit(&self.metrics);
                            events = None;
                            self.health.set_engine(false);
                            reconnect_at = tokio::time::Instant::now() + delay;
                        }
                    }
                    if self.needs_repair && repair_at.is_none() {
                        repair_at = Some(tokio::time::Instant::now() + repair_backoff.next_delay(rand::random::<f64>()));
                    }
                }

                _ = renew.tick() => {
                    let store = self.store.store_name();
                    match self.store.renew_session().await {
                        Ok(()) => {
                            SessionRenewal::Renewed.emit(&self.metrics);
                            self.health.set_session(true);
                            if renew_failed {
                                renew_failed = false;
                                renew.reset();
                                // The store answers again: a repair waiting out its backoff
                                // (up to 15 s) runs now.
                                if repair_at.is_some() {
                                    repair_at = Some(tokio::time::Instant::now());
                                }
                            }
                        }
                        Err(BackendError::SessionLost { .. } | BackendError::NoSession { .. }) => {
                            SessionRenewal::Lost { store }.emit(&self.metrics);
                            self.health.set_session(false);
                            renew_failed = false;
                            self.reopen_session(&mut put_all, &mut repair_at).await;
                        }
                        Err(e) => {
                            SessionRenewal::Failed { store, error: &e, retry_in: RETRY_AFTER_FAILURE }
                                .emit(&self.metrics);
                            // As the stores' own keep-alives do (Patroni's rule): a failed
                            // renewal is tried again soon, not a whole TTL/3 later, so that an
                            // outage or a failover shorter than the TTL keeps the session.
                            renew_failed = true;
                            renew.reset_after(RETRY_AFTER_FAILURE);
                        }
                    }
                }

                _ = resync.tick(), if events.is_some() => {
                    self.sync_or_schedule_repair(put_all, &mut put_all, &mut repair_at, &mut repair_backoff).await;
                }

                _ = sleep_until_opt(repair_at), if repair_at.is_some() && events.is_some() => {
                    repair_at = None;
                    RepairStarted.emit(&self.metrics);
                    self.sync_or_schedule_repair(put_all, &mut put_all, &mut repair_at, &mut repair_backoff).await;
                }
            }
        }
        self.stop().await;
        Ok(())
    }

    async fn sync_or_schedule_repair(
        &mut self,
        put_all_now: bool,
        put_all: &mut bool,
        repair_at: &mut Option<tokio::time::Instant>,
        repair_backoff: &mut Backoff,
    ) {
        match self.full_sync(put_all_now).await {
            Ok(()) => {
                *put_all = false;
                *repair_at = None;
                repair_backoff.reset();
            }
            Err(e) => {
                let delay = repair_backoff.next_delay(rand::random::<f64>());
                e.event("repair", delay).emit(&self.metrics);
                *repair_at = Some(tokio::time::Instant::now() + delay);
            }
        }
    }

    async fn reopen_session(
        &mut self,
        put_all: &mut bool,
        repair_at: &mut Option<tokio::time::Instant>,
    ) {
        *put_all = true;
        match self.store.open_session(self.config.ttl).await {
            Ok(()) => {
                SessionOpened {
                    store: self.store.store_name(),
                    ttl: self.config.ttl,
                }
                .emit(&self.metrics);
                self.health.set_session(true);
                // Everything must be written again under the new session, at once.
                *repair_at = Some(tokio::time::Instant::now());
            }
            Err(e) => SessionOpenFailed {
                store: self.store.store_name(),
                error: &e,
            }
            .emit(&self.metrics),
        }
    }

    async fn stop(self) {
        self.health.set_engine(false);
        let revoke = self.config.cleanup;
        let closed = self.store.close_session(revoke).await;
        Stopped {
            revoked: revoke,
            ttl: self.config.ttl,
            error: closed.as_ref().err().map(|e| e as &dyn std::error::Error),
        }
        .emit(&self.metrics);
    }
}

async fn next_event(
    events: &mut Option<EventStream>,
) -> Option<Result<Option<crate::engine::EngineEvent>, EngineError>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The current time as RFC 3339 in UTC, without a date library.
pub fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
