//! The decision: from an observation of the set and the desired members, the one next step.
//!
//! Pure and deterministic, so it is tested without any server. The order of the checks is the
//! order of the safety rules of `docs/reconciler.md` ("Safety rules"):
//!
//! 1. never more than 50 members; never initiate a set that any member says it belongs to;
//! 2. only act on a config read from the primary, once it is committed;
//! 3. one change per step, and at most one voter added or removed by it;
//! 4. move a rescheduled member (same `_id`, new host) before anything else;
//! 5. remove only members whose record has been gone for the grace period *and* that the set
//!    sees down, never taking the voters below a majority;
//! 6. add new members with no vote, and give a vote only to a SECONDARY;
//! 7. keep at most 7 voters, an odd number where possible;
//! 8. never initiate a set the store remembers (rule 10 of the docs): refuse and say so;
//! 9. when the members of the last config are back with their data under new addresses and no
//!    primary can exist, re-address them with force, only with a majority of its voters
//!    present (rule 11 of the docs), and only when the newest of them reaches the last commit
//!    point seen: see [`readdress`];
//! 10. a voter moved onto data that stops short of the set's commit point (an empty volume,
//!     or one an earlier task left) loses its vote until it is SECONDARY again.

use std::collections::BTreeSet;
use std::time::Duration;

use backend_core::SetIdentity;

mod describe;
mod recovery;

use recovery::{initiate_or_wait, readdress};

use crate::model::{
    majority, target_voters, Committed, ConfigView, Desired, MemberConfig, MemberState,
    MemberStatus, Observation, OpTime, MAX_MEMBERS,
};

/// What the store remembers of the set (safety rule 10): whether a new set may be initiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownSet {
    /// The store could not be read (yet): never initiate.
    Unknown,
    /// The store remembers no such set: a new one may be initiated.
    New,
    /// The store remembers this set: never initiate a new one in its place.
    Known(SetIdentity),
}

/// What the planner needs besides the observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanContext {
    /// The replica set's name (`--replSet`).
    pub set_name: String,
    /// The watch has delivered its snapshot and the store is reachable: the records can be
    /// trusted to say which members are gone. While false, nothing is removed.
    pub records_trusted: bool,
    /// For members of the config without a record: how long their record has been gone.
    pub record_gone_for: std::collections::BTreeMap<i64, Duration>,
    pub removal_grace: Duration,
    /// `--allow-force --force-after <d>`: once the set has been without a majority for `d`,
    /// force a config of the members that are up. `None` (the default): never force.
    pub force_after: Option<Duration>,
    /// How long the set has been without a majority, as the loop observed it.
    pub majority_lost_for: Duration,
    /// What the store remembers of the set.
    pub known_set: KnownSet,
    /// The newest majority commit point seen of the set before this observation: by this
    /// leader, or by an earlier one (the store's identity). A member's data that stops short
    /// of it gets no vote and does not stand for the majority when re-addressing.
    pub committed: Option<Committed>,
}

/// One change to the config, applied to the primary's current config by a reconfig.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new member, with `votes: 0, priority: 0`.
    Add {
        id: i64,
        host: String,
    },
    /// `votes: 1, priority: 1` for a SECONDARY.
    GrantVote {
        id: i64,
    },
    /// `votes: 0, priority: 0`.
    RevokeVote {
        id: i64,
    },
    /// The task of this slot was rescheduled: new host, same `_id`. A voter loses its vote in
    /// the same change (it is a fresh mongod until it has synced) unless it is the only voter.
    MoveHost {
        id: i64,
        from: String,
        to: String,
        revoke_vote: bool,
    },
    Remove {
        id: i64,
        host: String,
    },
}

