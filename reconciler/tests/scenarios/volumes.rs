//! Finding 9 of docs/reliability.md against the real store: swarm places a member's new task
//! on a node whose volume an earlier task left there.

use std::collections::BTreeSet;
use std::time::Duration;

use backend_core::NextKind;
use mongodb::options::{Acknowledgment, ReadConcern, WriteConcern};
use replset_sim::node::InitialSyncPace;
use replset_sim::{Cluster, MemberState, NodeOptions};
use test_support::wait_for;

use super::{
    converged_status, installed, read_status, set_of_three_with_data, Backend, Harness, CONVERGE,
};

/// How many documents [`set_of_three_with_data`] writes before the move.
const BEFORE: i32 = 5;
/// How many more the primary and the member about to move acknowledge.
const AFTER: i32 = 20;

/// The volume holds the set's config (it has not changed since) and data older than what the
/// member acknowledged since. Kept as a voter, it and a member that lagged could elect one of
/// them while the primary is away, and the primary's acknowledged writes would be rolled back
/// when it returns. The reconciler moves it without a vote (its data stops short of the
/// primary's commit point); with the primary gone the set then waits for it, and every
/// acknowledged write is there at the end.
pub async fn a_member_moved_onto_an_older_volume_gets_no_vote_and_no_write_is_lost(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    set_of_three_with_data(&cluster, &h, BEFORE).await;
    let primary = cluster.wait_for_stable(CONVERGE).await.expect("a primary");
    let others: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
    let (moved, lagging) = (others[0], others[1]);
    let slot = |i: usize| i as i64 + 1;

    // What the member about to move has now: the volume it leaves behind on a node.
    let old_volume = cluster.node(moved).expect("a member").durable();
    // The third member falls behind; the writes below are acknowledged by the primary and the
    // member about to move.
    cluster
        .node(lagging)
        .expect("a member")
        .set_replication_stopped(true);
    write_more(&cluster).await;

    // The member's task is replaced and lands on the node with the old volume; it catches up
    // slowly (its replication stopped, as a member far behind would be).
    cluster
        .restart_elsewhere_with(moved, old_volume)
        .await
        .expect("restart");
    cluster
        .node(moved)
        .expect("a member")
        .set_replication_stopped(true);
    let new_host = cluster.host(moved).expect("host").to_string();
    h.publish(slot(moved) as u64, &new_host).await;
    let config = wait_for("the member moved to its new host", CONVERGE, || async {
        match installed(&cluster).pop() {
            Some(c) if c.members().get(&slot(moved)) == Some(&new_host) => Ok(c),
            _ => Err("not moved yet".to_string()),
        }
    })
    .await;
    assert!(
        !config.voters.contains(&slot(moved)),
        "the member on the old volume kept its vote: {:?}\n{}",
        config.voters,
        cluster.history().render()
    );
    wait_for("every member to hold that config", CONVERGE, || async {
        let mut versions = Vec::new();
        for i in [moved, lagging] {
            let hello = cluster
                .command(i, bson::doc! {"hello": 1})
                .await
                .map_err(|e| e.to_string())?;
            versions.push(hello.get_i32("setVersion").map(i64::from).unwrap_or(0));
        }
        if versions.iter().all(|&v| v == config.version) {
            Ok(())
        } else {
            Err(format!("versions {versions:?}"))
        }
    })
    .await;

    // The primary goes away. The two others hold none of the last writes: they must not elect.
    cluster.kill(primary).expect("kill");
    wait_for(
        "the set without its primary: waiting, or a primary elected",
        CONVERGE,
        || async {
            if cluster.primary().is_some() {
                return Ok(());
            }
            let s = read_status(&h, &set).await?;
            if s.next.kind == NextKind::Blocked && s.next.reason == "lost_majority" {
                Ok(())
            } else {
                Err(format!("{:?}", s.next))
            }
        },
    )
    .await;
    assert_eq!(
        cluster.primary(),
        None,
        "a member without the last writes was elected\n{}",
        cluster.history().render()
    );

    // It comes back; the others catch up; the set converges with every write.
    cluster.restart(primary, true).await.expect("restart");
    for i in [moved, lagging] {
        cluster
            .node(i)
            .expect("a member")
            .set_replication_stopped(false);
    }
    let ids: BTreeSet<i64> = (1..=3).collect();
    wait_for("converged with 3 voters", CONVERGE, || async {
        let s = converged_status(&h, &cluster, &set, &ids).await?;
        match installed(&cluster).pop() {
            Some(c) if c.voters.len() == 3 => Ok(s),
            other => Err(format!("voters {:?}", other.map(|c| c.voters))),
        }
    })
    .await;
    assert_all_there(&cluster).await;
}

