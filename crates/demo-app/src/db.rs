//! The application's use of MongoDB: one client on the replica set's connection string, majority
//! writes and majority reads of small documents `{_id, value, writer, at}`, and for the
//! fault-injection workload (workload.rs) documents `{_id, v, c}` and a majority read of every
//! document of a run.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{
    Acknowledgment, ClientOptions, ReadConcern, ReadPreference, SelectionCriteria, WriteConcern,
};
use mongodb::{Client, Collection};

/// How long the driver may look for a suitable member (a primary) before an operation fails.
const SELECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a workload write waits for a majority (`wtimeout`) before the server answers with a
/// write-concern error.
const WORKLOAD_WTIMEOUT: Duration = Duration::from_secs(10);

/// A failed database operation.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("the connection string {uri:?} is not valid: {source}")]
    BadUri {
        uri: String,
        source: mongodb::error::Error,
    },
    #[error("a document with _id {id:?} already exists")]
    Duplicate { id: String },
    #[error("{op} failed: {source}")]
    Mongo {
        op: &'static str,
        source: mongodb::error::Error,
    },
}

/// Where the documents are and who the application is: its database and collection, and
/// the user it logs in as (SCRAM, the password from a file).
#[derive(Debug, Clone)]
pub struct Access {
    pub database: String,
    pub collection: String,
    pub login: Option<Login>,
    pub tls: MongoTls,
}

/// A MongoDB user of the application. The password is never printed.
#[derive(Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
    /// The database the user is defined in (`authSource`).
    pub source: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login({}@{}, <redacted>)", self.username, self.source)
    }
}

/// TLS to the members (`--mongo-tls`, `--mongo-tls-ca-file`), on top of what the connection
/// string says: the published URI carries `tls=true` but never a CA file, which is the
/// application's own (a Docker secret).
#[derive(Debug, Clone, Default)]
pub struct MongoTls {
    /// Use TLS even if the connection string does not say so.
    pub enabled: bool,
    /// Trust this CA's PEM instead of the system's roots; implies `enabled`.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Whether the driver retries a write once after a retryable error (its `retryWrites`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRetries {
    /// As the connection string says (the driver's default: on).
    Driver,
    /// Off: every write is one attempt, so the error of a failed write is the answer to that
    /// attempt. With retries, a first attempt that may have been applied (a network error) can
    /// be followed by a retry that the server refuses (NotWritablePrimary), and the driver
    /// returns the refusal: a write that looks certainly not applied may have been.
    Off,
}

/// The documents of the demo, in one collection.
#[derive(Debug, Clone)]
pub struct Db {
    client: Client,
    docs: Collection<Document>,
}

impl Db {
    /// A client for `uri` (`mongodb://h1:p,h2:p/?replicaSet=rs0`). The driver finds the primary
    /// and follows it through elections and reconfigs; nothing is contacted yet.
    pub async fn connect(uri: &str, access: &Access) -> Result<Db, DbError> {
        Db::connect_with(uri, access, WriteRetries::Driver).await
    }

    /// [`Db::connect`], with the driver's write retries as `retries` says.
    pub async fn connect_with(
        uri: &str,
        access: &Access,
        retries: WriteRetries,
    ) -> Result<Db, DbError> {
        let bad = |source| DbError::BadUri {
            uri: uri.to_string(),
            source,
        };
        let mut options = ClientOptions::parse(uri).await.map_err(bad)?;
        options.app_name = Some("replset-demo-app".into());
        options.server_selection_timeout = Some(SELECTION_TIMEOUT);
        options.connect_timeout = Some(Duration::from_secs(5));
        if retries == WriteRetries::Off {
            options.retry_writes = Some(false);
        }
        if let Some(login) = &access.login {
            options.credential = Some(
                mongodb::options::Credential::builder()
                    .username(login.username.clone())
                    .password(login.password.clone())
                    .source(login.source.clone())
                    .build(),
            );
        }
        let uri_tls = matches!(options.tls, Some(mongodb::options::Tls::Enabled(_)));
        let tls = &access.tls;
        if tls.enabled || tls.ca_file.is_some() || uri_tls {
            let mut tls_options = match options.tls.take() {
                Some(mongodb::options::Tls::Enabled(o)) => o,
                _ => mongodb::options::TlsOptions::default(),
            };
            if let Some(ca) = &tls.ca_file {
                tls_options.ca_file_path = Some(ca.clone());
            }
            options.tls = Some(mongodb::options::Tls::Enabled(tls_options));
        }
        let client = Client::with_options(options).map_err(bad)?;
        let docs = client
            .database(&access.database)
            .collection(&access.collection);
        Ok(Db { client, docs })
    }

    /// Inserts `{_id: id, value, writer, at}` and waits until a majority of the voting members
    /// have it: a write acknowledged here survives the loss of any minority.
    pub async fn write(&self, id: &str, value: &str, writer: &str) -> Result<(), DbError> {
        let document = doc! {
            "_id": id,
            "value": value,
            "writer": writer,
            "at": bson::DateTime::now(),
        };
        self.docs
            .insert_one(document)
            .write_concern(WriteConcern::majority())
            .await
            .map(|_| ())
            .map_err(|source| {
                if is_duplicate(&source) {
                    DbError::Duplicate { id: id.to_string() }
                } else {
                    DbError::Mongo {
                        op: "insert (w: majority)",
                        source,
                    }
                }
            })
    }

