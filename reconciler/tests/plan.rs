//! The planner against MongoDB's rules, by example and by property.
//!
//! The oracle is the replica-set simulator's own preparation and validation of a config
//! (`replset_sim::config_change` and `replset_sim::config`, which follow MongoDB 7.0's
//! repl_set_commands.cpp, replication_coordinator_impl.cpp, member_config.cpp,
//! repl_set_config.cpp and repl_set_config_checks.cpp), the very functions its
//! replSetInitiate and replSetReconfig call, run on the exact document the reconciler sends
//! (`mongo::config_document`); see [`server_reconfig`] and [`server_initiate`]. On top of the server's rules, the reconciler's
//! own policy: the version raised by exactly one, new members without a vote, the fields it
//! does not manage kept, and the document it sends equal to the config it planned.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bson::{doc, oid::ObjectId, Bson, Document};
use proptest::prelude::*;
use replset_reconciler::model::target_voters;
use replset_reconciler::mongo::{config_document, config_view};
use replset_reconciler::{
    plan_next_step, Blocked, Change, ConfigView, Desired, KnownSet, MemberConfig, MemberState,
    MemberStatus, Observation, PlanContext, Step, Wait,
};
use replset_sim::config::{Defaults, ReplSetConfig as ServerConfig};
use replset_sim::config_change::{self, QuorumAnswer, ReconfigKind};

const GRACE: Duration = Duration::from_secs(30);

fn host(id: i64) -> String {
    format!("10.0.0.{id}:27017")
}

fn desired(ids: impl IntoIterator<Item = i64>) -> Desired {
    Desired {
        members: ids.into_iter().map(|id| (id, host(id))).collect(),
    }
}

fn ctx() -> PlanContext {
    PlanContext {
        set_name: "rs0".into(),
        records_trusted: true,
        record_gone_for: BTreeMap::new(),
        removal_grace: GRACE,
        force_after: None,
        majority_lost_for: Duration::ZERO,
        known_set: KnownSet::New,
        committed: None,
    }
}

fn voter(id: i64) -> MemberConfig {
    MemberConfig {
        votes: 1,
        priority: 1.0,
        ..MemberConfig::new_non_voter(id, &host(id))
    }
}

fn config(members: Vec<MemberConfig>) -> ConfigView {
    ConfigView {
        set_name: "rs0".into(),
        version: 5,
        term: 1,
        replica_set_id: None,
        members,
    }
}

/// A healthy set with this config: the first voter is primary, everyone else SECONDARY.
fn observed(config: ConfigView) -> Observation {
    let primary = config.voters().next().map(|m| m.id);
    let status = config
        .members
        .iter()
        .map(|m| {
            let state = if Some(m.id) == primary {
                MemberState::Primary
            } else {
                MemberState::Secondary
            };
            (
                m.id,
                MemberStatus {
                    healthy: true,
                    state,
                },
            )
        })
        .collect();
    Observation {
        hello: config
            .members
            .iter()
            .map(|m| (m.host.clone(), Some("rs0".to_string())))
            .collect(),
        config: Some(config),
        committed: true,
        primary,
        status,
        ..Observation::default()
    }
}

fn down(obs: &mut Observation, id: i64) {
    let (healthy, state) = (false, MemberState::Down);
    obs.status.insert(id, MemberStatus { healthy, state });
}

/// Member `id` is healthy, in `state`.
fn up(obs: &mut Observation, id: i64, state: MemberState) {
    obs.status.insert(
        id,
        MemberStatus {
            healthy: true,
            state,
        },
    );
}

// ---- the server, as the simulator has it ---------------------------------------------------

/// MongoDB's own defaults; they do not take part in validation.
const DEFAULTS: Defaults = Defaults {
    heartbeat_interval_millis: 2000,
    election_timeout_millis: 10_000,
};

/// The server's term while the tests' configs are current.
const TERM: i64 = 1;

/// The config a primary holds for `view`, with fields the reconciler does not manage (settings,
/// a replica set id, tags) that must survive its changes.
fn stored(view: &ConfigView) -> ServerConfig {
    let members: Vec<Bson> = view
        .members
        .iter()
        .map(|m| {
            let mut d = doc! {
                "_id": m.id as i32, "host": &m.host, "votes": i32::from(m.votes),
                "priority": m.priority, "tags": {"slot": m.id.to_string()},
            };
            if m.arbiter_only {
                d.insert("arbiterOnly", true);
            }
            Bson::Document(d)
        })
        .collect();
    let d = doc! {
        "_id": &view.set_name, "version": view.version as i32, "term": view.term,
        "members": members,
        "settings": {"chainingAllowed": false, "replicaSetId": ObjectId::new()},
    };
    ServerConfig::parse(&d, DEFAULTS).expect("a valid stored config")
}

/// What `replSetGetConfig` returns for a stored config (without `newlyAdded`, as the reconciler
/// asks for it).
fn raw(cfg: &ServerConfig) -> Document {
    cfg.to_document(false)
}

/// `replSetReconfig` of `sent` on `receiver`, a member whose config is `old`: the server's
/// own preparation and checks (`replset_sim::config_change`, what the simulator's
/// `replSetReconfig` runs): `prepare_reconfig` (parse, hosts normalised, `newlyAdded` refused,
/// the old `replicaSetId`, the current term or a forced version and term, `newlyAdded` marks,
/// validation against `old`), the implicit default write concern left alone (no cluster-wide
/// one is set), the receiver finding itself in the new config (a test host is itself by
/// name), `complete_reconfig` (electable unless forced) and, for a safe reconfig, the quorum
/// check over the members of `running`, the hosts that answer.
fn server_reconfig(
    old: &ServerConfig,
    sent: &Document,
    force: bool,
    receiver: &str,
    running: &BTreeSet<String>,
) -> Result<ServerConfig, String> {
    let kind = if force {
        ReconfigKind::Force {
            version_bump: 10_000,
        }
    } else {
        ReconfigKind::Safe { term: TERM }
    };
    let new = config_change::prepare_reconfig(old, sent, &old.set_name, kind, DEFAULTS)
        .map_err(|e| e.to_string())?;
    // The reconciler sets no cluster-wide default write concern.
    config_change::check_implicit_default_write_concern(old, &new, false, kind)
        .map_err(|e| e.to_string())?;
    let me = find_self(&new, receiver)?;
    config_change::complete_reconfig(&new, me, kind).map_err(|e| e.to_string())?;
    if !force {
        config_change::check_reconfig_quorum(&new, receiver, |m| answer(running, m))
            .map_err(|e| e.to_string())?;
    }
    Ok(new)
}

