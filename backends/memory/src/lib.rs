//! An in-memory store, **for unit tests of timing logic only**.
//!
//! It implements the same traits as the etcd and Consul backends ([`Publisher`], [`Watcher`],
//! [`Coordinator`]) and keeps the same backend contract (test-support's `contract`, run by this
//! crate's tests as by theirs), so code written against the traits can be tested in
//! milliseconds, with `tokio::time::pause()` and `advance()` driving TTLs, backoffs and grace
//! periods. It is a stand-in for a store, not a store: nothing is persisted, nothing is shared
//! between processes, and it knows nothing of etcd's revisions or Consul's catalog. What only a
//! real store can show (its wire format, its real failure modes, its own timing) stays in the
//! suites that run against the real etcd and Consul.
//!
//! What it keeps of the real stores:
//!
//! * **Sessions with a TTL on tokio's clock.** A session ends when it is not renewed within its
//!   TTL (exactly at the TTL: the earliest a real store may end it; Consul may wait up to twice
//!   as long), when it is closed with `revoke`, or when a test ends it
//!   ([`MemoryCluster::expire_session`]). Every record written with it is deleted then, as
//!   etcd does for a lease and Consul for a session with `Behavior: delete`.
//! * **Watches** start with the complete contents of the prefix ([`WatchEvent::Restarted`]),
//!   then yield every `Put` and `Deleted` in the order the changes happened (a put yields an
//!   event even when the value is unchanged, as etcd does). A broken watch (an outage,
//!   [`MemoryCluster::break_watches`]) yields an error, backs off as the real watchers do
//!   (800 ms doubling to 30 s, with jitter) and lists again.
//! * **Elections**: one leader per key at a time; a campaign waits while the key is held; a
//!   leader's session is renewed every TTL/3 by a task until the [`Leadership`] is resigned
//!   (the key is free at once) or dropped (the key is free once the TTL runs out, as when the
//!   process dies); a leader is told when its session ends.
//! * **Writes are conditional on the session**: a write with a session that has ended fails
//!   with [`BackendError::SessionLost`], and one before any session with
//!   [`BackendError::NoSession`]. A record written with a new session replaces the one a
//!   previous session held (Consul's `delete` + `lock`, etcd's put with the new lease).
//!
//! Controls a test needs, on [`MemoryCluster`]: end a session now, make the next N calls fail
//! as unavailable ([`MemoryCluster::fail_next`]), take the store down and back
//! ([`MemoryCluster::set_unavailable`]), break every watch so it must list again.
//!
//! Several [`MemoryStore`]s made by one [`MemoryCluster`] see the same data, each with its own
//! session, like several processes talking to one etcd.

mod state;

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use backend_core::{
    BackendError, Backoff, Coordinator, KeyLayout, KvEntry, Leadership, NodeRecord, Publisher,
    Result, ServiceKey, ServiceRecord, WatchEvent, Watcher,
};
use futures::stream::BoxStream;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use state::{Signal, State};

const STORE: &str = "memory";

/// A session's id, as a lease id or a session id of a real store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The store itself: its data, and the controls of a test. Cloning it gives another handle on
/// the same data.
#[derive(Debug, Clone)]
pub struct MemoryCluster {
    shared: Arc<Mutex<State>>,
}

impl Default for MemoryCluster {
    fn default() -> Self {
        MemoryCluster::new()
    }
}

impl MemoryCluster {
    /// An empty store, named `memory` in errors.
    pub fn new() -> MemoryCluster {
        MemoryCluster::named("memory")
    }

    /// An empty store whose errors name `name` as its address (a test of an error message
    /// that must name the address it was given).
    pub fn named(name: &str) -> MemoryCluster {
        MemoryCluster {
            shared: Arc::new(Mutex::new(State::new(name.to_string()))),
        }
    }

