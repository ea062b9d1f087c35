//! mongosh (from npm), which nobody here wrote, typed at the simulator as a person would:
//! `rs.initiate()`, `rs.add`, `rs.status()`, `rs.conf()`, `rs.remove`, `show dbs`, CRUD, and
//! with authorization `db.createUser` through the localhost exception and `db.auth` with it.
//!
//! mongosh is `$REPLSET_SIM_NODE_MODULES/.bin/mongosh` (scripts/test sets it), else
//! `target/node/node_modules/.bin/mongosh`; `scripts/node-clients` installs it. Without it the
//! test fails and says so.

mod common;

use common::{output_text, rand_suffix, BoxError, TestResult};
use replset_sim::auth::{KeyFile, Security};
use replset_sim::{Cluster, NodeOptions};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

fn mongosh() -> PathBuf {
    let modules = std::env::var("REPLSET_SIM_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/node/node_modules")
        });
    modules.join(".bin/mongosh")
}

/// Runs `script` in mongosh (as typed lines on stdin) against `uri`; returns its output.
async fn run_mongosh(uri: &str, extra: &[&str], script: &str) -> Result<String, BoxError> {
    let bin = mongosh();
    assert!(
        bin.exists(),
        "{} is missing: run scripts/node-clients (scripts/test does)",
        bin.display()
    );
    // Output goes to a file, so that a run that hangs still shows how far it got.
    let log_path = std::env::temp_dir().join(format!(
        "replset-sim-mongosh-{}-{}.log",
        std::process::id(),
        rand_suffix()
    ));
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new(&bin)
        .arg(uri)
        .args(["--quiet", "--norc"])
        .args(extra)
        .env("MONGOSH_NO_TELEMETRY", "1")
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    stdin.write_all(b"\nexit\n").await?;
    drop(stdin);
    let status = tokio::time::timeout(Duration::from_secs(120), child.wait()).await;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let Ok(status) = status else {
        return Err(format!("mongosh did not finish within 120 s; its output:\n{text}").into());
    };
    let out = status?;
    assert!(out.success(), "mongosh failed ({out}):\n{text}");
    Ok(text)
}

/// What follows `marker` on the first line that has it (after mongosh's prompt).
fn line_after<'a>(out: &'a str, marker: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.find(marker).map(|i| l[i + marker.len()..].trim()))
}

/// Waits in mongosh until the current config is committed (the next reconfig would be 308).
const WAIT_COMMITTED: &str = "while (!db.adminCommand({replSetGetConfig: 1, commitmentStatus: true}).commitmentStatus) { sleep(100) }";

