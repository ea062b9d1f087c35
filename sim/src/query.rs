//! Query language of the data plane, for the small data sets of tests and demos: filters
//! (`$eq $ne $gt $gte $lt $lte $in $nin $exists $not $and $or $nor`), the BSON comparison
//! order, projection and sort. Updates are in update.rs.
//!
//! What is out of scope is refused, never ignored: an unknown or unsupported query operator
//! is BadValue (2) "unknown operator: $x" (as the server says for an unknown one), an
//! unknown update modifier FailedToParse (9) "Unknown modifier: $x", regular expressions,
//! `$expr`, `$where`, `$text`, `$elemMatch` and pipeline updates BadValue with a message that
//! says the simulator does not support them. Rules from the manual's "Comparison/Sort Order"
//! page and src/mongo/db/matcher/ (expression_leaf.cpp: type bracketing, null matches
//! missing, array elements match).

use bson::{Bson, Document};
use std::cmp::Ordering;

use crate::error::ServerError;

// ---- the BSON comparison order ----

/// The canonical type order of the manual's "Comparison/Sort Order": MinKey, null, numbers,
/// strings (and symbols), objects, arrays, BinData, ObjectId, booleans, dates, timestamps,
/// regular expressions, MaxKey.
fn type_rank(b: &Bson) -> u8 {
    match b {
        Bson::MinKey => 0,
        Bson::Null | Bson::Undefined => 1,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 2,
        Bson::String(_) | Bson::Symbol(_) => 3,
        Bson::Document(_) => 4,
        Bson::Array(_) => 5,
        Bson::Binary(_) => 6,
        Bson::ObjectId(_) => 7,
        Bson::Boolean(_) => 8,
        Bson::DateTime(_) => 9,
        Bson::Timestamp(_) => 10,
        Bson::RegularExpression(_) => 11,
        Bson::DbPointer(_) => 12,
        Bson::JavaScriptCode(_) | Bson::JavaScriptCodeWithScope(_) => 13,
        Bson::MaxKey => 14,
    }
}