/// Why the planner waits; the loop observes again later.
#[derive(Debug, Clone, PartialEq)]
pub enum Wait {
    /// The records name no member.
    NoRecords,
    /// No desired member answered `hello`.
    Unreachable { hosts: Vec<String> },
    /// No primary (an election is running, or the set was just initiated).
    NoPrimary,
    /// The current config is not committed yet (MongoDB would answer 308).
    ConfigNotCommitted { version: i64 },
    /// A member to remove is still within its grace period.
    RemovalGrace { id: i64, remaining: Duration },
    /// The store has not delivered its snapshot or is unreachable: members are not removed.
    RecordsNotTrusted,
    /// A desired host is still used by another member of the config.
    HostInUse { id: i64, host: String, by: i64 },
    /// Members without a vote that should get one are not SECONDARY yet.
    CatchingUp { ids: Vec<i64> },
    /// What the store remembers of the set could not be read: nothing is initiated until it
    /// can be.
    IdentityUnknown,
    /// Re-addressing needs the last optime of this member, which it did not give.
    OptimeUnknown { host: String },
}

/// Why the planner cannot act without an operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Blocked {
    /// More than 50 members asked for.
    TooManyMembers { desired: usize },
    /// Fewer than a majority of the voters are healthy: no primary can be elected and no
    /// reconfig can commit. Restore the members (scale the service back up).
    LostMajority {
        healthy_voters: usize,
        voters: usize,
    },
    /// A member reports another replica set's name.
    WrongSetName {
        host: String,
        found: String,
        expected: String,
    },
    /// Removing a dead voter would not leave a majority of the current voters healthy.
    RemovalWouldLoseMajority { id: i64 },
    /// Every member that answers has no data, but the store remembers the set: initiating
    /// would make a new, empty database under the old name (safety rule 10).
    KnownSetWithoutData {
        replica_set_id: String,
        config_version: i64,
        empty: Vec<String>,
    },
    /// The members came back under new addresses, but fewer than a majority of the last
    /// config's voters are present with their data: re-addressing could lose committed writes.
    ReaddressNeedsMajority { present: Vec<i64>, voters: usize },
    /// The members present hold an older config than the last one the store saw committed:
    /// those with the newer config are missing.
    ReaddressOlderThanKnown {
        found_version: i64,
        known_version: i64,
    },
    /// The members present hold the last config, but none of them reaches the commit point
    /// seen before (they hold volumes an earlier task left, or lagged), or those behind are a
    /// majority at the config's own addresses: re-addressing could elect one of them and lose
    /// acknowledged writes. The members that hold them are missing.
    ReaddressBehindCommitted {
        /// The present voters whose data stops short of it.
        behind: Vec<i64>,
        committed: OpTime,
    },
}

/// A finding that is logged and published in the status, without a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Note {
    /// A member is healthy but has no record: the store or a bridge is wrong, not the task.
    /// It is kept.
    HealthyWithoutRecord { id: i64, host: String },
    /// A member has a record but the set sees it unhealthy. It is reported, not removed.
    UnhealthyWithRecord { id: i64, host: String },
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Converged,
    /// `replSetInitiate` on `host`, with these members (version 1).
    Initiate {
        host: String,
        members: Vec<MemberConfig>,
    },
    /// `replSetReconfig` on the primary with `config` (the current one with `change` applied and
    /// the version raised).
    Reconfig {
        change: Change,
        config: ConfigView,
    },
    /// `replSetReconfig` with `force: true` on `host`: the last config (as `source` holds it)
    /// with nothing changed but the hosts of the `moved` members (`_id`, from, to), which are
    /// back with their data under new addresses (safety rule 11). Nothing committed is lost:
    /// `host` has the newest optime of a majority of the config's voters.
    Readdress {
        host: String,
        source: String,
        config: ConfigView,
        moved: Vec<(i64, String, String)>,
    },
    /// `replSetReconfig` with `force: true` on `host`, a member that is up: only the members
    /// that are up stay. Writes that only the dropped members had are lost (rolled back when
    /// they return). Only with `--allow-force`, after `--force-after` without a majority.
    ForceReconfig {
        host: String,
        config: ConfigView,
        dropped: Vec<i64>,
    },
    Wait(Wait),
    Blocked(Blocked),
}

/// The step and what was noticed on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub step: Step,
    pub notes: Vec<Note>,
}

/// Decides the next step.
pub fn plan_next_step(obs: &Observation, desired: &Desired, ctx: &PlanContext) -> Plan {
    let mut notes = Vec::new();
    let step = decide(obs, desired, ctx, &mut notes);
    Plan { step, notes }
}

