//! What `replSetInitiate` and `replSetReconfig` do with the document they receive, as pure
//! functions of that document and of what the member knows: the preparation (defaults filled
//! in, hosts normalised, the version and term the server sets), the validation, the checks
//! about the receiving member, and the quorum verdict over the answers it collected. The
//! commands (`commands/replication.rs`) do the network parts in between, finding themselves
//! in the config and asking the other members, and call these for every decision, so a test
//! that calls them (the reconciler's property tests do) checks a step against exactly what
//! the server does.
//!
//! Sources (MongoDB 7.0): `CmdReplSetInitiate::run` in `src/mongo/db/repl/repl_set_commands.cpp`
//! (the default config, "Missing version field defaults to version 1");
//! `ReplicationCoordinatorImpl::processReplSetInitiate` and `processReplSetReconfig` /
//! `_doReplSetReconfig` in `replication_coordinator_impl.cpp` (term 0 for an initiate, the
//! current term for a safe reconfig, `kUninitializedTerm` and the version raised by 10,000
//! plus a random number below 100,000 over the larger of the old and the sent version for a
//! forced one, the `replicaSetId` carried over, `newlyAdded` refused from users, forced or not,
//! and set by the server); `repl_set_config_checks.cpp` (validation, the
//! electability of the receiver); `vote_requester` / `check_quorum_for_config_change.cpp`
//! (initiate needs every member, reconfig a majority of the new config's voters).

use bson::{doc, Document};

use crate::config::{normalize_host, Defaults, MemberConfig, ReplSetConfig, UNINITIALIZED_TERM};
use crate::error::ServerError;

/// The kind of a reconfig and what the server adds to the document for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconfigKind {
    /// A safe reconfig: the new config takes the primary's current term.
    Safe { term: i64 },
    /// `force: true`: the version is raised by 10,000 plus a random number below 100,000
    /// (the server picks it; the caller passes it so the function stays pure) and the term is uninitialized.
    Force { version_bump: i64 },
}

impl ReconfigKind {
    pub fn is_force(self) -> bool {
        matches!(self, ReconfigKind::Force { .. })
    }
}

/// The one answer a member gave to the quorum check's heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum QuorumAnswer {
    /// The member answered `ok: 1`; `config_version` is the version it holds (-2 for none).
    Ok { config_version: i64 },
    /// The member answered with an error or did not answer; the text says which.
    Failed(String),
}

/// The config `replSetInitiate` receives on a member started with `--replSet set_name` whose
/// own address is `self_host`: `arg` is the command's argument when it is a non-empty
/// document, `None` for `rs.initiate()` without one (a config of this member alone). Parsed,
/// with version 1 when it has none, term 0, hosts normalised, then validated for initiate.
pub fn prepare_initiate(
    arg: Option<&Document>,
    set_name: &str,
    self_host: &str,
    defaults: Defaults,
) -> Result<ReplSetConfig, ServerError> {
    let invalid = || ServerError::invalid_replica_set_config("");
    let mut raw = match arg {
        Some(d) if !d.is_empty() => d.clone(),
        _ => doc! {"_id": set_name, "version": 1, "members": [{"_id": 0, "host": self_host}]},
    };
    if !raw.contains_key("version") {
        raw.insert("version", 1);
    }
    let mut cfg = ReplSetConfig::parse(&raw, defaults).map_err(|e| e.rewrap(invalid()))?;
    for m in &mut cfg.members {
        m.host = normalize_host(&m.host);
    }
    cfg.term = 0;
    if cfg.set_name != set_name {
        return Err(ServerError::invalid_replica_set_config(format!(
            "Attempting to initiate a replica set with name {}, but command line reports {set_name}; rejecting",
            cfg.set_name
        )));
    }
    cfg.validate_for_initiate()
        .map_err(|e| e.rewrap(invalid()))?;
    Ok(cfg)
}

