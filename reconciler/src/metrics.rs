//! The reconciler's metrics and health, served by `ops-http` on `--metrics-addr`.
//!
//! Every counter here is incremented by exactly one internal event of [`crate::events`], which
//! also writes the decision's log line: what is logged is counted, and the other way round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub set: String,
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub set: String,
    pub step: &'static str,
    /// The server's error code, or `none` for no answer.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetLabels {
    pub set: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The kind of refusal ([`crate::records::Refusal::kind`]): `slot_held`, `bad_address`, ...
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub set: String,
    /// `no_primary`, `lost_majority`, `healthy_without_record`, `uri`, ...
    pub reason: &'static str,
}

/// What the reconciler counts.
#[derive(Debug)]
pub struct Metrics {
    /// Steps the server accepted, by kind (initiate, add, grant_vote, revoke_vote, move_host,
    /// remove, force_reconfig, readdress).
    pub steps_applied: Family<StepLabels, Counter>,
    /// Steps refused by the server (by code) or left without an answer.
    pub steps_refused: Family<RefusedLabels, Counter>,
    /// `--dry-run`: steps that would have been applied, by kind (as `steps_applied`).
    pub steps_dry_run: Family<StepLabels, Counter>,
    /// From the first step after a converged state to converged again.
    pub converge_seconds: Histogram,
    /// Reconciles that waited, by reason (`no_primary`, `catching_up`, `removal_grace`,
    /// `records_not_trusted`, ...).
    pub waits: Family<ReasonLabels, Counter>,
    /// Reconciles that could not act without an operator, by reason (`lost_majority`, ...).
    pub blocked: Family<ReasonLabels, Counter>,
    /// Members and records that disagree, by kind of disagreement.
    pub disagreements: Family<ReasonLabels, Counter>,
    /// Times this process became the leader of a set.
    pub leadership_gained: Family<SetLabels, Counter>,
    /// Times this process lost the leadership of a set (not counting resigning at shutdown).
    pub leadership_lost: Family<SetLabels, Counter>,
    /// Campaigns that failed (the store refused or did not answer).
    pub campaign_failures: Family<SetLabels, Counter>,
    /// Steps not sent because the leadership had less time surely left than one step can
    /// take (the lease was not renewed in time).
    pub steps_withheld: Family<SetLabels, Counter>,
    /// Writes as leader that the store refused because this process no longer held the
    /// leader key (the leadership was then dropped).
    pub writes_fenced: Family<SetLabels, Counter>,
    /// Writes of the status or the connection string that failed (`reason`: `uri`, `status`).
    pub publish_failures: Family<ReasonLabels, Counter>,
    /// Reads of the set's identity (`replsets/<set>/identity`) that failed or found a value
    /// that is not one; until one succeeds, nothing is initiated.
    pub identity_unreadable: Family<SetLabels, Counter>,
    /// Times the set's identity was written (a new set, or a new config version or term).
    pub identity_recorded: Family<SetLabels, Counter>,
    /// Members that refused the reconciler's login or a command for lack of a role (each
    /// member and error counted once, until it is accepted again).
    pub access_refused: Family<SetLabels, Counter>,
    /// Times the watch of the records broke (until it lists again, nothing is removed).
    pub watch_broken: Counter,
    /// Complete listings of the records (the first, and one after every broken watch).
    pub records_listed: Counter,
    /// Values under `<prefix>/services/` that were not followed, by kind of refusal
    /// (`undecodable`, `slot_out_of_range`, `no_port`, `bad_address`, `slot_held`, ...); each
    /// key counts once while it stays refused for the same reason.
    pub records_ignored: Family<RefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            steps_applied: Family::default(),
            steps_refused: Family::default(),
            steps_dry_run: Family::default(),
            // 100 ms to about 30 min.
            converge_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 15)),
            waits: Family::default(),
            blocked: Family::default(),
            disagreements: Family::default(),
            leadership_gained: Family::default(),
            leadership_lost: Family::default(),
            campaign_failures: Family::default(),
            steps_withheld: Family::default(),
            writes_fenced: Family::default(),
            publish_failures: Family::default(),
            identity_unreadable: Family::default(),
            identity_recorded: Family::default(),
            access_refused: Family::default(),
            watch_broken: Counter::default(),
            records_listed: Counter::default(),
            records_ignored: Family::default(),
        }
    }
}

impl Metrics {
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("replset_reconciler");
        r.register(
            "steps_applied",
            "Steps the server accepted",
            self.steps_applied.clone(),
        );
        r.register(
            "steps_dry_run",
            "Steps a --dry-run instance would have applied",
            self.steps_dry_run.clone(),
        );
        r.register(
            "steps_refused",
            "Steps the server refused (by code) or did not answer",
            self.steps_refused.clone(),
        );
        r.register(
            "converge_seconds",
            "Time from the first step after convergence to convergence",
            self.converge_seconds.clone(),
        );
        r.register(
            "waits",
            "Reconciles that waited, by reason",
            self.waits.clone(),
        );
        r.register(
            "blocked",
            "Reconciles that could not act without an operator, by reason",
            self.blocked.clone(),
        );
        r.register(
            "disagreements",
            "Members and records that disagree, by kind",
            self.disagreements.clone(),
        );
        r.register(
            "steps_withheld",
            "Steps not sent because the leadership had less time left than a step can take",
            self.steps_withheld.clone(),
        );
        r.register(
            "writes_fenced",
            "Writes as leader the store refused: this process no longer held the leader key",
            self.writes_fenced.clone(),
        );
        r.register(
            "leadership_gained",
            "Times this process became a set's leader",
            self.leadership_gained.clone(),
        );
        r.register(
            "leadership_lost",
            "Times this process lost a set's leadership",
            self.leadership_lost.clone(),
        );
        r.register(
            "identity_unreadable",
            "Reads of the set's remembered identity that failed (nothing is initiated meanwhile)",
            self.identity_unreadable.clone(),
        );
        r.register(
            "identity_recorded",
            "Writes of the set's remembered identity (replica set id, config version and term)",
            self.identity_recorded.clone(),
        );
        r.register(
            "access_refused",
            "Members that refused the reconciler's login or a command for lack of a role",
            self.access_refused.clone(),
        );
        r.register(
            "campaign_failures",
            "Campaigns for a set's leadership that failed",
            self.campaign_failures.clone(),
        );
        r.register(
            "publish_failures",
            "Failed writes of a set's status or connection string",
            self.publish_failures.clone(),
        );
        r.register(
            "watch_broken",
            "Times the watch of the records broke",
            self.watch_broken.clone(),
        );
        r.register(
            "records_listed",
            "Complete listings of the records",
            self.records_listed.clone(),
        );
        r.register(
            "records_ignored",
            "Values in the store that were not followed, by kind of refusal",
            self.records_ignored.clone(),
        );
    }
}

/// `/healthz`: healthy while the records' watch is connected.
#[derive(Debug, Default)]
pub struct Health {
    pub watch_connected: AtomicBool,
}

impl Health {
    pub fn check(&self) -> Result<(), String> {
        if self.watch_connected.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the watch of the records is not connected".into())
        }
    }
}
