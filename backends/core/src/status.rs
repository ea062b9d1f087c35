//! The replica set's status document, `<prefix>/replsets/<set>/status`: a public contract,
//! documented in `docs/key-layout.md`.
//!
//! The reconciler's leader writes it; `replset-reconciler status` and `scale`, the tests and
//! monitoring read it. "Converged with n members" is decided here, by
//! [`ReplSetStatus::converged_with`], and nowhere else.
//!
//! Versions: documents written before [`STATUS_SCHEMA_VERSION`] 2 carry no `schema_version`
//! and a `next` that is a Rust `Debug` string (`"Wait(CatchingUp { ids: [4] })"`); they still
//! decode, with `next` mapped to a [`NextStep`] as far as that string tells.

use serde::{Deserialize, Deserializer, Serialize};

/// The version of the status document written in its `schema_version`.
///
/// 1 (no field): `next` was a string. 2: `next` is a [`NextStep`] object.
pub const STATUS_SCHEMA_VERSION: u32 = 2;

/// What the reconciler last saw of a replica set and what it will do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplSetStatus {
    /// [`STATUS_SCHEMA_VERSION`]; 1 when absent (documents of earlier releases).
    #[serde(default = "legacy_version")]
    pub schema_version: u32,
    /// The replica set's name.
    pub set: String,
    /// The version of the config the members were read from.
    pub config_version: i64,
    /// `host:port` of the primary, if there is one.
    pub primary: Option<String>,
    /// The members of that config, in its order.
    pub members: Vec<StatusMember>,
    /// The planner has nothing to do (with the odd-voter rule, a set of 4 is converged with 3
    /// voters).
    pub converged: bool,
    /// The next step, or why the reconciler waits or is blocked.
    #[serde(deserialize_with = "next_step")]
    pub next: NextStep,
    /// The last step the server accepted, for people.
    #[serde(default)]
    pub last_step: String,
    /// The last error (a refused step with the server's code, or a reason to stop), or empty.
    #[serde(default)]
    pub last_error: String,
    /// When the config and members above were observed, in seconds since the Unix epoch
    /// (absent in documents of earlier releases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<u64>,
    /// Why the last reconcile could not observe the set (no member answered), or empty: the
    /// fields above are then what was last seen, at `observed_at`, and `converged` is false.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Members of the config whose record is gone, and since when by the leader's clock: a
    /// removal follows once the grace has passed (`plan` shows the time left).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records_gone: Vec<RecordGone>,
}

/// A member of the config whose record is gone ([`ReplSetStatus::records_gone`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordGone {
    #[serde(rename = "_id")]
    pub id: i64,
    pub host: String,
    /// Seconds since the Unix epoch.
    pub since: u64,
}

/// Why a status cannot be taken as the set's state now ([`ReplSetStatus::problem`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusProblem {
    /// The last reconcile could not observe the set.
    Failed { error: String },
    /// The last observation is older than the reader accepts.
    Stale { age_secs: u64, max_age_secs: u64 },
}

impl std::fmt::Display for StatusProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusProblem::Failed { error } => {
                write!(f, "the reconciler could not observe the set: {error}")
            }
            StatusProblem::Stale {
                age_secs,
                max_age_secs,
            } => write!(
                f,
                "observed {age_secs} s ago, more than {max_age_secs} s: is a replset-reconciler leading?"
            ),
        }
    }
}

/// Seconds since the Unix epoch, now (0 before it).
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One member as the status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusMember {
    /// The member's `_id` (the swarm slot).
    #[serde(rename = "_id")]
    pub id: i64,
    pub host: String,
    pub votes: u32,
    pub priority: f64,
    /// `replSetGetStatus`'s `health: 1`, if the member was seen at all.
    pub healthy: Option<bool>,
    /// `PRIMARY`, `SECONDARY`, `STARTUP2`, `DOWN`, ..., if the member was seen at all.
    pub state: Option<String>,
}

/// What kind of step comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NextKind {
    /// Nothing to do.
    Converged,
    /// `replSetInitiate`.
    Initiate,
    /// One `replSetReconfig`; `reason` names the change (`add`, `grant_vote`, `revoke_vote`,
    /// `move_host`, `remove`).
    Reconfig,
    /// A forced reconfig (`--allow-force`).
    ForceReconfig,
    /// Waiting for the set or the store; `reason` says for what (`no_primary`, `catching_up`,
    /// `removal_grace`, `records_not_trusted`, ...).
    Wait,
    /// Cannot act without an operator; `reason` says why (`lost_majority`, `wrong_set_name`,
    /// `too_many_members`, `removal_would_lose_majority`).
    Blocked,
    /// A status of schema version 1 whose `next` string could not be read.
    Unknown,
}

