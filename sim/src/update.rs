//! Update operators (`$set $unset $inc $mul $min $max $push $addToSet $pop $rename
//! $setOnInsert $currentDate`, `$each`), replacements and the seed of an upsert, as
//! src/mongo/db/update/ applies them. An unknown modifier is FailedToParse (9) "Unknown
//! modifier"; `$pull`, `$pullAll`, `$bit` and pipeline updates are refused (BadValue).

use bson::{doc, Bson, Document};
use std::cmp::Ordering;

use crate::config::type_name;
use crate::error::ServerError;
use crate::query::{as_f64, compare, equal, get_path, is_operator_doc, remove_path, unsupported};

/// Whether an update document is operator-style (`{$set: ...}`) rather than a replacement.
pub fn is_operator_update(update: &Document) -> bool {
    update.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), ServerError> {
    match path.split_once('.') {
        None => {
            doc.insert(path, value);
            Ok(())
        }
        Some((first, rest)) => {
            if !doc.contains_key(first) {
                doc.insert(first, Document::new());
            }
            match doc.get_mut(first) {
                Some(Bson::Document(d)) => set_path(d, rest, value),
                Some(Bson::Array(a)) => {
                    let (idx, rest2) = match rest.split_once('.') {
                        Some((i, r)) => (i, Some(r)),
                        None => (rest, None),
                    };
                    let i: usize = idx.parse().map_err(|_| {
                        ServerError::bad_value(format!(
                            "Cannot create field '{idx}' in element {{{first}: [...]}}"
                        ))
                    })?;
                    while a.len() <= i {
                        a.push(Bson::Null);
                    }
                    match rest2 {
                        None => {
                            a[i] = value;
                            Ok(())
                        }
                        Some(r) => {
                            if !matches!(a[i], Bson::Document(_)) {
                                a[i] = Bson::Document(Document::new());
                            }
                            match &mut a[i] {
                                Bson::Document(d) => set_path(d, r, value),
                                _ => Ok(()),
                            }
                        }
                    }
                }
                Some(other) => Err(ServerError {
                    code: 28,
                    code_name: "PathNotViable",
                    message: format!(
                        "Cannot create field '{}' in element {{{first}: {other}}}",
                        rest.split('.').next().unwrap_or(rest)
                    ),
                }),
                None => Ok(()),
            }
        }
    }
}

fn add_numbers(a: &Bson, b: &Bson, multiply: bool) -> Option<Bson> {
    let f = |x: f64, y: f64| if multiply { x * y } else { x + y };
    Some(match (a, b) {
        (Bson::Int32(x), Bson::Int32(y)) => {
            let r = if multiply {
                x.checked_mul(*y)
            } else {
                x.checked_add(*y)
            };
            match r {
                Some(v) => Bson::Int32(v),
                None => Bson::Int64(if multiply {
                    *x as i64 * *y as i64
                } else {
                    *x as i64 + *y as i64
                }),
            }
        }
        (Bson::Int64(x), Bson::Int32(y)) | (Bson::Int32(y), Bson::Int64(x)) => {
            Bson::Int64(if multiply {
                x * *y as i64
            } else {
                x + *y as i64
            })
        }
        (Bson::Int64(x), Bson::Int64(y)) => Bson::Int64(if multiply { x * y } else { x + y }),
        _ => Bson::Double(f(as_f64(a)?, as_f64(b)?)),
    })
}

