//! Between the members: heartbeats (state, term, config, optime), elections
//! (`replSetRequestVotes`, with a dry run first, as protocol version 1 does), oplog fetching
//! from a sync source with rollback, and position updates that move the commit point.

use bson::{doc, Bson, DateTime, Document};
use rand::Rng;
use std::time::{Duration, Instant};

use crate::config::{float, number, ReplSetConfig};
use crate::error::ServerError;
use crate::history::{ConfigSource, Event};
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::{OpTime, OplogEntry};

const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// MongoDB's `kMaxHeartbeatRetries` (topology_coordinator.h).
const MAX_HEARTBEAT_RETRIES: u32 = 2;
/// `heartbeatTimeoutSecs` before a config is known.
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    pub(crate) fn spawn_replication(&self) {
        for task in 0..3 {
            let n = self.clone();
            tokio::spawn(async move {
                let cancel = n.inner.cancel.clone();
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = async {
                        match task {
                            0 => n.heartbeat_loop().await,
                            1 => n.election_loop().await,
                            _ => n.sync_loop().await,
                        }
                    } => {}
                }
            });
        }
    }

    fn heartbeat_interval(&self) -> Duration {
        let ms = self
            .lock()
            .config()
            .map(|c| c.heartbeat_interval_millis())
            .unwrap_or(self.inner.opts.heartbeat_interval.as_millis() as u64);
        Duration::from_millis(ms)
    }

    fn election_timeout(st: &NodeState, default: Duration) -> Duration {
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
                let n = self.clone();
                tokio::spawn(async move {
                    let cancel = n.inner.cancel.clone();
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = n.heartbeat_once(&host) => {}
                    }
                });
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
        let n = self.clone();
        tokio::spawn(async move {
            let cancel = n.inner.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = async {
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
                } => {}
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
        let n = self.clone();
        tokio::spawn(async move {
            let cancel = n.inner.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = n.heartbeat_once(&host) => {}
            }
        });
    }

    // ---- elections ----

    async fn election_loop(&self) {
        loop {
            let wait = {
                let mut st = self.lock();
                let timeout = Self::election_timeout(&st, self.inner.opts.election_timeout);
                let due = st.last_primary_contact + timeout + st.election_offset;
                let takeover = self.priority_takeover_due(&mut st, timeout);
                if self.may_stand(&st) && (Instant::now() >= due || takeover) {
                    st.takeover_since = None;
                    st.last_primary_contact = Instant::now();
                    st.election_offset = random_offset(timeout);
                    None
                } else {
                    Some(
                        due.saturating_duration_since(Instant::now())
                            .clamp(Duration::from_millis(20), Duration::from_millis(200)),
                    )
                }
            };
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => self.run_election().await,
            }
        }
    }

    /// Priority takeover: a caught-up secondary with a higher priority than the primary
    /// stands for election after `(rank + 1) * electionTimeout`, where rank counts the
    /// members with a higher priority still (MongoDB's priority takeover delay).
    fn priority_takeover_due(&self, st: &mut NodeState, timeout: Duration) -> bool {
        let me = self.me();
        let candidate = (|| {
            let cfg = st.config()?;
            let mine = cfg.member_by_host(&me)?;
            let primary = st.primary_host.as_ref()?;
            let pcfg = cfg.member_by_host(primary)?;
            let pview = st.peers.get(primary)?;
            let fresh = pview.healthy && st.last_applied() >= pview.applied;
            let rank = cfg
                .members
                .iter()
                .filter(|m| m.is_electable() && m.priority > mine.priority)
                .count() as u32;
            (mine.is_electable() && mine.priority > pcfg.priority && fresh).then_some(rank)
        })();
        match (candidate, st.takeover_since) {
            (None, _) => {
                st.takeover_since = None;
                false
            }
            (Some(_), None) => {
                st.takeover_since = Some(Instant::now());
                false
            }
            (Some(rank), Some(since)) => since.elapsed() >= timeout * (rank + 1),
        }
    }

    fn may_stand(&self, st: &NodeState) -> bool {
        if st.state != MemberState::Secondary {
            return false;
        }
        if st.step_down_until.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        st.config()
            .and_then(|c| c.member_by_host(&self.me()))
            .is_some_and(|m| m.is_electable())
    }

    /// `replSetStepUp`: stand for election now (tests use it with a long election timeout).
    pub(crate) async fn cmd_step_up(&self, body: &Document) -> Result<Document, ServerError> {
        if self.inner.opts.set_name.is_none() {
            return Err(ServerError::no_replication_enabled(
                "not running with --replSet",
            ));
        }
        {
            let st = self.lock();
            if st.state == MemberState::Primary {
                return Ok(doc! {"info": "already primary"});
            }
            if !self.may_stand(&st) {
                return Err(ServerError {
                    code: 125,
                    code_name: "CommandFailed",
                    message: "Election failed.".to_string(),
                });
            }
        }
        let skip_dry_run = body.get_bool("skipDryRun").unwrap_or(false);
        if self.run_election_inner(skip_dry_run).await {
            Ok(doc! {})
        } else {
            Err(ServerError {
                code: 125,
                code_name: "CommandFailed",
                message: "Election failed.".to_string(),
            })
        }
    }

    async fn run_election(&self) {
        self.run_election_inner(false).await;
    }

    async fn run_election_inner(&self, skip_dry_run: bool) -> bool {
        let start_term = self.lock().term();
        // Dry run first, so that a candidate that cannot win does not raise the term.
        if !skip_dry_run && !self.request_votes(true).await {
            return false;
        }
        {
            let mut st = self.lock();
            // Superseded while the dry run was out (another member won, or voted in a newer
            // term): do not inflate the term, as MongoDB does not.
            if !self.may_stand(&st) || st.term() != start_term {
                return false;
            }
            let term = st.term() + 1;
            st.durable.term = term;
            let my_id = st
                .config()
                .and_then(|c| c.member_by_host(&self.me()))
                .map(|m| m.id)
                .unwrap_or(-1);
            st.durable.last_vote = Some((term, my_id));
        }
        if self.request_votes(false).await {
            let mut st = self.lock();
            if st.state == MemberState::Secondary {
                self.become_primary(&mut st);
                return true;
            }
        }
        false
    }

    /// Asks every voter; true when a majority (counting this member) grants.
    async fn request_votes(&self, dry_run: bool) -> bool {
        // The new term and the vote for ourselves are on disk before anyone hears of them.
        self.flush();
        let (req, voters, need, term) = {
            let st = self.lock();
            let Some(cfg) = st.config() else { return false };
            let Some(idx) = cfg.members.iter().position(|m| m.host == self.me()) else {
                return false;
            };
            let term = if dry_run { st.term() + 1 } else { st.term() };
            let req = doc! {
                "replSetRequestVotes": 1,
                "setName": cfg.set_name.clone(),
                "dryRun": dry_run,
                "term": term,
                "candidateIndex": idx as i32,
                "configVersion": cfg.version,
                "configTerm": cfg.term,
                "lastAppliedOpTime": st.last_applied().to_document(),
                "$db": "admin",
            };
            let voters: Vec<String> = cfg
                .voters()
                .filter(|m| m.host != self.me())
                .map(|m| m.host.clone())
                .collect();
            (req, voters, cfg.majority_vote_count(), term)
        };
        let mut set = tokio::task::JoinSet::new();
        for host in voters {
            let n = self.clone();
            let req = req.clone();
            set.spawn(async move { n.inner.peers.run(&host, &req, PEER_TIMEOUT).await });
        }
        let mut granted = 1;
        while let Some(r) = set.join_next().await {
            if let Ok(Ok(resp)) = r {
                let their_term = resp.get("term").and_then(number).unwrap_or(-1);
                if resp.get_bool("voteGranted").unwrap_or(false) {
                    granted += 1;
                    if granted >= need {
                        break;
                    }
                } else if their_term > term {
                    let mut st = self.lock();
                    self.update_term(&mut st, their_term);
                    return false;
                }
            }
        }
        set.abort_all();
        let st = self.lock();
        granted >= need && (dry_run || st.term() == term)
    }

    /// The voter's side: `replSetRequestVotes`.
    pub(crate) fn cmd_request_votes(&self, body: &Document) -> Result<Document, ServerError> {
        let set = body.get_str("setName").unwrap_or("");
        let dry_run = body.get_bool("dryRun").unwrap_or(false);
        let term = body.get("term").and_then(number).unwrap_or(-1);
        let idx = body.get("candidateIndex").and_then(number).unwrap_or(-1);
        let their_cfg = crate::config::ConfigVersionAndTerm {
            version: body.get("configVersion").and_then(number).unwrap_or(-2),
            term: body.get("configTerm").and_then(number).unwrap_or(-1),
        };
        let their_op = OpTime::from_bson(body.get("lastAppliedOpTime")).unwrap_or(OpTime::NULL);
        let mut st = self.lock();
        if !dry_run {
            self.update_term(&mut st, term);
        }
        let Some(cfg) = st.config().cloned() else {
            return Err(ServerError::not_yet_initialized(
                "no replset config has been received",
            ));
        };
        let candidate = cfg
            .members
            .get(idx.max(0) as usize)
            .map(|m| (m.id, m.host.clone()));
        let reason = if set != cfg.set_name {
            Some(format!(
                "candidate's set name ({set}) differs from mine ({})",
                cfg.set_name
            ))
        } else if term < st.term() {
            Some(format!(
                "candidate's term ({term}) is lower than mine ({})",
                st.term()
            ))
        } else if their_cfg < cfg.version_and_term() {
            Some(format!(
                "candidate's config with {their_cfg} is older than mine with {}",
                cfg.version_and_term()
            ))
        } else if their_op < st.last_applied() {
            Some(format!(
                "candidate's data is staler than mine. candidate's last applied OpTime: {:?}, my last applied OpTime: {:?}",
                their_op.to_document(),
                st.last_applied().to_document()
            ))
        } else if let (false, Some((vt, vid))) = (dry_run, st.durable.last_vote) {
            if vt == term && Some(vid) != candidate.as_ref().map(|c| c.0) {
                let other = cfg
                    .member_by_id(vid)
                    .map(|m| m.host.clone())
                    .unwrap_or_default();
                Some(format!(
                    "already voted for another candidate ({other}) this term ({term})"
                ))
            } else {
                None
            }
        } else if dry_run
            && st.state == MemberState::Primary
            && term <= st.term() + 1
            && st.durable.last_vote.is_some_and(|(vt, _)| vt >= term)
        {
            Some(format!(
                "already voted for another candidate ({}) this term ({term})",
                self.me()
            ))
        } else {
            None
        };
        let granted = reason.is_none() && candidate.is_some();
        if granted && !dry_run {
            st.durable.last_vote = candidate.map(|c| (term, c.0));
            st.last_primary_contact = Instant::now();
        }
        Ok(doc! {
            "term": st.term(),
            "voteGranted": granted,
            "reason": reason.unwrap_or_default(),
        })
    }

    // ---- oplog fetching ----

    async fn sync_loop(&self) {
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
        let n = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = n.inner.cancel.cancelled() => {}
                _ = tokio::time::sleep(after) => {
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
                }
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

fn random_offset(timeout: Duration) -> Duration {
    let max = (timeout.as_millis() as u64 * 15 / 100).max(1);
    Duration::from_millis(rand::rng().random_range(0..max))
}
