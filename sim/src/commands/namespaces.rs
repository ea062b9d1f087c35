//! Databases, collections and indexes: create, drop, dropDatabase, createIndexes (unique
//! indexes enforced on every later write), listIndexes, dropIndexes, listCollections,
//! listDatabases, dbStats, collStats. Each change is a `c` oplog entry, as mongod logs it.

use bson::{doc, Bson, Document};
use std::collections::BTreeSet;

use crate::auth::ClientSession;
use crate::catalog::{duplicate_key, duplicate_key_error, id_index};
use crate::config::number;
use crate::error::ServerError;
use crate::node::Node;
use crate::query::matches;

use super::write_plan::{namespace, statements, Write};

fn bson_size(d: &Document) -> i64 {
    bson::to_vec(d).map(|v| v.len() as i64).unwrap_or(0)
}

/// The collections of `db` and the namespaces' documents.
fn collections_of<'a>(
    all: &'a std::collections::BTreeMap<String, Vec<Document>>,
    db: &str,
) -> Vec<(&'a str, &'a Vec<Document>)> {
    let prefix = format!("{db}.");
    all.iter()
        .filter_map(|(ns, docs)| ns.strip_prefix(&prefix).map(|c| (c, docs)))
        .collect()
}

/// Checks an index key pattern: ascending / descending fields only.
fn check_key_pattern(key: &Document) -> Result<(), ServerError> {
    if key.is_empty() {
        return Err(ServerError::cannot_create_index(
            "Index keys cannot be an empty field.",
        ));
    }
    for (k, v) in key {
        match number(v) {
            Some(1) | Some(-1) => {}
            _ => {
                return Err(ServerError::cannot_create_index(format!(
                    "Index type {{{k}: {v}}} is not supported by the replica-set simulator (only 1 and -1)"
                )))
            }
        }
    }
    Ok(())
}

