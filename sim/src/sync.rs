//! Oplog fetching from a sync source (an awaitData find on `local.oplog.rs`), applying it,
//! initial sync, rollback, and `replSetUpdatePosition`, which moves the primary's commit point.

use bson::{doc, Bson, Document};
use std::time::{Duration, Instant};

use crate::config::{float, number};
use crate::error::ServerError;
use crate::history::Event;
use crate::node::{MemberState, Node};
use crate::oplog::{OpTime, OplogEntry};

use crate::repl::PEER_TIMEOUT;

impl Node {
    // ---- oplog fetching ----

    pub(crate) async fn sync_loop(&self) {
        let mut reported = OpTime::NULL;
        while !self.inner.cancel.is_cancelled() {
            let stopped = self
                .inner
                .replication_stopped
                .load(std::sync::atomic::Ordering::SeqCst);
            let source = if stopped {
                None
            } else {
                self.choose_sync_source()
            };
            let Some(source) = source else {
                // Re-evaluate on the next heartbeat news, or in 200 ms.
                self.wait_until(
                    Some(tokio::time::Instant::now() + Duration::from_millis(200)),
                    |_| None::<()>,
                )
                .await;
                tokio::task::yield_now().await;
                continue;
            };
            match self.fetch_once(&source).await {
                Ok(()) => {
                    let applied = self.last_applied();
                    if applied != reported && self.update_position(&source).await {
                        reported = applied;
                    }
                }
                Err(e) => {
                    tracing::debug!(me = %self.me(), source, error = %e, "oplog fetch failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The primary if it is reachable, otherwise the healthy member furthest ahead of us.
    fn choose_sync_source(&self) -> Option<String> {
        let mut st = self.lock();
        let ok_state = matches!(
            st.state,
            MemberState::Secondary
                | MemberState::Startup2
                | MemberState::Recovering
                | MemberState::Rollback
        );
        let source = if !ok_state {
            None
        } else if let Some(p) = st
            .primary_host
            .clone()
            .filter(|p| p != &self.me() && st.peers.get(p).is_some_and(|v| v.healthy))
        {
            Some(p)
        } else {
            let mine = st.last_applied();
            st.peers
                .iter()
                .filter(|(_, p)| {
                    p.healthy
                        && matches!(p.state, MemberState::Primary | MemberState::Secondary)
                        && p.applied > mine
                })
                .max_by_key(|(_, p)| p.applied)
                .map(|(h, _)| h.clone())
        };
        if st.sync_source != source {
            tracing::debug!(me = %self.me(), ?source, "sync source");
            st.sync_source = source.clone();
        }
        source
    }

    async fn fetch_once(&self, source: &str) -> Result<(), String> {
        let last = self.lock().durable.store.oplog.last().map(|e| e.optime);
        let filter = match last {
            Some(op) => doc! {"ts": {"$gte": op.ts}},
            None => doc! {},
        };
        let req = doc! {"find": "oplog.rs", "filter": filter, "tailable": true, "awaitData": true, "maxAwaitTimeMS": 1000i64, "$db": "local"};
        let resp = self
            .inner
            .peers
            .run(source, &req, PEER_TIMEOUT + Duration::from_secs(1))
            .await
            .map_err(|e| e.to_string())?;
        let entries = parse_batch(&resp)?;
        let repl = resp.get_document("$replData").ok();
        let source_commit = repl.and_then(|r| OpTime::from_bson(r.get("lastOpCommitted")));
        let need_rollback = self.apply_batch(last, &entries, source_commit);
        if need_rollback {
            return self.rollback(source).await;
        }
        Ok(())
    }

    /// Applies a fetched batch; true when it does not continue our oplog (rollback needed).
    fn apply_batch(
        &self,
        last: Option<OpTime>,
        entries: &[OplogEntry],
        source_commit: Option<OpTime>,
    ) -> bool {
        // A batch that arrives after replication was stopped is dropped, like one that a
        // stopped producer never fetched.
        if self
            .inner
            .replication_stopped
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return false;
        }
        let mut st = self.lock();
        // The world may have moved while we waited (a rollback, a restart of the loop).
        if st.durable.store.oplog.last().map(|e| e.optime) != last {
            return false;
        }
        if !matches!(
            st.state,
            MemberState::Secondary
                | MemberState::Startup2
                | MemberState::Recovering
                | MemberState::Rollback
        ) {
            return false;
        }
        // An initial sync: a member in STARTUP2 with no data copies the set's oplog, and stays
        // in STARTUP2 for the time copying that much data takes (`InitialSyncPace`).
        let initial_sync = st.state == MemberState::Startup2 && st.durable.store.oplog.is_empty();
        let mut new = entries;
        if let Some(last) = last {
            match entries.first() {
                Some(first) if first.optime == last => new = &entries[1..],
                first => {
                    tracing::debug!(me = %self.me(), ?first, ?last, "oplog diverged");
                    return true;
                }
            }
        }
        for e in new {
            st.durable.store.apply(e.clone());
        }
        if let Some(cp) = source_commit {
            let cp = cp.min(st.last_applied());
            if cp > st.commit_point {
                st.commit_point = cp;
            }
        }
        if initial_sync {
            let bytes: usize = new
                .iter()
                .map(|e| bson::to_vec(&e.to_document()).map(|b| b.len()).unwrap_or(0))
                .sum();
            let took = self.inner.opts.initial_sync.duration(bytes);
            tracing::info!(me = %self.me(), bytes, ms = took.as_millis() as u64, "initial sync copying");
            st.initial_sync_until = Some(Instant::now() + took);
            self.finish_initial_sync_after(took);
        }
        let copying = st.initial_sync_until.is_some_and(|t| Instant::now() < t);
        if copying {
            self.notify();
            return false;
        }
        if matches!(
            st.state,
            MemberState::Startup2 | MemberState::Recovering | MemberState::Rollback
        ) {
            let next = if st.maintenance_calls > 0 {
                MemberState::Recovering
            } else {
                MemberState::Secondary
            };
            self.set_state(&mut st, next);
        }
        self.notify();
        false
    }

    /// Ends an initial sync `after` from now: STARTUP2 becomes SECONDARY (RECOVERING in
    /// maintenance mode), as the end of the copy does.
    fn finish_initial_sync_after(&self, after: Duration) {
        self.spawn_task(move |n| async move {
            tokio::time::sleep(after).await;
            let mut st = n.lock();
            st.initial_sync_until = None;
            if st.state == MemberState::Startup2 {
                let next = if st.maintenance_calls > 0 {
                    MemberState::Recovering
                } else {
                    MemberState::Secondary
                };
                tracing::info!(me = %n.me(), "initial sync done");
                n.set_state(&mut st, next);
                n.notify();
            }
        });
    }

    /// Finds the newest entry we share with the sync source, undoes everything after it and
    /// records what was undone (MongoDB writes it to rollback files).
    async fn rollback(&self, source: &str) -> Result<(), String> {
        // The simulator's oplogs are small and never truncated: compare them whole, and keep
        // the common prefix (the shared history).
        let req = doc! {"find": "oplog.rs", "filter": {}, "$db": "local"};
        let resp = self
            .inner
            .peers
            .run(source, &req, PEER_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let theirs = parse_batch(&resp)?;
        let their_last = theirs.last().map(|e| e.optime).unwrap_or(OpTime::NULL);
        let mut st = self.lock();
        let ours = &st.durable.store.oplog;
        // A source that is simply behind us (and not of a newer term) is not a reason to
        // roll back: wait for it or for another source.
        if their_last < st.last_applied() {
            return Err(format!("sync source {source} is behind us"));
        }
        let keep = ours
            .iter()
            .zip(theirs.iter())
            .take_while(|(a, b)| a.optime == b.optime)
            .count();
        tracing::debug!(me = %self.me(), keep, ours = ours.len(), theirs = theirs.len(), "rollback common point");
        if keep == ours.len() {
            return Ok(());
        }
        self.set_state(&mut st, MemberState::Rollback);
        let removed = st.durable.store.truncate(keep);
        tracing::warn!(me = %self.me(), source, undone = removed.len(), "rolled back");
        self.inner.history.record(Event::RolledBack {
            node: self.me(),
            entries: removed.iter().map(|e| e.to_document()).collect(),
        });
        if st.commit_point > st.last_applied() {
            st.commit_point = st.last_applied();
        }
        self.set_state(&mut st, MemberState::Recovering);
        self.notify();
        Ok(())
    }

    async fn update_position(&self, source: &str) -> bool {
        // What we report as applied is on disk first (it counts toward a majority).
        self.flush();
        let req = {
            let st = self.lock();
            let Some(cfg) = st.config() else { return false };
            let Some(me) = cfg.member_by_host(&self.me()) else {
                return false;
            };
            let op = st.last_applied();
            doc! {
                "replSetUpdatePosition": 1,
                "optimes": [{
                    "durableOpTime": op.to_document(),
                    "durableWallTime": op.date(),
                    "appliedOpTime": op.to_document(),
                    "appliedWallTime": op.date(),
                    "memberId": me.id,
                    "cfgver": cfg.version,
                }],
                "$db": "admin",
            }
        };
        self.inner
            .peers
            .run(source, &req, PEER_TIMEOUT)
            .await
            .is_ok()
    }

    pub(crate) fn cmd_update_position(&self, body: &Document) -> Result<Document, ServerError> {
        let mut st = self.lock();
        let Some(cfg) = st.config().cloned() else {
            return Err(ServerError::not_yet_initialized(
                "no replset config has been received",
            ));
        };
        if let Ok(list) = body.get_array("optimes") {
            for item in list {
                let Bson::Document(d) = item else { continue };
                let Some(id) = d.get("memberId").and_then(number) else {
                    continue;
                };
                let Some(m) = cfg.member_by_id(id) else {
                    continue;
                };
                if m.host == self.me() {
                    continue;
                }
                if let Some(op) = OpTime::from_bson(d.get("appliedOpTime")) {
                    let p = st.peers.entry(m.host.clone()).or_default();
                    if op > p.applied {
                        p.applied = op;
                    }
                }
            }
        }
        self.recompute_commit_point(&mut st);
        self.notify();
        Ok(doc! {})
    }
}

fn parse_batch(resp: &Document) -> Result<Vec<OplogEntry>, String> {
    if resp.get("ok").and_then(float) != Some(1.0) {
        return Err(resp
            .get_str("errmsg")
            .unwrap_or("oplog query failed")
            .to_string());
    }
    let batch = resp
        .get_document("cursor")
        .and_then(|c| c.get_array("firstBatch"))
        .map_err(|e| e.to_string())?;
    Ok(batch
        .iter()
        .filter_map(|b| b.as_document().and_then(OplogEntry::from_document))
        .collect())
}
