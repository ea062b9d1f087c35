//! The users a deployment declares for a member's first start, besides the root user.
//!
//! The mongo image creates the root user from `MONGO_INITDB_ROOT_USERNAME` and its password,
//! then runs the scripts of `/docker-entrypoint-initdb.d` with mongosh, as root, on a member
//! whose data directory is empty. The stack ships one such script
//! (`compose/mongo-init-users.js`) that creates the users listed in the JSON file named by
//! `MONGO_INITDB_USERS_FILE`, each with its password read from a file (a Docker secret). The
//! simulator has no JavaScript: it reads the same file itself, at the same moment, and creates
//! the same users, so that one stack file serves the mongo image and the simulator.
//!
//! The file:
//!
//! ```json
//! {"users": [
//!   {"user": "reconciler", "db": "admin",
//!    "roles": [{"role": "clusterManager", "db": "admin"}],
//!    "passwordFile": "/run/secrets/mongo_reconciler_password"}
//! ]}
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The environment variable that names the users file.
pub const USERS_FILE_VAR: &str = "MONGO_INITDB_USERS_FILE";

/// A role as `createUser` takes it: `{role, db}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRef {
    pub role: String,
    pub db: String,
}

/// One user to create on a first start. The password is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct InitUser {
    pub user: String,
    pub db: String,
    pub roles: Vec<RoleRef>,
    pub password: String,
}

impl std::fmt::Debug for InitUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InitUser({}@{}, {:?}, <redacted>)",
            self.user, self.db, self.roles
        )
    }
}

impl InitUser {
    /// The user of `MONGO_INITDB_ROOT_USERNAME`: `root` in `admin`.
    pub fn root(user: &str, password: &str) -> InitUser {
        InitUser {
            user: user.to_string(),
            db: "admin".into(),
            roles: vec![RoleRef {
                role: "root".into(),
                db: "admin".into(),
            }],
            password: password.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<Declared>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Declared {
    user: String,
    db: String,
    roles: Vec<RoleRef>,
    password_file: PathBuf,
}

/// Why the users file cannot be used. The member does not start, as the image's entrypoint
/// stops when an init script fails.
#[derive(Debug, thiserror::Error)]
pub enum InitUsersError {
    #[error("cannot read {USERS_FILE_VAR} {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{USERS_FILE_VAR} {path} is not a users file ({{\"users\": [{{\"user\", \"db\", \"roles\": [{{\"role\", \"db\"}}], \"passwordFile\"}}]}}): {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the password file {path} of user {user}: {source}")]
    Password {
        user: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {path} of user {user} is empty")]
    EmptyPassword { user: String, path: PathBuf },
}

/// Reads the users file and every password it names (the first line of each file, as the
/// script reads it).
pub fn load(path: &Path) -> Result<Vec<InitUser>, InitUsersError> {
    let text = std::fs::read_to_string(path).map_err(|source| InitUsersError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: UsersFile = serde_json::from_str(&text).map_err(|source| InitUsersError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    file.users
        .into_iter()
        .map(|d| {
            let text = std::fs::read_to_string(&d.password_file).map_err(|source| {
                InitUsersError::Password {
                    user: d.user.clone(),
                    path: d.password_file.clone(),
                    source,
                }
            })?;
            let password = first_line(&text);
            if password.is_empty() {
                return Err(InitUsersError::EmptyPassword {
                    user: d.user,
                    path: d.password_file,
                });
            }
            Ok(InitUser {
                user: d.user,
                db: d.db,
                roles: d.roles,
                password: password.to_string(),
            })
        })
        .collect()
}

/// The first line of a password file, without its line ending.
pub fn first_line(text: &str) -> &str {
    text.split(['\n', '\r']).next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "initdb-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn reads_the_users_and_their_passwords_without_printing_them() {
        let d = dir();
        std::fs::write(d.join("pw"), "s3cret-pass\nignored\n").expect("write");
        let file = d.join("users.json");
        let json = serde_json::json!({"users": [{"user": "app", "db": "app",
            "roles": [{"role": "readWrite", "db": "app"}], "passwordFile": d.join("pw")}]});
        std::fs::write(&file, json.to_string()).expect("write");
        let users = load(&file).expect("valid");
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].password, "s3cret-pass");
        assert_eq!(users[0].roles[0].role, "readWrite");
        assert!(!format!("{users:?}").contains("s3cret"));
    }

    #[test]
    fn an_unknown_field_or_a_missing_password_is_a_clear_error() {
        let d = dir();
        let file = d.join("users.json");
        std::fs::write(
            &file,
            r#"{"users": [{"user": "a", "db": "a", "roles": [], "pwd": "x"}]}"#,
        )
        .expect("write");
        let e = load(&file).expect_err("pwd is not a field of the file");
        assert!(matches!(e, InitUsersError::Parse { .. }), "{e}");
        let json = serde_json::json!({"users": [{"user": "a", "db": "a", "roles": [],
            "passwordFile": d.join("missing")}]});
        std::fs::write(&file, json.to_string()).expect("write");
        let e = load(&file).expect_err("no password file");
        assert!(
            matches!(e, InitUsersError::Password { ref user, .. } if user == "a"),
            "{e}"
        );
        std::fs::write(d.join("empty"), "\n").expect("write");
        let json = serde_json::json!({"users": [{"user": "a", "db": "a", "roles": [],
            "passwordFile": d.join("empty")}]});
        std::fs::write(&file, json.to_string()).expect("write");
        let e = load(&file).expect_err("empty password");
        assert!(matches!(e, InitUsersError::EmptyPassword { .. }), "{e}");
    }
}
