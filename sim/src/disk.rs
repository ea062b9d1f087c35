//! `--dbpath`: what a member keeps on disk, as mongod keeps it, so that it comes back from a
//! restart (or a SIGKILL) with its config, data, oplog, term and vote.
//!
//! mongod keeps the replica-set config in `local.system.replset`, the oplog in
//! `local.oplog.rs` (the data is the result of applying it), the term and last vote in
//! `local.replset.election`, and the replica set id inside the config; a write is durable once
//! its journal record is synced, and a `w: "majority"` write is acknowledged only once a
//! majority has it in its journal (`writeConcernMajorityJournalDefault`). Its data directory is
//! locked by `mongod.lock`, which holds the pid of the running mongod.
//!
//! The simulator's directory has two files:
//! - `mongod.lock`: the pid of the running member, locked exclusively (`flock`) while it runs.
//!   A second process on the same directory fails at start; a lock left by a killed process is
//!   free again, as the kernel drops the lock with its holder.
//! - `replset-sim.journal`: an append-only sequence of BSON documents, one record each:
//!   - `{k: "local.oplog.rs", e: <oplog entry, as local.oplog.rs holds it>}`
//!   - `{k: "rollback", keep: <n>}`: the oplog was cut to its first `n` entries (a rollback)
//!   - `{k: "local.replset.election", term: <long>, lastVote: null | {term, candidateId}}`
//!   - `{k: "local.system.replset", config: <the config document>}`
//!
//!   A member replays it at start. Records are synced (`fdatasync`) before anything that
//!   depends on them leaves the member: every reply, and every request to another member
//!   (heartbeats, votes, position updates). So no write is acknowledged, reported as
//!   replicated, or voted on before it is on disk, and a SIGKILL at any moment loses only
//!   what nobody was told about. A record cut short by a crash at the end of the file is
//!   dropped at the next start (it was never synced, so never acknowledged); anything else
//!   that does not parse is corruption, and the member refuses to start.

use bson::{doc, Bson, Document};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::config::{Defaults, ReplSetConfig};
use crate::node::DurableState;
use crate::oplog::{OpTime, OplogEntry};

pub const LOCK_FILE: &str = "mongod.lock";
pub const JOURNAL_FILE: &str = "replset-sim.journal";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("Data directory {path} not found. Create the missing directory or specify another path using --dbpath")]
    NotFound { path: PathBuf },
    #[error("--dbpath {path}: cannot read it ({source})")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--dbpath {path} is not writable ({source}); give this user write access or choose another --dbpath")]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--dbpath {path} is in use by another running process (pid {pid}, {lock} is locked); stop it or choose another --dbpath")]
    Locked {
        path: PathBuf,
        lock: PathBuf,
        pid: String,
    },
    #[error("--dbpath {path} holds a real mongod's data files (WiredTiger); the simulator cannot read them: give it an empty directory")]
    ForeignData { path: PathBuf },
    #[error("{path} is corrupt at byte {offset}: {reason}; move the directory away and start with an empty --dbpath to resync this member from the set")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What of the durable state is in the journal already.
#[derive(Debug, Default)]
struct Written {
    /// The optimes of the oplog entries written, in order.
    optimes: Vec<OpTime>,
    election: Option<(i64, Option<(i64, i64)>)>,
    config: Option<Document>,
}

/// An open, locked data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    journal_path: PathBuf,
    journal: File,
    /// Held for the life of the process: the `flock` goes with it.
    _lock: File,
    written: Written,
}

