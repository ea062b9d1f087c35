//! The oplog and the documents it produces.
//!
//! Every write is an oplog entry `{ts, t, op, ns, o, wall}`; a member's collections are the
//! result of applying its oplog in order. That makes rollback exact: truncate the oplog after
//! the common point with the new primary, then re-apply (MongoDB 4.0+ "recover to a stable
//! timestamp" has the same effect).

use bson::{doc, Bson, DateTime, Document, Timestamp};
use std::collections::BTreeMap;

/// `{ts, t}`: ordered by term, then timestamp, like `repl::OpTime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpTime {
    pub ts: Timestamp,
    pub t: i64,
}

impl PartialOrd for OpTime {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OpTime {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.t, self.ts.time, self.ts.increment).cmp(&(other.t, other.ts.time, other.ts.increment))
    }
}

impl OpTime {
    pub const NULL: OpTime = OpTime {
        ts: Timestamp {
            time: 0,
            increment: 0,
        },
        t: -1,
    };

    pub fn to_document(self) -> Document {
        doc! {"ts": self.ts, "t": self.t}
    }

    pub fn from_document(d: &Document) -> Option<OpTime> {
        let ts = d.get_timestamp("ts").ok()?;
        let t = d.get("t").and_then(crate::config::number)?;
        Some(OpTime { ts, t })
    }

    pub fn from_bson(b: Option<&Bson>) -> Option<OpTime> {
        match b {
            Some(Bson::Document(d)) => OpTime::from_document(d),
            _ => None,
        }
    }

    pub fn date(self) -> DateTime {
        DateTime::from_millis(self.ts.time as i64 * 1000)
    }
}

/// One oplog entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OplogEntry {
    pub optime: OpTime,
    /// `i` insert, `u` update, `d` delete, `c` command, `n` no-op (see catalog.rs).
    pub op: String,
    pub ns: String,
    pub o: Document,
    pub wall: DateTime,
}

impl OplogEntry {
    pub fn to_document(&self) -> Document {
        doc! {
            "op": self.op.clone(),
            "ns": self.ns.clone(),
            "o": self.o.clone(),
            "ts": self.optime.ts,
            "t": self.optime.t,
            "v": 2i64,
            "wall": self.wall,
        }
    }

    pub fn from_document(d: &Document) -> Option<OplogEntry> {
        Some(OplogEntry {
            optime: OpTime::from_document(d)?,
            op: d.get_str("op").ok()?.to_string(),
            ns: d.get_str("ns").ok()?.to_string(),
            o: d.get_document("o").ok()?.clone(),
            wall: d
                .get_datetime("wall")
                .ok()
                .copied()
                .unwrap_or(DateTime::now()),
        })
    }
}

/// A member's data: its oplog and the collections it implies.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub oplog: Vec<OplogEntry>,
    pub collections: BTreeMap<String, Vec<Document>>,
    /// The secondary indexes of each namespace (`_id_` is implicit), made by `createIndexes`
    /// entries.
    pub indexes: BTreeMap<String, Vec<Document>>,
}

impl Store {
    pub fn last_optime(&self) -> OpTime {
        self.oplog.last().map(|e| e.optime).unwrap_or(OpTime::NULL)
    }

    /// Appends and applies one entry.
    pub fn apply(&mut self, e: OplogEntry) {
        crate::catalog::apply_entry(&mut self.collections, &mut self.indexes, &e);
        self.oplog.push(e);
    }

    /// Drops every entry after `keep` entries and rebuilds the collections; returns the
    /// entries removed.
    pub fn truncate(&mut self, keep: usize) -> Vec<OplogEntry> {
        let removed = self.oplog.split_off(keep.min(self.oplog.len()));
        let oplog = std::mem::take(&mut self.oplog);
        self.collections.clear();
        self.indexes.clear();
        for e in oplog {
            self.apply(e);
        }
        removed
    }

    /// Position of the entry with exactly this optime.
    pub fn position(&self, optime: OpTime) -> Option<usize> {
        self.oplog.binary_search_by(|e| e.optime.cmp(&optime)).ok()
    }
}

/// Next timestamp: wall-clock seconds, with an increment within the same second, never
/// going backwards.
pub fn next_timestamp(last: Timestamp) -> Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    if now > last.time {
        Timestamp {
            time: now,
            increment: 1,
        }
    } else {
        Timestamp {
            time: last.time,
            increment: last.increment + 1,
        }
    }
}

/// The equality match of `find` / `count`: every top-level field of the filter must be equal
/// (a `{$eq: v}` operand is accepted too).
pub fn matches(doc: &Document, filter: &Document) -> bool {
    filter.iter().all(|(k, want)| {
        let want = match want {
            Bson::Document(d) if d.len() == 1 && d.contains_key("$eq") => d.get("$eq"),
            other => Some(other),
        };
        lookup(doc, k) == want
    })
}

fn lookup<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = doc.get(first)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get(p)?,
            _ => return None,
        };
    }
    Some(cur)
}
