//! State transitions of a member, called with its state's lock held: member state, config
//! installation, term, step-down and step-up, oplog appends and the commit point.

use super::*;

impl Node {
    pub(crate) fn set_state(&self, st: &mut NodeState, new: MemberState) {
        if st.state != new {
            st.state = new;
            st.topology_counter += 1;
            self.inner.history.record(Event::StateChanged {
                node: self.me(),
                state: new.name(),
            });
        }
    }

    pub(super) fn set_me_arbiter_state(&self) {
        let mut st = self.lock();
        let arbiter = st
            .config()
            .and_then(|c| c.member_by_host(&self.me()))
            .is_some_and(|m| m.arbiter_only);
        if arbiter {
            self.set_state(&mut st, MemberState::Arbiter);
        }
    }

    /// Adopts `cfg` (already validated) and records it.
    pub(crate) fn install_config(
        &self,
        st: &mut NodeState,
        cfg: ReplSetConfig,
        source: ConfigSource,
    ) {
        let voters = cfg.voters().map(|m| m.id).collect();
        let first_config = st.durable.config.is_none();
        self.inner.history.record(Event::ConfigInstalled {
            node: self.me(),
            version: cfg.version,
            term: cfg.term,
            voters,
            source,
            config: cfg.to_document(true),
        });
        let mine = cfg
            .members
            .iter()
            .find(|m| self.is_self_fast(&m.host))
            .cloned();
        if let Some(m) = &mine {
            self.set_me(&m.host);
        }
        st.peers.retain(|h, _| cfg.member_by_host(h).is_some());
        st.durable.config = Some(cfg);
        st.config_barrier = st.last_applied();
        st.topology_counter += 1;
        match mine {
            None => {
                if st.state == MemberState::Primary {
                    self.step_down(st, "removed from the config");
                }
                self.set_state(st, MemberState::Removed);
            }
            Some(m) if m.arbiter_only => self.set_state(st, MemberState::Arbiter),
            Some(m) => {
                if st.state == MemberState::Primary && !m.is_electable() {
                    self.step_down(st, "not electable under the new config");
                }
                if matches!(st.state, MemberState::Startup | MemberState::Removed) {
                    // Added to a set it was not initiated in, a member that holds only what
                    // it wrote as a standalone (writes before any term: the users of the
                    // image's first start) has no oplog to catch up from. mongod starts an
                    // initial sync, which drops every database and copies the source's.
                    let oplog = &st.durable.store.oplog;
                    if first_config
                        && source == ConfigSource::Heartbeat
                        && !oplog.is_empty()
                        && oplog.iter().all(|e| e.optime.t == -1)
                    {
                        st.durable.store.truncate(0);
                    }
                    let next = if st.durable.store.oplog.is_empty() {
                        MemberState::Startup2
                    } else {
                        MemberState::Secondary
                    };
                    self.set_state(st, next);
                }
            }
        }
        self.inner.heartbeat_now.notify_one();
        self.notify();
    }

    /// Raises the term; a primary that learns of a newer term steps down.
    pub(crate) fn update_term(&self, st: &mut NodeState, term: i64) -> bool {
        if term > st.durable.term {
            st.durable.term = term;
            if st.state == MemberState::Primary {
                self.step_down(st, "saw a newer term");
            }
            if st.primary_host.as_deref() == Some(&self.me()) {
                st.primary_host = None;
            }
            self.notify();
            true
        } else {
            false
        }
    }

    pub(crate) fn step_down(&self, st: &mut NodeState, reason: &str) {
        if st.state != MemberState::Primary {
            return;
        }
        self.inner.history.record(Event::SteppedDown {
            node: self.me(),
            term: st.durable.term,
            reason: reason.to_string(),
        });
        tracing::info!(me = %self.me(), reason, "stepping down");
        self.set_state(st, MemberState::Secondary);
        st.election_id = None;
        st.primary_host = None;
        st.last_primary_contact = Instant::now();
        self.notify();
    }

