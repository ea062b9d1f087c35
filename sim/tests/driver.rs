//! The simulator against the real `mongodb` driver (3.x): discovery, majority writes,
//! failover, the reconfig rules, and rollback.

mod common;

use bson::{doc, Bson, Document};
use common::{
    bump_version as bump, client, code_of, config_of, stable_set, BoxError, TestResult, SETTLE,
};
use mongodb::options::WriteConcern;
use mongodb::Client;
use replset_sim::{Cluster, ConfigSource, Event, MemberState};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connection_handshake_and_initiate() -> TestResult {
    let c = Cluster::start(1).await?;
    let client = client(&c.direct_uri(0)?).await?;
    let admin = client.database("admin");
    admin.run_command(doc! {"ping": 1}).await?;
    let hello = admin.run_command(doc! {"hello": 1}).await?;
    assert_eq!(hello.get_bool("isreplicaset").ok(), Some(true));
    assert!(hello.get("setName").is_none());
    let bi = admin.run_command(doc! {"buildInfo": 1}).await?;
    assert!(bi.get_str("version")?.starts_with("7.0"));

    // Before initiate: NotYetInitialized.
    let e = admin.run_command(doc! {"replSetGetStatus": 1}).await.err();
    assert_eq!(e.as_ref().and_then(code_of), Some(94));

    // Initiate with a version other than 1: every validation failure is code 93.
    let host = c.host(0)?.to_string();
    let bad = doc! {"_id": "rs0", "version": 2, "members": [{"_id": 0, "host": host.clone()}]};
    let e = admin.run_command(doc! {"replSetInitiate": bad}).await.err();
    assert_eq!(e.as_ref().and_then(code_of), Some(93), "{e:?}");
    // A config that does not contain this node.
    let other = doc! {"_id": "rs0", "version": 1, "members": [{"_id": 0, "host": "127.0.0.1:1"}]};
    let e = admin
        .run_command(doc! {"replSetInitiate": other})
        .await
        .err();
    assert_eq!(e.as_ref().and_then(code_of), Some(93), "{e:?}");

    let good = doc! {"_id": "rs0", "version": 1, "members": [{"_id": 0, "host": host.clone()}]};
    admin
        .run_command(doc! {"replSetInitiate": good.clone()})
        .await?;
    let e = admin
        .run_command(doc! {"replSetInitiate": good})
        .await
        .err();
    assert_eq!(e.as_ref().and_then(code_of), Some(23));
    c.wait_for_primary(SETTLE).await?;

    let cfg = admin.run_command(doc! {"replSetGetConfig": 1}).await?;
    let cfg = cfg.get_document("config")?;
    assert_eq!(cfg.get_i32("version")?, 1);
    assert!(cfg
        .get_document("settings")?
        .get_object_id("replicaSetId")
        .is_ok());
    let status = admin.run_command(doc! {"replSetGetStatus": 1}).await?;
    assert_eq!(status.get_i32("myState")?, 1);
    assert_eq!(status.get_i32("majorityVoteCount")?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_write_survives_primary_kill() -> TestResult {
    let (mut c, _) = stable_set(3).await?;
    let client = client(&c.uri()).await?;
    let coll = client.database("app").collection::<Document>("items");
    let wc = WriteConcern::builder()
        .w(mongodb::options::Acknowledgment::Majority)
        .w_timeout(Duration::from_secs(10))
        .build();
    coll.insert_one(doc! {"_id": 1, "v": "kept"})
        .write_concern(wc.clone())
        .await?;

    // The driver discovered every member.
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await?;
    assert_eq!(hello.get_array("hosts")?.len(), 3);

    let old = c.primary().ok_or("no primary")?;
    c.kill(old)?;
    let new = c
        .wait_for("a new primary", Duration::from_secs(10), |c| {
            c.primary().filter(|&p| p != old)
        })
        .await?;
    assert_ne!(new, old);

    let found = coll.find_one(doc! {"_id": 1}).await?;
    assert_eq!(
        found.and_then(|d| d.get_str("v").ok().map(str::to_string)),
        Some("kept".into())
    );
    // And the new primary takes writes.
    coll.insert_one(doc! {"_id": 2}).write_concern(wc).await?;
    assert_eq!(coll.count_documents(doc! {}).await?, 2);

    // The old primary comes back as a secondary and catches up.
    c.restart(old, true).await?;
    c.wait_for("the old primary to catch up", SETTLE, |c| {
        let n = c.node(old).ok()?;
        (n.state() == MemberState::Secondary && n.documents("app.items").len() == 2).then_some(())
    })
    .await?;
    let elections = c.history().elections();
    assert!(elections.len() >= 2, "{}", c.history().render());
    Ok(())
}

async fn reconfig(client: &Client, cfg: Document) -> Result<Document, mongodb::error::Error> {
    reconfig_within(client, cfg, 5000).await
}

/// `replSetReconfig` with `maxTimeMS: ms`.
async fn reconfig_within(
    client: &Client,
    cfg: Document,
    ms: i32,
) -> Result<Document, mongodb::error::Error> {
    client
        .database("admin")
        .run_command(doc! {"replSetReconfig": cfg, "maxTimeMS": ms})
        .await
}

/// The current config with its version raised by one: the base of the next reconfig.
async fn next_config(client: &Client) -> Result<Document, BoxError> {
    let mut cfg = current_config(client).await?;
    bump(&mut cfg)?;
    Ok(cfg)
}

async fn current_config(client: &Client) -> Result<Document, BoxError> {
    let r = client
        .database("admin")
        .run_command(doc! {"replSetGetConfig": 1})
        .await?;
    Ok(r.get_document("config")?.clone())
}

fn set_member(cfg: &mut Document, idx: usize, f: impl Fn(&mut Document)) -> TestResult {
    let members = cfg.get_array_mut("members")?;
    if let Some(Bson::Document(m)) = members.get_mut(idx) {
        f(m);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voting_changes_one_at_a_time() -> TestResult {
    // Member 0 votes; 1 and 2 start as non-voters.
    let c = Cluster::start(3).await?;
    let hosts = c.hosts();
    let cfg = doc! {"_id": "rs0", "version": 1, "members": [
        {"_id": 0, "host": hosts[0].clone()},
        {"_id": 1, "host": hosts[1].clone(), "votes": 0, "priority": 0},
        {"_id": 2, "host": hosts[2].clone(), "votes": 0, "priority": 0},
    ]};
    c.command_ok(0, doc! {"replSetInitiate": cfg}).await?;
    c.wait_for_stable(SETTLE).await?;
    let client = client(&c.direct_uri(0)?).await?;

    // Two votes at once: 103 with the server's message.
    let mut cfg = next_config(&client).await?;
    for i in [1, 2] {
        set_member(&mut cfg, i, |m| {
            m.insert("votes", 1);
            m.insert("priority", 1);
        })?;
    }
    let e = reconfig(&client, cfg)
        .await
        .err()
        .ok_or("reconfig should fail")?;
    assert_eq!(code_of(&e), Some(103), "{e:?}");
    assert!(
        e.to_string()
            .contains("can only add or remove at most 1 voting member"),
        "{e}"
    );

    // One at a time works, each committed before the next.
    for i in [1, 2] {
        let mut cfg = next_config(&client).await?;
        set_member(&mut cfg, i, |m| {
            m.insert("votes", 1);
            m.insert("priority", 1);
        })?;
        reconfig(&client, cfg).await?;
        c.wait_for("config commitment", SETTLE, |c| {
            let n = c.node(0).ok()?;
            let st = n.config()?;
            (st.voters().count() == i + 1).then_some(())
        })
        .await?;
        let r = client
            .database("admin")
            .run_command(doc! {"replSetGetConfig": 1, "commitmentStatus": true})
            .await?;
        let _ = r.get_bool("commitmentStatus")?;
    }

    // Version must grow.
    let cfg = current_config(&client).await?;
    let e = reconfig(&client, cfg)
        .await
        .err()
        .ok_or("same version should fail")?;
    assert_eq!(code_of(&e), Some(103), "{e:?}");

    // Every config a primary installed differs from the previous by at most one voter.
    let configs = c.history().configs();
    let voter_sets: Vec<Vec<i64>> = configs
        .iter()
        .filter_map(|e| match e {
            Event::ConfigInstalled { voters, source, .. } if *source != ConfigSource::Heartbeat => {
                Some(voters.clone())
            }
            _ => None,
        })
        .collect();
    assert!(voter_sets.len() >= 3, "{}", c.history().render());
    for w in voter_sets.windows(2) {
        let a: std::collections::HashSet<_> = w[0].iter().collect();
        let b: std::collections::HashSet<_> = w[1].iter().collect();
        assert!(
            a.symmetric_difference(&b).count() <= 1,
            "{:?} -> {:?}",
            w[0],
            w[1]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfig_before_commit_fails_with_308() -> TestResult {
    // As jstests/replsets/reconfig_waits_for_oplog_commitment_condition.js: with replication
    // stopped on the secondaries, a write is not majority-committed, so the config installed
    // after it is not committed either, and the next reconfig times out with 308.
    let (c, _) = stable_set(3).await?;
    let p = c.primary().ok_or("no primary")?;
    let client = client(&c.direct_uri(p)?).await?;
    let secondaries: Vec<usize> = (0..3).filter(|&i| i != p).collect();
    c.wait_for("first config committed", SETTLE, |c| {
        let n = c.node(p).ok()?;
        (n.commit_point().t >= 1).then_some(())
    })
    .await?;
    for &s in &secondaries {
        c.node(s)?.set_replication_stopped(true);
    }
    client
        .database("app")
        .collection::<Document>("c")
        .insert_one(doc! {"_id": 1})
        .write_concern(WriteConcern::nodes(1))
        .await?;
    let cfg = next_config(&client).await?;
    reconfig_within(&client, cfg, 10000).await?;
    let r = client
        .database("admin")
        .run_command(doc! {"replSetGetConfig": 1, "commitmentStatus": true})
        .await?;
    assert!(!r.get_bool("commitmentStatus")?);

    let cfg = next_config(&client).await?;
    let e = reconfig_within(&client, cfg, 1000)
        .await
        .err()
        .ok_or("reconfig should fail")?;
    assert_eq!(code_of(&e), Some(308), "{e:?}");

    // A secondary refuses a non-force reconfig with 10107.
    let cfg = next_config(&client).await?;
    let r = c
        .command(secondaries[0], doc! {"replSetReconfig": cfg})
        .await?;
    assert_eq!(r.get_i32("code").ok(), Some(10107), "{r:?}");

    // Once replication resumes the config commits and reconfigs work again.
    for &s in &secondaries {
        c.node(s)?.set_replication_stopped(false);
    }
    let cfg = next_config(&client).await?;
    reconfig_within(&client, cfg, 15000).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_write_on_isolated_primary_is_rolled_back() -> TestResult {
    let (c, _) = stable_set(3).await?;
    let client = client(&c.uri()).await?;
    let coll = client.database("app").collection::<Document>("rb");
    coll.insert_one(doc! {"_id": "committed"})
        .write_concern(WriteConcern::majority())
        .await?;
    let old = c.primary().ok_or("no primary")?;
    let direct = client_direct(&c, old).await?;
    c.isolate(old)?;
    // The isolated primary still accepts a w:1 write from a client on its side.
    direct
        .database("app")
        .collection::<Document>("rb")
        .insert_one(doc! {"_id": "lost"})
        .write_concern(WriteConcern::nodes(1))
        .await?;
    // The majority side elects another primary; the old one steps down.
    let new = c
        .wait_for("a primary on the majority side", SETTLE, |c| {
            (0..3).find(|&i| i != old && c.node(i).is_ok_and(|n| n.state() == MemberState::Primary))
        })
        .await?;
    c.heal();
    c.wait_for("rollback on the old primary", SETTLE, |c| {
        let n = c.node(old).ok()?;
        let docs = n.documents("app.rb");
        (n.state() == MemberState::Secondary && docs.len() == 1).then_some(())
    })
    .await?;
    let rolled = c.history().rollbacks();
    assert!(
        rolled
            .iter()
            .any(|(node, entries)| node == c.host(old).unwrap_or_default()
                && entries.iter().any(|e| e
                    .get_document("o")
                    .is_ok_and(|o| o.get_str("_id") == Ok("lost")))),
        "{}",
        c.history().render()
    );
    let new_docs = c.node(new)?.documents("app.rb");
    assert_eq!(new_docs.len(), 1);
    assert_eq!(new_docs[0].get_str("_id")?, "committed");
    Ok(())
}

async fn client_direct(c: &Cluster, i: usize) -> Result<Client, BoxError> {
    Ok(client(&c.direct_uri(i)?).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_is_newly_added_until_caught_up_and_removed_member_reports_removed() -> TestResult
{
    let mut c = Cluster::start(1).await?;
    c.initiate().await?;
    c.wait_for_primary(SETTLE).await?;
    c.command_ok(
        0,
        doc! {"insert": "x", "documents": [{"_id": 1}], "$db": "app"},
    )
    .await?;
    let added = c.add_member().await?;
    let mut cfg = config_of(&c, 0).await?;
    bump(&mut cfg)?;
    cfg.get_array_mut("members")?.push(Bson::Document(
        doc! {"_id": 1, "host": c.host(added)?.to_string()},
    ));
    c.command_ok(0, doc! {"replSetReconfig": cfg, "maxTimeMS": 10000})
        .await?;
    // The primary marked it newlyAdded, then removed the field once it was SECONDARY.
    c.wait_for("newlyAdded removal", SETTLE, |c| {
        c.history()
            .configs()
            .iter()
            .any(|e| matches!(e, Event::ConfigInstalled { source: ConfigSource::NewlyAddedRemoval, voters, .. } if voters.len() == 2))
            .then_some(())
    })
    .await?;
    let first_with_member = c.history().configs().into_iter().find_map(|e| match e {
        Event::ConfigInstalled {
            config,
            source: ConfigSource::Reconfig,
            ..
        } => Some(config),
        _ => None,
    });
    let newly = first_with_member
        .as_ref()
        .and_then(|cfg| cfg.get_array("members").ok())
        .and_then(|m| m.get(1))
        .and_then(|m| m.as_document())
        .and_then(|m| m.get_bool("newlyAdded").ok());
    assert_eq!(newly, Some(true));
    assert_eq!(c.node(added)?.documents("app.x").len(), 1);

    // Remove it again (one voter at a time): it reports REMOVED.
    c.wait_for("commit", SETTLE, |c| {
        let r = c.node(0).ok()?;
        (r.config()?.voters().count() == 2).then_some(())
    })
    .await?;
    let mut cfg = config_of(&c, 0).await?;
    bump(&mut cfg)?;
    cfg.get_array_mut("members")?.truncate(1);
    c.command_ok(0, doc! {"replSetReconfig": cfg, "maxTimeMS": 10000})
        .await?;
    c.wait_for("REMOVED", SETTLE, |c| {
        (c.node(added).ok()?.state() == MemberState::Removed).then_some(())
    })
    .await?;
    Ok(())
}
