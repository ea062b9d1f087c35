//! The one-shot commands of `replset-reconciler`: `plan`, `status`, `scale` and
//! `forget-set`. The binary parses their arguments; what they do is here.

use std::collections::BTreeMap;
use std::time::Duration;

use backend_core::{unix_seconds, Coordinator, KeyLayout, SetIdentity};

use crate::controller::{ControllerConfig, Records};
use crate::engine_api::{Engine, EngineApiError};
use crate::mongo::ReplSetClient;
use crate::plan::{plan_next_step, KnownSet, PlanContext};
use crate::reconcile::{known_set, read_identity, IdentityReadError};
use crate::records::{desired_sets, SlotHolders};
use crate::status::{self, StatusError};

/// `plan`: prints the next step of each selected set, as the leader would plan it now
/// (re-addressing included: it is shown before the leader takes it).
pub async fn plan<S: Coordinator, M: ReplSetClient>(
    store: &S,
    records: &Records,
    config: &ControllerConfig,
    members: &M,
) {
    let (sets, skipped) = desired_sets(
        &records.entries,
        &config.layout,
        &config.selectors,
        &SlotHolders::default(),
    );
    for s in skipped {
        println!("ignoring {:?}: {}", s.key, s.refusal);
    }
    for (set, desired) in sets {
        let hosts: Vec<String> = desired.members.values().cloned().collect();
        let observed = members.observe(&set, &hosts, &hosts).await;
        let known_set = match known_set(store, &config.layout, &set).await {
            Ok(known) => known,
            Err(e) => {
                println!("{set}: {e}");
                KnownSet::Unknown
            }
        };
        let record_gone_for = match status::read(store, &config.layout, &set).await {
            Ok(leader_status) => {
                gone_for(&observed, &desired, leader_status.as_ref(), unix_seconds())
            }
            Err(e) => {
                println!("{set}: {e}; counting the removal grace from now");
                gone_for(&observed, &desired, None, unix_seconds())
            }
        };
        let ctx = PlanContext {
            set_name: set.clone(),
            records_trusted: true,
            record_gone_for,
            removal_grace: config.removal_grace,
            // `plan` shows what would be done if the loss lasts: a force with --allow-force.
            force_after: config.force_after,
            majority_lost_for: Duration::MAX,
            committed: match &known_set {
                KnownSet::Known(identity) => crate::model::Committed::of_identity(identity),
                _ => None,
            },
            known_set,
        };
        let plan = plan_next_step(&observed.observation, &desired, &ctx);
        println!("{set}: {}", plan.step.describe());
        for note in plan.notes {
            println!("{set}: note: {note:?}");
        }
    }
}

/// How long each member of the observed config has had no record: since the leader's status
/// says (its `records_gone`, by the leader's clock), or from `now` for one it does not list
/// (the leader has not seen it gone yet).
fn gone_for(
    observed: &crate::mongo::Observed,
    desired: &crate::model::Desired,
    leader_status: Option<&backend_core::ReplSetStatus>,
    now: u64,
) -> BTreeMap<i64, Duration> {
    let Some(cfg) = &observed.observation.config else {
        return BTreeMap::new();
    };
    cfg.members
        .iter()
        .filter(|m| !desired.members.contains_key(&m.id))
        .map(|m| {
            let since = leader_status
                .into_iter()
                .flat_map(|s| &s.records_gone)
                .find(|g| g.id == m.id && g.host == m.host)
                .map_or(now, |g| g.since);
            (m.id, Duration::from_secs(now.saturating_sub(since)))
        })
        .collect()
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFormat {
    /// A summary line and one line per member.
    Text,
    /// The status document as the store holds it (one line of JSON per set).
    Json,
}

/// `status [--wait-converged N]`: prints the status of each set; with `wait_converged`, first
/// waits (up to `timeout`) until each has converged with that many members. `Ok(false)` when a
/// set has no status yet, or one that is stale (observed more than `max_age` ago) or says the
/// last reconcile could not observe the set.
pub async fn status<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    sets: &[String],
    wait_converged: Option<usize>,
    timeout: Duration,
    max_age: Duration,
    format: StatusFormat,
) -> Result<bool, StatusError> {
    let mut all = true;
    for set in sets {
        let found = match wait_converged {
            Some(n) => Some(status::wait_converged(store, layout, set, n, timeout, max_age).await?),
            None => status::read(store, layout, set).await?,
        };
        if let Some(problem) = found
            .as_ref()
            .and_then(|s| s.problem(backend_core::unix_seconds(), max_age))
        {
            all = false;
            eprintln!("{set}: {problem}");
        }
        match (found, format) {
            (Some(s), StatusFormat::Json) => {
                println!("{}", String::from_utf8_lossy(&s.to_json()))
            }
            (Some(s), StatusFormat::Text) => println!("{}", status::render(&s)),
            (None, _) => {
                all = false;
                eprintln!(
                    "{set}: no status yet ({}); the reconciler's leader writes it once it has read the set's config",
                    layout.replset_status_key(set)
                );
            }
        }
    }
    Ok(all)
}

/// Why `forget-set` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("the store remembers no replica set {set} ({key} is empty): nothing to forget")]
    NotKnown { set: String, key: String },
    #[error(
        "the store remembers replica set {set} with id {known}, not {given}: check the id \
         (`replset-reconciler plan` and the status show it) and run again"
    )]
    WrongId {
        set: String,
        known: String,
        given: String,
    },
    #[error(transparent)]
    Read(#[from] IdentityReadError),
    #[error("cannot delete {key}: {source}")]
    Delete {
        key: String,
        #[source]
        source: backend_core::BackendError,
    },
}

