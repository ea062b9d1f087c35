//! The lines of a workload's history: what `replset-demo-app workload` and `dump` print on
//! stdout, one JSON object per line, and what `replset-chaos` reads back to judge the run.
//! One definition for both sides, so that the writer and the checker cannot drift apart.
//!
//! ```text
//! {"type":"op","client":0,"op":"write","id":"r1-0-1","value":"v1","start_ms":1,"end_ms":9,"outcome":"ok","error":null}
//! {"type":"done","client":0,"ops":1}
//! {"type":"final","id":"r1-0-1","value":"v1"}
//! {"type":"final_done","count":1}
//! ```

use serde::{Deserialize, Serialize};

/// The kind of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Write,
    Read,
}

/// What an operation did, as far as the client can know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged (a write with w: majority; a read answered, found or not).
    Ok,
    /// Certainly not applied.
    Fail,
    /// Indeterminate: may or may not have been applied.
    Info,
}

/// One call of a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub client: u32,
    pub op: OpKind,
    pub id: String,
    /// A write: the value sent. A read: the value found (`None`: not found, or not answered).
    pub value: Option<String>,
    /// Unix time in milliseconds when the call was made and when it returned.
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client {} {:?} {} = {} [{}..{} ms] {:?}",
            self.client,
            self.op,
            self.id,
            self.value.as_deref().unwrap_or("(none)"),
            self.start_ms,
            self.end_ms,
            self.outcome
        )?;
        if let Some(e) = &self.error {
            write!(f, " ({e})")?;
        }
        Ok(())
    }
}

/// One line of stdout: `{"type": "op" | "done" | "final" | "final_done", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// One call of a client.
    Op(Op),
    /// A client stopped after `ops` calls.
    Done { client: u32, ops: u64 },
    /// One document of the final state (a dump).
    Final { id: String, value: Option<String> },
    /// The dump printed `count` documents: it is complete.
    FinalDone { count: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of the module's example, as a client that is not this crate would write
    /// them, read back as the records they stand for.
    #[test]
    fn the_documented_lines_are_the_records() {
        let lines = [
            r#"{"type":"op","client":0,"op":"write","id":"r1-0-1","value":"v1","start_ms":1,"end_ms":9,"outcome":"ok","error":null}"#,
            r#"{"type":"done","client":0,"ops":1}"#,
            r#"{"type":"final","id":"r1-0-1","value":"v1"}"#,
            r#"{"type":"final_done","count":1}"#,
        ];
        let records: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("a documented line"))
            .collect();
        assert_eq!(
            records,
            [
                Record::Op(Op {
                    client: 0,
                    op: OpKind::Write,
                    id: "r1-0-1".into(),
                    value: Some("v1".into()),
                    start_ms: 1,
                    end_ms: 9,
                    outcome: Outcome::Ok,
                    error: None,
                }),
                Record::Done { client: 0, ops: 1 },
                Record::Final {
                    id: "r1-0-1".into(),
                    value: Some("v1".into()),
                },
                Record::FinalDone { count: 1 },
            ]
        );
        for (line, record) in lines.iter().zip(&records) {
            assert_eq!(
                &serde_json::to_string(record).expect("serializes"),
                line,
                "written back"
            );
        }
    }
}