/// The receiver of an initiate, the member at index `me` of `cfg`, must be electable.
pub fn check_initiate_receiver(cfg: &ReplSetConfig, me: usize) -> Result<(), ServerError> {
    if let Some(why) = not_electable(cfg, me) {
        return Err(ServerError::invalid_replica_set_config(why));
    }
    Ok(())
}

/// `checkQuorumForInitiate`: every member but the receiver (index `me`) must answer, and none
/// may hold a config already. `answer` gives each other member's answer.
pub fn check_initiate_quorum(
    cfg: &ReplSetConfig,
    me: usize,
    mut answer: impl FnMut(&MemberConfig) -> QuorumAnswer,
) -> Result<(), ServerError> {
    let mut failures = Vec::new();
    for (i, m) in cfg.members.iter().enumerate() {
        if i == me {
            continue;
        }
        match answer(m) {
            QuorumAnswer::Ok { config_version } if config_version > 0 => failures.push(format!(
                "{} failed with {} has data already, cannot initiate set.",
                m.host, m.host
            )),
            QuorumAnswer::Ok { .. } => {}
            QuorumAnswer::Failed(e) => failures.push(format!("{} failed with {e}", m.host)),
        }
    }
    if !failures.is_empty() {
        return Err(ServerError::node_not_found(format!(
            "replSetInitiate quorum check failed because not all proposed set members responded affirmatively: {}",
            failures.join(", ")
        )));
    }
    Ok(())
}

/// The config `replSetReconfig` receives on a member started with `--replSet set_name` whose
/// current config is `old`: parsed, hosts normalised, `newlyAdded` refused (forced or not), the
/// old `replicaSetId` when it names none, version and term as `kind` says (forced: the larger of
/// the old and the sent version, plus the bump), `newlyAdded` set on
/// new voting members unless forced, then validated against `old`.
///
/// The order is the server's: `processReplSetReconfig`'s `getNewConfig` callback
/// (`replication_coordinator_impl.cpp`) appends `newlyAdded` to the new config, and only then
/// does `_doReplSetReconfig` run `validateConfigForReconfig` on it. A `newlyAdded` member is
/// "considered to have 'votes:0'" (the server's log 4634400; `MemberConfig::isVoter`), so the
/// one-voter rule does not count it: `rs.add(a); rs.add(b)` typed back to back is accepted
/// while `a` is still catching up.
pub fn prepare_reconfig(
    old: &ReplSetConfig,
    raw: &Document,
    set_name: &str,
    kind: ReconfigKind,
    defaults: Defaults,
) -> Result<ReplSetConfig, ServerError> {
    let invalid = || ServerError::invalid_replica_set_config("");
    let incompatible = || ServerError::new_replica_set_configuration_incompatible("");
    let mut cfg = ReplSetConfig::parse(raw, defaults).map_err(|e| e.rewrap(invalid()))?;
    for m in &mut cfg.members {
        m.host = normalize_host(&m.host);
    }
    if cfg.set_name != set_name {
        return Err(ServerError::invalid_replica_set_config(format!(
            "Rejecting reconfig where new config set name differs from command line set name, new config set name: {}, old config set name: {}",
            cfg.set_name, old.set_name
        )));
    }
    // Refused in a forced reconfig too: the check comes before the loop skips forced ones.
    if cfg.members.iter().any(|m| m.newly_added) {
        return Err(ServerError::invalid_replica_set_config(
            "Cannot provide newlyAdded field to member config during reconfig.",
        ));
    }
    if cfg.replica_set_id().is_none() {
        if let Some(id) = old.replica_set_id() {
            cfg.set_replica_set_id(id);
        }
    }
    match kind {
        ReconfigKind::Force { version_bump } => {
            // "Increase the config version for force reconfig": from the larger of the two.
            cfg.version = cfg.version.max(old.version) + version_bump;
            cfg.term = UNINITIALIZED_TERM;
        }
        ReconfigKind::Safe { term } => cfg.term = term,
    }
    if !kind.is_force() {
        mark_newly_added(old, &mut cfg);
    }
    ReplSetConfig::validate_for_reconfig(old, &cfg, kind.is_force())
        .map_err(|e| e.rewrap(incompatible()))?;
    Ok(cfg)
}

