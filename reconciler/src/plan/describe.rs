//! How the planner's steps, waits and refusals read, for people (logs, the status's
//! `detail`) and as machine names (the status's `reason`, metrics labels).

use super::{Blocked, Change, Note, Step, Wait};
use crate::model::majority;

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocked::TooManyMembers { desired } => write!(
                f,
                "{desired} members asked for, MongoDB allows at most 50; scale the service down"
            ),
            Blocked::LostMajority {
                healthy_voters,
                voters,
            } => write!(
                f,
                "the set lost its majority: {healthy_voters} of {voters} voters are up, so no \
                 primary can be elected and no reconfig can run; restore the stopped members \
                 (scale the service back up), then scale down one task at a time with \
                 `replset-reconciler scale`"
            ),
            Blocked::WrongSetName {
                host,
                found,
                expected,
            } => write!(
                f,
                "{host} belongs to replica set {found:?}, not {expected:?}; check --replset and \
                 the service"
            ),
            Blocked::RemovalWouldLoseMajority { id } => write!(
                f,
                "removing member {id} would leave fewer healthy voters than a majority; bring \
                 members back first"
            ),
            Blocked::KnownSetWithoutData {
                replica_set_id,
                config_version,
                empty,
            } => write!(
                f,
                "DATA MAY BE LOST: the store remembers replica set {replica_set_id} (config \
                 version {config_version}) but no member that answers has data; not \
                 initiating a new, empty set in its place. Bring the volumes back (docker \
                 volume ls on each node), or start a new, empty set on purpose: \
                 `replset-reconciler forget-set --replica-set-id {replica_set_id}`. Members \
                 without data: {}",
                empty.join(", ")
            ),
            Blocked::ReaddressBehindCommitted { behind, committed } => write!(
                f,
                "the members came back under new addresses, but the data of voters {behind:?} \
                 stops short of the last commit point seen (term {}, timestamp {}:{}) and none \
                 present reaches it: they hold volumes an earlier task left, or lagged, and \
                 re-addressing could elect one of them and lose acknowledged writes. Start the \
                 missing tasks on the nodes that hold their latest volumes (docker volume ls on \
                 each node)",
                committed.term, committed.ts.0, committed.ts.1
            ),
            Blocked::ReaddressNeedsMajority { present, voters } => write!(
                f,
                "the members came back under new addresses, but only {} of the {voters} voters \
                 of the last config are present with their data ({present:?}); re-addressing \
                 needs {} of them so that no committed write is lost: start the missing tasks \
                 (on the nodes that hold their volumes), or force with --allow-force",
                present.len(),
                majority(*voters)
            ),
            Blocked::ReaddressOlderThanKnown {
                found_version,
                known_version,
            } => write!(
                f,
                "the members present hold config version {found_version}, older than version \
                 {known_version} that the store saw committed: the members with the newer \
                 config are missing; start them"
            ),
        }
    }
}

impl Wait {
    /// Its name in the status document and in metrics labels (`no_primary`, `catching_up`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Wait::NoRecords => "no_records",
            Wait::Unreachable { .. } => "unreachable",
            Wait::NoPrimary => "no_primary",
            Wait::ConfigNotCommitted { .. } => "config_not_committed",
            Wait::RemovalGrace { .. } => "removal_grace",
            Wait::RecordsNotTrusted => "records_not_trusted",
            Wait::HostInUse { .. } => "host_in_use",
            Wait::CatchingUp { .. } => "catching_up",
            Wait::IdentityUnknown => "identity_unknown",
            Wait::OptimeUnknown { .. } => "optime_unknown",
        }
    }
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::NoRecords => write!(f, "the store holds no record of the service's tasks"),
            Wait::Unreachable { hosts } => {
                write!(f, "no task answers: {}", hosts.join(", "))
            }
            Wait::NoPrimary => write!(f, "no primary (an election, or a set just initiated)"),
            Wait::ConfigNotCommitted { version } => {
                write!(f, "config version {version} is not committed yet")
            }
            Wait::RemovalGrace { id, remaining } => write!(
                f,
                "member {id} has had no record for less than the removal grace ({}s left)",
                remaining.as_secs()
            ),
            Wait::RecordsNotTrusted => write!(
                f,
                "the store's records are not trusted (no snapshot yet, or the watch broke): \
                 nothing is removed"
            ),
            Wait::HostInUse { id, host, by } => {
                write!(f, "member {id} wants {host}, which member {by} still has")
            }
            Wait::CatchingUp { ids } => {
                write!(
                    f,
                    "members {ids:?} are not SECONDARY yet, so they get no vote"
                )
            }
            Wait::IdentityUnknown => write!(
                f,
                "cannot read what the store remembers of the set (replsets/<set>/identity): \
                 not initiating until it can"
            ),
            Wait::OptimeUnknown { host } => write!(
                f,
                "{host} did not give its last optime (local.oplog.rs), which re-addressing \
                 needs to choose the member with every committed write"
            ),
        }
    }
}

impl Blocked {
    /// Its name in the status document and in metrics labels (`lost_majority`, ...).
    pub fn reason(&self) -> &'static str {
        match self {
            Blocked::TooManyMembers { .. } => "too_many_members",
            Blocked::LostMajority { .. } => "lost_majority",
            Blocked::WrongSetName { .. } => "wrong_set_name",
            Blocked::RemovalWouldLoseMajority { .. } => "removal_would_lose_majority",
            Blocked::KnownSetWithoutData { .. } => "known_set_without_data",
            Blocked::ReaddressNeedsMajority { .. } => "readdress_needs_majority",
            Blocked::ReaddressOlderThanKnown { .. } => "readdress_older_than_known",
            Blocked::ReaddressBehindCommitted { .. } => "readdress_behind_committed",
        }
    }
}

impl Note {
    /// Its name in metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Note::HealthyWithoutRecord { .. } => "healthy_without_record",
            Note::UnhealthyWithRecord { .. } => "unhealthy_with_record",
        }
    }
}

impl Step {
    /// Its name in metrics labels and in the status: `initiate`, `force_reconfig`, the change
    /// of a reconfig (`add`, `grant_vote`, `revoke_vote`, `move_host`, `remove`), or `none`.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Initiate { .. } => "initiate",
            Step::ForceReconfig { .. } => "force_reconfig",
            Step::Readdress { .. } => "readdress",
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

    /// What the step does, for people (logs, the status's `last_step`).
    pub fn describe(&self) -> String {
        match self {
            Step::Converged => "nothing to do".to_string(),
            Step::Initiate { host, .. } => format!("initiate on {host}"),
            Step::ForceReconfig {
                host,
                config,
                dropped,
            } => format!(
                "FORCE a config without members {dropped:?} on {host} (config version {})",
                config.version
            ),
            Step::Readdress {
                host,
                config,
                moved,
                ..
            } => {
                let moves: Vec<String> = moved
                    .iter()
                    .map(|(id, from, to)| format!("{id}: {from} -> {to}"))
                    .collect();
                format!(
                    "RE-ADDRESS with force on {host}: the last config with only the hosts \
                     changed ({}) (config version {})",
                    moves.join(", "),
                    config.version
                )
            }
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
            Step::Wait(wait) => format!("waiting: {wait}"),
            Step::Blocked(blocked) => format!("blocked: {blocked}"),
        }
    }
}
