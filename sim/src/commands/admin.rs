//! Administrative commands: sessions, server parameters, and `_isSelf` (the command a member
//! sends to a host of a new config to learn whether that host is itself).

use bson::{doc, Document};

use crate::node::Node;

/// endSessions, killSessions, refreshSessions: there are no server-side sessions to end.
pub(super) fn sessions() -> Document {
    doc! {}
}

/// getParameter: the feature compatibility version the drivers ask for.
pub(super) fn get_parameter() -> Document {
    doc! {"featureCompatibilityVersion": {"version": "7.0"}}
}

impl Node {
    /// `_isSelf`: this process's instance id, compared by the asking member with its own.
    pub(super) fn cmd_is_self(&self) -> Document {
        doc! {"id": self.inner.instance_id}
    }
}
