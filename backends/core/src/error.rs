//! The error every backend returns.
//!
//! Store crates map their client library's errors onto these variants, so the bridge can decide
//! what to do (retry, re-open the session, give up) without knowing which store it talks to.

use std::time::Duration;

/// The cause of an error, kept as the error it was (a client library's, an I/O error) so that
/// a caller can look at it (`source()`, `downcast_ref`) instead of parsing a message.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error from a key-value store.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The store could not be reached or did not answer in time. Retry with backoff.
    #[error("cannot reach {store} at {endpoints}: {detail}")]
    Unavailable {
        store: &'static str,
        endpoints: String,
        /// What failed, for humans (it repeats the cause's message, so that a log line of this
        /// error alone says everything).
        detail: String,
        #[source]
        source: Option<Cause>,
    },
    /// The session (etcd lease, Consul session) that ties our records to this process is gone,
    /// usually because the store was unreachable for longer than the TTL. Open a new session and
    /// write every record again.
    #[error("the {store} session is gone ({detail}); a new one must be opened and every record re-written")]
    SessionLost { store: &'static str, detail: String },
    /// A write was attempted before [`crate::Publisher::open_session`] succeeded.
    #[error("no {store} session is open yet")]
    NoSession { store: &'static str },
    /// The store answered, but refused the request (permissions, a malformed request).
    #[error("{store} refused the request: {detail}")]
    Rejected {
        store: &'static str,
        detail: String,
        #[source]
        source: Option<Cause>,
    },
    /// A write conditional on leading ([`crate::Coordinator::put_value_fenced`]) was refused:
    /// the store no longer holds the election key for this leadership (another process may
    /// lead). Nothing was written; stop acting as leader and campaign again.
    #[error("{store} refused the write of {key}: this process no longer holds the leader key {leader_key}")]
    Fenced {
        store: &'static str,
        key: String,
        leader_key: String,
    },
    /// The TTL asked for is outside what the store accepts.
    #[error("a TTL of {ttl:?} is not accepted by {store}: {detail}")]
    InvalidTtl {
        store: &'static str,
        ttl: Duration,
        detail: String,
    },
}

/// `e` and its causes, joined with `: `, for a message that says everything on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether a request failed in the TLS handshake (an unknown CA, a refused client
/// certificate), as opposed to the network: a rustls error somewhere in its causes, itself or
/// inside an I/O error (as tokio-rustls reports it). Both stores' clients use rustls.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(err) = cause {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return true;
            }
        }
        cause = err.source();
    }
    false
}

/// What a store's calls return.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// `Err(InvalidTtl)` naming `store` and `detail` when `ttl` is shorter than `least`, the
/// shortest session the store grants.
pub fn require_ttl(
    store: &'static str,
    ttl: Duration,
    least: Duration,
    detail: &str,
) -> Result<()> {
    if ttl < least {
        return Err(BackendError::InvalidTtl {
            store,
            ttl,
            detail: detail.into(),
        });
    }
    Ok(())
}

impl BackendError {
    /// Whether waiting and retrying the same call can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unavailable { .. })
    }
}
