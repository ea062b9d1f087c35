//! The planner's decisions when no config can be read from a primary: whether to initiate,
//! to refuse (a set the store remembers), or to re-address members that came back under new
//! addresses (safety rules 7, 10 and 11 of docs/reconciler.md).

use super::{commit_point, reaches, Blocked, KnownSet, PlanContext, Step, Wait};
use crate::model::{majority, ConfigView, Desired, MemberConfig, Observation};

/// Re-addressing (safety rule 11), while there is no primary: when the members of the last
/// config are back with their data under new addresses (same slots; each holds the config
/// naming the old hosts, finds itself in none of them, and is REMOVED), so that no election
/// can succeed at the config's addresses, install that config with nothing changed but the
/// hosts of the members that moved, with force, on the present voter with the newest optime.
///
/// Only with a majority of the config's voters present with their data, the rule an election
/// uses: every majority-committed write is on a majority of the voters, so on at least one
/// member present, and the newest present voter has it. That holds only while each voter's
/// data is its own: a task that swarm placed on a node whose volume an earlier task left holds
/// the config and older data. So when a commit point was seen before, one present voter must
/// reach it, and those that do not must be fewer than a majority (or they could elect one of
/// their own); else the reconciler waits for the members that hold the writes. The other members learn the config
/// by heartbeats, as from any newer config, and elect a primary; a later election can only
/// choose a member that has every committed write, as always.
///
/// `None` when it does not apply: no member moved, or enough voters answer at the config's
/// own addresses for an election to succeed there.
pub(super) fn readdress(obs: &Observation, desired: &Desired, ctx: &PlanContext) -> Option<Step> {
    let (source, base) = obs
        .persisted
        .iter()
        .filter(|(_, p)| p.config.set_name == ctx.set_name)
        .map(|(host, p)| (host, &p.config))
        .reduce(|a, b| if b.1.is_newer_than(a.1) { b } else { a })?;
    // A member counts only with this very config: one that holds an older config (a volume
    // left on a node long ago, of a member that has since run elsewhere) may lack writes that
    // were committed after it, so it cannot stand for one of the majority.
    let same_set = |c: &ConfigView| {
        c.set_name == base.set_name
            && c.replica_set_id == base.replica_set_id
            && !base.is_newer_than(c)
    };
    // Each member of the config whose task is present with the set's data: at its own
    // address, or moved to the address its slot's record names.
    let mut at_old = Vec::new();
    let mut moved = Vec::new();
    for m in &base.members {
        let Some(host) = desired.members.get(&m.id) else {
            continue;
        };
        let Some(p) = obs.persisted.get(host) else {
            continue;
        };
        if !same_set(&p.config) {
            continue;
        }
        if host == &m.host && !p.removed {
            at_old.push(m);
        } else if host != &m.host {
            moved.push((m, host));
        }
    }
    if moved.is_empty() {
        return None;
    }
    let voters = base.voter_count();
    if at_old.iter().filter(|m| m.is_voter()).count() >= majority(voters) {
        return None; // an election can succeed where the members are: wait for it
    }
    let present: Vec<(&MemberConfig, &String)> = at_old
        .iter()
        .map(|m| (*m, &m.host))
        .chain(moved.iter().copied())
        .filter(|(m, _)| m.is_voter())
        .collect();
    if present.len() < majority(voters) {
        return Some(Step::Blocked(Blocked::ReaddressNeedsMajority {
            present: present.iter().map(|(m, _)| m.id).collect(),
            voters,
        }));
    }
    if let KnownSet::Known(known) = &ctx.known_set {
        if Some(&known.replica_set_id) == base.replica_set_id.as_ref()
            && !known.is_not_newer_than(base.version, base.term)
        {
            return Some(Step::Blocked(Blocked::ReaddressOlderThanKnown {
                found_version: base.version,
                known_version: known.config_version,
            }));
        }
    }
    // The present voter with the newest optime (the lowest `_id` of equals).
    let mut newest: Option<(&String, crate::model::OpTime)> = None;
    for (_, host) in &present {
        let Some(optime) = obs.persisted.get(*host).and_then(|p| p.last_optime) else {
            return Some(Step::Wait(Wait::OptimeUnknown {
                host: (*host).clone(),
            }));
        };
        if newest.is_none_or(|(_, best)| optime > best) {
            newest = Some((host, optime));
        }
    }
    // Every write acknowledged up to the commit point seen before is on the member elected
    // next only if one present holds it and those that do not cannot elect one of their own:
    // of the members behind, only as many are moved as an election needs beside those that
    // hold the writes (the newest first). The others stay outside (REMOVED) until a primary
    // moves them, without their vote (check 5).
    if let Some(committed) = commit_point(obs, ctx, base.replica_set_id.as_deref()) {
        let optime_at = |host: &String| obs.persisted.get(host).and_then(|p| p.last_optime);
        let (fresh, behind): (Vec<_>, Vec<_>) = present
            .iter()
            .partition(|(_, host)| reaches(optime_at(host), Some(committed)));
        let behind_at_old = behind.iter().filter(|(m, host)| *host == &m.host).count();
        if fresh.is_empty() || behind_at_old >= majority(voters) {
            return Some(Step::Blocked(Blocked::ReaddressBehindCommitted {
                behind: behind.iter().map(|(m, _)| m.id).collect(),
                committed,
            }));
        }
        let room = majority(voters).saturating_sub(fresh.len() + behind_at_old);
        let mut movers: Vec<(&MemberConfig, &String)> = behind
            .iter()
            .filter(|(m, host)| *host != &m.host)
            .copied()
            .collect();
        movers.sort_by_key(|(m, host)| (std::cmp::Reverse(optime_at(host)), m.id));
        let left_out: Vec<i64> = movers.iter().skip(room).map(|(m, _)| m.id).collect();
        moved.retain(|(m, _)| !left_out.contains(&m.id));
    }
    let (target, _) = newest?;
    let mut config = base.clone();
    config.version += 1;
    let mut changes = Vec::new();
    for (m, host) in &moved {
        if let Some(c) = config.members.iter_mut().find(|c| c.id == m.id) {
            c.host = (*host).clone();
        }
        changes.push((m.id, m.host.clone(), (*host).clone()));
    }
    Some(Step::Readdress {
        host: target.clone(),
        source: source.clone(),
        config,
        moved: changes,
    })
}

