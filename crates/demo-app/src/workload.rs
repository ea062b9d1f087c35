//! The fault-injection workload (`workload`) and the final read of its documents (`dump`), for a
//! Jepsen-style run: a runner starts the app in a container, injects faults (partitions, kills,
//! re-addressed members) while the workload runs, then calls `dump` and checks the history that
//! the two printed on stdout.
//!
//! The workload runs C logical clients, each with its own driver [`Db`] (so its own view of the
//! topology), on the connection string it reads from the store. A client re-reads the string
//! every 5 s and after every operation that did not succeed, and connects anew when it changed;
//! a store or connect failure is logged and retried with a short backoff and never ends the run
//! (the client keeps its old connection, or waits if it has none yet).
//!
//! Each client loops: with probability 2/3 a write, else a read of a random id among those it
//! has written (a write while there is none), then a pause.
//! * write: inserts `{_id: "<run>-c<k>-<n>", v: "<run>-c<k>-<n>-<8 hex>", c: k}` with write
//!   concern majority (wtimeout 10 s); `k` counts clients from 1, `n` each client's writes
//!   from 1, and the 8 random hex digits make the value of each attempt unique.
//! * read: `find_one` by `_id`, read concern majority, on the primary.
//!
//! Every operation has a client-side timeout of 15 s and prints one line of JSON ([`Record`]):
//!
//! ```text
//! {"type":"op","client":1,"op":"write","id":"r1-c1-1","value":"r1-c1-1-0a1b2c3d","start_ms":1700000000000,"end_ms":1700000000012,"outcome":"ok","error":null}
//! {"type":"op","client":1,"op":"read","id":"r1-c1-1","value":"r1-c1-1-0a1b2c3d","start_ms":1700000000063,"end_ms":1700000000065,"outcome":"ok","error":null}
//! {"type":"done","client":1,"ops":2}
//! ```
//!
//! `outcome` is `ok` (acknowledged; a read that was answered is ok whether or not it found the
//! document, `value` null when it did not), `fail` (certainly not applied) or `info` (may or
//! may not have been applied): see [`write_outcome`] for the rules, which look at the driver's
//! error kinds and codes, never at its text. A read that did not succeed is `fail` (a read
//! changes nothing); its error text is kept. `start_ms` and `end_ms` (Unix milliseconds) are
//! taken right before and after the driver call. Lines are written whole, under a lock, and
//! flushed one by one, so the lines of concurrent clients never interleave.
//!
//! At the end (the duration is over, or SIGTERM) each client finishes the operation it is in,
//! and one `done` line per client says how many operations it printed.
//!
//! `dump --prefix <run>` prints `{"type":"final","id":...,"value":...}` for every document whose
//! `_id` starts with the prefix (read concern majority, on the primary), then
//! `{"type":"final_done","count":N}`; it reads everything before it prints, so a dump that
//! fails prints no `final` line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backend_core::Backoff;
use mongodb::error::{ErrorKind, WriteFailure};
use rand::seq::IndexedRandom;
use tokio_util::sync::CancellationToken;

use crate::db::{Access, Db, DbError, WriteRetries};
use crate::store::Store;

/// The client-side limit of one operation: longer than the driver's server selection (10 s)
/// and the write's wtimeout (10 s), so that those answer first when they can.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// How often a client re-reads the connection string when nothing fails.
pub const URI_RECHECK: Duration = Duration::from_secs(5);

/// The limit of one read of the store, and of making a driver client: a client that waits
/// longer would miss the end of the run.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// NotWritablePrimary: the member is not (or no longer) the primary and refused the write.
const NOT_WRITABLE_PRIMARY: i32 = 10107;
/// NotPrimaryNoSecondaryOk: the member is not the primary and refused the operation.
const NOT_PRIMARY_NO_SECONDARY_OK: i32 = 13435;

