//! The nemesis's schedule: which fault, when, against which target, all from the seed. The
//! same seed gives the same schedule (the generator is written out here, so that no library
//! update changes it); targets are picks (`pick % candidates`) resolved when the fault starts,
//! as the tasks and the leader are only known then.

use std::fmt;
use std::time::Duration;

/// SplitMix64: small, fast, and fixed (a run's seed must give the same schedule forever).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    fn pick(&mut self) -> usize {
        (self.next_u64() % 1024) as usize
    }

    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.between(lo * 1000, hi * 1000))
    }
}

/// One fault of the nemesis. `pick` chooses among the candidates when the fault starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `docker kill` of a mongo task's container (swarm starts a new one on its node).
    KillMongo { pick: usize },
    /// A worker node killed (its container), made anew after `down` and joined again.
    KillNode { pick: usize, down: Duration },
    /// A node (not the clients') cut off from the others for `hold`: every packet on its
    /// interface of the nodes' network dropped, then let through again.
    Partition { pick: usize, hold: Duration },
    /// A node's dockerd stopped (SIGTERM, its containers with it) and started again.
    RestartDockerd { pick: usize },
    /// The reconciler leader's container killed.
    KillLeader,
    /// The reconciler leader's process stopped (SIGSTOP) for `hold`, then continued.
    PauseLeader { hold: Duration },
    /// A bridge (swarm-registrator) task's container killed.
    KillBridge { pick: usize },
    /// A store member's container killed (swarm starts it again on its node, with its data).
    RestartStore { pick: usize },
    /// `docker service update --force` of the mongo service: every task replaced in turn.
    RollingUpdate,
    /// `replset-reconciler scale` up by one, then back down.
    ScaleUpDown,
}

/// The fault kinds, for the report (in this order).
pub const KINDS: [&str; 10] = [
    "kill-mongo",
    "kill-node",
    "partition",
    "restart-dockerd",
    "kill-leader",
    "pause-leader",
    "kill-bridge",
    "restart-store",
    "rolling-update",
    "scale-up-down",
];

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::KillMongo { .. } => KINDS[0],
            Fault::KillNode { .. } => KINDS[1],
            Fault::Partition { .. } => KINDS[2],
            Fault::RestartDockerd { .. } => KINDS[3],
            Fault::KillLeader => KINDS[4],
            Fault::PauseLeader { .. } => KINDS[5],
            Fault::KillBridge { .. } => KINDS[6],
            Fault::RestartStore { .. } => KINDS[7],
            Fault::RollingUpdate => KINDS[8],
            Fault::ScaleUpDown => KINDS[9],
        }
    }

    /// Faults of one class wait for each other: at most one node away at a time (so that a
    /// majority of the set and of the store can be had), at most one change of the mongo
    /// service's tasks at a time (an update, a scale, a node made anew).
    pub fn class(&self) -> Class {
        match self {
            Fault::KillNode { .. } | Fault::Partition { .. } | Fault::RestartDockerd { .. } => {
                Class::Node
            }
            Fault::RollingUpdate | Fault::ScaleUpDown => Class::Service,
            _ => Class::Process,
        }
    }
}

/// See [`Fault::class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Node,
    Service,
    /// Killed or paused processes: never wait.
    Process,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillMongo { pick }
            | Fault::RestartDockerd { pick }
            | Fault::KillBridge { pick }
            | Fault::RestartStore { pick } => write!(f, "{} (pick {pick})", self.kind()),
            Fault::KillNode { pick, down } => {
                write!(
                    f,
                    "{} (pick {pick}, down {:.1}s)",
                    self.kind(),
                    down.as_secs_f64()
                )
            }
            Fault::Partition { pick, hold } => {
                write!(
                    f,
                    "{} (pick {pick}, {:.1}s)",
                    self.kind(),
                    hold.as_secs_f64()
                )
            }
            Fault::PauseLeader { hold } => {
                write!(f, "{} ({:.1}s)", self.kind(), hold.as_secs_f64())
            }
            Fault::KillLeader | Fault::RollingUpdate | Fault::ScaleUpDown => {
                write!(f, "{}", self.kind())
            }
        }
    }
}

