//! The clients' history (the lines `replset-demo-app workload` prints, one per call, with its
//! start, end and outcome), the final state (`replset-demo-app dump`), and the checker that
//! judges them together.
//!
//! What it checks, over the whole history:
//! - every acknowledged write is in the final state with its value (none lost or rolled back);
//! - no read, and nothing in the final state, holds a value that no write wrote (a phantom, or
//!   another write's value), and no write that failed for certain was applied;
//! - no read returned a value that is not in the final state while its write was not
//!   acknowledged (a read of a write that was rolled back: read concern majority forbids it);
//! - no client went back in time: a document a client found is found by every later read of
//!   that client.
//!
//! The configs and primaries are judged by the poller of `test_support` (see `main`).

use std::collections::BTreeMap;

pub use op_history::{Op, OpKind, Outcome, Record};

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("line {line} of the client's output is not one of its records ({text:?}): {source}")]
    Line {
        line: usize,
        text: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the dump ended without its last line (final_done): it is incomplete")]
    Incomplete,
    #[error("the dump says {said} documents but printed {printed}")]
    Count { said: usize, printed: usize },
}

/// The operations in a workload's output. Lines that are not JSON (none are expected on
/// stdout) are refused: a history with holes cannot be judged.
pub fn parse_ops(text: &str) -> Result<Vec<Op>, ParseError> {
    let mut ops = Vec::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Record>(l) {
            Ok(Record::Op(op)) => ops.push(op),
            Ok(_) => {}
            Err(source) => {
                return Err(ParseError::Line {
                    line: i + 1,
                    text: l.chars().take(200).collect(),
                    source,
                })
            }
        }
    }
    Ok(ops)
}

/// The final state in a dump's output: id to value.
pub fn parse_final(text: &str) -> Result<BTreeMap<String, Option<String>>, ParseError> {
    let mut docs = BTreeMap::new();
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Record>(l) {
            Ok(Record::Final { id, value }) => {
                docs.insert(id, value);
            }
            Ok(Record::FinalDone { count }) if count == docs.len() => return Ok(docs),
            Ok(Record::FinalDone { count }) => {
                return Err(ParseError::Count {
                    said: count,
                    printed: docs.len(),
                })
            }
            Ok(_) => {}
            Err(source) => {
                return Err(ParseError::Line {
                    line: i + 1,
                    text: l.chars().take(200).collect(),
                    source,
                })
            }
        }
    }
    Err(ParseError::Incomplete)
}

/// A rule broken, with the part of the history that shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// An acknowledged write is not in the final state (lost, or rolled back).
    Lost { write: Op },
    /// An acknowledged write is in the final state with another value.
    Changed { write: Op, found: Option<String> },
    /// A value that no write of that id wrote: in a read, or in the final state (`read` none).
    Phantom {
        id: String,
        value: Option<String>,
        read: Option<Op>,
    },
    /// A write that failed for certain is in the final state.
    FailedButApplied { write: Op },
    /// A read saw a write that is not in the final state and was never acknowledged: it read
    /// data that was later rolled back.
    ReadRolledBack { read: Op, write: Op },
    /// A client found a document, then a later read of the same client did not.
    WentBack { found: Op, later: Op },
}

impl Violation {
    /// The writes this violation counts as lost.
    pub fn is_lost(&self) -> bool {
        matches!(self, Violation::Lost { .. } | Violation::Changed { .. })
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Lost { write } => {
                write!(f, "acknowledged write not in the final state: {write}")
            }
            Violation::Changed { write, found } => write!(
                f,
                "acknowledged write has another value at the end ({}): {write}",
                found.as_deref().unwrap_or("(none)")
            ),
            Violation::Phantom { id, value, read } => match read {
                Some(r) => write!(f, "read a value no write of {id} wrote: {r}"),
                None => write!(
                    f,
                    "the final state holds {id} = {} that no write wrote",
                    value.as_deref().unwrap_or("(none)")
                ),
            },
            Violation::FailedButApplied { write } => {
                write!(f, "a write that failed for certain was applied: {write}")
            }
            Violation::ReadRolledBack { read, write } => write!(
                f,
                "read a write that was rolled back (not acknowledged, not in the final state):\n    write {write}\n    read  {read}"
            ),
            Violation::WentBack { found, later } => write!(
                f,
                "a client went back in time:\n    found {found}\n    later {later}"
            ),
        }
    }
}

/// The writes' counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Of the indeterminate ones, those in the final state (they did happen).
    pub indeterminate_applied: usize,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    pub writes: WriteCounts,
    pub reads: usize,
    pub violations: Vec<Violation>,
}

impl Checked {
    pub fn lost(&self) -> usize {
        self.violations.iter().filter(|v| v.is_lost()).count()
    }
}

