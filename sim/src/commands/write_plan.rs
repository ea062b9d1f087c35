//! The writes of one command, planned on a copy of one collection before anything is
//! appended to the oplog: each insert, update and delete is checked (unique indexes, the
//! immutable `_id`) and applied to the copy, so that later statements of the same batch see
//! the earlier ones, and becomes one oplog entry. A collection that does not exist yet gets
//! a `create` entry first, as mongod logs one before the first insert.

use bson::{doc, Bson, Document};

use crate::catalog::{duplicate_key, duplicate_key_error};
use crate::config::number;
use crate::error::ServerError;
use crate::node::NodeState;
use crate::query::{matches, sort, validate_filter};
use crate::update::{apply_update, is_operator_update, upsert_seed, with_id_first};

/// One oplog entry to append.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub op: &'static str,
    pub ns: String,
    pub o: Document,
}

impl Write {
    pub fn insert(ns: &str, o: Document) -> Write {
        Write {
            op: "i",
            ns: ns.to_string(),
            o,
        }
    }
    /// An update entry: the whole new document (see catalog.rs).
    pub fn update(ns: &str, o: Document) -> Write {
        Write {
            op: "u",
            ns: ns.to_string(),
            o,
        }
    }
    pub fn delete(ns: &str, id: Bson) -> Write {
        Write {
            op: "d",
            ns: ns.to_string(),
            o: doc! {"_id": id},
        }
    }
    /// A command entry on `<db>.$cmd`.
    pub fn command(db: &str, o: Document) -> Write {
        Write {
            op: "c",
            ns: format!("{db}.$cmd"),
            o,
        }
    }
}

/// `<$db>.<collection>` of a CRUD command, checked as the server checks collection names.
/// The statements of a command: its array `field` (FailedToParse 9 when missing, as the
/// server's IDL parser says it), each an object (TypeMismatch 14 otherwise).
pub(crate) fn statements<'a>(
    body: &'a Document,
    cmd: &str,
    field: &str,
    what: &str,
) -> Result<Vec<&'a Document>, ServerError> {
    let list = body.get_array(field).map_err(|_| {
        ServerError::failed_to_parse(format!(
            "BSON field '{cmd}.{field}' is missing but a required field"
        ))
    })?;
    list.iter()
        .map(|b| match b {
            Bson::Document(d) => Ok(d),
            _ => Err(ServerError::type_mismatch(format!(
                "each {what} must be an object"
            ))),
        })
        .collect()
}

pub(crate) fn namespace(body: &Document, field: &str) -> Result<String, ServerError> {
    let db = body.get_str("$db").unwrap_or("test");
    let coll = match body.get(field) {
        Some(Bson::String(s)) => s.as_str(),
        _ => {
            return Err(ServerError::invalid_namespace(format!(
                "collection name has invalid type {}",
                body.get(field)
                    .map(|b| format!("{:?}", b.element_type()))
                    .unwrap_or_default()
            )))
        }
    };
    if coll.is_empty() || coll.contains('$') || coll.contains('\0') || coll.starts_with('.') {
        return Err(ServerError::invalid_namespace(format!(
            "Invalid namespace specified '{db}.{coll}'"
        )));
    }
    Ok(format!("{db}.{coll}"))
}

/// Refuses options the simulator does not evaluate (never ignores them).
pub(crate) fn refuse_options(d: &Document, names: &[&str]) -> Result<(), ServerError> {
    for n in names {
        if d.contains_key(*n) {
            return Err(ServerError::bad_value(format!(
                "the '{n}' option is not supported by the replica-set simulator (docs/replset-sim.md)"
            )));
        }
    }
    Ok(())
}

/// A `writeErrors` element.
pub(crate) fn write_error(index: usize, e: &ServerError) -> Bson {
    Bson::Document(doc! {
        "index": index as i32,
        "code": e.code,
        "codeName": e.code_name,
        "errmsg": e.message.clone(),
    })
}

