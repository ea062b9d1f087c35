//! The planner against MongoDB's reconfig rules, by example and by property.
//!
//! `check_successor` restates the server's checks on a new config (repl_set_config_checks.cpp,
//! repl_set_config.cpp, member_config.cpp): version + 1, 1 to 50 members, at most 7 voters,
//! unique `_id` and host, non-voters with priority 0, an electable member, and at most one
//! voter added or removed (by member `_id`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use replset_reconciler::model::{majority, target_voters};
use replset_reconciler::plan::voter_ids;
use replset_reconciler::{
    plan_next_step, Blocked, Change, ConfigView, Desired, MemberConfig, MemberState, MemberStatus,
    Observation, PlanContext, Step, Wait,
};

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
    }
}

fn down(obs: &mut Observation, id: i64) {
    obs.status.insert(
        id,
        MemberStatus {
            healthy: false,
            state: MemberState::Down,
        },
    );
}

/// The server's checks on a successor config; `Err` names the broken rule.
fn check_successor(old: &ConfigView, new: &ConfigView) -> Result<(), String> {
    if new.version != old.version + 1 {
        return Err(format!("version {} after {}", new.version, old.version));
    }
    if new.members.is_empty() || new.members.len() > 50 {
        return Err(format!("{} members", new.members.len()));
    }
    if new.voter_count() > 7 {
        return Err(format!("{} voters", new.voter_count()));
    }
    let ids: BTreeSet<i64> = new.members.iter().map(|m| m.id).collect();
    let hosts: BTreeSet<&str> = new.members.iter().map(|m| m.host.as_str()).collect();
    if ids.len() != new.members.len() || hosts.len() != new.members.len() {
        return Err("duplicate _id or host".into());
    }
    if new
        .members
        .iter()
        .any(|m| m.votes == 0 && m.priority != 0.0)
    {
        return Err("a non-voter with priority > 0".into());
    }
    if !new.members.iter().any(|m| m.votes > 0 && m.priority > 0.0) {
        return Err("no electable member".into());
    }
    let old_voters = voter_ids(old);
    let new_voters = voter_ids(new);
    if old_voters.symmetric_difference(&new_voters).count() > 1 {
        return Err("can only add or remove at most 1 voting member".into());
    }
    for m in &new.members {
        if let Some(o) = old.members.iter().find(|o| o.host == m.host) {
            if o.id != m.id {
                return Err(format!("host {} changed _id", m.host));
            }
        }
    }
    Ok(())
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
    obs.status.insert(
        4,
        MemberStatus {
            healthy: true,
            state: MemberState::Startup2,
        },
    );
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
    obs.status.insert(
        4,
        MemberStatus {
            healthy: true,
            state: MemberState::Startup2,
        },
    );
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
    check_successor(obs.config.as_ref().expect("config"), &next).expect("valid");
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
    obs.status.insert(
        1,
        MemberStatus {
            healthy: true,
            state: MemberState::Secondary,
        },
    );
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
    obs.status.insert(
        3,
        MemberStatus {
            healthy: true,
            state: MemberState::Secondary,
        },
    );
    let mut c = ctx();
    c.majority_lost_for = Duration::from_secs(3600);
    assert!(
        matches!(
            plan_next_step(&obs, &desired(1..=3), &c).step,
            Step::Blocked(Blocked::LostMajority { .. })
        ),
        "never without --allow-force"
    );
    c.force_after = Some(Duration::from_secs(300));
    c.majority_lost_for = Duration::from_secs(299);
    assert!(
        matches!(
            plan_next_step(&obs, &desired(1..=3), &c).step,
            Step::Blocked(Blocked::LostMajority { .. })
        ),
        "not before --force-after"
    );
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

/// A generated world: the config, which members run (and are healthy), and the desired slots.
#[derive(Debug, Clone)]
struct World {
    config: ConfigView,
    running: BTreeSet<i64>,
    desired: BTreeSet<i64>,
}

fn world() -> impl Strategy<Value = World> {
    (
        1usize..=9,
        proptest::collection::btree_set(1i64..=12, 0..=12),
        any::<u64>(),
    )
        .prop_map(|(voters, desired, seed)| {
            // A config of `voters` voters (ids 1..) plus a few non-voters, some members down.
            let mut members: Vec<MemberConfig> = (1..=voters.min(7) as i64).map(voter).collect();
            let extra = (seed % 4) as i64;
            for id in 8..8 + extra {
                members.push(MemberConfig::new_non_voter(id, &host(id)));
            }
            let running: BTreeSet<i64> = members
                .iter()
                .map(|m| m.id)
                .filter(|id| (seed >> (id % 60)) & 1 == 0 || *id == 1)
                .collect();
            World {
                config: config(members),
                running,
                desired,
            }
        })
}

/// What the reconciler would observe of `world`: the lowest running voter is primary if a
/// majority of voters runs.
fn observe(world: &World) -> Observation {
    let voters: Vec<i64> = world.config.voters().map(|m| m.id).collect();
    let up = voters
        .iter()
        .filter(|id| world.running.contains(id))
        .count();
    let primary = if up >= majority(voters.len()) {
        voters.iter().copied().find(|id| world.running.contains(id))
    } else {
        None
    };
    let status = world
        .config
        .members
        .iter()
        .map(|m| {
            let running = world.running.contains(&m.id);
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
        hello: world
            .running
            .iter()
            .map(|id| (host(*id), Some("rs0".to_string())))
            .collect(),
        config: Some(world.config.clone()),
        committed: true,
        primary,
        status,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every reconfig the planner asks for passes the server's checks, never removes a healthy
    /// member or one with a record, and never adds a voter directly.
    #[test]
    fn every_step_is_one_the_server_accepts(w in world()) {
        let desired = desired(w.desired.iter().copied());
        let mut c = ctx();
        for m in &w.config.members {
            if !w.desired.contains(&m.id) {
                c.record_gone_for.insert(m.id, GRACE);
            }
        }
        let obs = observe(&w);
        if let Step::Reconfig { change, config } = plan_next_step(&obs, &desired, &c).step {
            prop_assert!(obs.primary.is_some(), "reconfig without a primary");
            check_successor(&w.config, &config).map_err(TestCaseError::fail)?;
            match change {
                Change::Remove { id, .. } => {
                    prop_assert!(!w.running.contains(&id), "removed a running member");
                    prop_assert!(!w.desired.contains(&id), "removed a member with a record");
                }
                Change::Add { id, .. } => {
                    prop_assert_eq!(config.member(id).map(|m| m.votes), Some(0));
                }
                Change::GrantVote { id } => {
                    prop_assert!(w.running.contains(&id), "vote for a member that is down");
                }
                _ => {}
            }
        }
    }

    /// From any world where the desired members run, applying the planner's steps (members
    /// that are running become SECONDARY) converges to exactly the desired members, with the
    /// target number of voters, in a bounded number of steps.
    #[test]
    fn repeated_steps_converge(w in world()) {
        let mut w = w;
        // The desired members run; slots above 12 are out of range of the generator.
        w.running.extend(w.desired.iter().copied());
        let want = desired(w.desired.iter().copied());
        let mut c = ctx();
        for step_no in 0..100 {
            c.record_gone_for = w
                .config
                .members
                .iter()
                .filter(|m| !w.desired.contains(&m.id))
                .map(|m| (m.id, GRACE))
                .collect();
            let plan = plan_next_step(&observe(&w), &want, &c);
            match plan.step {
                Step::Converged => {
                    let ids: BTreeSet<i64> = w.config.members.iter().map(|m| m.id).collect();
                    let running_members: BTreeSet<i64> =
                        ids.iter().copied().filter(|id| w.running.contains(id)).collect();
                    // Every desired member is in; members left over are running ones without a
                    // record (kept on purpose).
                    prop_assert!(w.desired.is_subset(&ids));
                    for id in ids.difference(&w.desired) {
                        prop_assert!(w.running.contains(id), "dead member {} left in", id);
                    }
                    // As many voters as can vote, at most 7, odd.
                    let voters = w.config.voter_count();
                    let could_vote = voters + w.config.members.iter()
                        .filter(|m| !m.is_voter() && w.desired.contains(&m.id))
                        .count();
                    prop_assert_eq!(voters, target_voters(could_vote), "voters of {:?}", w.config);
                    prop_assert!(running_members.len() >= voters);
                    return Ok(());
                }
                Step::Reconfig { config, .. } => {
                    check_successor(&w.config, &config).map_err(TestCaseError::fail)?;
                    w.config = config;
                }
                Step::Blocked(Blocked::LostMajority { .. } | Blocked::RemovalWouldLoseMajority { .. }) => {
                    // Only a world that started without a majority may end here.
                    return Ok(());
                }
                other => prop_assert!(false, "step {}: unexpected {:?}", step_no, other),
            }
        }
        prop_assert!(false, "no convergence in 100 steps: {:?}", w.config);
    }
}
