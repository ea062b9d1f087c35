//! What the reconciler knows: the replica set as observed, and the members the records ask for.

use std::collections::BTreeMap;

/// MongoDB's limits (`repl_set_config.h`): at most 50 members, at most 7 voting.
pub const MAX_MEMBERS: usize = 50;
pub const MAX_VOTERS: usize = 7;

/// One member of a replica-set config, as far as the reconciler manages it. Every other field
/// of the real config document is kept as it is by the code that applies a change.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberConfig {
    pub id: i64,
    pub host: String,
    pub votes: u8,
    pub priority: f64,
    pub arbiter_only: bool,
    pub hidden: bool,
    /// Set by the primary on a voting member it just added until that member caught up
    /// (MongoDB 5.0+); such a member does not count as a voter yet.
    pub newly_added: bool,
}

impl MemberConfig {
    /// A new member as the reconciler adds it: no vote, priority 0.
    pub fn new_non_voter(id: i64, host: &str) -> MemberConfig {
        MemberConfig {
            id,
            host: host.to_string(),
            votes: 0,
            priority: 0.0,
            arbiter_only: false,
            hidden: false,
            newly_added: false,
        }
    }

    /// Whether it votes (by its configured votes, as MongoDB's single-voter-change check
    /// counts them).
    pub fn is_voter(&self) -> bool {
        self.votes > 0
    }
}

/// The config read from the primary (`replSetGetConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigView {
    pub set_name: String,
    pub version: i64,
    pub term: i64,
    /// `settings.replicaSetId` (24 hex digits), made by `replSetInitiate` and kept by every
    /// reconfig: it tells this set from any other of the same name.
    pub replica_set_id: Option<String>,
    pub members: Vec<MemberConfig>,
}

impl ConfigView {
    pub fn member(&self, id: i64) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn voters(&self) -> impl Iterator<Item = &MemberConfig> {
        self.members.iter().filter(|m| m.is_voter())
    }

    pub fn voter_count(&self) -> usize {
        self.voters().count()
    }

    /// Whether this config is newer than `other` by MongoDB's order of configs (term, then
    /// version; by version alone when either was installed by force).
    pub fn is_newer_than(&self, other: &ConfigView) -> bool {
        backend_core::config_order(self.version, self.term, other.version, other.term)
            == std::cmp::Ordering::Greater
    }
}

/// A position in the oplog: the term, then the timestamp (`{t, ts}` of an oplog entry), as
/// an election compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OpTime {
    pub term: i64,
    /// `ts` as (seconds, increment).
    pub ts: (u32, u32),
}

impl From<backend_core::CommitPoint> for OpTime {
    fn from(c: backend_core::CommitPoint) -> OpTime {
        OpTime {
            term: c.term,
            ts: (c.ts, c.inc),
        }
    }
}

impl From<OpTime> for backend_core::CommitPoint {
    fn from(o: OpTime) -> backend_core::CommitPoint {
        backend_core::CommitPoint {
            term: o.term,
            ts: o.ts.0,
            inc: o.ts.1,
        }
    }
}

/// The newest majority commit point seen of one replica set (by its `settings.replicaSetId`):
/// every write up to `optime` was acknowledged with `w: "majority"`, so a majority of the
/// voters held it. A member whose data stops short of it may lack acknowledged writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub replica_set_id: String,
    pub optime: OpTime,
}

impl Committed {
    /// The newer of two commit points of the same set; a commit point of another set (a new
    /// one, after `forget-set`) replaces the old.
    pub fn newest(old: Option<Committed>, new: Option<Committed>) -> Option<Committed> {
        match (old, new) {
            (Some(o), Some(n)) if o.replica_set_id == n.replica_set_id && o.optime > n.optime => {
                Some(o)
            }
            (o, None) => o,
            (_, n) => n,
        }
    }

    /// What the store's identity remembers, if anything.
    pub fn of_identity(identity: &backend_core::SetIdentity) -> Option<Committed> {
        identity.commit_point.map(|c| Committed {
            replica_set_id: identity.replica_set_id.clone(),
            optime: c.into(),
        })
    }
}

/// What a member that answered with a config of its own holds, read while the set has no
/// primary: the config it has kept (it may not find itself in it: REMOVED) and its newest
/// oplog entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Persisted {
    pub config: ConfigView,
    /// The member's state: REMOVED when it did not find itself in its config.
    pub removed: bool,
    /// Its last applied optime (the newest entry of `local.oplog.rs`), when it could be read.
    pub last_optime: Option<OpTime>,
}

/// A member's state as `replSetGetStatus` reports it (`stateStr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Primary,
    Secondary,
    Recovering,
    Startup,
    Startup2,
    Arbiter,
    Down,
    Rollback,
    Removed,
    Unknown,
}

impl MemberState {
    /// From `replSetGetStatus`'s numeric `state` (MongoDB's `MemberState`).
    pub fn from_code(code: i32) -> MemberState {
        match code {
            0 => MemberState::Startup,
            1 => MemberState::Primary,
            2 => MemberState::Secondary,
            3 => MemberState::Recovering,
            5 => MemberState::Startup2,
            7 => MemberState::Arbiter,
            8 => MemberState::Down,
            9 => MemberState::Rollback,
            10 => MemberState::Removed,
            _ => MemberState::Unknown,
        }
    }