    /// A client of this store, writing under `layout`, with no session yet.
    pub fn client(&self, layout: KeyLayout) -> MemoryStore {
        MemoryStore {
            cluster: self.clone(),
            layout,
            session: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// The sessions alive now, oldest first.
    pub fn sessions(&self) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = self.lock().sessions.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Ends a session now, as its expiry would: its records are deleted, its leader is told.
    pub fn expire_session(&self, id: SessionId) {
        self.lock()
            .end_session(id, &format!("session {id} expired"));
    }

    /// Ends every session now (an operator revoking every lease, a store that lost them).
    pub fn expire_all_sessions(&self) {
        let mut state = self.lock();
        let ids: Vec<SessionId> = state.sessions.keys().copied().collect();
        for id in ids {
            state.end_session(id, &format!("session {id} expired"));
        }
    }

    /// Makes the next `n` calls of the traits' methods fail as unavailable (a transient
    /// error). Background work (the lists of watches, the renewals of leaderships) is not
    /// counted, so a test knows which calls fail.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_next = n;
    }

    /// Makes the next `n` calls of the traits' methods fail as refused
    /// ([`BackendError::Rejected`], as for a permission the store's user lacks): an error that
    /// retrying does not heal. Counted like [`MemoryCluster::fail_next`], after it.
    pub fn reject_next(&self, n: usize) {
        self.lock().reject_next = n;
    }

    /// Takes the store down (every call, background ones included, fails as unavailable, and
    /// every watch breaks) or brings it back. Sessions are not renewed while it is down, so
    /// they end when their TTL runs out, as a real store's would.
    pub fn set_unavailable(&self, down: bool) {
        let mut state = self.lock();
        state.unavailable = down;
        if down {
            state.break_watches("the store went down");
        }
    }

    /// Breaks every watch: each yields an error, then lists again (a compacted history, an
    /// index that went backwards, a dropped connection).
    pub fn break_watches(&self) {
        self.lock()
            .break_watches("the watch was broken by the test");
    }

    /// The value of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().get(key).map(|e| e.value.clone())
    }

    /// Every key and value under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Vec<KvEntry> {
        self.lock().list(prefix)
    }

    /// The session that holds `key`, if the key exists and is tied to one.
    pub fn holder_of(&self, key: &str) -> Option<SessionId> {
        self.lock().get(key).and_then(|e| e.session)
    }

    /// Opens a session and starts the task that ends it when it is not renewed in time.
    fn open_session(&self, state: &mut State, ttl: Duration) -> SessionId {
        let id = state.open_session(ttl);
        tokio::spawn(expire_when_due(Arc::downgrade(&self.shared), id));
        id
    }
}

fn lock<T>(shared: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data: every method completes its
    // change before it can panic, so a poisoned lock is still usable.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sleeps until the session's deadline (which renewals move), ends it once the deadline has
/// passed. Stops when the session is gone or the store dropped.
async fn expire_when_due(shared: Weak<Mutex<State>>, id: SessionId) {
    loop {
        let deadline = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let state = lock(&shared);
            match state.sessions.get(&id) {
                Some(s) => s.deadline,
                None => return,
            }
        };
        tokio::time::sleep_until(deadline).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared);
        let due = match state.sessions.get(&id) {
            Some(s) => s.deadline <= Instant::now(),
            None => return,
        };
        if due {
            state.end_session(id, &format!("session {id} was not renewed within its TTL"));
            return;
        }
    }
}

/// One client of a [`MemoryCluster`]: a publisher with its own session, a watcher, a
/// candidate.
#[derive(Debug)]
pub struct MemoryStore {
    cluster: MemoryCluster,
    layout: KeyLayout,
    session: Mutex<Option<SessionId>>,
}

impl MemoryStore {
    /// A client of a store of its own (see [`MemoryCluster::client`] for several clients of
    /// one store).
    pub fn new(layout: KeyLayout) -> MemoryStore {
        MemoryCluster::new().client(layout)
    }

    /// The store this client talks to, for a test's controls.
    pub fn cluster(&self) -> &MemoryCluster {
        &self.cluster
    }

    /// This publisher's session, if one is open.
    pub fn session(&self) -> Option<SessionId> {
        *lock(&self.session)
    }

    /// Ends this publisher's session now, as its expiry would.
    pub fn expire_session_now(&self) {
        if let Some(id) = self.session() {
            self.cluster.expire_session(id);
        }
    }

    /// The session to write with: [`BackendError::NoSession`] before one is opened,
    /// [`BackendError::SessionLost`] (and forgotten) when the store ended it.
    fn live_session(&self, state: &State) -> Result<SessionId, BackendError> {
        let mut mine = lock(&self.session);
        let id = mine.ok_or(BackendError::NoSession { store: STORE })?;
        if state.sessions.contains_key(&id) {
            return Ok(id);
        }
        *mine = None;
        Err(BackendError::SessionLost {
            store: STORE,
            detail: format!("session {id} is gone"),
        })
    }

    fn write_with_session(
        &self,
        what: &str,
        kvs: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit(what)?;
        let id = self.live_session(&state)?;
        for (key, value) in kvs {
            state.put(&key, value, Some(id));
        }
        Ok(())
    }
}

