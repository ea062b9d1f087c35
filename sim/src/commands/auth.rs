//! Authentication and authorization commands: the SASL conversation (and
//! `speculativeAuthenticate` / `saslSupportedMechs` in hello), logout, connectionStatus,
//! and user management (createUser, updateUser, grantRolesToUser, dropUser, usersInfo),
//! which writes admin.system.users through the oplog like any write. The logic is in
//! `crate::auth`; see docs/replset-sim.md, "Authentication".

use bson::{doc, Bson, Document};

use crate::auth::roles::{Action, Privilege};
use crate::auth::sasl::{sasl_continue, sasl_start};
use crate::auth::users::{
    new_user_document, updated_user_document, user_info, user_mechanisms, user_roles,
    users_info_names, with_granted_roles, UserName, USERS_NS,
};
use crate::auth::{authorize, holds, ClientSession};
use crate::error::ServerError;
use crate::node::{Node, NodeState};

use super::crud::Write;

fn db_of(body: &Document) -> String {
    body.get_str("$db").unwrap_or("admin").to_string()
}

/// A user's document in admin.system.users.
pub(crate) fn find_user(st: &NodeState, name: &UserName) -> Option<Document> {
    let id = name.id();
    st.durable
        .store
        .collections
        .get(USERS_NS)?
        .iter()
        .find(|d| d.get_str("_id").ok() == Some(id.as_str()))
        .cloned()
}

fn any_user(st: &NodeState) -> bool {
    st.durable
        .store
        .collections
        .get(USERS_NS)
        .is_some_and(|c| !c.is_empty())
}

fn user_not_found(name: &UserName) -> ServerError {
    ServerError::user_not_found(format!(
        "Could not find user \"{}\" for db \"{}\"",
        name.user, name.db
    ))
}

pub(super) fn logout(session: &mut ClientSession) -> Document {
    session.user = None;
    session.conversations.clear();
    doc! {}
}

impl Node {
    /// The check before every command (`auth::authorize`).
    pub(super) fn authorize(
        &self,
        session: &ClientSession,
        name: &str,
        body: &Document,
    ) -> Result<(), ServerError> {
        let security = &self.inner.opts.security;
        if !security.enabled() || session.internal {
            return Ok(());
        }
        let st = self.lock();
        authorize(
            security,
            session,
            name,
            body,
            &db_of(body),
            |u| find_user(&st, u),
            any_user(&st),
        )
    }

    /// Whether the client may see database `db` in listDatabases.
    pub(super) fn may_see_database(&self, session: &ClientSession, db: &str) -> bool {
        let st = self.lock();
        crate::auth::may_see_database(&self.inner.opts.security, session, db, |u| {
            find_user(&st, u)
        })
    }

    pub(super) fn cmd_sasl_start(
        &self,
        body: &Document,
        session: &mut ClientSession,
    ) -> Result<Document, ServerError> {
        let db = db_of(body);
        let st = self.lock();
        sasl_start(
            session,
            body,
            &db,
            |u| find_user(&st, u),
            self.inner.system_credentials.as_ref(),
        )
    }

    pub(super) fn cmd_sasl_continue(
        &self,
        body: &Document,
        session: &mut ClientSession,
    ) -> Result<Document, ServerError> {
        sasl_continue(session, body)
    }

    /// hello's `saslSupportedMechs: "<db>.<user>"` and `speculativeAuthenticate` (the
    /// drivers' authentication handshake spec; the server answers both in its hello
    /// reply, src/mongo/db/repl/hello/hello_auth.cpp).
    pub(super) fn hello_auth_fields(
        &self,
        body: &Document,
        session: &mut ClientSession,
        reply: &mut Document,
    ) {
        if let Ok(name) = body.get_str("saslSupportedMechs") {
            if let Some((db, user)) = name.split_once('.') {
                let un = UserName::new(user, db);
                let mechs = if un == UserName::system() {
                    self.inner
                        .system_credentials
                        .as_ref()
                        .map(|_| vec!["SCRAM-SHA-1", "SCRAM-SHA-256"])
                } else {
                    find_user(&self.lock(), &un).map(|d| user_mechanisms(&d))
                };
                if let Some(m) = mechs {
                    reply.insert("saslSupportedMechs", m);
                }
            }
        }
        if let Ok(spec) = body.get_document("speculativeAuthenticate") {
            if spec.contains_key("saslStart") {
                let db = spec.get_str("db").unwrap_or("admin").to_string();
                let mut start = spec.clone();
                start.insert("$db", db);
                if let Ok(r) = self.cmd_sasl_start(&start, session) {
                    reply.insert("speculativeAuthenticate", r);
                }
            }
        }
    }

