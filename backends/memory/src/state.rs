//! The data of one in-memory store: keys, sessions, registered watches, and the faults a test
//! asked for. Every change goes through [`State`]'s methods, which tell the watches about it in
//! the order it happened, under the same lock.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use backend_core::{BackendError, KvEntry, WatchEvent};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::{SessionId, STORE};

/// One value and the session that holds it (`None`: a plain value that outlives every
/// session).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) value: Vec<u8>,
    pub(crate) session: Option<SessionId>,
}

/// A session (an etcd lease, a Consul session): alive until `deadline` unless renewed.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) ttl: Duration,
    pub(crate) deadline: Instant,
    /// Told why, when the session ends (a leadership's `lost`).
    pub(crate) on_end: Vec<futures::channel::oneshot::Sender<String>>,
}

/// What a registered watch receives.
#[derive(Debug)]
pub(crate) enum Signal {
    Event(WatchEvent),
    /// The watch is broken (an outage, [`crate::MemoryCluster::break_watches`]): it must list
    /// again.
    Broken(String),
}

#[derive(Debug)]
pub(crate) struct Registration {
    pub(crate) prefix: String,
    pub(crate) tx: mpsc::UnboundedSender<Signal>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) name: String,
    kv: BTreeMap<String, Entry>,
    pub(crate) sessions: HashMap<SessionId, Session>,
    next_session: u64,
    watches: Vec<Registration>,
    /// How many of the next direct calls fail as unavailable.
    pub(crate) fail_next: usize,
    /// How many of the next direct calls the store refuses (after the unavailable ones).
    pub(crate) reject_next: usize,
    /// Every call fails as unavailable, watches included, until cleared.
    pub(crate) unavailable: bool,
    /// Bumped at every change, for waiters (a campaign waiting for a free key).
    revision: watch::Sender<u64>,
}

impl State {
    pub(crate) fn new(name: String) -> State {
        State {
            name,
            kv: BTreeMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            watches: Vec::new(),
            fail_next: 0,
            reject_next: 0,
            unavailable: false,
            revision: watch::Sender::new(0),
        }
    }

    fn unreachable(&self, detail: &str) -> BackendError {
        BackendError::Unavailable {
            store: STORE,
            endpoints: self.name.clone(),
            detail: detail.to_string(),
            source: None,
        }
    }

    /// Whether a call the code under test makes itself may go ahead: not during an outage,
    /// and not while failures or refusals were asked for (each call uses one).
    pub(crate) fn admit(&mut self, what: &str) -> Result<(), BackendError> {
        if self.unavailable {
            return Err(self.unreachable(&format!("{what}: the store is down")));
        }
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Err(self.unreachable(&format!("{what}: an injected failure")));
        }
        if self.reject_next > 0 {
            self.reject_next -= 1;
            return Err(BackendError::Rejected {
                store: STORE,
                detail: format!("{what}: an injected refusal"),
                source: None,
            });
        }
        Ok(())
    }

    /// Whether a background call (a watch's list, a leadership's renewal) may go ahead: only
    /// an outage stops it.
    pub(crate) fn admit_background(&self, what: &str) -> Result<(), BackendError> {
        if self.unavailable {
            return Err(self.unreachable(&format!("{what}: the store is down")));
        }
        Ok(())
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn changed(&mut self) {
        self.revision.send_modify(|r| *r += 1);
    }

    fn tell(&mut self, key: &str, event: impl Fn() -> WatchEvent) {
        self.watches.retain(|w| {
            if !key.starts_with(&w.prefix) {
                return !w.tx.is_closed();
            }
            w.tx.send(Signal::Event(event())).is_ok()
        });
    }

    pub(crate) fn open_session(&mut self, ttl: Duration) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                ttl,
                deadline: Instant::now() + ttl,
                on_end: Vec::new(),
            },
        );
        id
    }

    /// Renews a session; `false` when it no longer exists.
    pub(crate) fn renew(&mut self, id: SessionId) -> bool {
        match self.sessions.get_mut(&id) {
            Some(s) => {
                s.deadline = Instant::now() + s.ttl;
                true
            }
            None => false,
        }
    }

    /// Ends a session: every key it holds is deleted (etcd's lease revocation, Consul's
    /// `Behavior: delete`), and whoever waits on it is told `reason`.
    pub(crate) fn end_session(&mut self, id: SessionId, reason: &str) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        tracing::debug!(store = STORE, session = %id, reason, "session ended");
        let held: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, e)| e.session == Some(id))
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            self.delete(&key);
        }
        for tx in session.on_end {
            let _ = tx.send(reason.to_string());
        }
        self.changed();
    }

    pub(crate) fn put(&mut self, key: &str, value: Vec<u8>, session: Option<SessionId>) {
        self.kv.insert(
            key.to_string(),
            Entry {
                value: value.clone(),
                session,
            },
        );
        self.tell(key, || {
            WatchEvent::Put(KvEntry {
                key: key.to_string(),
                value: value.clone(),
            })
        });
        self.changed();
    }

    pub(crate) fn delete(&mut self, key: &str) {
        if self.kv.remove(key).is_some() {
            self.tell(key, || WatchEvent::Deleted(key.to_string()));
            self.changed();
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Entry> {
        self.kv.get(key)
    }

    pub(crate) fn list(&self, prefix: &str) -> Vec<KvEntry> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| KvEntry {
                key: k.clone(),
                value: e.value.clone(),
            })
            .collect()
    }

    /// Lists `prefix` and registers a watch of it, at one point in the history: the watch
    /// gets exactly the changes after the list.
    pub(crate) fn list_and_register(
        &mut self,
        prefix: &str,
    ) -> (Vec<KvEntry>, mpsc::UnboundedReceiver<Signal>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watches.push(Registration {
            prefix: prefix.to_string(),
            tx,
        });
        (self.list(prefix), rx)
    }

    pub(crate) fn break_watches(&mut self, why: &str) {
        for w in self.watches.drain(..) {
            let _ = w.tx.send(Signal::Broken(why.to_string()));
        }
    }
}
