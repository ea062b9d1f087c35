//! Replica-set administration: replSetInitiate, replSetGetConfig, replSetGetStatus,
//! replSetReconfig and replSetStepDown. (The commands members send each other, heartbeats,
//! votes and position updates, live with the replication machinery in `repl.rs`.)

use bson::{doc, Bson, DateTime, Document};
use rand::Rng;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

use crate::config::{number, MemberConfig, ReplSetConfig};
use crate::config_change::{
    check_implicit_default_write_concern, check_initiate_quorum, check_initiate_receiver,
    check_reconfig_quorum, complete_reconfig, prepare_initiate, prepare_reconfig, QuorumAnswer,
    ReconfigKind,
};
use crate::error::ServerError;
use crate::history::ConfigSource;
use crate::node::{MemberState, Node};

impl Node {
    pub(super) async fn cmd_initiate(&self, body: &Document) -> Result<Document, ServerError> {
        let set_name = self.require_repl()?;
        if self.lock().config().is_some() {
            return Err(ServerError::already_initialized("already initialized"));
        }
        let arg = body.get_document("replSetInitiate").ok();
        let mut cfg = prepare_initiate(arg, &set_name, &self.me(), self.defaults())?;
        let invalid = || ServerError::invalid_replica_set_config("");
        let me = self
            .find_self(&cfg)
            .await
            .map_err(|e| e.rewrap(invalid()))?;
        check_initiate_receiver(&cfg, me)?;
        self.set_me(&cfg.members[me].host.clone());
        // checkQuorumForInitiate: every proposed member must answer a heartbeat.
        let hb = doc! {"replSetHeartbeat": cfg.set_name.clone(), "configVersion": -2i64, "configTerm": -1i64, "hbv": 1, "from": self.me(), "fromId": cfg.members[me].id, "term": 0i64, "checkEmpty": true, "$db": "admin"};
        let answers = self
            .quorum_heartbeats(&cfg, &cfg.members[me].host, &hb, Duration::from_secs(5))
            .await;
        check_initiate_quorum(&cfg, me, |m| answer_of(&answers, m))?;
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
            // TopologyCoordinator::prepareStatusResponse with no self in the config (REMOVED,
            // e.g. restarted at a new address): this member's own fields, then code 93.
            let applied = st.last_applied();
            let e = ServerError::invalid_replica_set_config(
                "Our replica set config is invalid or we are not a member of it",
            );
            let mut d = doc! {
                "state": st.state.code(),
                "stateStr": st.state.name(),
                "uptime": st.started.elapsed().as_secs() as i32,
                "optime": applied.to_document(),
                "optimeDate": applied.date(),
                "lastHeartbeatMessage": "",
                "syncSourceHost": "",
                "syncSourceId": -1,
                "infoMessage": "",
            };
            d.extend(e.to_reply());
            return Ok(d);
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
                d.insert("uptime", st.started.elapsed().as_secs() as i32);
                d.insert("optime", applied.to_document());
                d.insert("optimeDate", applied.date());
                d.insert("lastAppliedWallTime", applied.date());
                d.insert("lastDurableWallTime", applied.date());
                d.insert("syncSourceHost", st.sync_source.clone().unwrap_or_default());
                d.insert("syncSourceId", sync_id(cfg, st.sync_source.as_deref()));
                d.insert("infoMessage", "");
                let primary = st.state == MemberState::Primary;
                if let Some(id) = st.election_id.filter(|_| primary) {
                    d.insert("electionId", id);
                }
                insert_election_and_config(
                    &mut d,
                    primary,
                    (st.election_time, st.election_date),
                    (cfg.version, cfg.term),
                );
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
                let uptime = p
                    .up_since
                    .filter(|_| p.healthy)
                    .map(|t| t.elapsed().as_secs() as i32)
                    .unwrap_or(0);
                d.insert("uptime", uptime);
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
                    p.last_heartbeat_recv.unwrap_or(DateTime::from_millis(0)),
                );
                d.insert("pingMs", p.ping_ms);
                d.insert("lastHeartbeatMessage", p.message.clone());
                d.insert("syncSourceHost", p.sync_source.clone());
                d.insert("syncSourceId", sync_id(cfg, Some(&p.sync_source)));
                d.insert("infoMessage", "");
                insert_election_and_config(
                    &mut d,
                    p.healthy && p.state == MemberState::Primary,
                    (p.election_time, p.election_date),
                    (p.config_version, p.config_term),
                );
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
        let kind = if force {
            ReconfigKind::Force {
                version_bump: 10_000 + rand::rng().random_range(0..100_000),
            }
        } else {
            ReconfigKind::Safe {
                term: self.lock().term(),
            }
        };
        let cfg = prepare_reconfig(&old, &raw, &set_name, kind, self.defaults())?;
        let cwwc = super::write_concern::cluster_wide_write_concern(&self.lock()).is_some();
        check_implicit_default_write_concern(&old, &cfg, cwwc, kind)?;
        // findSelfInConfig's NodeNotFound 74 (or 93 for several matches) as it is: the
        // command does not wrap what _doReplSetReconfig returns.
        let me = self.find_self(&cfg).await?;
        self.set_me(&cfg.members[me].host.clone());
        complete_reconfig(&cfg, me, kind)?;
        if !force
            && !self
                .inner
                .omit_config_quorum_check
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.check_quorum_for_reconfig(&cfg).await?;
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
        let hb = doc! {"replSetHeartbeat": cfg.set_name.clone(), "configVersion": cfg.version, "configTerm": cfg.term, "hbv": 1, "from": self.me(), "fromId": my_id, "term": term, "$db": "admin"};
        let answers = self
            .quorum_heartbeats(cfg, &self.me(), &hb, Duration::from_secs(2))
            .await;
        check_reconfig_quorum(cfg, &self.me(), |m| answer_of(&answers, m))
    }

    /// The quorum checks' round: `hb` to every member of `cfg` but `me`, each answer noted.
    async fn quorum_heartbeats(
        &self,
        cfg: &ReplSetConfig,
        me: &str,
        hb: &Document,
        timeout: Duration,
    ) -> HashMap<String, QuorumAnswer> {
        let mut answers = HashMap::new();
        for m in cfg.members.iter().filter(|m| m.host != me) {
            let r = self.inner.peers.run(&m.host, hb, timeout).await;
            answers.insert(m.host.clone(), quorum_answer(r));
        }
        answers
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

    /// replSetFreeze (`TopologyCoordinator::prepareFreezeResponse`): a follower will not
    /// stand for election for `secs` seconds; 0 unfreezes. A primary refuses with 95
    /// NotSecondary. A restart unfreezes (the freeze is not durable).
    pub(super) fn cmd_freeze(&self, body: &Document) -> Result<Document, ServerError> {
        self.require_repl()?;
        let secs = body.get("replSetFreeze").and_then(number).unwrap_or(0);
        let mut st = self.lock();
        if st.state == MemberState::Primary {
            return Err(ServerError::not_secondary(
                "Cannot freeze node when primary or running for election, state: Primary",
            ));
        }
        let now = std::time::Instant::now();
        let mut reply = doc! {};
        if secs <= 0 {
            st.step_down_until = Some(now);
            reply.insert("info", "unfreezing");
            tracing::info!(me = %self.me(), "unfreezing");
        } else {
            if secs == 1 {
                reply.insert("warning", "you really want to freeze for only 1 second?");
            }
            let until = now + Duration::from_secs(secs as u64);
            st.step_down_until = Some(st.step_down_until.map_or(until, |t| t.max(until)));
            tracing::info!(me = %self.me(), secs, "freezing");
        }
        self.notify();
        Ok(reply)
    }

    /// replSetMaintenance (`ReplicationCoordinatorImpl::setMaintenanceMode`): `true` puts a
    /// secondary in RECOVERING (counted: each `true` needs its `false`), `false` undoes one.
    /// A primary refuses with 95 NotSecondary; `false` with none active fails with 96
    /// OperationFailed.
    pub(super) fn cmd_maintenance(&self, body: &Document) -> Result<Document, ServerError> {
        self.require_repl()?;
        let activate = match body.get("replSetMaintenance") {
            Some(Bson::Boolean(b)) => *b,
            Some(b) => number(b).is_some_and(|n| n != 0),
            None => false,
        };
        let mut st = self.lock();
        if st.state == MemberState::Primary {
            return Err(ServerError::not_secondary(
                "primaries can't modify maintenance mode",
            ));
        }
        if activate {
            st.maintenance_calls += 1;
            tracing::info!(me = %self.me(), other_tasks = st.maintenance_calls - 1, "going into maintenance mode");
            if st.state == MemberState::Secondary {
                self.set_state(&mut st, MemberState::Recovering);
            }
        } else if st.maintenance_calls > 0 {
            st.maintenance_calls -= 1;
            tracing::info!(me = %self.me(), other_tasks = st.maintenance_calls, "leaving maintenance mode");
            if st.maintenance_calls == 0 && st.state == MemberState::Recovering {
                self.set_state(&mut st, MemberState::Secondary);
            }
        } else {
            return Err(ServerError::operation_failed(
                "already out of maintenance mode",
            ));
        }
        self.notify();
        Ok(doc! {})
    }
}

