//! Talking to the members: observe the set, apply one step. The official `mongodb` driver,
//! one direct connection per member, short timeouts.
//!
//! A reconfig is applied to the config document read from the primary, so every field the
//! reconciler does not manage (settings, tags, write concern modes, ...) stays as it is.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bson::{doc, Bson, Document};
use mongodb::options::ClientOptions;
use mongodb::Client;
use tokio::sync::Mutex;

use crate::model::{
    ConfigView, MemberConfig, MemberState, MemberStatus, Observation, OpTime, Persisted,
};
use crate::plan::{Change, Step};

/// How long one command to a member may take, connection and server selection included
/// (the whole exchange is under this timeout); a reconfig's `maxTimeMS` is the same, so the
/// server stops waiting for a majority when the reconciler does.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest one step (one `replSetInitiate` or `replSetReconfig`) can take: one command. A
/// leader sends a step only while its leadership is surely valid for longer than this.
pub const STEP_TIMEOUT: Duration = COMMAND_TIMEOUT;

/// An error from a member.
#[derive(Debug, thiserror::Error)]
pub enum MongoError {
    /// The server refused the command: the code says why (e.g. 308, 103, 10107).
    #[error("{host} refused {command}: {code_name} ({code}): {message}")]
    Refused {
        host: String,
        command: &'static str,
        code: i32,
        code_name: String,
        message: String,
    },
    /// The member refused the reconciler's credentials (SCRAM failed: a wrong password, or no
    /// such user on that member).
    #[error("{host} refused to authenticate user {user:?} ({command}): {detail}; check --username and --password-file, and that the user exists with its roles on every member")]
    AuthenticationFailed {
        host: String,
        command: &'static str,
        user: String,
        detail: String,
    },
    /// No answer, or the connection broke: the outcome of a write is unknown.
    #[error("{host} did not answer {command}: {detail}")]
    NoAnswer {
        host: String,
        command: &'static str,
        detail: String,
    },
}

/// MongoDB's `Unauthorized`: the user (or an unauthenticated client) lacks a privilege.
const UNAUTHORIZED: i32 = 13;
/// MongoDB's `AuthenticationFailed`.
const AUTHENTICATION_FAILED: i32 = 18;

impl MongoError {
    pub fn code(&self) -> Option<i32> {
        match self {
            MongoError::Refused { code, .. } => Some(*code),
            MongoError::AuthenticationFailed { .. } => Some(AUTHENTICATION_FAILED),
            MongoError::NoAnswer { .. } => None,
        }
    }

    /// Whether the member refused the reconciler who it is or what it asked: a wrong
    /// password, a missing user, or a user without the roles it needs. Never "unreachable".
    pub fn is_access_refused(&self) -> bool {
        matches!(self, MongoError::AuthenticationFailed { .. }) || self.code() == Some(UNAUTHORIZED)
    }
}

/// Credentials for the members (`--username`, `--password-file`). Never printed.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// How long a member's client is kept without being used: a long-running reconciler sees many
/// addresses come and go (every rescheduled task has a new one), and each client holds a
/// monitor and a pool of connections.
pub const CLIENT_IDLE: Duration = Duration::from_secs(600);

/// Values by host, each dropped once unused for [`CLIENT_IDLE`] (checked when one is added).
#[derive(Debug)]
struct ByHost<C> {
    entries: HashMap<String, (C, std::time::Instant)>,
}

impl<C> Default for ByHost<C> {
    fn default() -> Self {
        ByHost {
            entries: HashMap::new(),
        }
    }
}

impl<C: Clone> ByHost<C> {
    /// The value of `host`, marked used at `now`.
    fn get(&mut self, host: &str, now: std::time::Instant) -> Option<C> {
        let (c, used) = self.entries.get_mut(host)?;
        *used = now;
        Some(c.clone())
    }

