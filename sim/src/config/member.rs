//! One member of a replica-set config: its fields, parsing and per-member rules
//! (`member_config.cpp`).

use super::*;

/// One entry of `members`.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberConfig {
    pub id: i64,
    pub host: String,
    pub arbiter_only: bool,
    pub build_indexes: bool,
    pub hidden: bool,
    pub priority: f64,
    pub tags: Document,
    pub secondary_delay_secs: i64,
    pub votes: i64,
    /// Set by the primary on a member added with a vote; such a member counts as a non-voter
    /// until it has caught up, then the primary removes the field with a reconfig.
    pub newly_added: bool,
}

impl MemberConfig {
    /// Votes as they count for elections and majorities (0 while `newlyAdded`).
    pub fn effective_votes(&self) -> i64 {
        if self.newly_added {
            0
        } else {
            self.votes
        }
    }
    pub fn is_voter(&self) -> bool {
        self.effective_votes() > 0
    }
    /// May stand for election: a voter with a priority, not an arbiter.
    pub fn is_electable(&self) -> bool {
        !self.arbiter_only && self.priority > 0.0 && self.is_voter()
    }

    pub(super) fn parse(d: &Document) -> Result<MemberConfig, ServerError> {
        for key in d.keys() {
            match key.as_str() {
                "_id" | "host" | "arbiterOnly" | "buildIndexes" | "hidden" | "priority"
                | "tags" | "secondaryDelaySecs" | "votes" | "newlyAdded" | "horizons" => {}
                "slaveDelay" => {
                    return Err(ServerError::bad_value(
                        "BSON field 'MemberConfig.slaveDelay' is an unknown field. Use secondaryDelaySecs",
                    ))
                }
                other => {
                    return Err(unknown_field("MemberConfig", other));
                }
            }
        }
        let id = match d.get("_id") {
            Some(b) => number(b).ok_or_else(|| type_error("MemberConfig._id", "int", b))?,
            None => return Err(missing_field("MemberConfig._id")),
        };
        if !(0..=255).contains(&id) {
            return Err(ServerError::bad_value(format!(
                "BSON field '_id' value must be >= 0 and <= 255, actual value '{id}'"
            )));
        }
        let host = match d.get("host") {
            Some(Bson::String(s)) => s.clone(),
            Some(b) => return Err(type_error("MemberConfig.host", "string", b)),
            None => return Err(missing_field("MemberConfig.host")),
        };
        validate_host(&host)?;
        let arbiter_only = get_bool(d, "arbiterOnly", false)?;
        let build_indexes = get_bool(d, "buildIndexes", true)?;
        let hidden = get_bool(d, "hidden", false)?;
        let newly_added = get_bool(d, "newlyAdded", false)?;
        let votes = match d.get("votes") {
            Some(b) => number(b).ok_or_else(|| type_error("MemberConfig.votes", "int", b))?,
            None => 1,
        };
        if votes < 0 {
            return Err(ServerError::bad_value(format!(
                "BSON field 'votes' value must be >= 0, actual value '{votes}'"
            )));
        }
        if votes > 1 {
            return Err(ServerError::bad_value(format!(
                "BSON field 'votes' value must be <= 1, actual value '{votes}'"
            )));
        }
        let priority = match d.get("priority") {
            Some(b) => float(b).ok_or_else(|| type_error("MemberConfig.priority", "double", b))?,
            None => 1.0,
        };
        if !(0.0..=1000.0).contains(&priority) {
            return Err(ServerError::bad_value(format!(
                "BSON field 'priority' value must be >= 0 and <= 1000, actual value '{priority}'"
            )));
        }
        let secondary_delay_secs = match d.get("secondaryDelaySecs") {
            Some(b) => {
                number(b).ok_or_else(|| type_error("MemberConfig.secondaryDelaySecs", "int", b))?
            }
            None => 0,
        };
        let tags = match d.get("tags") {
            Some(Bson::Document(t)) => t.clone(),
            Some(b) => return Err(type_error("MemberConfig.tags", "object", b)),
            None => Document::new(),
        };
        let mut m = MemberConfig {
            id,
            host,
            arbiter_only,
            build_indexes,
            hidden,
            priority,
            tags,
            secondary_delay_secs,
            votes,
            newly_added,
        };
        // member_config.cpp: an arbiter's default priority 1 becomes 0.
        if m.arbiter_only {
            if m.priority == 1.0 {
                m.priority = 0.0;
            }
            if m.votes == 0 {
                return Err(ServerError::bad_value(
                    "Arbiter must vote (cannot have 0 votes)",
                ));
            }
            if m.newly_added {
                return Err(ServerError::bad_value(
                    "Arbiter cannot have newlyAdded field set",
                ));
            }
        }
        if m.priority != 0.0 {
            if m.votes == 0 {
                return Err(ServerError::bad_value(
                    "priority must be 0 when non-voting (votes:0)",
                ));
            }
            if m.secondary_delay_secs > 0 {
                return Err(ServerError::bad_value(
                    "priority must be 0 when secondaryDelaySecs is used",
                ));
            }
            if m.hidden {
                return Err(ServerError::bad_value(
                    "priority must be 0 when hidden=true",
                ));
            }
            if !m.build_indexes {
                return Err(ServerError::bad_value(
                    "priority must be 0 when buildIndexes=false",
                ));
            }
        }
        Ok(m)
    }

    /// The member as `replSetGetConfig` prints it, with every default filled in.
    pub fn to_document(&self, include_newly_added: bool) -> Document {
        let mut d = doc! {
            "_id": self.id as i32,
            "host": self.host.clone(),
            "arbiterOnly": self.arbiter_only,
            "buildIndexes": self.build_indexes,
            "hidden": self.hidden,
            "priority": self.priority,
            "tags": self.tags.clone(),
            "secondaryDelaySecs": self.secondary_delay_secs,
            "votes": self.votes as i32,
        };
        if self.newly_added && include_newly_added {
            d.insert("newlyAdded", true);
        }
        d
    }
}