/// `forget-set --replica-set-id <id>`: the operator's explicit decision that the set whose
/// members lost their data is gone, so that the reconciler may initiate a new, empty set in its
/// place (safety rule 10). The id must be the remembered one, so that a typo or an old command
/// from a runbook forgets nothing else.
pub async fn forget_set<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    set: &str,
    replica_set_id: &str,
) -> Result<SetIdentity, ForgetError> {
    let key = layout.replset_identity_key(set);
    let Some(identity) = read_identity(store, layout, set).await? else {
        return Err(ForgetError::NotKnown {
            set: set.to_string(),
            key,
        });
    };
    if identity.replica_set_id != replica_set_id {
        return Err(ForgetError::WrongId {
            set: set.to_string(),
            known: identity.replica_set_id,
            given: replica_set_id.to_string(),
        });
    }
    store
        .delete_value(&key)
        .await
        .map_err(|source| ForgetError::Delete { key, source })?;
    Ok(identity)
}

/// Why `scale` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("cannot inspect service {service}: {source}")]
    Inspect {
        service: String,
        #[source]
        source: EngineApiError,
    },
    #[error("cannot update service {service}: {source}")]
    Update {
        service: String,
        #[source]
        source: EngineApiError,
    },
    #[error(transparent)]
    Engine(#[from] EngineApiError),
    #[error("service {0} is not a replicated service (scale works on replicated services only)")]
    NotReplicated(String),
    #[error(transparent)]
    Status(#[from] StatusError),
}

/// How long `scale` retries a store that fails its first read (a member restarting, a leader
/// election) before it gives up.
const STORE_RETRY: Duration = Duration::from_secs(30);

/// `scale <service>=<want>`: one replica at a time, each step waited for until the set's
/// status says converged with that many members ([`backend_core::ReplSetStatus::converged_with`]).
/// Only the replica count of the service's spec changes (see [`crate::engine_api`]).
pub async fn scale<S: Coordinator>(
    store: &S,
    layout: &KeyLayout,
    service: &str,
    set: &str,
    want: i64,
    step_timeout: Duration,
    max_age: Duration,
) -> Result<(), ScaleError> {
    let engine = Engine::from_env()?;
    // A status that is stale or says the set could not be observed tells nothing of the set
    // now: no step is taken on it.
    if let Some(s) = status::read_within(store, layout, set, STORE_RETRY).await? {
        if let Some(problem) = s.problem(backend_core::unix_seconds(), max_age) {
            return Err(ScaleError::Status(StatusError::Untrusted {
                set: set.to_string(),
                problem,
            }));
        }
    }
    loop {
        let current =
            engine
                .inspect_service(service)
                .await
                .map_err(|source| ScaleError::Inspect {
                    service: service.to_string(),
                    source,
                })?;
        let id = current["ID"].as_str().unwrap_or(service).to_string();
        let version = current["Version"]["Index"].as_u64().unwrap_or(0);
        let mut spec = current["Spec"].clone();
        let Some(replicas) = spec["Mode"]["Replicated"]["Replicas"].as_i64() else {
            return Err(ScaleError::NotReplicated(service.to_string()));
        };
        if replicas == want {
            println!("{service} has {want} replicas and {set} has converged");
            return Ok(());
        }
        let next = if want > replicas {
            replicas + 1
        } else {
            replicas - 1
        };
        println!("{service}: {replicas} -> {next} replicas");
        spec["Mode"]["Replicated"]["Replicas"] = serde_json::json!(next);
        engine
            .update_service(&id, version, &spec)
            .await
            .map_err(|source| ScaleError::Update {
                service: service.to_string(),
                source,
            })?;
        let members = usize::try_from(next).unwrap_or(0);
        let s = status::wait_converged(store, layout, set, members, step_timeout, max_age).await?;
        println!("{set}: converged with {} members", s.members.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigView, Desired, MemberConfig};
    use crate::mongo::Observed;

    fn host(id: i64) -> String {
        format!("10.0.0.{id}:27017")
    }

    #[test]
    fn plan_counts_the_grace_from_when_the_leader_saw_a_record_go() {
        let mut observed = Observed::default();
        observed.observation.config = Some(ConfigView {
            set_name: "rs0".into(),
            version: 3,
            term: 1,
            replica_set_id: None,
            members: (1..=4)
                .map(|id| MemberConfig::new_non_voter(id, &host(id)))
                .collect(),
        });
        let desired = Desired {
            members: [(1, host(1)), (2, host(2))].into_iter().collect(),
        };
        let mut status: backend_core::ReplSetStatus = serde_json::from_value(serde_json::json!({
            "schema_version": 2, "set": "rs0", "config_version": 3, "primary": null,
            "members": [], "converged": false,
            "next": {"kind": "wait", "reason": "removal_grace", "detail": ""},
        }))
        .expect("a status");
        // The leader saw 3's record go 20 s ago; 4's it has not seen go yet. A record of
        // another host under 3's id (an older task) does not count.
        status.records_gone = vec![backend_core::RecordGone {
            id: 3,
            host: host(3),
            since: 1_000,
        }];
        let gone = gone_for(&observed, &desired, Some(&status), 1_020);
        assert_eq!(
            gone,
            [(3, Duration::from_secs(20)), (4, Duration::ZERO)]
                .into_iter()
                .collect()
        );
        status.records_gone[0].host = host(9);
        let gone = gone_for(&observed, &desired, Some(&status), 1_020);
        assert_eq!(gone.get(&3), Some(&Duration::ZERO));
        assert_eq!(gone_for(&observed, &desired, None, 1_020).len(), 2);
    }
}
