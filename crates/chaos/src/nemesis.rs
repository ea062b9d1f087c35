//! The nemesis: injects one [`Fault`] against the deployed stack and heals what it broke
//! (a partition is let through again, a paused process continued, a lost node made anew).
//! [`heal_everything`] heals whatever a fault left behind at the end of a run.
//!
//! The clients run on node 1 (the first manager), so that what they record survives the run:
//! node faults (kill, partition, dockerd restart) spare it; every process on it (a mongo task,
//! the leader, a bridge, a store member) is fair game.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use test_support::dind::host_docker;
use test_support::stack::{Deployment, BRIDGE, MONGO, RECONCILER};

use crate::schedule::Fault;

/// How long a rolling update may take under faults: more than twice the longest seen in the
/// long runs (134 s for three members, one pause resumed); one that takes longer has stalled.
const SERVICE_STEP: Duration = Duration::from_secs(300);

/// What was done: the target, in words.
pub type Injected = Result<String, String>;

/// Injects `fault` and heals it (for the faults that last: when their time is over).
pub async fn inject(d: &Deployment, fault: &Fault) -> Injected {
    match fault {
        Fault::KillMongo { pick } => {
            // Healthy or not (a member in initial sync, or without a config, can be killed).
            let tasks = started_tasks(d, MONGO).await?;
            let t = choose(&tasks, *pick, "running mongo task")?;
            d.swarm.node(t.node).docker(&["kill", &t.container]).await?;
            Ok(format!("mongo slot {} on dnode{}", t.slot, t.node))
        }
        Fault::KillBridge { pick } => {
            let tasks = live_tasks(d, BRIDGE).await?;
            let t = choose(&tasks, *pick, "running bridge task")?;
            d.swarm.node(t.node).docker(&["kill", &t.container]).await?;
            Ok(format!("the bridge on dnode{}", t.node))
        }
        Fault::RestartStore { pick } => {
            let services = d.store.services();
            let service = services[pick % services.len()];
            let tasks = live_tasks(d, service).await?;
            let t = choose(&tasks, 0, &format!("running task of {service}"))?;
            d.swarm.node(t.node).docker(&["kill", &t.container]).await?;
            Ok(format!("{service} on dnode{}", t.node))
        }
        Fault::KillLeader => {
            let t = d.leader_task().await?;
            d.swarm.node(t.node).docker(&["kill", &t.container]).await?;
            Ok(format!("the reconciler leader on dnode{}", t.node))
        }
        Fault::PauseLeader { hold } => {
            let t = d.leader_task().await?;
            let node = d.swarm.node(t.node);
            node.docker(&["kill", "--signal", "STOP", &t.container])
                .await?;
            tokio::time::sleep(*hold).await;
            // The task may have been killed meanwhile (another fault): nothing to continue.
            let _ = node
                .docker(&["kill", "--signal", "CONT", &t.container])
                .await;
            Ok(format!("the reconciler leader on dnode{}", t.node))
        }
        Fault::Partition { pick, hold } => {
            let i = choose(&spare_nodes(d, 2), *pick, "node to cut off")?;
            cut(d, i, true).await?;
            tokio::time::sleep(*hold).await;
            cut(d, i, false).await?;
            Ok(format!("dnode{i}"))
        }
        Fault::RestartDockerd { pick } => {
            let i = choose(&spare_nodes(d, 2), *pick, "node to restart dockerd on")?;
            restart_dockerd(d, i).await?;
            Ok(format!("dnode{i}"))
        }
        Fault::KillNode { pick, down } => {
            let workers = spare_nodes(d, d.swarm.managers() + 1);
            let i = choose(&workers, *pick, "worker node (--nodes 4 or more)")?;
            d.swarm.kill_node(i).await;
            tokio::time::sleep(*down).await;
            renew_lost_nodes(d).await;
            Ok(format!("dnode{i}"))
        }
        Fault::RollingUpdate => rolling_update(d).await,
        Fault::ScaleUpDown => scale_up_down(d).await,
    }
}

/// How many times a rolling update paused by swarm is resumed before the fault gives up.
const RESUMES: usize = 3;

