//! The reconcile loop, kube-style: watch the records, debounce, then for each replica set
//! observe, plan one step, apply it, and requeue until converged.
//!
//! One task follows the store's records and publishes the latest [`Records`] on a
//! `tokio::sync::watch` channel. One task per replica set campaigns for the set's leader key;
//! while it leads, it reconciles; when it loses leadership it stops acting and campaigns again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend_core::{Backoff, Coordinator, KeyLayout, WatchEvent, Watcher};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Health, Metrics, RefusedLabels, StepLabels};
use crate::model::Desired;
use crate::mongo::{Members, MongoError, Observed};
use crate::plan::{plan_next_step, Change, Plan, PlanContext, Step};
use crate::records::{desired_sets, Selector};

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

/// Follows the records under `<prefix>/services/` and publishes them.
pub async fn follow_records<W: Watcher>(
    store: Arc<W>,
    layout: KeyLayout,
    tx: watch::Sender<Records>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering;
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
                Err(e) => {
                    // Until the watch lists again, no absence of a record means anything.
                    tracing::warn!(error = %e, "the records' watch broke; removing nothing until it is back");
                    r.trusted = false;
                    health.watch_connected.store(false, Ordering::Relaxed);
                }
            }
            r.generation += 1;
        });
    }
}

/// The desired members of one set now, with the skipped values logged once per key and reason.
fn desired_of(
    records: &Records,
    config: &ControllerConfig,
    set: &str,
    warned: &mut BTreeMap<String, String>,
) -> Desired {
    let (sets, skipped) = desired_sets(&records.entries, &config.layout, &config.selectors);
    for s in skipped {
        if warned.get(&s.key) != Some(&s.reason) {
            tracing::warn!(key = %s.key, reason = %s.reason, "ignoring a value in the store");
            warned.insert(s.key, s.reason);
        }
    }
    sets.get(set).cloned().unwrap_or_default()
}

