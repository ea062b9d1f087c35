//! Authentication against the real `mongodb` driver (3.x), which nobody here wrote: SCRAM-SHA-256
//! and SCRAM-SHA-1, wrong passwords (18), commands the user may not run (13), a readWrite
//! user kept to its database, users replicated to the secondaries, the localhost exception,
//! and members that hold the key file forming a set while one with another key is refused.

mod common;

use bson::{doc, Document};
use common::{client_as as client, code_of, init_tracing, BoxError, TestResult};
use mongodb::options::AuthMechanism;
use replset_sim::auth::{KeyFile, Security};
use replset_sim::{Cluster, DurableState, History, MemberState, Node, NodeOptions};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(30);

fn secured(key: &str) -> Result<NodeOptions, BoxError> {
    Ok(NodeOptions {
        security: Security {
            authorization: true,
            key_file: Some(KeyFile::from_contents(key)?),
        },
        ..NodeOptions::default()
    })
}

/// SCRAM-SHA-256 credentials for [`client`].
fn sha256<'a>(
    user: &'a str,
    pwd: &'a str,
    source: &'a str,
) -> Option<(&'a str, &'a str, &'a str, AuthMechanism)> {
    Some((user, pwd, source, AuthMechanism::ScramSha256))
}

/// Runs `cmd` on `db`, which must fail (`why` says why); returns the error.
async fn refused(
    db: &mongodb::Database,
    cmd: Document,
    why: &str,
) -> Result<mongodb::error::Error, BoxError> {
    match db.run_command(cmd).await {
        Ok(r) => Err(format!("{why}, yet it succeeded: {r}").into()),
        Err(e) => Ok(e),
    }
}

/// A `ping` as `user`, which must fail (`why` says why); returns the error.
async fn ping_refused(
    uri: &str,
    user: Option<(&str, &str, &str, AuthMechanism)>,
    why: &str,
) -> Result<mongodb::error::Error, BoxError> {
    let db = user.as_ref().map(|u| u.2).unwrap_or("admin").to_string();
    refused(
        &client(uri, user).await?.database(&db),
        doc! {"ping": 1},
        why,
    )
    .await
}

