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

use bson::spec::BinarySubtype;
use bson::{doc, Binary, Document};

use crate::auth::ClientSession;
use crate::error::ServerError;
use crate::node::Node;

mod admin;
mod auth;
mod crud;
mod handshake;
mod namespaces;
mod reads;
mod replication;
mod write_concern;
mod write_plan;

pub(crate) use reads::Cursors;

pub(crate) use handshake::exhaust_next;

/// `maxWireVersion` of MongoDB 7.0.
pub const MAX_WIRE_VERSION: i32 = 21;
pub const VERSION: &str = "7.0.14";

impl Node {
    /// Runs one command from inside the process (test control) as `__system`.
    pub(crate) async fn run_command(&self, body: Document, conn_id: i64) -> Document {
        let mut session = ClientSession::internal();
        session.conn_id = conn_id;
        self.run_command_in(body, &mut session).await
    }

    /// Runs one command of a client connection and returns its reply (errors become `ok: 0`
    /// replies). The client must be authorized for it first (see `auth::authorize`).
    pub(crate) async fn run_command_in(
        &self,
        body: Document,
        session: &mut ClientSession,
    ) -> Document {
        let name = body.keys().next().cloned().unwrap_or_default();
        let result = match self.authorize(session, &name, &body) {
            Ok(()) => self.dispatch(&name, &body, session).await,
            Err(e) => Err(e),
        };
        let mut reply = match result {
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
        };
        self.append_cluster_time(&mut reply);
        // Nothing leaves this member before its disk has it (see `disk.rs`).
        self.flush();
        reply
    }

    /// `$clusterTime` and `operationTime`, which a replica-set member adds to every reply,
    /// success or error (`appendClusterAndOperationTime` in service_entry_point_mongod.cpp;
    /// the manual's "Causal Consistency"). The cluster time is this member's newest optime;
    /// without a keyFile the signature is the placeholder mongod sends (an all-zero hash,
    /// key id 0). The operation time is the newest optime too: the simulator has no
    /// snapshot reads, so every operation sees, or wrote, the member's last applied entry.
    fn append_cluster_time(&self, reply: &mut Document) {
        let ts = {
            let st = self.lock();
            if st.config().is_none() {
                return;
            }
            st.last_applied().ts
        };
        reply.insert(
            "$clusterTime",
            doc! {
                "clusterTime": ts,
                "signature": {
                    "hash": Binary { subtype: BinarySubtype::Generic, bytes: vec![0u8; 20] },
                    "keyId": 0i64,
                },
            },
        );
        reply.insert("operationTime", ts);
    }

    async fn dispatch(
        &self,
        name: &str,
        body: &Document,
        session: &mut ClientSession,
    ) -> Result<Document, ServerError> {
        match name {
            "hello" | "isMaster" | "ismaster" => {
                let mut d = self.cmd_hello(name, body, session.conn_id).await?;
                self.hello_auth_fields(body, session, &mut d);
                Ok(d)
            }
            "saslStart" => self.cmd_sasl_start(body, session),
            "saslContinue" => self.cmd_sasl_continue(body, session),
            "logout" => Ok(auth::logout(session)),
            "connectionStatus" => Ok(self.cmd_connection_status(body, session)),
            "createUser" => self.cmd_create_user(body).await,
            "updateUser" => self.cmd_update_user(body).await,
            "grantRolesToUser" => self.cmd_grant_roles_to_user(body).await,
            "dropUser" => self.cmd_drop_user(body).await,
            "usersInfo" => self.cmd_users_info(body, session),
            "ping" => Ok(doc! {}),
            "buildInfo" | "buildinfo" => Ok(handshake::build_info()),
            "endSessions" | "killSessions" | "refreshSessions" => Ok(admin::sessions()),
            "killCursors" => self.cmd_kill_cursors(body),
            "getMore" => self.cmd_get_more(body),
            "getParameter" => Ok(admin::get_parameter()),
            "_isSelf" => Ok(self.cmd_is_self()),
            "replSetInitiate" => self.cmd_initiate(body).await,
            "replSetGetConfig" => self.cmd_get_config(body),
            "replSetGetStatus" => self.cmd_get_status(),
            "replSetReconfig" => self.cmd_reconfig(body).await,
            "replSetStepDown" => self.cmd_step_down(body).await,
            "setDefaultRWConcern" => self.cmd_set_default_rw_concern(body).await,
            "getDefaultRWConcern" => self.cmd_get_default_rw_concern(),
            "replSetFreeze" => self.cmd_freeze(body),
            "replSetMaintenance" => self.cmd_maintenance(body),
            "replSetStepUp" => self.cmd_step_up(body).await,
            "replSetHeartbeat" => self.cmd_heartbeat(body),
            "replSetRequestVotes" => self.cmd_request_votes(body),
            "replSetUpdatePosition" => self.cmd_update_position(body),
            "insert" => self.cmd_insert(body).await,
            "update" => self.cmd_update(body).await,
            "delete" => self.cmd_delete(body).await,
            "findAndModify" | "findandmodify" => self.cmd_find_and_modify(body).await,
            "find" => self.cmd_find(body).await,
            "count" => self.cmd_count(body),
            "distinct" => self.cmd_distinct(body),
            "aggregate" => self.cmd_aggregate(body),
            "create" => self.cmd_create(body).await,
            "drop" => self.cmd_drop(body).await,
            "dropDatabase" => self.cmd_drop_database(body).await,
            "createIndexes" => self.cmd_create_indexes(body).await,
            "dropIndexes" => self.cmd_drop_indexes(body).await,
            "listIndexes" => self.cmd_list_indexes(body),
            "listCollections" => self.cmd_list_collections(body),
            "listDatabases" => self.cmd_list_databases(body, session),
            "dbStats" | "dbstats" => self.cmd_db_stats(body),
            "collStats" => self.cmd_coll_stats(body),
            "serverStatus" => self.cmd_server_status().await,
            "getCmdLineOpts" => Ok(self.cmd_get_cmd_line_opts()),
            "getLog" => self.cmd_get_log(body),
            "hostInfo" => Ok(self.cmd_host_info()),
            "commitTransaction" | "abortTransaction" => Err(ServerError::illegal_operation(
                "Transactions are not supported by the replica-set simulator (docs/replset-sim.md)",
            )),
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

#[cfg(test)]
mod tests {
    /// Every command the dispatch table routes has its own authorization requirement (none
    /// falls to "unknown command", which runs no check).
    #[test]
    fn every_dispatched_command_has_an_authorization_requirement() {
        let source = include_str!("mod.rs");
        let table = source
            .split("match name {")
            .nth(1)
            .and_then(|t| t.split("other => Err(").next())
            .unwrap_or_default();
        let mut names = Vec::new();
        for line in table.lines() {
            let Some((arms, _)) = line.trim().split_once("=>") else {
                continue;
            };
            for arm in arms.split('|') {
                if let Some(n) = arm
                    .trim()
                    .strip_prefix('"')
                    .and_then(|a| a.strip_suffix('"'))
                {
                    names.push(n.to_string());
                }
            }
        }
        assert!(
            names.len() > 40,
            "the dispatch table was not found: {names:?}"
        );
        for n in names {
            assert_ne!(
                crate::auth::roles::requirement(&n, &bson::doc! {}, "admin"),
                crate::auth::roles::Requirement::UnknownCommand,
                "{n} has no authorization requirement in auth/roles.rs"
            );
        }
    }
}