/// Applies an update to `doc` (a copy of the stored document, or the seed of an upsert;
/// `inserting` enables `$setOnInsert`). Returns the new document.
pub fn apply_update(
    doc: &Document,
    update: &Document,
    inserting: bool,
) -> Result<Document, ServerError> {
    let id = doc.get("_id").cloned();
    if !is_operator_update(update) {
        if update.keys().any(|k| k.starts_with('$')) {
            return Err(ServerError::failed_to_parse(
                "The dollar ($) prefixed field in a replacement document is not allowed",
            ));
        }
        let mut out = Document::new();
        match (&id, update.get("_id")) {
            (Some(old), Some(new)) if !equal(old, new) => {
                return Err(immutable_id(doc, update));
            }
            (Some(old), _) => {
                out.insert("_id", old.clone());
            }
            _ => {}
        }
        for (k, v) in update {
            if k != "_id" || id.is_none() {
                out.insert(k, v.clone());
            }
        }
        return Ok(out);
    }
    let mut out = doc.clone();
    let mut touched: Vec<String> = Vec::new();
    for (op, args) in update {
        let Bson::Document(args) = args else {
            return Err(ServerError::failed_to_parse(format!(
                "Modifiers operate on fields but we found type {} instead. For example: {{$mod: {{<field>: ...}}}} not {{{op}: {args}}}",
                type_name(args)
            )));
        };
        for (path, arg) in args {
            if let Some(t) = touched.iter().find(|t| {
                *t == path
                    || path.starts_with(&format!("{t}."))
                    || t.starts_with(&format!("{path}."))
            }) {
                return Err(ServerError::conflicting_update_operators(format!(
                    "Updating the path '{path}' would create a conflict at '{t}'"
                )));
            }
            touched.push(path.clone());
            apply_modifier(&mut out, op, path, arg, inserting)?;
        }
    }
    if let Some(old) = &id {
        if out.get("_id").is_none_or(|n| !equal(n, old)) {
            return Err(ServerError::immutable_field(
                "Performing an update on the path '_id' would modify the immutable field '_id'",
            ));
        }
    }
    Ok(out)
}

fn immutable_id(_old: &Document, _new: &Document) -> ServerError {
    ServerError::immutable_field(
        "After applying the update, the (immutable) field '_id' was found to have been altered",
    )
}

fn each(arg: &Bson) -> Result<Vec<Bson>, ServerError> {
    match arg {
        Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
            for k in d.keys() {
                if k != "$each" {
                    return Err(unsupported(&format!("the {k} modifier")));
                }
            }
            match d.get("$each") {
                Some(Bson::Array(a)) => Ok(a.clone()),
                _ => Err(ServerError::bad_value(
                    "The argument to $each must be an array",
                )),
            }
        }
        other => Ok(vec![other.clone()]),
    }
}

fn apply_modifier(
    doc: &mut Document,
    op: &str,
    path: &str,
    arg: &Bson,
    inserting: bool,
) -> Result<(), ServerError> {
    let current = get_path(doc, path).cloned();
    match op {
        "$set" => set_path(doc, path, arg.clone()),
        "$setOnInsert" => {
            if inserting {
                set_path(doc, path, arg.clone())
            } else {
                Ok(())
            }
        }
        "$unset" => {
            remove_path(doc, path);
            Ok(())
        }
        "$inc" | "$mul" => {
            if as_f64(arg).is_none() {
                return Err(ServerError::type_mismatch(format!(
                    "Cannot {} with non-numeric argument: {{{path}: {arg}}}",
                    if op == "$inc" { "increment" } else { "multiply" }
                )));
            }
            let zero = Bson::Int32(0);
            let base = current.clone().unwrap_or(zero);
            let Some(v) = add_numbers(&base, arg, op == "$mul") else {
                return Err(ServerError::type_mismatch(format!(
                    "Cannot apply {op} to a value of non-numeric type. {{_id: ...}} has the field '{path}' of non-numeric type {}",
                    type_name(&base)
                )));
            };
            let v = if current.is_none() && op == "$mul" {
                add_numbers(&Bson::Int32(0), &v, true).unwrap_or(v)
            } else {
                v
            };
            set_path(doc, path, v)
        }
        "$min" | "$max" => {
            let replace = match &current {
                None => true,
                Some(c) => {
                    let o = compare(arg, c);
                    (op == "$min" && o == Ordering::Less) || (op == "$max" && o == Ordering::Greater)
                }
            };
            if replace {
                set_path(doc, path, arg.clone())
            } else {
                Ok(())
            }
        }
        "$push" | "$addToSet" => {
            let items = each(arg)?;
            let mut list = match current {
                None => Vec::new(),
                Some(Bson::Array(a)) => a,
                Some(other) => {
                    return Err(ServerError::bad_value(format!(
                        "The field '{path}' must be an array but is of type {} in document {{_id: {}}}",
                        type_name(&other),
                        doc.get("_id").cloned().unwrap_or(Bson::Null)
                    )))
                }
            };
            for it in items {
                if op == "$push" || !list.iter().any(|e| equal(e, &it)) {
                    list.push(it);
                }
            }
            set_path(doc, path, Bson::Array(list))
        }
        "$pop" => {
            if let Some(Bson::Array(mut a)) = current {
                if as_f64(arg).unwrap_or(1.0) < 0.0 {
                    if !a.is_empty() {
                        a.remove(0);
                    }
                } else {
                    a.pop();
                }
                set_path(doc, path, Bson::Array(a))
            } else {
                Ok(())
            }
        }
        "$rename" => {
            let Bson::String(to) = arg else {
                return Err(ServerError::bad_value("The 'to' field for $rename must be a string"));
            };
            if let Some(v) = remove_path(doc, path) {
                set_path(doc, to, v)?;
            }
            Ok(())
        }
        "$currentDate" => set_path(doc, path, Bson::DateTime(bson::DateTime::now())),
        "$pull" | "$pullAll" | "$bit" => Err(unsupported(op)),
        other => Err(ServerError::failed_to_parse(format!(
            "Unknown modifier: {other}. Expected a valid update modifier or pipeline-style update specified as an array"
        ))),
    }
}