pub(crate) fn as_f64(b: &Bson) -> Option<f64> {
    match b {
        Bson::Int32(i) => Some(*i as f64),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(d) => Some(*d),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

/// Total order over BSON values, as sort and the range operators use it.
pub fn compare(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Bson::Int64(x), Bson::Int64(y)) => x.cmp(y),
        (Bson::Int32(x), Bson::Int32(y)) => x.cmp(y),
        _ if ra == 2 => {
            let (x, y) = (as_f64(a).unwrap_or(f64::NAN), as_f64(b).unwrap_or(f64::NAN));
            // NaN sorts before every other number.
            match (x.is_nan(), y.is_nan()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Less,
                (false, true) => Ordering::Greater,
                _ => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            }
        }
        (Bson::String(x), Bson::String(y)) => x.cmp(y),
        (Bson::Symbol(x), Bson::Symbol(y)) => x.cmp(y),
        (Bson::String(x), Bson::Symbol(y)) | (Bson::Symbol(x), Bson::String(y)) => x.cmp(y),
        (Bson::Document(x), Bson::Document(y)) => {
            let mut xi = x.iter();
            let mut yi = y.iter();
            loop {
                match (xi.next(), yi.next()) {
                    (None, None) => return Ordering::Equal,
                    (None, Some(_)) => return Ordering::Less,
                    (Some(_), None) => return Ordering::Greater,
                    (Some((kx, vx)), Some((ky, vy))) => {
                        let o = type_rank(vx)
                            .cmp(&type_rank(vy))
                            .then_with(|| kx.cmp(ky))
                            .then_with(|| compare(vx, vy));
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                }
            }
        }
        (Bson::Array(x), Bson::Array(y)) => {
            for (vx, vy) in x.iter().zip(y) {
                let o = compare(vx, vy);
                if o != Ordering::Equal {
                    return o;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then_with(|| u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then_with(|| x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => x
            .pattern
            .cmp(&y.pattern)
            .then_with(|| x.options.cmp(&y.options)),
        _ => Ordering::Equal,
    }
}

/// Equality as the query language sees it (numbers of different types are equal by value).
pub fn equal(a: &Bson, b: &Bson) -> bool {
    compare(a, b) == Ordering::Equal
}

// ---- paths ----

/// The values at a dotted path, looking through arrays as a query does: `a.b` on
/// `{a: [{b: 1}, {b: 2}]}` is `[1, 2]`; a numeric part indexes an array.
fn values_at<'a>(value: &'a Bson, path: &[&str], out: &mut Vec<&'a Bson>) {
    let Some((first, rest)) = path.split_first() else {
        out.push(value);
        return;
    };
    match value {
        Bson::Document(d) => {
            if let Some(v) = d.get(*first) {
                values_at(v, rest, out);
            }
        }
        Bson::Array(a) => {
            if let Ok(i) = first.parse::<usize>() {
                if let Some(v) = a.get(i) {
                    values_at(v, rest, out);
                }
            }
            for e in a {
                if matches!(e, Bson::Document(_)) {
                    values_at(e, path, out);
                }
            }
        }
        _ => {}
    }
}

/// [`values_at`] from the top of a document.
fn values_in<'a>(doc: &'a Document, path: &[&str]) -> Vec<&'a Bson> {
    let mut out = Vec::new();
    if let Some((first, rest)) = path.split_first() {
        if let Some(v) = doc.get(*first) {
            values_at(v, rest, &mut out);
        }
    }
    out
}

/// The value at a dotted path without looking through arrays (for update and sort keys).
pub fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = doc.get(parts.next()?)?;
    for p in parts {
        cur = match cur {
            Bson::Document(d) => d.get(p)?,
            Bson::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

// ---- filters ----

pub(crate) fn unsupported(what: &str) -> ServerError {
    ServerError::bad_value(format!(
        "{what} is not supported by the replica-set simulator (see docs/replset-sim.md)"
    ))
}

/// Checks a filter before use: every operator must be one the simulator evaluates.
pub fn validate_filter(filter: &Document) -> Result<(), ServerError> {
    let probe = Document::new();
    matches(&probe, filter).map(|_| ())
}

/// Whether `doc` matches `filter`.
pub fn matches(doc: &Document, filter: &Document) -> Result<bool, ServerError> {
    let mut all = true;
    for (k, cond) in filter {
        let ok = match k.as_str() {
            "$and" | "$or" | "$nor" => {
                let Bson::Array(list) = cond else {
                    return Err(ServerError::bad_value(format!("{k} must be an array")));
                };
                if list.is_empty() {
                    return Err(ServerError::bad_value(
                        "$and/$or/$nor must be a nonempty array",
                    ));
                }
                let mut results = Vec::new();
                for f in list {
                    let Bson::Document(f) = f else {
                        return Err(ServerError::bad_value(
                            "$or/$and/$nor entries need to be full objects",
                        ));
                    };
                    results.push(matches(doc, f)?);
                }
                match k.as_str() {
                    "$and" => results.iter().all(|&r| r),
                    "$or" => results.iter().any(|&r| r),
                    _ => !results.iter().any(|&r| r),
                }
            }
            "$comment" => true,
            "$expr" | "$where" | "$text" | "$jsonSchema" => return Err(unsupported(k)),
            other if other.starts_with('$') => {
                return Err(ServerError::bad_value(format!(
                    "unknown top level operator: {other}. If you have a field name that starts with a '$' symbol, consider using $getField or $setField."
                )))
            }
            path => field_matches(doc, path, cond)?,
        };
        all &= ok;
    }
    Ok(all)
}

pub(crate) fn is_operator_doc(cond: &Bson) -> Option<&Document> {
    match cond {
        Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => Some(d),
        _ => None,
    }
}

fn field_matches(doc: &Document, path: &str, cond: &Bson) -> Result<bool, ServerError> {
    let parts: Vec<&str> = path.split('.').collect();
    let values = values_in(doc, &parts);
    match is_operator_doc(cond) {
        Some(ops) => {
            let mut all = true;
            for (op, arg) in ops {
                all &= operator_matches(&values, op, arg)?;
            }
            Ok(all)
        }
        None => eq_matches(&values, cond),
    }
}

/// `{path: v}` / `$eq`: some value (or element of an array value) equals `v`; `null`
/// also matches a missing field.
fn eq_matches(values: &[&Bson], want: &Bson) -> Result<bool, ServerError> {
    if matches!(want, Bson::RegularExpression(_)) {
        return Err(unsupported("a regular expression"));
    }
    if matches!(want, Bson::Null) && values.is_empty() {
        return Ok(true);
    }
    Ok(values
        .iter()
        .any(|v| equal(v, want) || matches!(v, Bson::Array(a) if a.iter().any(|e| equal(e, want)))))
}

fn range_matches(values: &[&Bson], want: &Bson, ok: impl Fn(Ordering) -> bool) -> bool {
    let check = |v: &Bson| type_rank(v) == type_rank(want) && ok(compare(v, want));
    values
        .iter()
        .any(|v| check(v) || matches!(v, Bson::Array(a) if a.iter().any(check)))
}

fn operator_matches(values: &[&Bson], op: &str, arg: &Bson) -> Result<bool, ServerError> {
    Ok(match op {
        "$eq" => eq_matches(values, arg)?,
        "$ne" => !eq_matches(values, arg)?,
        "$gt" => range_matches(values, arg, |o| o == Ordering::Greater),
        "$gte" => range_matches(values, arg, |o| o != Ordering::Less),
        "$lt" => range_matches(values, arg, |o| o == Ordering::Less),
        "$lte" => range_matches(values, arg, |o| o != Ordering::Greater),
        "$in" | "$nin" => {
            let Bson::Array(list) = arg else {
                return Err(ServerError::bad_value(format!("{op} needs an array")));
            };
            let mut any = false;
            for w in list {
                if let Bson::Document(d) = w {
                    if d.keys().next().is_some_and(|k| k.starts_with('$')) {
                        return Err(ServerError::bad_value(format!("cannot nest $ under {op}")));
                    }
                }
                any |= eq_matches(values, w)?;
            }
            if op == "$in" {
                any
            } else {
                !any
            }
        }
        "$exists" => {
            let want = match arg {
                Bson::Boolean(b) => *b,
                other => as_f64(other).is_some_and(|n| n != 0.0),
            };
            values.is_empty() != want
        }
        "$not" => match arg {
            Bson::Document(d) if !d.is_empty() => {
                let mut all = true;
                for (op, a) in d {
                    if !op.starts_with('$') {
                        return Err(ServerError::bad_value("$not needs a regex or a document"));
                    }
                    all &= operator_matches(values, op, a)?;
                }
                !all
            }
            Bson::RegularExpression(_) => return Err(unsupported("a regular expression")),
            _ => return Err(ServerError::bad_value("$not needs a regex or a document")),
        },
        "$regex" | "$options" => return Err(unsupported("$regex")),
        "$elemMatch" | "$size" | "$all" | "$type" | "$mod" | "$bitsAllSet" | "$bitsAnySet"
        | "$bitsAllClear" | "$bitsAnyClear" | "$geoWithin" | "$geoIntersects" | "$near"
        | "$nearSphere" | "$expr" | "$jsonSchema" => return Err(unsupported(op)),
        other => return Err(ServerError::bad_value(format!("unknown operator: {other}"))),
    })
}

// ---- sort ----

/// Parses a sort specification: `{field: 1 | -1}`.
/// A sort specification: field paths, each ascending (`true`) or descending.
pub type SortSpec = Vec<(String, bool)>;

/// The `sort` (none: no order) and the projection in field `projection` (none: whole
/// documents) of a find or findAndModify command.
pub fn sort_and_projection(
    body: &Document,
    projection: &str,
) -> Result<(SortSpec, Option<Projection>), ServerError> {
    let sort_spec = match body.get_document("sort") {
        Ok(s) => parse_sort(s)?,
        Err(_) => Vec::new(),
    };
    let projection = match body.get_document(projection) {
        Ok(p) => Projection::parse(p)?,
        Err(_) => None,
    };
    Ok((sort_spec, projection))
}

pub fn parse_sort(spec: &Document) -> Result<SortSpec, ServerError> {
    spec.iter()
        .map(|(k, v)| match as_f64(v) {
            Some(1.0) => Ok((k.clone(), true)),
            Some(-1.0) => Ok((k.clone(), false)),
            _ => Err(ServerError {
                code: 15974,
                code_name: "Location15974",
                message: format!("Illegal key in $sort specification: {k}: {v}"),
            }),
        })
        .collect()
}

/// The key a document sorts by on `path`: for an array, its smallest element ascending and
/// its largest descending; missing is null.
fn sort_key(doc: &Document, path: &str, ascending: bool) -> Bson {
    let parts: Vec<&str> = path.split('.').collect();
    let values = values_in(doc, &parts);
    let mut flat: Vec<&Bson> = Vec::new();
    for v in values {
        match v {
            Bson::Array(a) if !a.is_empty() => flat.extend(a.iter()),
            other => flat.push(other),
        }
    }
    let pick = if ascending {
        flat.into_iter().min_by(|a, b| compare(a, b))
    } else {
        flat.into_iter().max_by(|a, b| compare(a, b))
    };
    pick.cloned().unwrap_or(Bson::Null)
}

/// Sorts documents by a parsed sort specification (stable, so ties keep insertion order).
pub fn sort(docs: &mut [Document], spec: &[(String, bool)]) {
    docs.sort_by(|a, b| {
        for (path, asc) in spec {
            let o = compare(&sort_key(a, path, *asc), &sort_key(b, path, *asc));
            let o = if *asc { o } else { o.reverse() };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
}

// ---- projection ----

/// A parsed projection: include or exclude the listed paths; `_id` unless excluded.
#[derive(Debug, Clone)]
pub struct Projection {
    include: bool,
    paths: Vec<String>,
    id: bool,
}

impl Projection {
    pub fn parse(spec: &Document) -> Result<Option<Projection>, ServerError> {
        if spec.is_empty() {
            return Ok(None);
        }
        let mut include: Option<bool> = None;
        let mut paths = Vec::new();
        let mut id = true;
        for (k, v) in spec {
            if k.contains('$') {
                return Err(unsupported("a positional or operator projection"));
            }
            let on = match v {
                Bson::Boolean(b) => *b,
                Bson::Document(_) => return Err(unsupported(&format!("the projection of {k}"))),
                other => match as_f64(other) {
                    Some(n) => n != 0.0,
                    None => return Err(unsupported(&format!("the projection of {k}"))),
                },
            };
            if k == "_id" {
                id = on;
                continue;
            }
            match include {
                Some(i) if i != on => {
                    return Err(if i {
                        ServerError {
                            code: 31254,
                            code_name: "Location31254",
                            message: format!(
                                "Cannot do exclusion on field {k} in inclusion projection"
                            ),
                        }
                    } else {
                        ServerError {
                            code: 31253,
                            code_name: "Location31253",
                            message: format!(
                                "Cannot do inclusion on field {k} in exclusion projection"
                            ),
                        }
                    })
                }
                _ => include = Some(on),
            }
            paths.push(k.clone());
        }
        Ok(Some(Projection {
            // `{_id: 1}` alone is an inclusion of `_id`; `{_id: 0}` alone an exclusion.
            include: include.unwrap_or(id),
            paths,
            id,
        }))
    }

    pub fn apply(&self, doc: &Document) -> Document {
        if self.include {
            let mut out = Document::new();
            if self.id {
                if let Some(v) = doc.get("_id") {
                    out.insert("_id", v.clone());
                }
            }
            for (k, v) in doc {
                if k == "_id" {
                    continue;
                }
                let sub: Vec<&str> = self
                    .paths
                    .iter()
                    .filter_map(|p| {
                        if p == k {
                            Some("")
                        } else {
                            p.strip_prefix(k.as_str()).and_then(|r| r.strip_prefix('.'))
                        }
                    })
                    .collect();
                if sub.is_empty() {
                    continue;
                }
                if sub.contains(&"") {
                    out.insert(k, v.clone());
                } else if let Bson::Document(inner) = v {
                    let p = Projection {
                        include: true,
                        paths: sub.iter().map(|s| s.to_string()).collect(),
                        id: false,
                    };
                    out.insert(k, p.apply(inner));
                }
            }
            out
        } else {
            let mut out = doc.clone();
            if !self.id {
                out.remove("_id");
            }
            for p in &self.paths {
                remove_path(&mut out, p);
            }
            out
        }
    }
}

pub(crate) fn remove_path(doc: &mut Document, path: &str) -> Option<Bson> {
    match path.split_once('.') {
        None => doc.remove(path),
        Some((first, rest)) => match doc.get_mut(first) {
            Some(Bson::Document(d)) => remove_path(d, rest),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn m(d: Document, f: Document) -> bool {
        matches(&d, &f).expect("valid filter")
    }

    #[test]
    fn comparison_operators_respect_type_brackets() {
        let d = doc! {"n": 5, "s": "abc", "tags": ["a", "b"], "sub": {"x": 1}};
        assert!(m(d.clone(), doc! {"n": {"$gt": 4, "$lte": 5.0}}));
        assert!(!m(d.clone(), doc! {"n": {"$gt": "4"}}));
        assert!(m(d.clone(), doc! {"s": {"$gte": "abb"}}));
        assert!(m(d.clone(), doc! {"tags": "b"}));
        assert!(m(d.clone(), doc! {"tags": {"$in": ["z", "a"]}}));
        assert!(m(d.clone(), doc! {"tags": {"$nin": ["z"]}}));
        assert!(m(d.clone(), doc! {"sub.x": 1i64}));
        assert!(m(d.clone(), doc! {"missing": null}));
        assert!(m(
            d.clone(),
            doc! {"missing": {"$exists": false}, "n": {"$exists": true}}
        ));
        assert!(m(d.clone(), doc! {"n": {"$not": {"$gt": 7}}}));
        assert!(m(d.clone(), doc! {"$or": [{"n": 1}, {"s": "abc"}]}));
        assert!(!m(d.clone(), doc! {"$and": [{"n": 5}, {"s": "x"}]}));
        assert!(m(d.clone(), doc! {"n": {"$ne": 6}}));
    }

    #[test]
    fn unknown_operators_are_errors() {
        let d = doc! {"a": 1};
        assert_eq!(
            matches(&d, &doc! {"a": {"$foo": 1}}).map_err(|e| e.code),
            Err(2)
        );
        assert_eq!(matches(&d, &doc! {"$foo": 1}).map_err(|e| e.code), Err(2));
        assert!(matches(&d, &doc! {"a": {"$elemMatch": {"b": 1}}}).is_err());
    }

    #[test]
    fn the_bson_order_puts_types_in_the_manuals_order() {
        let mut v = vec![
            Bson::Boolean(false),
            Bson::String("a".into()),
            Bson::Int32(3),
            Bson::Null,
            Bson::Double(2.5),
            Bson::Document(doc! {}),
        ];
        v.sort_by(compare);
        assert_eq!(
            v,
            vec![
                Bson::Null,
                Bson::Double(2.5),
                Bson::Int32(3),
                Bson::String("a".into()),
                Bson::Document(doc! {}),
                Bson::Boolean(false),
            ]
        );
    }

    #[test]
    fn sort_and_projection() {
        let mut docs = vec![
            doc! {"_id": 1, "a": 2, "b": "x"},
            doc! {"_id": 2, "a": 1, "b": "y"},
            doc! {"_id": 3, "b": "z"},
        ];
        sort(&mut docs, &parse_sort(&doc! {"a": -1}).expect("spec"));
        let ids: Vec<i32> = docs.iter().filter_map(|d| d.get_i32("_id").ok()).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        let p = Projection::parse(&doc! {"b": 1, "_id": 0})
            .expect("valid")
            .expect("some");
        assert_eq!(p.apply(&docs[0]), doc! {"b": "x"});
        assert!(Projection::parse(&doc! {"a": 1, "b": 0}).is_err());
        let only_id = Projection::parse(&doc! {"_id": 1})
            .expect("valid")
            .expect("some");
        assert_eq!(only_id.apply(&docs[0]), doc! {"_id": 1});
        let no_id = Projection::parse(&doc! {"_id": 0})
            .expect("valid")
            .expect("some");
        assert_eq!(no_id.apply(&docs[0]), doc! {"a": 2, "b": "x"});
    }
}
