//! The `replset-sim` binary with mongod's flags: listens on 127.0.0.1 by default, and a
//! single-member set initiated with `replSetInitiate: {}` elects itself.

use bson::doc;
use mongodb::options::ClientOptions;
use mongodb::Client;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;
use tokio::time::Instant;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_a_single_member_set() -> TestResult {
    // A free port: bind port 0, note it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_replset-sim"))
        .args(["--port", &port.to_string(), "--replSet", "rsbin"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;

    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let mut opts = ClientOptions::parse(&uri).await?;
    opts.server_selection_timeout = Some(Duration::from_secs(10));
    let client = Client::with_options(opts)?;
    let admin = client.database("admin");
    let hello = admin.run_command(doc! {"hello": 1}).await?;
    assert!(hello.get_bool("isreplicaset")?);
    assert_eq!(hello.get_i32("maxWireVersion")?, 21);

    admin.run_command(doc! {"replSetInitiate": {}}).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hello = admin.run_command(doc! {"hello": 1}).await?;
        if hello.get_bool("isWritablePrimary")? {
            assert_eq!(hello.get_str("setName")?, "rsbin");
            assert_eq!(hello.get_str("me")?, format!("127.0.0.1:{port}"));
            break;
        }
        assert!(Instant::now() < deadline, "no primary: {hello:?}");
        // Awaitable hello would be the driver's job; a short poll is enough here.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
