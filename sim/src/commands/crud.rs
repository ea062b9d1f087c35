//! The data plane's writes: insert, update, delete, findAndModify, each document change one
//! oplog entry (see catalog.rs), unique indexes checked before the write, then the write
//! concern wait; and the oplog as a sync source reads it. Reads are in reads.rs.
//!
//! Transactions are refused (IllegalOperation 20, the code mongod gives where it cannot run
//! them): a write that is part of one is never applied outside it.

use bson::{doc, Bson, Document};
use std::time::Duration;
use tokio::time::Instant;

use crate::config::number;
use crate::error::ServerError;
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::OpTime;
use crate::query::{sort_and_projection, validate_filter};
use crate::update::with_id_first;

pub(crate) use super::write_plan::Write;
use super::write_plan::{
    namespace, refuse_options, statements, write_error, UpdateSpec, WritePlan,
};

impl Node {
    /// A standalone (no `--replSet`) takes writes, as mongod does; a member only as primary.
    fn check_writable(&self, st: &NodeState) -> Result<(), ServerError> {
        if self.inner.opts.set_name.is_some() && st.state != MemberState::Primary {
            return Err(ServerError::not_writable_primary("not primary"));
        }
        Ok(())
    }

    pub(super) fn check_readable(
        &self,
        st: &NodeState,
        body: &Document,
    ) -> Result<(), ServerError> {
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

    /// Refuses a command that belongs to a transaction (`autocommit: false`); a retryable
    /// write (`txnNumber` alone) runs as a plain write.
    pub(super) fn refuse_transaction(&self, body: &Document) -> Result<(), ServerError> {
        if body.get_bool("autocommit") == Ok(false) || body.get_bool("startTransaction") == Ok(true)
        {
            return Err(ServerError::illegal_operation(
                "Transactions are not supported by the replica-set simulator (docs/replset-sim.md); the operation was not applied",
            ));
        }
        Ok(())
    }

    /// Plans writes under the lock with `plan` (which sees the member's data and returns the
    /// entries to append, or refuses), appends them to the oplog, then waits for the write
    /// concern. Returns what `plan` returned beside the entries and the reply fields
    /// (`writeConcernError` when the wait failed).
    pub(super) async fn write<T>(
        &self,
        body: &Document,
        plan: impl FnOnce(&NodeState) -> Result<(Vec<Write>, T), ServerError>,
    ) -> Result<(T, Document), ServerError>
    where
        T: Send,
    {
        self.refuse_transaction(body)?;
        let (out, last, term) = {
            let mut st = self.lock();
            self.check_writable(&st)?;
            let (writes, out) = plan(&st)?;
            for w in writes {
                self.append(&mut st, w.op, w.ns, w.o);
            }
            self.recompute_commit_point(&mut st);
            self.notify();
            (out, st.last_applied(), st.term())
        };
        let mut reply = Document::new();
        if let Some(wce) = self.wait_for_write_concern(body, last, term).await {
            reply.insert("writeConcernError", wce);
        }
        Ok((out, reply))
    }

    pub(super) async fn cmd_insert(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "insert")?;
        let docs = match body.get("documents") {
            Some(Bson::Array(a)) => a.clone(),
            _ => {
                return Err(ServerError::failed_to_parse(
                    "BSON field 'insert.documents' is missing but a required field",
                ))
            }
        };
        let ordered = body.get_bool("ordered").unwrap_or(true);
        let ((n, write_errors), mut reply) = self
            .write(body, |st| {
                let mut view = WritePlan::new(st, &ns);
                let mut n = 0;
                let mut errors = Vec::new();
                for (i, d) in docs.into_iter().enumerate() {
                    let Bson::Document(d) = d else {
                        errors.push(write_error(
                            i,
                            &ServerError::bad_value("document to insert must be an object"),
                        ));
                        if ordered {
                            break;
                        } else {
                            continue;
                        }
                    };
                    match view.insert(with_id_first(d)) {
                        Ok(()) => n += 1,
                        Err(e) => {
                            errors.push(write_error(i, &e));
                            if ordered {
                                break;
                            }
                        }
                    }
                }
                Ok((view.writes, (n, errors)))
            })
            .await?;
        reply.insert("n", n);
        Ok(with_write_errors(reply, write_errors))
    }