/// `replSetInitiate` of `sent` on `receiver`, with the server's own preparation and checks
/// (`replset_sim::config_change`): `prepare_initiate` (parse, version 1 when absent, term 0,
/// the set name of `--replSet`, hosts normalised, validation), the receiver in the config and
/// electable, and every member answering the quorum check's heartbeat. `running` holds the
/// hosts that answer.
fn server_initiate(
    sent: &Document,
    receiver: &str,
    running: &BTreeSet<String>,
) -> Result<ServerConfig, String> {
    let cfg = config_change::prepare_initiate(Some(sent), "rs0", receiver, DEFAULTS)
        .map_err(|e| e.to_string())?;
    let me = find_self(&cfg, receiver)?;
    config_change::check_initiate_receiver(&cfg, me).map_err(|e| e.to_string())?;
    config_change::check_initiate_quorum(&cfg, me, |m| answer(running, m))
        .map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// findSelfInConfig for the tests' hosts, which are themselves by name.
fn find_self(cfg: &ServerConfig, receiver: &str) -> Result<usize, String> {
    cfg.members
        .iter()
        .position(|m| m.host == receiver)
        .ok_or_else(|| format!("{receiver} is not in the config"))
}

/// A member's answer to the quorum check's heartbeat: members that run answer (without a
/// config of their own; `send` refuses an initiate where one reports a set name).
fn answer(running: &BTreeSet<String>, m: &replset_sim::config::MemberConfig) -> QuorumAnswer {
    if running.contains(&m.host) {
        QuorumAnswer::Ok { config_version: -2 }
    } else {
        QuorumAnswer::Failed("Connection refused".into())
    }
}

/// The reconciler's own rules for a safe reconfig, besides the server's: the version raised
/// by one, the document sent equal to the planned config, the fields it does not manage kept,
/// and no member given a vote by being added.
fn reconciler_policy(
    old: &ServerConfig,
    planned: &ConfigView,
    sent: &Document,
    accepted: &ServerConfig,
) -> Result<(), String> {
    if planned.version != old.version + 1 {
        return Err(format!("version {} after {}", planned.version, old.version));
    }
    let view = config_view(sent);
    if (view.version, &view.members) != (planned.version, &planned.members) {
        return Err(format!("sent {view:?}, planned {planned:?}"));
    }
    if accepted.settings != old.settings {
        return Err(format!(
            "settings {:?} became {:?}",
            old.settings, accepted.settings
        ));
    }
    for m in &accepted.members {
        if let Some(before) = old.member_by_id(m.id) {
            if m.tags != before.tags {
                return Err(format!("the tags of member {} were lost", m.id));
            }
        }
        if m.newly_added {
            return Err(format!("member {} was added with a vote", m.id));
        }
    }
    Ok(())
}

/// The server's verdict on a safe reconfig step planned for `old`, with the members of
/// `running` up and the primary `primary`, and the reconciler's policy on it: the config the
/// set then has.
fn accept_reconfig(
    old: &ServerConfig,
    step: &Step,
    primary: &str,
    running: &BTreeSet<String>,
) -> Result<ServerConfig, String> {
    let Step::Reconfig {
        config: planned, ..
    } = step
    else {
        return Err(format!("not a reconfig: {step:?}"));
    };
    let sent = config_document("rs0", step, Some(&raw(old))).ok_or("no document")?;
    let new = server_reconfig(old, &sent, false, primary, running)?;
    reconciler_policy(old, planned, &sent, &new)?;
    Ok(new)
}

fn reconfig_of(step: Step) -> (Change, ConfigView) {
    match step {
        Step::Reconfig { change, config } => (change, config),
        other => panic!("expected a reconfig, got {other:?}"),
    }
}

#[test]
fn a_fresh_service_is_initiated_with_its_lowest_slot_alone() {
    let obs = Observation {
        hello: [(host(2), None), (host(1), None), (host(3), None)]
            .into_iter()
            .collect(),
        ..Observation::default()
    };
    let plan = plan_next_step(&obs, &desired([1, 2, 3]), &ctx());
    match plan.step {
        Step::Initiate { host: h, members } => {
            assert_eq!(h, host(1));
            assert_eq!(members, vec![voter(1)]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn never_initiates_when_a_member_reports_a_set_name() {
    let obs = Observation {
        hello: [(host(1), None), (host(2), Some("rs0".to_string()))]
            .into_iter()
            .collect(),
        ..Observation::default()
    };
    assert_eq!(
        plan_next_step(&obs, &desired([1, 2]), &ctx()).step,
        Step::Wait(Wait::NoPrimary)
    );
    let obs = Observation {
        hello: [(host(1), Some("other".to_string()))].into_iter().collect(),
        ..Observation::default()
    };
    assert!(matches!(
        plan_next_step(&obs, &desired([1]), &ctx()).step,
        Step::Blocked(Blocked::WrongSetName { .. })
    ));
}

#[test]
fn new_members_come_without_a_vote_and_vote_once_secondary() {
    let mut obs = observed(config(vec![voter(1), voter(2), voter(3)]));
    let want = desired([1, 2, 3, 4, 5]);
    let (change, next) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(
        change,
        Change::Add {
            id: 4,
            host: host(4)
        }
    );
    assert_eq!(
        next.member(4).map(|m| (m.votes, m.priority)),
        Some((0, 0.0))
    );

    // Member 4 is in, still syncing (STARTUP2): add 5 before any vote.
    obs = observed(next);
    up(&mut obs, 4, MemberState::Startup2);
    let (change, next) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(
        change,
        Change::Add {
            id: 5,
            host: host(5)
        }
    );

    // 4 still syncing, 5 SECONDARY: 5 gets the vote first.
    obs = observed(next);
    up(&mut obs, 4, MemberState::Startup2);
    let (change, _) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(change, Change::GrantVote { id: 5 });
}

#[test]
fn four_members_keep_three_voters_and_eight_keep_seven() {
    let obs = observed(config(vec![
        voter(1),
        voter(2),
        voter(3),
        MemberConfig::new_non_voter(4, &host(4)),
    ]));
    assert_eq!(
        plan_next_step(&obs, &desired([1, 2, 3, 4]), &ctx()).step,
        Step::Converged
    );
    let mut members: Vec<MemberConfig> = (1..=7).map(voter).collect();
    members.push(MemberConfig::new_non_voter(8, &host(8)));
    let obs = observed(config(members));
    assert_eq!(
        plan_next_step(&obs, &desired(1..=8), &ctx()).step,
        Step::Converged
    );
}

/// The fault-injection run's finding 4 (docs/reliability.md): a set of three that lost a
/// member past the grace was taken to one voter of two, so one disk held the only
/// majority-committed copy, and that node's loss took the set down for good. Two members keep
/// both votes: every majority write is on both.
#[test]
fn a_set_of_three_that_lost_a_member_keeps_two_voters() {
    let mut obs = observed(config(vec![voter(1), voter(2), voter(3)]));
    down(&mut obs, 3);
    let mut c = ctx();
    c.record_gone_for.insert(3, GRACE);
    let want = desired([1, 2]);
    let (change, next) = reconfig_of(plan_next_step(&obs, &want, &c).step);
    assert_eq!(
        change,
        Change::Remove {
            id: 3,
            host: host(3)
        }
    );
    let obs = observed(next);
    assert_eq!(obs.config.as_ref().map(|c| c.voter_count()), Some(2));
    assert_eq!(plan_next_step(&obs, &want, &c).step, Step::Converged);
    // Two members that came as two (a set scaled to 2) vote both too, from a non-voter.
    let obs = observed(config(vec![
        voter(1),
        MemberConfig::new_non_voter(2, &host(2)),
    ]));
    let (change, _) = reconfig_of(plan_next_step(&obs, &want, &c).step);
    assert_eq!(change, Change::GrantVote { id: 2 });
}

#[test]
fn a_rescheduled_slot_moves_its_host_once_the_old_one_is_down() {
    let mut obs = observed(config(vec![voter(1), voter(2), voter(3)]));
    let mut want = desired([1, 2, 3]);
    want.members.insert(2, "10.0.0.99:27017".into());
    // The old mongod still answers: wait.
    assert_eq!(plan_next_step(&obs, &want, &ctx()).step, Step::Converged);
    down(&mut obs, 2);
    let (change, next) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(
        change,
        Change::MoveHost {
            id: 2,
            from: host(2),
            to: "10.0.0.99:27017".into(),
            revoke_vote: true
        }
    );
    assert_eq!(next.members.len(), 3, "the same member, not a second one");
    let old = stored(obs.config.as_ref().expect("config"));
    let running = [host(1), host(3)].into_iter().collect();
    let step = plan_next_step(&obs, &want, &ctx()).step;
    accept_reconfig(&old, &step, &host(1), &running).expect("accepted");
}

#[test]
fn an_address_reused_by_another_slot_is_freed_by_the_removal_first() {
    // Slot 5's task is gone (its record too); slot 2's was rescheduled onto slot 5's old
    // address. The mongod answering there is slot 2's, so member 5 looks healthy.
    let mut obs = observed(config(vec![
        voter(1),
        voter(2),
        voter(3),
        voter(4),
        voter(5),
    ]));
    down(&mut obs, 2);
    let mut want = desired([1, 3, 4]);
    want.members.insert(2, host(5));
    let mut c = ctx();
    c.record_gone_for.insert(5, Duration::from_secs(10));
    // Within the grace: the move waits for its host, and nothing else happens first.
    assert_eq!(
        plan_next_step(&obs, &want, &c).step,
        Step::Wait(Wait::HostInUse {
            id: 2,
            host: host(5),
            by: 5
        })
    );
    // Once the grace has passed: member 5 is removed, which frees its host...
    c.record_gone_for.insert(5, GRACE);
    let step = plan_next_step(&obs, &want, &c).step;
    let old = stored(obs.config.as_ref().expect("config"));
    let running = [host(1), host(3), host(4), host(5)].into_iter().collect();
    accept_reconfig(&old, &step, &host(1), &running).expect("the server accepts the removal");
    let (change, next) = reconfig_of(step);
    assert_eq!(
        change,
        Change::Remove {
            id: 5,
            host: host(5)
        }
    );
    // ...and then slot 2 moves there.
    let mut obs = observed(next);
    down(&mut obs, 2);
    let c = ctx();
    let (change, _) = reconfig_of(plan_next_step(&obs, &want, &c).step);
    assert_eq!(
        change,
        Change::MoveHost {
            id: 2,
            from: host(2),
            to: host(5),
            revoke_vote: true
        }
    );
}

#[test]
fn removal_needs_the_grace_period_and_a_down_member() {
    let mut obs = observed(config(vec![
        voter(1),
        voter(2),
        voter(3),
        voter(4),
        voter(5),
    ]));
    let want = desired([1, 2, 3, 4]);
    let mut c = ctx();
    // Healthy without a record: kept, with a note.
    let plan = plan_next_step(&obs, &want, &c);
    assert!(plan.notes.iter().any(|n| matches!(
        n,
        replset_reconciler::Note::HealthyWithoutRecord { id: 5, .. }
    )));
    assert!(!matches!(
        plan.step,
        Step::Reconfig {
            change: Change::Remove { .. },
            ..
        }
    ));

    down(&mut obs, 5);
    c.record_gone_for.insert(5, Duration::from_secs(10));
    assert!(matches!(
        plan_next_step(&obs, &want, &c).step,
        Step::Wait(Wait::RemovalGrace { id: 5, .. })
    ));
    c.record_gone_for.insert(5, GRACE);
    let (change, _) = reconfig_of(plan_next_step(&obs, &want, &c).step);
    assert_eq!(
        change,
        Change::Remove {
            id: 5,
            host: host(5)
        }
    );

    c.records_trusted = false;
    assert_eq!(
        plan_next_step(&obs, &want, &c).step,
        Step::Wait(Wait::RecordsNotTrusted)
    );
}

#[test]
fn all_records_gone_while_members_run_removes_nothing() {
    let obs = observed(config(vec![voter(1), voter(2), voter(3)]));
    let mut c = ctx();
    for id in 1..=3 {
        c.record_gone_for.insert(id, Duration::from_secs(3600));
    }
    let plan = plan_next_step(&obs, &Desired::default(), &c);
    assert_eq!(plan.step, Step::Converged);
    assert_eq!(plan.notes.len(), 3);
}

#[test]
fn a_set_that_lost_its_majority_is_reported() {
    let mut obs = observed(config((1..=7).map(voter).collect()));
    for id in 4..=7 {
        down(&mut obs, id);
    }
    obs.primary = None;
    up(&mut obs, 1, MemberState::Secondary);
    let plan = plan_next_step(&obs, &desired(1..=3), &ctx());
    assert_eq!(
        plan.step,
        Step::Blocked(Blocked::LostMajority {
            healthy_voters: 3,
            voters: 7
        })
    );
}

#[test]
fn force_only_with_the_flag_and_after_the_delay() {
    let mut obs = observed(config((1..=3).map(voter).collect()));
    down(&mut obs, 1);
    down(&mut obs, 2);
    obs.primary = None;
    up(&mut obs, 3, MemberState::Secondary);
    let mut c = ctx();
    let blocked = |c: &PlanContext| {
        let step = plan_next_step(&obs, &desired(1..=3), c).step;
        matches!(step, Step::Blocked(Blocked::LostMajority { .. }))
    };
    c.majority_lost_for = Duration::from_secs(3600);
    assert!(blocked(&c), "never without --allow-force");
    c.force_after = Some(Duration::from_secs(300));
    c.majority_lost_for = Duration::from_secs(299);
    assert!(blocked(&c), "not before --force-after");
    c.majority_lost_for = Duration::from_secs(300);
    match plan_next_step(&obs, &desired(1..=3), &c).step {
        Step::ForceReconfig {
            host: h,
            config,
            dropped,
        } => {
            assert_eq!(h, host(3));
            assert_eq!(dropped, vec![1, 2]);
            assert_eq!(config.members, vec![voter(3)]);
            assert_eq!(config.version, 6);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn more_than_fifty_members_are_refused() {
    let obs = observed(config(vec![voter(1)]));
    assert!(matches!(
        plan_next_step(&obs, &desired(1..=51), &ctx()).step,
        Step::Blocked(Blocked::TooManyMembers { desired: 51 })
    ));
}

#[test]
fn an_uncommitted_config_is_waited_for() {
    let mut obs = observed(config(vec![voter(1)]));
    obs.committed = false;
    assert_eq!(
        plan_next_step(&obs, &desired([1, 2]), &ctx()).step,
        Step::Wait(Wait::ConfigNotCommitted { version: 5 })
    );
}

// ---- properties ----------------------------------------------------------------------------

/// Where the task of slot `id` runs after it was rescheduled.
fn moved_host(id: i64) -> String {
    format!("10.0.1.{id}:27017")
}

/// A generated world: the set as the server holds it (`None`: never initiated), which mongods
/// run, the desired members (slot to host, some rescheduled to a new host), and what running
/// mongods of a set never initiated say in `hello`.
#[derive(Debug, Clone)]
struct World {
    config: Option<ServerConfig>,
    running: BTreeSet<String>,
    desired: BTreeMap<i64, String>,
    /// For a set never initiated: the `setName` some running mongods report anyway.
    set_names: BTreeMap<String, String>,
    /// `--allow-force --force-after` set, and the majority lost for longer than that.
    force: bool,
}

/// Bit `i` of `seed` (any `i`).
fn bit(seed: u64, i: i64) -> bool {
    (seed >> (i.rem_euclid(64))) & 1 == 1
}

/// The desired members: these slots, the ones with their bit of `seed` set at a new host.
fn desired_hosts(slots: &BTreeSet<i64>, seed: u64, moves: bool) -> BTreeMap<i64, String> {
    slots
        .iter()
        .map(|&id| {
            let at = if moves && bit(seed, id) && bit(seed, id + 20) {
                moved_host(id)
            } else {
                host(id)
            };
            (id, at)
        })
        .collect()
}

/// An initiated set: `voters` voters (ids 1..), a few non-voters (8..), some mongods down;
/// the desired slots either any, or some of the members' (so that votes move); some of them
/// rescheduled to a new host.
fn initiated() -> impl Strategy<Value = World> {
    (
        1usize..=9,
        proptest::collection::btree_set(1i64..=12, 0..=12),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(voters, slots, seed, moves, force, members_only)| {
            let mut members: Vec<MemberConfig> = (1..=voters.min(7) as i64).map(voter).collect();
            let extra = (seed % 4) as i64;
            for id in 8..8 + extra {
                members.push(MemberConfig::new_non_voter(id, &host(id)));
            }
            let slots: BTreeSet<i64> = if members_only {
                members
                    .iter()
                    .map(|m| m.id)
                    .filter(|id| !bit(seed, *id + 50))
                    .collect()
            } else {
                slots
            };
            let desired = desired_hosts(&slots, moves, true);
            let running: BTreeSet<String> = members
                .iter()
                .filter(|m| !bit(seed, m.id + 2) || m.id == 1)
                .map(|m| m.host.clone())
                .chain(
                    desired
                        .iter()
                        .filter(|(id, _)| !bit(seed, *id + 40))
                        .map(|(_, h)| h.clone()),
                )
                .collect();
            World {
                config: Some(stored(&config(members))),
                running,
                desired,
                set_names: BTreeMap::new(),
                force,
            }
        })
}

/// A set never initiated: desired slots, some of them running, a few claiming a set name.
fn fresh() -> impl Strategy<Value = World> {
    (
        proptest::collection::btree_set(1i64..=12, 0..=12),
        any::<u64>(),
    )
        .prop_map(|(slots, seed)| {
            let desired = desired_hosts(&slots, seed, false);
            let running: BTreeSet<String> = desired
                .iter()
                .filter(|(id, _)| !bit(seed, **id))
                .map(|(_, h)| h.clone())
                .collect();
            let set_names = desired
                .iter()
                .filter(|(id, h)| {
                    running.contains(*h) && bit(seed, **id + 16) && bit(seed, **id + 28)
                })
                .map(|(id, h)| {
                    let name = if bit(seed, id + 44) { "other" } else { "rs0" };
                    (h.clone(), name.to_string())
                })
                .collect();
            World {
                config: None,
                running,
                desired,
                set_names,
                force: false,
            }
        })
}

fn world() -> impl Strategy<Value = World> {
    prop_oneof![3 => initiated(), 1 => fresh()]
}

/// The `_id` of the primary: the lowest running electable member, when a majority of the
/// voters runs.
fn primary_of(cfg: &ServerConfig, running: &BTreeSet<String>) -> Option<i64> {
    let up = cfg.voters().filter(|m| running.contains(&m.host)).count();
    if up < cfg.majority_vote_count() {
        return None;
    }
    cfg.members
        .iter()
        .find(|m| m.is_electable() && running.contains(&m.host))
        .map(|m| m.id)
}

/// What the reconciler would observe of `world`: `hello` of the desired hosts that run, the
/// config as `replSetGetConfig` returns it, the members' health.
fn observe(world: &World) -> Observation {
    let hello = world
        .desired
        .values()
        .filter(|h| world.running.contains(*h))
        .map(|h| {
            let name = match &world.config {
                Some(cfg) if cfg.member_by_host(h).is_some() => Some("rs0".to_string()),
                _ => world.set_names.get(h).cloned(),
            };
            (h.clone(), name)
        })
        .collect();
    let Some(cfg) = &world.config else {
        return Observation {
            hello,
            ..Observation::default()
        };
    };
    let primary = primary_of(cfg, &world.running);
    let status = cfg
        .members
        .iter()
        .map(|m| {
            let running = world.running.contains(&m.host);
            let state = match (running, Some(m.id) == primary) {
                (true, true) => MemberState::Primary,
                (true, false) => MemberState::Secondary,
                (false, _) => MemberState::Down,
            };
            (
                m.id,
                MemberStatus {
                    healthy: running,
                    state,
                },
            )
        })
        .collect();
    Observation {
        hello,
        config: Some(config_view(&raw(cfg))),
        committed: true,
        primary,
        status,
        ..Observation::default()
    }
}

/// The context the loop would plan with: every member without a record gone for the grace.
fn context_of(world: &World) -> PlanContext {
    let mut c = ctx();
    if let Some(cfg) = &world.config {
        c.record_gone_for = cfg
            .members
            .iter()
            .filter(|m| !world.desired.contains_key(&m.id))
            .map(|m| (m.id, GRACE))
            .collect();
    }
    if world.force {
        c.force_after = Some(Duration::from_secs(60));
        c.majority_lost_for = Duration::from_secs(3600);
    }
    c
}

/// Sends `step` to the simulated server of `world`: `Ok(Some(config))` with the config the
/// server accepted and the reconciler's policy allows, `Ok(None)` for a step that sends
/// nothing, `Err` with the rule it breaks.
fn send(world: &World, obs: &Observation, step: &Step) -> Result<Option<ServerConfig>, String> {
    let runs = |id: &i64| {
        world.config.as_ref().is_some_and(|c| {
            c.member_by_id(*id)
                .is_some_and(|m| world.running.contains(&m.host))
        })
    };
    match (step, &world.config) {
        (Step::Initiate { host: to, .. }, None) => {
            if let Some((h, name)) = world.set_names.iter().next() {
                return Err(format!("initiated although {h} is in set {name}"));
            }
            let sent = config_document("rs0", step, None).ok_or("no document")?;
            server_initiate(&sent, to, &world.running).map(Some)
        }
        (Step::Reconfig { change, config }, Some(old)) => {
            let primary = obs.primary.ok_or("a reconfig without a primary")?;
            let at = old.member_by_id(primary).ok_or("no primary member")?;
            let new = accept_reconfig(old, step, &at.host, &world.running)?;
            match change {
                Change::Remove { id, .. } if runs(id) => {
                    Err(format!("removed member {id}, which runs"))
                }
                Change::Remove { id, .. } if world.desired.contains_key(id) => {
                    Err(format!("removed member {id}, which has a record"))
                }
                Change::MoveHost { id, .. } if runs(id) => {
                    Err(format!("moved member {id}, which runs at its old host"))
                }
                Change::Add { id, .. } if config.member(*id).map(|m| m.votes) != Some(0) => {
                    Err(format!("added member {id} with a vote"))
                }
                Change::GrantVote { id } if !runs(id) => {
                    Err(format!("a vote for member {id}, which is down"))
                }
                _ => Ok(Some(new)),
            }
        }
        (Step::ForceReconfig { host: to, .. }, Some(old)) => {
            if !world.force {
                return Err("forced without --allow-force".into());
            }
            if obs.primary.is_some() {
                return Err("forced with a primary".into());
            }
            if !world.running.contains(to) {
                return Err(format!("forced on {to}, which is down"));
            }
            let sent = config_document("rs0", step, Some(&raw(old))).ok_or("no document")?;
            server_reconfig(old, &sent, true, to, &world.running).map(Some)
        }
        (Step::Converged | Step::Wait(_) | Step::Blocked(_), _) => Ok(None),
        (other, _) => Err(format!(
            "{other:?} for a set with config {:?}",
            world.config
        )),
    }
}

fn desired_of(world: &World) -> Desired {
    Desired {
        members: world.desired.clone(),
    }
}

/// `cases` cases, the regressions kept next to this file: tests/plan.proptest-regressions.
fn with_regressions(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(with_regressions(512))]

    /// Every initiate and reconfig the planner asks for is accepted by the server's rules (the
    /// simulator's validation of the exact document sent) and keeps the reconciler's own: never
    /// removes a member that runs or has a record, never moves one that runs, never adds a
    /// voter directly, never forces on its own.
    #[test]
    fn every_step_is_one_the_server_accepts(w in world()) {
        let obs = observe(&w);
        let step = plan_next_step(&obs, &desired_of(&w), &context_of(&w)).step;
        send(&w, &obs, &step).map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
    }

    /// From any world where the desired members run (a rescheduled slot's old mongod is gone),
    /// the planner's steps, each accepted by the server and then in force (members that run
    /// become SECONDARY), reach exactly the desired members with the target number of voters,
    /// odd (or two of two) and at most 7, in a bounded number of steps.
    #[test]
    fn repeated_steps_converge(w in world()) {
        let mut w = w;
        for (id, at) in &w.desired {
            if at != &host(*id) {
                w.running.remove(&host(*id));
            }
            w.running.insert(at.clone());
        }
        w.set_names.clear();
        w.force = false;
        let want = desired_of(&w);
        for step_no in 0..100 {
            let obs = observe(&w);
            let step = plan_next_step(&obs, &want, &context_of(&w)).step;
            let accepted = send(&w, &obs, &step)
                .map_err(|e| TestCaseError::fail(format!("step {step_no}: {step:?}: {e}")))?;
            if let Some(mut cfg) = accepted {
                // A new primary raises the config's term (and the initiated set elects one).
                cfg.term = TERM;
                w.config = Some(cfg);
                continue;
            }
            match step {
                Step::Converged => {
                    let cfg = w.config.as_ref().expect("a converged set has a config");
                    // Every desired member is in, at its host; members left over are running
                    // ones without a record (kept on purpose).
                    for (id, at) in &w.desired {
                        prop_assert_eq!(cfg.member_by_id(*id).map(|m| &m.host), Some(at));
                    }
                    for m in &cfg.members {
                        prop_assert!(
                            w.desired.contains_key(&m.id) || w.running.contains(&m.host),
                            "dead member {} left in", m.id
                        );
                    }
                    // As many voters as can vote, at most 7, odd (two keep both votes).
                    let voters = cfg.voters().count();
                    let could_vote = voters + cfg.members.iter()
                        .filter(|m| !m.is_voter() && w.desired.contains_key(&m.id))
                        .count();
                    prop_assert_eq!(voters, target_voters(could_vote), "voters of {:?}", cfg);
                    prop_assert!((voters % 2 == 1 || voters == 2) && voters <= 7, "voters of {:?}", cfg);
                    let running = cfg.members.iter().filter(|m| w.running.contains(&m.host)).count();
                    prop_assert!(running >= voters);
                    return Ok(());
                }
                Step::Wait(Wait::NoRecords) if w.desired.is_empty() => return Ok(()),
                Step::Blocked(Blocked::LostMajority { .. } | Blocked::RemovalWouldLoseMajority { .. }) => {
                    // Only a world that started without a majority of its voters may end here.
                    prop_assert_eq!(step_no, 0, "blocked after {} steps: {:?}", step_no, step);
                    return Ok(());
                }
                other => prop_assert!(false, "step {}: unexpected {:?}", step_no, other),
            }
        }
        prop_assert!(false, "no convergence in 100 steps: {:?}", w.config);
    }
}

// ---- rules 10 and 11: a set the store remembers, and members back under new addresses ----

/// A task's new address after a restart of the whole service.
fn new_host(id: i64) -> String {
    format!("10.0.9.{id}:27017")
}

fn identity_of(view: &ConfigView, replica_set_id: &str) -> backend_core::SetIdentity {
    backend_core::SetIdentity {
        schema_version: backend_core::IDENTITY_SCHEMA_VERSION,
        set: view.set_name.clone(),
        replica_set_id: replica_set_id.into(),
        config_version: view.version,
        config_term: view.term,
        members: view
            .members
            .iter()
            .map(|m| backend_core::IdentityMember {
                id: m.id,
                host: m.host.clone(),
                voter: m.is_voter(),
            })
            .collect(),
        commit_point: None,
    }
}

/// The world after every task of `cfg` restarted: the slots in `back` answer at their new
/// address, each REMOVED with the stored config and the optime `(term 1, ts)` given; the
/// records name the new addresses of every slot of `cfg`. Returns the observation, the
/// stored config, and the desired members.
fn restarted(cfg: &ConfigView, back: &[(i64, u32)]) -> (Observation, ServerConfig, Desired) {
    let stored = stored(cfg);
    let view = config_view(&raw(&stored));
    let mut obs = Observation::default();
    for &(id, ts) in back {
        obs.hello.insert(new_host(id), None);
        obs.persisted.insert(
            new_host(id),
            replset_reconciler::Persisted {
                config: view.clone(),
                removed: true,
                last_optime: Some(replset_reconciler::OpTime {
                    term: 1,
                    ts: (1_700_000_000, ts),
                }),
            },
        );
    }
    let desired = Desired {
        members: cfg.members.iter().map(|m| (m.id, new_host(m.id))).collect(),
    };
    (obs, stored, desired)
}

fn known(stored: &ServerConfig) -> KnownSet {
    let view = config_view(&raw(stored));
    let id = view
        .replica_set_id
        .clone()
        .expect("a stored config has an id");
    KnownSet::Known(identity_of(&view, &id))
}

#[test]
fn a_set_the_store_remembers_is_never_initiated_over_empty_members() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let stored = stored(&cfg);
    let mut obs = Observation::default();
    for id in 1..=3 {
        obs.hello.insert(new_host(id), None);
        obs.empty.insert(new_host(id));
    }
    let desired = Desired {
        members: (1..=3).map(|id| (id, new_host(id))).collect(),
    };
    let c = PlanContext {
        known_set: known(&stored),
        ..ctx()
    };
    let step = plan_next_step(&obs, &desired, &c).step;
    let Step::Blocked(Blocked::KnownSetWithoutData {
        replica_set_id,
        config_version,
        empty,
    }) = &step
    else {
        panic!("expected a refusal, got {step:?}");
    };
    assert_eq!(
        Some(replica_set_id),
        config_view(&raw(&stored)).replica_set_id.as_ref()
    );
    assert_eq!(*config_version, 5);
    assert_eq!(empty.len(), 3);
    let text = step.describe();
    assert!(
        text.contains("forget-set") && text.contains(replica_set_id),
        "{text}"
    );

    // Unread: never initiate either. A new set (or one forgotten on purpose): initiate.
    let c = PlanContext {
        known_set: KnownSet::Unknown,
        ..ctx()
    };
    assert_eq!(
        plan_next_step(&obs, &desired, &c).step,
        Step::Wait(Wait::IdentityUnknown)
    );
    assert!(matches!(
        plan_next_step(&obs, &desired, &ctx()).step,
        Step::Initiate { .. }
    ));
}

#[test]
fn members_back_under_new_addresses_are_readdressed_on_the_newest() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (obs, stored, desired) = restarted(&cfg, &[(1, 7), (2, 9), (3, 8)]);
    let c = PlanContext {
        known_set: known(&stored),
        ..ctx()
    };
    let step = plan_next_step(&obs, &desired, &c).step;
    let Step::Readdress {
        host,
        source,
        config: planned,
        moved,
    } = &step
    else {
        panic!("expected re-addressing, got {step:?}");
    };
    assert_eq!(host, &new_host(2), "the member with the newest optime");
    assert_eq!(moved.len(), 3);
    // Nothing but the hosts changed: same ids, votes, priorities, replica set id.
    let sent = config_document("rs0", &step, Some(&raw(&stored))).expect("a document");
    let before = config_view(&raw(&stored));
    let after = config_view(&sent);
    assert_eq!(after.replica_set_id, before.replica_set_id);
    assert_eq!(after.version, before.version + 1);
    for (b, a) in before.members.iter().zip(&after.members) {
        assert_eq!((a.id, a.votes, a.priority), (b.id, b.votes, b.priority));
        assert_eq!(a.host, new_host(a.id));
    }
    assert_eq!(planned.members, after.members);
    assert!(obs.persisted.contains_key(source));
    // The server takes it, with force, on that member.
    let running: BTreeSet<String> = (1..=3).map(new_host).collect();
    let installed = server_reconfig(&stored, &sent, true, host, &running)
        .expect("the server accepts the forced config");
    assert_eq!(installed.members.len(), 3);
}

/// `(term 1, ts)`, as [`restarted`] gives the members' optimes.
fn optime(ts: u32) -> replset_reconciler::OpTime {
    replset_reconciler::OpTime {
        term: 1,
        ts: (1_700_000_000, ts),
    }
}

/// Finding 9: a task that swarm placed on a node whose volume an earlier task left holds the
/// last config (it had not changed since) and older data. Counted as the member it now runs
/// as, it could stand for the majority without the writes that member acknowledged. With a
/// commit point seen before, re-addressing waits for members whose data reaches it.
#[test]
fn members_whose_data_stops_short_of_the_commit_point_are_not_readdressed() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (obs, stored, desired) = restarted(&cfg, &[(2, 7), (3, 8)]);
    let Some(replica_set_id) = config_view(&raw(&stored)).replica_set_id else {
        panic!("a stored config has an id");
    };
    let seen = |ts| PlanContext {
        known_set: known(&stored),
        committed: Some(replset_reconciler::Committed {
            replica_set_id: replica_set_id.clone(),
            optime: optime(ts),
        }),
        ..ctx()
    };
    // Both present stop short of ts 9: the member that holds it (1) is missing.
    assert_eq!(
        plan_next_step(&obs, &desired, &seen(9)).step,
        Step::Blocked(Blocked::ReaddressBehindCommitted {
            behind: vec![2, 3],
            committed: optime(9),
        })
    );
    // Member 3 reaches ts 8, and member 2 alone (behind) cannot elect itself: re-addressed on 3.
    let step = plan_next_step(&obs, &desired, &seen(8)).step;
    assert!(
        matches!(&step, Step::Readdress { host, .. } if host == &new_host(3)),
        "{step:?}"
    );
    // Two of three present behind could elect one of theirs without the third: only the
    // newer of them is moved beside member 3, the other stays outside until a primary moves
    // it (without its vote).
    let mut obs3 = obs.clone();
    let mut one = obs.persisted[&new_host(2)].clone();
    one.last_optime = Some(optime(6));
    obs3.hello.insert(new_host(1), None);
    obs3.persisted.insert(new_host(1), one);
    if let Some(p) = obs3.persisted.get_mut(&new_host(3)) {
        p.last_optime = Some(optime(9));
    }
    let step = plan_next_step(&obs3, &desired, &seen(9)).step;
    let Step::Readdress {
        host: on, moved, ..
    } = &step
    else {
        panic!("expected re-addressing, got {step:?}");
    };
    assert_eq!(on, &new_host(3));
    let ids: Vec<i64> = moved.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, vec![2, 3], "member 1 (the oldest) stays outside");
    // A commit point of another set (the store's identity before a `forget-set`) is not this
    // set's.
    let other = PlanContext {
        committed: Some(replset_reconciler::Committed {
            replica_set_id: "65a1c0ffee00000000000009".into(),
            optime: optime(99),
        }),
        ..seen(0)
    };
    assert!(matches!(
        plan_next_step(&obs, &desired, &other).step,
        Step::Readdress { .. }
    ));
}

#[test]
fn readdressing_waits_for_a_majority_of_the_voters() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (obs, stored, desired) = restarted(&cfg, &[(3, 8)]);
    let c = PlanContext {
        known_set: known(&stored),
        ..ctx()
    };
    assert_eq!(
        plan_next_step(&obs, &desired, &c).step,
        Step::Blocked(Blocked::ReaddressNeedsMajority {
            present: vec![3],
            voters: 3,
        })
    );

    // Two of three: enough. The one still missing keeps its old host, to be moved later.
    let (obs, stored, desired) = restarted(&cfg, &[(1, 9), (3, 8)]);
    let step = plan_next_step(&obs, &desired, &c).step;
    let Step::Readdress {
        host: on, moved, ..
    } = &step
    else {
        panic!("expected re-addressing, got {step:?}");
    };
    assert_eq!(on, &new_host(1));
    let ids: Vec<i64> = moved.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, vec![1, 3]);
    let sent = config_document("rs0", &step, Some(&raw(&stored))).expect("a document");
    let hosts: Vec<String> = config_view(&sent)
        .members
        .iter()
        .map(|m| m.host.clone())
        .collect();
    assert_eq!(hosts, vec![new_host(1), host(2), new_host(3)]);
}

#[test]
fn a_member_without_its_optime_holds_readdressing_back() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (mut obs, _, desired) = restarted(&cfg, &[(1, 9), (2, 8), (3, 7)]);
    if let Some(p) = obs.persisted.get_mut(&new_host(2)) {
        p.last_optime = None;
    }
    assert_eq!(
        plan_next_step(&obs, &desired, &ctx()).step,
        Step::Wait(Wait::OptimeUnknown { host: new_host(2) })
    );
}

