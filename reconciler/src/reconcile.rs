//! One reconcile of one replica set, kube-runtime style: [`reconcile`] observes the set, plans
//! the one next safe step, applies it and publishes the outputs, and returns the [`Action`]
//! (when to look again); [`error_policy`] decides what a failed step means. What a set's loop
//! remembers between reconciles is in [`SetState`]; what every reconcile shares is the
//! [`Context`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{
    BackendError, Coordinator, Fence, IdentityMember, ReplSetStatus, SetIdentity,
    IDENTITY_SCHEMA_VERSION,
};
use tokio::time::Instant;

use crate::controller::{ControllerConfig, Records};
use crate::events::{
    AccessRefused, BlockedOnOperator, Forcing, IdentityRecorded, IdentityUnreadable, InternalEvent,
    MemberRecordDisagree, PublishFailed, Readdressing, RecordIgnored, SetConverged, StepApplied,
    StepRefused, StepWithheld, UriPublished, Waiting, WouldApply, WouldPublish, WriteFenced,
};
use crate::model::{Committed, Desired};
use crate::mongo::{MongoError, Observed, ReplSetClient};
use crate::plan::{plan_next_step, Blocked, KnownSet, Plan, PlanContext, Step};
use crate::records::{desired_sets, Skipped, SlotHolders};

/// The requeue delays: how long a set's loop waits before it looks again (it looks sooner when
/// the records change). A converged set is looked at again after
/// [`ControllerConfig::resync`].
pub mod requeue {
    use std::time::Duration;

    /// After a step the server accepted: at once, to take the next one.
    pub const AFTER_STEP: Duration = Duration::ZERO;
    /// While the planner waits for the set (an election, a member catching up, a grace
    /// period).
    pub const WHILE_WAITING: Duration = Duration::from_secs(1);
    /// While the planner cannot act without an operator.
    pub const WHILE_BLOCKED: Duration = Duration::from_secs(5);
    /// After a step the server refused or did not answer: observe again soon.
    pub const AFTER_ERROR: Duration = Duration::from_secs(1);
}

/// What to do after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Duration,
}

impl Action {
    /// Look again after `after`, or sooner when the records change.
    pub fn requeue(after: Duration) -> Action {
        Action {
            requeue_after: after,
        }
    }

    pub fn requeue_after(&self) -> Duration {
        self.requeue_after
    }
}

/// A step that did not go through.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The server refused the step (its code says why), or did not answer (an unknown
    /// outcome: observe again, never repeat blindly).
    #[error("{step}: {source}")]
    Step {
        step: String,
        #[source]
        source: MongoError,
    },
    /// The store refused a write as leader: this process no longer holds the leader key.
    /// Stop acting and campaign again.
    #[error("no longer the leader: {source}")]
    Fenced {
        #[source]
        source: BackendError,
    },
}

/// Why what the store remembers of a set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityReadError {
    #[error("cannot read {key} from the store: {source}")]
    Store {
        key: String,
        #[source]
        source: backend_core::BackendError,
    },
    #[error("{key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: backend_core::IdentityDecodeError,
    },
}

