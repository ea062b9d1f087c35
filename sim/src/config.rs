//! Replica-set configuration documents: parsing, defaults, and the server's validation rules.
//!
//! Rules and messages follow MongoDB 7.0: `member_config.cpp` (per-member rules),
//! `repl_set_config.cpp` (`_validate`: member counts, voters, unique `_id` and host, one
//! electable member) and `repl_set_config_checks.cpp` (initiate, old/new compatibility, the
//! single-voter change of a safe reconfig). The codes here are the inner ones; the command
//! layer rewraps them (see `node.rs`).

use bson::{doc, oid::ObjectId, Bson, Document};
use std::cmp::Ordering;
use std::collections::HashSet;

use crate::error::ServerError;

mod member;
pub use member::MemberConfig;

/// At most 50 members and 7 voters (`kMaxMembers`, `kMaxVotingMembers`).
pub const MAX_MEMBERS: usize = 50;
pub const MAX_VOTING_MEMBERS: usize = 7;
/// The term of a config written by a force reconfig (`OpTime::kUninitializedTerm`).
pub const UNINITIALIZED_TERM: i64 = -1;

/// `{version, term}` of a config, compared as `ConfigVersionAndTerm` (repl_set_config.h): by
/// term, then version, except that when either was installed by force (term -1) by version
/// only, for equality too: a member holding a forced config `{v, -1}` has the config that a
/// new primary re-stamps with its term on step-up, `{v, t}`.
#[derive(Debug, Clone, Copy)]
pub struct ConfigVersionAndTerm {
    pub version: i64,
    pub term: i64,
}

impl PartialEq for ConfigVersionAndTerm {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for ConfigVersionAndTerm {}

impl PartialOrd for ConfigVersionAndTerm {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ConfigVersionAndTerm {
    fn cmp(&self, other: &Self) -> Ordering {
        if self.term == UNINITIALIZED_TERM || other.term == UNINITIALIZED_TERM {
            self.version.cmp(&other.version)
        } else {
            (self.term, self.version).cmp(&(other.term, other.version))
        }
    }
}

impl std::fmt::Display for ConfigVersionAndTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{version: {}, term: {}}}", self.version, self.term)
    }
}

/// A whole replica-set configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplSetConfig {
    pub set_name: String,
    pub version: i64,
    pub term: i64,
    pub members: Vec<MemberConfig>,
    pub protocol_version: i64,
    pub write_concern_majority_journal_default: bool,
    /// `settings` with defaults filled in (see [`Defaults`]).
    pub settings: Document,
}

/// The defaults filled into `settings`. MongoDB's are 2000 ms heartbeats and a 10 s election
/// timeout; the simulator's own (500 ms, 2 s) keep failover tests short, and a config that
/// names its own values is obeyed.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub heartbeat_interval_millis: i64,
    pub election_timeout_millis: i64,
}

