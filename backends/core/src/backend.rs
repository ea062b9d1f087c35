//! The two sides of a store: [`Publisher`] (the bridge writes) and [`Watcher`] (tools read).
//!
//! Both are record-level rather than raw key-value, because a store may do more than KV with a
//! record: Consul also registers it in its catalog.

use std::future::Future;
use std::time::Duration;

use futures::stream::BoxStream;

use crate::error::BackendError;
use crate::layout::{KeyLayout, ServiceKey};
use crate::record::{NodeRecord, ServiceRecord};

/// One key and its value, as read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
}

/// The publishing side, used by the bridge.
///
/// A publisher writes every record tied to a *session*: an etcd lease or a Consul session with
/// a TTL. While the bridge renews it, the records live; when the bridge or its node dies, the
/// store deletes them after the TTL. The bridge drives the session ([`open_session`],
/// [`renew_session`]) so that the logic of "session lost: open a new one and write everything
/// again" is written once, for every store.
///
/// [`open_session`]: Publisher::open_session
/// [`renew_session`]: Publisher::renew_session
pub trait Publisher: Send + Sync + 'static {
    /// The store's name for logs and metrics (`"etcd"`, `"consul"`).
    fn store_name(&self) -> &'static str;

    /// The key layout the records are written under.
    fn layout(&self) -> &KeyLayout;

    /// Opens a new session with this TTL. Records written afterwards are tied to it. An earlier
    /// session of this publisher is forgotten (left to expire).
    fn open_session(&self, ttl: Duration) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Renews the session. [`BackendError::SessionLost`] means the store no longer knows it.
    fn renew_session(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Ends the session. With `revoke`, the store deletes every record tied to it now; without,
    /// they live until the TTL runs out (see docs/operations.md on graceful stops).
    fn close_session(&self, revoke: bool) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes (creates or replaces) these records, tied to the session. Large batches are split
    /// as the store requires; a batch is not atomic as a whole.
    fn publish(
        &self,
        records: &[ServiceRecord],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Deletes these records.
    fn unpublish(
        &self,
        keys: &[ServiceKey],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes this bridge's node record, tied to the session.
    fn publish_node(
        &self,
        node: &NodeRecord,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Reads every value under `<prefix>/services/`, decoded or not: the caller decides what
    /// a foreign value means.
    fn list_services(&self) -> impl Future<Output = Result<Vec<KvEntry>, BackendError>> + Send;
}

/// What a watch of a prefix yields, in the style of kube-runtime's watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The complete current contents of the prefix. The first event of every watch, and again
    /// whenever the watcher had to re-list (a reconnect, a compacted history, an index that went
    /// backwards): replace everything you knew with this.
    Restarted(Vec<KvEntry>),
    /// A key was created or changed.
    Put(KvEntry),
    /// A key was deleted (or its lease or session expired).
    Deleted(String),
}

/// The watching side, used by tools that follow the records.
pub trait Watcher: Send + Sync + 'static {
    /// Follows every key under `prefix`. The stream never ends on its own: errors are yielded
    /// (for logging) and the watcher reconnects with backoff, then yields
    /// [`WatchEvent::Restarted`] again.
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>>;
}

/// How long before its lease or session can have expired a leader gives up leading when it
/// cannot renew: room for the difference between this host's clock and the store's, and for a
/// scheduler that runs us late.
pub const LEASE_SAFETY_MARGIN: Duration = Duration::from_secs(1);

/// The earliest instant the store can expire a lease or session: the *start* of the last
/// request that renewed it (or granted it) plus its TTL. The store starts its TTL when it
/// handles the request, never before we sent it, so this is never later than the store's
/// expiry. Shared by the renewal loop (which moves it) and the [`Leadership`] (which reads it).
#[derive(Debug, Clone)]
pub struct LeaseDeadline {
    ttl: Duration,
    at: tokio::sync::watch::Sender<tokio::time::Instant>,
}

impl LeaseDeadline {
    /// A lease granted by a request started at `started`.
    pub fn new(started: tokio::time::Instant, ttl: Duration) -> LeaseDeadline {
        LeaseDeadline {
            ttl,
            at: tokio::sync::watch::Sender::new(started + ttl),
        }
    }

    /// A renewal started at `started` succeeded.
    pub fn renewed(&self, started: tokio::time::Instant) {
        let at = started + self.ttl;
        self.at.send_if_modified(|old| {
            let later = at > *old;
            if later {
                *old = at;
            }
            later
        });
    }

    /// The earliest instant the store can expire the lease.
    pub fn at(&self) -> tokio::time::Instant {
        *self.at.borrow()
    }

    /// The instant a leader that could not renew gives up: [`LEASE_SAFETY_MARGIN`] before
    /// [`LeaseDeadline::at`].
    pub fn give_up_at(&self) -> tokio::time::Instant {
        self.at() - LEASE_SAFETY_MARGIN.min(self.ttl / 2)
    }

    /// How long leading is surely still valid: until [`LeaseDeadline::give_up_at`].
    pub fn valid_for(&self) -> Duration {
        self.give_up_at()
            .saturating_duration_since(tokio::time::Instant::now())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// What makes a store write conditional on still leading: the election key and the store's
/// token of this process's hold on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceToken {
    /// etcd: the create revision of this campaign's key under the election prefix (the
    /// election's `LeaderKey`); a write compares it in a transaction.
    CreateRevision(i64),
    /// Consul (and the in-memory store): the session holding the lock key; a write checks it
    /// in a transaction (`check-session`).
    Session(String),
}

/// A leader's fence: writes made with it ([`Coordinator::put_value_fenced`]) happen only while
/// the store still holds the election key for this leadership, and are refused with
/// [`BackendError::Fenced`] otherwise. It also knows how long the leadership is surely valid.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The key the store compares (etcd: the campaign's own key under the election prefix;
    /// Consul: the lock key).
    pub key: String,
    pub token: FenceToken,
    pub deadline: LeaseDeadline,
}

impl Fence {
    /// How long leading is surely still valid (see [`LeaseDeadline::valid_for`]).
    pub fn valid_for(&self) -> Duration {
        self.deadline.valid_for()
    }
}

/// Leadership of one key, held while the store keeps this process's lease or session.
///
/// Dropping it without [`Leadership::resign`] leaves the key to expire with the TTL (what
/// happens when the process dies).
pub struct Leadership {
    lost: futures::channel::oneshot::Receiver<String>,
    resign: Option<futures::future::BoxFuture<'static, ()>>,
    fence: Fence,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl Leadership {
    /// `lost` receives the reason when the store ends the leadership; `resign` gives it up;
    /// `fence` conditions writes on it and tells how long it is surely valid.
    pub fn new(
        lost: futures::channel::oneshot::Receiver<String>,
        resign: futures::future::BoxFuture<'static, ()>,
        fence: Fence,
    ) -> Leadership {
        Leadership {
            lost,
            resign: Some(resign),
            fence,
        }
    }

    /// The fence of this leadership, for conditional writes and for how long it is valid.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Resolves, with the reason, when leadership is lost: the lease or session expired or was
    /// ended, or no renewal succeeded in time, in which case it resolves at
    /// [`LeaseDeadline::give_up_at`], before the store can have expired the lease (so before
    /// another candidate can lead).
    pub async fn lost(&mut self) -> String {
        let mut moved = self.fence.deadline.at.subscribe();
        loop {
            let give_up_at = self.fence.deadline.give_up_at();
            tokio::select! {
                reason = &mut self.lost => {
                    return reason
                        .unwrap_or_else(|_| "the leadership keeper stopped".to_string());
                }
                _ = tokio::time::sleep_until(give_up_at) => {
                    if self.fence.deadline.give_up_at() <= tokio::time::Instant::now() {
                        return format!(
                            "no renewal succeeded in time: gave up {:?} before the {:?} TTL of the last renewal could expire",
                            LEASE_SAFETY_MARGIN.min(self.fence.deadline.ttl / 2),
                            self.fence.deadline.ttl,
                        );
                    }
                }
                _ = moved.changed() => {}
            }
        }
    }

    /// Gives leadership up at once, so another candidate takes over without waiting for a TTL.
    pub async fn resign(mut self) {
        if let Some(resign) = self.resign.take() {
            resign.await;
        }
    }
}

/// What a leader-elected tool (the replica-set reconciler) needs of the store besides watching:
/// an election, and plain values that outlive the process (a connection string, a status).
pub trait Coordinator: Send + Sync + 'static {
    /// Campaigns for `key`, announcing `holder` (for humans: a hostname, a task id). Resolves
    /// once this process leads; the lease or session (with `ttl`) is kept alive meanwhile and
    /// afterwards, until the [`Leadership`] is resigned, dropped, or lost.
    fn campaign(
        &self,
        key: String,
        holder: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<Leadership, BackendError>> + Send;

    /// Writes a plain value, tied to no session.
    fn put_value(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Writes a plain value, tied to no session, only if the store still holds the election
    /// key of `fence` for this leadership (in one transaction); [`BackendError::Fenced`]
    /// otherwise. Every write a leader makes as leader goes through this.
    fn put_value_fenced(
        &self,
        fence: &Fence,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Reads a plain value.
    fn get_value(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send;

    /// Deletes a plain value (nothing happens when there is none).
    fn delete_value(&self, key: &str) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Exponential backoff with jitter, as kube-runtime does it: starts at `initial`, doubles up to
/// `max`, each delay randomised to between half and all of its nominal value.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay; `jitter` in `[0, 1)` picks where in `[d/2, d]` it falls.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        nominal.mul_f64(0.5 + 0.5 * jitter)
    }

    /// Back to the initial delay, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
        let full: Vec<_> = (0..8).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(full[0], Duration::from_millis(800));
        assert_eq!(full[1], Duration::from_millis(1600));
        assert_eq!(full[5], Duration::from_millis(25600));
        assert_eq!(full[6], Duration::from_secs(30));
        assert_eq!(full[7], Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(400));
    }
}
