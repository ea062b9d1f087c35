//! Elections as protocol version 1 holds them: the election timeout, a dry run, then
//! `replSetRequestVotes` in the next term; the voter's side; priority takeover; step up.

use bson::{doc, Document};
use rand::Rng;
use std::time::{Duration, Instant};

use crate::config::number;
use crate::error::ServerError;
use crate::node::{MemberState, Node, NodeState};
use crate::oplog::OpTime;

use crate::repl::PEER_TIMEOUT;

impl Node {
    // ---- elections ----

    pub(crate) async fn election_loop(&self) {
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
}

fn random_offset(timeout: Duration) -> Duration {
    let max = (timeout.as_millis() as u64 * 15 / 100).max(1);
    Duration::from_millis(rand::rng().random_range(0..max))
}