/// How long an old task may run on while swarm reports no update in progress before the update
/// is resumed. Seen in a CI run of seed 4: after a paused update was resumed, swarm reported no
/// update state at all while a task of the old spec ran on, and the fault gave up after
/// [`SERVICE_STEP`]; why swarm left it is not established.
const STALLED: Duration = Duration::from_secs(20);

/// `docker service update --force` of the mongo service, until every task is replaced and
/// the set equals the tasks. A task that fails while the update watches it (another fault
/// killed it) makes swarm pause the update (the stack's `failure_action: pause`); it is then
/// resumed as docs/operations.md tells operators to, with `docker service update`, and so is
/// an update swarm reports done (or no update at all) while an old task still runs.
async fn rolling_update(d: &Deployment) -> Injected {
    let n = replicas(d).await?;
    let before = d.mongo_task_ids().await?;
    d.update_mongo(&["--force"]).await;
    let deadline = Instant::now() + SERVICE_STEP;
    let mut resumed = 0;
    let mut last = String::new();
    let mut stalled_since: Option<Instant> = None;
    while Instant::now() < deadline {
        let (state, message) = d.update_status().await?;
        let stalled = stalled_since.is_some_and(|t| t.elapsed() >= STALLED);
        if state.contains("paused") || (stalled && resumed < RESUMES) {
            if resumed == RESUMES {
                return Err(format!(
                    "the update resumed {RESUMES} times and still not done: {state:?} {message}"
                ));
            }
            d.manager()
                .docker(&["service", "update", "-d", MONGO])
                .await?;
            resumed += 1;
            stalled_since = None;
            eprintln!("[chaos] rolling update {state:?} ({message}), an old task left: resumed");
        } else {
            let tasks = d.tasks(MONGO).await?;
            match tasks.iter().find(|t| before.contains(&t.id)) {
                Some(old) => {
                    // Swarm has given up on the update (no state, or "completed") while an
                    // old task still runs: resumed as a paused one is.
                    if state.is_empty() || state == "completed" {
                        stalled_since.get_or_insert_with(Instant::now);
                    } else {
                        stalled_since = None;
                    }
                    // Swarm's own account with it: a stalled update says why in its state.
                    last = format!(
                        "slot {} still runs task {} on dnode{} (update state {state:?}: {message:?})",
                        old.slot, old.id, old.node
                    )
                }
                None => match d.check_converged(n).await {
                    Ok(_) => {
                        return Ok(format!(
                            "{n} tasks replaced (the update resumed {resumed} times)"
                        ))
                    }
                    Err(e) => last = e,
                },
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Err(format!(
        "the update was not done within {}s: {last}",
        SERVICE_STEP.as_secs()
    ))
}

/// `replset-reconciler scale` to one member more and back. With members pinned to labelled
/// nodes, a node is labelled first, as an operator does before scaling up, and afterwards
/// the label is taken from the labelled node left without a member.
async fn scale_up_down(d: &Deployment) -> Injected {
    let n = replicas(d).await?;
    let pinned = !d.mongo_labelled().is_empty();
    let mut added = None;
    if pinned {
        let labelled = d.mongo_labelled();
        let lost = d.swarm.lost();
        let free = (1..=d.swarm.len())
            .find(|i| !labelled.contains(i) && !lost.contains(i))
            .ok_or("no node to label for one more member")?;
        d.set_mongo_label(free, true).await?;
        added = Some(free);
    }
    // Back to n whatever became of the scale up (refused under another fault, or cut short):
    // a service left one member up, or a label left on, would change the rest of the run.
    let up = d.try_scale(n + 1).await;
    let down = d.try_scale(n).await;
    let mut note = String::new();
    if let Some(free) = added {
        // Only a labelled node that no task of the service is assigned to, in any state
        // (running, starting, restarting): a label taken from a node with a member makes
        // swarm stop that member and start it elsewhere, away from its data.
        match task_hosts(d).await? {
            None => {
                note = format!(" (labelled dnode{free}; a task is not placed yet, labels kept)")
            }
            Some(hosts) => {
                let labelled: Vec<(usize, String)> = std::iter::once(free)
                    .chain(d.mongo_labelled())
                    .map(|i| (i, d.swarm.node(i).hostname()))
                    .collect();
                match label_to_take(&labelled, &hosts) {
                    Some(empty) => {
                        d.set_mongo_label(empty, false).await?;
                        note = format!(" (labelled dnode{free}, then unlabelled dnode{empty})");
                    }
                    None => {
                        note = format!(" (labelled dnode{free}; every labelled node has a task)")
                    }
                }
            }
        }
    }
    match (up, down) {
        (Ok(_), Ok(_)) => Ok(format!("{n} -> {} -> {n}{note}", n + 1)),
        (Err(e), Ok(_)) => Err(format!("the scale up failed, back to {n}{note}: {e}")),
        (_, Err(e)) => Err(format!("the scale back to {n} failed{note}: {e}")),
    }
}

/// The nodes (hostnames) of every task of the mongo service that swarm wants running, in
/// whatever state; `None` while one is not placed on a node yet.
async fn task_hosts(d: &Deployment) -> Result<Option<BTreeSet<String>>, String> {
    let out = d
        .manager()
        .docker(&[
            "service",
            "ps",
            MONGO,
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Node}}",
        ])
        .await?;
    let hosts: Vec<&str> = out.lines().map(str::trim).collect();
    if hosts.iter().any(|h| h.is_empty()) {
        return Ok(None);
    }
    Ok(Some(hosts.into_iter().map(str::to_string).collect()))
}

/// Which labelled node (index, hostname; in the order given) to take the member label from
/// after a scale down: the first that no task of the service is assigned to (`hosts`, in any
/// state). `None` when each has one.
fn label_to_take(labelled: &[(usize, String)], hosts: &BTreeSet<String>) -> Option<usize> {
    labelled
        .iter()
        .find(|(_, hostname)| !hosts.contains(hostname))
        .map(|(i, _)| *i)
}

/// The mongo service's replicas as its spec says (not its running tasks: some may be down
/// under another fault).
pub async fn replicas(d: &Deployment) -> Result<usize, String> {
    let out = d
        .manager()
        .docker(&[
            "service",
            "inspect",
            "-f",
            "{{.Spec.Mode.Replicated.Replicas}}",
            MONGO,
        ])
        .await?;
    out.trim()
        .parse()
        .map_err(|e| format!("the replicas of {MONGO} ({out:?}): {e}"))
}

/// The running tasks of `service` on nodes that are not lost.
async fn live_tasks(
    d: &Deployment,
    service: &str,
) -> Result<Vec<test_support::stack::Task>, String> {
    tasks_on_live_nodes(d, service, &["running"]).await
}

/// [`live_tasks`], and those started but not healthy yet.
async fn started_tasks(
    d: &Deployment,
    service: &str,
) -> Result<Vec<test_support::stack::Task>, String> {
    tasks_on_live_nodes(d, service, &["running", "starting"]).await
}

async fn tasks_on_live_nodes(
    d: &Deployment,
    service: &str,
    states: &[&str],
) -> Result<Vec<test_support::stack::Task>, String> {
    let lost = d.swarm.lost();
    let mut tasks: Vec<_> = d
        .tasks_in(service, states)
        .await?
        .into_iter()
        .filter(|t| !t.container.is_empty() && !lost.contains(&t.node))
        .collect();
    tasks.sort_by_key(|t| (t.slot, t.node));
    Ok(tasks)
}

fn choose<T: Clone>(among: &[T], pick: usize, what: &str) -> Result<T, String> {
    if among.is_empty() {
        return Err(format!("no {what} to choose"));
    }
    Ok(among[pick % among.len()].clone())
}

/// The nodes from `first` on that are not lost (node 1 holds the clients).
fn spare_nodes(d: &Deployment, first: usize) -> Vec<usize> {
    let lost = d.swarm.lost();
    (first..=d.swarm.len())
        .filter(|i| !lost.contains(i))
        .collect()
}

/// Cuts node `i` off from the others (`on`), or lets it through again: every packet on its
/// interface of the nodes' network (eth0) dropped, in and out. Disconnecting the container
/// from the network instead would give it another address when it is connected again, which a
/// swarm manager cannot take. The host drives the node's dockerd through a socket, not eth0.
async fn cut(d: &Deployment, i: usize, on: bool) -> Result<(), String> {
    let container = d.swarm.node(i).container().to_string();
    let op = if on { "-I" } else { "-D" };
    for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
        let r = host_docker(&[
            "exec", &container, "iptables", op, chain, dir, "eth0", "-j", "DROP",
        ])
        .await;
        if on {
            r.map_err(|e| format!("cutting dnode{i} off ({chain}): {e}"))?;
        }
    }
    Ok(())
}

