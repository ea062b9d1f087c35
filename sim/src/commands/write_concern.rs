//! The default write concern: the implicit one a config implies, and the cluster-wide one an
//! operator sets with setDefaultRWConcern (read back with getDefaultRWConcern).
//!
//! MongoDB 5.0+ (`ReadWriteConcernDefaults`, read_write_concern_defaults.cpp; the manual's
//! "Implicit Default Write Concern"): a write without a write concern gets the cluster-wide
//! default (CWWC) when one is set, else `{w: "majority"}`, unless the config has arbiters and
//! its data-bearing voters are not more than a voting majority, where it is `{w: 1}`
//! (`ReplSetConfig::isImplicitDefaultWriteConcernMajority`). The CWWC is a document of
//! `config.settings` (`_id: "ReadWriteConcernDefaults"`), written by the primary and
//! replicated like any other.

use bson::{doc, Bson, DateTime, Document};

use crate::config_change::is_implicit_default_write_concern_majority;
use crate::error::ServerError;
use crate::node::{MemberState, Node, NodeState};

const SETTINGS_NS: &str = "config.settings";
const DEFAULTS_ID: &str = "ReadWriteConcernDefaults";

/// The stored cluster-wide defaults, if any.
pub(crate) fn stored_defaults(st: &NodeState) -> Option<&Document> {
    st.durable
        .store
        .collections
        .get(SETTINGS_NS)?
        .iter()
        .find(|d| d.get_str("_id").ok() == Some(DEFAULTS_ID))
}

/// The cluster-wide default write concern, if one is set.
pub(crate) fn cluster_wide_write_concern(st: &NodeState) -> Option<Document> {
    stored_defaults(st)?
        .get_document("defaultWriteConcern")
        .ok()
        .cloned()
}

/// The write concern a write without one gets, and its provenance.
pub(crate) fn default_write_concern(st: &NodeState) -> (Document, &'static str) {
    if let Some(wc) = cluster_wide_write_concern(st) {
        return (wc, "customDefault");
    }
    let majority = st
        .config()
        .is_none_or(is_implicit_default_write_concern_majority);
    let w = if majority {
        Bson::String("majority".into())
    } else {
        Bson::Int32(1)
    };
    (doc! {"w": w, "wtimeout": 0}, "implicitDefault")
}

impl Node {
    /// getDefaultRWConcern.
    pub(super) fn cmd_get_default_rw_concern(&self) -> Result<Document, ServerError> {
        let st = self.lock();
        let (wc, provenance) = default_write_concern(&st);
        let mut d = doc! {
            "defaultReadConcern": {"level": "local"},
            "defaultWriteConcern": wc,
            "defaultWriteConcernSource": if provenance == "customDefault" { "global" } else { "implicit" },
            "defaultReadConcernSource": "implicit",
        };
        if let Some(stored) = stored_defaults(&st) {
            for k in ["updateOpTime", "updateWallClockTime"] {
                if let Some(v) = stored.get(k) {
                    d.insert(k, v.clone());
                }
            }
        }
        Ok(d)
    }

    /// setDefaultRWConcern: on the primary, stores the cluster-wide default write concern
    /// (`defaultWriteConcern`; `defaultReadConcern` is accepted and kept) and waits for it to
    /// be majority-committed.
    pub(super) async fn cmd_set_default_rw_concern(
        &self,
        body: &Document,
    ) -> Result<Document, ServerError> {
        self.require_repl()?;
        let wc = body.get_document("defaultWriteConcern").ok().cloned();
        let rc = body.get_document("defaultReadConcern").ok().cloned();
        if wc.is_none() && rc.is_none() {
            return Err(ServerError::bad_value(
                "At least one of the \"defaultReadConcern\" or \"defaultWriteConcern\" fields must be present",
            ));
        }
        if let Some(wc) = &wc {
            if !wc.contains_key("w") {
                return Err(ServerError::bad_value(
                    "The global default write concern must specify 'w'",
                ));
            }
        }
        let (op, term) = {
            let mut st = self.lock();
            if st.state != MemberState::Primary {
                return Err(ServerError::not_writable_primary("not primary"));
            }
            let old = stored_defaults(&st).cloned();
            let mut new = old.clone().unwrap_or_else(|| doc! {"_id": DEFAULTS_ID});
            if let Some(mut wc) = wc {
                if !wc.contains_key("wtimeout") {
                    wc.insert("wtimeout", 0);
                }
                new.insert("defaultWriteConcern", wc);
            }
            if let Some(rc) = rc {
                new.insert("defaultReadConcern", rc);
            }
            let ts = crate::oplog::next_timestamp(st.last_applied().ts);
            new.insert("updateOpTime", ts);
            new.insert("updateWallClockTime", DateTime::now());
            let kind = if old.is_some() { "u" } else { "i" };
            let op = self.append(&mut st, kind, SETTINGS_NS.to_string(), new);
            self.recompute_commit_point(&mut st);
            self.notify();
            (op, st.term())
        };
        let majority = doc! {"writeConcern": {"w": "majority"}};
        if let Some(wce) = self.wait_for_write_concern(&majority, op, term).await {
            return Ok(doc! {"ok": 1.0, "writeConcernError": wce});
        }
        self.cmd_get_default_rw_concern()
    }
}
