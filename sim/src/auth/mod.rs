//! Authentication and authorization as mongod 7.0 does them: `--auth`, `--keyFile` (internal
//! authentication as `__system`, which implies `--auth`), SCRAM-SHA-1 and SCRAM-SHA-256, users
//! in `admin.system.users`, the built-in roles, a privilege check before every command, and
//! the localhost exception. See docs/replset-sim.md, "Authentication".

pub mod initdb;
pub mod roles;
pub mod sasl;
pub mod scram;
pub mod users;

use bson::Document;
use std::path::{Path, PathBuf};

use crate::error::ServerError;
use roles::{localhost_exception_allows, requirement, role_grants, Requirement};
use scram::{Credential, Mechanism};
use users::{user_roles, UserName};

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("error opening file: {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permissions on {path} are too open: a key file must not be readable by group or others (chmod 400 {path})")]
    TooOpen { path: PathBuf },
    #[error("invalid char in key file {path}: {ch:?} (a key is base64 characters only)")]
    InvalidChar { path: PathBuf, ch: char },
    #[error("security key in {path} is too short: a key must be at least 6 characters")]
    TooShort { path: PathBuf },
    #[error("security key in {path} is too long: a key must be at most 1024 characters")]
    TooLong { path: PathBuf },
}

/// The shared secret of `--keyFile`: the file's characters without whitespace
/// (src/mongo/db/auth/security_file.cpp, security_key.cpp).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyFile {
    key: String,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyFile(<redacted>)")
    }
}

impl KeyFile {
    /// Reads and checks a key file as mongod does at start: not group- or world-accessible,
    /// base64 characters (whitespace ignored), 6 to 1024 of them.
    pub fn load(path: &Path) -> Result<KeyFile, KeyFileError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyFileError::TooOpen {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_contents(&text).map_err(|e| match e {
            KeyFileError::InvalidChar { ch, .. } => KeyFileError::InvalidChar {
                path: path.to_path_buf(),
                ch,
            },
            KeyFileError::TooShort { .. } => KeyFileError::TooShort {
                path: path.to_path_buf(),
            },
            KeyFileError::TooLong { .. } => KeyFileError::TooLong {
                path: path.to_path_buf(),
            },
            other => other,
        })
    }

    /// The key from a file's contents.
    pub fn from_contents(text: &str) -> Result<KeyFile, KeyFileError> {
        let key: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let path = PathBuf::from("<key>");
        if let Some(ch) = key
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '+' || *c == '/' || *c == '='))
        {
            return Err(KeyFileError::InvalidChar { path, ch });
        }
        if key.len() < 6 {
            return Err(KeyFileError::TooShort { path });
        }
        if key.len() > 1024 {
            return Err(KeyFileError::TooLong { path });
        }
        Ok(KeyFile { key })
    }

    pub(crate) fn secret(&self) -> &str {
        &self.key
    }
}

/// `--auth` and `--keyFile` of one member.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// `--auth` (`security.authorization: enabled`).
    pub authorization: bool,
    /// `--keyFile`; implies authorization.
    pub key_file: Option<KeyFile>,
}

impl Security {
    pub fn enabled(&self) -> bool {
        self.authorization || self.key_file.is_some()
    }
}

/// mongod's start-up checks of the security options (src/mongo/db/mongod_options.cpp;
/// jstests/replsets/auth_no_keyfile.js): `--auth` with `--replSet` needs a key file. Returns
/// the `__system` credentials when there is a key file.
pub fn check_startup(
    security: &Security,
    repl_set: bool,
) -> Result<Option<SystemCredentials>, String> {
    if security.authorization && repl_set && security.key_file.is_none() {
        return Err(
            "BadValue: security.keyFile is required when authorization is enabled with replica sets"
                .to_string(),
        );
    }
    match &security.key_file {
        None => Ok(None),
        Some(k) => SystemCredentials::new(k)
            .map(Some)
            .map_err(|e| format!("cannot use the key file: {e}")),
    }
}

/// The server side of `__system`: its credentials, made from the key at start.
#[derive(Debug, Clone)]
pub struct SystemCredentials {
    pub sha1: Credential,
    pub sha256: Credential,
}

impl SystemCredentials {
    pub fn new(key: &KeyFile) -> Result<SystemCredentials, scram::ScramError> {
        let make = |m: Mechanism| -> Result<Credential, scram::ScramError> {
            Ok(Credential::new(
                m,
                &m.normalize_password("__system", key.secret())?,
                m.default_iterations(),
            ))
        };
        Ok(SystemCredentials {
            sha1: make(Mechanism::Sha1)?,
            sha256: make(Mechanism::Sha256)?,
        })
    }