impl Publisher for MemoryStore {
    fn store_name(&self) -> &'static str {
        STORE
    }

    async fn open_session(&self, ttl: Duration) -> Result<(), BackendError> {
        let least = Duration::from_secs(1);
        backend_core::require_ttl(
            STORE,
            ttl,
            least,
            "a session lasts at least 1 s (etcd's least lease)",
        )?;
        let mut state = self.cluster.lock();
        state.admit("open session")?;
        let id = self.cluster.open_session(&mut state, ttl);
        tracing::debug!(store = STORE, session = %id, ttl_secs = ttl.as_secs(), "opened session");
        *lock(&self.session) = Some(id);
        Ok(())
    }

    async fn renew_session(&self) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit("renew session")?;
        let id = self.live_session(&state)?;
        state.renew(id);
        Ok(())
    }

    async fn close_session(&self, revoke: bool) -> Result<(), BackendError> {
        let Some(id) = lock(&self.session).take() else {
            return Ok(());
        };
        if revoke {
            let mut state = self.cluster.lock();
            state.admit("revoke session")?;
            state.end_session(id, &format!("session {id} was revoked"));
        }
        Ok(())
    }

    async fn publish(&self, records: &[ServiceRecord]) -> Result<(), BackendError> {
        self.write_with_session(
            "publish",
            records
                .iter()
                .map(|r| (self.layout.service_key(&r.service, &r.id), r.to_json())),
        )
    }

    async fn unpublish(&self, keys: &[ServiceKey]) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit("unpublish")?;
        for k in keys {
            state.delete(&self.layout.service_key(&k.service, &k.id));
        }
        Ok(())
    }

    async fn publish_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        self.write_with_session(
            "publish node",
            [(self.layout.node_key(&node.node_id), node.to_json())],
        )
    }

    async fn list_services(&self) -> Result<Vec<KvEntry>, BackendError> {
        let mut state = self.cluster.lock();
        state.admit("list services")?;
        Ok(state.list(&self.layout.services_prefix()))
    }

    fn layout(&self) -> &KeyLayout {
        &self.layout
    }
}

impl Watcher for MemoryStore {
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>> {
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(run_watch(Arc::downgrade(&self.cluster.shared), prefix, tx));
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

type WatchSender = mpsc::Sender<Result<WatchEvent, BackendError>>;

/// List and follow; on a break, back off as the real watchers do and list again. Ends when
/// the receiving side or the store is dropped.
async fn run_watch(shared: Weak<Mutex<State>>, prefix: String, tx: WatchSender) {
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    loop {
        let listed = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = lock(&shared);
            state
                .admit_background("watch list")
                .map(|()| state.list_and_register(&prefix))
        };
        let error = match listed {
            Err(e) => e,
            Ok((entries, mut signals)) => {
                if tx.send(Ok(WatchEvent::Restarted(entries))).await.is_err() {
                    return;
                }
                backoff.reset();
                loop {
                    let signal = tokio::select! {
                        s = signals.recv() => s,
                        _ = tx.closed() => return,
                    };
                    match signal {
                        Some(Signal::Event(event)) => {
                            if tx.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Some(Signal::Broken(why)) => {
                            break BackendError::Unavailable {
                                store: STORE,
                                endpoints: name(&shared),
                                detail: format!("watch of {prefix} broken: {why}"),
                                source: None,
                            }
                        }
                        None => return, // the store is gone
                    }
                }
            }
        };
        tracing::debug!(store = STORE, %prefix, error = %error, "watch broken; will list again");
        if tx.send(Err(error)).await.is_err() {
            return;
        }
        let delay = backoff.next_delay(jitter());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return,
        }
    }
}

fn name(shared: &Weak<Mutex<State>>) -> String {
    shared
        .upgrade()
        .map(|s| lock(&s).name.clone())
        .unwrap_or_else(|| STORE.to_string())
}

/// A jitter in `[0, 1)` without a random number generator: tests with paused time stay
/// reproducible, and successive delays still differ.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // The golden-ratio sequence: evenly spread over [0, 1).
    (n as f64 * 0.618_033_988_749_895).fract()
}