/// The next step of a [`ReplSetStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextStep {
    pub kind: NextKind,
    /// A machine-readable name in snake_case (see [`NextKind`]); empty when the kind says it
    /// all.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// For people: what the step does or what the operator should do.
    #[serde(default)]
    pub detail: String,
}

impl NextStep {
    pub fn new(kind: NextKind, reason: &str, detail: impl Into<String>) -> NextStep {
        NextStep {
            kind,
            reason: reason.to_string(),
            detail: detail.into(),
        }
    }

    /// Reads the `Debug` string that schema version 1 wrote (`"Converged"`,
    /// `"Wait(NoPrimary)"`, `"Blocked(LostMajority { healthy_voters: 1, voters: 3 })"`,
    /// `"Reconfig { change: Add { .. }, .. }"`).
    pub fn from_legacy(text: &str) -> NextStep {
        let head = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect()
        };
        let first = head(text);
        let inner = text
            .get(first.len()..)
            .and_then(|rest| rest.strip_prefix('('))
            .map(head)
            .unwrap_or_default();
        let (kind, reason) = match first.as_str() {
            "Converged" => (NextKind::Converged, String::new()),
            "Initiate" => (NextKind::Initiate, String::new()),
            "ForceReconfig" => (NextKind::ForceReconfig, String::new()),
            "Reconfig" => {
                let change = text
                    .split_once("change: ")
                    .map(|(_, rest)| head(rest))
                    .unwrap_or_default();
                (NextKind::Reconfig, snake_case(&change))
            }
            "Wait" => (NextKind::Wait, snake_case(&inner)),
            "Blocked" => (NextKind::Blocked, snake_case(&inner)),
            _ => (NextKind::Unknown, String::new()),
        };
        NextStep {
            kind,
            reason,
            detail: text.to_string(),
        }
    }
}

/// `LostMajority` -> `lost_majority`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn legacy_version() -> u32 {
    1
}

/// `next` as an object (version 2) or a `Debug` string (version 1).
fn next_step<'de, D: Deserializer<'de>>(d: D) -> Result<NextStep, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Typed(NextStep),
        Legacy(String),
    }
    Ok(match Repr::deserialize(d)? {
        Repr::Typed(n) => n,
        Repr::Legacy(s) => NextStep::from_legacy(&s),
    })
}

/// A status document that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusDecodeError {
    #[error("the replica-set status is not valid JSON of the expected shape: {0}")]
    Json(#[source] serde_json::Error),
    #[error("replica-set status schema_version {found} is newer than this program understands ({STATUS_SCHEMA_VERSION}); upgrade it")]
    TooNew { found: u32 },
}

impl ReplSetStatus {
    /// Decodes a status as the store holds it, of this schema version or an earlier one.
    pub fn from_json(bytes: &[u8]) -> Result<ReplSetStatus, StatusDecodeError> {
        let status: ReplSetStatus =
            serde_json::from_slice(bytes).map_err(StatusDecodeError::Json)?;
        if status.schema_version > STATUS_SCHEMA_VERSION {
            return Err(StatusDecodeError::TooNew {
                found: status.schema_version,
            });
        }
        Ok(status)
    }

    /// The JSON the reconciler writes.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, numbers and options: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// How many members vote.
    pub fn voters(&self) -> usize {
        self.members.iter().filter(|m| m.votes > 0).count()
    }

    /// Why this status is not the set's state at `now` (seconds since the epoch): the last
    /// reconcile failed to observe it, or its observation is older than `max_age`. A document
    /// of an earlier release, without `observed_at`, cannot be judged stale.
    pub fn problem(&self, now: u64, max_age: std::time::Duration) -> Option<StatusProblem> {
        if !self.error.is_empty() {
            return Some(StatusProblem::Failed {
                error: self.error.clone(),
            });
        }
        let age = now.saturating_sub(self.observed_at?);
        (age > max_age.as_secs()).then_some(StatusProblem::Stale {
            age_secs: age,
            max_age_secs: max_age.as_secs(),
        })
    }

    /// Equal but for when it was observed.
    pub fn same_but_observed_at(&self, other: &ReplSetStatus) -> bool {
        let mut a = self.clone();
        a.observed_at = other.observed_at;
        &a == other
    }