/// What the store remembers of `set` (`<prefix>/replsets/<set>/identity`), if anything.
pub async fn read_identity<S: Coordinator>(
    store: &S,
    layout: &backend_core::KeyLayout,
    set: &str,
) -> Result<Option<SetIdentity>, IdentityReadError> {
    let key = layout.replset_identity_key(set);
    let Some(bytes) = store
        .get_value(&key)
        .await
        .map_err(|source| IdentityReadError::Store {
            key: key.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    SetIdentity::from_json(&bytes)
        .map(Some)
        .map_err(|source| IdentityReadError::Decode { key, source })
}

/// [`read_identity`] as the planner takes it: a set the store knows, or a new one.
pub async fn known_set<S: Coordinator>(
    store: &S,
    layout: &backend_core::KeyLayout,
    set: &str,
) -> Result<KnownSet, IdentityReadError> {
    Ok(match read_identity(store, layout, set).await? {
        Some(identity) => KnownSet::Known(identity),
        None => KnownSet::New,
    })
}

/// What every reconcile of every set shares.
#[derive(Debug)]
pub struct Context<S, M> {
    pub store: Arc<S>,
    pub members: Arc<M>,
    pub config: ControllerConfig,
}

/// What one set's loop remembers between reconciles, for as long as this process leads it.
#[derive(Debug)]
pub struct SetState {
    set: String,
    /// The records refused and already reported, with the refusal (reported again when it
    /// changes, or when the key is refused again after it was followed).
    warned: BTreeMap<String, crate::records::Refusal>,
    /// The members the last observation saw up: a record never takes their slot.
    holders: SlotHolders,
    /// Since when each config member has had no record.
    gone_since: BTreeMap<i64, Instant>,
    /// Since the first step after the set was last converged.
    converging_since: Option<Instant>,
    /// Since the planner first found the majority lost.
    majority_lost_since: Option<Instant>,
    last_step: String,
    last_error: String,
    /// What was last written, so that unchanged outputs are not written again.
    published_uri: Option<String>,
    published_status: Option<ReplSetStatus>,
    /// What the store remembers of the set (read again while there is no primary, so that an
    /// operator's `forget-set` is seen).
    known: KnownSet,
    /// The members that refused the reconciler's login or a command, and the error reported.
    access_reported: BTreeMap<String, String>,
    /// The newest majority commit point a primary reported, by this leader.
    committed: Option<Committed>,
    /// When the identity was last written (a commit point that only advanced is written again
    /// at most every [`COMMIT_POINT_EVERY`]).
    identity_written_at: Option<Instant>,
}

/// How often the identity is written again when only its commit point advanced: a new leader
/// starts from it, so re-addressing never trusts data older than what was acknowledged more
/// than this long before the last leader stopped.
pub const COMMIT_POINT_EVERY: Duration = Duration::from_secs(2);

impl SetState {
    pub fn new(set: &str) -> SetState {
        SetState {
            set: set.to_string(),
            warned: BTreeMap::new(),
            holders: SlotHolders::default(),
            gone_since: BTreeMap::new(),
            converging_since: None,
            majority_lost_since: None,
            last_step: String::new(),
            last_error: String::new(),
            published_uri: None,
            published_status: None,
            known: KnownSet::Unknown,
            access_reported: BTreeMap::new(),
            committed: None,
            identity_written_at: None,
        }
    }

    /// The members of `cfg` without a record, and since when (seconds since the epoch, from
    /// `now`), for the status.
    fn records_gone(
        &self,
        cfg: &crate::model::ConfigView,
        now: u64,
    ) -> Vec<backend_core::RecordGone> {
        cfg.members
            .iter()
            .filter_map(|m| {
                let since = self.gone_since.get(&m.id)?;
                Some(backend_core::RecordGone {
                    id: m.id,
                    host: m.host.clone(),
                    since: now.saturating_sub(since.elapsed().as_secs()),
                })
            })
            .collect()
    }

    /// Reports each member that refused the reconciler's login or a command, once per error;
    /// forgets those that accept it again.
    fn report_access(&mut self, observed: &Observed, config: &ControllerConfig) {
        self.access_reported
            .retain(|host, _| observed.access_refused.contains_key(host));
        for (host, error) in &observed.access_refused {
            if self.access_reported.get(host) != Some(error) {
                AccessRefused {
                    set: &self.set,
                    host,
                    error,
                }
                .emit(&config.metrics);
                self.access_reported.insert(host.clone(), error.clone());
            }
        }
    }

    /// Reads what the store remembers of the set; on failure it stays or becomes unknown,
    /// and nothing is initiated.
    async fn read_identity<S: Coordinator>(&mut self, store: &S, config: &ControllerConfig) {
        self.known = match known_set(store, &config.layout, &self.set).await {
            Ok(known) => known,
            Err(error) => {
                IdentityUnreadable {
                    set: &self.set,
                    error: &error,
                }
                .emit(&config.metrics);
                KnownSet::Unknown
            }
        };
    }

    pub fn set(&self) -> &str {
        &self.set
    }

    /// The newest commit point seen of the set: by this leader, or remembered by the store.
    fn committed_seen(&self) -> Option<Committed> {
        let stored = match &self.known {
            KnownSet::Known(identity) => Committed::of_identity(identity),
            _ => None,
        };
        Committed::newest(stored, self.committed.clone())
    }

    /// Remembers the commit point of a primary in this observation.
    fn saw_commit_point(&mut self, obs: &crate::model::Observation) {
        let seen = obs
            .config
            .as_ref()
            .and_then(|c| c.replica_set_id.clone())
            .zip(obs.primary.and(obs.commit_point))
            .map(|(replica_set_id, optime)| Committed {
                replica_set_id,
                optime,
            });
        self.committed = Committed::newest(self.committed.take(), seen);
    }

    /// The desired members of this set with the members `self.holders` sees up, and the
    /// values not followed.
    fn desired(&self, records: &Records, config: &ControllerConfig) -> (Desired, Vec<Skipped>) {
        let (sets, skipped) = desired_sets(
            &records.entries,
            &config.layout,
            &config.selectors,
            &self.holders,
        );
        (sets.get(&self.set).cloned().unwrap_or_default(), skipped)
    }

    /// The desired members and the set observed through them. A record never takes the slot
    /// of a member the set sees up at another host (safety rule 13): the members up are the
    /// last observation's, checked against this one; when this one sees others and so other
    /// members are desired, the set is observed again through them, so that the planner never
    /// sees a host that no followed record names. Refusals are reported once per key.
    async fn desired_and_observed<M: ReplSetClient>(
        &mut self,
        records: &Records,
        config: &ControllerConfig,
        members: &M,
    ) -> (Desired, Observed) {
        let (mut desired, mut skipped) = self.desired(records, config);
        let mut observed = observe(members, &self.set, &desired).await;
        let holders = self.holders.observed(&self.set, &observed.observation);
        if holders != self.holders {
            self.holders = holders;
            let (again, skipped_again) = self.desired(records, config);
            skipped = skipped_again;
            if again != desired {
                desired = again;
                observed = observe(members, &self.set, &desired).await;
                self.holders = self.holders.observed(&self.set, &observed.observation);
            }
        }
        self.warned
            .retain(|key, _| skipped.iter().any(|s| &s.key == key));
        for s in skipped {
            if self.warned.get(&s.key) != Some(&s.refusal) {
                RecordIgnored {
                    key: &s.key,
                    refusal: &s.refusal,
                }
                .emit(&config.metrics);
                self.warned.insert(s.key, s.refusal);
            }
        }
        (desired, observed)
    }

    /// How long each config member's record has been gone, by `_id`.
    fn record_gone_for(
        &mut self,
        observed: &Observed,
        desired: &Desired,
    ) -> BTreeMap<i64, Duration> {
        let now = Instant::now();
        let mut gone_for = BTreeMap::new();
        if let Some(c) = &observed.observation.config {
            for m in &c.members {
                if desired.members.contains_key(&m.id) {
                    self.gone_since.remove(&m.id);
                } else {
                    let since = *self.gone_since.entry(m.id).or_insert(now);
                    gone_for.insert(m.id, now - since);
                }
            }
        }
        gone_for
    }
}

/// Observes `set` twice if needed (a first look learns the config's hosts), through the hosts
/// the records name and the config's.
async fn observe<M: ReplSetClient>(members: &M, set: &str, desired: &Desired) -> Observed {
    let hosts: Vec<String> = desired.members.values().cloned().collect();
    let mut all_hosts = hosts.clone();
    let first = members.observe(set, &all_hosts, &hosts).await;
    if let Some(c) = &first.observation.config {
        for m in &c.members {
            if !all_hosts.contains(&m.host) {
                all_hosts.push(m.host.clone());
            }
        }
    }
    if all_hosts.len() > hosts.len() {
        members.observe(set, &all_hosts, &hosts).await
    } else {
        first
    }
}

/// One reconcile of `set` against the `records` of now: observe, plan one step, apply it,
/// publish the connection string and the status. The decision is [`plan_next_step`]'s.
///
/// Fencing (safety rule 12): a step is sent only while `fence` says the leadership is surely
/// valid for longer than a step can take ([`ReplSetClient::step_timeout`]); every write to the
/// store is conditional on still leading, and a refused one is [`ReconcileError::Fenced`].
///
/// Without a fence (`--dry-run`, which never campaigns) nothing is sent and nothing written:
/// the step and the connection string that a leader would apply and publish are logged.
pub async fn reconcile<S: Coordinator, M: ReplSetClient>(
    set: &mut SetState,
    records: &Records,
    ctx: &Context<S, M>,
    fence: Option<&Fence>,
) -> Result<Action, ReconcileError> {
    let config = &ctx.config;
    let metrics = &config.metrics;
    let (desired, observed) = set
        .desired_and_observed(records, config, &*ctx.members)
        .await;
    set.report_access(&observed, config);
    if set.known == KnownSet::Unknown || observed.observation.primary.is_none() {
        set.read_identity(&*ctx.store, config).await;
    }
    let plan_ctx = PlanContext {
        set_name: set.set.clone(),
        records_trusted: records.trusted,
        record_gone_for: set.record_gone_for(&observed, &desired),
        removal_grace: config.removal_grace,
        force_after: config.force_after,
        majority_lost_for: set
            .majority_lost_since
            .map_or(Duration::ZERO, |t| t.elapsed()),
        known_set: set.known.clone(),
        committed: set.committed_seen(),
    };
    let plan = plan_next_step(&observed.observation, &desired, &plan_ctx);
    set.saw_commit_point(&observed.observation);
    match &plan.step {
        Step::Blocked(Blocked::LostMajority { .. }) | Step::ForceReconfig { .. } => {
            set.majority_lost_since.get_or_insert_with(Instant::now);
        }
        _ => set.majority_lost_since = None,
    }
    for note in &plan.notes {
        MemberRecordDisagree {
            set: &set.set,
            note,
        }
        .emit(metrics);
    }
    let outcome = match &plan.step {
        Step::Converged => {
            if let Some(since) = set.converging_since.take() {
                SetConverged {
                    set: &set.set,
                    took: since.elapsed(),
                }
                .emit(metrics);
            }
            Ok(Action::requeue(config.resync))
        }
        Step::Wait(wait) => {
            Waiting {
                set: &set.set,
                wait,
            }
            .emit(metrics);
            Ok(Action::requeue(requeue::WHILE_WAITING))
        }
        Step::Blocked(blocked) => {
            BlockedOnOperator {
                set: &set.set,
                blocked,
            }
            .emit(metrics);
            set.last_error = format!("{}: {blocked}", blocked.reason());
            Ok(Action::requeue(requeue::WHILE_BLOCKED))
        }
        step if fence.is_none() => {
            WouldApply {
                set: &set.set,
                step,
            }
            .emit(metrics);
            Ok(Action::requeue(config.resync))
        }
        step if fence.is_some_and(|f| f.valid_for() <= ctx.members.step_timeout()) => {
            StepWithheld {
                set: &set.set,
                step,
                valid_for: fence.map_or(Duration::ZERO, Fence::valid_for),
                step_timeout: ctx.members.step_timeout(),
            }
            .emit(metrics);
            Ok(Action::requeue(requeue::WHILE_WAITING))
        }
        step => {
            if let Step::ForceReconfig { host, dropped, .. } = step {
                Forcing {
                    set: &set.set,
                    host,
                    dropped,
                }
                .emit(metrics);
            }
            if let Step::Readdress { host, moved, .. } = step {
                Readdressing {
                    set: &set.set,
                    host,
                    moved,
                }
                .emit(metrics);
            }
            match ctx.members.apply(&set.set, step, &observed).await {
                Ok(()) => {
                    StepApplied {
                        set: &set.set,
                        step,
                    }
                    .emit(metrics);
                    set.converging_since.get_or_insert_with(Instant::now);
                    set.last_step = step.describe();
                    set.last_error.clear();
                    Ok(Action::requeue(requeue::AFTER_STEP))
                }
                Err(error) => {
                    StepRefused {
                        set: &set.set,
                        step,
                        error: &error,
                    }
                    .emit(metrics);
                    set.last_error = error.to_string();
                    Err(ReconcileError::Step {
                        step: step.describe(),
                        source: error,
                    })
                }
            }
        }
    };
    match fence {
        Some(fence) => {
            if let Err(source) = publish_outputs(set, ctx, fence, &observed, &plan).await {
                return Err(ReconcileError::Fenced { source });
            }
        }
        None => would_publish(set, ctx, &observed, &plan),
    }
    outcome
}

/// `--dry-run`: logs the connection string a leader would publish, when it changes.
fn would_publish<S, M: ReplSetClient>(
    set: &mut SetState,
    ctx: &Context<S, M>,
    observed: &Observed,
    plan: &Plan,
) {
    let Some(cfg) = &observed.observation.config else {
        return;
    };
    let uri = uri_of(&set.set, ctx, cfg);
    if set.published_uri.as_ref() != Some(&uri) {
        WouldPublish {
            set: &set.set,
            uri: &uri,
            converged: matches!(plan.step, Step::Converged),
        }
        .emit(&ctx.config.metrics);
        set.published_uri = Some(uri);
    }
}

/// The connection string of a set with config `cfg`: its members' hosts and the options
/// clients need ([`ReplSetClient::uri_options`]).
fn uri_of<S, M: ReplSetClient>(
    set: &str,
    ctx: &Context<S, M>,
    cfg: &crate::model::ConfigView,
) -> String {
    let hosts: Vec<&str> = cfg.members.iter().map(|m| m.host.as_str()).collect();
    format!(
        "mongodb://{}/?replicaSet={}{}",
        hosts.join(","),
        set,
        ctx.members.uri_options()
    )
}

/// What a failed reconcile means: observe again after [`requeue::AFTER_ERROR`]. (A refused
/// step is planned afresh from a new observation; an unanswered one too, since its outcome is
/// unknown.) The failure was already reported by the reconcile's event.
pub fn error_policy<S, M>(_set: &SetState, error: &ReconcileError, _ctx: &Context<S, M>) -> Action {
    match error {
        ReconcileError::Step { .. } | ReconcileError::Fenced { .. } => {
            Action::requeue(requeue::AFTER_ERROR)
        }
    }
}

/// A failed write as leader: reported; `Err` when the store refused it because this process
/// no longer leads (the caller stops acting), `Ok` for any other failure (tried again at the
/// next reconcile).
fn write_failed(
    set: &str,
    what: &'static str,
    error: BackendError,
    config: &ControllerConfig,
) -> Result<(), BackendError> {
    if matches!(error, BackendError::Fenced { .. }) {
        WriteFenced {
            set,
            what,
            error: &error,
        }
        .emit(&config.metrics);
        return Err(error);
    }
    PublishFailed {
        set,
        what,
        error: &error,
    }
    .emit(&config.metrics);
    Ok(())
}

/// `<prefix>/replsets/<set>/uri` and `/status`, written when they change, each conditional
/// on still leading; `Err` when the store refused one for that.
async fn publish_outputs<S: Coordinator, M: ReplSetClient>(
    set: &mut SetState,
    ctx: &Context<S, M>,
    fence: &Fence,
    observed: &Observed,
    plan: &Plan,
) -> Result<(), BackendError> {
    let config = &ctx.config;
    let now = backend_core::unix_seconds();
    record_identity(set, ctx, fence, observed).await?;
    let status = if let Some(cfg) = &observed.observation.config {
        publish_uri(set, ctx, fence, cfg).await?;
        let mut status =
            crate::status::build(&set.set, observed, plan, &set.last_step, &set.last_error);
        status.observed_at = Some(now);
        status.records_gone = set.records_gone(cfg, now);
        status
    } else if matches!(plan.step, Step::Blocked(_)) || !observed.access_refused.is_empty() {
        // A refusal (by the planner, or by members of the reconciler's login) is the news.
        crate::status::build(&set.set, observed, plan, &set.last_step, &set.last_error)
    } else {
        // Nothing of the set could be seen (no member answered, or no record names one): the
        // last status stays, as what was last seen, marked failed and not converged, so that
        // monitoring and `scale` do not take it for the set's state now.
        let last = match &set.published_status {
            Some(last) => Some(last.clone()),
            None => crate::status::read(&*ctx.store, &config.layout, &set.set)
                .await
                .ok()
                .flatten(),
        };
        let Some(last) = last else { return Ok(()) };
        crate::status::failed(last, plan)
    };
    let due = match &set.published_status {
        None => true,
        // Rewritten when it changed, and at least every resync so that its `observed_at`
        // tells readers it is current.
        Some(published) => {
            !published.same_but_observed_at(&status)
                || status
                    .observed_at
                    .zip(published.observed_at)
                    .is_some_and(|(new, old)| new.saturating_sub(old) >= config.resync.as_secs())
        }
    };
    if due {
        match ctx
            .store
            .put_value_fenced(
                fence,
                &config.layout.replset_status_key(&set.set),
                status.to_json(),
            )
            .await
        {
            Ok(()) => set.published_status = Some(status),
            Err(error) => write_failed(&set.set, "status", error, config)?,
        }
    }
    Ok(())
}

/// `<prefix>/replsets/<set>/identity`, written when a primary's committed config has another
/// replica set id, version or term than the store remembers.
async fn record_identity<S: Coordinator, M>(
    set: &mut SetState,
    ctx: &Context<S, M>,
    fence: &Fence,
    observed: &Observed,
) -> Result<(), BackendError> {
    let obs = &observed.observation;
    let (Some(cfg), Some(_)) = (&obs.config, obs.primary) else {
        return Ok(());
    };
    let Some(replica_set_id) = &cfg.replica_set_id else {
        return Ok(());
    };
    if !obs.committed {
        return Ok(());
    }
    let identity = SetIdentity {
        schema_version: IDENTITY_SCHEMA_VERSION,
        set: set.set.clone(),
        replica_set_id: replica_set_id.clone(),
        config_version: cfg.version,
        config_term: cfg.term,
        members: cfg
            .members
            .iter()
            .map(|m| IdentityMember {
                id: m.id,
                host: m.host.clone(),
                voter: m.is_voter(),
            })
            .collect(),
        commit_point: set
            .committed_seen()
            .filter(|c| &c.replica_set_id == replica_set_id)
            .map(|c| c.optime.into()),
    };
    let same_config = match &set.known {
        KnownSet::Known(known) => {
            SetIdentity {
                commit_point: known.commit_point,
                ..identity.clone()
            } == *known
        }
        _ => false,
    };
    if same_config {
        let unchanged =
            matches!(&set.known, KnownSet::Known(k) if k.commit_point == identity.commit_point);
        let recently = set
            .identity_written_at
            .is_some_and(|t| t.elapsed() < COMMIT_POINT_EVERY);
        if unchanged || recently {
            return Ok(());
        }
    }
    let key = ctx.config.layout.replset_identity_key(&set.set);
    match ctx
        .store
        .put_value_fenced(fence, &key, identity.to_json())
        .await
    {
        Ok(()) => {
            IdentityRecorded {
                set: &set.set,
                identity: &identity,
                commit_point_only: same_config,
            }
            .emit(&ctx.config.metrics);
            set.known = KnownSet::Known(identity);
            set.identity_written_at = Some(Instant::now());
        }
        Err(error) => write_failed(&set.set, "identity", error, &ctx.config)?,
    }
    Ok(())
}

/// `<prefix>/replsets/<set>/uri`, from the config's hosts, when it changes.
async fn publish_uri<S: Coordinator, M: ReplSetClient>(
    set: &mut SetState,
    ctx: &Context<S, M>,
    fence: &Fence,
    cfg: &crate::model::ConfigView,
) -> Result<(), BackendError> {
    let config = &ctx.config;
    let uri = uri_of(&set.set, ctx, cfg);
    if set.published_uri.as_ref() != Some(&uri) {
        match ctx
            .store
            .put_value_fenced(
                fence,
                &config.layout.replset_uri_key(&set.set),
                uri.clone().into_bytes(),
            )
            .await
        {
            Ok(()) => {
                UriPublished {
                    set: &set.set,
                    uri: &uri,
                }
                .emit(&config.metrics);
                set.published_uri = Some(uri);
            }
            Err(error) => write_failed(&set.set, "uri", error, config)?,
        }
    }
    Ok(())
}
