//! The run's report: faults by kind, the writes, the longest time without an acknowledged
//! write, per fault kind the time until majority writes succeeded again, and every violation
//! with the part of the history that shows it. Its last line is
//! `faults F, writes A acknowledged, L lost, U unsafe configs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use test_support::stack::{ConfigSeen, ConfigStep, Observed};

use crate::history::{self, Checked, Op, OpKind, Outcome};
use crate::schedule::{Planned, KINDS};

/// One fault as it ran.
#[derive(Debug, Clone)]
pub struct FaultRun {
    pub planned: Planned,
    /// When it started (unix ms, the clients' clock: the nodes share the host's).
    pub started_ms: u64,
    pub took: Duration,
    /// Its target, or why it could not be injected.
    pub outcome: Result<String, String>,
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub minutes: u64,
    pub faults: Vec<FaultRun>,
    pub healed: Vec<String>,
    /// How long the set took to equal the tasks after the heal, or why it did not.
    pub converged: Result<Duration, String>,
    pub ops: Vec<Op>,
    pub checked: Option<Checked>,
    /// Configs that changed more than one voter (hosts-only re-addressing excluded).
    pub unsafe_configs: Vec<ConfigStep>,
    /// Configs that changed hosts only (a forced re-addressing), counted apart.
    pub readdressed: usize,
    /// Each config seen, in (version, term) order.
    pub configs: Vec<ConfigSeen>,
    pub versions_missed: i64,
    pub two_primaries: Vec<(i64, BTreeSet<String>, Duration)>,
    pub longest_without_primary: Duration,
    /// The run could not be judged (no history, no final state).
    pub problems: Vec<String>,
}

impl Report {
    pub fn new(seed: u64, minutes: u64) -> Report {
        Report {
            seed,
            minutes,
            faults: Vec::new(),
            healed: Vec::new(),
            converged: Err("not checked".into()),
            ops: Vec::new(),
            checked: None,
            unsafe_configs: Vec::new(),
            readdressed: 0,
            configs: Vec::new(),
            versions_missed: 0,
            two_primaries: Vec::new(),
            longest_without_primary: Duration::ZERO,
            problems: Vec::new(),
        }
    }

    /// Takes what the poller saw: configs, primaries and terms.
    pub fn observed(&mut self, o: &Observed) {
        let steps = o.config_steps();
        self.readdressed = steps
            .iter()
            .filter(|s| s.hosts_only && !s.voters_changed.is_empty())
            .count();
        self.unsafe_configs = o
            .more_than_one_voter_changed()
            .into_iter()
            .filter(|s| !s.hosts_only)
            .collect();
        self.configs = o.configs.values().cloned().collect();
        self.versions_missed = o.versions_missed();
        self.two_primaries = o.primaries_sharing_a_term();
        self.longest_without_primary = o.longest_without_primary();
    }

    /// Judges the history against the final state.
    pub fn check(&mut self, final_state: &BTreeMap<String, Option<String>>) {
        self.checked = Some(history::check(&self.ops, final_state));
    }

    fn injected(&self) -> usize {
        self.faults.iter().filter(|f| f.outcome.is_ok()).count()
    }

    /// The writes by outcome, from the history alone.
    fn write_counts(&self) -> history::WriteCounts {
        let mut w = history::WriteCounts::default();
        for o in self.ops.iter().filter(|o| o.op == OpKind::Write) {
            match o.outcome {
                Outcome::Ok => w.acknowledged += 1,
                Outcome::Fail => w.failed += 1,
                Outcome::Info => w.indeterminate += 1,
            }
        }
        w
    }

    fn lost(&self) -> usize {
        self.checked.as_ref().map_or(0, Checked::lost)
    }