    /// Adds the value of `host`, dropping those unused since `now - CLIENT_IDLE`.
    fn insert(&mut self, host: &str, c: C, now: std::time::Instant) {
        self.entries
            .retain(|_, (_, used)| now.saturating_duration_since(*used) < CLIENT_IDLE);
        self.entries.insert(host.to_string(), (c, now));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// One client per member host, created on first use and dropped after [`CLIENT_IDLE`] unused.
#[derive(Debug, Default)]
pub struct Members {
    clients: Mutex<ByHost<Client>>,
    credentials: Option<Credentials>,
    tls: Option<MongoTls>,
}

/// TLS to the members (`--mongo-tls`, `--mongo-tls-ca-file`): the members' certificates are
/// checked against `ca_file` (else the system's roots), and their names against the hosts of
/// the config. The reconciler presents no certificate of its own, so the members run with
/// `--tlsAllowConnectionsWithoutCertificates` (see docs/security.md, "TLS to MongoDB").
#[derive(Debug, Clone, Default)]
pub struct MongoTls {
    pub ca_file: Option<std::path::PathBuf>,
}

/// MongoDB's `NotYetInitialized`: the member has no config (an empty dbpath).
const NOT_YET_INITIALIZED: i32 = 94;

/// What an observation read, beyond the [`Observation`]: the primary's raw config, and while
/// there is no primary the raw config each member holds.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub observation: Observation,
    pub primary_host: Option<String>,
    pub raw_config: Option<Document>,
    /// By host, the config document behind each of [`Observation::persisted`].
    pub persisted_raw: BTreeMap<String, Document>,
    /// Members that refused the reconciler's credentials or a command for lack of a role, by
    /// host, with the error: they count as not answering, and the status says why.
    pub access_refused: BTreeMap<String, String>,
}

impl Members {
    pub fn new(credentials: Option<Credentials>) -> Members {
        Members {
            clients: Mutex::new(ByHost::default()),
            credentials,
            tls: None,
        }
    }

    /// The user the reconciler logs in as, if any.
    fn user(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.username.as_str())
    }

    /// Reaches the members with TLS (`None`: plain text).
    pub fn with_tls(mut self, tls: Option<MongoTls>) -> Members {
        self.tls = tls;
        self
    }

    async fn client(&self, host: &str) -> Result<Client, MongoError> {
        if let Some(c) = self
            .clients
            .lock()
            .await
            .get(host, std::time::Instant::now())
        {
            return Ok(c);
        }
        let no_answer = |detail: String| MongoError::NoAnswer {
            host: host.to_string(),
            command: "connect",
            detail,
        };
        let mut options = ClientOptions::parse(format!("mongodb://{host}/"))
            .await
            .map_err(|e| no_answer(e.to_string()))?;
        options.direct_connection = Some(true);
        options.connect_timeout = Some(Duration::from_secs(2));
        options.server_selection_timeout = Some(Duration::from_secs(2));
        options.app_name = Some("replset-reconciler".into());
        if let Some(tls) = &self.tls {
            options.tls = Some(mongodb::options::Tls::Enabled(
                mongodb::options::TlsOptions::builder()
                    .ca_file_path(tls.ca_file.clone())
                    .build(),
            ));
        }
        if let Some(c) = &self.credentials {
            options.credential = Some(
                mongodb::options::Credential::builder()
                    .username(c.username.clone())
                    .password(c.password.clone())
                    .build(),
            );
        }
        let client = Client::with_options(options).map_err(|e| no_answer(e.to_string()))?;
        self.clients
            .lock()
            .await
            .insert(host, client.clone(), std::time::Instant::now());
        Ok(client)
    }

    /// Runs an admin command on one member.
    pub async fn command(
        &self,
        host: &str,
        name: &'static str,
        cmd: Document,
    ) -> Result<Document, MongoError> {
        let client = self.client(host).await?;
        let admin = client.database("admin");
        match tokio::time::timeout(COMMAND_TIMEOUT, admin.run_command(cmd)).await {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(map_error(host, name, self.user(), e)),
            Err(_) => Err(MongoError::NoAnswer {
                host: host.to_string(),
                command: name,
                detail: format!("no answer within {COMMAND_TIMEOUT:?}"),
            }),
        }
    }

