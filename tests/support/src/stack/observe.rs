//! What happens to the replica set while a step runs (a rolling update, a reschedule, a
//! restart): [`Deployment::observe`] runs the step and, at the same time,
//! - a writer: `w: "majority"` writes through the URI from the probe container, one after the
//!   other, each a new client process, every acknowledged one recorded;
//! - a poller: in rounds, every started mongo task (healthy or not) is asked with the image's
//!   own healthcheck probe (`mongod --sim-probe --sim-probe-config`) for its state and its
//!   current config, so that every config the set goes through is recorded, with when.
//!
//! [`Observed`] then answers the questions the tests and the benchmark ask: were all
//! acknowledged writes kept, did any reconfig change more than one voter, how long was there
//! no primary, how many members were not ready at once.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Deployment, Task, MONGO};

/// The writer's pause after each write: a write a second or so, enough to see every gap, and
/// few enough to read them all back afterwards (one client process a read).
const WRITE_PAUSE: Duration = Duration::from_millis(700);

/// The time between two rounds of the poller (a round itself takes a few hundred ms: one
/// `docker exec` per task, all at once).
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// How long [`Deployment::observe`] goes on writing after its step, until a write is
/// acknowledged again.
const AFTER_STEP: Duration = Duration::from_secs(120);

/// One `w: "majority"` write of the writer.
#[derive(Debug, Clone)]
pub struct WriteSeen {
    pub id: String,
    pub ok: bool,
    /// When it was answered, from the start of the step.
    pub at: Duration,
    /// Why it failed.
    pub error: Option<String>,
}

/// A member's answer to the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberHealth {
    Primary,
    Secondary,
    /// In a config but neither PRIMARY nor SECONDARY (initial sync, ...); the probe's line.
    NotReady(String),
    /// Not in any config (not initiated, not added yet, or at an address its config does not
    /// name); the probe's line.
    NoConfig(String),
    /// The probe could not run or reach it (the container stopping, say).
    Unreachable(String),
}

impl MemberHealth {
    pub fn is_ready(&self) -> bool {
        matches!(self, MemberHealth::Primary | MemberHealth::Secondary)
    }
}

/// One task of the mongo service in one round.
#[derive(Debug, Clone)]
pub struct MemberSeen {
    pub slot: i64,
    pub node: usize,
    pub task_id: String,
    /// `ip:27017`
    pub host: String,
    pub health: MemberHealth,
    /// The term of a primary (from its `electionId`), when it is one.
    pub primary_term: Option<i64>,
}

/// One round of the poller.
#[derive(Debug, Clone)]
pub struct Round {
    /// When the round started, from the start of the step.
    pub at: Duration,
    pub members: Vec<MemberSeen>,
}

/// A replica set config as some member showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSeen {
    pub version: i64,
    pub term: i64,
    /// member `_id` to (host, votes)
    pub members: BTreeMap<i64, (String, i64)>,
    /// When a member showed it first, from the start of the step.
    pub first_seen: Duration,
}

impl ConfigSeen {
    fn from_json(v: &Value, at: Duration) -> Option<ConfigSeen> {
        let members = v["members"]
            .as_array()?
            .iter()
            .map(|m| {
                Some((
                    m["_id"].as_i64()?,
                    (
                        m["host"].as_str()?.to_string(),
                        m["votes"].as_i64().unwrap_or(1),
                    ),
                ))
            })
            .collect::<Option<BTreeMap<_, _>>>()?;
        Some(ConfigSeen {
            version: v["version"].as_i64()?,
            term: v["term"].as_i64().unwrap_or(-1),
            members,
            first_seen: at,
        })
    }

    /// `_id` to host of the members with a vote.
    pub fn voters(&self) -> BTreeMap<i64, &str> {
        self.members
            .iter()
            .filter(|(_, (_, votes))| *votes > 0)
            .map(|(id, (host, _))| (*id, host.as_str()))
            .collect()
    }
}

/// Two configs seen one after the other (by version).
#[derive(Debug, Clone)]
pub struct ConfigStep {
    pub from: ConfigSeen,
    pub to: ConfigSeen,
    /// The member `_id`s that gained or lost a vote, or kept it under another host: the voters
    /// changed.
    pub voters_changed: Vec<i64>,
    /// Only hosts changed (the same `_id`s with the same votes).
    pub hosts_only: bool,
}

/// Everything seen during a step.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub took: Duration,
    pub writes: Vec<WriteSeen>,
    pub rounds: Vec<Round>,
    /// By (version, term).
    pub configs: BTreeMap<(i64, i64), ConfigSeen>,
}