/// A fault and when it starts, from the start of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub at: Duration,
    pub fault: Fault,
}

/// How often each kind is drawn (out of the sum). Kills and partitions often; the slow
/// changes of the whole service (an update takes a minute or more) rarely.
const WEIGHTS: [(u64, &str); 10] = [
    (4, "kill-mongo"),
    (1, "kill-node"),
    (3, "partition"),
    (2, "restart-dockerd"),
    (2, "kill-leader"),
    (2, "pause-leader"),
    (2, "kill-bridge"),
    (2, "restart-store"),
    (1, "rolling-update"),
    (1, "scale-up-down"),
];

/// The gap between two fault starts: short enough that faults overlap (a partition or a
/// pause lasts up to 20 s), long enough that the set often converges in between.
const GAP_SECS: (u64, u64) = (6, 24);

/// The schedule of a run of `length`: faults start from 10 s in until `length`.
pub fn schedule(seed: u64, length: Duration) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let total: u64 = WEIGHTS.iter().map(|(w, _)| w).sum();
    let mut at = Duration::from_secs(10);
    let mut out = Vec::new();
    while at < length {
        let mut draw = rng.next_u64() % total;
        let kind = WEIGHTS
            .iter()
            .find(|(w, _)| {
                if draw < *w {
                    true
                } else {
                    draw -= w;
                    false
                }
            })
            .map(|(_, k)| *k)
            .unwrap_or("kill-mongo");
        let fault = match kind {
            "kill-node" => Fault::KillNode {
                pick: rng.pick(),
                down: rng.secs(10, 30),
            },
            "partition" => Fault::Partition {
                pick: rng.pick(),
                hold: rng.secs(3, 20),
            },
            "restart-dockerd" => Fault::RestartDockerd { pick: rng.pick() },
            "kill-leader" => Fault::KillLeader,
            "pause-leader" => Fault::PauseLeader {
                hold: rng.secs(2, 20),
            },
            "kill-bridge" => Fault::KillBridge { pick: rng.pick() },
            "restart-store" => Fault::RestartStore { pick: rng.pick() },
            "rolling-update" => Fault::RollingUpdate,
            "scale-up-down" => Fault::ScaleUpDown,
            _ => Fault::KillMongo { pick: rng.pick() },
        };
        out.push(Planned { at, fault });
        at += rng.secs(GAP_SECS.0, GAP_SECS.1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = schedule(7, Duration::from_secs(600));
        assert_eq!(a, schedule(7, Duration::from_secs(600)));
        assert_ne!(a, schedule(8, Duration::from_secs(600)));
        // A shorter run is the start of the longer one: a seed's first minutes can be re-run.
        let short = schedule(7, Duration::from_secs(120));
        assert_eq!(short[..], a[..short.len()]);
    }

    #[test]
    fn the_generator_is_fixed() {
        // SplitMix64's first outputs for seed 0 (the reference values of its author).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn a_long_run_draws_every_kind_and_faults_overlap() {
        let s = schedule(1, Duration::from_secs(30 * 60));
        let kinds: BTreeSet<&str> = s.iter().map(|p| p.fault.kind()).collect();
        assert_eq!(kinds.len(), KINDS.len(), "{kinds:?}");
        assert!(s.windows(2).all(|w| w[0].at < w[1].at));
        let overlapping = s.windows(2).any(|w| match w[0].fault {
            Fault::Partition { hold, .. } | Fault::PauseLeader { hold } => w[0].at + hold > w[1].at,
            _ => false,
        });
        assert!(overlapping, "no fault started while another held");
        assert!(s.iter().all(|p| p.at < Duration::from_secs(30 * 60)));
    }
}