fn decide(obs: &Observation, desired: &Desired, ctx: &PlanContext, notes: &mut Vec<Note>) -> Step {
    if desired.members.len() > MAX_MEMBERS {
        return Step::Blocked(Blocked::TooManyMembers {
            desired: desired.members.len(),
        });
    }
    for (host, name) in &obs.hello {
        if let Some(found) = name {
            if found != &ctx.set_name {
                return Step::Blocked(Blocked::WrongSetName {
                    host: host.clone(),
                    found: found.clone(),
                    expected: ctx.set_name.clone(),
                });
            }
        }
    }

    let Some(config) = &obs.config else {
        if let Some(step) = readdress(obs, desired, ctx) {
            return step;
        }
        return initiate_or_wait(obs, desired, ctx);
    };
    let healthy = |id: i64| obs.status.get(&id).is_some_and(|s| s.healthy);
    let state = |id: i64| obs.status.get(&id).map(|s| s.state);

    // Findings about members whose record and health disagree.
    for m in &config.members {
        match (desired.members.contains_key(&m.id), healthy(m.id)) {
            (false, true) => notes.push(Note::HealthyWithoutRecord {
                id: m.id,
                host: m.host.clone(),
            }),
            (true, false) => notes.push(Note::UnhealthyWithRecord {
                id: m.id,
                host: m.host.clone(),
            }),
            _ => {}
        }
    }

    let Some(primary) = obs.primary else {
        if let Some(step) = readdress(obs, desired, ctx) {
            return step;
        }
        let voters = config.voter_count();
        let healthy_voters = config.voters().filter(|m| healthy(m.id)).count();
        if healthy_voters < majority(voters) {
            if let Some(after) = ctx.force_after {
                if ctx.majority_lost_for >= after && healthy_voters > 0 {
                    return force_to_the_members_up(config, &healthy);
                }
            }
            return Step::Blocked(Blocked::LostMajority {
                healthy_voters,
                voters,
            });
        }
        return Step::Wait(Wait::NoPrimary);
    };
    if !obs.committed {
        return Step::Wait(Wait::ConfigNotCommitted {
            version: config.version,
        });
    }

    // Rescheduled tasks: same slot, new host. Only once the old mongod is seen down: a live
    // member is never cut off (two tasks of one slot can overlap during an update). A new host
    // still held by another member waits, but lets the removals below go first: the member
    // holding it may be one whose record is gone, and removing it frees the host.
    let mut host_in_use: Option<Wait> = None;
    for (&id, host) in &desired.members {
        let Some(m) = config.member(id) else { continue };
        if &m.host == host || obs.is_up(id) {
            continue;
        }
        if let Some(other) = config.members.iter().find(|o| &o.host == host) {
            host_in_use.get_or_insert(Wait::HostInUse {
                id,
                host: host.clone(),
                by: other.id,
            });
            continue;
        }
        // A task that comes back with the set's recent data (its volume, holding the current
        // config) keeps its vote: it is the same member, catching up from where it stopped.
        // An empty one, or one with an older config (a volume left long ago), loses it until
        // it has synced, so that a set never counts on a member that may hold too little.
        // The current config is not enough: a volume left on a node by an earlier task holds
        // it too when the config has not changed since, without the writes that came after.
        // Only data that reaches the set's commit point is sure to hold every write this
        // member may have acknowledged (docs/reliability.md, finding 9).
        let committed = commit_point(obs, ctx, config.replica_set_id.as_deref());
        let with_data = config.replica_set_id.is_some()
            && obs.persisted.get(host).is_some_and(|p| {
                p.config.set_name == config.set_name
                    && p.config.replica_set_id == config.replica_set_id
                    && !config.is_newer_than(&p.config)
                    && reaches(p.last_optime, committed)
            });
        let revoke_vote = m.is_voter() && config.voter_count() > 1 && id != primary && !with_data;
        return reconfig(
            config,
            Change::MoveHost {
                id,
                from: m.host.clone(),
                to: host.clone(),
                revoke_vote,
            },
        );
    }

    // A voter in initial sync has no data of its own yet: its task came back empty at the
    // address it had (swarm reused it). MongoDB lets it vote, and with an empty oplog it votes
    // for any candidate, so its vote goes until it is SECONDARY again (rule 14).
    if let Some(m) = config
        .voters()
        .find(|m| m.id != primary && state(m.id) == Some(MemberState::Startup2) && !m.arbiter_only)
    {
        let voters = config.voter_count();
        let healthy_after = config
            .voters()
            .filter(|v| v.id != m.id && healthy(v.id))
            .count();
        if voters > 1 && healthy_after >= majority(voters - 1) {
            return reconfig(config, Change::RevokeVote { id: m.id });
        }
    }

    // Members whose record is gone.
    let mut grace_wait: Option<Wait> = None;
    for m in &config.members {
        if desired.members.contains_key(&m.id) {
            continue;
        }
        if !ctx.records_trusted {
            return Step::Wait(Wait::RecordsNotTrusted);
        }
        // A member that answers is kept (with a note), unless the mongod answering at its host
        // is another slot's task: a record of another slot names that host (the address was
        // reused after a reschedule), so the health seen there is not this member's.
        let host_claimed = desired
            .members
            .iter()
            .any(|(&id, h)| id != m.id && h == &m.host);
        if m.id == primary || (healthy(m.id) && !host_claimed) {
            continue;
        }
        let gone = ctx.record_gone_for.get(&m.id).copied().unwrap_or_default();
        if gone < ctx.removal_grace {
            grace_wait.get_or_insert(Wait::RemovalGrace {
                id: m.id,
                remaining: ctx.removal_grace - gone,
            });
            continue;
        }
        if m.is_voter() {
            let voters = config.voter_count();
            let healthy_left = config
                .voters()
                .filter(|v| v.id != m.id && healthy(v.id))
                .count();
            // The voters left must be a majority of the current voters, and the healthy ones
            // left a majority of the new config, or the reconfig could never commit.
            if voters - 1 < majority(voters) || healthy_left < majority(voters - 1) {
                return Step::Blocked(Blocked::RemovalWouldLoseMajority { id: m.id });
            }
        }
        return reconfig(
            config,
            Change::Remove {
                id: m.id,
                host: m.host.clone(),
            },
        );
    }

    // A move that waits for its host comes before any addition or vote.
    if let Some(wait) = host_in_use {
        return Step::Wait(wait);
    }

    // New members: no vote, priority 0.
    for (&id, host) in &desired.members {
        if config.member(id).is_some() {
            continue;
        }
        if config.members.len() >= MAX_MEMBERS {
            return Step::Blocked(Blocked::TooManyMembers {
                desired: desired.members.len(),
            });
        }
        if let Some(other) = config.members.iter().find(|o| &o.host == host) {
            return Step::Wait(Wait::HostInUse {
                id,
                host: host.clone(),
                by: other.id,
            });
        }
        return reconfig(
            config,
            Change::Add {
                id,
                host: host.clone(),
            },
        );
    }

    // Votes: towards the target, one at a time. Who may vote: the voters, and the members
    // with a record (a member kept only because it is healthy gets no new vote).
    let voters = config.voter_count();
    let candidates_for_vote = config
        .members
        .iter()
        .filter(|m| !m.is_voter() && !m.arbiter_only && desired.members.contains_key(&m.id))
        .count();
    let target = target_voters(voters + candidates_for_vote);
    if voters > target {
        // Take the vote of a non-primary voter: a sick one first, then the highest _id.
        let mut candidates: Vec<&MemberConfig> = config
            .voters()
            .filter(|m| m.id != primary && !m.arbiter_only)
            .collect();
        candidates.sort_by_key(|m| (healthy(m.id), std::cmp::Reverse(m.id)));
        let healthy_voters = config.voters().filter(|m| healthy(m.id)).count();
        if let Some(m) = candidates.first() {
            let healthy_after = healthy_voters - usize::from(healthy(m.id));
            if healthy_after >= majority(voters - 1) {
                return reconfig(config, Change::RevokeVote { id: m.id });
            }
        }
    } else if voters < target {
        let waiting: Vec<i64> = config
            .members
            .iter()
            .filter(|m| !m.is_voter() && !m.arbiter_only && desired.members.contains_key(&m.id))
            .map(|m| m.id)
            .collect();
        let ready = waiting
            .iter()
            .copied()
            .find(|&id| healthy(id) && state(id) == Some(MemberState::Secondary));
        match ready {
            Some(id) => return reconfig(config, Change::GrantVote { id }),
            None if !waiting.is_empty() => return Step::Wait(Wait::CatchingUp { ids: waiting }),
            None => {}
        }
    }

    match grace_wait {
        Some(w) => Step::Wait(w),
        None => Step::Converged,
    }
}