impl ReplSetConfig {
    /// Parses a config as given to `replSetInitiate` / `replSetReconfig`, or as stored.
    /// Errors are InvalidReplicaSetConfig-worthy parse failures (the caller wraps them).
    pub fn parse(d: &Document, defaults: Defaults) -> Result<ReplSetConfig, ServerError> {
        for key in d.keys() {
            match key.as_str() {
                "_id"
                | "version"
                | "term"
                | "members"
                | "protocolVersion"
                | "writeConcernMajorityJournalDefault"
                | "settings"
                | "configsvr" => {}
                other => return Err(unknown_field("ReplSetConfig", other)),
            }
        }
        let set_name = match d.get("_id") {
            Some(Bson::String(s)) => s.clone(),
            Some(b) => return Err(type_error("ReplSetConfig._id", "string", b)),
            None => return Err(missing_field("ReplSetConfig._id")),
        };
        let version = match d.get("version") {
            Some(b) => number(b).ok_or_else(|| type_error("ReplSetConfig.version", "int", b))?,
            None => return Err(missing_field("ReplSetConfig.version")),
        };
        if version < 1 {
            return Err(ServerError::bad_value(format!(
                "BSON field 'version' value must be >= 1, actual value '{version}'"
            )));
        }
        let term = match d.get("term") {
            Some(b) => number(b).ok_or_else(|| type_error("ReplSetConfig.term", "long", b))?,
            None => UNINITIALIZED_TERM,
        };
        let protocol_version = match d.get("protocolVersion") {
            Some(b) => {
                number(b).ok_or_else(|| type_error("ReplSetConfig.protocolVersion", "long", b))?
            }
            None => 1,
        };
        if protocol_version != 1 {
            return Err(ServerError::bad_value(format!(
                "Support for replication protocol version {protocol_version} was removed in MongoDB 4.0. Downgrade to MongoDB version 3.6 and upgrade your protocol version to 1 before upgrading your MongoDB version"
            )));
        }
        let write_concern_majority_journal_default =
            get_bool(d, "writeConcernMajorityJournalDefault", true)?;
        let members_raw = match d.get("members") {
            Some(Bson::Array(a)) => a,
            Some(b) => return Err(type_error("ReplSetConfig.members", "array", b)),
            None => return Err(missing_field("ReplSetConfig.members")),
        };
        let mut members = Vec::with_capacity(members_raw.len());
        for m in members_raw {
            match m {
                Bson::Document(md) => members.push(MemberConfig::parse(md)?),
                other => return Err(type_error("ReplSetConfig.members", "object", other)),
            }
        }
        let mut settings = match d.get("settings") {
            Some(Bson::Document(s)) => s.clone(),
            Some(b) => return Err(type_error("ReplSetConfig.settings", "object", b)),
            None => Document::new(),
        };
        fill_default(&mut settings, "chainingAllowed", Bson::Boolean(true));
        fill_default(
            &mut settings,
            "heartbeatIntervalMillis",
            Bson::Int32(defaults.heartbeat_interval_millis as i32),
        );
        fill_default(&mut settings, "heartbeatTimeoutSecs", Bson::Int32(10));
        fill_default(
            &mut settings,
            "electionTimeoutMillis",
            Bson::Int32(defaults.election_timeout_millis as i32),
        );
        fill_default(&mut settings, "catchUpTimeoutMillis", Bson::Int32(-1));
        fill_default(
            &mut settings,
            "catchUpTakeoverDelayMillis",
            Bson::Int32(30000),
        );
        fill_default(
            &mut settings,
            "getLastErrorModes",
            Bson::Document(Document::new()),
        );
        fill_default(
            &mut settings,
            "getLastErrorDefaults",
            Bson::Document(doc! {"w": 1, "wtimeout": 0}),
        );
        for key in ["heartbeatIntervalMillis", "electionTimeoutMillis"] {
            if let Some(b) = settings.get(key) {
                match number(b) {
                    Some(v) if v > 0 => {}
                    _ => {
                        return Err(ServerError::bad_value(format!(
                            "BSON field '{key}' value must be > 0, actual value '{b}'"
                        )))
                    }
                }
            }
        }
        if let Some(b) = settings.get("replicaSetId") {
            if !matches!(b, Bson::ObjectId(_)) {
                return Err(type_error(
                    "ReplSetConfigSettings.replicaSetId",
                    "objectId",
                    b,
                ));
            }
        }
        Ok(ReplSetConfig {
            set_name,
            version,
            term,
            members,
            protocol_version,
            write_concern_majority_journal_default,
            settings,
        })
    }

    pub fn version_and_term(&self) -> ConfigVersionAndTerm {
        ConfigVersionAndTerm {
            version: self.version,
            term: self.term,
        }
    }

    pub fn replica_set_id(&self) -> Option<ObjectId> {
        self.settings.get_object_id("replicaSetId").ok()
    }

    pub fn set_replica_set_id(&mut self, id: ObjectId) {
        self.settings.insert("replicaSetId", id);
    }

    pub fn election_timeout_millis(&self) -> u64 {
        self.settings
            .get("electionTimeoutMillis")
            .and_then(number)
            .unwrap_or(10_000)
            .max(1) as u64
    }

