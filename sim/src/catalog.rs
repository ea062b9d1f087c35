//! Collections and their indexes as the oplog makes them: applying an entry (`i` insert,
//! `u` update, `d` delete, `c` command: create, drop, dropDatabase, createIndexes,
//! dropIndexes) to a member's data, and the unique-index check a primary makes before it
//! writes.
//!
//! Entries have MongoDB's shape (src/mongo/db/repl/oplog_entry.idl) with one
//! simplification: an update entry's `o` is the whole new document (a replacement, which
//! the server also writes for replacement-style updates), found again by its `_id`, instead
//! of a `$v: 2` diff with the `_id` in `o2`. Command entries are on `<db>.$cmd` with the
//! command document in `o`, as the server writes them.

use bson::{doc, Bson, Document};
use std::collections::BTreeMap;

use crate::oplog::OplogEntry;
use crate::query::{equal, get_path};

/// Applies one oplog entry to the collections and index catalog of a member.
pub fn apply_entry(
    collections: &mut BTreeMap<String, Vec<Document>>,
    indexes: &mut BTreeMap<String, Vec<Document>>,
    e: &OplogEntry,
) {
    let id_of = |d: &Document| d.get("_id").cloned().unwrap_or(Bson::Null);
    match e.op.as_str() {
        "i" => collections
            .entry(e.ns.clone())
            .or_default()
            .push(e.o.clone()),
        "u" => {
            let id = id_of(&e.o);
            if let Some(c) = collections.get_mut(&e.ns) {
                if let Some(d) = c.iter_mut().find(|d| equal(&id_of(d), &id)) {
                    *d = e.o.clone();
                }
            }
        }
        "d" => {
            let id = id_of(&e.o);
            if let Some(c) = collections.get_mut(&e.ns) {
                c.retain(|d| !equal(&id_of(d), &id));
            }
        }
        "c" => {
            let db = e.ns.strip_suffix(".$cmd").unwrap_or(&e.ns).to_string();
            let Some((cmd, arg)) = e.o.iter().next() else {
                return;
            };
            let coll = |a: &Bson| format!("{db}.{}", a.as_str().unwrap_or_default());
            match cmd.as_str() {
                "create" => {
                    collections.entry(coll(arg)).or_default();
                }
                "drop" => {
                    collections.remove(&coll(arg));
                    indexes.remove(&coll(arg));
                }
                "dropDatabase" => {
                    let prefix = format!("{db}.");
                    collections.retain(|ns, _| !ns.starts_with(&prefix));
                    indexes.retain(|ns, _| !ns.starts_with(&prefix));
                }
                "createIndexes" => {
                    let ns = coll(arg);
                    collections.entry(ns.clone()).or_default();
                    let mut spec = e.o.clone();
                    spec.remove("createIndexes");
                    let list = indexes.entry(ns).or_default();
                    let name = spec.get_str("name").unwrap_or_default().to_string();
                    if !list
                        .iter()
                        .any(|s| s.get_str("name").ok() == Some(name.as_str()))
                    {
                        list.push(spec);
                    }
                }
                "dropIndexes" => {
                    let ns = coll(arg);
                    let name = e.o.get_str("index").unwrap_or_default().to_string();
                    if let Some(list) = indexes.get_mut(&ns) {
                        list.retain(|s| s.get_str("name").ok() != Some(name.as_str()));
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// The implicit `_id_` index every collection has.
pub fn id_index() -> Document {
    doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"}
}

/// The key of `doc` under an index's key pattern, as the server shows it in a duplicate key
/// error (`{ name: "x" }`); a missing field is null.
pub fn index_key(doc: &Document, pattern: &Document) -> Document {
    let mut k = Document::new();
    for field in pattern.keys() {
        k.insert(
            field.clone(),
            get_path(doc, field).cloned().unwrap_or(Bson::Null),
        );
    }
    k
}

/// The first unique index (including `_id_`) under which `doc` collides with a document of
/// `existing` other than the one with `_id == replacing`: the index spec and the key.
pub fn duplicate_key(
    existing: &[Document],
    indexes: &[Document],
    doc: &Document,
    replacing: Option<&Bson>,
) -> Option<(Document, Document)> {
    let mut unique: Vec<Document> = vec![id_index()];
    unique.extend(
        indexes
            .iter()
            .filter(|s| s.get_bool("unique").unwrap_or(false))
            .cloned(),
    );
    for spec in unique {
        let Ok(pattern) = spec.get_document("key") else {
            continue;
        };
        let key = index_key(doc, pattern);
        let clash = existing.iter().any(|other| {
            let same_doc =
                replacing.is_some_and(|id| other.get("_id").is_some_and(|oid| equal(oid, id)));
            !same_doc && index_key(other, pattern) == key
        });
        if clash {
            return Some((spec, key));
        }
    }
    None
}

/// The write error of a duplicate key, as mongod words it.
pub fn duplicate_key_error(ns: &str, spec: &Document, key: &Document) -> crate::ServerError {
    let name = spec.get_str("name").unwrap_or("?");
    let shown: Vec<String> = key.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    crate::ServerError::duplicate_key(format!(
        "E11000 duplicate key error collection: {ns} index: {name} dup key: {{ {} }}",
        shown.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oplog::{OpTime, OplogEntry};

    fn entry(op: &str, ns: &str, o: Document) -> OplogEntry {
        OplogEntry {
            optime: OpTime::NULL,
            op: op.into(),
            ns: ns.into(),
            o,
            wall: bson::DateTime::now(),
        }
    }

    #[test]
    fn entries_rebuild_collections_and_indexes() {
        let mut c = BTreeMap::new();
        let mut i = BTreeMap::new();
        for e in [
            entry("c", "db.$cmd", doc! {"create": "a"}),
            entry("i", "db.a", doc! {"_id": 1, "x": 1}),
            entry("i", "db.a", doc! {"_id": 2, "x": 2}),
            entry("u", "db.a", doc! {"_id": 1, "x": 10}),
            entry("d", "db.a", doc! {"_id": 2}),
            entry(
                "c",
                "db.$cmd",
                doc! {"createIndexes": "a", "v": 2, "key": {"x": 1}, "name": "x_1", "unique": true},
            ),
        ] {
            apply_entry(&mut c, &mut i, &e);
        }
        assert_eq!(c.get("db.a"), Some(&vec![doc! {"_id": 1, "x": 10}]));
        assert_eq!(i.get("db.a").map(|l| l.len()), Some(1));
        let dup = duplicate_key(&c["db.a"], &i["db.a"], &doc! {"_id": 3, "x": 10}, None);
        assert_eq!(
            dup.map(|(s, k)| (s.get_str("name").map(String::from).ok(), k)),
            Some((Some("x_1".into()), doc! {"x": 10}))
        );
        assert!(duplicate_key(
            &c["db.a"],
            &i["db.a"],
            &doc! {"_id": 1, "x": 10},
            Some(&Bson::Int32(1))
        )
        .is_none());
        apply_entry(
            &mut c,
            &mut i,
            &entry("c", "db.$cmd", doc! {"dropDatabase": 1}),
        );
        assert!(c.is_empty() && i.is_empty());
    }
}
