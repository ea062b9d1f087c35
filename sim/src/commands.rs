//! The commands a member answers: handshake, replica-set administration, and a minimal data
//! plane. Replies carry the fields, codes and messages of MongoDB 7.0.

use bson::{doc, Bson, DateTime, Document};
use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

use crate::config::{normalize_host, number, ReplSetConfig};
use crate::error::ServerError;
use crate::history::ConfigSource;
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::{matches, OpTime};

/// `maxWireVersion` of MongoDB 7.0.
pub const MAX_WIRE_VERSION: i32 = 21;
pub const VERSION: &str = "7.0.14";

impl Node {
    /// Runs one command and returns its reply (errors become `ok: 0` replies).
    pub(crate) async fn run_command(&self, body: Document, conn_id: i64) -> Document {
        let name = body.keys().next().cloned().unwrap_or_default();
        let result = self.dispatch(&name, &body, conn_id).await;
        match result {
            Ok(mut d) => {
                if !d.contains_key("ok") {
                    d.insert("ok", 1.0);
                }
                d
            }
            Err(e) => {
                tracing::debug!(me = %self.me(), command = %name, error = %e, "command failed");
                e.to_reply()
            }
        }
    }

    async fn dispatch(
        &self,
        name: &str,
        body: &Document,
        conn_id: i64,
    ) -> Result<Document, ServerError> {
        match name {
            "hello" | "isMaster" | "ismaster" => self.cmd_hello(name, body, conn_id).await,
            "ping" => Ok(doc! {}),
            "buildInfo" | "buildinfo" => Ok(build_info()),
            "endSessions" | "killSessions" | "refreshSessions" => Ok(doc! {}),
            "killCursors" => Ok(
                doc! {"cursorsKilled": [], "cursorsNotFound": [], "cursorsAlive": [], "cursorsUnknown": []},
            ),
            "getParameter" => Ok(doc! {"featureCompatibilityVersion": {"version": "7.0"}}),
            "_isSelf" => Ok(doc! {"id": self.inner.instance_id}),
            "replSetInitiate" => self.cmd_initiate(body).await,
            "replSetGetConfig" => self.cmd_get_config(body),
            "replSetGetStatus" => self.cmd_get_status(),
            "replSetReconfig" => self.cmd_reconfig(body).await,
            "replSetStepDown" => self.cmd_step_down(body).await,
            "replSetStepUp" => self.cmd_step_up(body).await,
            "replSetHeartbeat" => self.cmd_heartbeat(body),
            "replSetRequestVotes" => self.cmd_request_votes(body),
            "replSetUpdatePosition" => self.cmd_update_position(body),
            "insert" => self.cmd_insert(body).await,
            "find" => self.cmd_find(body).await,
            "count" => self.cmd_count(body),
            "aggregate" => self.cmd_aggregate(body),
            other => Err(ServerError::command_not_found(format!(
                "no such command: '{other}'"
            ))),
        }
    }

    fn require_repl(&self) -> Result<String, ServerError> {
        self.inner
            .opts
            .set_name
            .clone()
            .ok_or_else(|| ServerError::no_replication_enabled("not running with --replSet"))
    }

    // ---- handshake ----

