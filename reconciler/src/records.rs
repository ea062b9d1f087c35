//! From the bridge's records to the members each replica set should have.
//!
//! A record belongs to a replica set when it is a record of a managed service
//! (`--service mongo --replset rs0`), or when it carries the label `registrator.replset=<set>`
//! (discovery). Its member `_id` is the swarm slot (`task_slot`); a task of a global service
//! has no slot, so its `_id` is derived from its node id (a stable 31-bit hash). Its host is
//! `ip:port` (`[ip]:port` for IPv6).
//!
//! Safety rule 13: only records a bridge could have written are followed. A record is
//! refused, with a [`Refusal`] that says why, when its key and its content disagree, its slot
//! is no member `_id` MongoDB takes, it has no port, its address is none a member can have,
//! its label names an invalid set or a set managed as another service, or it claims the slot
//! of a member that the set sees up at another host ([`SlotHolders`]): a later `started_at`
//! never takes a slot from a live member; the record is followed once that member is down,
//! which is how a rescheduled task moves its member (rule 5).

use std::collections::BTreeMap;
use std::net::IpAddr;

use backend_core::{check_set_name, KeyLayout, ServiceKey, ServiceRecord, SetNameError};

use crate::model::{Desired, Observation};

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
    /// Every record labelled `registrator.replset=<set>` is a member of `<set>`, unless its
    /// service is a [`Selector::Service`]'s (then it is a member of that selector's set only).
    Label,
}

/// Why a value under `<prefix>/services/` is not followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not a record this reconciler understands (the decoder's message).
    #[error("not a record: {0}")]
    Undecodable(String),
    /// The record names another service or id than its key: no bridge writes that.
    #[error("the record says service {service:?} id {id:?}, which is not its key's")]
    KeyMismatch { service: String, id: String },
    /// MongoDB takes member `_id`s from 0 to 2^31 - 1.
    #[error("task_slot {slot} is not a member _id MongoDB takes (0 to 2147483647)")]
    SlotOutOfRange { slot: u64 },
    #[error("the record has no port (0); publish one (registrator.port) or give --port")]
    NoPort,
    #[error("address {ip} cannot be a replica-set member's: it is {what}")]
    BadAddress { ip: IpAddr, what: &'static str },
    #[error("label {REPLSET_LABEL}: {0}")]
    BadSetName(SetNameError),
    /// With `--discover`, a label cannot add a record of another service to a set that a
    /// `--service` manages.
    #[error(
        "label {REPLSET_LABEL}={set} on a record of service {service:?}: {set} is managed as \
         the records of service {managed_by:?} (--service), and only they join it"
    )]
    ManagedSet {
        set: String,
        service: String,
        managed_by: String,
    },
    /// The slot's member is up at another host: the record is followed once it is down.
    #[error(
        "member _id {id} of {set} is up at {holder}; this record ({host}) is followed once \
         that member is down"
    )]
    SlotHeld {
        set: String,
        id: i64,
        host: String,
        holder: String,
    },
    /// Another record of the same slot started later (or, without start times, has the
    /// later key).
    #[error("member _id {id} of {set} is also claimed by {by:?}, a newer task")]
    Superseded { set: String, id: i64, by: String },
}

impl Refusal {
    /// The refusal's kind, for the metric's `reason` label.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Undecodable(_) => "undecodable",
            Refusal::KeyMismatch { .. } => "key_mismatch",
            Refusal::SlotOutOfRange { .. } => "slot_out_of_range",
            Refusal::NoPort => "no_port",
            Refusal::BadAddress { .. } => "bad_address",
            Refusal::BadSetName(_) => "bad_set_name",
            Refusal::ManagedSet { .. } => "managed_set",
            Refusal::SlotHeld { .. } => "slot_held",
            Refusal::Superseded { .. } => "superseded",
        }
    }
}

/// A value in the store that is not followed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub refusal: Refusal,
}

/// The members each set's config has that the set sees up, `_id` to host: a record naming
/// another host for one of these slots is not followed (safety rule 13). Kept up to date
/// from the observations of the set ([`SlotHolders::observed`]); [`SlotHolders::default`]
/// knows of no member (nothing observed yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotHolders {
    sets: BTreeMap<String, BTreeMap<i64, String>>,
}

