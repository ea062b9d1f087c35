//! Query language of the data plane, for the small data sets of tests and demos: filters
//! (`$eq $ne $gt $gte $lt $lte $in $nin $exists $not $and $or $nor`), the BSON comparison
//! order, update operators (`$set $unset $inc $push $addToSet $setOnInsert $min $max $mul
//! $pop $rename`, `$each`), upserts, projection and sort.
//!
//! What is out of scope is refused, never ignored: an unknown or unsupported query operator
//! is BadValue (2) "unknown operator: $x" (as the server says for an unknown one), an
//! unknown update modifier FailedToParse (9) "Unknown modifier: $x", regular expressions,
//! `$expr`, `$where`, `$text`, `$elemMatch` and pipeline updates BadValue with a message that
//! says the simulator does not support them. Rules from the manual's "Comparison/Sort Order"
//! page and src/mongo/db/matcher/ (expression_leaf.cpp: type bracketing, null matches
//! missing, array elements match).

use bson::{doc, Bson, Document};
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

fn as_f64(b: &Bson) -> Option<f64> {
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

fn unsupported(what: &str) -> ServerError {
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

fn is_operator_doc(cond: &Bson) -> Option<&Document> {
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
pub fn parse_sort(spec: &Document) -> Result<Vec<(String, bool)>, ServerError> {
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

fn remove_path(doc: &mut Document, path: &str) -> Option<Bson> {
    match path.split_once('.') {
        None => doc.remove(path),
        Some((first, rest)) => match doc.get_mut(first) {
            Some(Bson::Document(d)) => remove_path(d, rest),
            _ => None,
        },
    }
}

// ---- updates ----

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
                bson_type_name(args)
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

fn bson_type_name(b: &Bson) -> &'static str {
    match b {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Boolean(_) => "bool",
        Bson::Int32(_) => "int",
        Bson::Int64(_) => "long",
        Bson::Null => "null",
        _ => "other",
    }
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
                    bson_type_name(&base)
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
                        bson_type_name(&other),
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
        let e = apply_update(&d, &doc! {"$foo": {"a": 1}}, false).expect_err("unknown modifier");
        assert_eq!(e.code, 9);
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

    #[test]
    fn upsert_seeds_from_equalities() {
        let seed = upsert_seed(&doc! {"name": "x", "n": {"$gt": 1}, "$and": [{"k": {"$eq": 2}}]})
            .expect("seed");
        assert_eq!(seed, doc! {"name": "x", "k": 2});
    }
}