#[test]
fn members_holding_an_older_config_than_the_store_saw_are_not_readdressed() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (obs, stored, desired) = restarted(&cfg, &[(1, 9), (2, 8)]);
    let KnownSet::Known(mut identity) = known(&stored) else {
        unreachable!("known() makes a known set")
    };
    identity.config_version += 2;
    let c = PlanContext {
        known_set: KnownSet::Known(identity),
        ..ctx()
    };
    assert_eq!(
        plan_next_step(&obs, &desired, &c).step,
        Step::Blocked(Blocked::ReaddressOlderThanKnown {
            found_version: 5,
            known_version: 7,
        })
    );
}

#[test]
fn a_majority_still_at_its_addresses_elects_instead_of_being_readdressed() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (mut obs, stored, mut desired) = restarted(&cfg, &[(3, 8)]);
    let view = config_view(&raw(&stored));
    // Members 1 and 2 kept their addresses: they find themselves, an election will succeed.
    for id in [1, 2] {
        desired.members.insert(id, host(id));
        obs.hello.insert(host(id), Some("rs0".into()));
        obs.persisted.insert(
            host(id),
            replset_reconciler::Persisted {
                config: view.clone(),
                removed: false,
                last_optime: Some(replset_reconciler::OpTime {
                    term: 1,
                    ts: (1_700_000_000, 9),
                }),
            },
        );
    }
    obs.config = Some(view.clone());
    for id in [1, 2] {
        obs.status.insert(
            id,
            MemberStatus {
                healthy: true,
                state: MemberState::Secondary,
            },
        );
    }
    assert_eq!(
        plan_next_step(&obs, &desired, &ctx()).step,
        Step::Wait(Wait::NoPrimary)
    );

    // Only member 1 kept its address: with 3 moved it is a majority, re-addressed around 1.
    desired.members.insert(2, new_host(2));
    obs.hello.remove(&host(2));
    obs.persisted.remove(&host(2));
    obs.status.remove(&2);
    obs.hello.insert(new_host(2), None);
    obs.persisted.insert(
        new_host(2),
        replset_reconciler::Persisted {
            config: view.clone(),
            removed: true,
            last_optime: Some(replset_reconciler::OpTime {
                term: 1,
                ts: (1_700_000_000, 5),
            }),
        },
    );
    let step = plan_next_step(&obs, &desired, &ctx()).step;
    let Step::Readdress {
        host: on, moved, ..
    } = &step
    else {
        panic!("expected re-addressing, got {step:?}");
    };
    assert_eq!(on, &host(1), "member 1 has the newest optime");
    let ids: Vec<i64> = moved.iter().map(|(id, _, _)| *id).collect();
    assert_eq!(ids, vec![2, 3]);
}