fn sync_id(cfg: &ReplSetConfig, host: Option<&str>) -> i32 {
    host.and_then(|h| cfg.member_by_host(h))
        .map(|m| m.id as i32)
        .unwrap_or(-1)
}

/// A heartbeat reply (or its failure) as the quorum check counts it.
fn quorum_answer(r: Result<Document, crate::peer::PeerError>) -> QuorumAnswer {
    match r {
        Ok(r) if r.get("ok").and_then(crate::config::float) == Some(1.0) => QuorumAnswer::Ok {
            config_version: r.get("configVersion").and_then(number).unwrap_or(-2),
        },
        Ok(r) => QuorumAnswer::Failed(r.get_str("errmsg").unwrap_or("an error").to_string()),
        Err(e) => QuorumAnswer::Failed(e.to_string()),
    }
}

fn answer_of(answers: &HashMap<String, QuorumAnswer>, m: &MemberConfig) -> QuorumAnswer {
    answers
        .get(&m.host)
        .cloned()
        .unwrap_or_else(|| QuorumAnswer::Failed("no answer".into()))
}

/// The end of a `replSetGetStatus` member entry: `electionTime` and `electionDate` of a
/// primary, then the `configVersion` and `configTerm` it holds (int32, as mongod writes them).
fn insert_election_and_config(
    d: &mut Document,
    primary: bool,
    (time, date): (Option<bson::Timestamp>, Option<DateTime>),
    (version, term): (i64, i64),
) {
    if primary {
        if let Some(ts) = time {
            d.insert("electionTime", ts);
        }
        if let Some(date) = date {
            d.insert("electionDate", date);
        }
    }
    d.insert("configVersion", version as i32);
    d.insert("configTerm", term as i32);
}