/// Why the workload stopped early.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot write the history to stdout (has the runner stopped reading?): {0}")]
    Output(#[source] std::io::Error),
    #[error("a client of the workload stopped unexpectedly: {0}")]
    Client(#[from] tokio::task::JoinError),
}

/// What the workload does: from the flags of `workload`.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How many logical clients (`--clients`).
    pub clients: u32,
    /// How long the clients start operations (`--for`).
    pub duration: Duration,
    /// The pause of a client between its operations (`--pause-ms`).
    pub pause: Duration,
    /// The prefix of every id (`--run-id`).
    pub run_id: String,
    /// Whether the driver may retry a write (`--retry-writes`).
    pub retries: WriteRetries,
}

pub use op_history::{Op, OpKind, Outcome, Record};

/// Where the lines go (stdout; a buffer in tests): each is written whole under one lock and
/// flushed at once, so that the lines of concurrent clients never interleave and a runner that
/// reads as the run goes sees every line as soon as it is complete.
#[derive(Debug)]
pub struct History<W> {
    out: Mutex<W>,
}

impl<W: Write> History<W> {
    pub fn new(out: W) -> History<W> {
        History {
            out: Mutex::new(out),
        }
    }

    /// Writes `record` as one line of JSON and flushes it.
    pub fn record(&self, record: &Record) -> Result<(), WorkloadError> {
        let mut line = serde_json::to_vec(record).map_err(|e| WorkloadError::Output(e.into()))?;
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(WorkloadError::Output)
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

/// The id of the `n`th write (from 1) of client `k` (from 1) of run `run_id`.
pub fn write_id(run_id: &str, client: u32, n: u64) -> String {
    format!("{run_id}-c{client}-{n}")
}

/// The value written with `id`: the id and 8 hex digits of `nonce`, so that the value tells
/// which write it came from and no two runs or attempts share one.
pub fn write_value(id: &str, nonce: u32) -> String {
    format!("{id}-{nonce:08x}")
}

/// A failed operation as the classification sees it: the driver's error kind and code, or the
/// client's own timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No suitable member (a primary) found in time: nothing was sent.
    ServerSelection,
    /// The connection's authentication failed: nothing was sent.
    Authentication,
    /// The server refused the command (`ok: 0`) with this code.
    Command { code: i32 },
    /// The write itself failed (`writeErrors`) with this code.
    WriteError { code: i32 },
    /// The write was applied on the member but not acknowledged by a majority in time, or the
    /// wait was interrupted (`writeConcernError`): it may survive or be rolled back.
    WriteConcern { code: i32 },
    /// The connection broke or timed out: the command may have run.
    Network,
    /// No answer within [`OP_TIMEOUT`].
    ClientTimeout,
    /// Anything else.
    Other,
}

impl Failure {
    /// The failure of a driver error, from its kind and code.
    pub fn of(e: &mongodb::error::Error) -> Failure {
        match e.kind.as_ref() {
            ErrorKind::ServerSelection { .. } => Failure::ServerSelection,
            ErrorKind::Authentication { .. } => Failure::Authentication,
            ErrorKind::Command(c) => Failure::Command { code: c.code },
            ErrorKind::Write(WriteFailure::WriteError(w)) => Failure::WriteError { code: w.code },
            ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
                Failure::WriteConcern { code: w.code }
            }
            ErrorKind::InsertMany(m) => {
                match (
                    m.write_errors.as_ref().and_then(|w| w.first()),
                    &m.write_concern_error,
                ) {
                    (Some(w), _) => Failure::WriteError { code: w.code },
                    (None, Some(w)) => Failure::WriteConcern { code: w.code },
                    (None, None) => Failure::Other,
                }
            }
            ErrorKind::Io(_) | ErrorKind::ConnectionPoolCleared { .. } => Failure::Network,
            _ => Failure::Other,
        }
    }

    /// The failure of one of [`Db`]'s errors.
    pub fn of_db(e: &DbError) -> Failure {
        match e {
            DbError::Mongo { source, .. } => Failure::of(source),
            DbError::Duplicate { .. } => Failure::WriteError { code: 11000 },
            DbError::BadUri { .. } => Failure::Other,
        }
    }
}