/// What the receiver (index `me` of the prepared `new`) checks once it has found itself in
/// the new config, before the quorum check: unless forced it must be electable
/// (`checkElectable` in `_doReplSetReconfig`, NodeNotElectable 104, returned as it is).
pub fn complete_reconfig(
    new: &ReplSetConfig,
    me: usize,
    kind: ReconfigKind,
) -> Result<(), ServerError> {
    if kind.is_force() {
        return Ok(());
    }
    match not_electable(new, me) {
        Some(why) => Err(ServerError::node_not_electable(why)),
        None => Ok(()),
    }
}

/// `checkElectable`'s message when the member at index `me` of `cfg` is not electable.
fn not_electable(cfg: &ReplSetConfig, me: usize) -> Option<String> {
    let m = &cfg.members[me];
    (!m.is_electable()).then(|| {
        format!(
            "This node, {}, with _id {} is not electable under the new configuration with {} for replica set {}",
            m.host,
            m.id,
            cfg.version_and_term(),
            cfg.set_name
        )
    })
}

/// Marks `newlyAdded` the members of a safe reconfig's `new` that come with a vote and were not
/// in `old`, or were still `newlyAdded` there (`processReplSetReconfig`: "Set the 'newlyAdded'
/// field to true for all new voting nodes"), so they count as non-voters until they catch up.
fn mark_newly_added(old: &ReplSetConfig, new: &mut ReplSetConfig) {
    for m in &mut new.members {
        let before = old.member_by_id(m.id);
        // Never an arbiter: it has no data to catch up, and would never become SECONDARY
        // for the primary to clear the mark (the server skips arbiters).
        m.newly_added = m.votes > 0 && !m.arbiter_only && before.is_none_or(|b| b.newly_added);
    }
}

/// `checkQuorumForReconfig`: a majority of the new config's voters (the receiver, host
/// `self_host`, counts for itself) must answer. `answer` gives each other member's answer.
pub fn check_reconfig_quorum(
    cfg: &ReplSetConfig,
    self_host: &str,
    mut answer: impl FnMut(&MemberConfig) -> QuorumAnswer,
) -> Result<(), ServerError> {
    let mut ok_voters = Vec::new();
    let mut failed = Vec::new();
    for m in &cfg.members {
        let ok = if m.host == self_host {
            true
        } else {
            match answer(m) {
                QuorumAnswer::Ok { .. } => true,
                QuorumAnswer::Failed(e) => {
                    failed.push(format!("{} failed with {e}", m.host));
                    false
                }
            }
        };
        if ok && m.is_voter() {
            ok_voters.push(m.host.clone());
        }
    }
    let need = cfg.majority_vote_count();
    if ok_voters.len() < need {
        return Err(ServerError::node_not_found(format!(
            "Quorum check failed because not enough voting nodes responded; required {need} but only the following {} voting nodes responded: {}; the following nodes did not respond affirmatively: {}",
            ok_voters.len(),
            ok_voters.join(", "),
            failed.join(", ")
        )));
    }
    Ok(())
}

/// `ReplSetConfig::isImplicitDefaultWriteConcernMajority` (repl_set_config.cpp): the implicit
/// default write concern is `{w: "majority"}` unless voting arbiters would keep a primary
/// elected while no majority write can be done, that is unless there are voting arbiters and
/// the data-bearing voters are not more than a voting majority; then it is `{w: 1}`.
pub fn is_implicit_default_write_concern_majority(cfg: &ReplSetConfig) -> bool {
    let voters = cfg.voters().count();
    let writable = cfg.voters().filter(|m| !m.arbiter_only).count();
    voters == writable || writable > cfg.majority_vote_count()
}

