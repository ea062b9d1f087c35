//! The proxy: HTTP/1.1 in, the allow-list's decision, HTTP/1.1 out to the engine's unix socket.
//!
//! Each forwarded request gets its own connection to the engine, so a long response (the
//! event stream) holds one engine connection and nothing else waits behind it. The request
//! goes out without a body and with only its end-to-end headers; the response comes back as
//! the engine sends it, frame by frame: the event stream and other chunked responses reach
//! the client as they come, and nothing is held in memory beyond one frame. When the client
//! goes away, its response body is dropped and with it the engine connection.
//!
//! A refused request is answered `403` with the engine's own error form,
//! `{"message": "..."}`, which bollard and the docker CLI show as they show the engine's
//! errors. Each refusal is logged at `warn` the first time a method and path (without the
//! API version) are refused, at `debug` after that.

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{Either, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allow::{unversioned_path, AllowList, Decision, Refusal};
use crate::listen::{Listener, Peer};

/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How many distinct refused method + path pairs are remembered (for logging each once);
/// beyond it every refusal is logged at `debug` only, so that a client making up paths cannot
/// grow the proxy's memory.
const REMEMBERED_REFUSALS: usize = 1024;

/// The longest path a log line or error message repeats.
const LOGGED_PATH_MAX: usize = 256;

/// The headers of one hop (RFC 9110 section 7.6.1), never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The body of an answer: the engine's, streamed, or the proxy's own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How many requests the proxy forwarded and refused since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub forwarded: u64,
    pub refused: u64,
}

/// The proxy: the engine's socket and the allow-list. Cheap to clone; clones share counters.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    engine: PathBuf,
    allow: AllowList,
    forwarded: AtomicU64,
    refused: AtomicU64,
    logged_refusals: Mutex<HashSet<String>>,
}

impl Proxy {
    /// A proxy to the engine listening on the unix socket `engine`.
    pub fn new(engine: impl Into<PathBuf>, allow: AllowList) -> Proxy {
        Proxy {
            shared: Arc::new(Shared {
                engine: engine.into(),
                allow,
                forwarded: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                logged_refusals: Mutex::new(HashSet::new()),
            }),
        }
    }

    pub fn engine(&self) -> &Path {
        &self.shared.engine
    }

    pub fn allow_list(&self) -> &AllowList {
        &self.shared.allow
    }

    pub fn stats(&self) -> Stats {
        Stats {
            forwarded: self.shared.forwarded.load(Ordering::Relaxed),
            refused: self.shared.refused.load(Ordering::Relaxed),
        }
    }

    /// Serves the connections of `listener` until `shutdown` is cancelled; then drops every
    /// open connection (event streams included: their clients reconnect) and returns.
    pub async fn serve(&self, listener: Listener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let proxy = self.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        tokio::select! {
                            _ = proxy.serve_connection(stream, peer) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors, say: wait a little rather than spin.
                    tracing::warn!(listener = %listener, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        connections.close();
        connections.wait().await;
    }

    /// Serves one client connection: HTTP/1.1, keep-alive, no upgrades.
    pub async fn serve_connection<S>(&self, stream: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let peer = Arc::new(peer);
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(proxy.answer(req, &peer).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    }

    /// The answer to one request: the engine's, or the proxy's refusal.
    pub async fn answer<B>(&self, req: Request<B>, peer: &Peer) -> Response<ProxyBody> {
        let path = req.uri().path();
        let query = req.uri().query();
        let upgrade = wants_upgrade(req.headers());
        match self
            .shared
            .allow
            .decide(req.method().as_str(), path, query, upgrade)
        {
            Decision::Forward => self.forward(req).await,
            Decision::Refuse(why) => self.refuse(req.method(), path, &why, peer),
        }
    }

    async fn forward<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let target = shorten(target);
        match self.send_to_engine(req).await {
            Ok(response) => {
                self.shared.forwarded.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%method, target, status = response.status().as_u16(), "forwarded");
                response
            }
            Err(e) => {
                tracing::warn!(path = %shorten(&path), engine = %self.shared.engine.display(), error = %e, "the engine did not answer");
                json_error(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "docker-socket-proxy cannot reach the Docker engine at {}: {e}; mount the engine's socket there or set --engine",
                        self.shared.engine.display()
                    ),
                )
            }
        }
    }

