//! The replica set's status document ([`ReplSetStatus`], defined in backend-core): built by the
//! reconciler's leader from what it observed and planned, read by `replset-reconciler status`
//! and `scale`.

use std::time::Duration;

use backend_core::{
    Coordinator, KeyLayout, NextKind, NextStep, ReplSetStatus, StatusMember, STATUS_SCHEMA_VERSION,
};

use crate::mongo::Observed;
use crate::plan::{Plan, Step, Wait};

/// The most of `next.detail` a status carries.
const DETAIL_MAX: usize = 1000;

/// The `next` of a status: the kind of step, its machine-readable reason, and its description.
pub fn next_step(step: &Step) -> NextStep {
    let detail: String = step.describe().chars().take(DETAIL_MAX).collect();
    match step {
        Step::Converged => NextStep::new(NextKind::Converged, "", detail),
        Step::Initiate { .. } => NextStep::new(NextKind::Initiate, "", detail),
        Step::Reconfig { .. } => NextStep::new(NextKind::Reconfig, step.kind(), detail),
        Step::ForceReconfig { .. } => NextStep::new(NextKind::ForceReconfig, "", detail),
        Step::Readdress { .. } => NextStep::new(NextKind::ForceReconfig, "readdress", detail),
        Step::Wait(wait) => NextStep::new(NextKind::Wait, wait.reason(), detail),
        Step::Blocked(blocked) => NextStep::new(NextKind::Blocked, blocked.reason(), detail),
    }
}

/// The status of `set` after an observation and its plan. Without a config (written only when
/// the planner is blocked then, e.g. a set whose members lost their data) it has no members
/// and `config_version` 0, and its `next` says why.
pub fn build(
    set: &str,
    observed: &Observed,
    plan: &Plan,
    last_step: &str,
    last_error: &str,
) -> ReplSetStatus {
    let no_config = crate::model::ConfigView {
        set_name: set.to_string(),
        version: 0,
        term: -1,
        replica_set_id: None,
        members: Vec::new(),
    };
    let cfg = observed.observation.config.as_ref().unwrap_or(&no_config);
    let refused = access_refused(observed);
    // Members that refuse the reconciler's login are not "unreachable": when nothing else
    // could be seen, that refusal is the next thing an operator must fix.
    let next = match &refused {
        Some(text)
            if observed.observation.config.is_none()
                || matches!(plan.step, Step::Wait(Wait::Unreachable { .. })) =>
        {
            NextStep::new(NextKind::Blocked, "access_refused", text.clone())
        }
        _ => next_step(&plan.step),
    };
    ReplSetStatus {
        schema_version: STATUS_SCHEMA_VERSION,
        set: set.to_string(),
        config_version: cfg.version,
        primary: observed.primary_host.clone(),
        members: cfg
            .members
            .iter()
            .map(|m| {
                let s = observed.observation.status.get(&m.id);
                StatusMember {
                    id: m.id,
                    host: m.host.clone(),
                    votes: u32::from(m.votes),
                    priority: m.priority,
                    healthy: s.map(|s| s.healthy),
                    state: s.map(|s| format!("{:?}", s.state).to_uppercase()),
                }
            })
            .collect(),
        converged: matches!(plan.step, Step::Converged),
        next,
        last_step: last_step.to_string(),
        last_error: refused.unwrap_or_else(|| last_error.to_string()),
        observed_at: None,
        error: String::new(),
        records_gone: Vec::new(),
    }
}

/// `last`, the status last written, once a reconcile could see nothing of the set: what was
/// last seen (members, config, `observed_at`), not converged, with what failed and the next
/// step (waiting for the members).
pub fn failed(last: ReplSetStatus, plan: &Plan) -> ReplSetStatus {
    let next = next_step(&plan.step);
    let error: String = format!("no config could be read: {}", next.detail)
        .chars()
        .take(DETAIL_MAX)
        .collect();
    ReplSetStatus {
        schema_version: STATUS_SCHEMA_VERSION,
        converged: false,
        next,
        error,
        ..last
    }
}

/// The members that refused the reconciler's login or a command, in one line that names the
/// user and each member (at most [`DETAIL_MAX`] characters).
fn access_refused(observed: &Observed) -> Option<String> {
    if observed.access_refused.is_empty() {
        return None;
    }
    let errors: Vec<&str> = observed
        .access_refused
        .values()
        .map(String::as_str)
        .collect();
    let text = format!(
        "{} member(s) refused the reconciler: {}",
        errors.len(),
        errors.join("; ")
    );
    Some(text.chars().take(DETAIL_MAX).collect())
}