/// The seed document of an upsert: the equality conditions of the filter (`{a: 1}`,
/// `{a: {$eq: 1}}`, inside `$and`), as the server's `extractEqualityMatches` does.
pub fn upsert_seed(filter: &Document) -> Result<Document, ServerError> {
    let mut seed = Document::new();
    fn walk(f: &Document, seed: &mut Document) -> Result<(), ServerError> {
        for (k, v) in f {
            if k == "$and" {
                if let Bson::Array(list) = v {
                    for x in list {
                        if let Bson::Document(d) = x {
                            walk(d, seed)?;
                        }
                    }
                }
                continue;
            }
            if k.starts_with('$') {
                continue;
            }
            let value = match is_operator_doc(v) {
                Some(ops) => match ops.get("$eq") {
                    Some(e) => e.clone(),
                    None => continue,
                },
                None => v.clone(),
            };
            set_path(seed, k, value)?;
        }
        Ok(())
    }
    walk(filter, &mut seed)?;
    Ok(seed)
}

/// A new `_id` first, as the server puts it.
pub fn with_id_first(doc: Document) -> Document {
    match doc.get("_id") {
        Some(_) if doc.keys().next().map(String::as_str) == Some("_id") => doc,
        Some(id) => {
            let mut out = doc! {"_id": id.clone()};
            for (k, v) in doc {
                if k != "_id" {
                    out.insert(k, v);
                }
            }
            out
        }
        None => {
            let mut out = doc! {"_id": bson::oid::ObjectId::new()};
            out.extend(doc);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_operators() {
        let d = doc! {"_id": 1, "n": 1, "tags": ["a"], "gone": true};
        let u = doc! {"$set": {"x.y": 2}, "$inc": {"n": 2}, "$push": {"tags": "b"}, "$addToSet": {"set": {"$each": [1, 1, 2]}}, "$unset": {"gone": ""}};
        let out = apply_update(&d, &u, false).expect("valid update");
        assert_eq!(
            out,
            doc! {"_id": 1, "n": 3, "tags": ["a", "b"], "x": {"y": 2}, "set": [1, 2]}
        );
        let e = apply_update(&d, &doc! {"$set": {"_id": 2}}, false).expect_err("immutable _id");
        assert_eq!(e.code, 66);
        let r = apply_update(&d, &doc! {"only": 1}, false).expect("replacement");
        assert_eq!(r, doc! {"_id": 1, "only": 1});
    }

    #[test]
    fn unknown_modifiers_are_errors() {
        let e = apply_update(&doc! {"a": 1}, &doc! {"$foo": {"a": 1}}, false)
            .expect_err("unknown modifier");
        assert_eq!(e.code, 9);
    }

    #[test]
    fn upsert_seeds_from_equalities() {
        let seed = upsert_seed(&doc! {"name": "x", "n": {"$gt": 1}, "$and": [{"k": {"$eq": 2}}]})
            .expect("seed");
        assert_eq!(seed, doc! {"name": "x", "k": 2});
    }
}
