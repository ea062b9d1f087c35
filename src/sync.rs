//! The difference between what the engine runs and what the store holds: a pure function.
//!
//! A bridge owns exactly the records whose `node_id` is its node's. It never touches another
//! node's records, nor a value it cannot decode (written by someone else): those are reported
//! and left alone.

use std::collections::{BTreeMap, BTreeSet};

use backend_core::{DecodeError, KeyLayout, KvEntry, ServiceKey, ServiceRecord};

/// What to write and delete to make the store hold exactly `desired` for this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub put: Vec<ServiceRecord>,
    pub delete: Vec<ServiceKey>,
    /// Keys under the services prefix whose value is not a record this program understands.
    pub foreign: Vec<(String, String)>,
}

/// Plans a sync. With `put_all`, every desired record is written even when the store already
/// holds it (needed after a new lease or session, to tie the records to it).
pub fn plan_sync(
    layout: &KeyLayout,
    node_id: &str,
    desired: &[ServiceRecord],
    stored: &[KvEntry],
    put_all: bool,
) -> SyncPlan {
    let mut plan = SyncPlan::default();
    let mut held: BTreeMap<ServiceKey, ServiceRecord> = BTreeMap::new();
    for entry in stored {
        let Some(key) = layout.parse_service_key(&entry.key) else {
            plan.foreign.push((
                entry.key.clone(),
                "not a <prefix>/services/<service>/<id> key".into(),
            ));
            continue;
        };
        match ServiceRecord::from_json(&entry.value) {
            Ok(record) if record.service != key.service || record.id != key.id => {
                let err = DecodeError::KeyMismatch {
                    key: entry.key.clone(),
                    service: record.service,
                    id: record.id,
                };
                plan.foreign.push((entry.key.clone(), err.to_string()));
            }
            Ok(record) => {
                if record.node_id == node_id {
                    held.insert(key, record);
                }
            }
            Err(err) => plan.foreign.push((entry.key.clone(), err.to_string())),
        }
    }
    let mut wanted: BTreeSet<ServiceKey> = BTreeSet::new();
    for record in desired {
        let key = ServiceKey {
            service: record.service.clone(),
            id: record.id.clone(),
        };
        if put_all || held.get(&key) != Some(record) {
            plan.put.push(record.clone());
        }
        wanted.insert(key);
    }
    plan.delete = held.into_keys().filter(|k| !wanted.contains(k)).collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(service: &str, id: &str, node: &str, port: u16) -> ServiceRecord {
        ServiceRecord {
            container_id: format!("c-{id}"),
            container_name: id.into(),
            node_id: node.into(),
            hostname: node.into(),
            ..ServiceRecord::new(service, id, "10.0.0.1".parse().expect("ip"), port)
        }
    }

    fn entry(layout: &KeyLayout, r: &ServiceRecord) -> KvEntry {
        KvEntry {
            key: layout.service_key(&r.service, &r.id),
            value: r.to_json(),
        }
    }

    #[test]
    fn writes_what_is_missing_or_changed_and_deletes_own_orphans_only() {
        let l = KeyLayout::new("p");
        let same = record("a", "1", "me", 80);
        let changed_old = record("a", "2", "me", 80);
        let changed_new = record("a", "2", "me", 81);
        let missing = record("b", "3", "me", 80);
        let orphan = record("b", "4", "me", 80);
        let other_node = record("b", "5", "them", 80);
        let stored = vec![
            entry(&l, &same),
            entry(&l, &changed_old),
            entry(&l, &orphan),
            entry(&l, &other_node),
        ];
        let desired = vec![same.clone(), changed_new.clone(), missing.clone()];
        let plan = plan_sync(&l, "me", &desired, &stored, false);
        assert_eq!(plan.put, vec![changed_new.clone(), missing.clone()]);
        assert_eq!(
            plan.delete,
            vec![ServiceKey {
                service: "b".into(),
                id: "4".into()
            }]
        );
        assert!(plan.foreign.is_empty());

        let plan = plan_sync(&l, "me", &desired, &stored, true);
        assert_eq!(plan.put, desired);
    }

    #[test]
    fn foreign_values_are_reported_and_never_deleted() {
        let l = KeyLayout::new("p");
        let mut mismatched = entry(&l, &record("a", "1", "me", 80));
        mismatched.key = l.service_key("a", "other");
        let stored = vec![
            KvEntry {
                key: l.service_key("x", "y"),
                value: b"10.0.0.1:80".to_vec(),
            },
            mismatched,
            KvEntry {
                key: "p/services/loose".into(),
                value: b"{}".to_vec(),
            },
        ];
        let plan = plan_sync(&l, "me", &[], &stored, false);
        assert!(plan.delete.is_empty());
        assert_eq!(plan.foreign.len(), 3);
        assert!(
            plan.foreign[1].1.contains("its key says"),
            "{:?}",
            plan.foreign
        );
    }
}