/// The newest majority commit point known of the set with `replica_set_id`: the primary's
/// now, or the one seen before ([`PlanContext::committed`]) when it is of the same set.
pub(crate) fn commit_point(
    obs: &Observation,
    ctx: &PlanContext,
    replica_set_id: Option<&str>,
) -> Option<OpTime> {
    let seen = ctx
        .committed
        .as_ref()
        .filter(|c| Some(c.replica_set_id.as_str()) == replica_set_id)
        .map(|c| c.optime);
    obs.commit_point.max(seen)
}

/// Whether data whose newest entry is `last` holds every write up to `committed`. Unknown
/// data reaches nothing, except when nothing is known to be committed.
pub(crate) fn reaches(last: Option<OpTime>, committed: Option<OpTime>) -> bool {
    match committed {
        None => true,
        Some(c) => last.is_some_and(|l| l >= c),
    }
}

/// The forced config: the members that are up, with their votes; sent to the lowest-`_id`
/// voter that is up.
fn force_to_the_members_up(config: &ConfigView, healthy: &dyn Fn(i64) -> bool) -> Step {
    let mut next = config.clone();
    next.version += 1;
    next.members.retain(|m| healthy(m.id));
    let dropped = config
        .members
        .iter()
        .filter(|m| !healthy(m.id))
        .map(|m| m.id)
        .collect();
    let host = next
        .voters()
        .map(|m| m.host.clone())
        .next()
        .unwrap_or_default();
    Step::ForceReconfig {
        host,
        config: next,
        dropped,
    }
}