impl SlotHolders {
    /// The members of `set` up in `observation`: with a config (read from a primary), its
    /// members that the set sees up ([`Observation::members_up`]); without one (an election,
    /// or no member answers), those of `self` that the status of any member that answered
    /// still sees up. A set that cannot be seen at all has no holders: after a whole restart
    /// every slot's new record is followed again (re-addressing, rule 11).
    pub fn observed(&self, set: &str, observation: &Observation) -> SlotHolders {
        let up = if observation.config.is_some() {
            observation.members_up()
        } else {
            self.sets
                .get(set)
                .into_iter()
                .flatten()
                .filter(|(id, _)| observation.is_up(**id))
                .map(|(id, host)| (*id, host.clone()))
                .collect()
        };
        let mut sets = self.sets.clone();
        sets.remove(set);
        if !up.is_empty() {
            sets.insert(set.to_string(), up);
        }
        SlotHolders { sets }
    }

    /// The host of the member of `set` with `_id` `id`, when the set sees it up.
    pub fn holder(&self, set: &str, id: i64) -> Option<&str> {
        self.sets.get(set)?.get(&id).map(String::as_str)
    }
}

/// A member of a set: the set's name and the member's `_id`.
type SetMember = (String, i64);

/// One record's claim on a member of a set.
struct Claim {
    rank: (StartedRank, String),
    key: String,
    host: String,
}

/// The desired members of every selected replica set, and the values that were not followed.
/// `holders` are the members each set is seen up with: a record never takes their slot.
pub fn desired_sets<'a>(
    entries: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
    layout: &KeyLayout,
    selectors: &[Selector],
    holders: &SlotHolders,
) -> (BTreeMap<String, Desired>, Vec<Skipped>) {
    let mut sets: BTreeMap<String, Desired> = BTreeMap::new();
    let mut skipped = Vec::new();
    for selector in selectors {
        if let Selector::Service { set, .. } = selector {
            sets.entry(set.clone()).or_default();
        }
    }
    let mut claims: BTreeMap<SetMember, Vec<Claim>> = BTreeMap::new();
    for (key, value) in entries {
        let Some(parsed) = layout.parse_service_key(key) else {
            continue;
        };
        match record_claims(key, &parsed, value, selectors) {
            Ok(found) => {
                for (member, claim) in found {
                    claims.entry(member).or_default().push(claim);
                }
            }
            Err(refusal) => skipped.push(Skipped {
                key: key.clone(),
                refusal,
            }),
        }
    }
    for ((set, id), mut claims) in claims {
        let desired = sets.entry(set.clone()).or_default();
        // A live member keeps its slot: only records at its own host are followed.
        if let Some(holder) = holders.holder(&set, id) {
            claims.retain(|c| {
                let held = c.host != holder;
                if held {
                    skipped.push(Skipped {
                        key: c.key.clone(),
                        refusal: Refusal::SlotHeld {
                            set: set.clone(),
                            id,
                            host: c.host.clone(),
                            holder: holder.to_string(),
                        },
                    });
                }
                !held
            });
        }
        // Two records for one slot (a task rescheduled while the old record lives on until
        // its lease ends, or a rolling update with start-first): the task that started last
        // wins (ties and records without a start time: the later key), and the planner moves
        // the member once the old mongod is down.
        claims.sort_by(|a, b| b.rank.cmp(&a.rank));
        let mut claims = claims.into_iter();
        let Some(newest) = claims.next() else {
            continue;
        };
        for older in claims {
            skipped.push(Skipped {
                key: older.key,
                refusal: Refusal::Superseded {
                    set: set.clone(),
                    id,
                    by: newest.key.clone(),
                },
            });
        }
        desired.members.insert(id, newest.host);
    }
    (sets, skipped)
}