/// The client and sequence number in a workload id `<run>-c<k>-<n>`.
fn client_seq(id: &str) -> Option<(u32, u64)> {
    let mut parts = id.rsplitn(3, '-');
    let n = parts.next()?.parse().ok()?;
    let c = parts.next()?.strip_prefix('c')?.parse().ok()?;
    Some((c, n))
}

/// Judges a history against the final state (see the module docs).
pub fn check(ops: &[Op], final_state: &BTreeMap<String, Option<String>>) -> Checked {
    let mut out = Checked::default();
    let writes: BTreeMap<&str, &Op> = ops
        .iter()
        .filter(|o| o.op == OpKind::Write)
        .map(|o| (o.id.as_str(), o))
        .collect();
    // The last sequence number each client recorded: a write in flight when the clients were
    // stopped has the next one and no record; it may be in the final state.
    let mut last_seq: BTreeMap<u32, u64> = BTreeMap::new();
    for w in writes.values() {
        if let Some((c, n)) = client_seq(&w.id) {
            let e = last_seq.entry(c).or_default();
            *e = (*e).max(n);
        }
    }
    for w in writes.values() {
        let at_end = final_state.get(w.id.as_str());
        match w.outcome {
            Outcome::Ok => {
                out.writes.acknowledged += 1;
                match at_end {
                    None => out.violations.push(Violation::Lost {
                        write: (*w).clone(),
                    }),
                    Some(v) if *v != w.value => out.violations.push(Violation::Changed {
                        write: (*w).clone(),
                        found: v.clone(),
                    }),
                    Some(_) => {}
                }
            }
            Outcome::Fail => {
                out.writes.failed += 1;
                if at_end.is_some() {
                    out.violations.push(Violation::FailedButApplied {
                        write: (*w).clone(),
                    });
                }
            }
            Outcome::Info => {
                out.writes.indeterminate += 1;
                if at_end.is_some() {
                    out.writes.indeterminate_applied += 1;
                }
            }
        }
    }
    for (id, value) in final_state {
        let written = writes.get(id.as_str()).map(|w| &w.value);
        let in_flight = client_seq(id).is_some_and(|(c, n)| {
            !writes.contains_key(id.as_str()) && last_seq.get(&c).copied().unwrap_or(0) + 1 == n
        });
        if written != Some(value) && !in_flight {
            out.violations.push(Violation::Phantom {
                id: id.clone(),
                value: value.clone(),
                read: None,
            });
        }
    }
    // Reads, in each client's order.
    let mut found_by: BTreeMap<(u32, &str), &Op> = BTreeMap::new();
    let mut reads: Vec<&Op> = ops
        .iter()
        .filter(|o| o.op == OpKind::Read && o.outcome == Outcome::Ok)
        .collect();
    reads.sort_by_key(|o| (o.client, o.start_ms));
    for r in reads {
        out.reads += 1;
        let write = writes.get(r.id.as_str());
        match (&r.value, write) {
            (Some(v), Some(w)) if Some(v) != w.value.as_ref() => {
                out.violations.push(Violation::Phantom {
                    id: r.id.clone(),
                    value: r.value.clone(),
                    read: Some(r.clone()),
                })
            }
            (Some(_), None) => out.violations.push(Violation::Phantom {
                id: r.id.clone(),
                value: r.value.clone(),
                read: Some(r.clone()),
            }),
            (Some(_), Some(w)) => {
                if w.outcome != Outcome::Ok && !final_state.contains_key(&r.id) {
                    out.violations.push(Violation::ReadRolledBack {
                        read: r.clone(),
                        write: (*w).clone(),
                    });
                }
                found_by.entry((r.client, r.id.as_str())).or_insert(r);
            }
            (None, _) => {
                if let Some(found) = found_by.get(&(r.client, r.id.as_str())) {
                    if found.end_ms <= r.start_ms {
                        out.violations.push(Violation::WentBack {
                            found: (*found).clone(),
                            later: r.clone(),
                        });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(client: u32, n: u64, outcome: Outcome, t: (u64, u64)) -> Op {
        Op {
            client,
            op: OpKind::Write,
            id: format!("r1-c{client}-{n}"),
            value: Some(format!("r1-c{client}-{n}-v")),
            start_ms: t.0,
            end_ms: t.1,
            outcome,
            error: None,
        }
    }

    fn read(client: u32, id: &str, value: Option<&str>, t: (u64, u64)) -> Op {
        Op {
            client,
            op: OpKind::Read,
            id: id.into(),
            value: value.map(str::to_string),
            start_ms: t.0,
            end_ms: t.1,
            outcome: Outcome::Ok,
            error: None,
        }
    }

    fn state(pairs: &[(&str, &str)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_string())))
            .collect()
    }

    #[test]
    fn a_clean_history_passes_and_is_counted() {
        let ops = vec![
            write(1, 1, Outcome::Ok, (0, 5)),
            write(1, 2, Outcome::Info, (6, 20)),
            write(1, 3, Outcome::Fail, (21, 22)),
            read(1, "r1-c1-1", Some("r1-c1-1-v"), (23, 24)),
            // An indeterminate write that did happen, read afterwards: fine.
            read(1, "r1-c1-2", Some("r1-c1-2-v"), (25, 26)),
        ];
        let end = state(&[("r1-c1-1", "r1-c1-1-v"), ("r1-c1-2", "r1-c1-2-v")]);
        let c = check(&ops, &end);
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        assert_eq!(
            c.writes,
            WriteCounts {
                acknowledged: 1,
                failed: 1,
                indeterminate: 1,
                indeterminate_applied: 1
            }
        );
        assert_eq!(c.reads, 2);
        assert_eq!(c.lost(), 0);
    }

    #[test]
    fn an_acknowledged_write_missing_or_changed_at_the_end_is_lost() {
        let ops = vec![
            write(1, 1, Outcome::Ok, (0, 5)),
            write(2, 1, Outcome::Ok, (0, 5)),
        ];
        let c = check(&ops, &state(&[("r1-c2-1", "other")]));
        assert_eq!(c.lost(), 2, "{:?}", c.violations);
        assert!(matches!(c.violations[0], Violation::Lost { .. }));
        // "other" is no write's value either.
        assert!(c
            .violations
            .iter()
            .any(|v| matches!(v, Violation::Changed { .. })));
    }

    #[test]
    fn phantoms_failed_writes_applied_and_rolled_back_reads_are_caught() {
        let ops = vec![
            write(1, 1, Outcome::Fail, (0, 5)),
            write(1, 2, Outcome::Info, (6, 9)),
            // Saw the indeterminate write, which then is not in the final state.
            read(1, "r1-c1-2", Some("r1-c1-2-v"), (10, 11)),
            // A value never written.
            read(1, "r1-c1-2", Some("bogus"), (12, 13)),
        ];
        let end = state(&[("r1-c1-1", "r1-c1-1-v"), ("r9-c1-1", "x")]);
        let c = check(&ops, &end);
        let kinds: Vec<&str> = c
            .violations
            .iter()
            .map(|v| match v {
                Violation::FailedButApplied { .. } => "failed-applied",
                Violation::Phantom { read: None, .. } => "phantom-final",
                Violation::Phantom { read: Some(_), .. } => "phantom-read",
                Violation::ReadRolledBack { .. } => "read-rolled-back",
                _ => "other",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "failed-applied",
                "phantom-final",
                "read-rolled-back",
                "phantom-read"
            ],
            "{:?}",
            c.violations
        );
        assert_eq!(c.lost(), 0);
    }

    #[test]
    fn a_client_that_loses_sight_of_a_document_went_back_in_time() {
        let ops = vec![
            write(1, 1, Outcome::Info, (0, 5)),
            read(1, "r1-c1-1", Some("r1-c1-1-v"), (6, 7)),
            read(1, "r1-c1-1", None, (8, 9)),
            // Another client not finding it is no violation of *its* order.
            read(2, "r1-c1-1", None, (8, 9)),
        ];
        let c = check(&ops, &state(&[("r1-c1-1", "r1-c1-1-v")]));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert!(matches!(c.violations[0], Violation::WentBack { .. }));
    }

    #[test]
    fn the_write_in_flight_when_the_clients_stopped_may_be_at_the_end() {
        let ops = vec![write(1, 1, Outcome::Ok, (0, 5))];
        let end = state(&[("r1-c1-1", "r1-c1-1-v"), ("r1-c1-2", "r1-c1-2-v")]);
        assert!(check(&ops, &end).violations.is_empty());
        // But not the one after it.
        let end = state(&[("r1-c1-1", "r1-c1-1-v"), ("r1-c1-3", "r1-c1-3-v")]);
        assert_eq!(check(&ops, &end).violations.len(), 1);
    }

    #[test]
    fn the_clients_lines_parse_and_a_dump_must_be_complete() {
        let text = r#"{"type":"op","client":1,"op":"write","id":"r1-c1-1","value":"v","start_ms":1,"end_ms":2,"outcome":"info","error":"timed out"}
{"type":"done","client":1,"ops":1}
"#;
        let ops = parse_ops(text).expect("parses");
        assert_eq!(ops.len(), 1);
        assert_eq!(ops[0].outcome, Outcome::Info);
        assert!(parse_ops("not json").is_err());
        let dump = "{\"type\":\"final\",\"id\":\"a\",\"value\":\"v\"}\n";
        assert!(matches!(parse_final(dump), Err(ParseError::Incomplete)));
        let dump = format!("{dump}{{\"type\":\"final_done\",\"count\":1}}\n");
        assert_eq!(parse_final(&dump).expect("complete").len(), 1);
        let short = "{\"type\":\"final_done\",\"count\":2}\n";
        assert!(matches!(parse_final(short), Err(ParseError::Count { .. })));
    }
}
