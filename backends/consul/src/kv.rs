//! Consul KV: reads (`recurse`, blocking or not), transactions, and the wire rules other code
//! of the project reuses (key encoding, the blocking-query index, the `delete` + `lock`
//! transaction).

use backend_core::{BackendError, KvEntry};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::client::{consul_index, successful, Client};
use crate::STORE;

/// Consul's limit on the operations of one transaction.
pub const MAX_TXN_OPS: usize = 64;

impl Client {
    /// Runs KV operations in transactions of at most [`MAX_TXN_OPS`], never splitting the
    /// operations of one key. `session`: the session the operations lock with, if any.
    pub(crate) async fn txn(
        &self,
        per_key: Vec<Vec<serde_json::Value>>,
        session: Option<&str>,
    ) -> Result<(), BackendError> {
        for batch in txn_batches(per_key) {
            self.run_txn(batch, session).await?;
        }
        Ok(())
    }

    async fn run_txn(
        &self,
        ops: Vec<serde_json::Value>,
        session: Option<&str>,
    ) -> Result<(), BackendError> {
        let what = txn_what(&ops);
        let resp = self
            .send(self.request(Method::PUT, "/v1/txn").json(&ops), &what)
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        // A lock is refused when its session is gone: ask Consul whether it is.
        if let Some(id) = session {
            if !self.session_exists(id).await? {
                return Err(BackendError::SessionLost {
                    store: STORE,
                    detail: format!("session {id} is gone: {}", body.trim()),
                });
            }
        }
        Err(BackendError::Rejected {
            store: STORE,
            detail: format!("{what} failed: {}", txn_errors(&ops, &body)),
            source: None,
        })
    }

    /// Sets `key` to `value` only while `session` holds the lock `lock_key`: one transaction
    /// of `check-session` and `set`. A failed check (Consul rolls the transaction back and
    /// names operation 0) is [`BackendError::Fenced`].
    pub(crate) async fn fenced_set(
        &self,
        lock_key: &str,
        session: &str,
        key: &str,
        value: &[u8],
    ) -> Result<(), BackendError> {
        let ops = fenced_set_ops(lock_key, session, key, value);
        let what = format!("KV write {key} as leader");
        let resp = self
            .send(self.request(Method::PUT, "/v1/txn").json(&ops), &what)
            .await?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status == StatusCode::CONFLICT && failed_op_indexes(&body).contains(&0) {
            return Err(BackendError::Fenced {
                store: STORE,
                key: key.to_string(),
                leader_key: lock_key.to_string(),
            });
        }
        Err(BackendError::Rejected {
            store: STORE,
            detail: format!("{what} failed: {}", txn_errors(&ops, &body)),
            source: None,
        })
    }

    /// Reads every key under `prefix` (`recurse`), with the index of the answer. The read is
    /// `consistent`: the leader checks with a quorum that it still leads before it answers,
    /// so a deposed leader (a partitioned server) cannot answer with what it last knew.
    pub async fn list_prefix(&self, prefix: &str) -> Result<(Vec<KvEntry>, u64), BackendError> {
        let path = format!("/v1/kv/{}?recurse=true&consistent", encode_key(prefix));
        list(
            self,
            self.request(Method::GET, &path),
            &format!("KV read {prefix}"),
        )
        .await
    }
}

/// The key of a KV operation of a transaction (`{"KV": {"Key": ...}}`).
fn op_key(op: &serde_json::Value) -> &str {
    op["KV"]["Key"].as_str().unwrap_or("?")
}

/// What a transaction does, for its errors: the first key, and how many more.
fn txn_what(ops: &[serde_json::Value]) -> String {
    let mut keys: Vec<&str> = ops.iter().map(op_key).collect();
    keys.dedup();
    match keys.as_slice() {
        [] => "KV transaction".to_string(),
        [one] => format!("KV transaction on {one}"),
        [first, rest @ ..] => format!("KV transaction on {first} and {} more keys", rest.len()),
    }
}

/// The operations of a fenced write: `check-session` of the lock, then `set`.
pub fn fenced_set_ops(
    lock_key: &str,
    session: &str,
    key: &str,
    value: &[u8],
) -> Vec<serde_json::Value> {
    vec![
        json!({"KV": {"Verb": "check-session", "Key": lock_key, "Session": session}}),
        json!({"KV": {
            "Verb": "set",
            "Key": key,
            "Value": base64::engine::general_purpose::STANDARD.encode(value),
        }}),
    ]
}