/// A task that came back empty at the address it had (swarm reused it) is in initial sync
/// (STARTUP2): MongoDB lets it vote with an empty oplog, so the reconciler takes its vote
/// until it is SECONDARY, and gives it back then.
#[test]
fn a_voter_in_initial_sync_loses_its_vote_until_it_is_secondary() {
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let mut obs = observed(cfg.clone());
    up(&mut obs, 3, MemberState::Startup2);
    let want = desired([1, 2, 3]);
    let (change, next) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(change, Change::RevokeVote { id: 3 });
    let old = stored(&cfg);
    let running = (1..=3).map(host).collect();
    let step = plan_next_step(&obs, &want, &ctx()).step;
    accept_reconfig(&old, &step, &host(1), &running).expect("accepted");
    // Still syncing: nothing more to do until it is SECONDARY.
    let mut syncing = observed(next.clone());
    up(&mut syncing, 3, MemberState::Startup2);
    assert!(matches!(
        plan_next_step(&syncing, &want, &ctx()).step,
        Step::Wait(Wait::CatchingUp { .. })
    ));
    // SECONDARY: the vote comes back.
    let (change, _) = reconfig_of(plan_next_step(&observed(next), &want, &ctx()).step);
    assert_eq!(change, Change::GrantVote { id: 3 });
    // Never when taking it would leave the healthy voters short of a majority.
    let mut obs = observed(cfg);
    up(&mut obs, 3, MemberState::Startup2);
    down(&mut obs, 2);
    let step = plan_next_step(&obs, &want, &ctx()).step;
    assert!(
        !matches!(
            step,
            Step::Reconfig {
                change: Change::RevokeVote { .. },
                ..
            }
        ),
        "{step:?}"
    );
}