    pub(crate) fn become_primary(&self, st: &mut NodeState) {
        let term = st.durable.term;
        self.set_state(st, MemberState::Primary);
        st.primary_host = Some(self.me());
        st.election_id = Some(election_id(term));
        st.election_date = Some(DateTime::now());
        self.inner.history.record(Event::Elected {
            node: self.me(),
            term,
        });
        tracing::info!(me = %self.me(), term, "elected primary");
        // The config takes the new term, unless it has none (installed by a forced
        // reconfig): "If the config doesn't have a term, don't change it"
        // (`signalDrainComplete`, replication_coordinator_impl.cpp).
        if let Some(cfg) = st
            .config()
            .filter(|c| c.term != crate::config::UNINITIALIZED_TERM && c.term != term)
            .cloned()
        {
            let mut cfg = cfg;
            cfg.term = term;
            self.install_config(st, cfg, ConfigSource::StepUp);
        }
        let e = self.append_noop(st, bson::doc! {"msg": "new primary"});
        st.election_time = Some(e.ts);
        // Commitment of the current config now needs an entry of this term committed.
        st.config_barrier = e;
        self.recompute_commit_point(st);
        self.notify();
    }

    /// Appends a no-op entry in the current term; returns its optime.
    pub(crate) fn append_noop(&self, st: &mut NodeState, o: Document) -> OpTime {
        self.append(st, "n", String::new(), o)
    }

    pub(crate) fn append(&self, st: &mut NodeState, op: &str, ns: String, o: Document) -> OpTime {
        let ts = next_timestamp(st.last_applied().ts);
        let optime = OpTime {
            ts,
            t: st.durable.term,
        };
        st.durable.store.apply(OplogEntry {
            optime,
            op: op.to_string(),
            ns,
            o,
            wall: DateTime::now(),
        });
        optime
    }

    /// The primary's commit point: the newest optime that a majority of data-bearing voters
    /// have applied, advanced only to an entry of the current term.
    pub(crate) fn recompute_commit_point(&self, st: &mut NodeState) {
        if st.state != MemberState::Primary {
            return;
        }
        let Some(cfg) = st.config() else { return };
        let need = cfg.write_majority();
        let mut applied: Vec<OpTime> = cfg
            .voters()
            .filter(|m| !m.arbiter_only)
            .map(|m| {
                if m.host == self.me() {
                    st.last_applied()
                } else {
                    st.peers
                        .get(&m.host)
                        .map(|p| p.applied)
                        .unwrap_or(OpTime::NULL)
                }
            })
            .collect();
        if need == 0 || applied.len() < need {
            return;
        }
        applied.sort_by(|a, b| b.cmp(a));
        let candidate = applied[need - 1];
        if candidate.t == st.durable.term && candidate > st.commit_point {
            st.commit_point = candidate;
            self.notify();
        }
    }

    /// Whether the current config is committed: a majority of its voters have it, and the
    /// commit point has reached everything written before it (`commitmentStatus`). A config
    /// installed by a forced reconfig (term -1) only needs the first ("Skip the waiting if
    /// the current config is from a force reconfig", `CmdReplSetReconfig::run`).
    pub(crate) fn config_committed(&self, st: &NodeState) -> bool {
        let Some(cfg) = st.config() else { return false };
        let have = cfg
            .voters()
            .filter(|m| {
                m.host == self.me()
                    || st.peers.get(&m.host).is_some_and(|p| {
                        let theirs = crate::config::ConfigVersionAndTerm {
                            version: p.config_version,
                            term: p.config_term,
                        };
                        p.healthy && theirs == cfg.version_and_term()
                    })
            })
            .count();
        have >= cfg.majority_vote_count()
            && (cfg.term == crate::config::UNINITIALIZED_TERM
                || st.commit_point >= st.config_barrier)
    }
}