/// The reconfig rule of MongoDB 5.0+ (`ReplicationCoordinatorImpl::_doReplSetReconfig`; the
/// manual: "you must explicitly set the global default write concern before attempting to
/// reconfigure a replica set with a configuration that would change the implicit default
/// write concern"): without a cluster-wide default write concern, a safe reconfig may not
/// change the implicit default (adding the arbiter of a PSA set, for example). A forced one
/// may.
pub fn check_implicit_default_write_concern(
    old: &ReplSetConfig,
    new: &ReplSetConfig,
    cluster_wide_write_concern_set: bool,
    kind: ReconfigKind,
) -> Result<(), ServerError> {
    if kind.is_force() || cluster_wide_write_concern_set {
        return Ok(());
    }
    if is_implicit_default_write_concern_majority(old)
        != is_implicit_default_write_concern_majority(new)
    {
        return Err(ServerError::new_replica_set_configuration_incompatible(
            "Reconfig attempted to install a config that would change the implicit default write concern. Use the setDefaultRWConcern command to set a cluster-wide write concern and try the reconfig again.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::Bson;

    const DEFAULTS: Defaults = Defaults {
        heartbeat_interval_millis: 2000,
        election_timeout_millis: 10_000,
    };

    #[test]
    fn initiate_without_version_gets_version_1_and_term_0() -> Result<(), ServerError> {
        let raw = doc! {"_id": "rs0", "members": [{"_id": 0, "host": "a"}]};
        let cfg = prepare_initiate(Some(&raw), "rs0", "a:27017", DEFAULTS)?;
        assert_eq!((cfg.version, cfg.term), (1, 0));
        assert_eq!(cfg.members[0].host, "a:27017");
        Ok(())
    }

    #[test]
    fn initiate_with_another_version_is_refused_with_93() {
        let raw = doc! {"_id": "rs0", "version": 2, "members": [{"_id": 0, "host": "a:1"}]};
        let e = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS).err();
        assert_eq!(e.map(|e| e.code), Some(93));
    }

    #[test]
    fn initiate_without_a_document_is_this_member_alone() -> Result<(), ServerError> {
        let cfg = prepare_initiate(None, "rs0", "h:5", DEFAULTS)?;
        assert_eq!(cfg.set_name, "rs0");
        assert_eq!(cfg.members.len(), 1);
        assert_eq!(cfg.members[0].host, "h:5");
        Ok(())
    }

    fn members(hosts: &[&str]) -> Vec<Bson> {
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| Bson::Document(doc! {"_id": i as i64, "host": *h}))
            .collect()
    }

    /// `replSetReconfig` of `hosts` as version `version` on the primary `a:1` (term 1).
    fn safe_reconfig(
        old: &ReplSetConfig,
        hosts: &[&str],
        version: i64,
    ) -> Result<ReplSetConfig, ServerError> {
        let raw = doc! {"_id": "rs0", "version": version, "members": members(hosts)};
        let kind = ReconfigKind::Safe { term: 1 };
        let cfg = prepare_reconfig(old, &raw, "rs0", kind, DEFAULTS)?;
        complete_reconfig(&cfg, 0, kind)?;
        Ok(cfg)
    }

    #[test]
    fn two_adds_in_a_row_pass_while_the_first_is_newly_added() -> Result<(), ServerError> {
        let raw = doc! {"_id": "rs0", "members": members(&["a:1"])};
        let one = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS)?;
        let two = safe_reconfig(&one, &["a:1", "b:1"], 2)?;
        assert!(two.members[1].newly_added);
        // b has not caught up: still newlyAdded, so c is the one voter this change adds.
        let three = safe_reconfig(&two, &["a:1", "b:1", "c:1"], 3)?;
        let marks: Vec<bool> = three.members.iter().map(|m| m.newly_added).collect();
        assert_eq!(marks, [false, true, true]);
        Ok(())
    }

    #[test]
    fn a_real_two_voter_change_is_still_refused_with_103() -> Result<(), ServerError> {
        let raw = doc! {"_id": "rs0", "members": [
            {"_id": 0, "host": "a:1"},
            {"_id": 1, "host": "b:1", "votes": 0, "priority": 0},
            {"_id": 2, "host": "c:1", "votes": 0, "priority": 0},
        ]};
        let one = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS)?;
        // Two members already in the config get a vote: neither is new, so neither is
        // newlyAdded, and both count.
        let e = safe_reconfig(&one, &["a:1", "b:1", "c:1"], 2).err();
        assert!(e.as_ref().is_some_and(|e| e.code == 103), "{e:?}");
        assert!(e.is_some_and(|e| e.message.contains("at most 1 voting member")));
        // Removing two voters at once.
        let raw = doc! {"_id": "rs0", "members": members(&["a:1", "b:1", "c:1"])};
        let three = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS)?;
        assert_eq!(three.voters().count(), 3);
        let e = safe_reconfig(&three, &["a:1"], 2).err();
        assert!(e.as_ref().is_some_and(|e| e.code == 103), "{e:?}");
        Ok(())
    }

    #[test]
    fn a_forced_reconfig_counts_from_the_larger_version_and_refuses_newly_added(
    ) -> Result<(), ServerError> {
        let raw = doc! {"_id": "rs0", "members": members(&["a:1", "b:1", "c:1"])};
        let mut old = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS)?;
        old.version = 7;
        let kind = ReconfigKind::Force {
            version_bump: 10_005,
        };
        // The same hosts under new addresses, sent with an older version than the stored one.
        let moved = doc! {"_id": "rs0", "version": 2, "members": members(&["x:1", "y:1", "z:1"])};
        let cfg = prepare_reconfig(&old, &moved, "rs0", kind, DEFAULTS)?;
        assert_eq!((cfg.version, cfg.term), (7 + 10_005, UNINITIALIZED_TERM));
        let sent = doc! {"_id": "rs0", "version": 9, "members": members(&["x:1", "y:1", "z:1"])};
        let cfg = prepare_reconfig(&old, &sent, "rs0", kind, DEFAULTS)?;
        assert_eq!(cfg.version, 9 + 10_005);
        // A forced reconfig may make the receiver unelectable, a safe one may not (104).
        assert!(complete_reconfig(&cfg, 0, kind).is_ok());
        let mut hidden = sent.clone();
        if let Some(Bson::Document(m)) = hidden
            .get_array_mut("members")
            .ok()
            .and_then(|a| a.get_mut(0))
        {
            m.insert("priority", 0);
        }
        let cfg = prepare_reconfig(&old, &hidden, "rs0", kind, DEFAULTS)?;
        let safe = ReconfigKind::Safe { term: 1 };
        assert_eq!(
            complete_reconfig(&cfg, 0, safe).err().map(|e| e.code),
            Some(104)
        );
        let mut marked = sent;
        if let Some(Bson::Document(m)) = marked
            .get_array_mut("members")
            .ok()
            .and_then(|a| a.get_mut(1))
        {
            m.insert("newlyAdded", true);
        }
        let e = prepare_reconfig(&old, &marked, "rs0", kind, DEFAULTS).err();
        assert_eq!(e.map(|e| e.code), Some(93));
        Ok(())
    }

    #[test]
    fn a_member_holding_a_config_fails_the_initiate_quorum() -> Result<(), ServerError> {
        let raw =
            doc! {"_id": "rs0", "members": [{"_id": 0, "host": "a:1"}, {"_id": 1, "host": "b:1"}]};
        let cfg = prepare_initiate(Some(&raw), "rs0", "a:1", DEFAULTS)?;
        let e = check_initiate_quorum(&cfg, 0, |_| QuorumAnswer::Ok { config_version: 3 }).err();
        assert_eq!(e.map(|e| e.code), Some(74));
        Ok(())
    }
}