/// The members (set and `_id`) that one value under `<prefix>/services/` claims: none for a
/// record no selector takes, a [`Refusal`] for one that cannot be followed.
fn record_claims(
    key: &str,
    parsed: &ServiceKey,
    value: &[u8],
    selectors: &[Selector],
) -> Result<Vec<(SetMember, Claim)>, Refusal> {
    let mut targets: Vec<(String, Option<u16>)> = selectors
        .iter()
        .filter_map(|s| match s {
            Selector::Service { service, set, port } if *service == parsed.service => {
                Some((set.clone(), *port))
            }
            _ => None,
        })
        .collect();
    let by_label = selectors.contains(&Selector::Label);
    if targets.is_empty() && !by_label {
        return Ok(Vec::new());
    }
    let record =
        ServiceRecord::from_json(value).map_err(|e| Refusal::Undecodable(e.to_string()))?;
    if targets.is_empty() {
        let Some(set) = record.labels.get(REPLSET_LABEL) else {
            return Ok(Vec::new());
        };
        check_set_name(set).map_err(Refusal::BadSetName)?;
        if let Some(managed_by) = managed_service(selectors, set) {
            return Err(Refusal::ManagedSet {
                set: set.clone(),
                service: parsed.service.clone(),
                managed_by: managed_by.to_string(),
            });
        }
        targets.push((set.clone(), None));
    }
    if record.service != parsed.service || record.id != parsed.id {
        return Err(Refusal::KeyMismatch {
            service: record.service,
            id: record.id,
        });
    }
    let id = member_id(&record)?;
    if let Some(what) = address_problem(record.ip) {
        return Err(Refusal::BadAddress {
            ip: record.ip,
            what,
        });
    }
    let rank = (started_rank(record.started_at.as_deref()), key.to_string());
    targets
        .into_iter()
        .map(|(set, port)| match port.unwrap_or(record.port) {
            0 => Err(Refusal::NoPort),
            port => Ok((
                (set, id),
                Claim {
                    rank: rank.clone(),
                    key: key.to_string(),
                    host: member_host(record.ip, port),
                },
            )),
        })
        .collect()
}

/// The `--service` whose records form `set`, if one does.
fn managed_service<'s>(selectors: &'s [Selector], set: &str) -> Option<&'s str> {
    selectors.iter().find_map(|s| match s {
        Selector::Service {
            service, set: s, ..
        } if s == set => Some(service.as_str()),
        _ => None,
    })
}

/// A member's `host` field: `ip:port`, `[ip]:port` for IPv6.
fn member_host(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    }
}

