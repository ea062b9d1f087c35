//! The controller, kube-runtime style: one task follows the store's records and publishes the
//! latest [`Records`] on a `tokio::sync::watch` channel; one task per replica set campaigns for
//! the set's leader key and, while it leads, runs the set's loop: debounce, [`reconcile`],
//! requeue after the returned [`Action`] (or at the next change of the records). When it loses
//! leadership it stops acting and campaigns again.
//!
//! [`Controller`] owns these tasks in one `TaskTracker`: at shutdown (its `CancellationToken`)
//! every task, the ops HTTP server included, stops, the leaders resign, and
//! [`Controller::run`] returns once all of them have.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{Backoff, Coordinator, KeyLayout, WatchEvent, Watcher};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{
    CampaignFailed, InternalEvent, LeadershipGained, LeadershipLost, RecordsListed, WatchBroken,
};
use crate::metrics::{Health, Metrics};
use crate::mongo::ReplSetClient;
use crate::reconcile::{error_policy, reconcile, Action, Context, ReconcileError, SetState};
use crate::records::{desired_sets, Selector, SlotHolders};

/// The first delay after a failed campaign, doubling up to [`CAMPAIGN_BACKOFF_MAX`].
pub const CAMPAIGN_BACKOFF_INITIAL: Duration = Duration::from_millis(800);
/// Short: a failed campaign costs one request, and the set has no leader until one succeeds.
pub const CAMPAIGN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How long a leader that lost its leadership waits for the store to take its resignation.
const RESIGN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the loop knows of the store.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// Every value under `<prefix>/services/`.
    pub entries: BTreeMap<String, Vec<u8>>,
    /// The watch delivered its snapshot and is connected.
    pub trusted: bool,
    /// Bumped at every change, for debouncing.
    pub generation: u64,
}

/// The settings of the loop.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub layout: KeyLayout,
    pub selectors: Vec<Selector>,
    pub removal_grace: Duration,
    pub debounce: Duration,
    /// The safety-net requeue when nothing changes.
    pub resync: Duration,
    pub leader_ttl: Duration,
    /// Who this process is, in the leader key.
    pub holder: String,
    pub dry_run: bool,
    pub metrics: Arc<Metrics>,
    /// `--allow-force --force-after`: `None` never forces.
    pub force_after: Option<Duration>,
}

