//! The reconciler's decisions as internal events, in the way of vector's `internal_events`: one
//! type per decision, whose [`InternalEvent::emit`] writes its one structured log line and
//! increments its counter in [`Metrics`], in one place. Code that decides emits an event; it
//! never logs or counts on its own. Tests assert on the counters, never on log text.

use std::time::Duration;

use backend_core::BackendError;

use crate::metrics::{Metrics, ReasonLabels, RefusalLabels, RefusedLabels, SetLabels, StepLabels};
use crate::mongo::MongoError;
use crate::plan::{Blocked, Note, Step, Wait};
use crate::records::Refusal;

/// A decision: logs and counts.
pub trait InternalEvent {
    fn emit(self, metrics: &Metrics);
}

fn set_labels(set: &str) -> SetLabels {
    SetLabels {
        set: set.to_string(),
    }
}

fn reason_labels(set: &str, reason: &'static str) -> ReasonLabels {
    ReasonLabels {
        set: set.to_string(),
        reason,
    }
}

/// The watch delivered the complete records (its first snapshot, or a re-list).
#[derive(Debug)]
pub struct RecordsListed {
    pub entries: usize,
}

impl InternalEvent for RecordsListed {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            entries = self.entries,
            "listed the records; removals follow them again"
        );
        metrics.records_listed.inc();
    }
}

/// The watch of the records broke: until it lists again, no absence means anything.
#[derive(Debug)]
pub struct WatchBroken<'a> {
    pub error: &'a BackendError,
}

impl InternalEvent for WatchBroken<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(error = %self.error, "the records' watch broke; removing nothing until it is back");
        metrics.watch_broken.inc();
    }
}

/// A value in the store is not followed (rule 13: only records a bridge could have written,
/// and none that takes the slot of a live member). Emitted once per key while the refusal
/// lasts. The key is logged escaped (`?`): it is the store's, not this program's.
#[derive(Debug)]
pub struct RecordIgnored<'a> {
    pub key: &'a str,
    pub refusal: &'a Refusal,
}

impl InternalEvent for RecordIgnored<'_> {
    fn emit(self, metrics: &Metrics) {
        let reason = self.refusal.kind();
        tracing::warn!(key = ?self.key, reason, detail = %self.refusal, "not following a record");
        metrics
            .records_ignored
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }
}

/// A set's leader key was won.
#[derive(Debug)]
pub struct LeadershipGained<'a> {
    pub set: &'a str,
    pub holder: &'a str,
}

impl InternalEvent for LeadershipGained<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(set = %self.set, holder = %self.holder, "leading; reconciling");
        metrics
            .leadership_gained
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// A set's leadership was lost (the lease or session expired or was ended): acting stopped.
#[derive(Debug)]
pub struct LeadershipLost<'a> {
    pub set: &'a str,
    pub reason: &'a str,
}

impl InternalEvent for LeadershipLost<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, reason = %self.reason, "lost leadership; stopped acting");
        metrics
            .leadership_lost
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// A step was not sent: the leadership has less time surely left than one step can take
/// (its lease was not renewed in time), so the step could still be running when another
/// replica leads.
#[derive(Debug)]
pub struct StepWithheld<'a> {
    pub set: &'a str,
    pub step: &'a Step,
    pub valid_for: Duration,
    pub step_timeout: Duration,
}

impl InternalEvent for StepWithheld<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(
            set = %self.set,
            step = %self.step.describe(),
            valid_for_ms = self.valid_for.as_millis() as u64,
            step_timeout_ms = self.step_timeout.as_millis() as u64,
            "leadership may end before the step could finish; not acting"
        );
        metrics
            .steps_withheld
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// The store refused a write as leader: this process no longer holds the leader key.
#[derive(Debug)]
pub struct WriteFenced<'a> {
    pub set: &'a str,
    pub what: &'static str,
    pub error: &'a BackendError,
}

impl InternalEvent for WriteFenced<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, what = self.what, error = %self.error, "write as leader refused by the store; dropping leadership");
        metrics
            .writes_fenced
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// A campaign failed; it is tried again after `retry_in`.
#[derive(Debug)]
pub struct CampaignFailed<'a> {
    pub set: &'a str,
    pub error: &'a BackendError,
    pub retry_in: Duration,
}