/// No config readable: initiate when nobody claims a set and the store remembers none, else
/// wait or refuse.
pub(super) fn initiate_or_wait(obs: &Observation, desired: &Desired, ctx: &PlanContext) -> Step {
    if desired.members.is_empty() {
        return Step::Wait(Wait::NoRecords);
    }
    if obs.hello.values().any(Option::is_some) || !obs.persisted.is_empty() {
        // Some member is in the set already (just initiated, or electing), or holds a config
        // of its own: never initiate.
        return Step::Wait(Wait::NoPrimary);
    }
    match &ctx.known_set {
        KnownSet::New => {}
        KnownSet::Unknown => return Step::Wait(Wait::IdentityUnknown),
        KnownSet::Known(known) => {
            if obs.empty.is_empty() {
                return Step::Wait(Wait::Unreachable {
                    hosts: desired.members.values().cloned().collect(),
                });
            }
            return Step::Blocked(Blocked::KnownSetWithoutData {
                replica_set_id: known.replica_set_id.clone(),
                config_version: known.config_version,
                empty: obs.empty.iter().cloned().collect(),
            });
        }
    }
    // The lowest slot that answers starts the set alone; the others are added one by one.
    let first = desired
        .members
        .iter()
        .find(|(_, host)| obs.hello.contains_key(*host));
    match first {
        Some((&id, host)) => Step::Initiate {
            host: host.clone(),
            members: vec![MemberConfig {
                votes: 1,
                priority: 1.0,
                ..MemberConfig::new_non_voter(id, host)
            }],
        },
        None => Step::Wait(Wait::Unreachable {
            hosts: desired.members.values().cloned().collect(),
        }),
    }
}