impl Node {
    pub(super) async fn cmd_create(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "create")?;
        for opt in [
            "capped",
            "size",
            "max",
            "viewOn",
            "pipeline",
            "timeseries",
            "clusteredIndex",
            "validator",
            "changeStreamPreAndPostImages",
            "collation",
            "expireAfterSeconds",
        ] {
            if body.contains_key(opt) {
                return Err(ServerError::invalid_options(format!(
                    "create with '{opt}' is not supported by the replica-set simulator (docs/replset-sim.md)"
                )));
            }
        }
        let (_, reply) = self
            .write(body, |st| {
                if st.durable.store.collections.contains_key(&ns) {
                    return Err(ServerError::namespace_exists(format!(
                        "Collection {ns} already exists."
                    )));
                }
                let (db, coll) = ns.split_once('.').unwrap_or((&ns, ""));
                Ok((vec![Write::command(db, doc! {"create": coll})], ()))
            })
            .await?;
        Ok(reply)
    }

    pub(super) async fn cmd_drop(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "drop")?;
        let (n, mut reply) = self
            .write(body, |st| {
                let store = &st.durable.store;
                // MongoDB 7.0: dropping a collection that does not exist succeeds.
                if !store.collections.contains_key(&ns) {
                    return Ok((Vec::new(), None));
                }
                let n = store.indexes.get(&ns).map(|l| l.len()).unwrap_or(0) as i32 + 1;
                let (db, coll) = ns.split_once('.').unwrap_or((&ns, ""));
                Ok((vec![Write::command(db, doc! {"drop": coll})], Some(n)))
            })
            .await?;
        if let Some(n) = n {
            reply.insert("nIndexesWas", n);
            reply.insert("ns", ns);
        }
        Ok(reply)
    }

    pub(super) async fn cmd_drop_database(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        if db == "local" || db == "admin" || db == "config" {
            return Err(ServerError::illegal_operation(format!(
                "Dropping the '{db}' database is prohibited."
            )));
        }
        let (_, mut reply) = self
            .write(body, |_| {
                Ok((vec![Write::command(&db, doc! {"dropDatabase": 1})], ()))
            })
            .await?;
        reply.insert("dropped", db);
        Ok(reply)
    }

    pub(super) async fn cmd_create_indexes(
        &self,
        body: &Document,
    ) -> Result<Document, ServerError> {
        let ns = namespace(body, "createIndexes")?;
        let mut wanted = Vec::new();
        for s in statements(body, "createIndexes", "indexes", "index specification")? {
            let key = s.get_document("key").map_err(|_| {
                ServerError::failed_to_parse(
                    "The 'key' field is a required property of an index specification",
                )
            })?;
            check_key_pattern(key)?;
            let name = s.get_str("name").map_err(|_| {
                ServerError::failed_to_parse(
                    "The 'name' field is a required property of an index specification",
                )
            })?;
            for (k, _) in s {
                if !matches!(k.as_str(), "key" | "name" | "unique" | "v") {
                    return Err(ServerError::cannot_create_index(format!(
                        "The index option '{k}' is not supported by the replica-set simulator (docs/replset-sim.md)"
                    )));
                }
            }
            let mut spec = doc! {"v": 2, "key": key.clone(), "name": name};
            if s.get_bool("unique").unwrap_or(false) {
                spec.insert("unique", true);
            }
            wanted.push(spec);
        }
        let ((before, after, created), mut reply) = self
            .write(body, |st| {
                let store = &st.durable.store;
                let docs = store.collections.get(&ns).cloned().unwrap_or_default();
                let mut current = store.indexes.get(&ns).cloned().unwrap_or_default();
                let before = current.len() as i32 + 1;
                let created = !store.collections.contains_key(&ns);
                let (db, coll) = ns.split_once('.').unwrap_or((&ns, ""));
                let mut writes = Vec::new();
                for spec in &wanted {
                    let name = spec.get_str("name").unwrap_or_default();
                    let key = spec.get_document("key").ok();
                    let mut all = vec![id_index()];
                    all.extend(current.iter().cloned());
                    if let Some(same) = all.iter().find(|s| s.get_str("name").ok() == Some(name)) {
                        if same.get_document("key").ok() != key
                            || same.get_bool("unique").unwrap_or(false)
                                != spec.get_bool("unique").unwrap_or(false)
                        {
                            return Err(ServerError::index_key_specs_conflict(format!(
                                "An existing index has the same name as the requested index. When index names are not specified, they are auto generated and can cause conflicts. Please refer to our documentation. Requested index: {spec}, existing index: {same}"
                            )));
                        }
                        continue;
                    }
                    if let Some(same) = all.iter().find(|s| s.get_document("key").ok() == key) {
                        return Err(ServerError::index_options_conflict(format!(
                            "Index already exists with a different name: {}",
                            same.get_str("name").unwrap_or_default()
                        )));
                    }
                    if spec.get_bool("unique").unwrap_or(false) {
                        // Building a unique index over duplicates fails with DuplicateKey.
                        let mut seen: Vec<Document> = Vec::new();
                        for d in &docs {
                            if let Some((s, k)) = duplicate_key(&seen, std::slice::from_ref(spec), d, None) {
                                if s.get_str("name").ok() == Some(name) {
                                    return Err(duplicate_key_error(&ns, &s, &k));
                                }
                            }
                            seen.push(d.clone());
                        }
                    }
                    let mut o = doc! {"createIndexes": coll};
                    o.extend(spec.clone());
                    writes.push(Write::command(db, o));
                    current.push(spec.clone());
                }
                if created && writes.is_empty() {
                    writes.push(Write::command(db, doc! {"create": coll}));
                }
                Ok((writes, (before, current.len() as i32 + 1, created)))
            })
            .await?;
        reply.insert("numIndexesBefore", before);
        reply.insert("numIndexesAfter", after);
        reply.insert("createdCollectionAutomatically", created);
        if before == after {
            reply.insert("note", "all indexes already exist");
        }
        Ok(reply)
    }

    pub(super) async fn cmd_drop_indexes(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "dropIndexes")?;
        let which = body.get("index").cloned().unwrap_or(Bson::Null);
        let (n, mut reply) = self
            .write(body, |st| {
                let store = &st.durable.store;
                if !store.collections.contains_key(&ns) {
                    return Err(ServerError::namespace_not_found(format!(
                        "ns not found {ns}"
                    )));
                }
                let current = store.indexes.get(&ns).cloned().unwrap_or_default();
                let (db, coll) = ns.split_once('.').unwrap_or((&ns, ""));
                let targets: Vec<String> = match &which {
                    Bson::String(s) if s == "*" => current
                        .iter()
                        .filter_map(|s| s.get_str("name").ok().map(String::from))
                        .collect(),
                    Bson::String(s) if s == "_id_" => {
                        return Err(ServerError::invalid_options("cannot drop _id index"))
                    }
                    Bson::String(s) => vec![s.clone()],
                    Bson::Document(k) => current
                        .iter()
                        .filter(|s| s.get_document("key").ok() == Some(k))
                        .filter_map(|s| s.get_str("name").ok().map(String::from))
                        .collect(),
                    _ => Vec::new(),
                };
                for t in &targets {
                    if !current
                        .iter()
                        .any(|s| s.get_str("name").ok() == Some(t.as_str()))
                    {
                        return Err(ServerError::index_not_found(format!(
                            "index not found with name [{t}]"
                        )));
                    }
                }
                if targets.is_empty() && !matches!(&which, Bson::String(s) if s == "*") {
                    return Err(ServerError::index_not_found(format!(
                        "can't find index with key: {which}"
                    )));
                }
                let writes = targets
                    .iter()
                    .map(|t| Write::command(db, doc! {"dropIndexes": coll, "index": t.clone()}))
                    .collect();
                Ok((writes, current.len() as i32 + 1))
            })
            .await?;
        reply.insert("nIndexesWas", n);
        Ok(reply)
    }

    pub(super) fn cmd_list_indexes(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "listIndexes")?;
        let st = self.lock();
        self.check_readable(&st, body)?;
        if !st.durable.store.collections.contains_key(&ns) {
            return Err(ServerError::namespace_not_found(format!(
                "ns does not exist: {ns}"
            )));
        }
        let mut list = vec![Bson::Document(id_index())];
        if let Some(ix) = st.durable.store.indexes.get(&ns) {
            list.extend(ix.iter().cloned().map(Bson::Document));
        }
        let (db, coll) = ns.split_once('.').unwrap_or((&ns, ""));
        Ok(
            doc! {"cursor": {"id": 0i64, "ns": format!("{db}.$cmd.listIndexes.{coll}"), "firstBatch": list}},
        )
    }

    pub(super) fn cmd_list_collections(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let (filter, name_only) = filter_and_name_only(body);
        let st = self.lock();
        self.check_readable(&st, body)?;
        let mut names: BTreeSet<String> = collections_of(&st.durable.store.collections, &db)
            .into_iter()
            .map(|(c, _)| c.to_string())
            .collect();
        if db == "local" {
            names.insert("oplog.rs".into());
            if st.config().is_some() {
                names.insert("system.replset".into());
            }
        }
        let mut out = Vec::new();
        for name in names {
            let d = if name_only {
                doc! {"name": name, "type": "collection"}
            } else {
                doc! {
                    "name": name,
                    "type": "collection",
                    "options": {},
                    "info": {"readOnly": false},
                    "idIndex": id_index(),
                }
            };
            if matches(&d, &filter)? {
                out.push(Bson::Document(d));
            }
        }
        Ok(
            doc! {"cursor": {"id": 0i64, "ns": format!("{db}.$cmd.listCollections"), "firstBatch": out}},
        )
    }

    /// listDatabases; a client without the listDatabases action sees the databases it has
    /// privileges on (`authorizedDatabases`, MongoDB 4.0.5+).
    pub(super) fn cmd_list_databases(
        &self,
        body: &Document,
        session: &ClientSession,
    ) -> Result<Document, ServerError> {
        let (filter, name_only) = filter_and_name_only(body);
        let sizes: Vec<(String, i64, bool)> = {
            let st = self.lock();
            let mut dbs: BTreeSet<String> = st
                .durable
                .store
                .collections
                .keys()
                .filter_map(|ns| ns.split_once('.').map(|(d, _)| d.to_string()))
                .collect();
            dbs.insert("local".into());
            dbs.into_iter()
                .map(|db| {
                    let mut size: i64 = collections_of(&st.durable.store.collections, &db)
                        .iter()
                        .flat_map(|(_, docs)| docs.iter())
                        .map(bson_size)
                        .sum();
                    if db == "local" {
                        size += st
                            .durable
                            .store
                            .oplog
                            .iter()
                            .map(|e| bson_size(&e.to_document()))
                            .sum::<i64>();
                    }
                    // Allocation granularity, as WiredTiger reports at least 4 KiB a file.
                    let on_disk = (size.max(1) + 4095) / 4096 * 4096;
                    (db, on_disk, size == 0)
                })
                .collect()
        };
        let mut out = Vec::new();
        let mut total = 0i64;
        for (name, size, empty) in sizes {
            if !self.may_see_database(session, &name) {
                continue;
            }
            let d = if name_only {
                doc! {"name": name}
            } else {
                doc! {"name": name, "sizeOnDisk": size, "empty": empty}
            };
            if matches(&d, &filter)? {
                total += size;
                out.push(Bson::Document(d));
            }
        }
        let mut reply = doc! {"databases": out};
        if !name_only {
            reply.insert("totalSize", total);
            reply.insert("totalSizeMb", total / (1024 * 1024));
        }
        Ok(reply)
    }

    pub(super) fn cmd_db_stats(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let scale = body.get("scale").and_then(number).unwrap_or(1).max(1);
        let st = self.lock();
        let colls = collections_of(&st.durable.store.collections, &db);
        let objects: i64 = colls.iter().map(|(_, d)| d.len() as i64).sum();
        let size: i64 = colls
            .iter()
            .flat_map(|(_, d)| d.iter())
            .map(bson_size)
            .sum();
        let indexes: i64 = colls
            .iter()
            .map(|(c, _)| {
                1 + st
                    .durable
                    .store
                    .indexes
                    .get(&format!("{db}.{c}"))
                    .map(|l| l.len() as i64)
                    .unwrap_or(0)
            })
            .sum();
        Ok(doc! {
            "db": db,
            "collections": colls.len() as i64,
            "views": 0i64,
            "objects": objects,
            "avgObjSize": if objects > 0 { size as f64 / objects as f64 } else { 0.0 },
            "dataSize": (size / scale) as f64,
            "storageSize": (size / scale) as f64,
            "indexes": indexes,
            "indexSize": 0.0,
            "totalSize": (size / scale) as f64,
            "scaleFactor": scale,
        })
    }

    pub(super) fn cmd_coll_stats(&self, body: &Document) -> Result<Document, ServerError> {
        let ns = namespace(body, "collStats")?;
        let scale = body.get("scale").and_then(number).unwrap_or(1).max(1);
        let st = self.lock();
        let Some(docs) = st.durable.store.collections.get(&ns) else {
            return Err(ServerError::namespace_not_found(format!(
                "Collection [{ns}] not found."
            )));
        };
        let size: i64 = docs.iter().map(bson_size).sum();
        let count = docs.len() as i64;
        let mut index_sizes = doc! {"_id_": 0i64};
        for s in st.durable.store.indexes.get(&ns).into_iter().flatten() {
            index_sizes.insert(s.get_str("name").unwrap_or_default(), 0i64);
        }
        Ok(doc! {
            "ns": ns,
            "count": count,
            "size": size / scale,
            "avgObjSize": if count > 0 { size / count } else { 0 },
            "storageSize": size / scale,
            "nindexes": index_sizes.len() as i64,
            "totalIndexSize": 0i64,
            "indexSizes": index_sizes,
            "scaleFactor": scale,
            "capped": false,
        })
    }
}

/// The `filter` (none: everything) and `nameOnly` of listCollections and listDatabases.
fn filter_and_name_only(body: &Document) -> (Document, bool) {
    let filter = body
        .get_document("filter")
        .ok()
        .cloned()
        .unwrap_or_default();
    (filter, body.get_bool("nameOnly").unwrap_or(false))
}