/// The outcome of a write that failed so:
/// * `fail` (certainly not applied): no member selected (nothing was sent), authentication
///   failed (nothing was sent), or the server refused the command or the write with 10107
///   NotWritablePrimary or 13435 NotPrimaryNoSecondaryOk;
/// * `info` (may or may not have been applied): everything else. A write-concern error
///   (wtimeout included) was applied on the primary and may survive; a network error or the
///   client timeout may come after the write ran; 11602 InterruptedDueToReplStateChange may
///   come after it; a duplicate key (11000) is a retry whose first attempt landed; and what is
///   not known is not known.
///
/// With the driver's write retries ([`WriteRetries::Driver`]) a refusal is `info` too: it may
/// answer the retry of a first attempt that was applied (a network error), which the driver
/// does not return.
pub fn write_outcome(failure: Failure, retries: WriteRetries) -> Outcome {
    match failure {
        Failure::ServerSelection | Failure::Authentication => Outcome::Fail,
        Failure::Command { code } | Failure::WriteError { code }
            if is_not_primary(code) && retries == WriteRetries::Off =>
        {
            Outcome::Fail
        }
        _ => Outcome::Info,
    }
}

/// The outcome of a read that failed: `fail`, whatever the failure, as a read changes nothing.
pub fn read_outcome(_failure: Failure) -> Outcome {
    Outcome::Fail
}

fn is_not_primary(code: i32) -> bool {
    code == NOT_WRITABLE_PRIMARY || code == NOT_PRIMARY_NO_SECONDARY_OK
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs the workload of `plan`: its clients read the connection string at `key` of `store`
/// and use the set as `access` says; the lines go to `history`. Ends after `plan.duration`,
/// or earlier when `stop` is cancelled, with one `done` line per client.
pub async fn run<W: Write + Send + 'static>(
    plan: Plan,
    store: Arc<Store>,
    key: String,
    access: Access,
    history: Arc<History<W>>,
    stop: CancellationToken,
) -> Result<(), WorkloadError> {
    let deadline = Instant::now() + plan.duration;
    let plan = Arc::new(plan);
    let mut tasks = Vec::new();
    for k in 1..=plan.clients {
        let client = LogicalClient {
            k,
            plan: plan.clone(),
            store: store.clone(),
            key: key.clone(),
            access: access.clone(),
            history: history.clone(),
            uri: None,
            db: None,
            next_check: Instant::now(),
            store_failing: false,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(2)),
            written: Vec::new(),
            ops: 0,
        };
        tasks.push((k, tokio::spawn(client.run(deadline, stop.clone()))));
    }
    let mut done = Vec::new();
    let mut failed = None;
    for (k, task) in tasks {
        match task.await {
            Ok(Ok(ops)) => done.push((k, ops)),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(WorkloadError::Client(e))),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    for (client, ops) in done {
        history.record(&Record::Done { client, ops })?;
    }
    Ok(())
}

/// Prints the `final` lines of `docs`, then `final_done`.
pub fn print_dump<W: Write>(
    history: &History<W>,
    docs: &[(String, Option<String>)],
) -> Result<(), WorkloadError> {
    for (id, value) in docs {
        history.record(&Record::Final {
            id: id.clone(),
            value: value.clone(),
        })?;
    }
    history.record(&Record::FinalDone { count: docs.len() })
}

/// One logical client: its driver client on the connection string it last read, and the ids
/// it has written.
struct LogicalClient<W> {
    k: u32,
    plan: Arc<Plan>,
    store: Arc<Store>,
    key: String,
    access: Access,
    history: Arc<History<W>>,
    /// The connection string of `db`.
    uri: Option<String>,
    db: Option<Db>,
    /// When to read the connection string again.
    next_check: Instant,
    /// The last read of the store (or connect) failed: retry on the backoff, not on every
    /// failed operation.
    store_failing: bool,
    backoff: Backoff,
    /// The ids of every write invoked, whatever its outcome; `written.len()` is `n`.
    written: Vec<String>,
    ops: u64,
}

