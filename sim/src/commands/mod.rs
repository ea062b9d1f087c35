//! The commands a member answers, one file per family, and the dispatch table that routes a
//! command name to its handler. Replies carry the fields, codes and messages of MongoDB 7.0.
//!
//! - `handshake`: hello / isMaster, buildInfo.
//! - `replication`: the replica-set administration commands people and the reconciler run.
//!   (The commands members send each other, heartbeats, votes and position updates, live
//!   with the replication machinery in `repl.rs`.)
//! - `crud`: the data plane and the write concern wait.
//! - `admin`: sessions, parameters and the other administrative commands.
//! - `auth`: authentication and authorization.

use bson::{doc, Document};

use crate::error::ServerError;
use crate::node::Node;

mod admin;
mod auth;
mod crud;
mod handshake;
mod replication;

/// `maxWireVersion` of MongoDB 7.0.
pub const MAX_WIRE_VERSION: i32 = 21;
pub const VERSION: &str = "7.0.14";

impl Node {
    /// Runs one command and returns its reply (errors become `ok: 0` replies).
    pub(crate) async fn run_command(&self, body: Document, conn_id: i64) -> Document {
        let name = body.keys().next().cloned().unwrap_or_default();
        let result = self.dispatch(&name, &body, conn_id).await;
        match result {
            Ok(mut d) => {
                if !d.contains_key("ok") {
                    d.insert("ok", 1.0);
                }
                d
            }
            Err(e) => {
                tracing::debug!(me = %self.me(), command = %name, error = %e, "command failed");
                e.to_reply()
            }
        }
    }

    async fn dispatch(
        &self,
        name: &str,
        body: &Document,
        conn_id: i64,
    ) -> Result<Document, ServerError> {
        match name {
            "hello" | "isMaster" | "ismaster" => self.cmd_hello(name, body, conn_id).await,
            "ping" => Ok(doc! {}),
            "buildInfo" | "buildinfo" => Ok(handshake::build_info()),
            "endSessions" | "killSessions" | "refreshSessions" => Ok(admin::sessions()),
            "killCursors" => Ok(crud::kill_cursors()),
            "getParameter" => Ok(admin::get_parameter()),
            "_isSelf" => Ok(self.cmd_is_self()),
            "replSetInitiate" => self.cmd_initiate(body).await,
            "replSetGetConfig" => self.cmd_get_config(body),
            "replSetGetStatus" => self.cmd_get_status(),
            "replSetReconfig" => self.cmd_reconfig(body).await,
            "replSetStepDown" => self.cmd_step_down(body).await,
            "replSetStepUp" => self.cmd_step_up(body).await,
            "replSetHeartbeat" => self.cmd_heartbeat(body),
            "replSetRequestVotes" => self.cmd_request_votes(body),
            "replSetUpdatePosition" => self.cmd_update_position(body),
            "insert" => self.cmd_insert(body).await,
            "find" => self.cmd_find(body).await,
            "count" => self.cmd_count(body),
            "aggregate" => self.cmd_aggregate(body),
            other => Err(ServerError::command_not_found(format!(
                "no such command: '{other}'"
            ))),
        }
    }

    fn require_repl(&self) -> Result<String, ServerError> {
        self.inner
            .opts
            .set_name
            .clone()
            .ok_or_else(|| ServerError::no_replication_enabled("not running with --replSet"))
    }
}