/// A three-member set with the key file, initiated, with a root user `admin` created by the
/// test harness (as __system) on the primary.
async fn secured_set() -> Result<Cluster, BoxError> {
    init_tracing();
    let c = Cluster::start_with(3, secured("sharedkey123")?).await?;
    c.initiate().await?;
    let p = c.wait_for_stable(SETTLE).await?;
    c.command_ok(
        p,
        doc! {"createUser": "admin", "pwd": "adminpw", "roles": ["root"], "$db": "admin"},
    )
    .await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_and_sha_1_authenticate_and_wrong_passwords_fail() -> TestResult {
    let c = secured_set().await?;
    for mech in [AuthMechanism::ScramSha256, AuthMechanism::ScramSha1] {
        let ok = client(&c.uri(), Some(("admin", "adminpw", "admin", mech.clone()))).await?;
        let status = ok
            .database("admin")
            .run_command(doc! {"connectionStatus": 1})
            .await?;
        let users = status
            .get_document("authInfo")?
            .get_array("authenticatedUsers")?;
        assert_eq!(users.len(), 1, "{mech:?}: {status}");
        // root may run the replica-set commands.
        ok.database("admin")
            .run_command(doc! {"replSetGetStatus": 1})
            .await?;

        let wrong = Some(("admin", "wrong", "admin", mech.clone()));
        let e = ping_refused(&c.uri(), wrong, "a wrong password must fail").await?;
        assert_eq!(code_of(&e), Some(18), "{mech:?}: {e}");
        let nobody = Some(("nobody", "x", "admin", mech.clone()));
        let e = ping_refused(&c.uri(), nobody, "an unknown user must fail").await?;
        assert_eq!(code_of(&e), Some(18), "{mech:?}: {e}");
    }
    // Without credentials: hello and ping run, the rest is 13 "requires authentication".
    let anon = client(&c.uri(), None).await?;
    anon.database("admin").run_command(doc! {"ping": 1}).await?;
    let e = refused(
        &anon.database("admin"),
        doc! {"listDatabases": 1},
        "listDatabases needs a user",
    )
    .await?;
    assert_eq!(code_of(&e), Some(13), "{e}");
    assert!(e.to_string().contains("requires authentication"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_write_user_is_kept_to_its_database_and_replicates() -> TestResult {
    let c = secured_set().await?;
    let root = client(&c.uri(), sha256("admin", "adminpw", "admin")).await?;
    root.database("shop")
        .run_command(doc! {"createUser": "app", "pwd": "apppw", "roles": ["readWrite"]})
        .await?;
    let info = root
        .database("shop")
        .run_command(doc! {"usersInfo": "app"})
        .await?;
    let users = info.get_array("users")?;
    assert_eq!(users.len(), 1, "{info}");
    let u = users[0].as_document().ok_or("not a document")?;
    assert_eq!(u.get_str("_id")?, "shop.app");
    assert!(
        u.get("credentials").is_none(),
        "credentials are shown only on request"
    );

    let app = client(&c.uri(), sha256("app", "apppw", "shop")).await?;
    let orders = app.database("shop").collection::<Document>("orders");
    orders.insert_one(doc! {"_id": 1, "item": "tea"}).await?;
    assert_eq!(orders.count_documents(doc! {}).await?, 1);
    let e = app
        .database("other")
        .collection::<Document>("x")
        .insert_one(doc! {"a": 1})
        .await
        .expect_err("readWrite on shop only");
    assert_eq!(code_of(&e), Some(13), "{e}");
    assert!(e.to_string().contains("not authorized on other"), "{e}");
    let e = refused(
        &app.database("admin"),
        doc! {"replSetGetStatus": 1},
        "no cluster privileges",
    )
    .await?;
    assert_eq!(code_of(&e), Some(13), "{e}");
    // Only its own database in listDatabases.
    let dbs = app.list_database_names().await?;
    assert_eq!(dbs, vec!["shop".to_string()]);

    // The user reached the secondaries through the oplog: authenticate on one directly.
    let p = c.primary().ok_or("no primary")?;
    let s = (0..3).find(|&i| i != p).ok_or("no secondary")?;
    c.wait_for("the user on a secondary", SETTLE, |c| {
        let n = c.node(s).ok()?;
        n.documents("admin.system.users")
            .iter()
            .any(|d| d.get_str("_id") == Ok("shop.app"))
            .then_some(())
    })
    .await?;
    let direct = client(
        &format!("{}&readPreference=secondaryPreferred", c.direct_uri(s)?),
        sha256("app", "apppw", "shop"),
    )
    .await?;
    let n = direct
        .database("shop")
        .collection::<Document>("orders")
        .count_documents(doc! {})
        .await?;
    assert_eq!(n, 1);

    // dropUser removes it everywhere; its next connection fails.
    root.database("shop")
        .run_command(doc! {"dropUser": "app"})
        .await?;
    let e = ping_refused(&c.uri(), sha256("app", "apppw", "shop"), "dropped user").await?;
    assert_eq!(code_of(&e), Some(18), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_localhost_exception_bootstraps_a_set_and_its_first_user() -> TestResult {
    init_tracing();
    let c = Cluster::start_with(1, secured("sharedkey123")?).await?;
    // A loopback client without credentials while no user exists.
    let anon = client(&c.direct_uri(0)?, None).await?;
    let admin = anon.database("admin");
    let e = anon
        .database("test")
        .collection::<Document>("c")
        .find_one(doc! {})
        .await
        .expect_err("the exception does not allow reads");
    assert_eq!(code_of(&e), Some(13), "{e}");
    let host = c.host(0)?.to_string();
    admin
        .run_command(doc! {"replSetInitiate": {"_id": "rs0", "version": 1, "members": [{"_id": 0, "host": host}]}})
        .await?;
    c.wait_for_primary(SETTLE).await?;
    admin
        .run_command(doc! {"createUser": "root", "pwd": "rootpw", "roles": [{"role": "root", "db": "admin"}]})
        .await?;
    // The exception has ended with the first user.
    let e = admin
        .run_command(doc! {"createUser": "second", "pwd": "x", "roles": []})
        .await
        .expect_err("no more exception");
    assert_eq!(code_of(&e), Some(13), "{e}");
    let root = client(&c.direct_uri(0)?, sha256("root", "rootpw", "admin")).await?;
    root.database("admin")
        .run_command(doc! {"createUser": "second", "pwd": "x", "roles": ["readAnyDatabase"]})
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_key_is_refused() -> TestResult {
    let c = secured_set().await?;
    // A fourth process with a different key file, on the set's simulated network.
    let mut opts = secured("anotherkey456")?;
    opts.port = 0;
    let rogue = Node::start(
        opts,
        DurableState::default(),
        c.network().clone(),
        History::default(),
    )
    .await?;
    let p = c.primary().ok_or("no primary")?;
    let cfg = c.command_ok(p, doc! {"replSetGetConfig": 1}).await?;
    let mut cfg = cfg.get_document("config")?.clone();
    let mut members = cfg.get_array("members")?.clone();
    members.push(doc! {"_id": 9, "host": rogue.host(), "votes": 0, "priority": 0}.into());
    cfg.insert("members", members);
    cfg.insert("version", cfg.get_i32("version")? + 1);
    c.command_ok(p, doc! {"replSetReconfig": cfg}).await?;

    // The set sees it, but cannot authenticate to it: not healthy, never SECONDARY, and it
    // never learns the config.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let st = c.command_ok(p, doc! {"replSetGetStatus": 1}).await?;
        let m = st
            .get_array("members")?
            .iter()
            .filter_map(|m| m.as_document())
            .find(|m| m.get_i32("_id") == Ok(9))
            .cloned()
            .ok_or("the new member is not in replSetGetStatus")?;
        let msg = m.get_str("lastHeartbeatMessage").unwrap_or_default();
        if m.get_f64("health") == Ok(0.0) && msg.contains("Authentication failed") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rogue member is not reported refused: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rogue.state(), MemberState::Startup);
    assert!(rogue.config().is_none());

    // Its heartbeats and vote requests are refused: they need the internal privilege, which
    // only the key gives (not even root has it).
    let root = client(&c.uri(), sha256("admin", "adminpw", "admin")).await?;
    let admin = root.database("admin");
    let votes = doc! {"replSetRequestVotes": 1, "setName": "rs0", "dryRun": true, "term": 99i64, "candidateIndex": 0, "configVersion": 1, "configTerm": 1i64, "lastAppliedOpTime": {"ts": bson::Timestamp { time: 0, increment: 0 }, "t": -1i64}};
    let e = refused(&admin, votes, "votes need the key").await?;
    assert_eq!(code_of(&e), Some(13), "{e}");
    let heartbeat = doc! {"replSetHeartbeat": "rs0", "configVersion": -2, "hbv": 1, "from": "x:1", "term": 0i64};
    let e = refused(&admin, heartbeat, "heartbeats need the key").await?;
    assert_eq!(code_of(&e), Some(13), "{e}");
    // The set is still whole and writable.
    let coll = root.database("app").collection::<Document>("c");
    coll.insert_one(doc! {"ok": true}).await?;
    rogue.kill();
    Ok(())
}

/// A member added to a set that holds only what its own first start wrote (its users, as a
/// standalone) has no oplog to catch up from: it initial-syncs, as mongod does, and ends with
/// the set's users. The primary's password works on it; its own first start's no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_only_its_first_start_users_initial_syncs() -> TestResult {
    use replset_sim::auth::initdb::InitUser;
    let template = NodeOptions {
        security: Security {
            authorization: true,
            key_file: Some(KeyFile::from_contents("firststartkey")?),
        },
        ..NodeOptions::default()
    };
    let c = Cluster::start_with(2, template).await?;
    for (i, pw) in [(0, "pw-of-0"), (1, "pw-of-1")] {
        assert!(c.node(i)?.bootstrap_users(&[InitUser::root("root", pw)])?);
    }
    c.initiate().await?;
    let host = c.host(1)?.to_string();
    common::eventually("member 1 SECONDARY with the set's users", || {
        let host = host.clone();
        async move {
            let uri = format!("mongodb://root:pw-of-0@{host}/?directConnection=true");
            let hello = common::client(&uri)
                .await?
                .database("admin")
                .run_command(doc! {"replSetGetStatus": 1})
                .await?;
            match hello.get_i32("myState")? {
                2 => Ok(()),
                s => Err(format!("state {s}").into()),
            }
        }
    })
    .await?;
    let own = format!("mongodb://root:pw-of-1@{host}/?directConnection=true");
    let e = common::client(&own)
        .await?
        .database("admin")
        .run_command(doc! {"ping": 1, "$readPreference": {"mode": "primaryPreferred"}})
        .await
        .expect_err("its own first start's user is gone");
    assert_eq!(code_of(&e), Some(18), "{e}");
    Ok(())
}