    async fn cmd_hello(
        &self,
        name: &str,
        body: &Document,
        conn_id: i64,
    ) -> Result<Document, ServerError> {
        // Awaitable hello: wait for a topology change or maxAwaitTimeMS.
        if let (Ok(tv), Some(wait)) = (
            body.get_document("topologyVersion"),
            body.get("maxAwaitTimeMS").and_then(number),
        ) {
            let same_process = tv.get_object_id("processId").ok() == Some(self.inner.instance_id);
            let counter = tv.get("counter").and_then(number);
            if same_process {
                if let Some(counter) = counter {
                    let deadline = Instant::now() + Duration::from_millis(wait.max(0) as u64);
                    self.wait_until(Some(deadline), |st| {
                        (st.topology_counter != counter).then_some(())
                    })
                    .await;
                }
            }
        }
        let st = self.lock();
        let legacy = name != "hello";
        let mut d = Document::new();
        let primary = st.state == MemberState::Primary;
        if legacy {
            d.insert("ismaster", primary);
        } else {
            d.insert("isWritablePrimary", primary);
        }
        d.insert(
            "topologyVersion",
            doc! {"processId": self.inner.instance_id, "counter": st.topology_counter},
        );
        let cfg = st.config().filter(|_| st.state != MemberState::Removed);
        match (cfg, &self.inner.opts.set_name) {
            (Some(cfg), _) => {
                let list = |f: &dyn Fn(&crate::config::MemberConfig) -> bool| {
                    cfg.members
                        .iter()
                        .filter(|m| f(m))
                        .map(|m| Bson::String(m.host.clone()))
                        .collect::<Vec<_>>()
                };
                d.insert(
                    "hosts",
                    list(&|m| !m.arbiter_only && !m.hidden && m.priority > 0.0),
                );
                let passives = list(&|m| !m.arbiter_only && !m.hidden && m.priority == 0.0);
                if !passives.is_empty() {
                    d.insert("passives", passives);
                }
                let arbiters = list(&|m| m.arbiter_only);
                if !arbiters.is_empty() {
                    d.insert("arbiters", arbiters);
                }
                d.insert("setName", cfg.set_name.clone());
                d.insert("setVersion", cfg.version as i32);
                d.insert("secondary", st.state == MemberState::Secondary);
                if st.state == MemberState::Arbiter {
                    d.insert("arbiterOnly", true);
                }
                if let Some(p) = &st.primary_host {
                    d.insert("primary", p.clone());
                }
                if let Some(m) = cfg.member_by_host(&self.me()) {
                    if m.hidden {
                        d.insert("hidden", true);
                    }
                    if m.priority == 0.0 && !m.arbiter_only {
                        d.insert("passive", true);
                    }
                    if !m.tags.is_empty() {
                        d.insert("tags", m.tags.clone());
                    }
                }
                d.insert("me", self.me());
                if let Some(id) = st.election_id {
                    d.insert("electionId", id);
                }
                let applied = st.last_applied();
                d.insert(
                    "lastWrite",
                    doc! {
                        "opTime": applied.to_document(),
                        "lastWriteDate": applied.date(),
                        "majorityOpTime": st.commit_point.to_document(),
                        "majorityWriteDate": st.commit_point.date(),
                    },
                );
            }
            (None, Some(_)) => {
                d.insert("secondary", false);
                d.insert("isreplicaset", true);
                d.insert("info", "Does not have a valid replica set config");
            }
            (None, None) => {}
        }
        d.insert("maxBsonObjectSize", 16 * 1024 * 1024);
        d.insert("maxMessageSizeBytes", crate::wire::MAX_MESSAGE_SIZE as i32);
        d.insert("maxWriteBatchSize", 100_000);
        d.insert("localTime", DateTime::now());
        d.insert("logicalSessionTimeoutMinutes", 30);
        d.insert("connectionId", conn_id as i32);
        d.insert("minWireVersion", 0);
        d.insert("maxWireVersion", MAX_WIRE_VERSION);
        d.insert("readOnly", false);
        if body.get_bool("helloOk").unwrap_or(false) {
            d.insert("helloOk", true);
        }
        Ok(d)
    }

    // ---- replica-set administration ----

    async fn cmd_initiate(&self, body: &Document) -> Result<Document, ServerError> {
        let set_name = self.require_repl()?;
        if self.lock().config().is_some() {
            return Err(ServerError::already_initialized("already initialized"));
        }
        let raw = match body.get("replSetInitiate") {
            Some(Bson::Document(d)) if !d.is_empty() => d.clone(),
            _ => {
                doc! {"_id": set_name.clone(), "version": 1, "members": [{"_id": 0, "host": self.me()}]}
            }
        };
        let invalid = || ServerError::invalid_replica_set_config("");
        let mut cfg =
            ReplSetConfig::parse(&raw, self.defaults()).map_err(|e| e.rewrap(invalid()))?;
        for m in &mut cfg.members {
            m.host = normalize_host(&m.host);
        }
        cfg.term = 0;
        if cfg.set_name != set_name {
            return Err(ServerError::invalid_replica_set_config(format!(
                "Attempting to initiate a replica set with name {}, but command line reports {set_name}; rejecting",
                cfg.set_name
            )));
        }
        cfg.validate_for_initiate()
            .map_err(|e| e.rewrap(invalid()))?;
        let me = self
            .find_self(&cfg)
            .await
            .map_err(|e| e.rewrap(invalid()))?;
        if !cfg.members[me].is_electable() {
            return Err(ServerError::invalid_replica_set_config(format!(
                "This node, {}, with _id {} is not electable under the new configuration with {} for replica set {}",
                cfg.members[me].host, cfg.members[me].id, cfg.version_and_term(), cfg.set_name
            )));
        }
        self.set_me(&cfg.members[me].host.clone());
        // checkQuorumForInitiate: every proposed member must answer a heartbeat.
        let mut failures = Vec::new();
        for (i, m) in cfg.members.iter().enumerate() {
            if i == me {
                continue;
            }
            let hb = doc! {"replSetHeartbeat": cfg.set_name.clone(), "configVersion": -2i64, "configTerm": -1i64, "hbv": 1, "from": self.me(), "fromId": cfg.members[me].id, "term": 0i64, "checkEmpty": true, "$db": "admin"};
            match self
                .inner
                .peers
                .run(&m.host, &hb, Duration::from_secs(5))
                .await
            {
                Ok(r) if r.get("ok").and_then(crate::config::float) == Some(1.0) => {
                    if r.get("configVersion").and_then(number).unwrap_or(-2) > 0 {
                        failures.push(format!(
                            "{} failed with {} has data already, cannot initiate set.",
                            m.host, m.host
                        ));
                    }
                }
                Ok(r) => failures.push(format!(
                    "{} failed with {}",
                    m.host,
                    r.get_str("errmsg").unwrap_or("an error")
                )),
                Err(e) => failures.push(format!("{} failed with {e}", m.host)),
            }
        }
        if !failures.is_empty() {
            return Err(ServerError::node_not_found(format!(
                "replSetInitiate quorum check failed because not all proposed set members responded affirmatively: {}",
                failures.join(", ")
            )));
        }
        cfg.set_replica_set_id(bson::oid::ObjectId::new());
        let mut st = self.lock();
        if st.config().is_some() {
            return Err(ServerError::already_initialized("already initialized"));
        }
        self.append_noop(&mut st, doc! {"msg": "initiating set"});
        self.install_config(&mut st, cfg, ConfigSource::Initiate);
        // Stand for election as soon as the others have the config.
        st.last_primary_contact = std::time::Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(std::time::Instant::now);
        Ok(doc! {})
    }