    /// Observes the set through `hosts` (the desired hosts and the config's).
    pub async fn observe(&self, set_name: &str, hosts: &[String], desired: &[String]) -> Observed {
        let mut observed = Observed::default();
        let mut hellos: Vec<(String, Document)> = Vec::new();
        let answers = futures::future::join_all(hosts.iter().map(|h| async move {
            (h.clone(), self.command(h, "hello", doc! {"hello": 1}).await)
        }))
        .await;
        for (host, answer) in answers {
            match answer {
                Ok(hello) => {
                    if desired.contains(&host) {
                        observed.observation.hello.insert(
                            host.clone(),
                            hello.get_str("setName").ok().map(str::to_string),
                        );
                    }
                    hellos.push((host, hello));
                }
                Err(e) if e.is_access_refused() => {
                    observed.access_refused.insert(host, e.to_string());
                }
                Err(e) => tracing::debug!(%host, error = %e, "member did not answer hello"),
            }
        }
        let primary = hellos
            .iter()
            .filter(|(_, h)| {
                h.get_bool("isWritablePrimary").unwrap_or(false)
                    && h.get_str("setName").ok() == Some(set_name)
            })
            .max_by_key(|(_, h)| {
                h.get_i64("setVersion")
                    .or_else(|_| h.get_i32("setVersion").map(i64::from))
                    .unwrap_or(0)
            })
            .map(|(host, _)| host.clone());

        // The config: from the primary with its commitment status; else from any member, for
        // diagnosis only.
        let sources: Vec<String> = match &primary {
            Some(p) => vec![p.clone()],
            None => hellos
                .iter()
                .filter(|(_, h)| h.get_str("setName").ok() == Some(set_name))
                .map(|(host, _)| host.clone())
                .collect(),
        };
        for host in sources {
            let cmd = if primary.is_some() {
                doc! {"replSetGetConfig": 1, "commitmentStatus": true}
            } else {
                doc! {"replSetGetConfig": 1}
            };
            let answer = match self.command(&host, "replSetGetConfig", cmd).await {
                Ok(answer) => answer,
                Err(e) => {
                    if e.is_access_refused() {
                        observed.access_refused.insert(host.clone(), e.to_string());
                    }
                    continue;
                }
            };
            let Ok(raw) = answer.get_document("config") else {
                continue;
            };
            observed.observation.committed =
                primary.is_some() && answer.get_bool("commitmentStatus").unwrap_or(false);
            observed.observation.config = Some(config_view(raw));
            observed.raw_config = Some(raw.clone());
            let status = self
                .command(&host, "replSetGetStatus", doc! {"replSetGetStatus": 1})
                .await;
            if let Err(e) = &status {
                if e.is_access_refused() {
                    observed.access_refused.insert(host.clone(), e.to_string());
                }
            }
            if let Ok(status) = status {
                observed.observation.status = member_status(&status);
                if primary.is_some() {
                    observed.observation.commit_point = status
                        .get_document("optimes")
                        .and_then(|o| o.get_document("lastCommittedOpTime"))
                        .ok()
                        .and_then(optime_of);
                    observed.observation.primary = status
                        .get_array("members")
                        .ok()
                        .and_then(|ms| {
                            ms.iter().filter_map(Bson::as_document).find(|m| {
                                m.get_i32("state")
                                    .map(i64::from)
                                    .or_else(|_| m.get_i64("state"))
                                    .ok()
                                    == Some(1)
                                    && m.get_bool("self").unwrap_or(false)
                            })
                        })
                        .and_then(|m| int(m, "_id"));
                }
            }
            break;
        }
        // While there is no primary, every desired member's own config and optime (for
        // re-addressing); with one, those of the desired members outside the set (new tasks:
        // with data or empty).
        let desired_hellos = hellos.iter().filter(|(h, hello)| {
            desired.contains(h) && (primary.is_none() || hello.get_str("setName").is_err())
        });
        for (host, hello) in desired_hellos {
            self.read_persisted(host, hello, &mut observed).await;
        }
        observed.primary_host = primary;
        observed
    }