    pub fn get(&self, m: Mechanism) -> Credential {
        match m {
            Mechanism::Sha1 => self.sha1.clone(),
            Mechanism::Sha256 => self.sha256.clone(),
        }
    }
}

/// One client connection's authentication state.
#[derive(Debug)]
pub struct ClientSession {
    pub conn_id: i64,
    /// The peer address is a loopback address (for the localhost exception).
    pub loopback: bool,
    /// A call from inside the process (test control): runs as `__system`.
    pub internal: bool,
    pub user: Option<UserName>,
    pub(crate) conversations: std::collections::HashMap<i32, sasl::Conversation>,
    pub(crate) next_conversation: i32,
}

impl ClientSession {
    pub fn new(conn_id: i64, loopback: bool) -> ClientSession {
        ClientSession {
            conn_id,
            loopback,
            internal: false,
            user: None,
            conversations: Default::default(),
            next_conversation: 1,
        }
    }

    /// The session of in-process calls ([`crate::Cluster::command`]).
    pub fn internal() -> ClientSession {
        ClientSession {
            internal: true,
            user: Some(UserName::system()),
            ..ClientSession::new(0, true)
        }
    }
}

/// Whether the session may run command `name` with `body` on `db`
/// (`CommandHelpers::checkAuthorization` / `checkAuthorizationImplPreParse` of
/// src/mongo/db/commands.cpp and service_entry_point_common.cpp):
/// - a command with `requiresAuth() == false` always runs;
/// - without an authenticated user (and without the localhost exception), code 13
///   "Command <name> requires authentication";
/// - else every privilege the command needs must come from one of the user's roles, or
///   code 13 "not authorized on <db> to execute command { ... }".
///
/// `user_doc` finds a user's document in admin.system.users; `any_user` says whether any
/// user exists (the localhost exception applies only while none does).
pub fn authorize(
    security: &Security,
    session: &ClientSession,
    name: &str,
    body: &Document,
    db: &str,
    user_doc: impl Fn(&UserName) -> Option<Document>,
    any_user: bool,
) -> Result<(), ServerError> {
    if !security.enabled() || session.internal {
        return Ok(());
    }
    let req = requirement(name, body, db);
    let localhost_exception = session.loopback && !any_user && session.user.is_none();
    let requires_auth =
        || ServerError::unauthorized(format!("Command {name} requires authentication"));
    let not_authorized = || {
        let mut shown = body.clone();
        shown.remove("lsid");
        shown.remove("$clusterTime");
        ServerError::unauthorized(format!("not authorized on {db} to execute command {shown}"))
    };
    match req {
        Requirement::None | Requirement::UnknownCommand => Ok(()),
        Requirement::Authenticated => {
            if session.user.is_some() || localhost_exception {
                Ok(())
            } else {
                Err(requires_auth())
            }
        }
        Requirement::Privileges(privs) => {
            let Some(user) = &session.user else {
                if localhost_exception {
                    return if privs.iter().all(localhost_exception_allows) {
                        Ok(())
                    } else {
                        Err(not_authorized())
                    };
                }
                return Err(requires_auth());
            };
            let roles = if *user == UserName::system() {
                vec![users::RoleName {
                    role: "__system".into(),
                    db: "admin".into(),
                }]
            } else {
                user_doc(user).map(|d| user_roles(&d)).unwrap_or_default()
            };
            let ok = privs.iter().all(|p| {
                roles
                    .iter()
                    .any(|r| role_grants(&r.role, &r.db, p.action, &p.resource))
            });
            if ok {
                Ok(())
            } else {
                Err(not_authorized())
            }
        }
    }
}

/// Whether an authenticated user may see database `db` in `listDatabases` without the
/// listDatabases action (`authorizedDatabases`): it holds some privilege on it.
pub fn may_see_database(
    security: &Security,
    session: &ClientSession,
    db: &str,
    user_doc: impl Fn(&UserName) -> Option<Document>,
) -> bool {
    let any_of = [
        roles::Privilege::on_cluster(roles::Action::ListDatabases),
        roles::Privilege::on_db(db, roles::Action::Find),
    ];
    holds_any(security, session, &any_of, user_doc)
}

