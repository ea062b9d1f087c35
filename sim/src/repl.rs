//! Between the members: heartbeats (state, term, config, optime) and the config they carry.
//! Elections are in `election.rs`, oplog fetching, rollback, initial sync and position updates
//! in `sync.rs`.

use bson::{doc, DateTime, Document};
use std::time::{Duration, Instant};

use crate::config::{float, number, ReplSetConfig};
use crate::error::ServerError;
use crate::history::ConfigSource;
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::OpTime;

pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// MongoDB's `kMaxHeartbeatRetries` (topology_coordinator.h).
const MAX_HEARTBEAT_RETRIES: u32 = 2;
/// `heartbeatTimeoutSecs` before a config is known.
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    pub(crate) fn spawn_replication(&self) {
        self.spawn_task(|n| async move { n.heartbeat_loop().await });
        self.spawn_task(|n| async move { n.election_loop().await });
        self.spawn_task(|n| async move { n.sync_loop().await });
    }

    fn heartbeat_interval(&self) -> Duration {
        let ms = self
            .lock()
            .config()
            .map(|c| c.heartbeat_interval_millis())
            .unwrap_or(self.inner.opts.heartbeat_interval.as_millis() as u64);
        Duration::from_millis(ms)
    }

    pub(crate) fn election_timeout(st: &NodeState, default: Duration) -> Duration {
        st.config()
            .map(|c| Duration::from_millis(c.election_timeout_millis()))
            .unwrap_or(default)
    }

    // ---- heartbeats ----

    async fn heartbeat_loop(&self) {
        loop {
            let targets: Vec<String> = {
                let st = self.lock();
                st.config()
                    .map(|c| {
                        c.members
                            .iter()
                            .filter(|m| m.host != self.me())
                            .map(|m| m.host.clone())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            for host in targets {
                self.spawn_task(|n| async move { n.heartbeat_once(&host).await });
            }
            self.check_primary_majority();
            let interval = self.heartbeat_interval();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.inner.heartbeat_now.notified() => {}
            }
        }
    }

    fn heartbeat_request(&self) -> Option<Document> {
        let st = self.lock();
        let set = self.inner.opts.set_name.clone()?;
        let (version, term, from_id) = match st.config() {
            Some(c) => (
                c.version,
                c.term,
                c.member_by_host(&self.me()).map(|m| m.id).unwrap_or(-1),
            ),
            None => (-2, -1, -1),
        };
        Some(doc! {
            "replSetHeartbeat": set,
            "configVersion": version,
            "configTerm": term,
            "hbv": 1,
            "from": self.me(),
            "fromId": from_id,
            "term": st.term(),
            "$db": "admin",
        })
    }

    pub(crate) async fn heartbeat_once(&self, host: &str) {
        self.flush();
        let Some(req) = self.heartbeat_request() else {
            return;
        };
        // As MongoDB's topology coordinator: a failed heartbeat is retried at once, at most
        // kMaxHeartbeatRetries (2) times, while heartbeatTimeoutSecs since its start have not
        // passed; only then is the member marked DOWN. A refused port fails three times at
        // once; a host that does not answer at all is DOWN after the timeout.
        let budget = self
            .lock()
            .config()
            .map(|c| c.heartbeat_timeout())
            .unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT);
        let started = Instant::now();
        let mut retries = 0;
        let r = loop {
            let remaining = budget.saturating_sub(started.elapsed());
            let r = self
                .inner
                .peers
                .run(host, &req, remaining.max(Duration::from_millis(1)))
                .await;
            if r.is_err() && retries < MAX_HEARTBEAT_RETRIES && started.elapsed() < budget {
                retries += 1;
                continue;
            }
            break r;
        };
        let mut st = self.lock();
        let ping = started.elapsed().as_millis() as i64;
        match r {
            Ok(resp) if resp.get("ok").and_then(float) == Some(1.0) => {
                self.apply_heartbeat_response(&mut st, host, &resp, ping)
            }
            Ok(resp) => {
                let p = st.peers.entry(host.to_string()).or_default();
                p.healthy = false;
                p.up_since = None;
                p.message = resp.get_str("errmsg").unwrap_or("error").to_string();
                self.notify();
            }
            Err(e) => {
                let p = st.peers.entry(host.to_string()).or_default();
                let was = p.healthy;
                p.healthy = false;
                p.up_since = None;
                p.state = MemberState::Down;
                p.message = e.to_string();
                p.last_heartbeat = Some(DateTime::now());
                if was {
                    st.topology_counter += 1;
                }
                if st.primary_host.as_deref() == Some(host) {
                    st.primary_host = None;
                    st.topology_counter += 1;
                }
                self.notify();
            }
        }
    }

    fn apply_heartbeat_response(&self, st: &mut NodeState, host: &str, resp: &Document, ping: i64) {
        let term = resp.get("term").and_then(number).unwrap_or(-1);
        let state = MemberState::from_code(resp.get("state").and_then(number).unwrap_or(6));
        self.update_term(st, term);
        {
            let p = st.peers.entry(host.to_string()).or_default();
            if !p.healthy || p.up_since.is_none() {
                p.up_since = Some(Instant::now());
            }
            p.healthy = true;
            p.state = state;
            p.term = term;
            p.config_version = resp.get("configVersion").and_then(number).unwrap_or(-2);
            p.config_term = resp.get("configTerm").and_then(number).unwrap_or(-1);
            if let Some(op) = OpTime::from_bson(resp.get("opTime")) {
                if op > p.applied || state == MemberState::Rollback {
                    p.applied = op;
                }
            }
            p.last_ok = Some(Instant::now());
            p.last_heartbeat = Some(DateTime::now());
            p.message.clear();
            p.ping_ms = ping;
            p.sync_source = resp.get_str("syncingTo").unwrap_or("").to_string();
            p.election_date = resp.get_datetime("electionDate").ok().copied();
            p.election_time = resp.get_timestamp("electionTime").ok();
        }
        if state == MemberState::Primary && term >= st.term() {
            if st.primary_host.as_deref() != Some(host) {
                st.primary_host = Some(host.to_string());
                st.topology_counter += 1;
            }
            st.last_primary_contact = Instant::now();
            if st.state != MemberState::Primary {
                if let Some(cp) = OpTime::from_bson(resp.get("lastOpCommitted")) {
                    let cp = cp.min(st.last_applied());
                    if cp > st.commit_point {
                        st.commit_point = cp;
                    }
                }
            }
        }
        if let Ok(cfg_doc) = resp.get_document("config") {
            if let Ok(cfg) = ReplSetConfig::parse(cfg_doc, self.defaults()) {
                let newer = st
                    .config()
                    .is_none_or(|c| cfg.version_and_term() > c.version_and_term());
                let same_set = self.inner.opts.set_name.as_deref() == Some(cfg.set_name.as_str());
                if newer && same_set && cfg.validate().is_ok() {
                    if cfg.members.iter().any(|m| self.is_self_fast(&m.host)) {
                        self.install_config(st, cfg, ConfigSource::Heartbeat);
                    } else {
                        self.adopt_config_slow(cfg);
                    }
                }
            }
        }
        self.recompute_commit_point(st);
        self.remove_newly_added(st);
        self.notify();
    }

    /// A config from a heartbeat in which the fast path does not find this member: ask each
    /// host for its instance id (mongod's isSelf slow path) outside the lock, then install
    /// it (as REMOVED if this member is not in it).
    fn adopt_config_slow(&self, cfg: ReplSetConfig) {
        self.spawn_task(|n| async move {
            if let Ok(i) = n.find_self(&cfg).await {
                n.set_me(&cfg.members[i].host.clone());
            }
            let mut st = n.lock();
            let newer = st
                .config()
                .is_none_or(|c| cfg.version_and_term() > c.version_and_term());
            if newer {
                n.install_config(&mut st, cfg, ConfigSource::Heartbeat);
            }
        });
    }

    /// A primary that cannot see a majority of voters for an election timeout steps down.
    fn check_primary_majority(&self) {
        let mut st = self.lock();
        if st.state != MemberState::Primary {
            return;
        }
        let timeout = Self::election_timeout(&st, self.inner.opts.election_timeout);
        let Some(cfg) = st.config() else { return };
        let need = cfg.majority_vote_count();
        let seen = cfg
            .voters()
            .filter(|m| {
                m.host == self.me()
                    || st
                        .peers
                        .get(&m.host)
                        .and_then(|p| p.last_ok)
                        .is_some_and(|t| t.elapsed() < timeout)
            })
            .count();
        if seen < need {
            self.step_down(
                &mut st,
                "can't see a majority of the set, relinquishing primary",
            );
        }
    }

    /// The primary's automatic reconfig that drops `newlyAdded` from members that have
    /// caught up (SECONDARY), once the current config is committed.
    fn remove_newly_added(&self, st: &mut NodeState) {
        if st.state != MemberState::Primary || !self.config_committed(st) {
            return;
        }
        let Some(cfg) = st.config() else { return };
        let ready: Vec<i64> = cfg
            .members
            .iter()
            .filter(|m| m.newly_added)
            .filter(|m| {
                st.peers.get(&m.host).is_some_and(|p| {
                    p.healthy
                        && matches!(
                            p.state,
                            MemberState::Secondary
                                | MemberState::Recovering
                                | MemberState::Rollback
                        )
                })
            })
            .map(|m| m.id)
            .collect();
        if ready.is_empty() {
            return;
        }
        let mut next = cfg.clone();
        for m in &mut next.members {
            if ready.contains(&m.id) {
                m.newly_added = false;
            }
        }
        next.version += 1;
        next.term = st.term();
        self.install_config(st, next, ConfigSource::NewlyAddedRemoval);
        let v = st.config().map(|c| c.version).unwrap_or(0);
        self.append_noop(st, doc! {"msg": {"Reconfig set": v}});
    }

    /// The receiving side of `replSetHeartbeat`.
    pub(crate) fn cmd_heartbeat(&self, body: &Document) -> Result<Document, ServerError> {
        let Some(my_set) = self.inner.opts.set_name.clone() else {
            return Err(ServerError::no_replication_enabled(
                "not running with --replSet",
            ));
        };
        let their_set = body.get_str("replSetHeartbeat").unwrap_or("");
        if their_set != my_set {
            return Err(ServerError::inconsistent_replica_set_names(format!(
                "Our set name of {my_set} does not match name of sender {their_set}"
            )));
        }
        let from = body.get_str("from").unwrap_or("").to_string();
        let their_version = body.get("configVersion").and_then(number).unwrap_or(-2);
        let their_cfg_term = body.get("configTerm").and_then(number).unwrap_or(-1);
        let their_term = body.get("term").and_then(number).unwrap_or(-1);
        let mut st = self.lock();
        if their_version > 0 {
            self.update_term(&mut st, their_term);
        }
        // lastHeartbeatRecv: the sender's entry, when it is a member of our config.
        if st
            .config()
            .is_some_and(|c| c.member_by_host(&from).is_some())
        {
            st.peers
                .entry(from.clone())
                .or_default()
                .last_heartbeat_recv = Some(DateTime::now());
        }
        let mut d = doc! {
            "set": my_set,
            "term": st.term(),
            "state": st.state.code(),
            "syncingTo": st.sync_source.clone().unwrap_or_default(),
            "opTime": st.last_applied().to_document(),
            "durableOpTime": st.last_applied().to_document(),
            "opTimeWallTime": st.last_applied().date(),
            "durableWallTime": st.last_applied().date(),
            "lastOpCommitted": st.commit_point.to_document(),
        };
        if let Some(date) = st
            .election_date
            .filter(|_| st.state == MemberState::Primary)
        {
            d.insert("electionDate", date);
            if let Some(ts) = st.election_time {
                d.insert("electionTime", ts);
            }
        }
        match st.config() {
            Some(cfg) => {
                d.insert("configVersion", cfg.version);
                d.insert("configTerm", cfg.term);
                let theirs = crate::config::ConfigVersionAndTerm {
                    version: their_version,
                    term: their_cfg_term,
                };
                if their_version < 0 || theirs < cfg.version_and_term() {
                    d.insert("config", cfg.to_document(true));
                }
                let primary_id = st
                    .primary_host
                    .as_ref()
                    .and_then(|p| cfg.member_by_host(p))
                    .map(|m| m.id)
                    .unwrap_or(-1);
                d.insert("primaryId", primary_id);
                let ours = cfg.version_and_term();
                let newer_elsewhere = their_version > 0 && theirs > ours;
                drop(st);
                if newer_elsewhere && !from.is_empty() {
                    self.fetch_config_from(from);
                }
            }
            None => {
                d.insert("configVersion", -2i64);
                d.insert("configTerm", -1i64);
                drop(st);
                if their_version > 0 && !from.is_empty() {
                    self.fetch_config_from(from);
                }
            }
        }
        Ok(d)
    }

    /// A sender has a newer config: heartbeat it back at once to get it.
    fn fetch_config_from(&self, host: String) {
        self.spawn_task(|n| async move { n.heartbeat_once(&host).await });
    }
}
