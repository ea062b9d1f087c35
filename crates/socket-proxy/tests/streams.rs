//! The proxy's streaming against a scripted engine on a unix socket: a chunk reaches the
//! client before the engine has sent the next one, and a client that goes away takes the
//! engine connection with it (a bridge that reconnects its event stream leaves no stream
//! open behind it). The real engine's event stream: tests/socket_proxy.rs at the root.

use std::time::Duration;

use docker_socket_proxy::{AllowList, ListenAddr, Listener, Proxy};
use test_support::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Reads from `stream` until what was read contains `needle`.
async fn read_until(stream: &mut UnixStream, seen: &mut String, needle: &str) {
    let mut buf = [0u8; 1024];
    while !seen.contains(needle) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in time; read: {seen:?}"))
            .expect("reads");
        assert!(n > 0, "the stream ended before {needle:?}: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn chunks_pass_as_they_come_and_a_gone_client_closes_the_engine_connection() {
    let dir = TempDir::new("proxy-streams");
    let engine_path = dir.path().join("engine.sock");
    let engine = UnixListener::bind(&engine_path).expect("the scripted engine listens");
    let proxy = Proxy::new(&engine_path, AllowList::for_bridge(&[]));
    let listen = ListenAddr::Unix(dir.path().join("proxy.sock"));
    let listener = Listener::bind(&listen, 0o600)
        .await
        .expect("the proxy listens");
    let stop = CancellationToken::new();
    let serving = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move { proxy.serve(listener, stop).await })
    };

    let mut client = UnixStream::connect(dir.path().join("proxy.sock"))
        .await
        .expect("connects");
    client
        .write_all(b"GET /v1.41/events HTTP/1.1\r\nHost: docker\r\n\r\n")
        .await
        .expect("writes");

    let (mut upstream, _) = tokio::time::timeout(WAIT, engine.accept())
        .await
        .expect("the proxy connects to the engine")
        .expect("accepts");
    let mut request = String::new();
    read_until(&mut upstream, &mut request, "\r\n\r\n").await;
    assert!(
        request.starts_with("GET /v1.41/events HTTP/1.1\r\n"),
        "{request}"
    );
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .expect("writes the head");
    upstream
        .write_all(b"d\r\n{\"n\":\"first\"}\r\n")
        .await
        .expect("writes the first chunk");

    // The first event is through while the engine has sent nothing more.
    let mut seen = String::new();
    read_until(&mut client, &mut seen, "first").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    upstream
        .write_all(b"e\r\n{\"n\":\"second\"}\r\n")
        .await
        .expect("writes the second chunk");
    read_until(&mut client, &mut seen, "second").await;

    // The client goes: the engine sees its connection close.
    drop(client);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, upstream.read(&mut buf))
        .await
        .expect("the engine connection closes once the client is gone")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing more was sent to the engine");

    assert_eq!(proxy.stats().forwarded, 1);
    stop.cancel();
    serving.await.expect("the proxy stops");
    assert!(
        !dir.path().join("proxy.sock").exists(),
        "the proxy removes its socket when it stops"
    );
}