/// Why a status could not be read or did not converge.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read {key} from the store: {source}")]
    Store {
        key: String,
        #[source]
        source: backend_core::BackendError,
    },
    #[error("{key} holds no valid status: {source}")]
    Decode {
        key: String,
        #[source]
        source: backend_core::StatusDecodeError,
    },
    #[error("{set}'s status cannot be trusted now: {problem}")]
    Untrusted {
        set: String,
        problem: backend_core::StatusProblem,
    },
    #[error("{set} did not converge with {members} members within {timeout:?} (status: {last}); is a replset-reconciler running for it?")]
    NotConverged {
        set: String,
        members: usize,
        timeout: Duration,
        last: String,
    },
}

impl StatusError {
    /// Whether reading again can succeed: the store could not be reached. A refusal, an
    /// undecodable value and a verdict on the status are not healed by waiting.
    pub fn is_transient(&self) -> bool {
        matches!(self, StatusError::Store { source, .. } if source.is_transient())
    }
}

/// The status of `set` as the store holds it now; `None` when there is none yet.
pub async fn read<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    set: &str,
) -> Result<Option<ReplSetStatus>, StatusError> {
    let key = layout.replset_status_key(set);
    let Some(raw) = store
        .get_value(&key)
        .await
        .map_err(|source| StatusError::Store {
            key: key.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    ReplSetStatus::from_json(&raw)
        .map(Some)
        .map_err(|source| StatusError::Decode { key, source })
}

/// [`read`], with the store's transient failures ([`BackendError::is_transient`]) retried
/// every [`POLL`] for at most `timeout` (at least one read): a one-shot command must not fail
/// because one member of a store cluster is restarting (the next request goes to the next
/// member). A refusal (a permission the store's user lacks) and an undecodable value are
/// returned at once, as retrying heals neither; after `timeout` the last failure of the store.
///
/// [`BackendError::is_transient`]: backend_core::BackendError::is_transient
pub async fn read_within<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    set: &str,
    timeout: Duration,
) -> Result<Option<ReplSetStatus>, StatusError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match read(store, layout, set).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + POLL <= deadline => {
                tracing::warn!(set, error = %e, "cannot read the status; trying again");
            }
            result => return result,
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How often [`wait_converged`] reads the status.
pub const POLL: Duration = Duration::from_millis(500);

/// Reads the status of `set` until it has converged with `members` members
/// ([`ReplSetStatus::converged_with`]) in an observation at most `max_age` old that did not
/// fail ([`ReplSetStatus::problem`]), for at most `timeout` (at least one read). Transient
/// errors of the store and undecodable values count as "not yet" until the timeout (a value
/// may be half-way through an upgrade of the writer); a refusal of the store is returned at
/// once.
pub async fn wait_converged<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    set: &str,
    members: usize,
    timeout: Duration,
    max_age: Duration,
) -> Result<ReplSetStatus, StatusError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match read(store, layout, set).await {
            Ok(Some(s)) => match s.problem(backend_core::unix_seconds(), max_age) {
                None if s.converged_with(members) => return Ok(s),
                None => summary(&s),
                Some(problem) => format!("{}; {problem}", summary(&s)),
            },
            Ok(None) => "none".to_string(),
            Err(e @ StatusError::Store { .. }) if !e.is_transient() => return Err(e),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + POLL > deadline {
            return Err(StatusError::NotConverged {
                set: set.to_string(),
                members,
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line: `rs0: 3 members, 3 voting, primary 10.0.1.5:27017, config v5, converged | 1:PRIMARY
/// 2:SECONDARY 3:STARTUP2(no vote)`.
pub fn summary(s: &ReplSetStatus) -> String {
    let state = if s.converged {
        "converged".to_string()
    } else {
        format!("next: {}", s.next.detail)
    };
    let members: Vec<String> = s
        .members
        .iter()
        .map(|m| {
            format!(
                "{}:{}{}",
                m.id,
                m.state.as_deref().unwrap_or("?"),
                if m.votes == 0 { "(no vote)" } else { "" }
            )
        })
        .collect();
    format!(
        "{}: {} members, {} voting, primary {}, config v{}, {state} | {}",
        s.set,
        s.members.len(),
        s.voters(),
        s.primary.as_deref().unwrap_or("none"),
        s.config_version,
        members.join(" ")
    )
}

/// The summary line, then one line per member and the last step and error.
pub fn render(s: &ReplSetStatus) -> String {
    let mut out = summary(s);
    out.push_str(&format!(
        "\n  {:<4} {:<22} {:<10} {:<6} {:<9} healthy",
        "_id", "host", "state", "votes", "priority"
    ));
    for m in &s.members {
        out.push_str(&format!(
            "\n  {:<4} {:<22} {:<10} {:<6} {:<9} {}",
            m.id,
            m.host,
            m.state.as_deref().unwrap_or("?"),
            m.votes,
            m.priority,
            m.healthy.map_or("?".to_string(), |h| h.to_string())
        ));
    }
    if !s.last_step.is_empty() {
        out.push_str(&format!("\n  last step: {}", s.last_step));
    }
    if !s.last_error.is_empty() {
        out.push_str(&format!("\n  last error: {}", s.last_error));
    }
    for gone in &s.records_gone {
        out.push_str(&format!(
            "\n  record gone: _id {} ({}) since {} (unix seconds)",
            gone.id, gone.host, gone.since
        ));
    }
    if let Some(at) = s.observed_at {
        let age = backend_core::unix_seconds().saturating_sub(at);
        out.push_str(&format!("\n  observed: {age} s ago"));
    }
    if !s.error.is_empty() {
        out.push_str(&format!("\n  error: {}", s.error));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend_memory::MemoryCluster;

    fn a_status() -> ReplSetStatus {
        serde_json::from_value(serde_json::json!({
            "schema_version": 2, "set": "rs0", "config_version": 3, "primary": null,
            "members": [], "converged": true,
            "next": {"kind": "wait", "reason": "converged", "detail": ""},
        }))
        .expect("a status")
    }

    /// A store holding [`a_status`] for `rs0`.
    async fn a_store_with_a_status() -> (MemoryCluster, backend_memory::MemoryStore, KeyLayout) {
        let layout = KeyLayout::new("t");
        let cluster = MemoryCluster::new();
        let store = cluster.client(layout.clone());
        store
            .put_value(&layout.replset_status_key("rs0"), a_status().to_json())
            .await
            .expect("put the status");
        (cluster, store, layout)
    }

    /// Seed 11's 30-minute run: `scale` back to 3 failed on its first read, which met an
    /// etcd member being restarted, and left the service one member up.
    #[tokio::test(start_paused = true)]
    async fn a_read_that_meets_a_failing_store_is_tried_again() {
        let (cluster, store, layout) = a_store_with_a_status().await;
        cluster.fail_next(2);
        let read = read_within(&store, &layout, "rs0", Duration::from_secs(30))
            .await
            .expect("the status, once the store answers");
        assert_eq!(read, Some(a_status()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_down_for_longer_than_the_timeout_is_an_error() {
        let layout = KeyLayout::new("t");
        let cluster = MemoryCluster::new();
        let store = cluster.client(layout.clone());
        cluster.set_unavailable(true);
        let started = tokio::time::Instant::now();
        let read = read_within(&store, &layout, "rs0", Duration::from_secs(30)).await;
        assert!(matches!(read, Err(StatusError::Store { .. })), "{read:?}");
        assert!(started.elapsed() <= Duration::from_secs(30));
        assert!(started.elapsed() >= Duration::from_secs(29));
    }

    fn is_refusal<T>(r: &Result<T, StatusError>) -> bool {
        matches!(
            r,
            Err(StatusError::Store {
                source: backend_core::BackendError::Rejected { .. },
                ..
            })
        )
    }

    /// A user without read permission on the status key learns it at once, not after the
    /// timeout: the store answered, and asking again gets the same answer.
    #[tokio::test(start_paused = true)]
    async fn a_refused_read_is_returned_at_once() {
        let (cluster, store, layout) = a_store_with_a_status().await;
        cluster.reject_next(1);
        let started = tokio::time::Instant::now();
        let read = read_within(&store, &layout, "rs0", Duration::from_secs(30)).await;
        assert!(is_refusal(&read), "{read:?}");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_convergence_stops_at_a_refusal() {
        let layout = KeyLayout::new("t");
        let cluster = MemoryCluster::new();
        let store = cluster.client(layout.clone());
        cluster.reject_next(1);
        let started = tokio::time::Instant::now();
        let waited = wait_converged(
            &store,
            &layout,
            "rs0",
            3,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .await;
        assert!(is_refusal(&waited), "{waited:?}");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