#[test]
fn a_replaced_task_that_kept_its_volume_keeps_its_vote() {
    let mut cfg = config(vec![voter(1), voter(2), voter(3)]);
    cfg.replica_set_id = Some("65a1c0ffee00000000000001".into());
    let mut obs = observed(cfg.clone());
    down(&mut obs, 2);
    let mut want = desired([1, 2, 3]);
    want.members.insert(2, new_host(2));
    // The new task answers REMOVED with the set's config: it has the data.
    obs.persisted.insert(
        new_host(2),
        replset_reconciler::Persisted {
            config: cfg.clone(),
            removed: true,
            last_optime: None,
        },
    );
    let (change, _) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
    assert_eq!(
        change,
        Change::MoveHost {
            id: 2,
            from: host(2),
            to: new_host(2),
            revoke_vote: false
        }
    );
    // The server takes it: the same voters, one host changed.
    let old = stored(&cfg);
    let running = [host(1), host(3), new_host(2)].into_iter().collect();
    let step = plan_next_step(&obs, &want, &ctx()).step;
    accept_reconfig(&old, &step, &host(1), &running).expect("accepted");
    // Finding 9: a volume an earlier task left on the node holds the same config when it has
    // not changed since, but not the writes after it. Data short of the primary's commit
    // point (or of the one seen before) loses the vote; data that reaches it keeps it.
    let with_optime = |ts: Option<u32>, commit: u32, seen: Option<u32>| {
        let mut obs = obs.clone();
        if let Some(p) = obs.persisted.get_mut(&new_host(2)) {
            p.last_optime = ts.map(optime);
        }
        obs.commit_point = Some(optime(commit));
        let c = PlanContext {
            committed: seen.map(|ts| replset_reconciler::Committed {
                replica_set_id: "65a1c0ffee00000000000001".into(),
                optime: optime(ts),
            }),
            ..ctx()
        };
        match reconfig_of(plan_next_step(&obs, &want, &c).step).0 {
            Change::MoveHost { revoke_vote, .. } => revoke_vote,
            other => panic!("expected a move, got {other:?}"),
        }
    };
    assert!(
        with_optime(Some(7), 9, None),
        "behind the primary's commit point"
    );
    assert!(with_optime(None, 9, None), "its data unknown");
    assert!(
        with_optime(Some(9), 8, Some(10)),
        "behind the one seen before"
    );
    assert!(!with_optime(Some(9), 9, None), "reaches it");
    assert!(!with_optime(Some(12), 9, Some(10)), "past both");
    // A volume with an older config of the set may be far behind, and another set's data is
    // no data of this one: the vote goes until it has synced.
    let older = |c: &mut ConfigView| c.version -= 1;
    let other_set = |c: &mut ConfigView| c.replica_set_id = Some("65a1c0ffee00000000000002".into());
    for change_config in [&older as &dyn Fn(&mut ConfigView), &other_set] {
        let mut obs = obs.clone();
        if let Some(p) = obs.persisted.get_mut(&new_host(2)) {
            change_config(&mut p.config);
        }
        let (change, _) = reconfig_of(plan_next_step(&obs, &want, &ctx()).step);
        assert!(
            matches!(
                change,
                Change::MoveHost {
                    revoke_vote: true,
                    ..
                }
            ),
            "{change:?}"
        );
    }
}