/// Whether the session's user holds `privilege` (for commands that show only what the client
/// may see: usersInfo of other users needs viewUser on their database).
pub fn holds(
    security: &Security,
    session: &ClientSession,
    privilege: &roles::Privilege,
    user_doc: impl Fn(&UserName) -> Option<Document>,
) -> bool {
    holds_any(security, session, std::slice::from_ref(privilege), user_doc)
}

/// Whether the session's user holds one of `privileges`: always without authorization or
/// for a member of the set (and `__system`), never unauthenticated.
fn holds_any(
    security: &Security,
    session: &ClientSession,
    privileges: &[roles::Privilege],
    user_doc: impl Fn(&UserName) -> Option<Document>,
) -> bool {
    if !security.enabled() || session.internal {
        return true;
    }
    let Some(user) = &session.user else {
        return false;
    };
    if *user == UserName::system() {
        return true;
    }
    let roles = user_doc(user).map(|d| user_roles(&d)).unwrap_or_default();
    privileges.iter().any(|p| {
        roles
            .iter()
            .any(|r| role_grants(&r.role, &r.db, p.action, &p.resource))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn secured() -> Security {
        Security {
            authorization: true,
            key_file: None,
        }
    }

    #[test]
    fn key_files_are_checked_as_mongod_does() {
        assert!(KeyFile::from_contents("abc def\nghi\n").is_ok());
        assert!(matches!(
            KeyFile::from_contents("abc"),
            Err(KeyFileError::TooShort { .. })
        ));
        assert!(matches!(
            KeyFile::from_contents("abcdefg!"),
            Err(KeyFileError::InvalidChar { ch: '!', .. })
        ));
        assert!(matches!(
            KeyFile::from_contents(&"a".repeat(1025)),
            Err(KeyFileError::TooLong { .. })
        ));
        let key = KeyFile::from_contents("secretkey").expect("valid key");
        assert_eq!(format!("{key:?}"), "KeyFile(<redacted>)");
    }

    /// `authorize` with authorization on and no user stored.
    fn without_users(
        session: &ClientSession,
        name: &str,
        body: &Document,
        db: &str,
        any_user: bool,
    ) -> Result<(), ServerError> {
        authorize(&secured(), session, name, body, db, |_| None, any_user)
    }

    #[test]
    fn unauthenticated_clients_get_13_except_for_the_handshake() {
        let s = ClientSession::new(1, false);
        assert!(without_users(&s, "hello", &doc! {}, "admin", true).is_ok());
        let e =
            without_users(&s, "listDatabases", &doc! {}, "admin", true).expect_err("needs a user");
        assert_eq!(e.code, 13);
        assert_eq!(e.message, "Command listDatabases requires authentication");
        // Without --auth everything runs.
        let none = |_: &UserName| None;
        let any = Security::default();
        assert!(authorize(&any, &s, "replSetReconfig", &doc! {}, "admin", none, true).is_ok());
    }

    #[test]
    fn the_localhost_exception_allows_only_the_bootstrap() {
        let local = ClientSession::new(1, true);
        let create = doc! {"createUser": "root", "pwd": "x", "roles": ["root"]};
        assert!(without_users(&local, "createUser", &create, "admin", false).is_ok());
        assert!(without_users(&local, "replSetInitiate", &doc! {}, "admin", false).is_ok());
        let find = without_users(&local, "find", &doc! {"find": "c"}, "test", false);
        assert_eq!(find.map_err(|e| e.code), Err(13));
        // Not on a remote connection, and not once a user exists.
        let remote = ClientSession::new(2, false);
        assert!(without_users(&remote, "createUser", &create, "admin", false).is_err());
        assert!(without_users(&local, "createUser", &create, "admin", true).is_err());
    }

    #[test]
    fn a_read_write_user_is_limited_to_its_database() {
        let mut s = ClientSession::new(1, false);
        s.user = Some(UserName::new("app", "shop"));
        let doc_of = |u: &UserName| {
            (u.user == "app").then(|| doc! {"roles": [{"role": "readWrite", "db": "shop"}]})
        };
        let ins = doc! {"insert": "orders"};
        assert!(authorize(&secured(), &s, "insert", &ins, "shop", doc_of, true).is_ok());
        let e =
            authorize(&secured(), &s, "insert", &ins, "other", doc_of, true).expect_err("other db");
        assert_eq!(e.code, 13);
        assert!(
            e.message
                .starts_with("not authorized on other to execute command"),
            "{}",
            e.message
        );
        assert!(authorize(
            &secured(),
            &s,
            "replSetGetStatus",
            &doc! {},
            "admin",
            doc_of,
            true
        )
        .is_err());
    }
}
