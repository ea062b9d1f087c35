//! The data plane: insert, find (including the oplog as a sync source reads it), count and
//! the part of aggregate the drivers' countDocuments uses, and the write concern wait.

use bson::{doc, Bson, Document};
use std::time::Duration;
use tokio::time::Instant;

use crate::config::number;
use crate::error::ServerError;
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::{matches, OpTime};

impl Node {
    fn check_writable(&self, st: &NodeState) -> Result<(), ServerError> {
        if st.state != MemberState::Primary {
            return Err(ServerError::not_writable_primary("not primary"));
        }
        Ok(())
    }

    fn check_readable(&self, st: &NodeState, body: &Document) -> Result<(), ServerError> {
        if self.inner.opts.set_name.is_none() || st.state == MemberState::Primary {
            return Ok(());
        }
        let mode = body
            .get_document("$readPreference")
            .ok()
            .and_then(|r| r.get_str("mode").ok())
            .unwrap_or("primary");
        let secondary_ok = mode != "primary" && matches!(st.state, MemberState::Secondary);
        if !secondary_ok {
            return Err(ServerError::not_primary_no_secondary_ok(
                "not primary and secondaryOk=false",
            ));
        }
        Ok(())
    }

    pub(super) async fn cmd_insert(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("insert")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let ns = format!("{db}.{coll}");
        let docs = match body.get("documents") {
            Some(Bson::Array(a)) => a.clone(),
            _ => {
                return Err(ServerError::failed_to_parse(
                    "BSON field 'insert.documents' is missing but a required field",
                ))
            }
        };
        let ordered = body.get_bool("ordered").unwrap_or(true);
        let mut n = 0;
        let mut write_errors = Vec::new();
        let (last, term) = {
            let mut st = self.lock();
            self.check_writable(&st)?;
            for (i, d) in docs.into_iter().enumerate() {
                let Bson::Document(mut d) = d else {
                    write_errors.push(Bson::Document(doc! {"index": i as i32, "code": 2, "errmsg": "document to insert must be an object"}));
                    if ordered {
                        break;
                    } else {
                        continue;
                    }
                };
                if !d.contains_key("_id") {
                    let mut with_id = doc! {"_id": bson::oid::ObjectId::new()};
                    with_id.extend(d);
                    d = with_id;
                }
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                let dup = st
                    .durable
                    .store
                    .collections
                    .get(&ns)
                    .is_some_and(|c| c.iter().any(|x| x.get("_id") == Some(&id)));
                if dup {
                    write_errors.push(Bson::Document(doc! {
                        "index": i as i32,
                        "code": 11000,
                        "keyPattern": {"_id": 1},
                        "keyValue": {"_id": id.clone()},
                        "errmsg": format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}"),
                    }));
                    if ordered {
                        break;
                    } else {
                        continue;
                    }
                }
                self.append(&mut st, "i", ns.clone(), d);
                n += 1;
            }
            self.recompute_commit_point(&mut st);
            self.notify();
            (st.last_applied(), st.term())
        };
        let mut reply = doc! {"n": n};
        if !write_errors.is_empty() {
            reply.insert("writeErrors", write_errors);
        }
        if let Some(wce) = self.wait_for_write_concern(body, last, term).await {
            reply.insert("writeConcernError", wce);
        }
        Ok(reply)
    }

    /// Waits for the write concern of `body` (default `{w: "majority"}`, MongoDB 5.0+'s
    /// implicit default); returns a `writeConcernError` on failure.
    async fn wait_for_write_concern(
        &self,
        body: &Document,
        op: OpTime,
        term: i64,
    ) -> Option<Document> {
        let wc = body
            .get_document("writeConcern")
            .ok()
            .cloned()
            .unwrap_or_default();
        let w = wc
            .get("w")
            .cloned()
            .unwrap_or(Bson::String("majority".into()));
        let wtimeout = wc.get("wtimeout").and_then(number).unwrap_or(0);
        let max_time = body.get("maxTimeMS").and_then(number).unwrap_or(0);
        let deadline = [wtimeout, max_time]
            .into_iter()
            .filter(|&v| v > 0)
            .min()
            .map(|ms| Instant::now() + Duration::from_millis(ms as u64));
        tracing::debug!(me = %self.me(), ?wc, wtimeout, max_time, "waiting for write concern");
        enum Need {
            Majority,
            Nodes(usize),
        }
        let need = match &w {
            Bson::String(s) if s == "majority" => Need::Majority,
            b => match number(b) {
                Some(0) | Some(1) => return None,
                Some(n) if n > 1 => Need::Nodes(n as usize),
                _ => {
                    return Some(
                        doc! {"code": 79, "codeName": "UnknownReplWriteConcern", "errmsg": format!("Unrecognized write concern mode: {w}")},
                    )
                }
            },
        };
        let r = self
            .wait_until(deadline, |st| {
                if st.state != MemberState::Primary || st.term() != term {
                    return Some(false);
                }
                match need {
                    Need::Majority => (st.commit_point >= op).then_some(true),
                    Need::Nodes(n) => {
                        let cfg = st.config()?;
                        let have = cfg
                            .members
                            .iter()
                            .filter(|m| !m.arbiter_only)
                            .filter(|m| {
                                m.host == self.me()
                                    || st.peers.get(&m.host).is_some_and(|p| p.applied >= op)
                            })
                            .count();
                        (have >= n).then_some(true)
                    }
                }
            })
            .await;
        match r {
            Some(true) => None,
            Some(false) => Some(
                doc! {"code": 189, "codeName": "PrimarySteppedDown", "errmsg": "Primary stepped down while waiting for replication"},
            ),
            None => Some(doc! {
                "code": 64,
                "codeName": "WriteConcernFailed",
                "errmsg": "waiting for replication timed out",
                "errInfo": {"wtimeout": true, "writeConcern": {"w": w, "wtimeout": wtimeout, "provenance": if body.contains_key("writeConcern") { "clientSupplied" } else { "implicitDefault" }}},
            }),
        }
    }

    pub(super) async fn cmd_find(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("find")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let filter = body
            .get_document("filter")
            .ok()
            .cloned()
            .unwrap_or_default();
        if db == "local" && coll == "oplog.rs" {
            return self.find_oplog(body, &filter).await;
        }
        let ns = format!("{db}.{coll}");
        let limit = body.get("limit").and_then(number).unwrap_or(0).max(0) as usize;
        let skip = body.get("skip").and_then(number).unwrap_or(0).max(0) as usize;
        let st = self.lock();
        self.check_readable(&st, body)?;
        let docs: Vec<Bson> = st
            .durable
            .store
            .collections
            .get(&ns)
            .map(|c| {
                c.iter()
                    .filter(|d| matches(d, &filter))
                    .skip(skip)
                    .take(if limit == 0 { usize::MAX } else { limit })
                    .cloned()
                    .map(Bson::Document)
                    .collect()
            })
            .unwrap_or_default();
        Ok(doc! {"cursor": {"firstBatch": docs, "id": 0i64, "ns": ns}})
    }

    /// The oplog as a sync source serves it: entries with `ts >= filter.ts.$gte`, waiting up
    /// to `maxAwaitTimeMS` for more when there is nothing new (a tailable awaitData cursor),
    /// with the `$replData` metadata that carries the commit point.
    async fn find_oplog(
        &self,
        body: &Document,
        filter: &Document,
    ) -> Result<Document, ServerError> {
        let from = filter
            .get_document("ts")
            .ok()
            .and_then(|d| d.get_timestamp("$gte").ok());
        let wait = body.get("maxAwaitTimeMS").and_then(number).unwrap_or(0);
        let collect = |st: &NodeState| -> Vec<Bson> {
            st.durable
                .store
                .oplog
                .iter()
                .filter(|e| {
                    from.is_none_or(|f| {
                        (e.optime.ts.time, e.optime.ts.increment) >= (f.time, f.increment)
                    })
                })
                .map(|e| Bson::Document(e.to_document()))
                .collect()
        };
        if wait > 0 {
            let start_commit = self.lock().commit_point;
            let deadline = Instant::now() + Duration::from_millis(wait as u64);
            self.wait_until(Some(deadline), |st| {
                (collect(st).len() > 1 || from.is_none() || st.commit_point != start_commit)
                    .then_some(())
            })
            .await;
        }
        let st = self.lock();
        let entries = collect(&st);
        let primary_index = st
            .config()
            .and_then(|c| {
                st.primary_host
                    .as_ref()
                    .and_then(|p| c.members.iter().position(|m| &m.host == p))
            })
            .map(|i| i as i32)
            .unwrap_or(-1);
        Ok(doc! {
            "cursor": {"firstBatch": entries, "id": 0i64, "ns": "local.oplog.rs"},
            "$replData": {
                "term": st.term(),
                "lastOpCommitted": st.commit_point.to_document(),
                "lastOpVisible": st.commit_point.to_document(),
                "configVersion": st.config().map(|c| c.version).unwrap_or(-2),
                "configTerm": st.config().map(|c| c.term).unwrap_or(-1),
                "primaryIndex": primary_index,
                "syncSourceIndex": -1,
                "isPrimary": st.state == MemberState::Primary,
            },
        })
    }

    pub(super) fn cmd_count(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("count")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let filter = body.get_document("query").ok().cloned().unwrap_or_default();
        let st = self.lock();
        self.check_readable(&st, body)?;
        let n = st
            .durable
            .store
            .collections
            .get(&format!("{db}.{coll}"))
            .map(|c| c.iter().filter(|d| matches(d, &filter)).count())
            .unwrap_or(0);
        Ok(doc! {"n": n as i32})
    }

    /// Just enough of `aggregate` for the drivers' `countDocuments`: `$match`, `$skip`,
    /// `$limit`, and `$group` with `{$sum: 1}`.
    pub(super) fn cmd_aggregate(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("aggregate")
            .map_err(|_| ServerError::bad_value("aggregate needs a collection name"))?;
        let ns = format!("{db}.{coll}");
        let pipeline = body.get_array("pipeline").map_err(|_| {
            ServerError::type_mismatch("'pipeline' option must be specified as an array")
        })?;
        let st = self.lock();
        self.check_readable(&st, body)?;
        let mut docs: Vec<Document> = st
            .durable
            .store
            .collections
            .get(&ns)
            .cloned()
            .unwrap_or_default();
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
                ("$match", Bson::Document(f)) => docs.retain(|d| matches(d, f)),
                ("$skip", b) => {
                    let n = number(b).unwrap_or(0).max(0) as usize;
                    docs = docs.into_iter().skip(n).collect();
                }
                ("$limit", b) => docs.truncate(number(b).unwrap_or(0).max(0) as usize),
                ("$group", Bson::Document(g)) => {
                    let id = g.get("_id").cloned().unwrap_or(Bson::Null);
                    let mut out = doc! {"_id": id};
                    for (k, v) in g.iter().filter(|(k, _)| k.as_str() != "_id") {
                        let per = v
                            .as_document()
                            .and_then(|d| d.get("$sum"))
                            .and_then(number)
                            .unwrap_or(0);
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
        let batch: Vec<Bson> = docs.into_iter().map(Bson::Document).collect();
        Ok(doc! {"cursor": {"firstBatch": batch, "id": 0i64, "ns": ns}})
    }
}

/// killCursors: every cursor is exhausted in its first batch, so there is none to kill.
pub(super) fn kill_cursors() -> Document {
    doc! {"cursorsKilled": [], "cursorsNotFound": [], "cursorsAlive": [], "cursorsUnknown": []}
}
