//! From the bridge's records to the members each replica set should have.
//!
//! A record belongs to a replica set when it is a record of a managed service
//! (`--service mongo --replset rs0`), or when it carries the label `registrator.replset=<set>`
//! (discovery). Its member `_id` is the swarm slot (`task_slot`); a task of a global service
//! has no slot, so its `_id` is derived from its node id (a stable 31-bit hash). Its host is
//! `ip:port` (`[ip]:port` for IPv6).

use std::collections::BTreeMap;

use backend_core::{KeyLayout, ServiceRecord};

use crate::model::Desired;

/// The label that puts a record's task into a replica set, for discovery.
pub const REPLSET_LABEL: &str = "registrator.replset";

/// Which records belong to which replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every record of `service` is a member of `set`; `port` overrides the record's port.
    Service {
        service: String,
        set: String,
        port: Option<u16>,
    },
    /// Every record labelled `registrator.replset=<set>` is a member of `<set>`.
    Label,
}

/// A value in the store that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
}

/// The desired members of every selected replica set, and the values that were skipped.
pub fn desired_sets<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
    layout: &KeyLayout,
    selectors: &[Selector],
) -> (BTreeMap<String, Desired>, Vec<Skipped>) {
    let mut sets: BTreeMap<String, Desired> = BTreeMap::new();
    // Which key gave each (set, _id), to report duplicates.
    // which record gave each member: its start-time rank and key
    let mut origin: BTreeMap<(String, i64), (StartedRank, String)> = BTreeMap::new();
    let mut skipped = Vec::new();
    for selector in selectors {
        if let Selector::Service { set, .. } = selector {
            sets.entry(set.clone()).or_default();
        }
    }
    for (key, value) in entries {
        let Some(parsed) = layout.parse_service_key(key) else {
            continue;
        };
        let wanted: Vec<(String, Option<u16>)> = selectors
            .iter()
            .filter_map(|s| match s {
                Selector::Service { service, set, port } if *service == parsed.service => {
                    Some((set.clone(), *port))
                }
                _ => None,
            })
            .collect();
        let by_label = selectors.contains(&Selector::Label);
        if wanted.is_empty() && !by_label {
            continue;
        }
        let record = match ServiceRecord::from_json(value) {
            Ok(r) => r,
            Err(e) => {
                skipped.push(Skipped {
                    key: key.clone(),
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let mut targets = wanted;
        if by_label {
            if let Some(set) = record.labels.get(REPLSET_LABEL) {
                if !targets.iter().any(|(s, _)| s == set) {
                    targets.push((set.clone(), None));
                }
            }
        }
        for (set, port) in targets {
            let port = port.unwrap_or(record.port);
            if port == 0 {
                skipped.push(Skipped {
                    key: key.clone(),
                    reason: "the record has no port".into(),
                });
                continue;
            }
            let id = member_id(&record);
            let host = match record.ip {
                std::net::IpAddr::V4(ip) => format!("{ip}:{port}"),
                std::net::IpAddr::V6(ip) => format!("[{ip}]:{port}"),
            };
            let desired = sets.entry(set.clone()).or_default();
            // Two records for one slot (a task rescheduled while the old record lives on
            // until its lease ends, or a rolling update with start-first): the task that
            // started last wins (ties and records without a start time: the later key), and
            // the planner moves the member once the old mongod is down.
            let rank = (started_rank(record.started_at.as_deref()), key.clone());
            match origin.get(&(set.clone(), id)) {
                Some(previous) if previous > &rank => {
                    skipped.push(Skipped {
                        key: key.clone(),
                        reason: format!(
                            "member _id {id} of {set} is also claimed by {}, a newer task",
                            previous.1
                        ),
                    });
                }
                previous => {
                    if let Some(previous) = previous {
                        skipped.push(Skipped {
                            key: previous.1.clone(),
                            reason: format!(
                                "member _id {id} of {set} is also claimed by {key}, a newer task"
                            ),
                        });
                    }
                    desired.members.insert(id, host);
                    origin.insert((set.clone(), id), rank);
                }
            }
        }
    }
    (sets, skipped)
}

/// A task's start time as an order: seconds as text, then nanoseconds.
type StartedRank = Option<(String, u32)>;

/// Orders Docker's `StartedAt` times (RFC 3339 in UTC, with up to nine digits of fraction,
/// trailing zeros dropped): the seconds part as text, then the fraction as nanoseconds. A
/// record without a time (written by an older bridge) ranks first.
fn started_rank(started_at: Option<&str>) -> StartedRank {
    let t = started_at?.trim_end_matches('Z');
    let (secs, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits: String = frac
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    let nanos = format!("{digits:0<9}").parse().unwrap_or(0);
    Some((secs.to_string(), nanos))
}

/// The member `_id` of a record: its swarm slot, else a stable hash of its node id (a global
/// service's task), else of its id.
pub fn member_id(record: &ServiceRecord) -> i64 {
    if let Some(slot) = record.task_slot {
        return i64::try_from(slot).unwrap_or(i64::MAX);
    }
    // FNV-1a, 31 bits: stable across runs and versions, unlike the std hasher.
    let source = if record.node_id.is_empty() {
        &record.id
    } else {
        &record.node_id
    };
    let mut hash: u32 = 0x811c_9dc5;
    for b in source.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i64::from(hash & 0x7fff_ffff)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use backend_core::{Protocol, SCHEMA_VERSION};

    use super::*;

    fn record(service: &str, id: &str, slot: Option<u64>, ip: &str) -> ServiceRecord {
        ServiceRecord {
            schema_version: SCHEMA_VERSION,
            service: service.into(),
            id: id.into(),
            ip: ip.parse().expect("ip"),
            port: 27017,
            protocol: Protocol::Tcp,
            tags: vec![],
            labels: BTreeMap::new(),
            attrs: BTreeMap::new(),
            container_id: "c".into(),
            container_name: "n".into(),
            node_id: "node-a".into(),
            hostname: "h".into(),
            task_id: Some(id.into()),
            task_slot: slot,
            service_id: None,
            stack: None,
            health: None,
            started_at: None,
        }
    }

    fn store(records: &[ServiceRecord], layout: &KeyLayout) -> BTreeMap<String, Vec<u8>> {
        records
            .iter()
            .map(|r| (layout.service_key(&r.service, &r.id), r.to_json()))
            .collect()
    }

    #[test]
    fn a_services_records_are_its_members_by_slot() {
        let l = KeyLayout::new("p");
        let mut entries = store(
            &[
                record("mongo", "t1", Some(1), "10.0.0.1"),
                record("mongo", "t2", Some(2), "fd00::2"),
                record("web", "w1", Some(1), "10.0.0.9"),
            ],
            &l,
        );
        entries.insert(l.service_key("mongo", "junk"), b"{not json".to_vec());
        let selectors = [Selector::Service {
            service: "mongo".into(),
            set: "rs0".into(),
            port: None,
        }];
        let (sets, skipped) = desired_sets(&entries, &l, &selectors);
        assert_eq!(
            sets["rs0"].members,
            BTreeMap::from([(1, "10.0.0.1:27017".into()), (2, "[fd00::2]:27017".into())])
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].key, l.service_key("mongo", "junk"));
    }

    #[test]
    fn discovery_by_label_and_port_override() {
        let l = KeyLayout::new("p");
        let mut a = record("db-a", "t1", Some(1), "10.0.0.1");
        a.labels.insert(REPLSET_LABEL.into(), "rsA".into());
        let b = record("db-b", "t2", Some(1), "10.0.0.2");
        let entries = store(&[a, b], &l);
        let selectors = [
            Selector::Label,
            Selector::Service {
                service: "db-b".into(),
                set: "rsB".into(),
                port: Some(27018),
            },
        ];
        let (sets, _) = desired_sets(&entries, &l, &selectors);
        assert_eq!(sets["rsA"].members[&1], "10.0.0.1:27017");
        assert_eq!(sets["rsB"].members[&1], "10.0.0.2:27018");
    }

    #[test]
    fn two_records_for_one_slot_pick_one_and_report_the_other() {
        let l = KeyLayout::new("p");
        let entries = store(
            &[
                record("mongo", "old", Some(2), "10.0.0.2"),
                record("mongo", "new", Some(2), "10.0.0.7"),
            ],
            &l,
        );
        let selectors = [Selector::Service {
            service: "mongo".into(),
            set: "rs0".into(),
            port: None,
        }];
        let (sets, skipped) = desired_sets(&entries, &l, &selectors);
        assert_eq!(sets["rs0"].members.len(), 1);
        assert_eq!(skipped.len(), 1);

        // With start times, the task that started last wins, whatever the keys' order.
        for (old_id, new_id) in [("a-old", "z-new"), ("z-old", "a-new")] {
            let mut old = record("mongo", old_id, Some(2), "10.0.0.2");
            old.started_at = Some("2026-11-26T19:04:30.75799Z".into());
            let mut new = record("mongo", new_id, Some(2), "10.0.0.7");
            new.started_at = Some("2026-11-26T19:04:30.757991713Z".into());
            let (sets, skipped) = desired_sets(&store(&[old, new], &l), &l, &selectors);
            assert_eq!(
                sets["rs0"].members[&2], "10.0.0.7:27017",
                "{old_id} / {new_id}"
            );
            assert!(skipped[0].key.ends_with(old_id), "{skipped:?}");
        }
    }

    #[test]
    fn start_times_order_by_their_value_not_their_text() {
        // Docker drops trailing zeros of the fraction: "30.7579917Z" is after "30.757991Z".
        assert!(
            started_rank(Some("2026-11-26T19:04:30.7579917Z"))
                > started_rank(Some("2026-11-26T19:04:30.757991Z"))
        );
        assert!(
            started_rank(Some("2026-11-26T19:04:31Z"))
                > started_rank(Some("2026-11-26T19:04:30.999999999Z"))
        );
        assert!(started_rank(Some("2026-11-26T19:04:30Z")) > started_rank(None));
    }

    #[test]
    fn global_tasks_get_a_stable_id_from_their_node() {
        let mut r = record("mongo", "t1", None, "10.0.0.1");
        r.node_id = "6h8vsz9b5f4lzzvmg5vy77s3m".into();
        let id = member_id(&r);
        assert_eq!(id, member_id(&r));
        assert!(id >= 0);
        r.node_id = "other".into();
        assert_ne!(id, member_id(&r));
    }
}