    /// `settings.heartbeatTimeoutSecs` (MongoDB's default: 10 s): how long a failed heartbeat
    /// is retried before its member is marked DOWN.
    pub fn heartbeat_timeout(&self) -> std::time::Duration {
        let secs = self
            .settings
            .get("heartbeatTimeoutSecs")
            .and_then(number)
            .unwrap_or(10)
            .max(1);
        std::time::Duration::from_secs(secs as u64)
    }

    pub fn heartbeat_interval_millis(&self) -> u64 {
        self.settings
            .get("heartbeatIntervalMillis")
            .and_then(number)
            .unwrap_or(2000)
            .max(1) as u64
    }

    pub fn member_by_host(&self, host: &str) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.host == host)
    }

    pub fn member_by_id(&self, id: i64) -> Option<&MemberConfig> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn voters(&self) -> impl Iterator<Item = &MemberConfig> {
        self.members.iter().filter(|m| m.is_voter())
    }

    /// Number of votes needed to win an election (`majorityVoteCount`).
    pub fn majority_vote_count(&self) -> usize {
        self.voters().count() / 2 + 1
    }

    /// Number of data-bearing voters needed for a majority write (`writeMajority`).
    pub fn write_majority(&self) -> usize {
        let writable = self.voters().filter(|m| !m.arbiter_only).count();
        self.majority_vote_count().min(writable)
    }

    pub fn to_document(&self, include_newly_added: bool) -> Document {
        doc! {
            "_id": self.set_name.clone(),
            "version": self.version as i32,
            "term": self.term as i32,
            "members": self.members.iter().map(|m| Bson::Document(m.to_document(include_newly_added))).collect::<Vec<_>>(),
            "protocolVersion": self.protocol_version,
            "writeConcernMajorityJournalDefault": self.write_concern_majority_journal_default,
            "settings": self.settings.clone(),
        }
    }

    /// `ReplSetConfig::_validate`: rules about the config alone. BadValue errors.
    pub fn validate(&self) -> Result<(), ServerError> {
        let n = self.members.len();
        if n == 0 || n > MAX_MEMBERS {
            return Err(ServerError::bad_value(format!(
                "Replica set configuration contains {n} members, but must have at least 1 and no more than  {MAX_MEMBERS}"
            )));
        }
        let mut localhost = 0;
        let mut voters = 0;
        let mut electable = 0;
        for (i, mi) in self.members.iter().enumerate() {
            if is_localhost(&mi.host) {
                localhost += 1;
            }
            // The vote a member was given, `newlyAdded` or not: a member still catching up
            // counts toward the seven (MongoDB's replsets jstests: with 7 voting members,
            // "adding a new voting member will fail during validation"), while it does not
            // count for majorities or the one-voter rule of a reconfig.
            if mi.votes > 0 {
                voters += 1;
            }
            if !mi.arbiter_only && mi.priority > 0.0 {
                electable += 1;
            }
            for (j, mj) in self.members.iter().enumerate() {
                if i == j {
                    continue;
                }
                if mi.id == mj.id {
                    return Err(ServerError::bad_value(format!(
                        "Found two member configurations with same _id field, members.{i}._id == members.{j}._id == {}",
                        mi.id
                    )));
                }
                if mi.host == mj.host {
                    return Err(ServerError::bad_value(format!(
                        "Found two member configurations with same host field, members.{i}.host == members.{j}.host == {}",
                        mi.host
                    )));
                }
            }
        }
        if localhost != 0 && localhost != n {
            return Err(ServerError::bad_value(format!(
                "Either all host names in a replica set configuration must be localhost references, or none must be; found {localhost} out of {n}"
            )));
        }
        if voters == 0 || voters > MAX_VOTING_MEMBERS {
            return Err(ServerError::bad_value(format!(
                "Replica set configuration contains {voters} voting members, but must be at least 1 and no more than {MAX_VOTING_MEMBERS}"
            )));
        }
        if electable == 0 {
            return Err(ServerError::bad_value(
                "Replica set configuration must contain at least one non-arbiter member with priority > 0",
            ));
        }
        for m in &self.members {
            if m.arbiter_only && m.priority != 0.0 {
                return Err(ServerError::invalid_replica_set_config(format!(
                    "Member {} is an arbiter but has priority {}. Arbiter priority must be 0.",
                    m.host, m.priority
                )));
            }
        }
        Ok(())
    }

    /// `validateConfigForInitiate` minus finding self (done by the node).
    pub fn validate_for_initiate(&self) -> Result<(), ServerError> {
        self.validate()?;
        if let Some(m) = self.members.iter().find(|m| m.newly_added) {
            return Err(ServerError::invalid_replica_set_config(format!(
                "Member {}, with _id {}, has a newlyAdded field, which is not valid for initial configuration of a replica set.",
                m.host, m.id
            )));
        }
        if self.version != 1 {
            return Err(ServerError::new_replica_set_configuration_incompatible(
                format!(
                "Configuration used to initiate a replica set must  have version 1, but found {}",
                self.version
            ),
            ));
        }
        Ok(())
    }

    /// `validateConfigForReconfig`: the new config alone, then against the old one, then the
    /// single-voter rule unless forced.
    pub fn validate_for_reconfig(
        old: &ReplSetConfig,
        new: &ReplSetConfig,
        force: bool,
    ) -> Result<(), ServerError> {
        new.validate()?;
        if old.version_and_term() >= new.version_and_term() {
            return Err(ServerError::new_replica_set_configuration_incompatible(format!(
                "New replica set configuration version and term must be greater than old, but {} is not greater than {} for replica set {}",
                new.version_and_term(),
                old.version_and_term(),
                new.set_name
            )));
        }
        if old.set_name != new.set_name {
            return Err(ServerError::new_replica_set_configuration_incompatible(
                format!(
                "New and old configurations differ in replica set name; old was {}, and new is {}",
                old.set_name, new.set_name
            ),
            ));
        }
        if old.replica_set_id() != new.replica_set_id() {
            let show = |o: Option<ObjectId>| o.map(|o| o.to_hex()).unwrap_or_default();
            return Err(ServerError::new_replica_set_configuration_incompatible(
                format!(
                "New and old configurations differ in replica set ID; old was {}, and new is {}",
                show(old.replica_set_id()),
                show(new.replica_set_id())
            ),
            ));
        }
        for mn in &new.members {
            for mo in &old.members {
                let ids = mo.id == mn.id;
                let hosts = mo.host == mn.host;
                if !ids && !hosts {
                    continue;
                }
                if hosts && !ids {
                    return Err(ServerError::new_replica_set_configuration_incompatible(format!(
                        "New and old configurations both have members with host of {} but in the new configuration the _id field is {} and in the old configuration it is {} for replica set {}",
                        mo.host, mn.id, mo.id, new.set_name
                    )));
                }
                if mo.build_indexes != mn.build_indexes {
                    return Err(ServerError::new_replica_set_configuration_incompatible(format!(
                        "New and old configurations differ in the setting of the buildIndexes field for member {}; to make this change, remove then re-add the member",
                        mo.host
                    )));
                }
                if mo.arbiter_only != mn.arbiter_only {
                    return Err(ServerError::new_replica_set_configuration_incompatible(format!(
                        "New and old configurations differ in the setting of the arbiterOnly field for member {}; to make this change, remove then re-add the member",
                        mo.host
                    )));
                }
            }
        }
        if !force {
            let old_ids: HashSet<i64> = old.voters().map(|m| m.id).collect();
            let new_ids: HashSet<i64> = new.voters().map(|m| m.id).collect();
            if old_ids.symmetric_difference(&new_ids).count() > 1 {
                return Err(ServerError::invalid_replica_set_config(
                    "Non force replica set reconfig can only add or remove at most 1 voting member.",
                ));
            }
        }
        Ok(())
    }
}