/// One statement of `update`.
#[derive(Debug, Clone)]
pub(crate) struct UpdateSpec {
    pub q: Document,
    pub u: Document,
    pub upsert: bool,
    pub multi: bool,
}

impl UpdateSpec {
    pub fn parse(d: &Document) -> Result<UpdateSpec, ServerError> {
        let q = d.get_document("q").cloned().map_err(|_| {
            ServerError::failed_to_parse(
                "BSON field 'update.updates.q' is missing but a required field",
            )
        })?;
        validate_filter(&q)?;
        let u = match d.get("u") {
            Some(Bson::Document(u)) => u.clone(),
            Some(Bson::Array(_)) => {
                return Err(ServerError::bad_value(
                    "pipeline-style updates are not supported by the replica-set simulator (docs/replset-sim.md)",
                ))
            }
            _ => {
                return Err(ServerError::failed_to_parse(
                    "BSON field 'update.updates.u' is missing but a required field",
                ))
            }
        };
        refuse_options(d, &["arrayFilters", "collation", "hint", "c"])?;
        let multi = d.get_bool("multi").unwrap_or(false);
        if multi && !is_operator_update(&u) && !u.is_empty() {
            return Err(ServerError::failed_to_parse(
                "multi update is not supported for replacement-style update",
            ));
        }
        // Check the operators now, so that a bad update fails even with no match.
        apply_update(&doc! {"_id": 0}, &u, true).map(|_| ())?;
        Ok(UpdateSpec {
            q,
            u,
            upsert: d.get_bool("upsert").unwrap_or(false),
            multi,
        })
    }
}

/// What one update statement did.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpdateResult {
    pub matched: i32,
    pub modified: i32,
    pub upserted: Option<Bson>,
    /// The last document written.
    pub after: Option<Document>,
}

/// The planned writes on one collection.
#[derive(Debug)]
pub(crate) struct WritePlan {
    ns: String,
    docs: Vec<Document>,
    indexes: Vec<Document>,
    exists: bool,
    pub writes: Vec<Write>,
}

impl WritePlan {
    pub fn new(st: &NodeState, ns: &str) -> WritePlan {
        let store = &st.durable.store;
        WritePlan {
            ns: ns.to_string(),
            docs: store.collections.get(ns).cloned().unwrap_or_default(),
            indexes: store.indexes.get(ns).cloned().unwrap_or_default(),
            exists: store.collections.contains_key(ns),
            writes: Vec::new(),
        }
    }

    fn ensure_collection(&mut self) {
        if !self.exists {
            let (db, coll) = self.ns.split_once('.').unwrap_or((&self.ns, ""));
            self.writes
                .push(Write::command(db, doc! {"create": coll.to_string()}));
            self.exists = true;
        }
    }

    pub fn insert(&mut self, d: Document) -> Result<(), ServerError> {
        if let Some((spec, key)) = duplicate_key(&self.docs, &self.indexes, &d, None) {
            return Err(duplicate_key_error(&self.ns, &spec, &key));
        }
        self.ensure_collection();
        self.docs.push(d.clone());
        self.writes.push(Write::insert(&self.ns, d));
        Ok(())
    }

