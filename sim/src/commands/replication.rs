//! Replica-set administration: replSetInitiate, replSetGetConfig, replSetGetStatus,
//! replSetReconfig and replSetStepDown. (The commands members send each other, heartbeats,
//! votes and position updates, live with the replication machinery in `repl.rs`.)

use bson::{doc, Bson, DateTime, Document};
use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

use crate::config::{normalize_host, number, ReplSetConfig};
use crate::error::ServerError;
use crate::history::ConfigSource;
use crate::node::{MemberState, Node};

impl Node {
    pub(super) async fn cmd_initiate(&self, body: &Document) -> Result<Document, ServerError> {
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

    pub(super) fn cmd_get_config(&self, body: &Document) -> Result<Document, ServerError> {
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

    pub(super) fn cmd_get_status(&self) -> Result<Document, ServerError> {
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

    pub(super) async fn cmd_reconfig(&self, body: &Document) -> Result<Document, ServerError> {
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

    pub(super) async fn cmd_step_down(&self, body: &Document) -> Result<Document, ServerError> {
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
}

fn sync_id(cfg: &ReplSetConfig, host: Option<&str>) -> i32 {
    host.and_then(|h| cfg.member_by_host(h))
        .map(|m| m.id as i32)
        .unwrap_or(-1)
}