impl Observed {
    /// The ids of the acknowledged writes.
    pub fn acknowledged(&self) -> Vec<String> {
        self.writes
            .iter()
            .filter(|w| w.ok)
            .map(|w| w.id.clone())
            .collect()
    }

    /// How many writes failed (no primary, or no majority to acknowledge them).
    pub fn refused(&self) -> usize {
        self.writes.iter().filter(|w| !w.ok).count()
    }

    /// The longest span of rounds in which no member said PRIMARY: from the first round
    /// without one to the next round with one (or to the end of the step).
    pub fn longest_without_primary(&self) -> Duration {
        let mut longest = Duration::ZERO;
        let mut since: Option<Duration> = None;
        for r in &self.rounds {
            let primary = r.members.iter().any(|m| m.health == MemberHealth::Primary);
            match (primary, since) {
                (false, None) => since = Some(r.at),
                (true, Some(s)) => {
                    longest = longest.max(r.at.saturating_sub(s));
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(s) = since {
            longest = longest.max(self.took.saturating_sub(s));
        }
        longest
    }

    /// The most slots of `slots` that were not ready (PRIMARY or SECONDARY) in one round: no
    /// task, a task not answering, or a member syncing. With parallelism 1 and a healthcheck,
    /// a rolling update never has more than one.
    pub fn most_not_ready(&self, slots: &[i64]) -> (usize, Option<&Round>) {
        let mut most = (0, None);
        for r in &self.rounds {
            let n = slots
                .iter()
                .filter(|slot| {
                    !r.members
                        .iter()
                        .any(|m| m.slot == **slot && m.health.is_ready())
                })
                .count();
            if n > most.0 {
                most = (n, Some(r));
            }
        }
        most
    }

    /// When the member of `slot` at `host` was first seen SECONDARY or PRIMARY.
    pub fn first_ready(&self, slot: i64, host: &str) -> Option<Duration> {
        self.rounds.iter().find_map(|r| {
            r.members
                .iter()
                .any(|m| m.slot == slot && m.host == host && m.health.is_ready())
                .then_some(r.at)
        })
    }

    /// When the member of `slot` at `host` was first seen in a config of its own (ready or
    /// not): for a member at a new address, once the reconciler has moved it there.
    pub fn first_in_a_config(&self, slot: i64, host: &str) -> Option<Duration> {
        self.rounds.iter().find_map(|r| {
            r.members
                .iter()
                .any(|m| {
                    m.slot == slot
                        && m.host == host
                        && !matches!(
                            m.health,
                            MemberHealth::NoConfig(_) | MemberHealth::Unreachable(_)
                        )
                })
                .then_some(r.at)
        })
    }

    /// The first config (by version) in which member `slot` votes with host `host`.
    pub fn first_voting_config(&self, slot: i64, host: &str) -> Option<&ConfigSeen> {
        self.configs
            .values()
            .find(|c| c.voters().get(&slot) == Some(&host))
    }

    /// Every pair of consecutive configs seen, with what changed.
    pub fn config_steps(&self) -> Vec<ConfigStep> {
        let configs: Vec<&ConfigSeen> = self.configs.values().collect();
        configs
            .windows(2)
            .map(|w| {
                let (a, b) = (w[0], w[1]);
                let (va, vb) = (a.voters(), b.voters());
                let ids: std::collections::BTreeSet<i64> =
                    va.keys().chain(vb.keys()).copied().collect();
                let voters_changed = ids
                    .into_iter()
                    .filter(|id| va.get(id) != vb.get(id))
                    .collect();
                let votes = |c: &ConfigSeen| -> BTreeMap<i64, i64> {
                    c.members.iter().map(|(id, (_, v))| (*id, *v)).collect()
                };
                ConfigStep {
                    from: a.clone(),
                    to: b.clone(),
                    voters_changed,
                    hosts_only: votes(a) == votes(b),
                }
            })
            .collect()
    }

    /// The consecutive configs that changed more voters than one per version between them
    /// (with every version seen: more than one voter in one reconfig). Empty when the rule
    /// held. A version missed by the poller lets the next step change one voter per missing
    /// version, so that the check never blames the set for what the poller did not see.
    pub fn more_than_one_voter_changed(&self) -> Vec<ConfigStep> {
        self.config_steps()
            .into_iter()
            .filter(|s| {
                let versions = (s.to.version - s.from.version).max(1) as usize;
                s.voters_changed.len() > versions
            })
            .collect()
    }

    /// The terms in which more than one member was seen PRIMARY (by the term in its
    /// `electionId`), each with the hosts and the first round that showed the second one.
    /// Empty when the rule held: never two primaries in one term.
    pub fn primaries_sharing_a_term(&self) -> Vec<(i64, BTreeSet<String>, Duration)> {
        let mut by_term: BTreeMap<i64, (BTreeSet<String>, Option<Duration>)> = BTreeMap::new();
        for r in &self.rounds {
            for m in &r.members {
                if let (MemberHealth::Primary, Some(term)) = (&m.health, m.primary_term) {
                    let (hosts, second) = by_term.entry(term).or_default();
                    if hosts.insert(m.host.clone()) && hosts.len() == 2 {
                        *second = Some(r.at);
                    }
                }
            }
        }
        by_term
            .into_iter()
            .filter_map(|(term, (hosts, second))| second.map(|at| (term, hosts, at)))
            .collect()
    }

    /// The configs the poller missed (versions between two seen ones), for the log.
    pub fn versions_missed(&self) -> i64 {
        self.config_steps()
            .iter()
            .map(|s| (s.to.version - s.from.version - 1).clamp(0, 5))
            .sum()
    }

    /// One line for the test's log.
    pub fn summary(&self) -> String {
        let versions: Vec<i64> = self.configs.keys().map(|(v, _)| *v).collect();
        format!(
            "{:.1}s; {} writes acknowledged, {} refused; longest without a primary {:.1}s; \
             configs seen {versions:?} ({} versions missed); {} poll rounds",
            self.took.as_secs_f64(),
            self.acknowledged().len(),
            self.refused(),
            self.longest_without_primary().as_secs_f64(),
            self.versions_missed(),
            self.rounds.len()
        )
    }
}

impl Deployment {
    /// Runs `step` while writing (ids `<label>-<n>`) and polling the members (see the module
    /// docs); the step's result and what was seen. Needs [`Deployment::start_probe`] first.
    pub async fn observe<T, F>(&self, label: &str, step: F) -> (T, Observed)
    where
        F: Future<Output = T>,
    {
        let start = Instant::now();
        let done = Cell::new(false);
        let step = async {
            let v = step.await;
            done.set(true);
            v
        };
        // The writer goes on after the step until one write is acknowledged again (or
        // AFTER_STEP has passed): a step ends when the set takes writes, not only when its
        // members are back, and the step's own checks may pass before the writer's client has
        // found the new primary.
        let finished = Cell::new(false);
        let writer = async {
            let mut writes: Vec<WriteSeen> = Vec::new();
            let mut n = 0;
            let mut done_at = None;
            loop {
                if done.get() {
                    let at = *done_at.get_or_insert_with(|| start.elapsed());
                    let acked_after = writes.iter().any(|w| w.ok && w.at >= at);
                    if acked_after || start.elapsed() >= at + AFTER_STEP {
                        break;
                    }
                }
                n += 1;
                let id = format!("{label}-{n}");
                let r = self.probe_write(&id).await;
                writes.push(WriteSeen {
                    id,
                    ok: r.is_ok(),
                    at: start.elapsed(),
                    error: r.err(),
                });
                tokio::time::sleep(WRITE_PAUSE).await;
            }
            finished.set(true);
            writes
        };
        let poller = self.poll_members(start, &finished);
        let (value, writes, (rounds, configs)) = tokio::join!(step, writer, poller);
        let observed = Observed {
            took: start.elapsed(),
            writes,
            rounds,
            configs,
        };
        eprintln!("[stack] {label}: {}", observed.summary());
        (value, observed)
    }

    /// Runs `step` while polling the members (no writer: the caller brings its own clients);
    /// the step's result and what the poller saw ([`Observed::writes`] stays empty).
    pub async fn poll_while<T, F>(&self, step: F) -> (T, Observed)
    where
        F: Future<Output = T>,
    {
        let start = Instant::now();
        let done = Cell::new(false);
        let step = async {
            let v = step.await;
            done.set(true);
            v
        };
        let (value, (rounds, configs)) = tokio::join!(step, self.poll_members(start, &done));
        let observed = Observed {
            took: start.elapsed(),
            writes: Vec::new(),
            rounds,
            configs,
        };
        (value, observed)
    }

    /// The poller: rounds until `stop`, each asking every started mongo task at once.
    async fn poll_members(
        &self,
        start: Instant,
        stop: &Cell<bool>,
    ) -> (Vec<Round>, BTreeMap<(i64, i64), ConfigSeen>) {
        let mut rounds = Vec::new();
        let mut configs = BTreeMap::new();
        while !stop.get() {
            let at = start.elapsed();
            if let Ok(tasks) = self.tasks_in(MONGO, &["starting", "running"]).await {
                let answers =
                    futures::future::join_all(tasks.iter().map(|t| self.ask_member(t))).await;
                let mut members = Vec::new();
                for (seen, config) in answers {
                    if let Some(c) = config.and_then(|v| ConfigSeen::from_json(&v, at)) {
                        configs.entry((c.version, c.term)).or_insert(c);
                    }
                    members.push(seen);
                }
                rounds.push(Round { at, members });
            }
            tokio::time::sleep(POLL_PAUSE).await;
        }
        (rounds, configs)
    }

    /// The probe of the image's healthcheck, in the task's container: its state, and its
    /// config if it has one.
    async fn ask_member(&self, t: &Task) -> (MemberSeen, Option<Value>) {
        let node = self.swarm.node(t.node);
        let out = node
            .docker_output(&[
                "exec",
                &t.container,
                "mongod",
                "--sim-probe",
                "--sim-probe-config",
                // Authentication is on: the config is read as a member reads it.
                "--keyFile",
                "/run/secrets/mongo_keyfile",
                "--port",
                "27017",
            ])
            .await;
        let (health, config, primary_term) = match out {
            Err(e) => (MemberHealth::Unreachable(e), None, None),
            Ok(o) => {
                // The probe's line: "port 27017: PRIMARY: healthy", "port 27017: SECONDARY: ...".
                let line = o.stderr.lines().last().unwrap_or_default().to_string();
                let health = if !o.success {
                    if line.contains("cannot connect") || line.is_empty() {
                        MemberHealth::Unreachable(format!("{line} {}", o.stderr))
                    } else if line.contains("no replica set config") {
                        MemberHealth::NoConfig(line)
                    } else {
                        MemberHealth::NotReady(line)
                    }
                } else if line.contains(": PRIMARY") {
                    MemberHealth::Primary
                } else {
                    MemberHealth::Secondary
                };
                // Two lines of JSON: the config (with `members`), the `hello` answer.
                let lines: Vec<Value> = o
                    .stdout
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .collect();
                let config = lines.iter().find(|v| v.get("members").is_some()).cloned();
                let primary_term = lines
                    .iter()
                    .find(|v| v["isWritablePrimary"] == true)
                    .and_then(|v| term_of_election_id(&v["electionId"]));
                (health, config, primary_term)
            }
        };
        (
            MemberSeen {
                slot: t.slot,
                node: t.node,
                task_id: t.id.clone(),
                host: format!("{}:27017", t.ip),
                health,
                primary_term,
            },
            config,
        )
    }
}

/// The term in a primary's `electionId` (`OID::fromTerm`: 0x7fffffff, then the term as 8
/// big-endian bytes), as relaxed extended JSON (`{"$oid": "7fffffff..."}`).
pub fn term_of_election_id(v: &Value) -> Option<i64> {
    let hex = v["$oid"].as_str()?;
    if hex.len() != 24 || !hex.starts_with("7fffffff") {
        return None;
    }
    i64::from_str_radix(&hex[8..], 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_term_is_read_from_an_election_id() {
        let id = serde_json::json!({"$oid": "7fffffff000000000000002a"});
        assert_eq!(term_of_election_id(&id), Some(42));
        // Not OID::fromTerm (an ObjectId of another kind), or not an ObjectId at all.
        let other = serde_json::json!({"$oid": "5f1d7a2b000000000000002a"});
        assert_eq!(term_of_election_id(&other), None);
        assert_eq!(term_of_election_id(&serde_json::json!(null)), None);
    }

    fn seen(host: &str, health: MemberHealth, primary_term: Option<i64>) -> MemberSeen {
        MemberSeen {
            slot: 1,
            node: 1,
            task_id: String::new(),
            host: host.into(),
            health,
            primary_term,
        }
    }

    #[test]
    fn two_primaries_are_blamed_only_when_they_share_a_term() {
        let round = |secs, members| Round {
            at: Duration::from_secs(secs),
            members,
        };
        let mut o = Observed {
            rounds: vec![
                round(1, vec![seen("a:27017", MemberHealth::Primary, Some(1))]),
                // A deposed primary that has not stepped down yet, beside the new one: two
                // terms, which MongoDB allows (the old one cannot commit a majority write).
                round(
                    2,
                    vec![
                        seen("a:27017", MemberHealth::Primary, Some(1)),
                        seen("b:27017", MemberHealth::Primary, Some(2)),
                    ],
                ),
            ],
            ..Observed::default()
        };
        assert!(o.primaries_sharing_a_term().is_empty());
        o.rounds.push(round(
            3,
            vec![
                seen("b:27017", MemberHealth::Primary, Some(2)),
                seen("c:27017", MemberHealth::Primary, Some(2)),
            ],
        ));
        let blamed = o.primaries_sharing_a_term();
        assert_eq!(blamed.len(), 1, "{blamed:?}");
        assert_eq!(blamed[0].0, 2);
        assert_eq!(blamed[0].2, Duration::from_secs(3));
    }
}