impl<W: Write> LogicalClient<W> {
    /// The client's loop until `deadline` or `stop`; the number of operations it printed.
    async fn run(
        mut self,
        deadline: Instant,
        stop: CancellationToken,
    ) -> Result<u64, WorkloadError> {
        while Instant::now() < deadline && !stop.is_cancelled() {
            if Instant::now() >= self.next_check {
                self.check_uri().await;
            }
            let Some(db) = self.db.clone() else {
                // No connection string yet: wait for the next read of the store.
                let until = self.next_check.min(deadline);
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    () = stop.cancelled() => {}
                }
                continue;
            };
            let record = self.operate(&db).await;
            let succeeded = record.outcome == Outcome::Ok;
            self.history.record(&Record::Op(record))?;
            self.ops += 1;
            if !succeeded && !self.store_failing {
                // The set may have been re-addressed: read the connection string now.
                self.next_check = Instant::now();
            }
            let until = (Instant::now() + self.plan.pause).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(until.into()) => {}
                () = stop.cancelled() => {}
            }
        }
        Ok(self.ops)
    }

    /// Reads the connection string and switches to a client on it if it changed; on a failure
    /// keeps the client it has and tries again after the backoff.
    async fn check_uri(&mut self) {
        let problem =
            match tokio::time::timeout(STORE_TIMEOUT, self.store.get_text(&self.key)).await {
                Ok(Ok(Some(uri))) if self.uri.as_deref() == Some(uri.as_str()) => None,
                Ok(Ok(Some(uri))) => {
                    let connect = Db::connect_with(&uri, &self.access, self.plan.retries);
                    match tokio::time::timeout(STORE_TIMEOUT, connect).await {
                        Ok(Ok(db)) => {
                            tracing::info!(client = self.k, %uri, "using connection string");
                            self.db = Some(db);
                            self.uri = Some(uri);
                            None
                        }
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some(format!(
                            "making a client for {uri} took longer than {STORE_TIMEOUT:?}"
                        )),
                    }
                }
                Ok(Ok(None)) => Some(format!("no connection string at {} yet", self.key)),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("the store did not answer within {STORE_TIMEOUT:?}")),
            };
        match problem {
            None => {
                self.store_failing = false;
                self.backoff.reset();
                self.next_check = Instant::now() + URI_RECHECK;
            }
            Some(problem) => {
                let delay = self.backoff.next_delay(rand::random::<f64>());
                tracing::warn!(
                    client = self.k,
                    key = %self.key,
                    %problem,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    keeps_old_client = self.db.is_some(),
                    "cannot refresh the connection string"
                );
                self.store_failing = true;
                self.next_check = Instant::now() + delay;
            }
        }
    }

    /// One operation: a write with probability 2/3 (always while nothing is written), else a
    /// read of a random id written before.
    async fn operate(&mut self, db: &Db) -> Op {
        let read_id = if rand::random_range(0..3u8) < 2 {
            None
        } else {
            self.written.choose(&mut rand::rng()).cloned()
        };
        match read_id {
            Some(id) => self.read(db, id).await,
            None => self.write(db).await,
        }
    }

    async fn write(&mut self, db: &Db) -> Op {
        let n = self.written.len() as u64 + 1;
        let id = write_id(&self.plan.run_id, self.k, n);
        let value = write_value(&id, rand::random::<u32>());
        self.written.push(id.clone());
        let start_ms = unix_ms();
        let result = tokio::time::timeout(OP_TIMEOUT, db.insert_value(&id, &value, self.k)).await;
        let end_ms = unix_ms();
        let (outcome, error) = match result {
            Ok(Ok(())) => (Outcome::Ok, None),
            Ok(Err(e)) => (
                write_outcome(Failure::of_db(&e), self.plan.retries),
                Some(e.to_string()),
            ),
            Err(_) => (
                write_outcome(Failure::ClientTimeout, self.plan.retries),
                Some(client_timeout()),
            ),
        };
        Op {
            client: self.k,
            op: OpKind::Write,
            id,
            value: Some(value),
            start_ms,
            end_ms,
            outcome,
            error,
        }
    }

    async fn read(&mut self, db: &Db, id: String) -> Op {
        let start_ms = unix_ms();
        let result = tokio::time::timeout(OP_TIMEOUT, db.read_value(&id)).await;
        let end_ms = unix_ms();
        let (value, outcome, error) = match result {
            Ok(Ok(found)) => (found.flatten(), Outcome::Ok, None),
            Ok(Err(e)) => (None, read_outcome(Failure::of_db(&e)), Some(e.to_string())),
            Err(_) => (
                None,
                read_outcome(Failure::ClientTimeout),
                Some(client_timeout()),
            ),
        };
        Op {
            client: self.k,
            op: OpKind::Read,
            id,
            value,
            start_ms,
            end_ms,
            outcome,
            error,
        }
    }
}