    /// findSelfInConfig: the fast path, then asking each host for its instance id.
    pub(crate) async fn find_self(&self, cfg: &ReplSetConfig) -> Result<usize, ServerError> {
        let mut found: Vec<usize> = cfg
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| self.is_self_fast(&m.host))
            .map(|(i, _)| i)
            .collect();
        if found.is_empty() {
            for (i, m) in cfg.members.iter().enumerate() {
                let r = self
                    .inner
                    .peers
                    .run(
                        &m.host,
                        &doc! {"_isSelf": 1, "$db": "admin"},
                        Duration::from_secs(2),
                    )
                    .await;
                if let Ok(r) = r {
                    if r.get_object_id("id").ok() == Some(self.inner.instance_id) {
                        found.push(i);
                    }
                }
            }
        }
        match found.len() {
            0 => Err(ServerError::node_not_found(format!(
                "No host described in new configuration with {} for replica set {} maps to this node",
                cfg.version_and_term(),
                cfg.set_name
            ))),
            1 => Ok(found[0]),
            _ => Err(ServerError::invalid_replica_set_config(format!(
                "The hosts {} all map to this node in new configuration with {} for replica set {}",
                found.iter().map(|&i| cfg.members[i].host.clone()).collect::<Vec<_>>().join(" and "),
                cfg.version_and_term(),
                cfg.set_name
            ))),
        }
    }

    fn cmd_get_config(&self, body: &Document) -> Result<Document, ServerError> {
        self.require_repl()?;
        let st = self.lock();
        let Some(cfg) = st.config() else {
            return Err(ServerError::not_yet_initialized(
                "no replset config has been received",
            ));
        };
        let include_newly_added = body
            .get_bool("$_internalIncludeNewlyAdded")
            .unwrap_or(false)
            || body.get_bool("includeNewlyAdded").unwrap_or(false);
        let mut d = doc! {"config": cfg.to_document(include_newly_added)};
        if body.get_bool("commitmentStatus").unwrap_or(false) {
            if st.state != MemberState::Primary {
                return Err(ServerError::not_writable_primary(
                    "commitmentStatus is only supported on primary.",
                ));
            }
            d.insert("commitmentStatus", self.config_committed(&st));
        }
        Ok(d)
    }

    fn cmd_get_status(&self) -> Result<Document, ServerError> {
        self.require_repl()?;
        let st = self.lock();
        let Some(cfg) = st.config() else {
            return Err(ServerError::not_yet_initialized(
                "no replset config has been received",
            ));
        };
        if st.state == MemberState::Removed {
            return Err(ServerError::invalid_replica_set_config(
                "Our replica set config is invalid or we are not a member of it",
            ));
        }
        let now = DateTime::now();
        let mut members = Vec::new();
        for m in &cfg.members {
            let mut d = doc! {"_id": m.id as i32, "name": m.host.clone()};
            if m.host == self.me() {
                let applied = st.last_applied();
                d.insert("health", 1.0);
                d.insert("state", st.state.code());
                d.insert("stateStr", st.state.name());
                d.insert("uptime", st.started.elapsed().as_secs() as i64);
                d.insert("optime", applied.to_document());
                d.insert("optimeDate", applied.date());
                d.insert("lastAppliedWallTime", applied.date());
                d.insert("lastDurableWallTime", applied.date());
                d.insert("syncSourceHost", st.sync_source.clone().unwrap_or_default());
                d.insert("syncSourceId", sync_id(cfg, st.sync_source.as_deref()));
                d.insert("infoMessage", "");
                if st.state == MemberState::Primary {
                    if let Some(id) = st.election_id {
                        d.insert("electionId", id);
                    }
                    if let Some(date) = st.election_date {
                        d.insert("electionDate", date);
                    }
                }
                d.insert("configVersion", cfg.version as i32);
                d.insert("configTerm", cfg.term);
                d.insert("self", true);
                d.insert("lastHeartbeatMessage", "");
            } else {
                let p = st.peers.get(&m.host).cloned().unwrap_or_default();
                let state = if p.healthy {
                    p.state
                } else {
                    MemberState::Down
                };
                d.insert("health", if p.healthy { 1.0 } else { 0.0 });
                d.insert("state", state.code());
                d.insert(
                    "stateStr",
                    if p.healthy {
                        state.name()
                    } else {
                        "(not reachable/healthy)"
                    },
                );
                d.insert("uptime", 0i64);
                d.insert("optime", p.applied.to_document());
                d.insert("optimeDurable", p.applied.to_document());
                d.insert("optimeDate", p.applied.date());
                d.insert("optimeDurableDate", p.applied.date());
                d.insert(
                    "lastHeartbeat",
                    p.last_heartbeat.unwrap_or(DateTime::from_millis(0)),
                );
                d.insert(
                    "lastHeartbeatRecv",
                    p.last_heartbeat.unwrap_or(DateTime::from_millis(0)),
                );
                d.insert("pingMs", p.ping_ms);
                d.insert("lastHeartbeatMessage", p.message.clone());
                d.insert("syncSourceHost", p.sync_source.clone());
                d.insert("syncSourceId", sync_id(cfg, Some(&p.sync_source)));
                d.insert("infoMessage", "");
                if p.state == MemberState::Primary {
                    if let Some(date) = p.election_date {
                        d.insert("electionDate", date);
                    }
                }
                d.insert("configVersion", p.config_version as i32);
                d.insert("configTerm", p.config_term);
            }
            members.push(Bson::Document(d));
        }
        let voters = cfg.voters().count() as i32;
        let writable = cfg.voters().filter(|m| !m.arbiter_only).count() as i32;
        Ok(doc! {
            "set": cfg.set_name.clone(),
            "date": now,
            "myState": st.state.code(),
            "term": st.term(),
            "syncSourceHost": st.sync_source.clone().unwrap_or_default(),
            "syncSourceId": sync_id(cfg, st.sync_source.as_deref()),
            "heartbeatIntervalMillis": cfg.heartbeat_interval_millis() as i64,
            "majorityVoteCount": cfg.majority_vote_count() as i32,
            "writeMajorityCount": cfg.write_majority() as i32,
            "votingMembersCount": voters,
            "writableVotingMembersCount": writable,
            "optimes": {
                "lastCommittedOpTime": st.commit_point.to_document(),
                "lastCommittedWallTime": st.commit_point.date(),
                "appliedOpTime": st.last_applied().to_document(),
                "durableOpTime": st.last_applied().to_document(),
                "lastAppliedWallTime": st.last_applied().date(),
                "lastDurableWallTime": st.last_applied().date(),
            },
            "members": members,
        })
    }

    async fn cmd_reconfig(&self, body: &Document) -> Result<Document, ServerError> {
        let set_name = self.require_repl()?;
        let force = body.get_bool("force").unwrap_or(false);
        let deadline = body
            .get("maxTimeMS")
            .and_then(number)
            .filter(|&m| m > 0)
            .map(|m| Instant::now() + Duration::from_millis(m as u64));
        let raw = match body.get("replSetReconfig") {
            Some(Bson::Document(d)) => d.clone(),
            _ => return Err(ServerError::type_mismatch("no configuration specified")),
        };
        {
            let st = self.lock();
            if st.config().is_none() {
                return Err(ServerError::not_yet_initialized(
                    "no replset config has been received",
                ));
            }
            if !force && st.state != MemberState::Primary {
                return Err(ServerError::not_writable_primary(format!(
                    "replSetReconfig should only be run on a writable PRIMARY. Current state {};",
                    st.state.name()
                )));
            }
        }
        if !force {
            // A safe reconfig waits for the current config to be committed first.
            let committed = self
                .wait_until(deadline, |st| {
                    if st.state != MemberState::Primary {
                        return Some(Err(ServerError::not_writable_primary(
                            "New config is rejected :: caused by :: Primary stepped down while waiting for config commitment",
                        )));
                    }
                    self.config_committed(st).then_some(Ok(()))
                })
                .await;
            match committed {
                Some(r) => r?,
                None => {
                    let st = self.lock();
                    let v = st
                        .config()
                        .map(|c| c.version_and_term().to_string())
                        .unwrap_or_default();
                    return Err(ServerError::current_config_not_committed_yet(format!(
                        "New config is rejected :: caused by :: operation exceeded time limit; the current config {v} is not yet committed by a majority of voting members"
                    )));
                }
            }
        }
        let old = self.lock().config().cloned().ok_or_else(|| {
            ServerError::not_yet_initialized("no replset config has been received")
        })?;
        let invalid = || ServerError::invalid_replica_set_config("");
        let incompatible = || ServerError::new_replica_set_configuration_incompatible("");
        let mut cfg =
            ReplSetConfig::parse(&raw, self.defaults()).map_err(|e| e.rewrap(invalid()))?;
        for m in &mut cfg.members {
            m.host = normalize_host(&m.host);
        }
        if cfg.set_name != set_name {
            return Err(ServerError::invalid_replica_set_config(format!(
                "Attempting to reconfigure a replica set with name {}, but command line reports {set_name}; rejecting",
                cfg.set_name
            )));
        }
        if !force {
            if let Some(m) = cfg.members.iter().find(|m| m.newly_added) {
                return Err(ServerError::invalid_replica_set_config(format!(
                    "Cannot provide newlyAdded field to member {} with _id {}: it is set by the server",
                    m.host, m.id
                )));
            }
        }
        if cfg.replica_set_id().is_none() {
            if let Some(id) = old.replica_set_id() {
                cfg.set_replica_set_id(id);
            }
        }
        if force {
            let bump = 10_000 + rand::rng().random_range(0..100_000);
            cfg.version += bump;
            cfg.term = crate::config::UNINITIALIZED_TERM;
        } else {
            cfg.term = self.lock().term();
        }
        ReplSetConfig::validate_for_reconfig(&old, &cfg, force)
            .map_err(|e| e.rewrap(incompatible()))?;
        let me = self
            .find_self(&cfg)
            .await
            .map_err(|e| e.rewrap(incompatible()))?;
        self.set_me(&cfg.members[me].host.clone());
        if !force && !cfg.members[me].is_electable() {
            return Err(ServerError::new_replica_set_configuration_incompatible(format!(
                "This node, {}, with _id {} is not electable under the new configuration with {} for replica set {}",
                cfg.members[me].host, cfg.members[me].id, cfg.version_and_term(), cfg.set_name
            )));
        }
        if !force {
            // Brand-new voting members count as non-voters until they catch up.
            for m in &mut cfg.members {
                let before = old.member_by_id(m.id);
                m.newly_added = m.votes > 0
                    && match before {
                        None => true,
                        Some(b) => b.newly_added,
                    };
            }
            if !self
                .inner
                .omit_config_quorum_check
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                self.check_quorum_for_reconfig(&cfg).await?;
            }
        }
        let target = cfg.version_and_term();
        {
            let mut st = self.lock();
            if !force && st.state != MemberState::Primary {
                return Err(ServerError::not_writable_primary(
                    "primary stepped down during reconfig",
                ));
            }
            if st.config().map(|c| c.version_and_term()) != Some(old.version_and_term()) {
                return Err(ServerError::conflicting_operation_in_progress(
                    "Cannot run replSetReconfig because the node is currently updating its configuration",
                ));
            }
            let source = if force {
                ConfigSource::ForceReconfig
            } else {
                ConfigSource::Reconfig
            };
            self.install_config(&mut st, cfg, source);
            if st.state == MemberState::Primary {
                self.append_noop(&mut st, doc! {"msg": {"Reconfig set": target.version}});
                self.recompute_commit_point(&mut st);
            }
        }
        if !force {
            // Wait for a majority of the new config's voters to have it.
            let done = self
                .wait_until(deadline, |st| {
                    let cfg = st.config()?;
                    if cfg.version_and_term() != target {
                        return Some(());
                    }
                    let have = cfg
                        .voters()
                        .filter(|m| {
                            m.host == self.me()
                                || st.peers.get(&m.host).is_some_and(|p| {
                                    p.healthy
                                        && p.config_version == target.version
                                        && p.config_term == target.term
                                })
                        })
                        .count();
                    (have >= cfg.majority_vote_count()).then_some(())
                })
                .await;
            if done.is_none() {
                return Err(ServerError::max_time_ms_expired(
                    "operation exceeded time limit",
                ));
            }
        }
        Ok(doc! {})
    }

    /// checkQuorumForReconfig: a majority of the new config's voters must answer.
    async fn check_quorum_for_reconfig(&self, cfg: &ReplSetConfig) -> Result<(), ServerError> {
        let (term, my_id) = {
            let st = self.lock();
            (
                st.term(),
                cfg.member_by_host(&self.me()).map(|m| m.id).unwrap_or(-1),
            )
        };
        let mut ok_voters = Vec::new();
        let mut failed = Vec::new();
        for m in &cfg.members {
            if m.host == self.me() {
                if m.is_voter() {
                    ok_voters.push(m.host.clone());
                }
                continue;
            }
            let hb = doc! {"replSetHeartbeat": cfg.set_name.clone(), "configVersion": cfg.version, "configTerm": cfg.term, "hbv": 1, "from": self.me(), "fromId": my_id, "term": term, "$db": "admin"};
            match self
                .inner
                .peers
                .run(&m.host, &hb, Duration::from_secs(2))
                .await
            {
                Ok(r) if r.get("ok").and_then(crate::config::float) == Some(1.0) => {
                    if m.is_voter() {
                        ok_voters.push(m.host.clone());
                    }
                }
                Ok(r) => failed.push(format!(
                    "{} failed with {}",
                    m.host,
                    r.get_str("errmsg").unwrap_or("error")
                )),
                Err(e) => failed.push(format!("{} failed with {e}", m.host)),
            }
        }
        let need = cfg.majority_vote_count();
        if ok_voters.len() < need {
            return Err(ServerError::node_not_found(format!(
                "Quorum check failed because not enough voting nodes responded; required {need} but only the following {} voting nodes responded: {}; the following nodes did not respond affirmatively: {}",
                ok_voters.len(),
                ok_voters.join(", "),
                failed.join(", ")
            )));
        }
        Ok(())
    }

    async fn cmd_step_down(&self, body: &Document) -> Result<Document, ServerError> {
        self.require_repl()?;
        let secs = body
            .get("replSetStepDown")
            .and_then(number)
            .unwrap_or(60)
            .max(0) as u64;
        let catch_up = body
            .get("secondaryCatchUpPeriodSecs")
            .and_then(number)
            .unwrap_or(10)
            .max(0) as u64;
        let force = body.get_bool("force").unwrap_or(false);
        if catch_up > secs {
            return Err(ServerError::bad_value(
                "stepdown period must be longer than secondaryCatchUpPeriodSecs",
            ));
        }
        if self.lock().state != MemberState::Primary {
            return Err(ServerError::not_writable_primary(
                "not primary so can't step down",
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(catch_up);
        let caught_up = self
            .wait_until(Some(deadline), |st| {
                let cfg = st.config()?;
                let mine = st.last_applied();
                cfg.members
                    .iter()
                    .filter(|m| m.host != self.me() && m.is_electable())
                    .any(|m| {
                        st.peers.get(&m.host).is_some_and(|p| {
                            p.healthy && p.state == MemberState::Secondary && p.applied >= mine
                        })
                    })
                    .then_some(())
            })
            .await;
        if caught_up.is_none() && !force {
            return Err(ServerError::exceeded_time_limit(format!(
                "No electable secondaries caught up as of {}. Please use the replSetStepDown command with the argument {{force: true}} to force node to step down.",
                DateTime::now()
            )));
        }
        let mut st = self.lock();
        if st.state != MemberState::Primary {
            return Err(ServerError::not_writable_primary(
                "not primary so can't step down",
            ));
        }
        self.step_down(&mut st, "replSetStepDown");
        st.step_down_until = Some(std::time::Instant::now() + Duration::from_secs(secs));
        Ok(doc! {})
    }

    // ---- data plane ----

    fn check_writable(&self, st: &NodeState) -> Result<(), ServerError> {
        if st.state != MemberState::Primary {
            return Err(ServerError::not_writable_primary("not primary"));
        }
        Ok(())
    }

    fn check_readable(&self, st: &NodeState, body: &Document) -> Result<(), ServerError> {
        if self.inner.opts.set_name.is_none() || st.state == MemberState::Primary {
            return Ok(());
        }
        let mode = body
            .get_document("$readPreference")
            .ok()
            .and_then(|r| r.get_str("mode").ok())
            .unwrap_or("primary");
        let secondary_ok = mode != "primary" && matches!(st.state, MemberState::Secondary);
        if !secondary_ok {
            return Err(ServerError::not_primary_no_secondary_ok(
                "not primary and secondaryOk=false",
            ));
        }
        Ok(())
    }

    async fn cmd_insert(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("insert")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let ns = format!("{db}.{coll}");
        let docs = match body.get("documents") {
            Some(Bson::Array(a)) => a.clone(),
            _ => {
                return Err(ServerError::failed_to_parse(
                    "BSON field 'insert.documents' is missing but a required field",
                ))
            }
        };
        let ordered = body.get_bool("ordered").unwrap_or(true);
        let mut n = 0;
        let mut write_errors = Vec::new();
        let (last, term) = {
            let mut st = self.lock();
            self.check_writable(&st)?;
            for (i, d) in docs.into_iter().enumerate() {
                let Bson::Document(mut d) = d else {
                    write_errors.push(Bson::Document(doc! {"index": i as i32, "code": 2, "errmsg": "document to insert must be an object"}));
                    if ordered {
                        break;
                    } else {
                        continue;
                    }
                };
                if !d.contains_key("_id") {
                    let mut with_id = doc! {"_id": bson::oid::ObjectId::new()};
                    with_id.extend(d);
                    d = with_id;
                }
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                let dup = st
                    .durable
                    .store
                    .collections
                    .get(&ns)
                    .is_some_and(|c| c.iter().any(|x| x.get("_id") == Some(&id)));
                if dup {
                    write_errors.push(Bson::Document(doc! {
                        "index": i as i32,
                        "code": 11000,
                        "keyPattern": {"_id": 1},
                        "keyValue": {"_id": id.clone()},
                        "errmsg": format!("E11000 duplicate key error collection: {ns} index: _id_ dup key: {{ _id: {id} }}"),
                    }));
                    if ordered {
                        break;
                    } else {
                        continue;
                    }
                }
                self.append(&mut st, "i", ns.clone(), d);
                n += 1;
            }
            self.recompute_commit_point(&mut st);
            self.notify();
            (st.last_applied(), st.term())
        };
        let mut reply = doc! {"n": n};
        if !write_errors.is_empty() {
            reply.insert("writeErrors", write_errors);
        }
        if let Some(wce) = self.wait_for_write_concern(body, last, term).await {
            reply.insert("writeConcernError", wce);
        }
        Ok(reply)
    }

    /// Waits for the write concern of `body` (default `{w: "majority"}`, MongoDB 5.0+'s
    /// implicit default); returns a `writeConcernError` on failure.
    async fn wait_for_write_concern(
        &self,
        body: &Document,
        op: OpTime,
        term: i64,
    ) -> Option<Document> {
        let wc = body
            .get_document("writeConcern")
            .ok()
            .cloned()
            .unwrap_or_default();
        let w = wc
            .get("w")
            .cloned()
            .unwrap_or(Bson::String("majority".into()));
        let wtimeout = wc.get("wtimeout").and_then(number).unwrap_or(0);
        let max_time = body.get("maxTimeMS").and_then(number).unwrap_or(0);
        let deadline = [wtimeout, max_time]
            .into_iter()
            .filter(|&v| v > 0)
            .min()
            .map(|ms| Instant::now() + Duration::from_millis(ms as u64));
        tracing::debug!(me = %self.me(), ?wc, wtimeout, max_time, "waiting for write concern");
        enum Need {
            Majority,
            Nodes(usize),
        }
        let need = match &w {
            Bson::String(s) if s == "majority" => Need::Majority,
            b => match number(b) {
                Some(0) | Some(1) => return None,
                Some(n) if n > 1 => Need::Nodes(n as usize),
                _ => {
                    return Some(
                        doc! {"code": 79, "codeName": "UnknownReplWriteConcern", "errmsg": format!("Unrecognized write concern mode: {w}")},
                    )
                }
            },
        };
        let r = self
            .wait_until(deadline, |st| {
                if st.state != MemberState::Primary || st.term() != term {
                    return Some(false);
                }
                match need {
                    Need::Majority => (st.commit_point >= op).then_some(true),
                    Need::Nodes(n) => {
                        let cfg = st.config()?;
                        let have = cfg
                            .members
                            .iter()
                            .filter(|m| !m.arbiter_only)
                            .filter(|m| {
                                m.host == self.me()
                                    || st.peers.get(&m.host).is_some_and(|p| p.applied >= op)
                            })
                            .count();
                        (have >= n).then_some(true)
                    }
                }
            })
            .await;
        match r {
            Some(true) => None,
            Some(false) => Some(
                doc! {"code": 189, "codeName": "PrimarySteppedDown", "errmsg": "Primary stepped down while waiting for replication"},
            ),
            None => Some(doc! {
                "code": 64,
                "codeName": "WriteConcernFailed",
                "errmsg": "waiting for replication timed out",
                "errInfo": {"wtimeout": true, "writeConcern": {"w": w, "wtimeout": wtimeout, "provenance": if body.contains_key("writeConcern") { "clientSupplied" } else { "implicitDefault" }}},
            }),
        }
    }

    async fn cmd_find(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("find")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let filter = body
            .get_document("filter")
            .ok()
            .cloned()
            .unwrap_or_default();
        if db == "local" && coll == "oplog.rs" {
            return self.find_oplog(body, &filter).await;
        }
        let ns = format!("{db}.{coll}");
        let limit = body.get("limit").and_then(number).unwrap_or(0).max(0) as usize;
        let skip = body.get("skip").and_then(number).unwrap_or(0).max(0) as usize;
        let st = self.lock();
        self.check_readable(&st, body)?;
        let docs: Vec<Bson> = st
            .durable
            .store
            .collections
            .get(&ns)
            .map(|c| {
                c.iter()
                    .filter(|d| matches(d, &filter))
                    .skip(skip)
                    .take(if limit == 0 { usize::MAX } else { limit })
                    .cloned()
                    .map(Bson::Document)
                    .collect()
            })
            .unwrap_or_default();
        Ok(doc! {"cursor": {"firstBatch": docs, "id": 0i64, "ns": ns}})
    }

    /// The oplog as a sync source serves it: entries with `ts >= filter.ts.$gte`, waiting up
    /// to `maxAwaitTimeMS` for more when there is nothing new (a tailable awaitData cursor),
    /// with the `$replData` metadata that carries the commit point.
    async fn find_oplog(
        &self,
        body: &Document,
        filter: &Document,
    ) -> Result<Document, ServerError> {
        let from = filter
            .get_document("ts")
            .ok()
            .and_then(|d| d.get_timestamp("$gte").ok());
        let wait = body.get("maxAwaitTimeMS").and_then(number).unwrap_or(0);
        let collect = |st: &NodeState| -> Vec<Bson> {
            st.durable
                .store
                .oplog
                .iter()
                .filter(|e| {
                    from.is_none_or(|f| {
                        (e.optime.ts.time, e.optime.ts.increment) >= (f.time, f.increment)
                    })
                })
                .map(|e| Bson::Document(e.to_document()))
                .collect()
        };
        if wait > 0 {
            let start_commit = self.lock().commit_point;
            let deadline = Instant::now() + Duration::from_millis(wait as u64);
            self.wait_until(Some(deadline), |st| {
                (collect(st).len() > 1 || from.is_none() || st.commit_point != start_commit)
                    .then_some(())
            })
            .await;
        }
        let st = self.lock();
        let entries = collect(&st);
        let primary_index = st
            .config()
            .and_then(|c| {
                st.primary_host
                    .as_ref()
                    .and_then(|p| c.members.iter().position(|m| &m.host == p))
            })
            .map(|i| i as i32)
            .unwrap_or(-1);
        Ok(doc! {
            "cursor": {"firstBatch": entries, "id": 0i64, "ns": "local.oplog.rs"},
            "$replData": {
                "term": st.term(),
                "lastOpCommitted": st.commit_point.to_document(),
                "lastOpVisible": st.commit_point.to_document(),
                "configVersion": st.config().map(|c| c.version).unwrap_or(-2),
                "configTerm": st.config().map(|c| c.term).unwrap_or(-1),
                "primaryIndex": primary_index,
                "syncSourceIndex": -1,
                "isPrimary": st.state == MemberState::Primary,
            },
        })
    }

    fn cmd_count(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("count")
            .map_err(|_| ServerError::bad_value("collection name must be a string"))?;
        let filter = body.get_document("query").ok().cloned().unwrap_or_default();
        let st = self.lock();
        self.check_readable(&st, body)?;
        let n = st
            .durable
            .store
            .collections
            .get(&format!("{db}.{coll}"))
            .map(|c| c.iter().filter(|d| matches(d, &filter)).count())
            .unwrap_or(0);
        Ok(doc! {"n": n as i32})
    }

    /// Just enough of `aggregate` for the drivers' `countDocuments`: `$match`, `$skip`,
    /// `$limit`, and `$group` with `{$sum: 1}`.
    fn cmd_aggregate(&self, body: &Document) -> Result<Document, ServerError> {
        let db = body.get_str("$db").unwrap_or("test").to_string();
        let coll = body
            .get_str("aggregate")
            .map_err(|_| ServerError::bad_value("aggregate needs a collection name"))?;
        let ns = format!("{db}.{coll}");
        let pipeline = body.get_array("pipeline").map_err(|_| {
            ServerError::type_mismatch("'pipeline' option must be specified as an array")
        })?;
        let st = self.lock();
        self.check_readable(&st, body)?;
        let mut docs: Vec<Document> = st
            .durable
            .store
            .collections
            .get(&ns)
            .cloned()
            .unwrap_or_default();
        for stage in pipeline {
            let Bson::Document(stage) = stage else {
                return Err(ServerError::type_mismatch(
                    "Each element of the 'pipeline' array must be an object",
                ));
            };
            let Some((name, arg)) = stage.iter().next() else {
                continue;
            };
            match (name.as_str(), arg) {
                ("$match", Bson::Document(f)) => docs.retain(|d| matches(d, f)),
                ("$skip", b) => {
                    let n = number(b).unwrap_or(0).max(0) as usize;
                    docs = docs.into_iter().skip(n).collect();
                }
                ("$limit", b) => docs.truncate(number(b).unwrap_or(0).max(0) as usize),
                ("$group", Bson::Document(g)) => {
                    let id = g.get("_id").cloned().unwrap_or(Bson::Null);
                    let mut out = doc! {"_id": id};
                    for (k, v) in g.iter().filter(|(k, _)| k.as_str() != "_id") {
                        let per = v
                            .as_document()
                            .and_then(|d| d.get("$sum"))
                            .and_then(number)
                            .unwrap_or(0);
                        out.insert(k, per * docs.len() as i64);
                    }
                    docs = if docs.is_empty() { vec![] } else { vec![out] };
                }
                (other, _) => {
                    return Err(ServerError {
                        code: 40324,
                        code_name: "Location40324",
                        message: format!("Unrecognized pipeline stage name: '{other}'"),
                    })
                }
            }
        }
        let batch: Vec<Bson> = docs.into_iter().map(Bson::Document).collect();
        Ok(doc! {"cursor": {"firstBatch": batch, "id": 0i64, "ns": ns}})
    }
}

fn sync_id(cfg: &ReplSetConfig, host: Option<&str>) -> i32 {
    host.and_then(|h| cfg.member_by_host(h))
        .map(|m| m.id as i32)
        .unwrap_or(-1)
}

fn build_info() -> Document {
    doc! {
        "version": VERSION,
        "gitVersion": "replset-sim",
        "versionArray": [7, 0, 14, 0],
        "bits": 64,
        "debug": false,
        "maxBsonObjectSize": 16 * 1024 * 1024,
        "storageEngines": ["devnull"],
        "javascriptEngine": "none",
        "modules": ["replset-sim"],
    }
}