impl DataDir {
    /// Opens and locks the directory `path`, and replays its journal: the state the member
    /// had when it last synced it (empty for an empty directory). Like mongod, a directory
    /// that does not exist is an error (`NonExistentPath`, "Data directory ... not found").
    pub fn open(path: &Path, defaults: Defaults) -> Result<(DataDir, DurableState), DiskError> {
        let path = path.to_path_buf();
        if !path.is_dir() {
            return Err(DiskError::NotFound { path });
        }
        if path.join("WiredTiger").exists() {
            return Err(DiskError::ForeignData { path });
        }
        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|source| DiskError::Unwritable {
                path: path.clone(),
                source,
            })?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = lock.read_to_string(&mut pid);
            return Err(DiskError::Locked {
                path,
                lock: lock_path,
                pid: pid.trim().to_string(),
            });
        }
        let write_lock = |lock: &mut File| -> std::io::Result<()> {
            lock.set_len(0)?;
            lock.seek(SeekFrom::Start(0))?;
            writeln!(lock, "{}", std::process::id())?;
            lock.sync_all()
        };
        write_lock(&mut lock).map_err(|source| DiskError::Unwritable {
            path: path.clone(),
            source,
        })?;
        let journal_path = path.join(JOURNAL_FILE);
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&journal_path)
            .map_err(|source| DiskError::Unwritable {
                path: path.clone(),
                source,
            })?;
        let (durable, written, good_len) = replay(&mut journal, &journal_path, defaults)?;
        let len = journal
            .metadata()
            .map_err(|source| DiskError::Write {
                path: journal_path.clone(),
                source,
            })?
            .len();
        if good_len < len {
            tracing::warn!(path = %journal_path.display(), dropped = len - good_len, "dropping a journal record cut short by a crash");
            journal
                .set_len(good_len)
                .and_then(|_| journal.sync_all())
                .map_err(|source| DiskError::Write {
                    path: journal_path.clone(),
                    source,
                })?;
        }
        // The directory entry of a new journal must survive a crash too.
        File::open(&path)
            .and_then(|d| d.sync_all())
            .map_err(|source| DiskError::Write {
                path: path.clone(),
                source,
            })?;
        tracing::info!(
            dbpath = %path.display(),
            oplog_entries = durable.store.oplog.len(),
            configured = durable.config.is_some(),
            term = durable.term,
            "data directory opened"
        );
        Ok((
            DataDir {
                path,
                journal_path,
                journal,
                _lock: lock,
                written,
            },
            durable,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends to the journal what changed in `durable` since the last call, and syncs it.
    /// Does nothing (no sync) when nothing changed.
    pub fn persist(&mut self, durable: &DurableState) -> Result<(), DiskError> {
        let mut records: Vec<Document> = Vec::new();
        let oplog = &durable.store.oplog;
        let common = self
            .written
            .optimes
            .iter()
            .zip(oplog.iter())
            .take_while(|(w, e)| **w == e.optime)
            .count();
        if common < self.written.optimes.len() {
            records.push(doc! {"k": "rollback", "keep": common as i64});
            self.written.optimes.truncate(common);
        }
        for e in &oplog[common..] {
            records.push(doc! {"k": "local.oplog.rs", "e": e.to_document()});
            self.written.optimes.push(e.optime);
        }
        let election = (durable.term, durable.last_vote);
        if self.written.election != Some(election) {
            let last_vote = match durable.last_vote {
                Some((term, candidate)) => {
                    Bson::Document(doc! {"term": term, "candidateId": candidate})
                }
                None => Bson::Null,
            };
            records.push(
                doc! {"k": "local.replset.election", "term": durable.term, "lastVote": last_vote},
            );
            self.written.election = Some(election);
        }
        let config = durable.config.as_ref().map(|c| c.to_document(true));
        if config.is_some() && self.written.config != config {
            records.push(doc! {"k": "local.system.replset", "config": config.clone()});
            self.written.config = config;
        }
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in &records {
            r.to_writer(&mut buf).map_err(|e| DiskError::Write {
                path: self.journal_path.clone(),
                source: std::io::Error::other(e),
            })?;
        }
        self.journal
            .write_all(&buf)
            .and_then(|_| self.journal.sync_data())
            .map_err(|source| DiskError::Write {
                path: self.journal_path.clone(),
                source,
            })
    }
}

/// Replays the journal; returns the state, what it holds, and the length of its whole
/// records (a shorter file length means a torn last record).
fn replay(
    journal: &mut File,
    path: &Path,
    defaults: Defaults,
) -> Result<(DurableState, Written, u64), DiskError> {
    let mut bytes = Vec::new();
    journal
        .seek(SeekFrom::Start(0))
        .and_then(|_| journal.read_to_end(&mut bytes))
        .map_err(|source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let corrupt = |offset: usize, reason: String| DiskError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut durable = DurableState::default();
    let mut written = Written::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < 4 {
            break; // a torn length prefix
        }
        let len = i32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len < 5 {
            return Err(corrupt(pos, format!("record length {len}")));
        }
        if len as usize > rest.len() {
            break; // a torn record
        }
        let rec = Document::from_reader(&rest[..len as usize])
            .map_err(|e| corrupt(pos, format!("not a BSON document: {e}")))?;
        match rec.get_str("k") {
            Ok("local.oplog.rs") => {
                let e = rec
                    .get_document("e")
                    .ok()
                    .and_then(OplogEntry::from_document)
                    .ok_or_else(|| corrupt(pos, "an oplog record without an entry".into()))?;
                written.optimes.push(e.optime);
                durable.store.apply(e);
            }
            Ok("rollback") => {
                let keep = rec
                    .get_i64("keep")
                    .map_err(|_| corrupt(pos, "a rollback record without keep".into()))?
                    .max(0) as usize;
                durable.store.truncate(keep);
                written.optimes.truncate(keep);
            }
            Ok("local.replset.election") => {
                let term = rec
                    .get_i64("term")
                    .map_err(|_| corrupt(pos, "an election record without a term".into()))?;
                let last_vote = match rec.get("lastVote") {
                    Some(Bson::Document(v)) => Some((
                        v.get_i64("term")
                            .map_err(|_| corrupt(pos, "lastVote.term".into()))?,
                        v.get_i64("candidateId")
                            .map_err(|_| corrupt(pos, "lastVote.candidateId".into()))?,
                    )),
                    _ => None,
                };
                durable.term = term;
                durable.last_vote = last_vote;
                written.election = Some((term, last_vote));
            }
            Ok("local.system.replset") => {
                let raw = rec
                    .get_document("config")
                    .map_err(|_| corrupt(pos, "a config record without a config".into()))?;
                let cfg = ReplSetConfig::parse(raw, defaults)
                    .map_err(|e| corrupt(pos, format!("the stored config does not parse: {e}")))?;
                written.config = Some(raw.clone());
                durable.config = Some(cfg);
            }
            Ok(other) => return Err(corrupt(pos, format!("unknown record kind {other:?}"))),
            Err(_) => return Err(corrupt(pos, "a record without a kind".into())),
        }
        pos += len as usize;
    }
    Ok((durable, written, pos as u64))
}
