//! The data plane's reads: find (filter, sort, projection, skip, limit, batchSize) with real
//! cursors (getMore, killCursors), count, distinct, and the aggregate stages the drivers and
//! mongosh use for counting (`$match $sort $skip $limit $project $count $group` with
//! `{$sum: 1}`). Others are refused with the server's code 40324.

use bson::{doc, Bson, Document};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::config::number;
use crate::error::ServerError;
use crate::node::Node;
use crate::query::{matches, parse_sort, sort, sort_and_projection, validate_filter, Projection};

use super::write_plan::{count_arg, namespace, refuse_options};

/// The first batch's default size (the find command's 101 documents).
const DEFAULT_FIRST_BATCH: usize = 101;

#[derive(Debug)]
struct Cursor {
    ns: String,
    rest: VecDeque<Document>,
    batch_size: Option<usize>,
}

/// The open cursors of one member.
#[derive(Debug, Default)]
pub(crate) struct Cursors {
    open: Mutex<HashMap<i64, Cursor>>,
}

impl Cursors {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Cursor>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first batch of a result, opening a cursor for the rest.
    fn first_batch(
        &self,
        ns: &str,
        docs: Vec<Document>,
        batch_size: Option<usize>,
        single_batch: bool,
    ) -> Document {
        let mut rest: VecDeque<Document> = docs.into();
        let n = batch_size.unwrap_or(DEFAULT_FIRST_BATCH).min(rest.len());
        let batch: Vec<Bson> = rest.drain(..n).map(Bson::Document).collect();
        let id = if rest.is_empty() || single_batch {
            0i64
        } else {
            let id = loop {
                let id = rand::random::<i64>() & i64::MAX;
                if id != 0 && !self.lock().contains_key(&id) {
                    break id;
                }
            };
            self.lock().insert(
                id,
                Cursor {
                    ns: ns.to_string(),
                    rest,
                    batch_size,
                },
            );
            id
        };
        doc! {"cursor": {"firstBatch": batch, "id": id, "ns": ns}}
    }
}

impl Node {
    fn collection_docs(&self, ns: &str, body: &Document) -> Result<Vec<Document>, ServerError> {
        let st = self.lock();
        self.check_readable(&st, body)?;
        Ok(st
            .durable
            .store
            .collections
            .get(ns)
            .cloned()
            .unwrap_or_default())
    }

    pub(super) async fn cmd_find(&self, body: &Document) -> Result<Document, ServerError> {
        let filter = match body.get("filter") {
            None | Some(Bson::Null) => Document::new(),
            Some(Bson::Document(f)) => f.clone(),
            Some(_) => {
                return Err(ServerError::type_mismatch(
                    "BSON field 'find.filter' is the wrong type, expected type 'object'",
                ))
            }
        };
        let db = body.get_str("$db").unwrap_or("test");
        if db == "local" && body.get_str("find") == Ok("oplog.rs") {
            return self.find_oplog(body, &filter).await;
        }
        self.refuse_transaction(body)?;
        let ns = namespace(body, "find")?;
        refuse_options(
            body,
            &["collation", "hint", "min", "max", "let", "tailable"],
        )?;
        validate_filter(&filter)?;
        let (sort_spec, projection) = sort_and_projection(body, "projection")?;
        let skip = count_arg(body, "skip")?.unwrap_or(0);
        let limit = match body.get("limit").and_then(number) {
            Some(n) if n < 0 => Some(n.unsigned_abs() as usize),
            _ => count_arg(body, "limit")?.filter(|&n| n > 0),
        };
        let single_batch = body.get_bool("singleBatch").unwrap_or(false)
            || body.get("limit").and_then(number).is_some_and(|n| n < 0);
        let batch_size = count_arg(body, "batchSize")?;
        let mut docs = Vec::new();
        for d in self.collection_docs(&ns, body)? {
            if matches(&d, &filter)? {
                docs.push(d);
            }
        }
        sort(&mut docs, &sort_spec);
        let docs: Vec<Document> = docs
            .into_iter()
            .skip(skip)
            .take(limit.unwrap_or(usize::MAX))
            .map(|d| match &projection {
                Some(p) => p.apply(&d),
                None => d,
            })
            .collect();
        Ok(self
            .inner
            .cursors
            .first_batch(&ns, docs, batch_size, single_batch))
    }

    pub(super) fn cmd_get_more(&self, body: &Document) -> Result<Document, ServerError> {
        let id = match body.get("getMore") {
            Some(Bson::Int64(i)) => *i,
            _ => {
                return Err(ServerError::type_mismatch(
                    "BSON field 'getMore.getMore' is the wrong type, expected type 'long'",
                ))
            }
        };
        let ns = namespace(body, "collection")?;
        let batch_size = count_arg(body, "batchSize")?;
        let mut open = self.inner.cursors.lock();
        let Some(c) = open.get_mut(&id) else {
            return Err(ServerError::cursor_not_found(format!(
                "cursor id {id} not found"
            )));
        };
        if c.ns != ns {
            return Err(ServerError::unauthorized(format!(
                "Requested getMore on namespace '{ns}', but cursor belongs to a different namespace {}",
                c.ns
            )));
        }
        let n = batch_size
            .or(c.batch_size)
            .unwrap_or(usize::MAX)
            .min(c.rest.len());
        let batch: Vec<Bson> = c.rest.drain(..n).map(Bson::Document).collect();
        let next_id = if c.rest.is_empty() {
            open.remove(&id);
            0i64
        } else {
            id
        };
        Ok(doc! {"cursor": {"nextBatch": batch, "id": next_id, "ns": ns}})
    }