    /// While there is no primary: the config `host` holds (it may not find itself in it), and
    /// its newest oplog entry; or that it has no config at all.
    async fn read_persisted(&self, host: &str, hello: &Document, observed: &mut Observed) {
        let answer = self
            .command(host, "replSetGetConfig", doc! {"replSetGetConfig": 1})
            .await;
        let raw = match answer {
            Ok(answer) => match answer.get_document("config") {
                Ok(raw) => raw.clone(),
                Err(_) => return,
            },
            Err(e) => {
                if e.code() == Some(NOT_YET_INITIALIZED) {
                    observed.observation.empty.insert(host.to_string());
                } else if e.is_access_refused() {
                    observed
                        .access_refused
                        .insert(host.to_string(), e.to_string());
                }
                return;
            }
        };
        let last_optime = match self.last_optime(host).await {
            Ok(optime) => optime,
            Err(e) => {
                if e.is_access_refused() {
                    observed
                        .access_refused
                        .insert(host.to_string(), e.to_string());
                }
                tracing::debug!(%host, error = %e, "could not read the member's last optime");
                None
            }
        };
        observed.observation.persisted.insert(
            host.to_string(),
            Persisted {
                config: config_view(&raw),
                // A member that finds itself in its config says which set it is in.
                removed: hello.get_str("setName").is_err(),
                last_optime,
            },
        );
        observed.persisted_raw.insert(host.to_string(), raw);
    }

    /// The `{t, ts}` of the newest entry of `host`'s oplog, as an operator reads it
    /// (`local.oplog.rs`, newest first): readable in every state, REMOVED included.
    async fn last_optime(&self, host: &str) -> Result<Option<OpTime>, MongoError> {
        let client = self.client(host).await?;
        let oplog = client.database("local").collection::<Document>("oplog.rs");
        let find = oplog.find_one(doc! {}).sort(doc! {"$natural": -1});
        let entry =
            match tokio::time::timeout(COMMAND_TIMEOUT, std::future::IntoFuture::into_future(find))
                .await
            {
                Ok(Ok(entry)) => entry,
                Ok(Err(e)) => return Err(map_error(host, "find local.oplog.rs", self.user(), e)),
                Err(_) => {
                    return Err(MongoError::NoAnswer {
                        host: host.to_string(),
                        command: "find local.oplog.rs",
                        detail: format!("no answer within {COMMAND_TIMEOUT:?}"),
                    })
                }
            };
        Ok(entry.as_ref().and_then(optime_of))
    }

    /// Applies a step. `Ok` means the server accepted it; for a reconfig, that the new config
    /// reached a majority (`replSetReconfig` waits for that).
    pub async fn apply(
        &self,
        set_name: &str,
        step: &Step,
        observed: &Observed,
    ) -> Result<(), MongoError> {
        let (host, command) = match step {
            Step::Converged | Step::Wait(_) | Step::Blocked(_) => return Ok(()),
            Step::Initiate { host, .. } => (host.as_str(), "replSetInitiate"),
            Step::Reconfig { .. } => match &observed.primary_host {
                Some(host) => (host.as_str(), "replSetReconfig"),
                None => {
                    return Err(MongoError::NoAnswer {
                        host: String::new(),
                        command: "replSetReconfig",
                        detail: "no primary config to change".into(),
                    })
                }
            },
            Step::ForceReconfig { host, .. } | Step::Readdress { host, .. } => {
                (host.as_str(), "replSetReconfig")
            }
        };
        let raw = match step {
            Step::Readdress { source, .. } => observed.persisted_raw.get(source),
            _ => observed.raw_config.as_ref(),
        };
        let Some(config) = config_document(set_name, step, raw) else {
            return Err(MongoError::NoAnswer {
                host: host.to_string(),
                command,
                detail: "no config to change".into(),
            });
        };
        let cmd = match step {
            Step::Initiate { .. } => doc! {"replSetInitiate": config},
            Step::ForceReconfig { .. } | Step::Readdress { .. } => {
                doc! {"replSetReconfig": config, "force": true}
            }
            _ => doc! {"replSetReconfig": config, "maxTimeMS": COMMAND_TIMEOUT.as_millis() as i64},
        };
        self.command(host, command, cmd).await.map(|_| ())
    }
}