fn client_timeout() -> String {
    format!("no answer within {OP_TIMEOUT:?} (the client's timeout)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;
    use mongodb::error::{CommandError, Error, WriteConcernError, WriteError};

    /// A driver error as the driver makes it from a server's reply: the reply's fields
    /// deserialized into the driver's own types.
    fn command_error(code: i32, name: &str) -> Error {
        let c: CommandError =
            bson::from_document(doc! {"code": code, "codeName": name, "errmsg": "from the test"})
                .expect("a command error");
        Error::from(ErrorKind::Command(c))
    }

    fn write_error(code: i32, name: &str) -> Error {
        let w: WriteError =
            bson::from_document(doc! {"code": code, "codeName": name, "errmsg": "from the test"})
                .expect("a write error");
        Error::from(ErrorKind::Write(WriteFailure::WriteError(w)))
    }

    fn write_concern_error(code: i32, name: &str) -> Error {
        let w: WriteConcernError = bson::from_document(doc! {
            "code": code, "codeName": name, "errmsg": "waiting for replication timed out",
            "errInfo": {"wtimeout": true},
        })
        .expect("a write concern error");
        Error::from(ErrorKind::Write(WriteFailure::WriteConcernError(w)))
    }

    fn of_write(e: &Error) -> Outcome {
        write_outcome(Failure::of(e), WriteRetries::Off)
    }

    #[test]
    fn refusals_by_a_member_that_is_not_primary_are_failures() {
        for (code, name) in [
            (10107, "NotWritablePrimary"),
            (13435, "NotPrimaryNoSecondaryOk"),
        ] {
            let e = command_error(code, name);
            assert_eq!(Failure::of(&e), Failure::Command { code });
            assert_eq!(of_write(&e), Outcome::Fail, "{e}");
            assert_eq!(of_write(&write_error(code, name)), Outcome::Fail);
        }
    }

    #[test]
    fn write_concern_errors_are_indeterminate_whatever_their_code() {
        for (code, name) in [
            (64, "WriteConcernFailed"),
            (10107, "NotWritablePrimary"),
            (11602, "InterruptedDueToReplStateChange"),
        ] {
            let e = write_concern_error(code, name);
            assert_eq!(Failure::of(&e), Failure::WriteConcern { code });
            assert_eq!(of_write(&e), Outcome::Info, "{e}");
        }
    }

    #[test]
    fn interruptions_duplicates_and_unknown_codes_are_indeterminate() {
        assert_eq!(
            of_write(&command_error(11602, "InterruptedDueToReplStateChange")),
            Outcome::Info
        );
        assert_eq!(of_write(&write_error(11000, "DuplicateKey")), Outcome::Info);
        assert_eq!(
            write_outcome(
                Failure::of_db(&DbError::Duplicate { id: "x".into() }),
                WriteRetries::Off
            ),
            Outcome::Info
        );
        assert_eq!(
            of_write(&command_error(91, "ShutdownInProgress")),
            Outcome::Info
        );
        assert_eq!(of_write(&Error::custom("anything")), Outcome::Info);
    }

    #[test]
    fn network_errors_and_the_client_timeout_are_indeterminate() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            let e = Error::from(std::io::Error::from(kind));
            assert_eq!(Failure::of(&e), Failure::Network);
            assert_eq!(of_write(&e), Outcome::Info);
        }
        assert_eq!(
            write_outcome(Failure::ClientTimeout, WriteRetries::Off),
            Outcome::Info
        );
    }

    #[test]
    fn nothing_sent_is_a_failure() {
        // The driver's own constructors of these kinds are private; the real ones are in
        // `a_real_server_selection_error_is_a_failure` and in the integration test.
        assert_eq!(
            write_outcome(Failure::ServerSelection, WriteRetries::Off),
            Outcome::Fail
        );
        assert_eq!(
            write_outcome(Failure::Authentication, WriteRetries::Off),
            Outcome::Fail
        );
        assert_eq!(
            write_outcome(Failure::ServerSelection, WriteRetries::Driver),
            Outcome::Fail
        );
    }

    #[test]
    fn with_driver_retries_a_refusal_may_answer_a_retry_and_is_indeterminate() {
        let e = command_error(10107, "NotWritablePrimary");
        assert_eq!(
            write_outcome(Failure::of(&e), WriteRetries::Driver),
            Outcome::Info
        );
    }

    #[test]
    fn every_failed_read_is_a_failure() {
        for f in [
            Failure::Network,
            Failure::ClientTimeout,
            Failure::WriteConcern { code: 64 },
            Failure::Command { code: 11602 },
            Failure::Other,
        ] {
            assert_eq!(read_outcome(f), Outcome::Fail, "{f:?}");
        }
    }

    #[tokio::test]
    async fn a_real_server_selection_error_is_a_failure() {
        // A port where nothing listens: the driver finds no member and gives up.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let uri = format!("mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=200");
        let client = mongodb::Client::with_uri_str(&uri).await.expect("a client");
        let e = client
            .database("demo")
            .collection::<bson::Document>("docs")
            .insert_one(doc! {"_id": "x"})
            .await
            .expect_err("no server");
        assert_eq!(Failure::of(&e), Failure::ServerSelection, "{e}");
        assert_eq!(of_write(&e), Outcome::Fail);
    }

    #[test]
    fn ids_and_values_say_the_run_the_client_and_the_write() {
        let id = write_id("jepsen-7", 3, 12);
        assert_eq!(id, "jepsen-7-c3-12");
        assert_eq!(write_value(&id, 0xab), "jepsen-7-c3-12-000000ab");
        assert_eq!(write_value(&id, u32::MAX), "jepsen-7-c3-12-ffffffff");
        assert!(write_value(&id, 1).starts_with(&id));
    }

    #[test]
    fn records_are_one_line_of_json_each_in_the_runner_s_format() {
        let history = History::new(Vec::new());
        let op = Op {
            client: 2,
            op: OpKind::Write,
            id: "r-c2-1".into(),
            value: Some("r-c2-1-0000000f".into()),
            start_ms: 10,
            end_ms: 12,
            outcome: Outcome::Info,
            error: Some("timed out".into()),
        };
        history.record(&Record::Op(op)).expect("written");
        history
            .record(&Record::Op(Op {
                client: 1,
                op: OpKind::Read,
                id: "r-c1-1".into(),
                value: None,
                start_ms: 1,
                end_ms: 2,
                outcome: Outcome::Ok,
                error: None,
            }))
            .expect("written");
        history
            .record(&Record::Done { client: 2, ops: 2 })
            .expect("written");
        print_dump(&history, &[("r-c2-1".into(), Some("v".into()))]).expect("written");
        let text = String::from_utf8(history.into_inner()).expect("UTF-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                r#"{"type":"op","client":2,"op":"write","id":"r-c2-1","value":"r-c2-1-0000000f","start_ms":10,"end_ms":12,"outcome":"info","error":"timed out"}"#,
                r#"{"type":"op","client":1,"op":"read","id":"r-c1-1","value":null,"start_ms":1,"end_ms":2,"outcome":"ok","error":null}"#,
                r#"{"type":"done","client":2,"ops":2}"#,
                r#"{"type":"final","id":"r-c2-1","value":"v"}"#,
                r#"{"type":"final_done","count":1}"#,
            ]
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn lines_of_concurrent_writers_never_interleave() {
        let history = Arc::new(History::new(Vec::new()));
        let threads: Vec<_> = (1..=4u32)
            .map(|client| {
                let history = history.clone();
                std::thread::spawn(move || {
                    for ops in 0..200 {
                        history
                            .record(&Record::Done { client, ops })
                            .expect("written");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a writer");
        }
        let history = Arc::try_unwrap(history).expect("the only owner");
        let text = String::from_utf8(history.into_inner()).expect("UTF-8");
        assert_eq!(text.lines().count(), 800);
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole line of JSON");
            assert_eq!(v["type"], "done");
        }
    }
}