fn reconfig(config: &ConfigView, change: Change) -> Step {
    let config = apply(config, &change);
    Step::Reconfig { change, config }
}

/// The config with `change` applied and the version raised by one. Members keep their order;
/// a new member goes last.
pub fn apply(config: &ConfigView, change: &Change) -> ConfigView {
    let mut next = config.clone();
    next.version += 1;
    match change {
        Change::Add { id, host } => next.members.push(MemberConfig::new_non_voter(*id, host)),
        Change::GrantVote { id } => {
            if let Some(m) = next.members.iter_mut().find(|m| m.id == *id) {
                m.votes = 1;
                m.priority = 1.0;
            }
        }
        Change::RevokeVote { id } => {
            if let Some(m) = next.members.iter_mut().find(|m| m.id == *id) {
                m.votes = 0;
                m.priority = 0.0;
            }
        }
        Change::MoveHost {
            id,
            to,
            revoke_vote,
            ..
        } => {
            if let Some(m) = next.members.iter_mut().find(|m| m.id == *id) {
                m.host = to.clone();
                if *revoke_vote {
                    m.votes = 0;
                    m.priority = 0.0;
                }
            }
        }
        Change::Remove { id, .. } => next.members.retain(|m| m.id != *id),
    }
    next
}

/// The voters' `_id`s of a config, for checking the one-voter rule.
pub fn voter_ids(config: &ConfigView) -> BTreeSet<i64> {
    config.voters().map(|m| m.id).collect()
}

/// Convenience for tests and the status: whether a member counts as healthy and caught up.
pub fn caught_up(status: Option<&MemberStatus>) -> bool {
    status.is_some_and(|s| s.healthy && s.state.is_data_bearing_and_caught_up())
}
