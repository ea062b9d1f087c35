//! The identity of a replica set the reconciler has seen, `<prefix>/replsets/<set>/identity`:
//! a public contract, documented in `docs/key-layout.md`.
//!
//! The reconciler's leader writes it whenever it reads a committed config from a primary whose
//! replica set id, version or term differ from what the store holds. It is the store's memory
//! that the set existed: when every member later answers that it has no config (their volumes
//! are gone), the reconciler refuses to initiate a new, empty set in its place (safety rule
//! 10), and when the members come back with their data under new addresses it checks that the
//! config they hold is not older than this one before it re-addresses them (rule 11). An
//! operator who wants a new set on purpose removes it with `replset-reconciler forget-set`.

use serde::{Deserialize, Serialize};

/// The version of the identity document written in its `schema_version`.
pub const IDENTITY_SCHEMA_VERSION: u32 = 1;

/// What the store remembers of a replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetIdentity {
    /// [`IDENTITY_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The replica set's name.
    pub set: String,
    /// `settings.replicaSetId` of its config (an ObjectId, as 24 hex digits): made by
    /// `replSetInitiate`, kept by every reconfig, so it names this set and no other.
    pub replica_set_id: String,
    /// The version of the last committed config the reconciler read.
    pub config_version: i64,
    /// The term of that config (`-1` for a config installed by force, as MongoDB writes it).
    pub config_term: i64,
    /// The members of that config: `_id` and host, and whether it votes.
    pub members: Vec<IdentityMember>,
    /// The newest majority commit point a primary of the set reported to the reconciler
    /// (`optimes.lastCommittedOpTime`): every write up to it was acknowledged by a majority.
    /// Re-addressing waits for a member whose data reaches it. Absent in documents of earlier
    /// releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_point: Option<CommitPoint>,
}

/// A position in a replica set's oplog, as MongoDB orders them: by term, then timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CommitPoint {
    /// The term (`t`).
    pub term: i64,
    /// The timestamp (`ts`): seconds since the Unix epoch, then the increment.
    pub ts: u32,
    pub inc: u32,
}

/// One member of the remembered config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityMember {
    #[serde(rename = "_id")]
    pub id: i64,
    pub host: String,
    pub voter: bool,
}

/// Why a stored identity could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not a replica set identity document: {source}; it is the reconciler's own record of the set (written under replsets/<set>/identity): remove it only with `replset-reconciler forget-set`")]
pub struct IdentityDecodeError {
    #[source]
    source: serde_json::Error,
}

impl SetIdentity {
    /// The document as the store holds it (one line of JSON).
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and booleans always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<SetIdentity, IdentityDecodeError> {
        serde_json::from_slice(bytes).map_err(|source| IdentityDecodeError { source })
    }

    /// Whether `(version, term)` is the same as this identity's or newer, by MongoDB's rule
    /// for comparing configs (`ConfigVersionAndTerm`): by term, then version; when either term
    /// is `-1` (a config installed by force), by version alone.
    pub fn is_not_newer_than(&self, version: i64, term: i64) -> bool {
        config_order(self.config_version, self.config_term, version, term)
            != std::cmp::Ordering::Greater
    }
}

/// Orders two configs as MongoDB does (`ConfigVersionAndTerm::operator<`): by term, then
/// version; when either term is `-1` (uninitialized: a config installed by force), by version
/// alone.
pub fn config_order(
    version_a: i64,
    term_a: i64,
    version_b: i64,
    term_b: i64,
) -> std::cmp::Ordering {
    if term_a == -1 || term_b == -1 || term_a == term_b {
        version_a.cmp(&version_b)
    } else {
        term_a.cmp(&term_b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn identity() -> SetIdentity {
        SetIdentity {
            schema_version: IDENTITY_SCHEMA_VERSION,
            set: "rs0".into(),
            replica_set_id: "65a000000000000000000001".into(),
            config_version: 7,
            config_term: 3,
            members: vec![IdentityMember {
                id: 1,
                host: "10.0.0.5:27017".into(),
                voter: true,
            }],
            commit_point: Some(CommitPoint {
                term: 3,
                ts: 1_700_000_000,
                inc: 2,
            }),
        }
    }

    #[test]
    fn round_trips_through_json() {
        let id = identity();
        assert_eq!(SetIdentity::from_json(&id.to_json()).ok(), Some(id));
    }

    #[test]
    fn a_document_of_an_earlier_release_has_no_commit_point() {
        let mut id = identity();
        id.commit_point = None;
        let json = String::from_utf8(id.to_json()).expect("utf-8");
        assert!(!json.contains("commit_point"), "{json}");
        assert_eq!(SetIdentity::from_json(json.as_bytes()).ok(), Some(id));
    }

    #[test]
    fn a_value_someone_else_wrote_is_a_clear_error() {
        let err = SetIdentity::from_json(b"{\"set\": 1}").expect_err("not an identity");
        assert!(err.to_string().contains("forget-set"), "{err}");
    }

    #[test]
    fn configs_order_by_term_then_version_and_by_version_when_forced() {
        assert_eq!(config_order(9, 2, 3, 3), Ordering::Less);
        assert_eq!(config_order(3, 3, 9, 3), Ordering::Less);
        assert_eq!(config_order(50_000, -1, 9, 3), Ordering::Greater);
        assert_eq!(config_order(7, 3, 7, 3), Ordering::Equal);
        let id = identity();
        assert!(id.is_not_newer_than(7, 3));
        assert!(id.is_not_newer_than(2, 4));
        assert!(!id.is_not_newer_than(6, 3));
    }
}