impl InternalEvent for CampaignFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, error = %self.error, retry_in_ms = self.retry_in.as_millis() as u64, "campaign failed");
        metrics
            .campaign_failures
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// The server accepted a step.
#[derive(Debug)]
pub struct StepApplied<'a> {
    pub set: &'a str,
    pub step: &'a Step,
}

impl InternalEvent for StepApplied<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(set = %self.set, step = %self.step.describe(), kind = self.step.kind(), "applied");
        metrics
            .steps_applied
            .get_or_create(&StepLabels {
                set: self.set.to_string(),
                step: self.step.kind(),
            })
            .inc();
    }
}

/// The server refused a step, or did not answer (an unknown outcome: observe again, never
/// repeat blindly, rule 9).
#[derive(Debug)]
pub struct StepRefused<'a> {
    pub set: &'a str,
    pub step: &'a Step,
    pub error: &'a MongoError,
}

impl InternalEvent for StepRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        let describe = self.step.describe();
        match self.error.code() {
            None => {
                tracing::warn!(set = %self.set, step = %describe, error = %self.error, "outcome unknown; observing again")
            }
            Some(code) => {
                tracing::warn!(set = %self.set, step = %describe, code, error = %self.error, "the server refused the step")
            }
        }
        metrics
            .steps_refused
            .get_or_create(&RefusedLabels {
                set: self.set.to_string(),
                step: self.step.kind(),
                code: self
                    .error
                    .code()
                    .map_or_else(|| "none".to_string(), |c| c.to_string()),
            })
            .inc();
    }
}

/// `--dry-run`: the step that would be applied.
#[derive(Debug)]
pub struct WouldApply<'a> {
    pub set: &'a str,
    pub step: &'a Step,
}

impl InternalEvent for WouldApply<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(set = %self.set, step = %self.step.describe(), kind = self.step.kind(), "would apply (dry run)");
        metrics
            .steps_dry_run
            .get_or_create(&StepLabels {
                set: self.set.to_string(),
                step: self.step.kind(),
            })
            .inc();
    }
}

/// `--dry-run`: the connection string the leader would publish, once per change.
#[derive(Debug)]
pub struct WouldPublish<'a> {
    pub set: &'a str,
    pub uri: &'a str,
    pub converged: bool,
}

impl InternalEvent for WouldPublish<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::info!(set = %self.set, uri = %self.uri, converged = self.converged, "would publish (dry run)");
    }
}

/// The planner waits for the set or the store.
#[derive(Debug)]
pub struct Waiting<'a> {
    pub set: &'a str,
    pub wait: &'a Wait,
}

impl InternalEvent for Waiting<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(set = %self.set, reason = self.wait.reason(), detail = %self.wait, "waiting");
        metrics
            .waits
            .get_or_create(&reason_labels(self.set, self.wait.reason()))
            .inc();
    }
}

/// The planner cannot act without an operator.
#[derive(Debug)]
pub struct BlockedOnOperator<'a> {
    pub set: &'a str,
    pub blocked: &'a Blocked,
}

impl InternalEvent for BlockedOnOperator<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::error!(set = %self.set, reason = %self.blocked, "cannot act without an operator");
        metrics
            .blocked
            .get_or_create(&reason_labels(self.set, self.blocked.reason()))
            .inc();
    }
}

/// About to force a reconfig (`--allow-force`, after `--force-after` without a majority).
/// Counted as `steps_applied{step="force_reconfig"}` once the server accepts it.
#[derive(Debug)]
pub struct Forcing<'a> {
    pub set: &'a str,
    pub host: &'a str,
    pub dropped: &'a [i64],
}

impl InternalEvent for Forcing<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::error!(
            set = %self.set,
            host = %self.host,
            dropped = ?self.dropped,
            "FORCING a reconfig (--allow-force): the majority has been lost for longer than --force-after; writes only the dropped members had will be rolled back when they return"
        );
    }
}