/// Waits until the primary has dropped `newlyAdded` from every member and that config is
/// committed. The primary's own reconfig that drops it takes the next version, as mongod's
/// does, so an `rs.remove` typed while it runs can send the same version and get 103.
const WAIT_CAUGHT_UP: &str = "while (db.adminCommand({replSetGetConfig: 1, $_internalIncludeNewlyAdded: true}).config.members.some(m => m.newlyAdded)) { sleep(100) }\nwhile (!db.adminCommand({replSetGetConfig: 1, commitmentStatus: true}).commitmentStatus) { sleep(100) }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongosh_builds_a_set_and_does_crud() -> TestResult {
    let c = Cluster::start(3).await?;
    let (h1, h2) = (c.host(1)?.to_string(), c.host(2)?.to_string());
    let script = format!(
        r#"
rs.initiate()
while (!db.hello().isWritablePrimary) {{ sleep(100) }}
{WAIT_COMMITTED}
rs.add("{h1}")
{WAIT_COMMITTED}
rs.add("{h2}")
{WAIT_COMMITTED}
while (rs.status().members.filter(m => m.stateStr === "SECONDARY").length < 2) {{ sleep(100) }}
{WAIT_CAUGHT_UP}
print("MEMBERS " + rs.conf().members.map(m => m.host).join(","))
print("STATES " + rs.status().members.map(m => m.stateStr).sort().join(","))
use shop
db.items.insertMany([{{_id: 1, n: 5}}, {{_id: 2, n: 15}}, {{_id: 3, n: 25}}])
db.items.updateOne({{_id: 2}}, {{$inc: {{n: 100}}, $set: {{tag: "big"}}}})
db.items.deleteOne({{n: {{$lt: 10}}}})
print("FOUND " + JSON.stringify(db.items.find({{n: {{$gt: 20}}}}, {{_id: 1}}).sort({{_id: -1}}).toArray()))
print("COUNT " + db.items.countDocuments({{}}))
show dbs
rs.remove("{h2}")
{WAIT_COMMITTED}
print("AFTER " + rs.conf().members.length)
"#
    );
    let out = run_mongosh(&c.direct_uri(0)?, &[], &script).await?;
    let members = line_after(&out, "MEMBERS ").ok_or_else(|| format!("no MEMBERS line:\n{out}"))?;
    assert_eq!(members, format!("{},{h1},{h2}", c.host(0)?), "{out}");
    assert_eq!(
        line_after(&out, "STATES "),
        Some("PRIMARY,SECONDARY,SECONDARY"),
        "{out}"
    );
    assert_eq!(
        line_after(&out, "FOUND "),
        Some(r#"[{"_id":3},{"_id":2}]"#),
        "{out}"
    );
    assert_eq!(line_after(&out, "COUNT "), Some("2"), "{out}");
    // `show dbs` lists the new database with its size.
    assert!(
        out.lines()
            .any(|l| l.split("> ").last().is_some_and(|t| t.starts_with("shop "))),
        "{out}"
    );
    assert_eq!(line_after(&out, "AFTER "), Some("2"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongosh_creates_the_first_user_and_authenticates_with_it() -> TestResult {
    let template = NodeOptions {
        security: Security {
            authorization: true,
            key_file: Some(KeyFile::from_contents("mongoshkey")?),
        },
        ..NodeOptions::default()
    };
    let c = Cluster::start_with(1, template).await?;
    // The localhost exception: initiate and create the first user, then log in with it.
    let script = r#"
rs.initiate()
while (!db.hello().isWritablePrimary) { sleep(100) }
use admin
db.createUser({user: "root", pwd: "rootpw", roles: ["root"]})
try { db.getSiblingDB("shop").items.findOne() } catch (e) { print("BEFORE_AUTH " + e.code) }
print("LOGIN " + JSON.stringify(db.auth("root", "rootpw")))
db.getSiblingDB("shop").createUser({user: "app", pwd: "apppw", roles: ["readWrite"]})
print("USERS " + db.getSiblingDB("shop").getUsers().users.map(u => u._id).join(","))
"#;
    let out = run_mongosh(&c.direct_uri(0)?, &[], script).await?;
    assert_eq!(line_after(&out, "BEFORE_AUTH "), Some("13"), "{out}");
    assert_eq!(line_after(&out, "LOGIN "), Some(r#"{"ok":1}"#), "{out}");
    assert_eq!(line_after(&out, "USERS "), Some("shop.app"), "{out}");

    // The new user logs in from the command line and is kept to its database.
    let script = r#"
db.items.insertOne({_id: 1})
print("MINE " + db.items.countDocuments({}))
try { db.getSiblingDB("other").x.insertOne({a: 1}) } catch (e) { print("OTHER " + e.code) }
"#;
    let out = run_mongosh(
        &format!("mongodb://{}/shop?directConnection=true", c.host(0)?),
        &[
            "-u",
            "app",
            "-p",
            "apppw",
            "--authenticationDatabase",
            "shop",
        ],
        script,
    )
    .await?;
    assert_eq!(line_after(&out, "MINE "), Some("1"), "{out}");
    assert_eq!(line_after(&out, "OTHER "), Some("13"), "{out}");
    // A wrong password is refused at connection.
    let bin = mongosh();
    let bad = Command::new(&bin)
        .arg(format!(
            "mongodb://{}/shop?directConnection=true",
            c.host(0)?
        ))
        .args([
            "--quiet",
            "--norc",
            "-u",
            "app",
            "-p",
            "wrong",
            "--authenticationDatabase",
            "shop",
            "--eval",
            "db.runCommand({ping: 1})",
        ])
        .env("MONGOSH_NO_TELEMETRY", "1")
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::null())
        .output()
        .await?;
    let text = output_text(&bad);
    assert!(
        !bad.status.success(),
        "a wrong password was accepted: {text}"
    );
    assert!(text.contains("Authentication failed"), "{text}");
    Ok(())
}

/// The stack's init script (compose/mongo-init-users.js), run by mongosh as the mongo image
/// runs the files of /docker-entrypoint-initdb.d on a first start (as root, on a standalone
/// mongod), creates the users of the users file; the simulator, which reads the same file
/// itself on its first start, ends with the same users and roles. Either way the passwords
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stacks_init_script_makes_the_users_the_simulator_makes() -> TestResult {
    let dir = common::TempDir::new("init-script")?;
    let users = common::stack_users_file(dir.path())?;
    let root_pw = dir.path().join("root-pw");
    std::fs::write(&root_pw, "rootpw\n")?;
    let sim = env!("CARGO_BIN_EXE_replset-sim");
    let standalone = |port: u16, users_file: Option<&std::path::Path>| {
        let mut cmd = Command::new(sim);
        cmd.args(["--port", &port.to_string()])
            .env("MONGO_INITDB_ROOT_USERNAME", "root")
            .env("MONGO_INITDB_ROOT_PASSWORD_FILE", &root_pw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(f) = users_file {
            cmd.env("MONGO_INITDB_USERS_FILE", f);
        }
        cmd
    };
    let (by_script, by_sim) = (common::free_port()?, common::free_port()?);
    let _a = standalone(by_script, None).spawn()?;
    let _b = standalone(by_sim, Some(&users)).spawn()?;

    let script = common::crate_file("../compose/mongo-init-users.js");
    let out = Command::new(mongosh())
        .arg(format!(
            "mongodb://127.0.0.1:{by_script}/test?directConnection=true"
        ))
        .args(["--quiet", "--norc", "-u", "root", "-p", "rootpw"])
        .args(["--authenticationDatabase", "admin"])
        .arg(&script)
        .env("MONGO_INITDB_USERS_FILE", &users)
        .stdin(Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out).await??;
    let text = output_text(&out);
    assert!(out.status.success(), "the init script failed:\n{text}");
    assert!(text.contains("created user reconciler@admin"), "{text}");
    assert!(
        !text.contains("reconciler-pw"),
        "a password was printed:\n{text}"
    );

    let users_of = |port: u16| async move {
        let uri = format!("mongodb://root:rootpw@127.0.0.1:{port}/?directConnection=true");
        let c = common::client(&uri).await?;
        let info = c
            .database("admin")
            .run_command(bson::doc! {"usersInfo": {"forAllDBs": true}})
            .await?;
        let mut users: Vec<String> = Vec::new();
        for u in info.get_array("users")? {
            let u = u.as_document().ok_or("a user that is not a document")?;
            let mut roles: Vec<String> = u
                .get_array("roles")?
                .iter()
                .filter_map(|r| r.as_document())
                .map(|r| {
                    format!(
                        "{}@{}",
                        r.get_str("role").unwrap_or(""),
                        r.get_str("db").unwrap_or("")
                    )
                })
                .collect();
            roles.sort();
            users.push(format!("{} {}", u.get_str("_id")?, roles.join(",")));
        }
        users.sort();
        Ok::<_, BoxError>(users)
    };
    let expected = users_of(by_sim).await?;
    assert_eq!(users_of(by_script).await?, expected);
    assert!(
        expected
            .contains(&"admin.reconciler clusterManager@admin,clusterMonitor@admin".to_string()),
        "{expected:?}"
    );
    for port in [by_script, by_sim] {
        let uri = format!("mongodb://app:app-pw@127.0.0.1:{port}/app?directConnection=true");
        let c = common::client(&uri).await?;
        c.database("app")
            .collection::<bson::Document>("docs")
            .insert_one(bson::doc! {"_id": 1})
            .await?;
    }
    Ok(())
}