    /// No violation, and the run could be judged.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
            && self.converged.is_ok()
            && self.unsafe_configs.is_empty()
            && self.two_primaries.is_empty()
            && self
                .checked
                .as_ref()
                .is_some_and(|c| c.violations.is_empty())
    }

    /// The longest span between two acknowledged writes (any client), in ms, with when it
    /// began; the clients write all the time, so this bounds the time without a writable
    /// primary from above.
    fn longest_without_ack(&self) -> Option<(u64, u64)> {
        let mut acks: Vec<u64> = self
            .ops
            .iter()
            .filter(|o| o.op == OpKind::Write && o.outcome == Outcome::Ok)
            .map(|o| o.end_ms)
            .collect();
        acks.sort_unstable();
        // Up to the clients' last call: a set that never took writes again counts to the end.
        let end = self.ops.iter().map(|o| o.end_ms).max()?;
        acks.push(end);
        acks.windows(2)
            .map(|w| (w[1].saturating_sub(w[0]), w[0]))
            .max_by_key(|(gap, _)| *gap)
    }

    /// For a fault that started at `at` (unix ms): how long until a write invoked after it
    /// was acknowledged.
    fn recovery(&self, at: u64) -> Option<u64> {
        self.ops
            .iter()
            .filter(|o| o.op == OpKind::Write && o.outcome == Outcome::Ok && o.start_ms >= at)
            .map(|o| o.end_ms - at)
            .min()
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== replset-chaos seed {} ({} min) ==",
            self.seed, self.minutes
        );
        let _ = writeln!(s, "faults by kind (injected / could not be injected):");
        for kind in KINDS {
            let of_kind: Vec<&FaultRun> = self
                .faults
                .iter()
                .filter(|f| f.planned.fault.kind() == kind)
                .collect();
            if of_kind.is_empty() {
                continue;
            }
            let ok = of_kind.iter().filter(|f| f.outcome.is_ok()).count();
            let mut recoveries: Vec<u64> = of_kind
                .iter()
                .filter(|f| f.outcome.is_ok())
                .filter_map(|f| self.recovery(f.started_ms))
                .collect();
            recoveries.sort_unstable();
            let never = ok - recoveries.len();
            let rec = match recoveries.last() {
                Some(max) => format!(
                    "; majority writes again after median {:.1}s, max {:.1}s",
                    recoveries[(recoveries.len() - 1) / 2] as f64 / 1000.0,
                    *max as f64 / 1000.0
                ),
                None => String::new(),
            };
            let rec = if never > 0 {
                format!("{rec}; {never} never followed by an acknowledged write")
            } else {
                rec
            };
            let _ = writeln!(s, "  {kind:<16} {ok} / {}{rec}", of_kind.len() - ok);
        }
        let _ = writeln!(s, "faults in order:");
        for f in &self.faults {
            let what = match &f.outcome {
                Ok(target) => target.clone(),
                Err(e) => format!("NOT INJECTED: {e}"),
            };
            let _ = writeln!(
                s,
                "  at {:>6.1}s for {:>5.1}s  {}: {what}",
                f.planned.at.as_secs_f64(),
                f.took.as_secs_f64(),
                f.planned.fault
            );
        }
        for h in &self.healed {
            let _ = writeln!(s, "healed at the end: {h}");
        }
        match &self.converged {
            Ok(t) => {
                let _ = writeln!(
                    s,
                    "the set equalled the tasks, the URI the set, {:.1}s after the heal",
                    t.as_secs_f64()
                );
            }
            Err(e) => {
                let _ = writeln!(s, "VIOLATION: {e}");
            }
        }
        let w = self.write_counts();
        let applied = match &self.checked {
            Some(c) => format!("{} of them applied", c.writes.indeterminate_applied),
            None => "no final state to tell which were applied".into(),
        };
        let _ = writeln!(
            s,
            "writes: {} acknowledged, {} failed, {} indeterminate ({applied}); {} reads",
            w.acknowledged,
            w.failed,
            w.indeterminate,
            self.ops.iter().filter(|o| o.op == OpKind::Read).count()
        );
        if let Some((gap, _)) = self.longest_without_ack() {
            let _ = writeln!(
                s,
                "longest without an acknowledged write: {:.1}s; longest without a primary (poller): {:.1}s",
                gap as f64 / 1000.0,
                self.longest_without_primary.as_secs_f64()
            );
        }
        let _ = writeln!(
            s,
            "configs seen: {} ({} versions missed by the poller), {} re-addressings (hosts only)",
            self.configs.len(),
            self.versions_missed,
            self.readdressed
        );
        for c in &self.configs {
            let ids = |voting: bool| -> Vec<i64> {
                c.members
                    .iter()
                    .filter(|(_, (_, votes))| (*votes > 0) == voting)
                    .map(|(id, _)| *id)
                    .collect()
            };
            let _ = writeln!(
                s,
                "  version {} term {} at {:.1}s: voters {:?}, others {:?}",
                c.version,
                c.term,
                c.first_seen.as_secs_f64(),
                ids(true),
                ids(false)
            );
        }
        for step in &self.unsafe_configs {
            let _ = writeln!(
                s,
                "VIOLATION: config {} -> {} changed voters {:?}:\n    from {:?}\n    to   {:?}",
                step.from.version,
                step.to.version,
                step.voters_changed,
                step.from.members,
                step.to.members
            );
        }
        for (term, hosts, at) in &self.two_primaries {
            let _ = writeln!(
                s,
                "VIOLATION: two primaries in term {term}: {hosts:?} (seen {:.1}s into the run)",
                at.as_secs_f64()
            );
        }
        if let Some(c) = &self.checked {
            for v in &c.violations {
                let _ = writeln!(s, "VIOLATION: {v}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "NOT JUDGED: {p}");
        }
        let _ = write!(
            s,
            "faults {}, writes {} acknowledged, {} lost, {} unsafe configs",
            self.injected(),
            w.acknowledged,
            self.lost(),
            self.unsafe_configs.len()
        );
        s
    }
}