    /// connectionStatus: who this connection is authenticated as, and with
    /// `showPrivileges`, nothing more than the roles (privileges are not listed).
    pub(super) fn cmd_connection_status(
        &self,
        _body: &Document,
        session: &ClientSession,
    ) -> Document {
        let (users, roles) = match &session.user {
            Some(u) if !session.internal => {
                let roles = if *u == UserName::system() {
                    vec![Bson::Document(doc! {"role": "__system", "db": "admin"})]
                } else {
                    find_user(&self.lock(), u)
                        .map(|d| {
                            user_roles(&d)
                                .iter()
                                .map(|r| Bson::Document(r.to_document()))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                (vec![Bson::Document(u.to_document())], roles)
            }
            _ => (Vec::new(), Vec::new()),
        };
        doc! {"authInfo": {"authenticatedUsers": users, "authenticatedUserRoles": roles}}
    }

    pub(super) async fn cmd_create_user(&self, body: &Document) -> Result<Document, ServerError> {
        let db = db_of(body);
        self.write(body, |st| {
            let d = new_user_document(body, &db, |id| {
                st.durable
                    .store
                    .collections
                    .get(USERS_NS)
                    .is_some_and(|c| c.iter().any(|u| u.get_str("_id").ok() == Some(id)))
            })?;
            Ok((vec![Write::insert(USERS_NS, d)], ()))
        })
        .await
        .map(|(_, wce)| wce)
    }

    async fn change_user(
        &self,
        body: &Document,
        cmd: &str,
        change: impl FnOnce(&Document, &str) -> Result<Document, ServerError>,
    ) -> Result<Document, ServerError> {
        let db = db_of(body);
        let user = body
            .get_str(cmd)
            .map_err(|_| ServerError::bad_value(format!("{cmd} needs a user name string")))?;
        let name = UserName::new(user, &db);
        self.write(body, |st| {
            let old = find_user(st, &name).ok_or_else(|| user_not_found(&name))?;
            Ok((vec![Write::update(USERS_NS, change(&old, &db)?)], ()))
        })
        .await
        .map(|(_, wce)| wce)
    }

    pub(super) async fn cmd_update_user(&self, body: &Document) -> Result<Document, ServerError> {
        self.change_user(body, "updateUser", |old, db| {
            updated_user_document(old, body, db)
        })
        .await
    }

    pub(super) async fn cmd_grant_roles_to_user(
        &self,
        body: &Document,
    ) -> Result<Document, ServerError> {
        self.change_user(body, "grantRolesToUser", |old, db| {
            with_granted_roles(old, body, db)
        })
        .await
    }

    pub(super) async fn cmd_drop_user(&self, body: &Document) -> Result<Document, ServerError> {
        let db = db_of(body);
        let user = body
            .get_str("dropUser")
            .map_err(|_| ServerError::bad_value("dropUser needs a user name string"))?;
        let name = UserName::new(user, &db);
        self.write(body, |st| {
            if find_user(st, &name).is_none() {
                return Err(ServerError::user_not_found(format!(
                    "User '{name}' not found"
                )));
            }
            Ok((vec![Write::delete(USERS_NS, Bson::String(name.id()))], ()))
        })
        .await
        .map(|(_, wce)| wce)
    }

    /// usersInfo: `1` (every user of the database), a name, `{user, db}` or a list; with
    /// `forAllDBs: true` every user. A client without viewUser sees only itself.
    pub(super) fn cmd_users_info(
        &self,
        body: &Document,
        session: &ClientSession,
    ) -> Result<Document, ServerError> {
        let db = db_of(body);
        let arg = body.get("usersInfo").cloned().unwrap_or(Bson::Int32(1));
        let show_credentials = body.get_bool("showCredentials").unwrap_or(false);
        let all_dbs = matches!(&arg, Bson::Document(d) if d.get_bool("forAllDBs").unwrap_or(false));
        let names = if all_dbs {
            None
        } else {
            users_info_names(&arg, &db)?
        };
        let st = self.lock();
        let users: Vec<Document> = st
            .durable
            .store
            .collections
            .get(USERS_NS)
            .cloned()
            .unwrap_or_default();
        let wanted: Vec<&Document> = users
            .iter()
            .filter(|u| {
                let un = UserName::new(
                    u.get_str("user").unwrap_or_default(),
                    u.get_str("db").unwrap_or_default(),
                );
                match &names {
                    None => all_dbs || un.db == db,
                    Some(list) => list.contains(&un),
                }
            })
            .collect();
        // Viewing others needs viewUser on their database; oneself is always allowed.
        let security = &self.inner.opts.security;
        for u in &wanted {
            let udb = u.get_str("db").unwrap_or_default();
            let un = UserName::new(u.get_str("user").unwrap_or_default(), udb);
            let view = Privilege::on_db(udb, Action::ViewUser);
            if session.user.as_ref() != Some(&un)
                && !holds(security, session, &view, |x| find_user(&st, x))
            {
                return Err(ServerError::unauthorized(format!(
                    "not authorized on {db} to execute command {body}"
                )));
            }
        }
        let out: Vec<Bson> = wanted
            .into_iter()
            .map(|u| Bson::Document(user_info(u, show_credentials)))
            .collect();
        Ok(doc! {"users": out})
    }
}

impl Node {
    /// The official image's first start (docker-entrypoint.sh): with
    /// `MONGO_INITDB_ROOT_USERNAME` and a password, and an empty data directory, it starts
    /// mongod without `--replSet` and `--auth`, creates the user with the `root` role in
    /// `admin`, runs the init scripts (which create more users: see
    /// [`crate::auth::initdb`]), and restarts mongod with `--auth`. Here the users are written
    /// to this member's own data as such standalone writes would be: oplog entries before any
    /// term (`t: -1`), so that a set initiated on this member carries them to the others, and
    /// a member that joins another set replaces them by initial sync. Returns false (and
    /// writes nothing) when the data set is not empty, as the entrypoint skips it then.
    pub fn bootstrap_users(
        &self,
        users: &[crate::auth::initdb::InitUser],
    ) -> Result<bool, ServerError> {
        let mut st = self.lock();
        if !st.durable.store.oplog.is_empty() || st.config().is_some() {
            return Ok(false);
        }
        let mut created: Vec<String> = Vec::new();
        for u in users {
            let roles: Vec<Bson> = u
                .roles
                .iter()
                .map(|r| Bson::Document(doc! {"role": &r.role, "db": &r.db}))
                .collect();
            let body = doc! {"createUser": &u.user, "pwd": &u.password, "roles": roles};
            let d = new_user_document(&body, &u.db, |id| created.iter().any(|c| c == id))?;
            created.push(UserName::new(&u.user, &u.db).id());
            let optime = crate::oplog::OpTime {
                ts: crate::oplog::next_timestamp(st.last_applied().ts),
                t: -1,
            };
            st.durable.store.apply(crate::oplog::OplogEntry {
                optime,
                op: "i".into(),
                ns: USERS_NS.into(),
                o: d,
                wall: bson::DateTime::now(),
            });
            tracing::info!(user = %u.user, db = %u.db, "created a user of the first start");
        }
        drop(st);
        // With --dbpath the users are on disk before the member answers anyone.
        self.flush();
        Ok(true)
    }
}