/// The controller's tasks are gone before it saw the records.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the records' watch ended before its first snapshot")]
    WatchEnded,
    #[error("cannot serve /metrics and /healthz on {addr}: {source}")]
    Ops {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The running controller: the records' watch, one loop per managed set, the ops server.
#[derive(Debug)]
pub struct Controller<S, M> {
    ctx: Arc<Context<S, M>>,
    health: Arc<Health>,
    records: watch::Receiver<Records>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl<S: Watcher + Coordinator, M: ReplSetClient> Controller<S, M> {
    /// Starts following the records. Nothing acts until [`Controller::run`] (or
    /// [`Controller::manage`]).
    pub fn start(
        store: Arc<S>,
        members: Arc<M>,
        config: ControllerConfig,
        shutdown: CancellationToken,
    ) -> Controller<S, M> {
        let health = Arc::new(Health::default());
        let (tx, records) = watch::channel(Records::default());
        let tracker = TaskTracker::new();
        tracker.spawn(follow_records(
            store.clone(),
            config.layout.clone(),
            tx,
            health.clone(),
            config.metrics.clone(),
            shutdown.clone(),
        ));
        Controller {
            ctx: Arc::new(Context {
                store,
                members,
                config,
            }),
            health,
            records,
            tracker,
            shutdown,
        }
    }

    /// The records as the watch delivers them.
    pub fn records(&self) -> watch::Receiver<Records> {
        self.records.clone()
    }

    /// The shared context (the store, the members' client, the settings).
    pub fn context(&self) -> &Context<S, M> {
        &self.ctx
    }

    /// Waits for the watch's first complete snapshot.
    pub async fn first_snapshot(&mut self) -> Result<Records, ControllerError> {
        self.records
            .wait_for(|r| r.trusted)
            .await
            .map(|r| r.clone())
            .map_err(|_| ControllerError::WatchEnded)
    }

    /// Serves `/metrics` and `/healthz` (healthy while the watch is connected) on `addr`
    /// until shutdown; returns the bound address.
    pub async fn serve_ops(&self, addr: SocketAddr) -> Result<SocketAddr, ControllerError> {
        let listener = ops_http::bind(addr)
            .await
            .map_err(|source| ControllerError::Ops { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ControllerError::Ops { addr, source })?;
        let mut registry = prometheus_client::registry::Registry::default();
        self.ctx.config.metrics.register(&mut registry);
        let health = self.health.clone();
        self.tracker.spawn(ops_http::serve(
            listener,
            Arc::new(registry),
            Arc::new(move || health.check()),
            self.shutdown.clone(),
        ));
        tracing::info!(addr = %bound, "serving /metrics and /healthz");
        Ok(bound)
    }

    /// Starts the loop of `set` (campaign, reconcile while leading) until shutdown.
    pub fn manage(&self, set: String) {
        tracing::info!(set = %set, "managing replica set");
        self.tracker.spawn(run_set(
            self.ctx.clone(),
            set,
            self.records.clone(),
            self.shutdown.clone(),
        ));
    }

    /// Manages every selected set (the configured ones at once, discovered ones as their
    /// records appear) until shutdown, then waits until every task it started has stopped
    /// (the leaders resigned, the ops server closed).
    pub async fn run(self) {
        let mut records = self.records.clone();
        let mut running = BTreeSet::new();
        loop {
            let sets: Vec<String> = {
                let r = records.borrow();
                let config = &self.ctx.config;
                desired_sets(
                    &r.entries,
                    &config.layout,
                    &config.selectors,
                    &SlotHolders::default(),
                )
                .0
                .into_keys()
                .collect()
            };
            if self.shutdown.is_cancelled() {
                break;
            }
            for set in sets {
                if running.insert(set.clone()) {
                    self.manage(set);
                }
            }
            tokio::select! {
                changed = records.changed() => if changed.is_err() { break },
                _ = self.shutdown.cancelled() => break,
            }
        }
        self.stop().await;
    }

    /// Stops everything this controller started and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Follows the records under `<prefix>/services/` and publishes them.
async fn follow_records<W: Watcher>(
    store: Arc<W>,
    layout: KeyLayout,
    tx: watch::Sender<Records>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut stream = store.watch_prefix(layout.services_prefix());
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = shutdown.cancelled() => return,
        };
        let Some(item) = item else { return };
        tx.send_modify(|r| {
            match item {
                Ok(WatchEvent::Restarted(entries)) => {
                    RecordsListed {
                        entries: entries.len(),
                    }
                    .emit(&metrics);
                    r.entries = entries.into_iter().map(|e| (e.key, e.value)).collect();
                    r.trusted = true;
                    health.watch_connected.store(true, Ordering::Relaxed);
                }
                Ok(WatchEvent::Put(e)) => {
                    r.entries.insert(e.key, e.value);
                }
                Ok(WatchEvent::Deleted(k)) => {
                    r.entries.remove(&k);
                }
                Err(error) => {
                    // Until the watch lists again, no absence of a record means anything.
                    WatchBroken { error: &error }.emit(&metrics);
                    r.trusted = false;
                    health.watch_connected.store(false, Ordering::Relaxed);
                }
            }
            r.generation += 1;
        });
    }
}

/// Campaigns for `set` and reconciles it while leading, until shutdown; then resigns.
async fn run_set<S: Coordinator, M: ReplSetClient>(
    ctx: Arc<Context<S, M>>,
    set: String,
    mut records: watch::Receiver<Records>,
    shutdown: CancellationToken,
) {
    let config = &ctx.config;
    if config.dry_run {
        // Never a campaign: a dry run must not take the leadership from the reconciler that
        // acts (it would win some elections and stop that one for as long as it leads).
        tracing::info!(set = %set, "dry run: not campaigning; logging what a leader would do");
        tokio::select! {
            _ = reconcile_loop(&ctx, &set, &mut records, None) => {}
            _ = shutdown.cancelled() => {}
        }
        return;
    }
    let key = config.layout.replset_leader_key(&set);
    let mut backoff = Backoff::new(CAMPAIGN_BACKOFF_INITIAL, CAMPAIGN_BACKOFF_MAX);
    loop {
        let campaign = ctx
            .store
            .campaign(key.clone(), config.holder.clone(), config.leader_ttl);
        let leadership = tokio::select! {
            l = campaign => l,
            _ = shutdown.cancelled() => return,
        };
        let mut leadership = match leadership {
            Ok(l) => {
                backoff.reset();
                l
            }
            Err(error) => {
                let retry_in = backoff.next_delay(rand::random::<f64>());
                CampaignFailed {
                    set: &set,
                    error: &error,
                    retry_in,
                }
                .emit(&config.metrics);
                tokio::select! {
                    _ = tokio::time::sleep(retry_in) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        LeadershipGained {
            set: &set,
            holder: &config.holder,
        }
        .emit(&config.metrics);
        let fence = leadership.fence().clone();
        let lost = tokio::select! {
            reason = leadership.lost() => Some(reason),
            reason = reconcile_loop(&ctx, &set, &mut records, Some(&fence)) => Some(reason),
            _ = shutdown.cancelled() => None,
        };
        match lost {
            Some(reason) => {
                LeadershipLost {
                    set: &set,
                    reason: &reason,
                }
                .emit(&config.metrics);
                // Give up whatever the store may still hold for us (our lease or session),
                // without waiting for it longer than a request.
                let _ = tokio::time::timeout(RESIGN_TIMEOUT, leadership.resign()).await;
            }
            None => {
                leadership.resign().await;
                tracing::info!(set = %set, "resigned");
                return;
            }
        }
    }
}

/// The loop of one set while this process leads (with the leadership's `fence`), or of a dry
/// run (without one): debounce, reconcile, requeue. Returns, with the reason, only when the
/// store refused a write as leader (this process no longer leads).
async fn reconcile_loop<S: Coordinator, M: ReplSetClient>(
    ctx: &Context<S, M>,
    set: &str,
    records: &mut watch::Receiver<Records>,
    fence: Option<&backend_core::Fence>,
) -> String {
    let mut state = SetState::new(set);
    loop {
        debounce(records, ctx.config.debounce).await;
        let snapshot = records.borrow().clone();
        let action = match reconcile(&mut state, &snapshot, ctx, fence).await {
            Ok(action) => action,
            Err(ReconcileError::Fenced { source }) => return source.to_string(),
            Err(error) => error_policy(&state, &error, ctx),
        };
        requeue(action, records).await;
    }
}

/// Waits until the records have been quiet for `quiet`.
async fn debounce(records: &watch::Receiver<Records>, quiet: Duration) {
    loop {
        let seen = records.borrow().generation;
        tokio::time::sleep(quiet).await;
        if records.borrow().generation == seen {
            return;
        }
    }
}

/// Waits as the action says, or until the records change.
async fn requeue(action: Action, records: &mut watch::Receiver<Records>) {
    let after = action.requeue_after();
    if after.is_zero() {
        return;
    }
    let seen = records.borrow().generation;
    tokio::select! {
        _ = tokio::time::sleep(after) => {}
        _ = async {
            while records.changed().await.is_ok() {
                if records.borrow().generation != seen { break; }
            }
        } => {}
    }
}
