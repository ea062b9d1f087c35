//! The application's use of MongoDB: one client on the replica set's connection string, majority
//! writes and majority reads of small documents `{_id, value, writer, at}`.

use std::time::Duration;

use bson::{doc, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, ReadConcern, WriteConcern};
use mongodb::{Client, Collection};

/// How long the driver may look for a suitable member (a primary) before an operation fails.
const SELECTION_TIMEOUT: Duration = Duration::from_secs(10);

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
        let bad = |source| DbError::BadUri {
            uri: uri.to_string(),
            source,
        };
        let mut options = ClientOptions::parse(uri).await.map_err(bad)?;
        options.app_name = Some("replset-demo-app".into());
        options.server_selection_timeout = Some(SELECTION_TIMEOUT);
        options.connect_timeout = Some(Duration::from_secs(5));
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

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
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