/// The indexes of the operations a refused transaction names (`{"Errors": [{"OpIndex": 0}]}`).
fn failed_op_indexes(body: &str) -> Vec<usize> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Errors", default)]
        errors: Vec<OpIndex>,
    }
    #[derive(Deserialize)]
    struct OpIndex {
        #[serde(rename = "OpIndex")]
        op_index: usize,
    }
    serde_json::from_str::<Answer>(body)
        .map(|a| a.errors.into_iter().map(|e| e.op_index).collect())
        .unwrap_or_default()
}

/// A refused transaction's errors (`{"Errors": [{"OpIndex": 0, "What": "..."}]}`), each with
/// the key of its operation; the body as it is when it is not that.
fn txn_errors(ops: &[serde_json::Value], body: &str) -> String {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Errors", default)]
        errors: Vec<OpError>,
    }
    #[derive(Deserialize)]
    struct OpError {
        #[serde(rename = "OpIndex")]
        op_index: usize,
        #[serde(rename = "What")]
        what: String,
    }
    match serde_json::from_str::<Answer>(body) {
        Ok(answer) if !answer.errors.is_empty() => answer
            .errors
            .iter()
            .map(|e| {
                let key = ops.get(e.op_index).map_or("?", op_key);
                format!("{key}: {}", e.what.to_lowercase())
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => body.trim().to_string(),
    }
}

#[derive(Deserialize)]
struct KvPair {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
}

/// One `GET /v1/kv/...?recurse` (blocking or not): the entries and `X-Consul-Index`.
pub(crate) async fn list(
    store: &Client,
    rb: reqwest::RequestBuilder,
    what: &str,
) -> Result<(Vec<KvEntry>, u64), BackendError> {
    let resp = store.send(rb, what).await?;
    let index = consul_index(&resp);
    if resp.status() == StatusCode::NOT_FOUND {
        return Ok((Vec::new(), index));
    }
    let resp = successful(resp, what).await?;
    let pairs: Vec<KvPair> = store.decode(resp, what).await?;
    let entries = pairs
        .into_iter()
        .map(|p| KvEntry {
            key: p.key,
            value: p
                .value
                .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
                .unwrap_or_default(),
        })
        .collect();
    Ok((entries, index))
}

/// The index of the next blocking query after an answer with `X-Consul-Index: new`, by
/// Consul's rules: reset to 0 (a full read) when it went backwards, never below 1.
pub fn next_index(old: u64, new: u64) -> u64 {
    if new < old {
        0
    } else {
        new.max(1)
    }
}

/// The operations of one `/v1/txn` that write `value` at `key` held by `session`: `delete`
/// then `lock`, atomic for readers, and taking over a key still held by another session.
pub fn lock_ops(key: &str, value: &[u8], session: &str) -> Vec<serde_json::Value> {
    let value = base64::engine::general_purpose::STANDARD.encode(value);
    vec![
        json!({"KV": {"Verb": "delete", "Key": key}}),
        json!({"KV": {"Verb": "lock", "Key": key, "Value": value, "Session": session}}),
    ]
}

/// The most JSON one transaction of this program carries: Consul refuses a request over
/// `txn_max_req_len` (512 KiB by default); values are base64 in it, a third larger.
pub const MAX_TXN_BYTES: usize = 384 * 1024;

/// Groups the operations of several keys into transactions of at most [`MAX_TXN_OPS`] and
/// [`MAX_TXN_BYTES`], never splitting the operations of one key.
pub fn txn_batches(per_key: Vec<Vec<serde_json::Value>>) -> Vec<Vec<serde_json::Value>> {
    let mut batches = Vec::new();
    let mut batch: Vec<serde_json::Value> = Vec::new();
    let mut bytes = 0;
    for ops in per_key {
        let n: usize = ops.iter().map(|op| op.to_string().len()).sum();
        if !batch.is_empty() && (batch.len() + ops.len() > MAX_TXN_OPS || bytes + n > MAX_TXN_BYTES)
        {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += n;
        batch.extend(ops);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// Percent-encodes a key for a URL path, keeping `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_refused_transaction_names_the_refused_key() {
        let ops = vec![
            json!({"KV": {"Verb": "delete", "Key": "p/services/a"}}),
            json!({"KV": {"Verb": "lock", "Key": "p/services/a"}}),
            json!({"KV": {"Verb": "lock", "Key": "p/services/b"}}),
        ];
        assert_eq!(
            txn_what(&ops),
            "KV transaction on p/services/a and 1 more keys"
        );
        assert_eq!(txn_what(&ops[..1]), "KV transaction on p/services/a");
        let body = r#"{"Results":null,"Errors":[{"OpIndex":2,"What":"Permission denied"}]}"#;
        assert_eq!(txn_errors(&ops, body), "p/services/b: permission denied");
        assert_eq!(txn_errors(&ops, " not json\n"), "not json");
    }
}
