//! The `replset-sim` binary with mongod's flags: listens on 127.0.0.1 by default, and a
//! single-member set initiated with `replSetInitiate: {}` elects itself.

mod common;

use bson::{doc, Document};
use common::{client, free_port, member_command, output_text, sigkill, BoxError, TestResult};
use mongodb::Database;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio::time::Instant;

/// Polls `hello` on a single-member set until it is primary (within 20 s); returns that
/// reply. Awaitable hello would be the driver's job; a short poll is enough here.
async fn until_primary(admin: &Database) -> Result<Document, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hello = admin.run_command(doc! {"hello": 1}).await?;
        if hello.get_bool("isWritablePrimary")? {
            return Ok(hello);
        }
        assert!(Instant::now() < deadline, "no primary: {hello:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_a_single_member_set() -> TestResult {
    let port = free_port()?;
    let mut child = member_command(port, "rsbin").spawn()?;
    let client = client(&format!(
        "mongodb://127.0.0.1:{port}/?directConnection=true"
    ))
    .await?;
    let admin = client.database("admin");
    let hello = admin.run_command(doc! {"hello": 1}).await?;
    assert!(hello.get_bool("isreplicaset")?);
    assert_eq!(hello.get_i32("maxWireVersion")?, 21);

    admin.run_command(doc! {"replSetInitiate": {}}).await?;
    let hello = until_primary(&admin).await?;
    assert_eq!(hello.get_str("setName")?, "rsbin");
    assert_eq!(hello.get_str("me")?, format!("127.0.0.1:{port}"));
    sigkill(&mut child).await?;
    Ok(())
}

/// A file in a fresh temporary directory, with `mode`.
fn secret_file(
    name: &str,
    contents: &str,
    mode: u32,
) -> Result<std::path::PathBuf, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!(
        "replset-sim-binary-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, contents)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_images_root_user_and_the_key_file() -> TestResult {
    let port = free_port()?;
    let key = secret_file("keyfile", "c2VjcmV0a2V5MTIz\n", 0o400)?;
    let password = secret_file("root-password", "s3cret\n", 0o400)?;
    let mut child = member_command(port, "rsauth")
        .arg("--keyFile")
        .arg(&key)
        .env("MONGO_INITDB_ROOT_USERNAME", "root")
        .env("MONGO_INITDB_ROOT_PASSWORD_FILE", &password)
        .spawn()?;
    let uri = format!("mongodb://root:s3cret@127.0.0.1:{port}/?directConnection=true");
    let admin = client(&uri).await?.database("admin");
    // The root user exists (no localhost exception needed) and may initiate the set.
    admin.run_command(doc! {"replSetInitiate": {}}).await?;
    until_primary(&admin).await?;
    let users = admin.run_command(doc! {"usersInfo": "root"}).await?;
    assert_eq!(users.get_array("users")?.len(), 1, "{users}");
    // Without credentials: 13.
    let anon_uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let anon = client(&anon_uri).await?;
    let e = anon
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await
        .expect_err("authorization is on");
    assert!(e.to_string().contains("requires authentication"), "{e}");
    sigkill(&mut child).await?;
    Ok(())
}

/// The users of the stack (compose/mongo-users.json), created on the first start as the
/// image's init script creates them, each with no more than its part: the reconciler
/// initiates, reads status, config and the oplog, but no application data; the application
/// reads and writes its database and nothing of the set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stacks_users_can_do_their_part_and_no_more() -> TestResult {
    use mongodb::options::AuthMechanism::ScramSha256;
    let dir = common::TempDir::new("stack-users")?;
    let users = common::stack_users_file(dir.path())?;
    let port = free_port()?;
    let key = secret_file("keyfile", "c3RhY2t1c2Vyc2tleQ==\n", 0o400)?;
    let root_pw = secret_file("root-password", "rootpw\n", 0o400)?;
    let mut child = member_command(port, "rsusers")
        .arg("--keyFile")
        .arg(&key)
        .env("MONGO_INITDB_ROOT_USERNAME", "root")
        .env("MONGO_INITDB_ROOT_PASSWORD_FILE", &root_pw)
        .env("MONGO_INITDB_USERS_FILE", &users)
        .spawn()?;
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let reconciler = common::client_as(
        &uri,
        Some(("reconciler", "reconciler-pw", "admin", ScramSha256)),
    )
    .await?;
    let admin = reconciler.database("admin");
    admin.run_command(doc! {"replSetInitiate": {}}).await?;
    until_primary(&admin).await?;
    admin.run_command(doc! {"replSetGetStatus": 1}).await?;
    admin
        .run_command(doc! {"replSetGetConfig": 1, "commitmentStatus": true})
        .await?;
    let oplog = reconciler
        .database("local")
        .collection::<Document>("oplog.rs");
    let newest = oplog.find_one(doc! {}).sort(doc! {"$natural": -1}).await?;
    assert!(newest.is_some(), "the reconciler reads the oplog");
    let docs = reconciler.database("app").collection::<Document>("docs");
    let e = docs
        .find_one(doc! {})
        .await
        .expect_err("no application data");
    assert_eq!(common::code_of(&e), Some(13), "{e}");

    let app_uri = format!("mongodb://127.0.0.1:{port}/app?directConnection=true");
    let app = common::client_as(&app_uri, Some(("app", "app-pw", "app", ScramSha256))).await?;
    let docs = app.database("app").collection::<Document>("docs");
    docs.insert_one(doc! {"_id": 1, "v": "x"}).await?;
    assert_eq!(docs.count_documents(doc! {}).await?, 1);
    let e = app
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await
        .expect_err("the app does not manage the set");
    assert_eq!(common::code_of(&e), Some(13), "{e}");
    let e = app
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .await
        .expect_err("the app does not read the oplog");
    assert_eq!(common::code_of(&e), Some(13), "{e}");

    // A wrong password: AuthenticationFailed (18), at connection.
    let wrong =
        common::client_as(&uri, Some(("reconciler", "wrong", "admin", ScramSha256))).await?;
    let e = wrong
        .database("admin")
        .run_command(doc! {"replSetGetStatus": 1})
        .await
        .expect_err("a wrong password");
    assert_eq!(common::code_of(&e), Some(18), "{e}");
    sigkill(&mut child).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_security_options_stop_the_start_with_the_reason() -> TestResult {
    let port = free_port()?.to_string();
    let open_key = secret_file("keyfile", "c2VjcmV0a2V5MTIz", 0o644)?;
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--keyFile".into(), open_key.display().to_string()],
            "are too open",
        ),
        (
            vec!["--auth".into()],
            "security.keyFile is required when authorization is enabled with replica sets",
        ),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_replset-sim"))
            .args(["--port", &port, "--replSet", "rsbad"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await?;
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?} started: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    Ok(())
}