    /// Reads the document `id` with read concern majority: only data that cannot be rolled back.
    pub async fn read(&self, id: &str) -> Result<Option<Document>, DbError> {
        self.docs
            .find_one(doc! {"_id": id})
            .read_concern(ReadConcern::majority())
            .await
            .map_err(|source| DbError::Mongo {
                op: "find (read concern majority)",
                source,
            })
    }

    /// Inserts the workload's document `{_id: id, v: value, c: client}` with write concern
    /// majority and a `wtimeout` of 10 s. The driver's error is returned as it is (no
    /// duplicate-key shortcut): the workload classifies it.
    pub async fn insert_value(&self, id: &str, value: &str, client: u32) -> Result<(), DbError> {
        let concern = WriteConcern::builder()
            .w(Acknowledgment::Majority)
            .w_timeout(WORKLOAD_WTIMEOUT)
            .build();
        self.docs
            .insert_one(doc! {"_id": id, "v": value, "c": i64::from(client)})
            .write_concern(concern)
            .await
            .map(|_| ())
            .map_err(|source| DbError::Mongo {
                op: "insert (w: majority, wtimeout 10s)",
                source,
            })
    }

    /// The `v` of the workload's document `id` (read concern majority, on the primary):
    /// `None` when there is no such document.
    pub async fn read_value(&self, id: &str) -> Result<Option<Option<String>>, DbError> {
        self.docs
            .find_one(doc! {"_id": id})
            .read_concern(ReadConcern::majority())
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await
            .map(|found| found.map(|d| value_of(&d)))
            .map_err(|source| DbError::Mongo {
                op: "find (read concern majority, primary)",
                source,
            })
    }

    /// Every document whose `_id` is a string that starts with `prefix`, as `(id, v)` in `_id`
    /// order (read concern majority, on the primary). The filter is a range of strings
    /// (`$gte: prefix, $lt: <the next prefix>`), which any server evaluates from the `_id`
    /// index; the prefix is checked again here.
    pub async fn values_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Option<String>)>, DbError> {
        let failed = |source| DbError::Mongo {
            op: "find by _id prefix (read concern majority, primary)",
            source,
        };
        let mut range = doc! {"$gte": prefix};
        if let Some(upper) = prefix_successor(prefix) {
            range.insert("$lt", upper);
        }
        let mut cursor = self
            .docs
            .find(doc! {"_id": range})
            .sort(doc! {"_id": 1})
            .read_concern(ReadConcern::majority())
            .selection_criteria(SelectionCriteria::ReadPreference(ReadPreference::Primary))
            .await
            .map_err(failed)?;
        let mut found = Vec::new();
        while cursor.advance().await.map_err(failed)? {
            let d = cursor.deserialize_current().map_err(failed)?;
            match d.get_str("_id") {
                Ok(id) if id.starts_with(prefix) => found.push((id.to_string(), value_of(&d))),
                _ => {}
            }
        }
        Ok(found)
    }

    /// The primary as the primary itself reports it (`hello`), e.g. `10.0.1.5:27017`.
    pub async fn primary(&self) -> Result<String, DbError> {
        let reply = self
            .client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
            .map_err(|source| DbError::Mongo {
                op: "hello",
                source,
            })?;
        Ok(reply
            .get_str("primary")
            .or_else(|_| reply.get_str("me"))
            .unwrap_or("unknown")
            .to_string())
    }
}

/// The `v` of a workload document: its text, or the relaxed extended JSON of a value that is
/// not a string; `None` if it has none.
fn value_of(d: &Document) -> Option<String> {
    match d.get("v")? {
        bson::Bson::String(s) => Some(s.clone()),
        other => Some(other.clone().into_relaxed_extjson().to_string()),
    }
}

/// The least string greater than every string that starts with `prefix` (its last character
/// that can be, incremented; what follows it dropped); `None` if there is none (empty, or only
/// `char::MAX`). Strings compare by their UTF-8 bytes, which is code point order.
fn prefix_successor(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}

#[cfg(test)]
mod prefix_tests {
    use super::prefix_successor;

    #[test]
    fn the_successor_of_a_prefix_bounds_exactly_the_strings_that_start_with_it() {
        assert_eq!(prefix_successor("run1-").as_deref(), Some("run1."));
        assert_eq!(prefix_successor("az").as_deref(), Some("a{"));
        // Past the surrogates, which are no characters.
        assert_eq!(prefix_successor("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_successor("\u{10FFFF}"), None);
        assert_eq!(prefix_successor(""), None);
        let upper = prefix_successor("r-1").unwrap_or_default();
        for inside in ["r-1", "r-1-c1-1", "r-1\u{10FFFF}\u{10FFFF}"] {
            assert!(inside >= "r-1" && inside < upper.as_str(), "{inside}");
        }
        for outside in ["r-2", "r-", "r-0", "r.1"] {
            assert!(!(outside >= "r-1" && outside < upper.as_str()), "{outside}");
        }
    }
}

#[cfg(test)]
mod login_tests {
    use super::Login;

    #[test]
    fn a_login_never_prints_its_password() {
        let l = Login {
            username: "app".into(),
            password: "hunter2-secret".into(),
            source: "app".into(),
        };
        let shown = format!("{l:?}");
        assert!(
            shown.contains("app@app") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