#[test]
fn a_member_with_an_older_config_does_not_count_for_the_majority() {
    // Member 3's volume is older: it holds config version 4 of the same set.
    let cfg = config(vec![voter(1), voter(2), voter(3)]);
    let (mut obs, _, desired) = restarted(&cfg, &[(1, 9), (3, 8)]);
    if let Some(p) = obs.persisted.get_mut(&new_host(3)) {
        p.config.version = 4;
    }
    assert_eq!(
        plan_next_step(&obs, &desired, &ctx()).step,
        Step::Blocked(Blocked::ReaddressNeedsMajority {
            present: vec![1],
            voters: 3,
        })
    );
}

// ---- rule 13: a record never takes the slot of a member that is up ------------------------

/// A host no member of the generated worlds has: where a claim of another writer points.
fn foreign_host(id: i64) -> String {
    format!("10.0.2.{id}:27017")
}

/// The store of `world`: each desired slot's record at its host (no start time, as an older
/// bridge writes), and, for the slots whose bit of `seed` is set, a claim at a foreign host by
/// a task that "started" after every other.
fn store_of(
    world: &World,
    seed: u64,
    layout: &backend_core::KeyLayout,
) -> BTreeMap<String, Vec<u8>> {
    let record = |id: i64, key_id: String, at: &str, started_at: Option<&str>| {
        let (ip, port) = at.rsplit_once(':').expect("host:port");
        let r = backend_core::ServiceRecord {
            task_slot: Some(id as u64),
            started_at: started_at.map(str::to_string),
            ..backend_core::ServiceRecord::new(
                "mongo",
                key_id,
                ip.parse().expect("ip"),
                port.parse().expect("port"),
            )
        };
        (layout.service_key(&r.service, &r.id), r.to_json())
    };
    let mut store: BTreeMap<String, Vec<u8>> = world
        .desired
        .iter()
        .map(|(&id, at)| record(id, format!("task{id}"), at, None))
        .collect();
    for id in 1..=12 {
        if bit(seed, id) {
            let claim = record(
                id,
                format!("claim{id}"),
                &foreign_host(id),
                Some("2099-01-01T00:00:00Z"),
            );
            store.insert(claim.0, claim.1);
        }
    }
    store
}