    pub(super) async fn cmd_update(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "update")?;
        let ordered = body.get_bool("ordered").unwrap_or(true);
        let specs = statements(body, "update", "updates", "update")?
            .into_iter()
            .map(UpdateSpec::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let ((n, modified, upserted, errors), mut reply) = self
            .write(body, |st| {
                let mut view = WritePlan::new(st, &ns);
                let (mut n, mut modified) = (0i32, 0i32);
                let mut upserted = Vec::new();
                let mut errors = Vec::new();
                for (i, spec) in specs.iter().enumerate() {
                    match view.update(spec) {
                        Ok(r) => {
                            n += r.matched;
                            modified += r.modified;
                            if let Some(id) = r.upserted {
                                n += 1;
                                upserted.push(Bson::Document(doc! {"index": i as i32, "_id": id}));
                            }
                        }
                        Err(e) => {
                            errors.push(write_error(i, &e));
                            if ordered {
                                break;
                            }
                        }
                    }
                }
                Ok((view.writes, (n, modified, upserted, errors)))
            })
            .await?;
        reply.insert("n", n);
        reply.insert("nModified", modified);
        if !upserted.is_empty() {
            reply.insert("upserted", upserted);
        }
        Ok(with_write_errors(reply, errors))
    }

    pub(super) async fn cmd_delete(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "delete")?;
        let mut specs = Vec::new();
        for d in statements(body, "delete", "deletes", "delete")? {
            let q = d.get_document("q").cloned().map_err(|_| {
                ServerError::failed_to_parse(
                    "BSON field 'delete.deletes.q' is missing but a required field",
                )
            })?;
            validate_filter(&q)?;
            refuse_options(d, &["collation", "hint"])?;
            let limit = d.get("limit").and_then(number).unwrap_or(0);
            if limit != 0 && limit != 1 {
                return Err(ServerError::failed_to_parse(format!(
                    "The limit field in delete objects must be 0 or 1. Got {limit}"
                )));
            }
            specs.push((q, limit == 1));
        }
        let (n, mut reply) = self
            .write(body, |st| {
                let mut view = WritePlan::new(st, &ns);
                let mut n = 0i32;
                for (q, one) in &specs {
                    n += view.delete(q, None, *one)?.len() as i32;
                }
                Ok((view.writes, n))
            })
            .await?;
        reply.insert("n", n);
        Ok(reply)
    }

    pub(super) async fn cmd_find_and_modify(
        &self,
        body: &Document,
    ) -> Result<Document, ServerError> {
        let name = body.keys().next().cloned().unwrap_or_default();
        let ns = namespace(body, &name)?;
        let query = body.get_document("query").cloned().unwrap_or_default();
        validate_filter(&query)?;
        refuse_options(body, &["arrayFilters", "collation", "hint", "let"])?;
        let (sort_spec, fields) = sort_and_projection(body, "fields")?;
        let remove = body.get_bool("remove").unwrap_or(false);
        let return_new = body.get_bool("new").unwrap_or(false);
        let update = body.get("update").cloned();
        let spec = match (&update, remove) {
            (Some(_), true) => {
                return Err(ServerError::failed_to_parse(
                    "Cannot specify both an update and remove=true",
                ))
            }
            (None, false) => {
                return Err(ServerError::failed_to_parse(
                    "Either an update or remove=true must be specified",
                ))
            }
            (Some(u), false) => Some(UpdateSpec::parse(&doc! {
                "q": query.clone(), "u": u.clone(), "upsert": body.get_bool("upsert").unwrap_or(false), "multi": false,
            })?),
            (None, true) => None,
        };
        let ((value, last_error), mut reply) = self
            .write(body, |st| {
                let mut view = WritePlan::new(st, &ns);
                match &spec {
                    None => {
                        let gone = view.delete(&query, Some(&sort_spec), true)?;
                        let value = gone.into_iter().next();
                        let n = i32::from(value.is_some());
                        Ok((view.writes, (value, doc! {"n": n})))
                    }
                    Some(spec) => {
                        let before = view.first(&query, &sort_spec)?;
                        let r = view.update_one(spec, before.clone())?;
                        let value = if return_new { r.after.clone() } else { before };
                        let mut le =
                            doc! {"n": 1, "updatedExisting": r.upserted.is_none() && r.matched > 0};
                        if let Some(id) = &r.upserted {
                            le.insert("upserted", id.clone());
                        }
                        if r.matched == 0 && r.upserted.is_none() {
                            le.insert("n", 0);
                        }
                        Ok((view.writes, (value, le)))
                    }
                }
            })
            .await?;
        reply.insert("lastErrorObject", last_error);
        let value = value.map(|d| match &fields {
            Some(p) => p.apply(&d),
            None => d,
        });
        reply.insert("value", value.map(Bson::Document).unwrap_or(Bson::Null));
        Ok(reply)
    }

    /// Waits for the write concern of `body` (without one, the default write concern);
    /// returns a `writeConcernError` on failure.
    pub(super) async fn wait_for_write_concern(
        &self,
        body: &Document,
        op: OpTime,
        term: i64,
    ) -> Option<Document> {
        // A standalone has nobody to wait for: a write it acknowledged is as durable as it
        // gets (mongod answers `w: "majority"` and `w: 1` alike there).
        self.inner.opts.set_name.as_ref()?;
        // Without a `w`, the default write concern: the cluster-wide one, else the implicit
        // one of the config (see `write_concern.rs`).
        let given = body
            .get_document("writeConcern")
            .ok()
            .filter(|wc| wc.contains_key("w"))
            .cloned();
        let (wc, provenance) = match given {
            Some(wc) => (wc, "clientSupplied"),
            None => {
                let (mut wc, provenance) =
                    super::write_concern::default_write_concern(&self.lock());
                if let Ok(w) = body.get_document("writeConcern") {
                    if let Some(t) = w.get("wtimeout") {
                        wc.insert("wtimeout", t.clone());
                    }
                }
                (wc, provenance)
            }
        };
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
        // checkIfWriteConcernCanBeSatisfied (replication_coordinator_impl.cpp): a number
        // greater than the data-bearing members fails at once with UnsatisfiableWriteConcern
        // (100), "Not enough data-bearing nodes", instead of waiting.
        if let Need::Nodes(n) = need {
            let data_bearing = self
                .lock()
                .config()
                .map(|c| c.members.iter().filter(|m| !m.arbiter_only).count())
                .unwrap_or(1);
            if n > data_bearing {
                return Some(doc! {
                    "code": 100,
                    "codeName": "UnsatisfiableWriteConcern",
                    "errmsg": "Not enough data-bearing nodes",
                    "errInfo": {"writeConcern": {"w": w.clone(), "wtimeout": wtimeout, "provenance": provenance}},
                });
            }
        }
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
                "errInfo": {"wtimeout": true, "writeConcern": {"w": w, "wtimeout": wtimeout, "provenance": provenance}},
            }),
        }
    }

    /// The oplog as a sync source serves it: entries with `ts >= filter.ts.$gte`, waiting up
    /// to `maxAwaitTimeMS` for more when there is nothing new (a tailable awaitData cursor),
    /// with the `$replData` metadata that carries the commit point. As an operator reads it
    /// too: `sort: {$natural: -1}` (or `{ts: -1}`, the same order) newest first, and `limit`
    /// (negative: a single batch of that many), so `find(...).sort({$natural: -1}).limit(1)`
    /// gives the last entry, on any member and in any state (the `local` database needs no
    /// primary nor secondaryOk).
    pub(super) async fn find_oplog(
        &self,
        body: &Document,
        filter: &Document,
    ) -> Result<Document, ServerError> {
        let newest_first = match body.get_document("sort") {
            Err(_) => false,
            Ok(s) => match s.iter().collect::<Vec<_>>().as_slice() {
                [] => false,
                [(k, v)] if k.as_str() == "$natural" || k.as_str() == "ts" => match number(v) {
                    Some(1) => false,
                    Some(-1) => true,
                    _ => {
                        return Err(ServerError::bad_value(format!(
                            "$natural or ts sort must be 1 or -1, not {v}"
                        )))
                    }
                },
                _ => {
                    return Err(ServerError::bad_value(format!(
                        "the simulator's local.oplog.rs sorts by $natural or ts only, not {s}"
                    )))
                }
            },
        };
        let limit = body
            .get("limit")
            .and_then(number)
            .map(|l| l.unsigned_abs() as usize)
            .filter(|&l| l > 0);
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
        let mut entries = collect(&st);
        if newest_first {
            entries.reverse();
        }
        if let Some(l) = limit {
            entries.truncate(l);
        }
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
}

/// A write's reply with its `writeErrors`, when there are any.
fn with_write_errors(mut reply: Document, errors: Vec<Bson>) -> Document {
    if !errors.is_empty() {
        reply.insert("writeErrors", errors);
    }
    reply
}