/// Stops node `i`'s dockerd (SIGTERM: its containers stop with it) and waits until the node
/// has started it again and it answers.
async fn restart_dockerd(d: &Deployment, i: usize) -> Result<(), String> {
    let node = d.swarm.node(i);
    host_docker(&["exec", node.container(), "pkill", "-TERM", "-x", "dockerd"]).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    // Stopping takes a moment: wait for it to be gone first, then back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    loop {
        if node
            .docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])
            .await
            .is_ok_and(|s| s.trim() == "active")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("dnode{i}'s dockerd did not answer within 120 s"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Makes lost nodes anew, loads the images into them and reads the swarm's node ids again.
async fn renew_lost_nodes(d: &Deployment) {
    if d.swarm.lost().is_empty() {
        return;
    }
    d.swarm.repair().await;
    d.swarm.load_images(&d.store.images()).await;
    let _ = d.read_nodes().await;
    // A node made anew has no labels: the store's and the members' placement again.
    d.label_store_nodes().await;
    d.label_mongo_nodes().await;
}

/// Heals whatever is left at the end of a run: every cut let through, every reconciler
/// continued, lost nodes made anew, a paused update of the mongo service resumed. Returns
/// what it had to do.
pub async fn heal_everything(d: &Deployment) -> Vec<String> {
    let mut done = Vec::new();
    for i in 1..=d.swarm.len() {
        if d.swarm.lost().contains(&i) {
            continue;
        }
        let _ = cut(d, i, false).await;
    }
    if let Ok(tasks) = d.tasks_in(RECONCILER, &["running", "starting"]).await {
        for t in tasks.iter().filter(|t| !t.container.is_empty()) {
            let _ = d
                .swarm
                .node(t.node)
                .docker(&["kill", "--signal", "CONT", &t.container])
                .await;
        }
    }
    let lost: BTreeSet<usize> = d.swarm.lost();
    if !lost.is_empty() {
        renew_lost_nodes(d).await;
        done.push(format!("made lost nodes {lost:?} anew"));
    }
    if let Ok((state, message)) = d.update_status().await {
        if state.contains("paused") {
            let _ = d
                .manager()
                .docker(&["service", "update", "-d", MONGO])
                .await;
            done.push(format!("resumed the paused update ({message})"));
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(usize, &str)]) -> Vec<(usize, String)> {
        list.iter().map(|(i, h)| (*i, h.to_string())).collect()
    }

    fn hosts(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|h| h.to_string()).collect()
    }

    /// Seed 11's finding: after a scale down, the member of dnode4 was restarting (assigned,
    /// not running) and its label was taken, so swarm moved it away from its data. A node with
    /// a task in any state keeps its label.
    #[test]
    fn the_label_is_taken_only_from_a_node_without_a_task() {
        let labelled = nodes(&[(1, "dnode1"), (2, "dnode2"), (3, "dnode3"), (4, "dnode4")]);
        // dnode1 (labelled for the extra member) still has it; dnode4's member is restarting.
        let assigned = hosts(&["dnode1", "dnode2", "dnode3", "dnode4"]);
        assert_eq!(label_to_take(&labelled, &assigned), None);
        // The extra member went away from dnode1.
        assert_eq!(
            label_to_take(&labelled, &hosts(&["dnode2", "dnode3", "dnode4"])),
            Some(1)
        );
        // Swarm placed the extra member on dnode1 and removed dnode3's task instead.
        assert_eq!(
            label_to_take(&labelled, &hosts(&["dnode1", "dnode2", "dnode4"])),
            Some(3)
        );
    }
}
