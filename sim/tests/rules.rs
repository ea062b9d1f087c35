//! Wire-level checks and the server's config rules, codes and messages, run against live
//! members (commands in-process through `Cluster::command`, or raw bytes over TCP).

mod common;

use bson::{doc, Bson, Document};
use common::{
    bump_version, config_of, reply_code as code, stable_set, BoxError, TestResult, SETTLE,
};
use replset_sim::wire::{self, crc32c};
use replset_sim::{Cluster, ConfigSource, Event, MemberState};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A message header written by hand (not by the simulator's encoder): length 0 (set once
/// the message is complete), request id `id`, responseTo 0, `op`.
fn raw_header(id: i32, op: i32) -> Vec<u8> {
    [0, id, 0, op]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_op_query_hello_and_checksummed_op_msg() -> TestResult {
    let c = Cluster::start(1).await?;
    let mut s = TcpStream::connect(c.host(0)?).await?;

    // OP_QUERY {isMaster: 1} on admin.$cmd, answered with OP_REPLY.
    let mut q = raw_header(7, wire::OP_QUERY);
    q.extend_from_slice(&0i32.to_le_bytes());
    q.extend_from_slice(b"admin.$cmd\0");
    q.extend_from_slice(&0i32.to_le_bytes());
    q.extend_from_slice(&(-1i32).to_le_bytes());
    doc! {"isMaster": 1, "helloOk": true}.to_writer(&mut q)?;
    let len = q.len() as i32;
    q[..4].copy_from_slice(&len.to_le_bytes());
    s.write_all(&q).await?;
    let mut header = [0u8; 16];
    s.read_exact(&mut header).await?;
    let total = i32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let response_to = i32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let op = i32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    assert_eq!((response_to, op), (7, wire::OP_REPLY));
    let mut rest = vec![0u8; total - 16];
    s.read_exact(&mut rest).await?;
    let reply = Document::from_reader(&rest[20..])?;
    assert!(!reply.get_bool("ismaster")?);
    assert!(reply.get_bool("isreplicaset")?);
    assert_eq!(reply.get_i32("maxWireVersion")?, 21);
    assert!(reply.get_bool("helloOk")?);

    // OP_MSG with a checksum.
    let mut m = raw_header(8, wire::OP_MSG);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.push(0);
    doc! {"ping": 1, "$db": "admin"}.to_writer(&mut m)?;
    let len = (m.len() + 4) as i32;
    m[..4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c(&m);
    m.extend_from_slice(&crc.to_le_bytes());
    s.write_all(&m).await?;
    let (to, body) = wire::read_reply(&mut s).await?;
    assert_eq!(to, 8);
    assert_eq!(body.get_f64("ok")?, 1.0);
    Ok(())
}

/// Polls `commitmentStatus` on member `i` until the current config is committed.
async fn wait_committed(c: &Cluster, i: usize) -> TestResult {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let r = c
            .command_ok(i, doc! {"replSetGetConfig": 1, "commitmentStatus": true})
            .await?;
        if r.get_bool("commitmentStatus")? {
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "config never committed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `replSetReconfig` on member `p` of `base` with the next version and `edit` applied;
/// returns the reply (failed or not).
async fn reconfig_of(
    c: &Cluster,
    p: usize,
    base: &Document,
    edit: impl FnOnce(&mut Document) -> TestResult,
) -> Result<Document, BoxError> {
    let mut cfg = base.clone();
    bump_version(&mut cfg)?;
    edit(&mut cfg)?;
    Ok(c.command(p, doc! {"replSetReconfig": cfg}).await?)
}

/// `r` failed with `code` and an `errmsg` that contains `part`.
fn assert_refused(r: &Document, code_wanted: i32, part: &str) -> TestResult {
    assert_eq!(code(r), Some(code_wanted), "{r:?}");
    assert!(r.get_str("errmsg")?.contains(part), "{r:?}");
    Ok(())
}

/// Sets `field` of member `i` of a config document.
fn set_field(cfg: &mut Document, i: usize, field: &str, value: impl Into<Bson>) -> TestResult {
    match cfg.get_array_mut("members")?.get_mut(i) {
        Some(Bson::Document(m)) => {
            m.insert(field, value);
            Ok(())
        }
        _ => Err(format!("no member {i}").into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfig_validation_codes_and_messages() -> TestResult {
    let (mut c, p) = stable_set(3).await?;
    let base = config_of(&c, p).await?;

    // Eight voters: the count rule, wrapped as 103.
    let r = reconfig_of(&c, p, &base, |cfg| {
        let members = cfg.get_array_mut("members")?;
        for i in 3..8 {
            members.push(Bson::Document(
                doc! {"_id": i, "host": format!("127.0.0.1:{}", 1000 + i), "votes": 1},
            ));
        }
        Ok(())
    })
    .await?;
    assert_refused(
        &r,
        103,
        "voting members, but must be at least 1 and no more than 7",
    )?;

    // Duplicate host.
    let host0 = c.host(0)?.to_string();
    let r = reconfig_of(&c, p, &base, |cfg| {
        cfg.get_array_mut("members")?.push(Bson::Document(
            doc! {"_id": 9, "host": host0, "votes": 0, "priority": 0},
        ));
        Ok(())
    })
    .await?;
    assert_refused(
        &r,
        103,
        "Found two member configurations with same host field",
    )?;

    // A non-voter with a priority: a parse failure, 93.
    let r = reconfig_of(&c, p, &base, |cfg| set_field(cfg, 2, "votes", 0)).await?;
    assert_eq!(code(&r), Some(93), "{r:?}");
    assert_eq!(
        r.get_str("errmsg")?,
        "priority must be 0 when non-voting (votes:0)"
    );

    // arbiterOnly cannot be toggled in place.
    let r = reconfig_of(&c, p, &base, |cfg| set_field(cfg, 2, "arbiterOnly", true)).await?;
    assert_refused(&r, 103, "arbiterOnly field")?;

    // The set name cannot change.
    let r = reconfig_of(&c, p, &base, |cfg| {
        cfg.insert("_id", "other");
        Ok(())
    })
    .await?;
    assert_eq!(code(&r), Some(93), "{r:?}");

    // An unknown field is rejected, as the server's strict IDL parser does.
    let r = reconfig_of(&c, p, &base, |cfg| {
        cfg.insert("bogus", 1);
        Ok(())
    })
    .await?;
    assert_eq!(code(&r), Some(93), "{r:?}");

    // A user may not set newlyAdded.
    let r = reconfig_of(&c, p, &base, |cfg| set_field(cfg, 1, "newlyAdded", true)).await?;
    assert_eq!(code(&r), Some(93), "{r:?}");

    // A force reconfig on a secondary works, jumps the version, and sets term -1.
    c.kill(p)?;
    let s = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    let mut cfg = config_of(&c, s).await?;
    let v = cfg.get_i32("version")?;
    cfg.insert("version", v + 1);
    let keep: Vec<Bson> = cfg
        .get_array("members")?
        .iter()
        .filter(|m| m.as_document().and_then(|d| d.get_str("host").ok()) == c.host(s).ok())
        .cloned()
        .collect();
    cfg.insert("members", keep);
    c.command_ok(s, doc! {"replSetReconfig": cfg, "force": true})
        .await?;
    let after = config_of(&c, s).await?;
    assert!(after.get_i32("version")? >= v + 1 + 10_000, "{after:?}");
    assert_eq!(term_of(&after)?, -1);
    c.wait_for("the forced member to become primary", SETTLE, |c| {
        (c.node(s).ok()?.state() == MemberState::Primary).then_some(())
    })
    .await?;
    assert!(c.history().configs().iter().any(|e| matches!(
        e,
        Event::ConfigInstalled {
            source: ConfigSource::ForceReconfig,
            ..
        }
    )));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_down_hands_over_and_bumps_the_config_term() -> TestResult {
    let (c, p) = stable_set(3).await?;
    c.command_ok(
        p,
        doc! {"insert": "t", "documents": [{"_id": 1}], "$db": "app"},
    )
    .await?;
    let term_before = term_of(&config_of(&c, p).await?)?;
    let r = c
        .command(
            p,
            doc! {"replSetStepDown": 60, "secondaryCatchUpPeriodSecs": 10},
        )
        .await?;
    assert_eq!(r.get_f64("ok")?, 1.0, "{r:?}");
    let new = c
        .wait_for("another primary", SETTLE, |c| {
            c.primary().filter(|&n| n != p)
        })
        .await?;
    // The new primary rewrote the config with its term, version unchanged.
    let after = config_of(&c, new).await?;
    assert!(term_of(&after)? > term_before, "{after:?}");
    // A secondary cannot step down.
    let r = c.command(p, doc! {"replSetStepDown": 60}).await?;
    assert_eq!(code(&r), Some(10107));
    // Status reflects the new primary.
    let st = c.command_ok(new, doc! {"replSetGetStatus": 1}).await?;
    assert_eq!(st.get_i32("myState")?, 1);
    assert_eq!(st.get_i32("votingMembersCount")?, 3);
    assert_eq!(st.get_i32("majorityVoteCount")?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfig_times_out_with_50_then_the_next_gets_308() -> TestResult {
    // As jstests/replsets/reconfig_waits_for_a_majority_to_replicate_config.js: a 2-member
    // set with a long election timeout, the secondary cut off, the quorum check omitted.
    let c = Cluster::start(2).await?;
    let hosts = c.hosts();
    let cfg = doc! {"_id": "rs0", "version": 1, "members": [
        {"_id": 0, "host": hosts[0].clone()},
        {"_id": 1, "host": hosts[1].clone()},
    ], "settings": {"electionTimeoutMillis": 60000}};
    c.command_ok(0, doc! {"replSetInitiate": cfg}).await?;
    // With a 60 s election timeout, ask for the election (ReplSetTest does the same).
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let r = c.command(0, doc! {"replSetStepUp": 1}).await?;
        if r.get_f64("ok")? == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no election: {r:?}");
        // Member 1 may not have the config yet; it gets it on the next heartbeat.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait_for_stable(SETTLE).await?;
    wait_committed(&c, 0).await?;
    c.isolate(1)?;
    c.node(0)?.set_omit_config_quorum_check(true);

    let mut cfg = config_of(&c, 0).await?;
    bump_version(&mut cfg)?;
    let r = c
        .command(0, doc! {"replSetReconfig": cfg, "maxTimeMS": 1000})
        .await?;
    assert_eq!(code(&r), Some(50), "{r:?}");
    let r = c
        .command_ok(0, doc! {"replSetGetConfig": 1, "commitmentStatus": true})
        .await?;
    assert!(!r.get_bool("commitmentStatus")?);

    let mut cfg = config_of(&c, 0).await?;
    bump_version(&mut cfg)?;
    let r = c
        .command(0, doc! {"replSetReconfig": cfg, "maxTimeMS": 1000})
        .await?;
    assert_eq!(code(&r), Some(308), "{r:?}");

    c.heal();
    let mut cfg = config_of(&c, 0).await?;
    bump_version(&mut cfg)?;
    c.command_ok(0, doc! {"replSetReconfig": cfg, "maxTimeMS": 15000})
        .await?;
    let r = c
        .command_ok(0, doc! {"replSetGetConfig": 1, "commitmentStatus": true})
        .await?;
    assert!(r.get_bool("commitmentStatus")?);
    c.node(0)?.set_omit_config_quorum_check(false);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_take_the_config_name_for_themselves() -> TestResult {
    // Members call themselves 127.0.0.1:port; the config names them localhost:port. Each
    // finds itself (isSelf) and answers to the config's name from then on.
    let c = Cluster::start(2).await?;
    let ports: Vec<u16> = (0..2)
        .map(|i| c.node(i).map(|n| n.port()))
        .collect::<Result<_, _>>()?;
    let cfg = doc! {"_id": "rs0", "version": 1, "members": [
        {"_id": 0, "host": format!("localhost:{}", ports[0])},
        {"_id": 1, "host": format!("localhost:{}", ports[1])},
    ]};
    c.command_ok(0, doc! {"replSetInitiate": cfg}).await?;
    c.wait_for("a primary and a secondary", SETTLE, |c| {
        let states: Vec<MemberState> = (0..2)
            .filter_map(|i| c.node(i).ok().map(|n| n.state()))
            .collect();
        (states.contains(&MemberState::Primary) && states.contains(&MemberState::Secondary))
            .then_some(())
    })
    .await?;
    for (i, port) in ports.iter().enumerate() {
        assert_eq!(c.node(i)?.host(), format!("localhost:{port}"));
        let hello = c.command_ok(i, doc! {"hello": 1}).await?;
        assert_eq!(hello.get_str("me")?, format!("localhost:{port}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_restarted_without_data_resyncs_from_the_set() -> TestResult {
    let (mut c, p) = stable_set(3).await?;
    c.command_ok(
        p,
        doc! {"insert": "r", "documents": [{"_id": 1}, {"_id": 2}], "$db": "app", "writeConcern": {"w": 3, "wtimeout": 10000}},
    )
    .await?;
    let s = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    c.restart(s, false).await?;
    // Fresh data directory: uninitialised until a heartbeat brings the config, then
    // STARTUP2 (initial sync) and SECONDARY with the data.
    c.wait_for("the wiped member to resync", SETTLE, |c| {
        let n = c.node(s).ok()?;
        (n.state() == MemberState::Secondary && n.documents("app.r").len() == 2).then_some(())
    })
    .await?;
    let states: Vec<&'static str> = c
        .history()
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::StateChanged { node, state } if node == c.host(s).unwrap_or_default() => {
                Some(state)
            }
            _ => None,
        })
        .collect();
    assert!(states.ends_with(&["STARTUP2", "SECONDARY"]), "{states:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_secondary_takes_over() -> TestResult {
    let (c, _) = stable_set(3).await?;
    let p = c.wait_config_committed(SETTLE).await?;
    let q = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    let mut cfg = config_of(&c, p).await?;
    bump_version(&mut cfg)?;
    let q_host = c.host(q)?.to_string();
    for m in cfg.get_array_mut("members")? {
        if let Bson::Document(m) = m {
            if m.get_str("host") == Ok(q_host.as_str()) {
                m.insert("priority", 2);
            }
        }
    }
    c.command_ok(p, doc! {"replSetReconfig": cfg, "maxTimeMS": 10000})
        .await?;
    c.wait_for("a priority takeover", SETTLE, |c| {
        (c.primary() == Some(q)).then_some(())
    })
    .await?;
    Ok(())
}

/// A config's `term` (an int32, as mongod writes it).
fn term_of(cfg: &Document) -> Result<i64, BoxError> {
    Ok(i64::from(cfg.get_i32("term")?))
}