impl Coordinator for MemoryStore {
    /// A session with `ttl`, renewed every TTL/3 by a task, and the key held with it once it
    /// is free (absent, or held by no session).
    async fn campaign(&self, key: String, holder: String, ttl: Duration) -> Result<Leadership> {
        let ttl = ttl.max(Duration::from_secs(1));
        // The session's own deadline is the instant of its last renewal + TTL, as here.
        let deadline = backend_core::LeaseDeadline::new(tokio::time::Instant::now(), ttl);
        let (lost_tx, lost_rx) = futures::channel::oneshot::channel();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        let (id, mut changes) = {
            let mut state = self.cluster.lock();
            state.admit("campaign")?;
            let id = self.cluster.open_session(&mut state, ttl);
            if let Some(s) = state.sessions.get_mut(&id) {
                s.on_end.push(lost_tx);
            }
            (id, state.subscribe())
        };
        tokio::spawn(keep_session_alive(
            Arc::downgrade(&self.cluster.shared),
            id,
            deadline.clone(),
            stop_rx,
        ));
        loop {
            {
                let mut state = self.cluster.lock();
                state.admit_background("campaign")?;
                if !state.sessions.contains_key(&id) {
                    return Err(BackendError::SessionLost {
                        store: STORE,
                        detail: format!("session {id} of the campaign for {key} ended"),
                    });
                }
                if state.get(&key).is_none_or(|e| e.session.is_none()) {
                    state.put(&key, holder.clone().into_bytes(), Some(id));
                    break;
                }
                changes.mark_unchanged();
            }
            if changes.changed().await.is_err() {
                return Err(BackendError::Unavailable {
                    store: STORE,
                    endpoints: STORE.into(),
                    detail: "the store was dropped".into(),
                    source: None,
                });
            }
        }
        tracing::debug!(store = STORE, %key, %holder, session = %id, "elected leader");
        let fence = backend_core::Fence {
            key: key.clone(),
            token: backend_core::FenceToken::Session(id.to_string()),
            deadline,
        };
        let shared = Arc::downgrade(&self.cluster.shared);
        let resign = async move {
            let _ = stop_tx.send(());
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = lock(&shared);
            // A resignation that cannot reach the store leaves the session to its TTL.
            if state.admit_background("resign").is_err() {
                return;
            }
            if state.get(&key).is_some_and(|e| e.session == Some(id)) {
                state.delete(&key);
            }
            state.end_session(id, &format!("session {id} resigned"));
        }
        .boxed();
        Ok(Leadership::new(lost_rx, resign, fence))
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit("put value")?;
        state.put(key, value, None);
        Ok(())
    }

    /// As Consul's `check-session` + `set`: the put happens, under the same lock, only while
    /// the election key is held by the fence's session.
    async fn put_value_fenced(
        &self,
        fence: &backend_core::Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit("put value as leader")?;
        let held = match &fence.token {
            backend_core::FenceToken::Session(session) => state
                .get(&fence.key)
                .and_then(|e| e.session)
                .is_some_and(|id| &id.to_string() == session),
            backend_core::FenceToken::CreateRevision(_) => false,
        };
        if !held {
            return Err(BackendError::Fenced {
                store: STORE,
                key: key.to_string(),
                leader_key: fence.key.clone(),
            });
        }
        state.put(key, value, None);
        Ok(())
    }

    async fn delete_value(&self, key: &str) -> Result<(), BackendError> {
        let mut state = self.cluster.lock();
        state.admit("delete value")?;
        state.delete(key);
        Ok(())
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let mut state = self.cluster.lock();
        state.admit("get value")?;
        Ok(state.get(key).map(|e| e.value.clone()))
    }
}

/// Renews a leader's session every TTL/3 (after a failed renewal: every
/// [`RETRY_AFTER_FAILURE`], as the stores' keep-alive does) until `stop` fires or is dropped
/// (a dropped [`Leadership`]: the process is gone), or the session ended, and moves the
/// leadership's deadline at each renewal. Renewals during an outage do not reach the store, so
/// the leadership gives up before the TTL and the session ends with it.
///
/// [`RETRY_AFTER_FAILURE`]: backend_core::keepalive::RETRY_AFTER_FAILURE
async fn keep_session_alive(
    shared: Weak<Mutex<State>>,
    id: SessionId,
    deadline: backend_core::LeaseDeadline,
    mut stop: futures::channel::oneshot::Receiver<()>,
) {
    let every = deadline.ttl() / 3;
    let mut wait = every;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut state = lock(&shared);
        if state.admit_background("renew leader session").is_ok() {
            if !state.renew(id) {
                return;
            }
            deadline.renewed(tokio::time::Instant::now());
            wait = every;
        } else {
            wait = backend_core::keepalive::RETRY_AFTER_FAILURE.min(every);
        }
    }
}

#[cfg(test)]
mod tests;
