//! Users as mongod keeps them: one document per user in `admin.system.users`, whatever the
//! user's database, written through the oplog like any other write so that every member has
//! them (src/mongo/db/auth/user_document_parser.cpp, the manual's "system.users Collection").
//!
//! ```text
//! { _id: "<db>.<user>", userId: UUID, user, db,
//!   credentials: { "SCRAM-SHA-1": {iterationCount, salt, storedKey, serverKey},
//!                  "SCRAM-SHA-256": {...} },
//!   roles: [ {role, db} ], customData? }
//! ```
//!
//! This module parses the user commands' arguments and builds the documents; the commands
//! themselves (which write through the oplog) are in commands/auth.rs.

use bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use rand::Rng;

use super::roles::is_builtin;
use super::scram::{Credential, Mechanism};
use crate::error::ServerError;

/// `admin.system.users`.
pub const USERS_NS: &str = "admin.system.users";

/// A user's name: `user@db`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserName {
    pub user: String,
    pub db: String,
}

impl UserName {
    pub fn new(user: &str, db: &str) -> UserName {
        UserName {
            user: user.to_string(),
            db: db.to_string(),
        }
    }

    /// The `_id` of the user's document.
    pub fn id(&self) -> String {
        format!("{}.{}", self.db, self.user)
    }

    /// `local.__system`, the user members authenticate as with the key file.
    pub fn system() -> UserName {
        UserName::new("__system", "local")
    }

    pub fn to_document(&self) -> Document {
        doc! {"user": self.user.clone(), "db": self.db.clone()}
    }
}

impl std::fmt::Display for UserName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.user, self.db)
    }
}

/// A role a user holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleName {
    pub role: String,
    pub db: String,
}

impl RoleName {
    pub fn to_document(&self) -> Document {
        doc! {"role": self.role.clone(), "db": self.db.clone()}
    }
}

/// `roles: ["readWrite", {role: "read", db: "other"}]` of a user command on `db`; every role
/// must exist (RoleNotFound 31 otherwise, "Could not find role: x@db").
pub fn parse_roles(value: Option<&Bson>, db: &str) -> Result<Vec<RoleName>, ServerError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Bson::Array(list) = value else {
        return Err(ServerError::bad_value("\"roles\" field must be an array"));
    };
    let mut out: Vec<RoleName> = Vec::new();
    for r in list {
        let role = match r {
            Bson::String(s) => RoleName {
                role: s.clone(),
                db: db.to_string(),
            },
            Bson::Document(d) => {
                let (Ok(role), Ok(rdb)) = (d.get_str("role"), d.get_str("db")) else {
                    return Err(ServerError::bad_value(format!(
                        "Role names must be either strings or objects of the form {{role: \"<role>\", db: \"<db>\"}}, got {d}"
                    )));
                };
                RoleName {
                    role: role.to_string(),
                    db: rdb.to_string(),
                }
            }
            other => {
                return Err(ServerError::bad_value(format!(
                    "Role names must be either strings or objects, got {other}"
                )))
            }
        };
        if !is_builtin(&role.role, &role.db) {
            return Err(ServerError::role_not_found(format!(
                "Could not find role: {}@{}",
                role.role, role.db
            )));
        }
        if !out.contains(&role) {
            out.push(role);
        }
    }
    Ok(out)
}

/// `mechanisms` of createUser / updateUser: default both; only SCRAM-SHA-1 and -256.
fn parse_mechanisms(body: &Document) -> Result<Vec<Mechanism>, ServerError> {
    match body.get("mechanisms") {
        None => Ok(vec![Mechanism::Sha1, Mechanism::Sha256]),
        Some(Bson::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|m| {
                m.as_str()
                    .and_then(Mechanism::parse)
                    .ok_or_else(|| ServerError::bad_value(format!("Unknown auth mechanism '{m}'")))
            })
            .collect(),
        Some(_) => Err(ServerError::bad_value(
            "mechanisms field must be a non-empty array of strings",
        )),
    }
}

/// The `credentials` of a new password.
pub fn credentials(
    user: &str,
    pwd: &str,
    mechanisms: &[Mechanism],
    digest_password: bool,
) -> Result<Document, ServerError> {
    if pwd.is_empty() {
        return Err(ServerError::bad_value("Password cannot be empty"));
    }
    let mut d = Document::new();
    for &m in mechanisms {
        let normalized = match m {
            // digestPassword: false means the client already sent the MD5 digest.
            Mechanism::Sha1 if !digest_password => pwd.to_string(),
            _ => m.normalize_password(user, pwd).map_err(|e| {
                ServerError::bad_value(format!("Error preflighting {} password: {e}", m.name()))
            })?,
        };
        let cred = Credential::new(m, &normalized, m.default_iterations());
        d.insert(m.name(), cred.to_document());
    }
    Ok(d)
}