/// Every task replaced at once (a whole restart), two of them onto volumes that earlier tasks
/// left: those hold the last config and data older than what the set acknowledged. They are a
/// majority of the voters, but re-addressing them could elect one of them and lose the writes
/// of the member still missing. The commit point the last leader saw is in the store (the
/// set's identity), so a new leader waits for that member, re-addresses on it once it is back,
/// and every acknowledged write is there at the end.
pub async fn a_whole_restart_onto_older_volumes_waits_for_the_member_with_the_writes(b: Backend) {
    let mut cluster = Cluster::start(3).await.expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    set_of_three_with_data(&cluster, &h, BEFORE).await;
    let primary = cluster.wait_for_stable(CONVERGE).await.expect("a primary");
    let stale: Vec<usize> = (0..3).filter(|&i| i != primary).collect();
    let old_volumes: Vec<_> = stale
        .iter()
        .map(|&i| cluster.node(i).expect("a member").durable())
        .collect();
    write_more(&cluster).await;
    let committed = cluster.node(primary).expect("a member").commit_point();
    let committed = replset_reconciler::OpTime {
        term: committed.t,
        ts: (committed.ts.time, committed.ts.increment),
    };
    wait_for("the commit point in the identity", CONVERGE, || async {
        let i = super::read_identity(&h, &set).await?;
        match i.commit_point.map(replset_reconciler::OpTime::from) {
            Some(c) if c >= committed => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // A new leader, remembering nothing but what the store holds.
    let layout = h.layout.clone();
    drop(h);
    let h = Harness::start_as(b, &set, layout, "second").await;

    // Every task replaced: the two onto the old volumes, the primary's still pending.
    for i in 0..3 {
        cluster.kill(i).expect("kill");
    }
    for (&i, volume) in stale.iter().zip(old_volumes) {
        cluster
            .restart_elsewhere_with(i, volume)
            .await
            .expect("restart");
        h.publish(i as u64 + 1, cluster.host(i).expect("host"))
            .await;
    }
    let refused = wait_for("re-addressing to wait", CONVERGE, || async {
        let s = read_status(&h, &set).await?;
        if s.next.reason == "readdress_behind_committed" {
            Ok(s)
        } else {
            Err(format!("{:?}", s.next))
        }
    })
    .await;
    assert_eq!(refused.next.kind, NextKind::Blocked);
    assert_eq!(cluster.primary(), None, "{}", cluster.history().render());

    // The missing task starts on its own node, with its volume.
    cluster
        .restart_elsewhere(primary, true)
        .await
        .expect("restart");
    h.publish(primary as u64 + 1, cluster.host(primary).expect("host"))
        .await;
    let ids: BTreeSet<i64> = (1..=3).collect();
    wait_for("converged at the new addresses", CONVERGE, || {
        converged_status(&h, &cluster, &set, &ids)
    })
    .await;
    assert_all_there(&cluster).await;
}

/// [`AFTER`] more documents, `w: "majority"`, through the replica-set URI.
async fn write_more(cluster: &Cluster) {
    let client = mongodb::Client::with_uri_str(cluster.uri())
        .await
        .expect("client");
    let coll = client
        .database("app")
        .collection::<bson::Document>("orders");
    let majority = WriteConcern::builder().w(Acknowledgment::Majority).build();
    for i in BEFORE + 1..=BEFORE + AFTER {
        coll.insert_one(bson::doc! {"_id": i, "item": format!("item {i}")})
            .write_concern(majority.clone())
            .await
            .expect("majority write");
    }
}

/// Every document written before and after is there, read with read concern majority
/// through the members' addresses now.
async fn assert_all_there(cluster: &Cluster) {
    assert_all_there_of(cluster, BEFORE + AFTER).await;
}

/// The `n` documents written are there, read with read concern majority.
async fn assert_all_there_of(cluster: &Cluster, n: i32) {
    let client = mongodb::Client::with_uri_str(cluster.uri())
        .await
        .expect("client");
    let found = client
        .database("app")
        .collection::<bson::Document>("orders")
        .count_documents(bson::doc! {})
        .read_concern(ReadConcern::majority())
        .await
        .expect("count");
    assert_eq!(found, n as u64, "every acknowledged write is still there");
}

/// A member's task comes back empty at the very address it had (swarm reused the address): it
/// initial-syncs (STARTUP2), and MongoDB lets it vote meanwhile, for any candidate, since its
/// oplog is empty. The reconciler takes its vote while it syncs and gives it back once it is
/// SECONDARY, one voter per config.
pub async fn a_member_back_empty_at_its_address_has_no_vote_while_it_syncs(b: Backend) {
    let template = NodeOptions {
        initial_sync: InitialSyncPace {
            floor: Duration::from_secs(5),
            per_mb: Duration::from_millis(50),
        },
        ..NodeOptions::default()
    };
    let mut cluster = Cluster::start_with(3, template)
        .await
        .expect("simulated members");
    let set = cluster.set_name().to_string();
    let h = Harness::start(b, &set).await;
    set_of_three_with_data(&cluster, &h, BEFORE).await;
    let primary = cluster.wait_for_stable(CONVERGE).await.expect("a primary");
    let empty = (0..3).find(|&i| i != primary).expect("a secondary");
    let id = empty as i64 + 1;
    cluster.restart(empty, false).await.expect("restart empty");
    wait_for("its vote taken while it syncs", CONVERGE, || async {
        let state = cluster.node(empty).map(|n| n.state()).ok();
        match installed(&cluster).pop() {
            Some(c) if !c.voters.contains(&id) && state == Some(MemberState::Startup2) => Ok(()),
            other => Err(format!("{state:?}, voters {:?}", other.map(|c| c.voters))),
        }
    })
    .await;
    let ids: BTreeSet<i64> = (1..=3).collect();
    wait_for("its vote back once synced", CONVERGE, || async {
        let s = converged_status(&h, &cluster, &set, &ids).await?;
        match installed(&cluster).pop() {
            Some(c) if c.voters.len() == 3 => Ok(s),
            other => Err(format!("voters {:?}", other.map(|c| c.voters))),
        }
    })
    .await;
    super::assert_one_voter_at_a_time(&cluster);
    assert_all_there_of(&cluster, BEFORE).await;
}