fn fill_default(d: &mut Document, key: &str, v: Bson) {
    if !d.contains_key(key) {
        d.insert(key, v);
    }
}

fn is_localhost(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    h == "localhost" || h == "127.0.0.1" || h == "::1" || h == "[::1]"
}

fn validate_host(host: &str) -> Result<(), ServerError> {
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u32>().ok()),
        None => (host, Some(27017)),
    };
    if h.is_empty() || port.is_none_or(|p| p == 0 || p > 65535) {
        return Err(ServerError::failed_to_parse(format!(
            "Empty host component parsing HostAndPort from \"{host}\""
        )));
    }
    Ok(())
}

/// Normalises `host` to `host:port` (a member given as `h` means `h:27017`).
pub fn normalize_host(host: &str) -> String {
    if host.rsplit_once(':').is_some() {
        host.to_string()
    } else {
        format!("{host}:27017")
    }
}

pub(crate) fn number(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(v) => Some(*v as i64),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

pub(crate) fn float(b: &Bson) -> Option<f64> {
    match b {
        Bson::Int32(v) => Some(*v as f64),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

fn get_bool(d: &Document, key: &str, default: bool) -> Result<bool, ServerError> {
    match d.get(key) {
        None => Ok(default),
        Some(Bson::Boolean(b)) => Ok(*b),
        Some(b) => match number(b) {
            Some(v) => Ok(v != 0),
            None => Err(type_error(key, "bool", b)),
        },
    }
}

fn unknown_field(ctx: &str, field: &str) -> ServerError {
    ServerError {
        code: 40415,
        code_name: "Location40415",
        message: format!("BSON field '{ctx}.{field}' is an unknown field."),
    }
}

fn missing_field(path: &str) -> ServerError {
    ServerError {
        code: 40414,
        code_name: "Location40414",
        message: format!("BSON field '{path}' is missing but a required field"),
    }
}

fn type_error(path: &str, want: &str, got: &Bson) -> ServerError {
    ServerError::type_mismatch(format!(
        "BSON field '{path}' is the wrong type '{}', expected type '{want}'",
        type_name(got)
    ))
}

/// The server's name of a BSON type (`typeName`), as its messages give it.
pub(crate) fn type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Boolean(_) => "bool",
        Bson::Null => "null",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::ObjectId(_) => "objectId",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Defaults = Defaults {
        heartbeat_interval_millis: 500,
        election_timeout_millis: 2000,
    };

    fn cfg(members: Vec<Document>, version: i32) -> Result<ReplSetConfig, ServerError> {
        ReplSetConfig::parse(
            &doc! {"_id": "rs0", "version": version, "members": members},
            D,
        )
    }

    #[test]
    fn non_voter_with_priority_is_rejected() {
        let e = cfg(vec![doc! {"_id": 0, "host": "a:1", "votes": 0}], 1).err();
        assert_eq!(
            e.map(|e| e.message),
            Some("priority must be 0 when non-voting (votes:0)".to_string())
        );
    }

    #[test]
    fn eight_voters_are_rejected() -> Result<(), ServerError> {
        let ms = (0..8)
            .map(|i| doc! {"_id": i, "host": format!("h{i}:27017")})
            .collect();
        let c = cfg(ms, 1)?;
        let e = c.validate().err().map(|e| e.code);
        assert_eq!(e, Some(2));
        Ok(())
    }

    #[test]
    fn two_new_voters_at_once_are_rejected() -> Result<(), ServerError> {
        let old = cfg(
            vec![
                doc! {"_id": 0, "host": "a:1"},
                doc! {"_id": 1, "host": "b:1", "votes": 0, "priority": 0},
                doc! {"_id": 2, "host": "c:1", "votes": 0, "priority": 0},
            ],
            1,
        )?;
        let mut new = cfg(
            vec![
                doc! {"_id": 0, "host": "a:1"},
                doc! {"_id": 1, "host": "b:1"},
                doc! {"_id": 2, "host": "c:1"},
            ],
            2,
        )?;
        new.term = 1;
        let e = ReplSetConfig::validate_for_reconfig(&old, &new, false).err();
        assert!(e.is_some_and(|e| e.message.contains("at most 1 voting member")));
        assert!(ReplSetConfig::validate_for_reconfig(&old, &new, true).is_ok());
        Ok(())
    }

    #[test]
    fn force_config_compares_versions_only() {
        let a = ConfigVersionAndTerm {
            version: 5,
            term: 3,
        };
        let b = ConfigVersionAndTerm {
            version: 50_000,
            term: -1,
        };
        assert!(b > a);
        let c = ConfigVersionAndTerm {
            version: 2,
            term: 4,
        };
        assert!(c > a);
    }
}