    pub(super) fn cmd_kill_cursors(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "killCursors")?;
        let ids = body.get_array("cursors").map_err(|_| {
            ServerError::failed_to_parse(
                "BSON field 'killCursors.cursors' is missing but a required field",
            )
        })?;
        let mut open = self.inner.cursors.lock();
        let (mut killed, mut not_found) = (Vec::new(), Vec::new());
        for id in ids {
            let Bson::Int64(i) = id else { continue };
            match open.get(i) {
                Some(c) if c.ns == ns => {
                    open.remove(i);
                    killed.push(Bson::Int64(*i));
                }
                _ => not_found.push(Bson::Int64(*i)),
            }
        }
        Ok(
            doc! {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [], "cursorsUnknown": []},
        )
    }

    pub(super) fn cmd_count(&self, body: &Document) -> Result<Document, ServerError> {
        self.refuse_transaction(body)?;
        let ns = namespace(body, "count")?;
        let filter = body.get_document("query").ok().cloned().unwrap_or_default();
        validate_filter(&filter)?;
        let skip = count_arg(body, "skip")?.unwrap_or(0);
        let limit = count_arg(body, "limit")?.filter(|&n| n > 0);
        let mut n = 0usize;
        for d in self.collection_docs(&ns, body)? {
            if matches(&d, &filter)? {
                n += 1;
            }
        }
        let n = n.saturating_sub(skip).min(limit.unwrap_or(usize::MAX));
        Ok(doc! {"n": n as i32})
    }

    pub(super) fn cmd_distinct(&self, body: &Document) -> Result<Document, ServerError> {
        self.refuse_transaction(body)?;
        let ns = namespace(body, "distinct")?;
        let key = body.get_str("key").map_err(|_| {
            ServerError::failed_to_parse(
                "BSON field 'distinct.key' is missing but a required field",
            )
        })?;
        let filter = body.get_document("query").ok().cloned().unwrap_or_default();
        validate_filter(&filter)?;
        let mut values: Vec<Bson> = Vec::new();
        for d in self.collection_docs(&ns, body)? {
            if !matches(&d, &filter)? {
                continue;
            }
            let found: Vec<Bson> = match crate::query::get_path(&d, key) {
                Some(Bson::Array(a)) => a.clone(),
                Some(v) => vec![v.clone()],
                None => Vec::new(),
            };
            for v in found {
                if !values.iter().any(|x| crate::query::equal(x, &v)) {
                    values.push(v);
                }
            }
        }
        values.sort_by(crate::query::compare);
        Ok(doc! {"values": values})
    }

    /// aggregate with the stages `countDocuments`, mongosh's `count()` and simple pipelines
    /// use. Any other stage is Location40324 "Unrecognized pipeline stage name", as the
    /// server says for an unknown one (the simulator does not run the others).
    pub(super) fn cmd_aggregate(&self, body: &Document) -> Result<Document, ServerError> {
        self.refuse_transaction(body)?;
        let ns = namespace(body, "aggregate")?;
        let pipeline = body.get_array("pipeline").map_err(|_| {
            ServerError::type_mismatch("'pipeline' option must be specified as an array")
        })?;
        let mut docs = self.collection_docs(&ns, body)?;
        for stage in pipeline {
            let Bson::Document(stage) = stage else {
                return Err(ServerError::type_mismatch(
                    "Each element of the 'pipeline' array must be an object",
                ));
            };
            let Some((name, arg)) = stage.iter().next() else {
                continue;
            };
            match (name.as_str(), arg) {
                ("$match", Bson::Document(f)) => {
                    let mut kept = Vec::new();
                    for d in docs {
                        if matches(&d, f)? {
                            kept.push(d);
                        }
                    }
                    docs = kept;
                }
                ("$sort", Bson::Document(s)) => sort(&mut docs, &parse_sort(s)?),
                ("$skip", b) => {
                    let n = number(b).unwrap_or(0).max(0) as usize;
                    docs = docs.into_iter().skip(n).collect();
                }
                ("$limit", b) => docs.truncate(number(b).unwrap_or(0).max(0) as usize),
                ("$project", Bson::Document(p)) => {
                    if let Some(p) = Projection::parse(p)? {
                        docs = docs.iter().map(|d| p.apply(d)).collect();
                    }
                }
                ("$count", Bson::String(field)) => {
                    docs = if docs.is_empty() {
                        vec![]
                    } else {
                        vec![doc! {field.clone(): docs.len() as i32}]
                    };
                }
                ("$group", Bson::Document(g)) => {
                    let id = g.get("_id").cloned().unwrap_or(Bson::Null);
                    if !matches!(id, Bson::Null | Bson::Int32(_) | Bson::Int64(_)) {
                        return Err(ServerError::bad_value(
                            "$group is supported only with a constant _id and {$sum: <number>} (replica-set simulator)",
                        ));
                    }
                    let mut out = doc! {"_id": id};
                    for (k, v) in g.iter().filter(|(k, _)| k.as_str() != "_id") {
                        let per = v
                            .as_document()
                            .and_then(|d| d.get("$sum"))
                            .and_then(number)
                            .ok_or_else(|| {
                                ServerError::bad_value(
                                    "$group is supported only with {$sum: <number>} accumulators (replica-set simulator)",
                                )
                            })?;
                        out.insert(k, per * docs.len() as i64);
                    }
                    docs = if docs.is_empty() { vec![] } else { vec![out] };
                }
                (other, _) => {
                    return Err(ServerError {
                        code: 40324,
                        code_name: "Location40324",
                        message: format!("Unrecognized pipeline stage name: '{other}'"),
                    })
                }
            }
        }
        let batch_size = body
            .get_document("cursor")
            .ok()
            .map(|c| count_arg(c, "batchSize"))
            .transpose()?
            .flatten();
        Ok(self.inner.cursors.first_batch(&ns, docs, batch_size, false))
    }
}
