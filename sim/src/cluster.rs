//! Test control of a whole simulated set: start members on free loopback ports, initiate,
//! kill and restart (keeping or losing data), cut members off and heal them, and read the
//! history back.

use bson::{doc, Bson, Document};
use std::time::Duration;
use tokio::time::Instant;

use crate::history::History;
use crate::node::{DurableState, MemberState, Node, NodeError, NodeOptions};
use crate::peer::Network;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("no member {0}")]
    NoSuchMember(usize),
    #[error("member {0} is not running")]
    NotRunning(usize),
    #[error("command failed: {0}")]
    Command(Document),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

#[derive(Debug)]
struct Slot {
    opts: NodeOptions,
    node: Option<Node>,
    host: String,
    saved: Option<DurableState>,
}

/// A simulated replica set. Members are numbered from 0 in the order they were started.
#[derive(Debug)]
pub struct Cluster {
    set_name: String,
    template: NodeOptions,
    net: Network,
    history: History,
    slots: Vec<Slot>,
}

impl Cluster {
    /// Starts `n` uninitialised members of set `rs0` on 127.0.0.1, free ports.
    pub async fn start(n: usize) -> Result<Cluster, ClusterError> {
        Self::start_with(n, NodeOptions::default()).await
    }

    /// Starts `n` members from `template` (its port is ignored: each gets a free one).
    pub async fn start_with(n: usize, template: NodeOptions) -> Result<Cluster, ClusterError> {
        let mut c = Cluster {
            set_name: template.set_name.clone().unwrap_or_else(|| "rs0".into()),
            template,
            net: Network::default(),
            history: History::default(),
            slots: Vec::new(),
        };
        for _ in 0..n {
            c.add_member().await?;
        }
        Ok(c)
    }

    /// Starts one more uninitialised member; returns its index.
    pub async fn add_member(&mut self) -> Result<usize, ClusterError> {
        let mut opts = self.template.clone();
        opts.port = 0;
        let node = Node::start(
            opts.clone(),
            DurableState::default(),
            self.net.clone(),
            self.history.clone(),
        )
        .await?;
        opts.port = node.port();
        opts.advertised_host = Some(node.host().to_string());
        self.slots.push(Slot {
            opts,
            host: node.host().to_string(),
            node: Some(node),
            saved: None,
        });
        Ok(self.slots.len() - 1)
    }

    pub fn set_name(&self) -> &str {
        &self.set_name
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn host(&self, i: usize) -> Result<&str, ClusterError> {
        self.slots
            .get(i)
            .map(|s| s.host.as_str())
            .ok_or(ClusterError::NoSuchMember(i))
    }

    pub fn hosts(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.host.clone()).collect()
    }