proptest! {
    #![proptest_config(with_regressions(256))]

    /// With claims at foreign hosts by tasks that started later than any other: a member that
    /// the set sees up is never moved, its slot is followed by a record at its own host or by
    /// none, and the step planned from what is followed is one the server accepts. A member
    /// that is down is moved to the newest claim of its slot (rule 5).
    #[test]
    fn a_member_that_is_up_is_never_moved_by_a_newer_record(w in initiated(), seed in any::<u64>()) {
        use replset_reconciler::records::{desired_sets, Selector, SlotHolders};

        let layout = backend_core::KeyLayout::new("p");
        let selectors = [Selector::Service {
            service: "mongo".into(),
            set: "rs0".into(),
            port: None,
        }];
        let store = store_of(&w, seed, &layout);
        let before = observe(&w);
        let holders = SlotHolders::default().observed("rs0", &before);
        let (sets, _) = desired_sets(&store, &layout, &selectors, &holders);
        let desired = sets.get("rs0").cloned().unwrap_or_default();
        let config = before.config.clone().expect("an initiated set");
        for m in &config.members {
            let followed = desired.members.get(&m.id);
            if before.is_up(m.id) {
                prop_assert!(
                    followed.is_none() || followed == Some(&m.host),
                    "member {} is up at {} but {:?} is followed", m.id, m.host, followed
                );
            } else if bit(seed, m.id) {
                prop_assert_eq!(followed, Some(&foreign_host(m.id)), "member {} is down", m.id);
            }
        }

        // The loop plans from the followed records, observing the set through them.
        let mut w = w;
        w.desired = desired.members.clone();
        let obs = observe(&w);
        let step = plan_next_step(&obs, &desired, &context_of(&w)).step;
        send(&w, &obs, &step).map_err(|e| TestCaseError::fail(format!("{step:?}: {e}")))?;
        if let Step::Reconfig { config: next, .. } = &step {
            for m in &next.members {
                prop_assert!(
                    !(m.host == foreign_host(m.id) && before.is_up(m.id)),
                    "member {} moved from a live mongod: {:?}", m.id, step
                );
            }
        }
    }
}
