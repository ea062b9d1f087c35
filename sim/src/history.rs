//! A readable record of what the set did: every config a member installed, every election,
//! every stepdown and rollback, in order. Tests read it back to check safety properties, e.g.
//! that consecutive configs differ by at most one voter.

use bson::Document;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// How a member came to install a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    Initiate,
    Reconfig,
    ForceReconfig,
    /// Learnt from a heartbeat.
    Heartbeat,
    /// The primary's own reconfig that removes `newlyAdded`.
    NewlyAddedRemoval,
    /// A new primary rewrites the config with its term (same version), as MongoDB 4.4+ does
    /// (jstests/replsets/stepup_increments_config_term.js).
    StepUp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ConfigInstalled {
        node: String,
        version: i64,
        term: i64,
        /// `_id`s of the members that count as voters (not `newlyAdded`).
        voters: Vec<i64>,
        source: ConfigSource,
        config: Document,
    },
    Elected {
        node: String,
        term: i64,
    },
    SteppedDown {
        node: String,
        term: i64,
        reason: String,
    },
    RolledBack {
        node: String,
        /// The oplog entries undone.
        entries: Vec<Document>,
    },
    StateChanged {
        node: String,
        state: &'static str,
    },
}

/// Shared by all members of a simulated set.
#[derive(Debug, Clone, Default)]
pub struct History {
    events: Arc<Mutex<Vec<(SystemTime, Event)>>>,
}

impl History {
    pub fn record(&self, e: Event) {
        tracing::info!(event = ?EventSummary(&e), "history");
        if let Ok(mut v) = self.events.lock() {
            v.push((SystemTime::now(), e));
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .map(|v| v.iter().map(|(_, e)| e.clone()).collect())
            .unwrap_or_default()
    }

    /// The distinct configs that were installed by a primary (initiate, reconfig, force,
    /// newlyAdded removal), in order: the set's config history.
    pub fn configs(&self) -> Vec<Event> {
        self.events()
            .into_iter()
            .filter(|e| {
                matches!(e, Event::ConfigInstalled { source, .. } if *source != ConfigSource::Heartbeat)
            })
            .collect()
    }

    /// Who was elected in which term, in order.
    pub fn elections(&self) -> Vec<(String, i64)> {
        self.select(|e| match e {
            Event::Elected { node, term } => Some((node, term)),
            _ => None,
        })
    }

    /// Who rolled back which entries, in order.
    pub fn rollbacks(&self) -> Vec<(String, Vec<Document>)> {
        self.select(|e| match e {
            Event::RolledBack { node, entries } => Some((node, entries)),
            _ => None,
        })
    }

    fn select<T>(&self, f: impl FnMut(Event) -> Option<T>) -> Vec<T> {
        self.events().into_iter().filter_map(f).collect()
    }

    /// One line per event, for a failing test's message.
    pub fn render(&self) -> String {
        self.events()
            .iter()
            .map(|e| format!("{:?}\n", EventSummary(e)))
            .collect()
    }
}

struct EventSummary<'a>(&'a Event);

impl std::fmt::Debug for EventSummary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Event::ConfigInstalled {
                node,
                version,
                term,
                voters,
                source,
                ..
            } => write!(
                f,
                "{node}: config {{version: {version}, term: {term}}} voters {voters:?} via {source:?}"
            ),
            Event::Elected { node, term } => write!(f, "{node}: elected in term {term}"),
            Event::SteppedDown { node, term, reason } => {
                write!(f, "{node}: stepped down in term {term}: {reason}")
            }
            Event::RolledBack { node, entries } => {
                write!(f, "{node}: rolled back {} entries", entries.len())
            }
            Event::StateChanged { node, state } => write!(f, "{node}: now {state}"),
        }
    }
}