/// The reconciler's side of the replica set: observe it, apply one step. [`Members`] does it
/// with the `mongodb` driver; unit tests use a small fake, so that the controller's timing
/// (grace periods, debounce, leadership) is tested with paused time.
pub trait ReplSetClient: Send + Sync + 'static {
    /// Observes the set through `hosts` (the desired hosts and the config's); `desired` are the
    /// hosts whose `hello` the planner checks.
    fn observe(
        &self,
        set_name: &str,
        hosts: &[String],
        desired: &[String],
    ) -> impl std::future::Future<Output = Observed> + Send;

    /// Applies a step; `Ok` means the server accepted it.
    fn apply(
        &self,
        set_name: &str,
        step: &Step,
        observed: &Observed,
    ) -> impl std::future::Future<Output = Result<(), MongoError>> + Send;

    /// What the published URI adds after `replicaSet=<set>`: `&tls=true` when the members are
    /// reached with TLS. Never a file path: the reconciler's files are not the application's
    /// (the application adds its own `tlsCAFile`).
    fn uri_options(&self) -> &'static str {
        ""
    }

    /// The longest [`ReplSetClient::apply`] can take (its commands' timeout).
    fn step_timeout(&self) -> Duration {
        STEP_TIMEOUT
    }
}

impl ReplSetClient for Members {
    async fn observe(&self, set_name: &str, hosts: &[String], desired: &[String]) -> Observed {
        Members::observe(self, set_name, hosts, desired).await
    }

    async fn apply(
        &self,
        set_name: &str,
        step: &Step,
        observed: &Observed,
    ) -> Result<(), MongoError> {
        Members::apply(self, set_name, step, observed).await
    }

    fn uri_options(&self) -> &'static str {
        if self.tls.is_some() {
            "&tls=true"
        } else {
            ""
        }
    }
}

/// The config document that applying `step` sends to the server: exactly what
/// [`Members::apply`] passes to `replSetInitiate` or `replSetReconfig`.
///
/// - [`Step::Initiate`]: `{_id: set_name, version: 1, members}`, nothing else.
/// - [`Step::Reconfig`]: `raw` (the primary's config as `replSetGetConfig` returned it) with
///   the change applied and the planned version, by [`apply_to_document`].
/// - [`Step::ForceReconfig`]: `raw` without the dropped members, with the planned version (the
///   server raises the version of a forced config further on its own).
/// - [`Step::Readdress`]: `raw` (the config the source member holds) with only the hosts of
///   the moved members changed, and the planned version.
///
/// `None` for the steps that send nothing, and for a reconfig without a `raw` config to start
/// from. Pure: it only builds the document.
pub fn config_document(set_name: &str, step: &Step, raw: Option<&Document>) -> Option<Document> {
    match step {
        Step::Initiate { members, .. } => {
            let members: Vec<Bson> = members
                .iter()
                .map(|m| Bson::Document(member_doc(m)))
                .collect();
            Some(doc! {"_id": set_name, "version": 1, "members": members})
        }
        Step::Reconfig { change, config } => Some(apply_to_document(raw?, change, config.version)),
        Step::ForceReconfig {
            config, dropped, ..
        } => {
            let mut doc = raw?.clone();
            for id in dropped {
                doc = apply_to_document(
                    &doc,
                    &Change::Remove {
                        id: *id,
                        host: String::new(),
                    },
                    config.version,
                );
            }
            Some(doc)
        }
        Step::Readdress { config, moved, .. } => {
            let mut doc = raw?.clone();
            for (id, from, to) in moved {
                let change = Change::MoveHost {
                    id: *id,
                    from: from.clone(),
                    to: to.clone(),
                    revoke_vote: false,
                };
                doc = apply_to_document(&doc, &change, config.version);
            }
            Some(doc)
        }
        Step::Converged | Step::Wait(_) | Step::Blocked(_) => None,
    }
}