    fn matching(&self, q: &Document) -> Result<Vec<usize>, ServerError> {
        let mut out = Vec::new();
        for (i, d) in self.docs.iter().enumerate() {
            if matches(d, q)? {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// The first document matching `q` in `sort` order.
    pub fn first(
        &self,
        q: &Document,
        sort_spec: &[(String, bool)],
    ) -> Result<Option<Document>, ServerError> {
        let mut found: Vec<Document> = self
            .matching(q)?
            .into_iter()
            .map(|i| self.docs[i].clone())
            .collect();
        sort(&mut found, sort_spec);
        Ok(found.into_iter().next())
    }

    fn replace(&mut self, old: &Document, new: Document) -> Result<bool, ServerError> {
        if *old == new {
            return Ok(false);
        }
        let id = old.get("_id");
        if let Some((spec, key)) = duplicate_key(&self.docs, &self.indexes, &new, id) {
            return Err(duplicate_key_error(&self.ns, &spec, &key));
        }
        if let Some(slot) = self.docs.iter_mut().find(|d| d.get("_id") == id) {
            *slot = new.clone();
        }
        self.writes.push(Write::update(&self.ns, new));
        Ok(true)
    }

    fn upsert(&mut self, spec: &UpdateSpec) -> Result<UpdateResult, ServerError> {
        let seed = upsert_seed(&spec.q)?;
        let new = if is_operator_update(&spec.u) {
            apply_update(&seed, &spec.u, true)?
        } else {
            let mut d = spec.u.clone();
            if let (Some(id), false) = (seed.get("_id"), d.contains_key("_id")) {
                d.insert("_id", id.clone());
            }
            d
        };
        let new = with_id_first(new);
        let id = new.get("_id").cloned().unwrap_or(Bson::Null);
        self.insert(new.clone())?;
        Ok(UpdateResult {
            upserted: Some(id),
            after: Some(new),
            ..Default::default()
        })
    }

    /// One update statement (`multi` or not, with upsert).
    pub fn update(&mut self, spec: &UpdateSpec) -> Result<UpdateResult, ServerError> {
        if !spec.multi {
            let first = self.first(&spec.q, &[])?;
            return self.update_one(spec, first);
        }
        let targets: Vec<Document> = self
            .matching(&spec.q)?
            .into_iter()
            .map(|i| self.docs[i].clone())
            .collect();
        if targets.is_empty() && spec.upsert {
            return self.upsert(spec);
        }
        let mut r = UpdateResult::default();
        for old in targets {
            let new = apply_update(&old, &spec.u, false)?;
            r.matched += 1;
            if self.replace(&old, new.clone())? {
                r.modified += 1;
            }
            r.after = Some(new);
        }
        Ok(r)
    }

    /// Updates `target` (the document the statement chose), or upserts when there is none.
    pub fn update_one(
        &mut self,
        spec: &UpdateSpec,
        target: Option<Document>,
    ) -> Result<UpdateResult, ServerError> {
        let Some(old) = target else {
            return if spec.upsert {
                self.upsert(spec)
            } else {
                Ok(UpdateResult::default())
            };
        };
        let new = apply_update(&old, &spec.u, false)?;
        let modified = self.replace(&old, new.clone())?;
        Ok(UpdateResult {
            matched: 1,
            modified: i32::from(modified),
            upserted: None,
            after: Some(new),
        })
    }

    /// Deletes the documents matching `q` (the first in `sort` order when `one`); returns
    /// them.
    pub fn delete(
        &mut self,
        q: &Document,
        sort_spec: Option<&[(String, bool)]>,
        one: bool,
    ) -> Result<Vec<Document>, ServerError> {
        let gone: Vec<Document> = if one {
            self.first(q, sort_spec.unwrap_or(&[]))?
                .into_iter()
                .collect()
        } else {
            self.matching(q)?
                .into_iter()
                .map(|i| self.docs[i].clone())
                .collect()
        };
        for d in &gone {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            self.docs.retain(|x| x.get("_id") != Some(&id));
            self.writes.push(Write::delete(&self.ns, id));
        }
        Ok(gone)
    }
}

/// `limit`/`batchSize`-style non-negative numbers.
pub(crate) fn count_arg(body: &Document, key: &str) -> Result<Option<usize>, ServerError> {
    match body.get(key) {
        None | Some(Bson::Null) => Ok(None),
        Some(b) => match number(b) {
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            Some(n) => Err(ServerError::bad_value(format!(
                "{key} value must be non-negative, but received: {n}"
            ))),
            None => Err(ServerError::type_mismatch(format!(
                "BSON field '{key}' is the wrong type"
            ))),
        },
    }
}
