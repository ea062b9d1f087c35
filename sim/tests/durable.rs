//! `--dbpath` with the `replset-sim` binary: SIGKILL of every member in the middle of
//! `w: "majority"` writes, restart, and every acknowledged write is there; a member restarted
//! at its address rejoins without a reconfig, one restarted at a new address is REMOVED as
//! mongod reports it; a locked, missing or corrupt dbpath is refused at start.

mod common;

use bson::{doc, Bson, Document};
use common::{
    command_error, command_eventually, direct, eventually, free_port, initiate_hosts,
    loopback_hosts, member_command, member_fields, sigkill, BoxError, TempDir, TestResult,
};
use mongodb::options::{ClientOptions, ReadConcern, WriteConcern};
use mongodb::Client;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Child;
use tokio::time::Instant;

/// A durable member on `dbpath`; its stderr is kept for the test to read.
fn spawn(port: u16, dbpath: &Path, set: &str) -> std::io::Result<Child> {
    member_command(port, set)
        .arg("--dbpath")
        .arg(dbpath)
        .stderr(Stdio::piped())
        .spawn()
}

/// Durable members on `dirs`, initiated as one set; returns them and their ports.
async fn durable_set(set: &str, dirs: &[TempDir]) -> Result<(Vec<Child>, Vec<u16>), BoxError> {
    let mut ports = Vec::new();
    let mut children = Vec::new();
    for d in dirs {
        let p = free_port()?;
        children.push(spawn(p, d.path(), set)?);
        ports.push(p);
    }
    initiate_hosts(set, &loopback_hosts(&ports)).await?;
    Ok((children, ports))
}

/// A client of the set at `hosts` (`replicaSet=`), with `w` as its write concern.
async fn set_client(
    hosts: &[String],
    set: &str,
    w: Option<WriteConcern>,
) -> Result<Client, BoxError> {
    let uri = format!("mongodb://{}/?replicaSet={set}", hosts.join(","));
    let mut opts = ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(30));
    opts.write_concern = w;
    Ok(Client::with_options(opts)?)
}

/// A client of the set at `hosts` and every `_id` of `app.<coll>` read with majority read
/// concern, once the set answers (it may still be electing a primary).
async fn read_back(
    hosts: &[String],
    set: &str,
    coll: &str,
    what: &str,
) -> Result<(Client, BTreeSet<i64>), BoxError> {
    let client = set_client(hosts, set, None).await?;
    let coll = client.database("app").collection::<Document>(coll);
    let found = eventually(what, || {
        let coll = coll.clone();
        async move { majority_ids(&coll).await }
    })
    .await?;
    Ok((client, found))
}

/// Every `_id` of a collection, read with majority read concern.
async fn majority_ids(coll: &mongodb::Collection<Document>) -> Result<BTreeSet<i64>, BoxError> {
    use futures::TryStreamExt;
    let mut ids = BTreeSet::new();
    let mut cursor = coll
        .find(doc! {})
        .read_concern(ReadConcern::majority())
        .await?;
    while let Some(d) = cursor.try_next().await? {
        ids.insert(d.get_i64("_id")?);
    }
    Ok(ids)
}