    /// A member that holds the data and can vote usefully: PRIMARY or SECONDARY.
    pub fn is_data_bearing_and_caught_up(self) -> bool {
        matches!(self, MemberState::Primary | MemberState::Secondary)
    }
}

/// One member's health as seen by the member the reconciler asked (the primary when there is
/// one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// `health: 1`: the member answers heartbeats.
    pub healthy: bool,
    pub state: MemberState,
}

/// What one observation of the set found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observation {
    /// For each desired host that answered `hello`: the `setName` it reports, if any.
    pub hello: BTreeMap<String, Option<String>>,
    /// The config, read from the primary; `None` when no primary was found or the set is not
    /// initiated.
    pub config: Option<ConfigView>,
    /// `replSetGetConfig {commitmentStatus: true}`: whether that config is committed.
    pub committed: bool,
    /// The `_id` of the primary, when there is one.
    pub primary: Option<i64>,
    /// Health by member `_id`, from `replSetGetStatus` (of the primary, or of any member when
    /// there is no primary).
    pub status: BTreeMap<i64, MemberStatus>,
    /// The primary's majority commit point (`replSetGetStatus`'s
    /// `optimes.lastCommittedOpTime`), when there is a primary.
    pub commit_point: Option<OpTime>,
    /// For each desired host that holds a config of its own, that config and its last optime:
    /// every such host while there is no primary (for re-addressing, safety rule 11), else
    /// those outside the set (a replaced task that came back with its data).
    pub persisted: BTreeMap<String, Persisted>,
    /// Desired hosts that answered that they have no config at all (MongoDB's
    /// `NotYetInitialized`, 94): an empty dbpath.
    pub empty: std::collections::BTreeSet<String>,
}

impl Observation {
    /// Whether the set sees member `id` up: it is the primary, or `replSetGetStatus` says it
    /// answers heartbeats (`health: 1`, whatever its state: PRIMARY, SECONDARY, or still
    /// syncing). Such a member is never moved to another host, and a record naming another
    /// host for its slot is not followed (safety rule 13).
    pub fn is_up(&self, id: i64) -> bool {
        self.primary == Some(id) || self.status.get(&id).is_some_and(|s| s.healthy)
    }

    /// The members of the config that the set sees up ([`Observation::is_up`]), `_id` to host;
    /// empty when no config was read.
    pub fn members_up(&self) -> BTreeMap<i64, String> {
        self.config
            .iter()
            .flat_map(|c| &c.members)
            .filter(|m| self.is_up(m.id))
            .map(|m| (m.id, m.host.clone()))
            .collect()
    }
}

/// The members the records ask for: `_id` (the task slot) to `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub members: BTreeMap<i64, String>,
}

/// How many voters a set of `members` members should have: every member up to 7, one fewer
/// when that would be even (an even number of voters tolerates no more failures than one
/// fewer), except for two: two members keep both votes.
///
/// One voter of two would make its disk the only place a majority-committed write has to be:
/// a set of three that lost a member for longer than the removal grace would run on one copy,
/// and losing that node then loses acknowledged writes (or, as the reconciler refuses that,
/// the set). Two voters put every `w: "majority"` write on both, as a set of three voters with
/// one down does in MongoDB itself; what they give up, an election while either is down, one
/// voter of two does not have either when its voter is the one down. Found by the
/// fault-injection run (docs/reliability.md, finding 4).
pub fn target_voters(members: usize) -> usize {
    let n = members.min(MAX_VOTERS);
    if n % 2 == 0 && n > 2 {
        n - 1
    } else {
        n
    }
}

/// The majority of `voters`.
pub fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voter_targets() {
        let got: Vec<usize> = (0..=9).map(target_voters).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 3, 5, 5, 7, 7, 7]);
    }

    #[test]
    fn members_up_are_the_primary_and_those_with_health() {
        let member = |id: i64| MemberConfig::new_non_voter(id, &format!("10.0.0.{id}:27017"));
        let status = |healthy, state| MemberStatus { healthy, state };
        let obs = Observation {
            config: Some(ConfigView {
                set_name: "rs0".into(),
                version: 1,
                term: 1,
                replica_set_id: None,
                members: (1..=5).map(member).collect(),
            }),
            primary: Some(1),
            status: BTreeMap::from([
                (2, status(true, MemberState::Secondary)),
                (3, status(true, MemberState::Startup2)),
                (4, status(false, MemberState::Down)),
            ]),
            ..Observation::default()
        };
        let up: Vec<i64> = obs.members_up().into_keys().collect();
        assert_eq!(up, vec![1, 2, 3]);
        assert_eq!(obs.members_up()[&2], "10.0.0.2:27017");
        assert!(!obs.is_up(5), "a member without a status is not seen up");
        assert!(Observation::default().members_up().is_empty());
    }

    #[test]
    fn majorities() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(7), 4);
    }
}