/// About to re-address the set with force (safety rule 11): its members are back with their
/// data under new addresses. Counted as `steps_applied{step="readdress"}` once accepted.
#[derive(Debug)]
pub struct Readdressing<'a> {
    pub set: &'a str,
    pub host: &'a str,
    pub moved: &'a [(i64, String, String)],
}

impl InternalEvent for Readdressing<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::warn!(
            set = %self.set,
            host = %self.host,
            moved = ?self.moved,
            "RE-ADDRESSING with force: the members of the last config are back with their data under new addresses; installing that config with only their hosts changed on the present voter with the newest optime (a majority of the voters is present, so no committed write is lost)"
        );
    }
}

/// The store's memory of the set was written.
#[derive(Debug)]
pub struct IdentityRecorded<'a> {
    pub set: &'a str,
    pub identity: &'a backend_core::SetIdentity,
    /// Only the commit point advanced (logged at debug level: it does at every write).
    pub commit_point_only: bool,
}

impl InternalEvent for IdentityRecorded<'_> {
    fn emit(self, metrics: &Metrics) {
        let commit_point = self.identity.commit_point.map(|c| (c.term, c.ts, c.inc));
        if self.commit_point_only {
            tracing::debug!(set = %self.set, ?commit_point, "recorded the set's commit point");
        } else {
            tracing::info!(
                set = %self.set,
                replica_set_id = %self.identity.replica_set_id,
                config_version = self.identity.config_version,
                config_term = self.identity.config_term,
                ?commit_point,
                "recorded the set's identity"
            );
        }
        metrics
            .identity_recorded
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// The store's memory of the set could not be read: nothing is initiated until it can.
#[derive(Debug)]
pub struct IdentityUnreadable<'a> {
    pub set: &'a str,
    pub error: &'a dyn std::error::Error,
}

impl InternalEvent for IdentityUnreadable<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, error = %self.error, "cannot read the set's identity; not initiating until it can be read");
        metrics
            .identity_unreadable
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// A member refused the reconciler's credentials, or a command for lack of a role: reported
/// once per member and error, as an error (a wrong password or a missing user is an
/// operator's to fix, and the member is not "unreachable").
#[derive(Debug)]
pub struct AccessRefused<'a> {
    pub set: &'a str,
    pub host: &'a str,
    pub error: &'a str,
}

impl InternalEvent for AccessRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::error!(set = %self.set, host = %self.host, error = %self.error, "a member refused the reconciler's login or a command: it counts as not answering");
        metrics
            .access_refused
            .get_or_create(&set_labels(self.set))
            .inc();
    }
}

/// A member and its record disagree (kept and reported, rule 6).
#[derive(Debug)]
pub struct MemberRecordDisagree<'a> {
    pub set: &'a str,
    pub note: &'a Note,
}

impl InternalEvent for MemberRecordDisagree<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, note = ?self.note, "member and record disagree");
        metrics
            .disagreements
            .get_or_create(&reason_labels(self.set, self.note.reason()))
            .inc();
    }
}

/// The set converged after steps taken since `took` ago.
#[derive(Debug)]
pub struct SetConverged<'a> {
    pub set: &'a str,
    pub took: Duration,
}

impl InternalEvent for SetConverged<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::info!(set = %self.set, took_ms = self.took.as_millis() as u64, "converged");
        metrics.converge_seconds.observe(self.took.as_secs_f64());
    }
}

/// The connection string was written.
#[derive(Debug)]
pub struct UriPublished<'a> {
    pub set: &'a str,
    pub uri: &'a str,
}

impl InternalEvent for UriPublished<'_> {
    fn emit(self, _metrics: &Metrics) {
        tracing::info!(set = %self.set, uri = %self.uri, "published the connection string");
    }
}

/// Writing the connection string (`what = "uri"`) or the status (`"status"`) failed; it is
/// written again at the next reconcile.
#[derive(Debug)]
pub struct PublishFailed<'a> {
    pub set: &'a str,
    pub what: &'static str,
    pub error: &'a BackendError,
}

impl InternalEvent for PublishFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        tracing::warn!(set = %self.set, what = self.what, error = %self.error, "cannot publish");
        metrics
            .publish_failures
            .get_or_create(&reason_labels(self.set, self.what))
            .inc();
    }
}