/// What a member that does not find itself in its config (REMOVED) answers: `hello` as
/// `fillHelloForReplSet` after `markAsNoConfig` (nothing of the set, no `lastWrite`), and
/// `replSetGetStatus` with 93.
async fn assert_removed(m: &Client) -> TestResult {
    let hello = command_eventually("hello at the new address", m, doc! {"hello": 1}).await?;
    assert!(!hello.get_bool("isWritablePrimary")?, "{hello}");
    assert!(!hello.get_bool("secondary")?, "{hello}");
    assert!(hello.get_bool("isreplicaset")?, "{hello}");
    assert_eq!(
        hello.get_str("info")?,
        "Does not have a valid replica set config"
    );
    for absent in [
        "setName",
        "setVersion",
        "hosts",
        "me",
        "primary",
        "lastWrite",
    ] {
        assert!(!hello.contains_key(absent), "{absent} in {hello}");
    }
    assert!(hello.get_document("topologyVersion").is_ok(), "{hello}");
    let err = m
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await
        .err()
        .ok_or("replSetGetStatus of a REMOVED member succeeded")?;
    assert_eq!(
        command_error(&err),
        Some((
            93,
            "Our replica set config is invalid or we are not a member of it".to_string()
        )),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_majority_writes_survive_sigkill_of_every_member() -> TestResult {
    let set = "rsdur";
    let dirs = [TempDir::new("a")?, TempDir::new("b")?, TempDir::new("c")?];
    let (mut children, ports) = durable_set(set, &dirs).await?;
    let hosts = loopback_hosts(&ports);
    let client = set_client(&hosts, set, Some(WriteConcern::majority())).await?;
    let coll = client.database("app").collection::<Document>("dur");

    // Two writers insert w:"majority" as fast as they can; every acknowledged _id is noted.
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let mut writers = Vec::new();
    for w in 0..2i64 {
        let coll = coll.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..100_000i64 {
                let id = w * 1_000_000 + n;
                if coll.insert_one(doc! {"_id": id}).await.is_ok() {
                    acked.lock().map(|mut a| a.insert(id)).ok();
                }
            }
        }));
    }
    // Kill every member once some writes were acknowledged, with more in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().map(|a| a.len()).unwrap_or(0) < 50 {
        assert!(Instant::now() < deadline, "no majority writes acknowledged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in &mut children {
        c.start_kill()?;
    }
    for c in &mut children {
        c.wait().await?;
    }
    let acked_before_kill: BTreeSet<i64> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    for w in writers {
        w.abort();
    }
    drop(client);

    // Restart every member on its dbpath; they rejoin by themselves (no initiate, no
    // reconfig) and elect a primary.
    let mut children = Vec::new();
    for (p, d) in ports.iter().zip(&dirs) {
        children.push(spawn(*p, d.path(), set)?);
    }
    let (client, found) = read_back(&hosts, set, "dur", "reading after the restart").await?;
    let lost: Vec<&i64> = acked_before_kill.difference(&found).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost after SIGKILL of every member: {:?}",
        lost.len(),
        lost.iter().take(10).collect::<Vec<_>>()
    );
    let conf = client
        .database("admin")
        .run_command(doc! {"replSetGetConfig": 1})
        .await?;
    assert_eq!(conf.get_document("config")?.get_i32("version")?, 1);
    let status = client
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await?;
    assert!(
        status.get_i64("term")? >= 2,
        "a new term after the restart: {status}"
    );

    // A member restarted at a new address does not find itself in its config: REMOVED.
    let moved_port = free_port()?;
    sigkill(&mut children[2]).await?;
    let mut moved = spawn(moved_port, dirs[2].path(), set)?;
    let m = direct(moved_port).await?;
    assert_removed(&m).await?;
    sigkill(&mut moved).await?;
    for c in &mut children {
        let _ = c.start_kill();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_missing_or_corrupt_dbpath_is_refused_at_start() -> TestResult {
    let dir = TempDir::new("lock")?;
    let port = free_port()?;
    let mut running = spawn(port, dir.path(), "rslock")?;
    let c = direct(port).await?;
    command_eventually("the first member answers", &c, doc! {"ping": 1}).await?;

    let exit_message = |child: Child| async move {
        let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await??;
        Ok::<_, BoxError>((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    // A second process on the same dbpath.
    let (ok, err) = exit_message(spawn(free_port()?, dir.path(), "rslock")?).await?;
    assert!(!ok, "a second member started on a locked dbpath");
    assert!(err.contains("in use by another running process"), "{err}");

    // A dbpath that does not exist.
    let missing = dir.path().join("nope");
    let (ok, err) = exit_message(spawn(free_port()?, &missing, "rslock")?).await?;
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");

    // After a SIGKILL the lock is free again; a torn last record is dropped, garbage is not.
    sigkill(&mut running).await?;
    let journal = dir.path().join(replset_sim::disk::JOURNAL_FILE);
    let mut bytes = std::fs::read(&journal)?;
    bytes.extend_from_slice(&[0x40, 0, 0]);
    std::fs::write(&journal, &bytes)?;
    let port2 = free_port()?;
    let mut again = spawn(port2, dir.path(), "rslock")?;
    let c = direct(port2).await?;
    command_eventually("restart over a torn record", &c, doc! {"ping": 1}).await?;
    sigkill(&mut again).await?;
    std::fs::write(&journal, b"\x05\x00\x00\x00\x07garbage that is no BSON")?;
    let (ok, err) = exit_message(spawn(free_port()?, dir.path(), "rslock")?).await?;
    assert!(!ok, "a member started on a corrupt dbpath");
    assert!(err.contains("is corrupt at byte 0"), "{err}");
    Ok(())
}

/// The newest entry of a member's oplog as an operator reads it:
/// `local.oplog.rs`, `sort({$natural: -1}).limit(1)`.
async fn newest_oplog_entry(c: &Client) -> Result<Document, BoxError> {
    use futures::TryStreamExt;
    let mut cursor = c
        .database("local")
        .collection::<Document>("oplog.rs")
        .find(doc! {})
        .sort(doc! {"$natural": -1})
        .limit(1)
        .await?;
    let first = cursor.try_next().await?.ok_or("empty oplog")?;
    if cursor.try_next().await?.is_some() {
        return Err("limit(1) returned more than one entry".into());
    }
    Ok(first)
}

/// The re-addressing rule the reconciler relies on: every member of a set restarts with its
/// data under a new address; each is REMOVED (hello as for no config, replSetGetStatus 93,
/// replSetGetConfig the old config, its oplog readable); `replSetReconfig {force: true}` of
/// the last config with only the hosts changed, sent to the member whose newest oplog entry
/// is newest, is accepted there (version raised by 10,000 + random(100,000), term -1), the
/// others learn it by heartbeats, a primary is elected and every `w: "majority"` write made
/// before the restart is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_restarted_at_new_addresses_is_re_addressed_by_a_forced_reconfig() -> TestResult {
    let set = "rsmove";
    let dirs = [
        TempDir::new("ma")?,
        TempDir::new("mb")?,
        TempDir::new("mc")?,
    ];
    let (mut children, ports) = durable_set(set, &dirs).await?;
    let hosts = loopback_hosts(&ports);
    let client = set_client(&hosts, set, Some(WriteConcern::majority())).await?;
    let coll = client.database("app").collection::<Document>("moved");
    let written: BTreeSet<i64> = (0..200).collect();
    for id in &written {
        coll.insert_one(doc! {"_id": id}).await?;
    }
    drop(client);
    for c in &mut children {
        sigkill(c).await?;
    }

    // Every member back on its directory, at a new port.
    let new_ports = [free_port()?, free_port()?, free_port()?];
    let mut children = Vec::new();
    for (p, d) in new_ports.iter().zip(&dirs) {
        children.push(spawn(*p, d.path(), set)?);
    }
    let new_hosts = loopback_hosts(&new_ports);
    let mut clients = Vec::new();
    for p in new_ports {
        clients.push(direct(p).await?);
    }
    let mut newest = Vec::new();
    let mut old_config = Document::new();
    for m in &clients {
        assert_removed(m).await?;

        // replSetGetConfig answers with the persisted config, old hosts and all.
        let conf = m
            .database("admin")
            .run_command(doc! {"replSetGetConfig": 1})
            .await?;
        let conf = conf.get_document("config")?.clone();
        assert_eq!(conf.get_i32("version")?, 1, "{conf}");
        assert!(conf.get_i32("term")? >= 1, "{conf}");
        assert_eq!(member_fields(&conf, "host")?, hosts, "{conf}");
        old_config = conf;

        // The newest oplog entry: the last of a full read, with its ts and t.
        let last = newest_oplog_entry(m).await?;
        let ts = last.get_timestamp("ts")?;
        let t = last.get_i64("t")?;
        assert!(t >= 1, "{last}");
        let all: Vec<Document> = {
            use futures::TryStreamExt;
            m.database("local")
                .collection::<Document>("oplog.rs")
                .find(doc! {})
                .await?
                .try_collect()
                .await?
        };
        assert_eq!(all.last(), Some(&last), "the newest entry is the last one");
        newest.push(((t, ts.time, ts.increment), last));
    }

    // The reconciler's choice: the member whose last applied optime is newest.
    let target = (0..3)
        .max_by_key(|&i| newest[i].0)
        .ok_or("no member to reconfigure")?;
    let readdressed = |hosts_now: &[String]| -> Result<Document, BoxError> {
        let mut cfg = old_config.clone();
        let members: Vec<Bson> = cfg
            .get_array("members")?
            .iter()
            .zip(hosts_now)
            .map(|(m, h)| {
                let mut m = m.as_document().cloned().unwrap_or_default();
                m.insert("host", h.clone());
                Bson::Document(m)
            })
            .collect();
        cfg.insert("members", members);
        Ok(cfg)
    };
    let admin = clients[target].database("admin");

    // A config in which the receiver does not find itself: NodeNotFound, as it is.
    let mut without_me = new_hosts.clone();
    without_me[target] = hosts[target].clone();
    let err = admin
        .run_command(doc! {"replSetReconfig": readdressed(&without_me)?, "force": true})
        .await
        .err()
        .ok_or("a forced reconfig without the receiver succeeded")?;
    let (code, message) = command_error(&err).ok_or("not a command error")?;
    assert_eq!(code, 74, "{err:?}");
    assert!(message.contains("maps to this node"), "{message}");

    // The same config with the new hosts, forced: accepted.
    admin
        .run_command(doc! {"replSetReconfig": readdressed(&new_hosts)?, "force": true})
        .await?;
    let installed = admin
        .run_command(doc! {"replSetGetConfig": 1})
        .await?
        .get_document("config")?
        .clone();
    let version = installed.get_i32("version")?;
    assert!(
        (10_001..110_001).contains(&version),
        "version 1 + 10000 + random(100000): {installed}"
    );
    assert_eq!(installed.get_i32("term")?, -1, "{installed}");

    // The others learn it by heartbeats; a primary is elected under it.
    for (i, m) in clients.iter().enumerate() {
        eventually("the new config on every member", || {
            let m = m.clone();
            let new_hosts = new_hosts.clone();
            async move {
                let c = m
                    .database("admin")
                    .run_command(doc! {"replSetGetConfig": 1})
                    .await?;
                let c = c.get_document("config")?;
                if c.get_i32("version")? == version && member_fields(c, "host")? == new_hosts {
                    Ok(())
                } else {
                    Err(format!("member {i} still has {c}").into())
                }
            }
        })
        .await?;
    }
    let (client, found) =
        read_back(&new_hosts, set, "moved", "reading after the re-addressing").await?;
    assert_eq!(found, written, "every majority write made before the move");
    // A new primary keeps a forced config's term -1 ("If the config doesn't have a term,
    // don't change it"); the status names the new hosts.
    let status = client
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await?;
    assert_eq!(member_fields(&status, "name")?, new_hosts, "{status}");
    let conf = client
        .database("admin")
        .run_command(doc! {"replSetGetConfig": 1})
        .await?;
    assert_eq!(conf.get_document("config")?.get_i32("term")?, -1, "{conf}");
    for c in &mut children {
        let _ = c.start_kill();
    }
    Ok(())
}