fn map_error(
    host: &str,
    command: &'static str,
    user: Option<&str>,
    e: mongodb::error::Error,
) -> MongoError {
    let user = user.unwrap_or("(none: no --username given)").to_string();
    match *e.kind {
        mongodb::error::ErrorKind::Authentication { message, .. } => {
            MongoError::AuthenticationFailed {
                host: host.to_string(),
                command,
                user,
                detail: message,
            }
        }
        mongodb::error::ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => {
            MongoError::AuthenticationFailed {
                host: host.to_string(),
                command,
                user,
                detail: c.message,
            }
        }
        mongodb::error::ErrorKind::Command(c) => MongoError::Refused {
            host: host.to_string(),
            command,
            code: c.code,
            code_name: c.code_name,
            message: c.message,
        },
        other => MongoError::NoAnswer {
            host: host.to_string(),
            command,
            detail: other.to_string(),
        },
    }
}

fn int(d: &Document, key: &str) -> Option<i64> {
    match d.get(key)? {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

fn float(d: &Document, key: &str) -> Option<f64> {
    match d.get(key)? {
        Bson::Int32(v) => Some(f64::from(*v)),
        Bson::Int64(v) => Some(*v as f64),
        Bson::Double(v) => Some(*v),
        _ => None,
    }
}

/// The part of a config document the planner reads.
pub fn config_view(raw: &Document) -> ConfigView {
    let members = raw
        .get_array("members")
        .map(|ms| {
            ms.iter()
                .filter_map(Bson::as_document)
                .map(|m| MemberConfig {
                    id: int(m, "_id").unwrap_or(-1),
                    host: m.get_str("host").unwrap_or_default().to_string(),
                    votes: int(m, "votes").unwrap_or(1).clamp(0, 1) as u8,
                    priority: float(m, "priority").unwrap_or(1.0),
                    arbiter_only: m.get_bool("arbiterOnly").unwrap_or(false),
                    hidden: m.get_bool("hidden").unwrap_or(false),
                    newly_added: m.get_bool("newlyAdded").unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    let replica_set_id = match raw.get_document("settings").map(|s| s.get("replicaSetId")) {
        Ok(Some(Bson::ObjectId(id))) => Some(id.to_hex()),
        _ => None,
    };
    ConfigView {
        set_name: raw.get_str("_id").unwrap_or_default().to_string(),
        version: int(raw, "version").unwrap_or(0),
        term: int(raw, "term").unwrap_or(-1),
        replica_set_id,
        members,
    }
}

/// An optime as MongoDB writes one, `{ts: Timestamp, t: term}` (an oplog entry has both too).
fn optime_of(doc: &Document) -> Option<OpTime> {
    let Some(Bson::Timestamp(ts)) = doc.get("ts") else {
        return None;
    };
    Some(OpTime {
        term: int(doc, "t").unwrap_or(-1),
        ts: (ts.time, ts.increment),
    })
}

fn member_status(status: &Document) -> BTreeMap<i64, MemberStatus> {
    status
        .get_array("members")
        .map(|ms| {
            ms.iter()
                .filter_map(Bson::as_document)
                .filter_map(|m| {
                    let id = int(m, "_id")?;
                    let healthy = float(m, "health").unwrap_or(0.0) > 0.0;
                    let state = MemberState::from_code(int(m, "state").unwrap_or(-1) as i32);
                    Some((id, MemberStatus { healthy, state }))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn member_doc(m: &MemberConfig) -> Document {
    doc! {"_id": m.id as i32, "host": &m.host, "votes": i32::from(m.votes), "priority": m.priority}
}

/// The primary's config document with `change` applied and `version` set; every other field
/// is kept. A member's `newlyAdded` is the server's to manage and is left as it is.
pub fn apply_to_document(raw: &Document, change: &Change, version: i64) -> Document {
    let mut doc = raw.clone();
    doc.insert("version", Bson::Int32(version as i32));
    // `term` is set by the server on a reconfig; sending it is not allowed for a non-force one.
    doc.remove("term");
    let mut members: Vec<Document> = raw
        .get_array("members")
        .map(|ms| ms.iter().filter_map(Bson::as_document).cloned().collect())
        .unwrap_or_default();
    let find = |members: &mut Vec<Document>, id: i64| -> Option<usize> {
        members.iter().position(|m| int(m, "_id") == Some(id))
    };
    match change {
        Change::Add { id, host } => {
            members.push(member_doc(&MemberConfig::new_non_voter(*id, host)));
        }
        Change::GrantVote { id } => {
            if let Some(i) = find(&mut members, *id) {
                members[i].insert("votes", 1_i32);
                members[i].insert("priority", 1.0_f64);
            }
        }
        Change::RevokeVote { id } => {
            if let Some(i) = find(&mut members, *id) {
                members[i].insert("votes", 0_i32);
                members[i].insert("priority", 0.0_f64);
            }
        }
        Change::MoveHost {
            id,
            to,
            revoke_vote,
            ..
        } => {
            if let Some(i) = find(&mut members, *id) {
                members[i].insert("host", to.as_str());
                if *revoke_vote {
                    members[i].insert("votes", 0_i32);
                    members[i].insert("priority", 0.0_f64);
                }
            }
        }
        Change::Remove { id, .. } => members.retain(|m| int(m, "_id") != Some(*id)),
    }
    doc.insert(
        "members",
        Bson::Array(members.into_iter().map(Bson::Document).collect()),
    );
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hosts_client_is_dropped_once_unused_for_the_idle_time() {
        let t0 = std::time::Instant::now();
        let mut cache = super::ByHost::default();
        cache.insert("10.0.0.1:27017", 1, t0);
        cache.insert("10.0.0.2:27017", 2, t0);
        let later = t0 + super::CLIENT_IDLE / 2;
        assert_eq!(cache.get("10.0.0.1:27017", later), Some(1));
        // A new address after the idle time: the one unused since t0 goes, the one used since
        // stays.
        let after = t0 + super::CLIENT_IDLE + std::time::Duration::from_secs(1);
        cache.insert("10.0.0.3:27017", 3, after);
        assert_eq!(cache.get("10.0.0.2:27017", after), None);
        assert_eq!(cache.get("10.0.0.1:27017", after), Some(1));
        assert_eq!(cache.len(), 2);
    }

    use super::*;

    #[test]
    fn unmanaged_fields_survive_a_change() {
        let raw = doc! {
            "_id": "rs0", "version": 4, "term": 2, "protocolVersion": 1_i64,
            "settings": {"chainingAllowed": false, "heartbeatTimeoutSecs": 10},
            "members": [
                {"_id": 1, "host": "a:27017", "votes": 1, "priority": 1.0, "tags": {"dc": "eu"}},
                {"_id": 2, "host": "b:27017", "votes": 0, "priority": 0.0},
            ],
        };
        let out = apply_to_document(&raw, &Change::GrantVote { id: 2 }, 5);
        assert_eq!(out.get_i32("version").ok(), Some(5));
        assert!(out.get("term").is_none());
        assert_eq!(
            out.get_document("settings").ok(),
            raw.get_document("settings").ok()
        );
        let members = out.get_array("members").expect("members");
        let a = members[0].as_document().expect("doc");
        assert_eq!(a.get_document("tags").ok(), Some(&doc! {"dc": "eu"}));
        let b = members[1].as_document().expect("doc");
        assert_eq!(
            (b.get_i32("votes").ok(), b.get_f64("priority").ok()),
            (Some(1), Some(1.0))
        );
        let view = config_view(&out);
        assert_eq!(view.voter_count(), 2);
    }
}
