//! replSetGetStatus's fields, replSetFreeze, replSetMaintenance, an unsatisfiable `w`, and the
//! `$clusterTime` / `operationTime` of every reply, against live members.

mod common;

use bson::{doc, Bson, Document};
use common::{stable_set, TestResult, SETTLE};
use replset_sim::{Cluster, MemberState};
use std::time::{Duration, Instant};

fn member<'a>(status: &'a Document, host: &str) -> Option<&'a Document> {
    status
        .get_array("members")
        .ok()?
        .iter()
        .find_map(|m| match m {
            Bson::Document(d) if d.get_str("name").ok() == Some(host) => Some(d),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_uptime_heartbeats_received_and_election_time() -> TestResult {
    let mut c = Cluster::start(3).await?;
    // rs.initiate() without a version: mongod fills in version 1.
    let members: Vec<Bson> = c
        .hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| Bson::Document(doc! {"_id": i as i32, "host": h}))
        .collect();
    c.command_ok(
        0,
        doc! {"replSetInitiate": {"_id": c.set_name(), "members": members}},
    )
    .await?;
    let p = c.wait_for_stable(SETTLE).await?;
    let conf = c.command_ok(p, doc! {"replSetGetConfig": 1}).await?;
    let conf = conf.get_document("config")?;
    assert_eq!(conf.get_i32("version")?, 1);
    assert!(matches!(conf.get("term"), Some(Bson::Int32(_))), "{conf}");
    let settings = conf.get_document("settings")?;
    for k in ["heartbeatIntervalMillis", "electionTimeoutMillis"] {
        assert!(
            matches!(settings.get(k), Some(Bson::Int32(_))),
            "{k}: {settings}"
        );
    }

    let other = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    let other_host = c.host(other)?.to_string();
    let primary_host = c.host(p)?.to_string();
    // Uptime of another member counts from when heartbeats to it began to succeed.
    let deadline = Instant::now() + SETTLE;
    let status = loop {
        let s = c.command_ok(p, doc! {"replSetGetStatus": 1}).await?;
        let up = member(&s, &other_host).and_then(|m| m.get_i32("uptime").ok());
        if up.is_some_and(|u| u >= 1) {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!("uptime of {other_host} stays below 1: {s}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let me = member(&status, &primary_host).ok_or("no self entry")?;
    assert!(matches!(me.get("uptime"), Some(Bson::Int32(_))));
    assert!(matches!(me.get("configTerm"), Some(Bson::Int32(_))));
    assert!(
        matches!(me.get("electionTime"), Some(Bson::Timestamp(_))),
        "{me}"
    );
    assert!(matches!(
        status.get("$clusterTime"),
        Some(Bson::Document(_))
    ));
    assert!(matches!(
        status.get("operationTime"),
        Some(Bson::Timestamp(_))
    ));
    // A secondary reports the primary's election time from its heartbeats.
    let s = c.command_ok(other, doc! {"replSetGetStatus": 1}).await?;
    let seen = member(&s, &primary_host).ok_or("no primary entry")?;
    assert_eq!(seen.get("electionTime"), me.get("electionTime"));

    // lastHeartbeatRecv of a dead member stops; lastHeartbeat keeps going.
    c.kill(other)?;
    let recv_of = |s: &Document| {
        member(s, &other_host).and_then(|m| m.get_datetime("lastHeartbeatRecv").ok().copied())
    };
    let sent_of = |s: &Document| {
        member(s, &other_host).and_then(|m| m.get_datetime("lastHeartbeat").ok().copied())
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = c.command_ok(p, doc! {"replSetGetStatus": 1}).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = c.command_ok(p, doc! {"replSetGetStatus": 1}).await?;
    assert!(recv_of(&before).is_some_and(|d| d.timestamp_millis() > 0));
    assert_eq!(recv_of(&before), recv_of(&after));
    assert!(sent_of(&after) > sent_of(&before), "{after}");
    let dead = member(&after, &other_host).ok_or("no entry")?;
    assert_eq!(dead.get_i32("uptime")?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w_above_the_data_bearing_members_fails_at_once_with_100() -> TestResult {
    let (c, p) = stable_set(3).await?;
    let started = Instant::now();
    let r = c
        .command_ok(
            p,
            doc! {"insert": "t", "documents": [{"x": 1}], "writeConcern": {"w": 4}, "$db": "test"},
        )
        .await?;
    let wce = r.get_document("writeConcernError")?;
    assert_eq!(wce.get_i32("code")?, 100);
    assert_eq!(wce.get_str("codeName")?, "UnsatisfiableWriteConcern");
    assert!(started.elapsed() < Duration::from_secs(2));
    // w equal to the data-bearing members is waited for and satisfied.
    let r = c
        .command_ok(
            p,
            doc! {"insert": "t", "documents": [{"x": 2}], "writeConcern": {"w": 3}, "$db": "test"},
        )
        .await?;
    assert!(!r.contains_key("writeConcernError"), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_and_maintenance_follow_the_server() -> TestResult {
    let (c, p) = stable_set(3).await?;
    let s = (0..3).find(|&i| i != p).ok_or("no secondary")?;

    let r = c.command(p, doc! {"replSetFreeze": 30}).await?;
    assert_eq!(r.get_i32("code")?, 95, "{r}");
    let r = c.command(p, doc! {"replSetMaintenance": true}).await?;
    assert_eq!(r.get_i32("code")?, 95, "{r}");

    let r = c.command_ok(s, doc! {"replSetFreeze": 1}).await?;
    assert!(r.contains_key("warning"));
    let r = c.command_ok(s, doc! {"replSetFreeze": 0}).await?;
    assert_eq!(r.get_str("info")?, "unfreezing");

    // A frozen secondary does not stand: freeze both, step the primary down; none is
    // elected until one is unfrozen.
    let others: Vec<usize> = (0..3).filter(|&i| i != p).collect();
    for &i in &others {
        c.command_ok(i, doc! {"replSetFreeze": 60}).await?;
    }
    c.command_ok(p, doc! {"replSetStepDown": 60, "force": true})
        .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.primary(), None);
    c.command_ok(others[0], doc! {"replSetFreeze": 0}).await?;
    let np = c.wait_for_primary(SETTLE).await?;
    assert_eq!(np, others[0]);

    let s = others[1];
    c.command_ok(s, doc! {"replSetMaintenance": true}).await?;
    c.command_ok(s, doc! {"replSetMaintenance": true}).await?;
    assert_eq!(c.node(s)?.state(), MemberState::Recovering);
    c.command_ok(s, doc! {"replSetMaintenance": false}).await?;
    assert_eq!(c.node(s)?.state(), MemberState::Recovering);
    c.command_ok(s, doc! {"replSetMaintenance": false}).await?;
    assert_eq!(c.node(s)?.state(), MemberState::Secondary);
    let r = c.command(s, doc! {"replSetMaintenance": false}).await?;
    assert_eq!(r.get_i32("code")?, 96, "{r}");
    Ok(())
}

/// rs.addArb as mongod 5.0+ takes it: refused with 103 while it would change the implicit
/// default write concern and no cluster-wide default is set; accepted once one is, even with
/// the arbiter unreachable, and the set's next reconfig is not held up by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_arbiter_needs_a_cluster_wide_write_concern_and_never_blocks_the_next_reconfig(
) -> TestResult {
    let c = Cluster::start(3).await?;
    c.initiate().await?;
    let p = c.wait_config_committed(SETTLE).await?;
    let unreachable = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    );
    let with_arbiter = |cfg: &Document| -> Result<Document, common::BoxError> {
        let mut cfg = cfg.clone();
        let mut members = cfg.get_array("members")?.clone();
        members.push(Bson::Document(
            doc! {"_id": 3, "host": unreachable.clone(), "arbiterOnly": true},
        ));
        cfg.insert("members", members);
        cfg.insert("version", cfg.get_i32("version")? + 1);
        Ok(cfg)
    };
    let cfg = c.command_ok(p, doc! {"replSetGetConfig": 1}).await?;
    let cfg = cfg.get_document("config")?.clone();

    let r = c
        .command(p, doc! {"replSetReconfig": with_arbiter(&cfg)?})
        .await?;
    assert_eq!(r.get_i32("code")?, 103, "{r}");
    assert!(
        r.get_str("errmsg")?
            .contains("would change the implicit default write concern"),
        "{r}"
    );

    let d = c.command_ok(p, doc! {"getDefaultRWConcern": 1}).await?;
    assert_eq!(d.get_str("defaultWriteConcernSource")?, "implicit");
    c.command_ok(
        p,
        doc! {"setDefaultRWConcern": 1, "defaultWriteConcern": {"w": 1}},
    )
    .await?;
    let d = c.command_ok(p, doc! {"getDefaultRWConcern": 1}).await?;
    assert_eq!(d.get_str("defaultWriteConcernSource")?, "global");
    assert_eq!(d.get_document("defaultWriteConcern")?.get_i32("w")?, 1);

    c.command_ok(p, doc! {"replSetReconfig": with_arbiter(&cfg)?})
        .await?;
    // The arbiter votes at once (no newlyAdded), and the config commits without it.
    let now = c
        .command_ok(
            p,
            doc! {"replSetGetConfig": 1, "$_internalIncludeNewlyAdded": true},
        )
        .await?;
    let now = now.get_document("config")?.clone();
    let arb = now
        .get_array("members")?
        .iter()
        .filter_map(|m| m.as_document())
        .find(|m| m.get_i32("_id").ok() == Some(3))
        .ok_or("no arbiter in the config")?;
    assert!(!arb.contains_key("newlyAdded"), "{arb}");
    let p = c.wait_config_committed(SETTLE).await?;
    let mut next = now.clone();
    next.remove("newlyAdded");
    next.insert("version", now.get_i32("version")? + 1);
    c.command_ok(p, doc! {"replSetReconfig": next, "maxTimeMS": 10_000})
        .await?;
    Ok(())
}

/// A member restarted without its data spends the initial sync's time in STARTUP2 (the
/// simulator's pace: a floor, or a time per MB copied), then is SECONDARY with the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_member_stays_in_startup2_while_it_copies() -> TestResult {
    let floor = Duration::from_millis(1500);
    let template = replset_sim::NodeOptions {
        initial_sync: replset_sim::node::InitialSyncPace {
            floor,
            per_mb: Duration::from_secs(60),
        },
        ..replset_sim::NodeOptions::default()
    };
    // 60 s per MB: the floor decides for a few small documents, the size for 1 MB.
    assert_eq!(template.initial_sync.duration(1024), floor);
    assert_eq!(
        template.initial_sync.duration(1024 * 1024),
        Duration::from_secs(60)
    );
    let mut c = Cluster::start_with(3, template).await?;
    c.initiate().await?;
    let p = c.wait_for_stable(SETTLE).await?;
    for i in 0..20 {
        c.command_ok(
            p,
            doc! {"insert": "t", "documents": [{"_id": i}], "$db": "test"},
        )
        .await?;
    }
    let s = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    c.restart(s, false).await?;
    // Once it has copied data it is still in STARTUP2 ...
    let copying_since = c
        .wait_for("the emptied member copying", SETTLE, |c| {
            let n = c.node(s).ok()?;
            (n.state() == MemberState::Startup2 && n.documents("test.t").len() == 20)
                .then(Instant::now)
        })
        .await?;
    let status = c.command_ok(s, doc! {"replSetGetStatus": 1}).await?;
    assert_eq!(status.get_i32("myState")?, 5, "{status}");
    // ... until the floor has passed, then SECONDARY.
    c.wait_for("the member SECONDARY", SETTLE, |c| {
        (c.node(s).ok()?.state() == MemberState::Secondary).then_some(())
    })
    .await?;
    let took = copying_since.elapsed();
    assert!(
        took >= floor - Duration::from_millis(200),
        "SECONDARY after {took:?} of copying"
    );
    Ok(())
}