    /// The one meaning of "the set has converged with `n` members": the planner has nothing to
    /// do, there is a primary, the config has exactly `n` members and every one of them is
    /// healthy. (Converged implies the voters the planner wants: every member up to 7, an odd
    /// number.)
    pub fn converged_with(&self, n: usize) -> bool {
        self.converged
            && self.primary.is_some()
            && self.members.len() == n
            && self.members.iter().all(|m| m.healthy == Some(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: i64, healthy: Option<bool>) -> StatusMember {
        StatusMember {
            id,
            host: format!("10.0.0.{id}:27017"),
            votes: 1,
            priority: 1.0,
            healthy,
            state: Some("SECONDARY".into()),
        }
    }

    fn status(members: Vec<StatusMember>) -> ReplSetStatus {
        ReplSetStatus {
            schema_version: STATUS_SCHEMA_VERSION,
            set: "rs0".into(),
            config_version: 3,
            primary: Some("10.0.0.1:27017".into()),
            members,
            converged: true,
            next: NextStep::new(NextKind::Converged, "", "converged"),
            last_step: String::new(),
            last_error: String::new(),
            observed_at: Some(1_000),
            error: String::new(),
            records_gone: Vec::new(),
        }
    }

    #[test]
    fn a_failed_or_old_observation_is_a_problem() {
        let s = status(vec![member(1, Some(true))]);
        let max = std::time::Duration::from_secs(60);
        assert_eq!(s.problem(1_060, max), None);
        assert_eq!(
            s.problem(1_061, max),
            Some(StatusProblem::Stale {
                age_secs: 61,
                max_age_secs: 60
            })
        );
        let failed = ReplSetStatus {
            error: "no member answered".into(),
            converged: false,
            ..s.clone()
        };
        assert!(matches!(
            failed.problem(1_000, max),
            Some(StatusProblem::Failed { .. })
        ));
        let legacy = ReplSetStatus {
            observed_at: None,
            ..s.clone()
        };
        assert_eq!(legacy.problem(u64::MAX, max), None);
        let later = ReplSetStatus {
            observed_at: Some(2_000),
            ..s.clone()
        };
        assert!(later.same_but_observed_at(&s));
        assert!(!failed.same_but_observed_at(&s));
    }

    #[test]
    fn the_optional_fields_round_trip_and_are_left_out_when_empty() {
        let mut s = status(vec![member(1, Some(true))]);
        s.observed_at = None;
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).expect("json");
        for field in ["observed_at", "error", "records_gone"] {
            assert!(v.get(field).is_none(), "{field} in {v}");
        }
        s.observed_at = Some(7);
        s.error = "x".into();
        s.records_gone = vec![RecordGone {
            id: 3,
            host: "10.0.0.3:27017".into(),
            since: 5,
        }];
        let back = ReplSetStatus::from_json(&s.to_json()).expect("decodes");
        assert_eq!(back, s);
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).expect("json");
        assert_eq!(v["records_gone"][0]["_id"], 3);
    }

    #[test]
    fn converged_with_needs_the_count_a_primary_and_healthy_members() {
        let s = status(vec![member(1, Some(true)), member(2, Some(true))]);
        assert!(s.converged_with(2));
        assert!(!s.converged_with(3));
        let mut no_primary = s.clone();
        no_primary.primary = None;
        assert!(!no_primary.converged_with(2));
        let mut busy = s.clone();
        busy.converged = false;
        assert!(!busy.converged_with(2));
        let unhealthy = status(vec![member(1, Some(true)), member(2, None)]);
        assert!(!unhealthy.converged_with(2));
    }

    #[test]
    fn round_trips_and_refuses_a_newer_version() {
        let s = status(vec![member(1, Some(true))]);
        let json = s.to_json();
        assert_eq!(ReplSetStatus::from_json(&json).expect("decodes"), s);
        let mut v: serde_json::Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["next"]["kind"], "converged");
        assert_eq!(v["members"][0]["_id"], 1);
        v["schema_version"] = serde_json::json!(STATUS_SCHEMA_VERSION + 1);
        let err = ReplSetStatus::from_json(v.to_string().as_bytes()).expect_err("too new");
        assert!(matches!(err, StatusDecodeError::TooNew { .. }), "{err}");
    }

    #[test]
    fn reads_a_version_1_document() {
        let old = r#"{"set":"rs0","config_version":5,"primary":null,"members":[{"_id":1,"host":"10.0.1.5:27017","votes":1,"priority":1.0,"healthy":false,"state":"DOWN"}],"converged":false,"next":"Blocked(LostMajority { healthy_voters: 1, voters: 3 })","last_step":"","last_error":"x"}"#;
        let s = ReplSetStatus::from_json(old.as_bytes()).expect("decodes");
        assert_eq!(s.schema_version, 1);
        assert_eq!(s.next.kind, NextKind::Blocked);
        assert_eq!(s.next.reason, "lost_majority");
        assert!(!s.converged_with(1));
        let add = NextStep::from_legacy(
            "Reconfig { change: GrantVote { id: 4 }, config: ConfigView { .. } }",
        );
        assert_eq!(
            (add.kind, add.reason.as_str()),
            (NextKind::Reconfig, "grant_vote")
        );
        assert_eq!(
            NextStep::from_legacy("Wait(NoPrimary)").reason,
            "no_primary"
        );
        assert_eq!(NextStep::from_legacy("Converged").kind, NextKind::Converged);
        assert_eq!(NextStep::from_legacy("?").kind, NextKind::Unknown);
    }
}