/// Campaigns for `set` and reconciles it while leading, until shutdown.
pub async fn run_set<C: Coordinator>(
    store: Arc<C>,
    members: Arc<Members>,
    config: ControllerConfig,
    set: String,
    mut records: watch::Receiver<Records>,
    shutdown: CancellationToken,
) {
    let key = config.layout.replset_leader_key(&set);
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    loop {
        let campaign = store.campaign(key.clone(), config.holder.clone(), config.leader_ttl);
        let leadership = tokio::select! {
            l = campaign => l,
            _ = shutdown.cancelled() => return,
        };
        let mut leadership = match leadership {
            Ok(l) => {
                backoff.reset();
                l
            }
            Err(e) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                tracing::warn!(set = %set, error = %e, retry_in_ms = delay.as_millis() as u64, "campaign failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        tracing::info!(set = %set, holder = %config.holder, "leading; reconciling");
        let lost = tokio::select! {
            reason = leadership.lost() => Some(reason),
            _ = reconcile_while_leading(&*store, &members, &config, &set, &mut records) => None,
            _ = shutdown.cancelled() => None,
        };
        match lost {
            Some(reason) => tracing::warn!(set = %set, %reason, "lost leadership; stopped acting"),
            None => {
                leadership.resign().await;
                return;
            }
        }
    }
}

/// The loop of one set while this process leads. Never returns on its own.
async fn reconcile_while_leading<C: Coordinator>(
    store: &C,
    members: &Members,
    config: &ControllerConfig,
    set: &str,
    records: &mut watch::Receiver<Records>,
) {
    let mut warned = BTreeMap::new();
    let mut gone_since: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut last_status = String::new();
    let mut last_uri = String::new();
    let mut last_step = String::new();
    let mut last_error = String::new();
    let mut converging_since: Option<Instant> = None;
    let mut majority_lost_since: Option<Instant> = None;
    loop {
        // Debounce: wait until the records are quiet for `debounce`.
        loop {
            let seen = records.borrow().generation;
            tokio::time::sleep(config.debounce).await;
            if records.borrow().generation == seen {
                break;
            }
        }
        let snapshot = records.borrow().clone();
        let desired = desired_of(&snapshot, config, set, &mut warned);
        let hosts: Vec<String> = desired.members.values().cloned().collect();
        let mut all_hosts = hosts.clone();

        // A first look, to learn the config's hosts, then the observation proper.
        let first = members.observe(set, &all_hosts, &hosts).await;
        if let Some(c) = &first.observation.config {
            for m in &c.members {
                if !all_hosts.contains(&m.host) {
                    all_hosts.push(m.host.clone());
                }
            }
        }
        let observed = if all_hosts.len() > hosts.len() {
            members.observe(set, &all_hosts, &hosts).await
        } else {
            first
        };

        // How long each config member's record has been gone.
        let now = Instant::now();
        let mut record_gone_for = BTreeMap::new();
        if let Some(c) = &observed.observation.config {
            for m in &c.members {
                if desired.members.contains_key(&m.id) {
                    gone_since.remove(&m.id);
                } else {
                    let since = *gone_since.entry(m.id).or_insert(now);
                    record_gone_for.insert(m.id, now - since);
                }
            }
        }
        let ctx = PlanContext {
            set_name: set.to_string(),
            records_trusted: snapshot.trusted,
            record_gone_for,
            removal_grace: config.removal_grace,
            force_after: config.force_after,
            majority_lost_for: majority_lost_since.map_or(Duration::ZERO, |t| t.elapsed()),
        };
        let plan = plan_next_step(&observed.observation, &desired, &ctx);
        match &plan.step {
            Step::Blocked(crate::plan::Blocked::LostMajority { .. })
            | Step::ForceReconfig { .. } => {
                majority_lost_since.get_or_insert_with(Instant::now);
            }
            _ => majority_lost_since = None,
        }
        if let Step::ForceReconfig { host, dropped, .. } = &plan.step {
            tracing::error!(
                set,
                %host,
                ?dropped,
                "FORCING a reconfig (--allow-force): the majority has been lost for longer than --force-after; writes only the dropped members had will be rolled back when they return"
            );
        }
        for note in &plan.notes {
            tracing::warn!(set, ?note, "member and record disagree");
        }
        let requeue = match &plan.step {
            Step::Converged => {
                if let Some(since) = converging_since.take() {
                    config
                        .metrics
                        .converge_seconds
                        .observe(since.elapsed().as_secs_f64());
                }
                config.resync
            }
            Step::Wait(wait) => {
                tracing::info!(set, ?wait, "waiting");
                Duration::from_secs(1)
            }
            Step::Blocked(blocked) => {
                tracing::error!(set, reason = %blocked, "cannot act without an operator");
                last_error = format!("{blocked:?}: {blocked}");
                Duration::from_secs(5)
            }
            step if config.dry_run => {
                tracing::info!(set, ?step, "would apply (dry run)");
                config.resync
            }
            step => {
                let describe = describe(step);
                let kind = step_kind(step);
                match members.apply(set, step, &observed).await {
                    Ok(()) => {
                        config
                            .metrics
                            .steps_applied
                            .get_or_create(&StepLabels {
                                set: set.to_string(),
                                step: kind,
                            })
                            .inc();
                        converging_since.get_or_insert_with(Instant::now);
                        tracing::info!(set, step = %describe, "applied");
                        last_step = describe;
                        last_error.clear();
                        Duration::ZERO
                    }
                    Err(e) => {
                        refused(config, set, kind, &e);
                        if matches!(e, MongoError::NoAnswer { .. }) {
                            // Unknown outcome: observe again, never repeat blindly.
                            tracing::warn!(set, step = %describe, error = %e, "outcome unknown; observing again");
                        } else {
                            tracing::warn!(set, step = %describe, code = ?e.code(), error = %e, "the server refused the step");
                        }
                        last_error = e.to_string();
                        Duration::from_secs(1)
                    }
                }
            }
        };
        publish_outputs(
            store,
            config,
            set,
            &observed,
            &plan,
            &last_step,
            &last_error,
            &mut last_uri,
            &mut last_status,
        )
        .await;
        if requeue > Duration::ZERO {
            let seen = records.borrow().generation;
            tokio::select! {
                _ = tokio::time::sleep(requeue) => {}
                _ = async {
                    while records.changed().await.is_ok() {
                        if records.borrow().generation != seen { break; }
                    }
                } => {}
            }
        }
    }
}

fn refused(config: &ControllerConfig, set: &str, step: &'static str, e: &MongoError) {
    config
        .metrics
        .steps_refused
        .get_or_create(&RefusedLabels {
            set: set.to_string(),
            step,
            code: e
                .code()
                .map_or_else(|| "none".to_string(), |c| c.to_string()),
        })
        .inc();
}

fn step_kind(step: &Step) -> &'static str {
    match step {
        Step::Initiate { .. } => "initiate",
        Step::ForceReconfig { .. } => "force_reconfig",
        Step::Reconfig { change, .. } => match change {
            Change::Add { .. } => "add",
            Change::GrantVote { .. } => "grant_vote",
            Change::RevokeVote { .. } => "revoke_vote",
            Change::MoveHost { .. } => "move_host",
            Change::Remove { .. } => "remove",
        },
        _ => "none",
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Initiate { host, .. } => format!("initiate on {host}"),
        Step::ForceReconfig {
            host,
            config,
            dropped,
        } => format!(
            "FORCE a config without members {dropped:?} on {host} (config version {})",
            config.version
        ),
        Step::Reconfig { change, config } => {
            let what = match change {
                Change::Add { id, host } => format!("add member {id} ({host}) without a vote"),
                Change::GrantVote { id } => format!("give member {id} a vote"),
                Change::RevokeVote { id } => format!("take the vote of member {id}"),
                Change::MoveHost { id, from, to, .. } => {
                    format!("move member {id} from {from} to {to}")
                }
                Change::Remove { id, host } => format!("remove member {id} ({host})"),
            };
            format!("{what} (config version {})", config.version)
        }
        other => format!("{other:?}"),
    }
}

/// `<prefix>/replsets/<set>/uri` and `/status`, written when they change.
#[allow(clippy::too_many_arguments)]
async fn publish_outputs<C: Coordinator>(
    store: &C,
    config: &ControllerConfig,
    set: &str,
    observed: &Observed,
    plan: &Plan,
    last_step: &str,
    last_error: &str,
    last_uri: &mut String,
    last_status: &mut String,
) {
    let Some(cfg) = &observed.observation.config else {
        return;
    };
    let hosts: Vec<&str> = cfg.members.iter().map(|m| m.host.as_str()).collect();
    let uri = format!("mongodb://{}/?replicaSet={set}", hosts.join(","));
    if &uri != last_uri {
        match store
            .put_value(
                &config.layout.replset_uri_key(set),
                uri.clone().into_bytes(),
            )
            .await
        {
            Ok(()) => {
                tracing::info!(set, %uri, "published the connection string");
                *last_uri = uri;
            }
            Err(e) => tracing::warn!(set, error = %e, "cannot publish the connection string"),
        }
    }
    let primary = observed.primary_host.clone();
    let status = json!({
        "set": set,
        "config_version": cfg.version,
        "primary": primary,
        "members": cfg.members.iter().map(|m| {
            let s = observed.observation.status.get(&m.id);
            json!({
                "_id": m.id,
                "host": m.host,
                "votes": m.votes,
                "priority": m.priority,
                "healthy": s.map(|s| s.healthy),
                "state": s.map(|s| format!("{:?}", s.state).to_uppercase()),
            })
        }).collect::<Vec<_>>(),
        "converged": matches!(plan.step, Step::Converged),
        "next": format!("{:?}", plan.step).chars().take(300).collect::<String>(),
        "last_step": last_step,
        "last_error": last_error,
    })
    .to_string();
    if &status != last_status {
        match store
            .put_value(
                &config.layout.replset_status_key(set),
                status.clone().into_bytes(),
            )
            .await
        {
            Ok(()) => *last_status = status,
            Err(e) => tracing::warn!(set, error = %e, "cannot publish the status"),
        }
    }
}