/// Why `ip` cannot be a replica-set member's address, if it cannot: an address nothing can
/// connect to as one host (unspecified, broadcast, multicast), or a link-local one (no
/// overlay network gives a task one; IPv6's needs a zone that a member's `host` cannot carry;
/// IPv4's holds cloud metadata services). Loopback is allowed: a set on one machine (the
/// simulator's tests, a development host) has only loopback members.
pub fn address_problem(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) if a.octets()[0] == 0 => Some("unspecified (0.0.0.0/8)"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_link_local() => Some("link-local (169.254.0.0/16)"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified (::)"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local (fe80::/10)"),
        IpAddr::V6(a) => a.to_ipv4_mapped().and_then(|v4| address_problem(v4.into())),
        IpAddr::V4(_) => None,
    }
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
/// service's task), else of its id. A slot MongoDB cannot take as an `_id` (a 32-bit signed
/// integer, not negative) is refused, never cut.
pub fn member_id(record: &ServiceRecord) -> Result<i64, Refusal> {
    if let Some(slot) = record.task_slot {
        return i32::try_from(slot)
            .map(i64::from)
            .map_err(|_| Refusal::SlotOutOfRange { slot });
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
    Ok(i64::from(hash & 0x7fff_ffff))
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
            check: None,
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
        let (sets, skipped) = desired_sets(&entries, &l, &selectors, &SlotHolders::default());
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
        let (sets, _) = desired_sets(&entries, &l, &selectors, &SlotHolders::default());
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
        let (sets, skipped) = desired_sets(&entries, &l, &selectors, &SlotHolders::default());
        assert_eq!(sets["rs0"].members.len(), 1);
        assert_eq!(skipped.len(), 1);

        // With start times, the task that started last wins, whatever the keys' order.
        for (old_id, new_id) in [("a-old", "z-new"), ("z-old", "a-new")] {
            let mut old = record("mongo", old_id, Some(2), "10.0.0.2");
            old.started_at = Some("2026-11-26T19:04:30.75799Z".into());
            let mut new = record("mongo", new_id, Some(2), "10.0.0.7");
            new.started_at = Some("2026-11-26T19:04:30.757991713Z".into());
            let (sets, skipped) = desired_sets(
                &store(&[old, new], &l),
                &l,
                &selectors,
                &SlotHolders::default(),
            );
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
        let id = member_id(&r).expect("an id");
        assert_eq!(id, member_id(&r).expect("an id"));
        assert!(id >= 0);
        r.node_id = "other".into();
        assert_ne!(id, member_id(&r).expect("an id"));
    }

    fn rs0() -> Vec<Selector> {
        vec![Selector::Service {
            service: "mongo".into(),
            set: "rs0".into(),
            port: None,
        }]
    }

    /// The refusal of `key` among `skipped`, if any.
    fn refusal_of<'a>(skipped: &'a [Skipped], key: &str) -> Option<&'a Refusal> {
        skipped.iter().find(|s| s.key == key).map(|s| &s.refusal)
    }

    #[test]
    fn a_slot_mongodb_cannot_take_is_refused_not_cut() {
        let l = KeyLayout::new("p");
        let top = record("mongo", "top", Some(i32::MAX as u64), "10.0.0.1");
        let over = record("mongo", "over", Some(1 << 31), "10.0.0.2");
        let huge = record("mongo", "huge", Some(u64::MAX), "10.0.0.3");
        let fine = record("mongo", "fine", Some(1), "10.0.0.4");
        let (sets, skipped) = desired_sets(
            &store(&[top, over, huge, fine], &l),
            &l,
            &rs0(),
            &SlotHolders::default(),
        );
        // 2^31 would have been cut to -2^31 by `as i32`: refused instead, and the others kept.
        assert_eq!(
            sets["rs0"].members,
            BTreeMap::from([
                (1, "10.0.0.4:27017".to_string()),
                (i64::from(i32::MAX), "10.0.0.1:27017".to_string())
            ])
        );
        assert_eq!(
            refusal_of(&skipped, &l.service_key("mongo", "over")),
            Some(&Refusal::SlotOutOfRange { slot: 1 << 31 })
        );
        assert_eq!(
            refusal_of(&skipped, &l.service_key("mongo", "huge")),
            Some(&Refusal::SlotOutOfRange { slot: u64::MAX })
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
    }

    #[test]
    fn ports_and_addresses_no_member_can_have_are_refused() {
        let l = KeyLayout::new("p");
        let mut no_port = record("mongo", "noport", Some(1), "10.0.0.1");
        no_port.port = 0;
        let mut entries = store(&[no_port.clone()], &l);
        // A port beyond 65535 is no record at all.
        let mut json: serde_json::Value =
            serde_json::from_slice(&record("mongo", "big", Some(2), "10.0.0.2").to_json())
                .expect("json");
        json["port"] = 70000.into();
        entries.insert(l.service_key("mongo", "big"), json.to_string().into_bytes());
        let bad = [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "169.254.169.254",
            "::",
            "ff02::1",
            "fe80::1",
            "::ffff:0.0.0.0",
        ];
        for (i, ip) in bad.iter().enumerate() {
            let r = record("mongo", &format!("bad{i}"), Some(10 + i as u64), ip);
            entries.insert(l.service_key("mongo", &r.id), r.to_json());
        }
        let good = ["127.0.0.1", "10.0.9.1", "fd00::1", "::1", "::ffff:10.0.0.9"];
        for (i, ip) in good.iter().enumerate() {
            let r = record("mongo", &format!("good{i}"), Some(30 + i as u64), ip);
            entries.insert(l.service_key("mongo", &r.id), r.to_json());
        }
        let (sets, skipped) = desired_sets(&entries, &l, &rs0(), &SlotHolders::default());
        assert_eq!(
            refusal_of(&skipped, &l.service_key("mongo", "noport")),
            Some(&Refusal::NoPort)
        );
        assert!(matches!(
            refusal_of(&skipped, &l.service_key("mongo", "big")),
            Some(Refusal::Undecodable(_))
        ));
        for (i, ip) in bad.iter().enumerate() {
            let refusal = refusal_of(&skipped, &l.service_key("mongo", &format!("bad{i}")));
            assert!(
                matches!(refusal, Some(Refusal::BadAddress { .. })),
                "{ip}: {refusal:?}"
            );
        }
        let followed: Vec<i64> = sets["rs0"].members.keys().copied().collect();
        assert_eq!(followed, vec![30, 31, 32, 33, 34]);
        assert_eq!(skipped.len(), 2 + bad.len(), "{skipped:?}");

        // A record without a port is followed where the operator gives one (--port).
        let selectors = [Selector::Service {
            service: "mongo".into(),
            set: "rs0".into(),
            port: Some(27018),
        }];
        let (sets, skipped) = desired_sets(
            &store(&[no_port], &l),
            &l,
            &selectors,
            &SlotHolders::default(),
        );
        assert_eq!(sets["rs0"].members[&1], "10.0.0.1:27018");
        assert!(skipped.is_empty());
    }

    #[test]
    fn a_record_that_is_not_its_keys_is_refused() {
        let l = KeyLayout::new("p");
        let mut entries = BTreeMap::new();
        let other_service = record("web", "t1", Some(1), "10.0.0.1");
        entries.insert(l.service_key("mongo", "t1"), other_service.to_json());
        let other_id = record("mongo", "t9", Some(2), "10.0.0.2");
        entries.insert(l.service_key("mongo", "t2"), other_id.to_json());
        let (sets, skipped) = desired_sets(&entries, &l, &rs0(), &SlotHolders::default());
        assert!(sets["rs0"].members.is_empty());
        assert_eq!(
            refusal_of(&skipped, &l.service_key("mongo", "t1")),
            Some(&Refusal::KeyMismatch {
                service: "web".into(),
                id: "t1".into()
            })
        );
        assert_eq!(
            refusal_of(&skipped, &l.service_key("mongo", "t2")).map(Refusal::kind),
            Some("key_mismatch")
        );
    }

    #[test]
    fn a_label_must_name_a_set_that_is_a_key_segment() {
        let l = KeyLayout::new("p");
        let mut records = vec![];
        for (i, set) in ["rs0/leader", "..", "rs0&w=0", "", "rsA"]
            .iter()
            .enumerate()
        {
            let mut r = record(&format!("db{i}"), "t", Some(1), "10.0.0.1");
            r.labels.insert(REPLSET_LABEL.into(), set.to_string());
            records.push(r);
        }
        let (sets, skipped) = desired_sets(
            &store(&records, &l),
            &l,
            &[Selector::Label],
            &SlotHolders::default(),
        );
        // Only the valid name makes a set: `rs0/leader` would live under rs0's election keys.
        assert_eq!(sets.keys().collect::<Vec<_>>(), vec!["rsA"]);
        for i in 0..4 {
            let refusal = refusal_of(&skipped, &l.service_key(&format!("db{i}"), "t"));
            assert!(
                matches!(refusal, Some(Refusal::BadSetName(_))),
                "db{i}: {refusal:?}"
            );
        }
        assert_eq!(skipped.len(), 4);
    }

    #[test]
    fn a_label_cannot_add_another_service_to_a_managed_set() {
        let l = KeyLayout::new("p");
        let mut intruder = record("web", "w1", Some(5), "10.0.0.5");
        intruder.labels.insert(REPLSET_LABEL.into(), "rs0".into());
        let mut member = record("mongo", "t1", Some(1), "10.0.0.1");
        member.labels.insert(REPLSET_LABEL.into(), "rsB".into());
        let mut discovered = record("db", "d1", Some(1), "10.0.0.7");
        discovered.labels.insert(REPLSET_LABEL.into(), "rsC".into());
        let mut selectors = rs0();
        selectors.push(Selector::Label);
        let (sets, skipped) = desired_sets(
            &store(&[intruder, member, discovered], &l),
            &l,
            &selectors,
            &SlotHolders::default(),
        );
        // A --service's record is a member of that service's set only, whatever its label.
        assert_eq!(
            sets["rs0"].members,
            BTreeMap::from([(1, "10.0.0.1:27017".to_string())])
        );
        assert!(!sets.contains_key("rsB"));
        assert_eq!(sets["rsC"].members[&1], "10.0.0.7:27017");
        assert_eq!(
            refusal_of(&skipped, &l.service_key("web", "w1")),
            Some(&Refusal::ManagedSet {
                set: "rs0".into(),
                service: "web".into(),
                managed_by: "mongo".into()
            })
        );
        assert_eq!(skipped.len(), 1);
    }

    /// What `desired_sets` makes of slot 2's records while member 2 is `up` (or not) at
    /// 10.0.0.2.
    fn slot_two(records: &[ServiceRecord], up: bool) -> (Option<String>, Vec<Skipped>) {
        let l = KeyLayout::new("p");
        let mut holders = SlotHolders::default();
        if up {
            holders
                .sets
                .insert("rs0".into(), BTreeMap::from([(2, "10.0.0.2:27017".into())]));
        }
        let (sets, skipped) = desired_sets(&store(records, &l), &l, &rs0(), &holders);
        (sets["rs0"].members.get(&2).cloned(), skipped)
    }

    #[test]
    fn a_newer_record_never_takes_the_slot_of_a_member_that_is_up() {
        let mut own = record("mongo", "own", Some(2), "10.0.0.2");
        own.started_at = Some("2026-11-26T19:04:30Z".into());
        let mut forged = record("mongo", "forged", Some(2), "10.0.0.66");
        forged.started_at = Some("2027-01-01T00:00:00Z".into());

        // Member 2 is up at 10.0.0.2: its own record is followed, the newer claim refused.
        let (host, skipped) = slot_two(&[own.clone(), forged.clone()], true);
        assert_eq!(host.as_deref(), Some("10.0.0.2:27017"));
        assert_eq!(
            skipped,
            vec![Skipped {
                key: "p/services/mongo/forged".into(),
                refusal: Refusal::SlotHeld {
                    set: "rs0".into(),
                    id: 2,
                    host: "10.0.0.66:27017".into(),
                    holder: "10.0.0.2:27017".into()
                }
            }]
        );
        // Without a record of its own the slot is followed by no record (the planner keeps
        // the healthy member and reports it).
        let (host, skipped) = slot_two(&[forged.clone()], true);
        assert_eq!(host, None);
        assert_eq!(skipped[0].refusal.kind(), "slot_held");

        // Member 2 down: the newest record is followed again (rule 5: a rescheduled task).
        let (host, skipped) = slot_two(&[own, forged], false);
        assert_eq!(host.as_deref(), Some("10.0.0.66:27017"));
        assert_eq!(skipped[0].refusal.kind(), "superseded");
    }

    #[test]
    fn the_members_up_come_from_the_latest_observation() {
        use crate::model::{ConfigView, MemberConfig, MemberState, MemberStatus};

        let status = |healthy| MemberStatus {
            healthy,
            state: if healthy {
                MemberState::Secondary
            } else {
                MemberState::Down
            },
        };
        let with_config = Observation {
            config: Some(ConfigView {
                set_name: "rs0".into(),
                version: 1,
                term: 1,
                replica_set_id: None,
                members: vec![
                    MemberConfig::new_non_voter(1, "10.0.0.1:27017"),
                    MemberConfig::new_non_voter(2, "10.0.0.2:27017"),
                ],
            }),
            primary: Some(1),
            status: BTreeMap::from([(2, status(true))]),
            ..Observation::default()
        };
        let holders = SlotHolders::default().observed("rs0", &with_config);
        assert_eq!(holders.holder("rs0", 1), Some("10.0.0.1:27017"));
        assert_eq!(holders.holder("rs0", 2), Some("10.0.0.2:27017"));
        assert_eq!(holders.holder("rs1", 1), None);

        // No primary (an election): the status of the member that answered says who is up.
        let electing = Observation {
            status: BTreeMap::from([(1, status(false)), (2, status(true))]),
            ..Observation::default()
        };
        let during = holders.observed("rs0", &electing);
        assert_eq!(during.holder("rs0", 1), None);
        assert_eq!(during.holder("rs0", 2), Some("10.0.0.2:27017"));

        // Nothing answers (a whole restart): nobody holds a slot any more.
        let gone = holders.observed("rs0", &Observation::default());
        assert_eq!(gone, SlotHolders::default());
    }
}