    /// `mongodb://h1,h2,.../?replicaSet=<set>`.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://{}/?replicaSet={}",
            self.hosts().join(","),
            self.set_name
        )
    }

    /// A direct-connection URI for member `i`.
    pub fn direct_uri(&self, i: usize) -> Result<String, ClusterError> {
        Ok(format!(
            "mongodb://{}/?directConnection=true",
            self.host(i)?
        ))
    }

    pub fn node(&self, i: usize) -> Result<&Node, ClusterError> {
        self.slots
            .get(i)
            .ok_or(ClusterError::NoSuchMember(i))?
            .node
            .as_ref()
            .ok_or(ClusterError::NotRunning(i))
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    /// Runs a command on member `i` in-process (as if over a connection) and returns the
    /// reply, `ok: 0` included.
    pub async fn command(&self, i: usize, cmd: Document) -> Result<Document, ClusterError> {
        let mut cmd = cmd;
        if !cmd.contains_key("$db") {
            cmd.insert("$db", "admin");
        }
        Ok(self.node(i)?.run_command(cmd, 0).await)
    }

    /// Like [`Cluster::command`], but an `ok: 0` reply is an error.
    pub async fn command_ok(&self, i: usize, cmd: Document) -> Result<Document, ClusterError> {
        let r = self.command(i, cmd).await?;
        if crate::config::float(r.get("ok").unwrap_or(&Bson::Null)) == Some(1.0) {
            Ok(r)
        } else {
            Err(ClusterError::Command(r))
        }
    }

    /// `replSetInitiate` on member 0 with every member as a voter, `_id` = index.
    pub async fn initiate(&self) -> Result<(), ClusterError> {
        let members: Vec<Bson> = self
            .hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| Bson::Document(doc! {"_id": i as i32, "host": h.clone()}))
            .collect();
        let cfg = doc! {"_id": self.set_name.clone(), "version": 1, "members": members};
        self.command_ok(0, doc! {"replSetInitiate": cfg}).await?;
        Ok(())
    }

    /// Polls (every 20 ms) until `f` holds or `timeout` passes.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Cluster) -> Option<T>,
    ) -> Result<T, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout(
                    timeout,
                    format!("{what}; history:\n{}", self.history.render()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The index of the running primary, if exactly one running member thinks it is.
    pub fn primary(&self) -> Option<usize> {
        let p: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.node(i)
                    .is_ok_and(|n| n.state() == MemberState::Primary)
            })
            .collect();
        (p.len() == 1).then(|| p[0])
    }

    /// Waits until there is a primary and every other running member in the config is
    /// SECONDARY.
    pub async fn wait_for_stable(&self, timeout: Duration) -> Result<usize, ClusterError> {
        self.wait_for("a primary and secondaries", timeout, |c| {
            let p = c.primary()?;
            let cfg = c.node(p).ok()?.config()?;
            let all = cfg.members.iter().all(|m| {
                c.slots.iter().any(|s| {
                    s.host == m.host
                        && s.node.as_ref().is_none_or(|n| {
                            matches!(
                                n.state(),
                                MemberState::Primary
                                    | MemberState::Secondary
                                    | MemberState::Arbiter
                            )
                        })
                })
            });
            all.then_some(p)
        })
        .await
    }

    pub async fn wait_for_primary(&self, timeout: Duration) -> Result<usize, ClusterError> {
        self.wait_for("a primary", timeout, |c| c.primary()).await
    }

    /// Waits until there is a primary whose current config is committed (a majority of
    /// voters have it and everything written before it is majority-committed).
    pub async fn wait_config_committed(&self, timeout: Duration) -> Result<usize, ClusterError> {
        self.wait_for("a committed config", timeout, |c| {
            let p = c.primary()?;
            c.node(p).ok()?.is_config_committed().then_some(p)
        })
        .await
    }

    /// Kills member `i` (like `kill -9`); its data is kept for [`Cluster::restart`].
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        let slot = self.slots.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        if let Some(n) = slot.node.take() {
            slot.saved = Some(n.kill());
        }
        Ok(())
    }

    /// Kills member `i` and returns the data it restarts with: what it saved, or nothing.
    fn stop_for_restart(
        &mut self,
        i: usize,
        keep_data: bool,
    ) -> Result<(&mut Slot, DurableState), ClusterError> {
        self.kill(i)?;
        let slot = self.slots.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        let durable = if keep_data {
            slot.saved.take().unwrap_or_default()
        } else {
            slot.saved = None;
            DurableState::default()
        };
        Ok((slot, durable))
    }

    /// Restarts member `i` on its old port, with its data or with an empty data directory.
    pub async fn restart(&mut self, i: usize, keep_data: bool) -> Result<(), ClusterError> {
        let (net, history) = (self.net.clone(), self.history.clone());
        let (slot, durable) = self.stop_for_restart(i, keep_data)?;
        // The old listener closes asynchronously; retry the bind for a while.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Node::start(
                slot.opts.clone(),
                durable.clone(),
                net.clone(),
                history.clone(),
            )
            .await
            {
                Ok(n) => {
                    slot.node = Some(n);
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Restarts member `i` on a new free port, with its data or with an empty data directory:
    /// a task that swarm replaced (a new address), with its volume or without it.
    pub async fn restart_elsewhere(
        &mut self,
        i: usize,
        keep_data: bool,
    ) -> Result<(), ClusterError> {
        let (_, durable) = self.stop_for_restart(i, keep_data)?;
        self.start_elsewhere(i, durable).await
    }

    /// Kills member `i` and starts it on a new free port with `data`: a task that swarm placed
    /// on another node, whose volume holds what an earlier task left there (a copy taken with
    /// [`Node::durable`]).
    pub async fn restart_elsewhere_with(
        &mut self,
        i: usize,
        data: DurableState,
    ) -> Result<(), ClusterError> {
        self.stop_for_restart(i, false)?;
        self.start_elsewhere(i, data).await
    }

    async fn start_elsewhere(
        &mut self,
        i: usize,
        durable: DurableState,
    ) -> Result<(), ClusterError> {
        let (net, history) = (self.net.clone(), self.history.clone());
        let slot = self.slots.get_mut(i).ok_or(ClusterError::NoSuchMember(i))?;
        let mut opts = slot.opts.clone();
        opts.port = 0;
        opts.advertised_host = None;
        let node = Node::start(opts.clone(), durable, net, history).await?;
        opts.port = node.port();
        opts.advertised_host = Some(node.host().to_string());
        slot.opts = opts;
        slot.host = node.host().to_string();
        slot.node = Some(node);
        Ok(())
    }

    /// Cuts member `i` off from every other member (clients can still reach it).
    pub fn isolate(&self, i: usize) -> Result<(), ClusterError> {
        let me = self.host(i)?.to_string();
        for h in self.hosts() {
            if h != me {
                self.net.cut(&me, &h);
            }
        }
        Ok(())
    }

    /// Cuts the link between two members.
    pub fn partition(&self, a: usize, b: usize) -> Result<(), ClusterError> {
        self.net.cut(self.host(a)?, self.host(b)?);
        Ok(())
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.net.heal_all();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for s in &mut self.slots {
            if let Some(n) = s.node.take() {
                n.kill();
            }
        }
    }
}