    async fn send_to_engine<B>(
        &self,
        req: Request<B>,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        let stream = UnixStream::connect(&self.shared.engine)
            .await
            .map_err(ForwardError::Connect)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ForwardError::Http)?;
        // Drives the engine connection until the response body has been read or dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "engine connection ended with an error");
            }
        });
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        // GET or HEAD: the allow-list forwards nothing else.
        let mut upstream = Request::builder()
            .method(req.method().clone())
            .uri(target)
            .body(Empty::<Bytes>::new())
            .map_err(ForwardError::Request)?;
        copy_end_to_end(req.headers(), upstream.headers_mut());
        upstream.headers_mut().remove(header::CONTENT_LENGTH);
        upstream
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("docker"));
        let response = sender
            .send_request(upstream)
            .await
            .map_err(ForwardError::Http)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ForwardError::Upgraded);
        }
        let (mut parts, body) = response.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        copy_end_to_end(&headers, &mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    fn refuse(
        &self,
        method: &Method,
        path: &str,
        why: &Refusal,
        peer: &Peer,
    ) -> Response<ProxyBody> {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        let shown = shorten(path);
        let reason = match why {
            Refusal::Upgrade => "connection upgrade",
            Refusal::NotAllowed => "not on the allow-list",
            Refusal::Parameter { .. } => "query parameter not allowed",
        };
        let key = format!("{method} {}", shorten(unversioned_path(path)));
        if self.first_refusal(key) {
            tracing::warn!(%method, path = %shown, reason, %peer, "refused (logged once per method and path)");
        } else {
            tracing::debug!(%method, path = %shown, reason, %peer, "refused");
        }
        let message = match why {
            Refusal::Upgrade => format!(
                "docker-socket-proxy refuses connection upgrades ({method} {shown}): attach, exec and other hijacked streams cannot pass this socket"
            ),
            Refusal::NotAllowed => format!(
                "docker-socket-proxy: {method} {shown} is not allowed on this socket; it forwards only {} (add a read with --allow \"GET /path\")",
                self.shared.allow.summary()
            ),
            Refusal::Parameter { rule, param } => format!(
                "docker-socket-proxy: the query parameter {param:?} is not allowed for {rule} on this socket"
            ),
        };
        json_error(StatusCode::FORBIDDEN, &message)
    }

    /// True the first time `key` is refused (while fewer than [`REMEMBERED_REFUSALS`] are
    /// remembered).
    fn first_refusal(&self, key: String) -> bool {
        let Ok(mut seen) = self.shared.logged_refusals.lock() else {
            return true;
        };
        if seen.contains(&key) {
            return false;
        }
        if seen.len() >= REMEMBERED_REFUSALS {
            return false;
        }
        seen.insert(key);
        true
    }
}

/// A failure to get the engine's answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{0}")]
    Http(#[source] hyper::Error),
    #[error("cannot build the request: {0}")]
    Request(#[source] hyper::http::Error),
    #[error("the engine switched protocols though no upgrade was asked for")]
    Upgraded,
}

/// Whether the request asks for another protocol on its connection (`Upgrade: tcp` of
/// attach and exec, `Upgrade: websocket`, `Connection: Upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        || headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Copies `from` into `to` without the hop-by-hop headers, nor those `Connection` names.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        let name_str = name.as_str();
        if HOP_BY_HOP.contains(&name_str) || named.iter().any(|n| n == name_str) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// The engine's error form: `{"message": "..."}`.
fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `path`, cut to [`LOGGED_PATH_MAX`] bytes (at a character boundary) with `...`.
fn shorten(path: &str) -> String {
    if path.len() <= LOGGED_PATH_MAX {
        return path.to_string();
    }
    let mut end = LOGGED_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_recognised_in_either_header() {
        let mut h = HeaderMap::new();
        assert!(!wants_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_upgrade(&h));
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        assert!(wants_upgrade(&h));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret-Hop"),
        );
        from.insert("x-secret-hop", HeaderValue::from_static("1"));
        from.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        from.insert("api-version", HeaderValue::from_static("1.41"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 1, "{to:?}");
        assert_eq!(
            to.get("api-version").map(|v| v.as_bytes()),
            Some(&b"1.41"[..])
        );
    }

    #[test]
    fn long_paths_are_cut_in_logs() {
        let long = format!("/{}", "é".repeat(300));
        let cut = shorten(&long);
        assert!(cut.len() <= LOGGED_PATH_MAX + 3 && cut.ends_with("..."));
        assert_eq!(shorten("/info"), "/info");
    }

    #[test]
    fn refusals_are_remembered_once_and_up_to_a_bound() {
        let proxy = Proxy::new("/nonexistent", AllowList::for_bridge(&[]));
        assert!(proxy.first_refusal("POST /a".into()));
        assert!(!proxy.first_refusal("POST /a".into()));
        for i in 0..REMEMBERED_REFUSALS * 2 {
            proxy.first_refusal(format!("POST /{i}"));
        }
        let remembered = proxy
            .shared
            .logged_refusals
            .lock()
            .map(|s| s.len())
            .unwrap_or(0);
        assert_eq!(remembered, REMEMBERED_REFUSALS);
    }
}