fn password(body: &Document, cmd: &str) -> Result<Option<String>, ServerError> {
    match body.get("pwd") {
        None => Ok(None),
        Some(Bson::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ServerError::bad_value(format!(
            "BSON field '{cmd}.pwd' is the wrong type, expected type 'string'"
        ))),
    }
}

/// The document `createUser` on `db` inserts; `exists` says whether the `_id` is taken.
pub fn new_user_document(
    body: &Document,
    db: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<Document, ServerError> {
    let user = body
        .get_str("createUser")
        .map_err(|_| ServerError::bad_value("createUser needs a user name string"))?;
    if user.is_empty() {
        return Err(ServerError::bad_value(
            "User document needs 'user' field to be non-empty",
        ));
    }
    if db == "local" {
        return Err(ServerError::bad_value(
            "Cannot create users in the local database",
        ));
    }
    let name = UserName::new(user, db);
    let roles = parse_roles(body.get("roles"), db)?;
    if !body.contains_key("roles") {
        return Err(ServerError::bad_value(
            "BSON field 'createUser.roles' is missing but a required field",
        ));
    }
    let pwd = password(body, "createUser")?.ok_or_else(|| {
        ServerError::bad_value("Must provide a 'pwd' field for all user documents, except those with '$external' as the user's source db")
    })?;
    let digest = body.get_bool("digestPassword").unwrap_or(true);
    let creds = credentials(user, &pwd, &parse_mechanisms(body)?, digest)?;
    if exists(&name.id()) {
        return Err(ServerError {
            code: 51003,
            code_name: "Location51003",
            message: format!("User \"{name}\" already exists"),
        });
    }
    let mut uuid = [0u8; 16];
    rand::rng().fill(&mut uuid);
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let mut d = doc! {
        "_id": name.id(),
        "userId": Binary { subtype: BinarySubtype::Uuid, bytes: uuid.to_vec() },
        "user": user,
        "db": db,
        "credentials": creds,
        "roles": roles_bson(&roles),
    };
    if let Some(c) = body.get("customData") {
        d.insert("customData", c.clone());
    }
    Ok(d)
}

/// The new document of `updateUser` (a replacement of `old`).
pub fn updated_user_document(
    old: &Document,
    body: &Document,
    db: &str,
) -> Result<Document, ServerError> {
    let user = old.get_str("user").unwrap_or_default().to_string();
    let mut d = old.clone();
    let mut changed = false;
    if let Some(pwd) = password(body, "updateUser")? {
        let digest = body.get_bool("digestPassword").unwrap_or(true);
        d.insert(
            "credentials",
            credentials(&user, &pwd, &parse_mechanisms(body)?, digest)?,
        );
        changed = true;
    }
    if body.contains_key("roles") {
        d.insert("roles", roles_bson(&parse_roles(body.get("roles"), db)?));
        changed = true;
    }
    if let Some(c) = body.get("customData") {
        d.insert("customData", c.clone());
        changed = true;
    }
    if !changed {
        return Err(ServerError::bad_value(
            "Must specify at least one field to update in updateUser",
        ));
    }
    Ok(d)
}

/// Roles as a user document holds them: `[{role, db}, ...]`.
fn roles_bson(roles: &[RoleName]) -> Vec<Bson> {
    roles
        .iter()
        .map(|r| Bson::Document(r.to_document()))
        .collect()
}

/// `grantRolesToUser`: `old` with the roles of `body` added.
pub fn with_granted_roles(
    old: &Document,
    body: &Document,
    db: &str,
) -> Result<Document, ServerError> {
    if !body.contains_key("roles") {
        return Err(ServerError::bad_value(
            "BSON field 'grantRolesToUser.roles' is missing but a required field",
        ));
    }
    let add = parse_roles(body.get("roles"), db)?;
    let mut roles = user_roles(old);
    for r in add {
        if !roles.contains(&r) {
            roles.push(r);
        }
    }
    let mut d = old.clone();
    d.insert("roles", roles_bson(&roles));
    Ok(d)
}

/// The roles of a user document.
pub fn user_roles(user: &Document) -> Vec<RoleName> {
    user.get_array("roles")
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    let r = r.as_document()?;
                    Some(RoleName {
                        role: r.get_str("role").ok()?.to_string(),
                        db: r.get_str("db").ok()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One mechanism's credential of a user document.
pub fn user_credential(user: &Document, mech: Mechanism) -> Option<Credential> {
    Credential::from_document(
        user.get_document("credentials")
            .ok()?
            .get_document(mech.name())
            .ok()?,
    )
}

/// The mechanisms a user document has credentials for, in hello's `saslSupportedMechs` order.
pub fn user_mechanisms(user: &Document) -> Vec<&'static str> {
    [Mechanism::Sha1, Mechanism::Sha256]
        .into_iter()
        .filter(|m| user_credential(user, *m).is_some())
        .map(|m| m.name())
        .collect()
}

/// A user document as `usersInfo` shows it: without credentials unless asked, with
/// `mechanisms`.
pub fn user_info(user: &Document, show_credentials: bool) -> Document {
    let mut d = doc! {
        "_id": user.get("_id").cloned().unwrap_or(Bson::Null),
        "userId": user.get("userId").cloned().unwrap_or(Bson::Null),
        "user": user.get("user").cloned().unwrap_or(Bson::Null),
        "db": user.get("db").cloned().unwrap_or(Bson::Null),
    };
    if let Some(c) = user.get("customData") {
        d.insert("customData", c.clone());
    }
    d.insert(
        "roles",
        user.get("roles").cloned().unwrap_or(Bson::Array(vec![])),
    );
    if show_credentials {
        if let Some(c) = user.get("credentials") {
            d.insert("credentials", c.clone());
        }
    }
    d.insert(
        "mechanisms",
        user_mechanisms(user)
            .into_iter()
            .map(Bson::from)
            .collect::<Vec<_>>(),
    );
    d
}

/// Which users `usersInfo: <arg>` on `db` names: `None` for "every user of the database"
/// (`usersInfo: 1`), else the list.
pub fn users_info_names(arg: &Bson, db: &str) -> Result<Option<Vec<UserName>>, ServerError> {
    let one = |b: &Bson| -> Result<UserName, ServerError> {
        match b {
            Bson::String(s) => Ok(UserName::new(s, db)),
            Bson::Document(d) => match (d.get_str("user"), d.get_str("db")) {
                (Ok(u), Ok(d)) => Ok(UserName::new(u, d)),
                _ => Err(ServerError::bad_value(
                    "User name must be a string or an object with user and db fields",
                )),
            },
            _ => Err(ServerError::bad_value(
                "User name must be a string or an object with user and db fields",
            )),
        }
    };
    match arg {
        Bson::Int32(1) | Bson::Int64(1) | Bson::Double(_)
            if crate::config::number(arg) == Some(1) =>
        {
            Ok(None)
        }
        Bson::Array(a) => a.iter().map(one).collect::<Result<Vec<_>, _>>().map(Some),
        other => one(other).map(|u| Some(vec![u])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_user_builds_the_server_document() {
        let body = doc! {"createUser": "app", "pwd": "pw", "roles": ["readWrite", {"role": "read", "db": "other"}]};
        let d = new_user_document(&body, "shop", |_| false).expect("valid");
        assert_eq!(d.get_str("_id").ok(), Some("shop.app"));
        assert_eq!(user_mechanisms(&d), vec!["SCRAM-SHA-1", "SCRAM-SHA-256"]);
        assert_eq!(
            user_roles(&d),
            vec![
                RoleName {
                    role: "readWrite".into(),
                    db: "shop".into()
                },
                RoleName {
                    role: "read".into(),
                    db: "other".into()
                }
            ]
        );
        let cred = user_credential(&d, Mechanism::Sha256).expect("sha256");
        assert_eq!(cred.iterations, 15_000);
        assert_eq!(cred.salt.len(), 28);
        assert_eq!(
            user_credential(&d, Mechanism::Sha1).map(|c| c.salt.len()),
            Some(16)
        );
    }

    #[test]
    fn bad_user_commands_are_refused_with_the_server_codes() {
        let dup = new_user_document(
            &doc! {"createUser": "a", "pwd": "p", "roles": []},
            "admin",
            |_| true,
        );
        assert_eq!(dup.err().map(|e| e.code), Some(51003));
        let role = new_user_document(
            &doc! {"createUser": "a", "pwd": "p", "roles": ["root"]},
            "shop",
            |_| false,
        );
        let e = role.expect_err("root exists only in admin");
        assert_eq!(
            (e.code, e.message.as_str()),
            (31, "Could not find role: root@shop")
        );
        let nopwd = new_user_document(&doc! {"createUser": "a", "roles": []}, "admin", |_| false);
        assert_eq!(nopwd.err().map(|e| e.code), Some(2));
    }
}
