//! One simulated mongod: its state, its TCP server, and the helpers that change its
//! replication state. Commands are in `commands.rs`; heartbeats, elections and oplog
//! fetching in `repl.rs`.

use bson::{oid::ObjectId, DateTime, Document};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Defaults, ReplSetConfig};
use crate::disk::DataDir;
use crate::history::{ConfigSource, Event, History};
use crate::oplog::{next_timestamp, OpTime, OplogEntry, Store};
use crate::peer::{Network, PeerClient};
use crate::wire::{self, Request, WireError};

mod serve;
mod transitions;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Security(String),
}

/// How to run one member.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--replSet`; without it the node is a standalone that refuses replication commands.
    pub set_name: Option<String>,
    pub bind_ip: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// The `host:port` this member calls itself (`me`); defaults to `bind_ip:port`.
    pub advertised_host: Option<String>,
    /// Other names that mean this member (besides `advertised_host`, `localhost` and the
    /// bind address, all with this port).
    pub host_aliases: Vec<String>,
    /// Filled into a new config's `settings.heartbeatIntervalMillis`.
    pub heartbeat_interval: Duration,
    /// Filled into a new config's `settings.electionTimeoutMillis`.
    pub election_timeout: Duration,
    /// `--auth` and `--keyFile`.
    pub security: crate::auth::Security,
    /// `--tlsMode` and its files, loaded (`None`: `--tlsMode disabled`).
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// How long an initial sync takes (not a mongod setting): see [`InitialSyncPace`].
    pub initial_sync: InitialSyncPace,
}

/// The time a new or emptied member spends copying its data in STARTUP2 before it becomes
/// SECONDARY: `floor`, or `per_mb` for each MB of the oplog it copied when that is longer.
/// A real initial sync clones every collection and then applies the oplog written meanwhile
/// (the manual's "Initial Sync"); the simulator copies the oplog at once, and this pace lets a
/// test see the member in STARTUP2 as long as a member with data would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialSyncPace {
    pub floor: Duration,
    pub per_mb: Duration,
}

impl InitialSyncPace {
    /// The time an initial sync of `bytes` of data takes.
    pub fn duration(self, bytes: usize) -> Duration {
        let copy = self.per_mb.mul_f64(bytes as f64 / (1024.0 * 1024.0));
        copy.max(self.floor)
    }
}

impl Default for InitialSyncPace {
    fn default() -> Self {
        InitialSyncPace {
            floor: Duration::from_millis(100),
            per_mb: Duration::from_millis(50),
        }
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            set_name: Some("rs0".to_string()),
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            advertised_host: None,
            host_aliases: Vec::new(),
            heartbeat_interval: Duration::from_millis(500),
            election_timeout: Duration::from_millis(2000),
            security: crate::auth::Security::default(),
            tls: None,
            initial_sync: InitialSyncPace::default(),
        }
    }
}

/// What survives a restart that keeps the data: the oplog and collections, the config, the
/// term and the last vote (all of which MongoDB keeps on disk).
#[derive(Debug, Clone, Default)]
pub struct DurableState {
    pub store: Store,
    pub config: Option<ReplSetConfig>,
    pub term: i64,
    /// `(term, candidate member _id)`.
    pub last_vote: Option<(i64, i64)>,
}

/// `MemberState`, with the server's numbers and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Startup,
    Primary,
    Secondary,
    Recovering,
    Startup2,
    Unknown,
    Arbiter,
    Down,
    Rollback,
    Removed,
}

impl MemberState {
    pub fn code(self) -> i32 {
        match self {
            MemberState::Startup => 0,
            MemberState::Primary => 1,
            MemberState::Secondary => 2,
            MemberState::Recovering => 3,
            MemberState::Startup2 => 5,
            MemberState::Unknown => 6,
            MemberState::Arbiter => 7,
            MemberState::Down => 8,
            MemberState::Rollback => 9,
            MemberState::Removed => 10,
        }
    }

    pub fn from_code(c: i64) -> MemberState {
        match c {
            0 => MemberState::Startup,
            1 => MemberState::Primary,
            2 => MemberState::Secondary,
            3 => MemberState::Recovering,
            5 => MemberState::Startup2,
            7 => MemberState::Arbiter,
            8 => MemberState::Down,
            9 => MemberState::Rollback,
            10 => MemberState::Removed,
            _ => MemberState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            MemberState::Startup => "STARTUP",
            MemberState::Primary => "PRIMARY",
            MemberState::Secondary => "SECONDARY",
            MemberState::Recovering => "RECOVERING",
            MemberState::Startup2 => "STARTUP2",
            MemberState::Unknown => "UNKNOWN",
            MemberState::Arbiter => "ARBITER",
            MemberState::Down => "DOWN",
            MemberState::Rollback => "ROLLBACK",
            MemberState::Removed => "REMOVED",
        }
    }
}

/// What this member knows of another, from heartbeats and position updates.
#[derive(Debug, Clone)]
pub(crate) struct PeerView {
    pub healthy: bool,
    pub state: MemberState,
    pub term: i64,
    pub config_version: i64,
    pub config_term: i64,
    pub applied: OpTime,
    pub last_ok: Option<Instant>,
    pub last_heartbeat: Option<DateTime>,
    pub message: String,
    pub ping_ms: i64,
    pub sync_source: String,
    pub election_date: Option<DateTime>,
    /// `electionTime` of a primary, from its heartbeat responses.
    pub election_time: Option<bson::Timestamp>,
    /// Since when heartbeats to this member have succeeded without a failure (`upSince`,
    /// its `uptime` in replSetGetStatus).
    pub up_since: Option<Instant>,
    /// When this member last sent us a heartbeat (`lastHeartbeatRecv`).
    pub last_heartbeat_recv: Option<DateTime>,
}

impl Default for PeerView {
    fn default() -> Self {
        PeerView {
            healthy: false,
            state: MemberState::Unknown,
            term: -1,
            config_version: -2,
            config_term: -1,
            applied: OpTime::NULL,
            last_ok: None,
            last_heartbeat: None,
            message: String::new(),
            ping_ms: 0,
            sync_source: String::new(),
            election_date: None,
            election_time: None,
            up_since: None,
            last_heartbeat_recv: None,
        }
    }
}

pub(crate) struct NodeState {
    pub durable: DurableState,
    pub state: MemberState,
    pub peers: HashMap<String, PeerView>,
    pub commit_point: OpTime,
    pub primary_host: Option<String>,
    pub last_primary_contact: Instant,
    pub election_offset: Duration,
    pub election_id: Option<ObjectId>,
    pub election_date: Option<DateTime>,
    /// The timestamp of this primary's first entry of its term (`electionTime`).
    pub election_time: Option<bson::Timestamp>,
    pub step_down_until: Option<Instant>,
    /// replSetMaintenance: how many `true` calls are not yet undone; RECOVERING while > 0.
    pub maintenance_calls: u32,
    /// While an initial sync is copying: when it is done (the member stays in STARTUP2).
    pub initial_sync_until: Option<Instant>,
    /// The current config is committed once the commit point reaches this optime (all that
    /// was written under the previous config is committed under this one).
    pub config_barrier: OpTime,
    pub topology_counter: i64,
    pub sync_source: Option<String>,
    pub started: Instant,
    /// Since when this member has qualified for a priority takeover.
    pub takeover_since: Option<Instant>,
}

impl NodeState {
    pub fn config(&self) -> Option<&ReplSetConfig> {
        self.durable.config.as_ref()
    }
    pub fn last_applied(&self) -> OpTime {
        self.durable.store.last_optime()
    }
    pub fn term(&self) -> i64 {
        self.durable.term
    }
}

pub(crate) struct NodeInner {
    pub opts: NodeOptions,
    /// The `host:port` of this member: first its own guess, then the config's name for it
    /// once it has found itself in a config (as mongod's isSelf does).
    pub me: std::sync::RwLock<String>,
    pub port: u16,
    pub instance_id: ObjectId,
    pub state: Mutex<NodeState>,
    pub changed: tokio::sync::watch::Sender<()>,
    pub heartbeat_now: tokio::sync::Notify,
    pub peers: PeerClient,
    pub history: History,
    pub cancel: CancellationToken,
    pub connections: AtomicI64,
    /// Connections open now (serverStatus `connections.current`).
    pub open_connections: Arc<AtomicI64>,
    /// Open cursors of find and aggregate.
    pub(crate) cursors: crate::commands::Cursors,
    /// The `__system` credentials made from the key file (internal authentication).
    pub system_credentials: Option<crate::auth::SystemCredentials>,
    /// Test control, like MongoDB's `stopReplProducer` fail point: stop fetching the oplog.
    pub replication_stopped: std::sync::atomic::AtomicBool,
    /// Test control, like MongoDB's `omitConfigQuorumCheck` fail point.
    pub omit_config_quorum_check: std::sync::atomic::AtomicBool,
    /// `--dbpath`: the journal the durable state is synced to (`None`: in memory only).
    pub disk: Option<Mutex<DataDir>>,
}

/// A running member. Cloning shares it.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("me", &self.me()).finish()
    }
}

impl Node {
    /// Binds the port and starts serving. `durable` is what a restart kept (default: a
    /// fresh data directory).
    pub async fn start(
        opts: NodeOptions,
        durable: DurableState,
        net: Network,
        history: History,
    ) -> Result<Node, NodeError> {
        Node::start_inner(opts, durable, None, net, history).await
    }

    /// Starts a member on an opened data directory (`--dbpath`) with the state read from it;
    /// from then on everything durable is written there before the member lets anyone see it
    /// (see `disk.rs`).
    pub async fn start_on_disk(
        opts: NodeOptions,
        dir: DataDir,
        durable: DurableState,
        net: Network,
        history: History,
    ) -> Result<Node, NodeError> {
        Node::start_inner(opts, durable, Some(dir), net, history).await
    }

    async fn start_inner(
        opts: NodeOptions,
        durable: DurableState,
        disk: Option<DataDir>,
        net: Network,
        history: History,
    ) -> Result<Node, NodeError> {
        let system_credentials =
            crate::auth::check_startup(&opts.security, opts.set_name.is_some())
                .map_err(NodeError::Security)?;
        let addr = SocketAddr::new(opts.bind_ip, opts.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NodeError::Bind { addr, source })?;
        let port = listener
            .local_addr()
            .map_err(|source| NodeError::Bind { addr, source })?
            .port();
        // Listening on every address: the hostname's addresses also mean this member (what
        // mongod's isSelf fast path gets from the interface list; in a container the
        // hostname resolves to the container's addresses).
        let mut opts = opts;
        if opts.bind_ip.is_unspecified() {
            if let Ok(addrs) = tokio::net::lookup_host((hostname(), port)).await {
                for a in addrs {
                    opts.host_aliases.push(format!("{}:{port}", a.ip()));
                }
            }
        }
        let me = match &opts.advertised_host {
            Some(h) => h.clone(),
            None if opts.bind_ip.is_unspecified() => format!("{}:{port}", hostname()),
            None => format!("{}:{port}", opts.bind_ip),
        };
        let mut state = MemberState::Startup;
        if let Some(cfg) = &durable.config {
            state = if cfg.member_by_host(&me).is_some() {
                MemberState::Secondary
            } else {
                MemberState::Removed
            };
        }
        let (changed, _) = tokio::sync::watch::channel(());
        let node = Node {
            inner: Arc::new(NodeInner {
                peers: PeerClient::new(me.clone(), net)
                    .with_key(opts.security.key_file.clone())
                    .with_tls(opts.tls.clone()),
                me: std::sync::RwLock::new(me.clone()),
                port,
                instance_id: ObjectId::new(),
                state: Mutex::new(NodeState {
                    durable,
                    state,
                    peers: HashMap::new(),
                    commit_point: OpTime::NULL,
                    primary_host: None,
                    last_primary_contact: Instant::now(),
                    election_offset: Duration::ZERO,
                    election_id: None,
                    election_date: None,
                    election_time: None,
                    step_down_until: None,
                    maintenance_calls: 0,
                    initial_sync_until: None,
                    config_barrier: OpTime::NULL,
                    topology_counter: 0,
                    sync_source: None,
                    started: Instant::now(),
                    takeover_since: None,
                }),
                changed,
                heartbeat_now: tokio::sync::Notify::new(),
                history,
                cancel: CancellationToken::new(),
                connections: AtomicI64::new(0),
                open_connections: Arc::new(AtomicI64::new(0)),
                cursors: Default::default(),
                system_credentials,
                replication_stopped: std::sync::atomic::AtomicBool::new(false),
                omit_config_quorum_check: std::sync::atomic::AtomicBool::new(false),
                disk: disk.map(Mutex::new),
                opts,
            }),
        };
        node.set_me_arbiter_state();
        tracing::info!(me = %node.me(), "member listening");
        let n = node.clone();
        tokio::spawn(async move { n.accept_loop(listener).await });
        node.spawn_replication();
        Ok(node)
    }

    /// `host:port` of this member, as it calls itself.
    pub fn host(&self) -> String {
        self.me()
    }

    pub(crate) fn me(&self) -> String {
        self.inner.me.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Runs `f` with a handle to this member as a task that ends when the member stops
    /// (killed or shut down), whatever `f` is doing then.
    pub(crate) fn spawn_task<F, Fut>(&self, f: F)
    where
        F: FnOnce(Node) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let n = self.clone();
        tokio::spawn(async move {
            let cancel = n.inner.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = f(n) => {}
            }
        });
    }

    /// Takes the config's name for this member as its own.
    pub(crate) fn set_me(&self, host: &str) {
        if let Ok(mut m) = self.inner.me.write() {
            if *m != host {
                tracing::info!(old = %m, new = host, "this member is known by a new name");
                *m = host.to_string();
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// A copy of what this member's data directory holds now, as a copy of its volume would:
    /// its config, oplog, data, term and vote.
    pub fn durable(&self) -> DurableState {
        self.lock().durable.clone()
    }

    /// Stops serving at once, like `kill -9`: the port closes, every connection drops, and
    /// the durable state is returned for a restart.
    pub fn kill(&self) -> DurableState {
        self.inner.cancel.cancel();
        self.lock().durable.clone()
    }

    /// Stops or resumes oplog fetching on this member (heartbeats go on), as MongoDB's
    /// `stopReplProducer` fail point does in the server's own tests.
    pub fn set_replication_stopped(&self, stopped: bool) {
        self.inner
            .replication_stopped
            .store(stopped, Ordering::SeqCst);
        self.notify();
    }

    /// Skips the quorum check of `replSetReconfig`, as MongoDB's `omitConfigQuorumCheck` fail
    /// point does in jstests/replsets/reconfig_waits_for_a_majority_to_replicate_config.js.
    pub fn set_omit_config_quorum_check(&self, omit: bool) {
        self.inner
            .omit_config_quorum_check
            .store(omit, Ordering::SeqCst);
    }

    pub fn is_running(&self) -> bool {
        !self.inner.cancel.is_cancelled()
    }

    pub fn state(&self) -> MemberState {
        self.lock().state
    }

    pub fn term(&self) -> i64 {
        self.lock().term()
    }

    pub fn config(&self) -> Option<ReplSetConfig> {
        self.lock().durable.config.clone()
    }

    /// The documents of `db.coll` on this member.
    pub fn documents(&self, ns: &str) -> Vec<Document> {
        self.lock()
            .durable
            .store
            .collections
            .get(ns)
            .cloned()
            .unwrap_or_default()
    }

    pub fn last_applied(&self) -> OpTime {
        self.lock().last_applied()
    }

    /// `commitmentStatus` as `replSetGetConfig` reports it on a primary.
    pub fn is_config_committed(&self) -> bool {
        let st = self.lock();
        self.config_committed(&st)
    }

    pub fn commit_point(&self) -> OpTime {
        self.lock().commit_point
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs to the data directory what changed in the durable state: called before every
    /// reply and every request to another member, so nothing leaves this member that its
    /// disk does not have. A failed write stops the member, as mongod stops (fassert) when it
    /// cannot write its journal.
    pub(crate) fn flush(&self) {
        let Some(disk) = &self.inner.disk else { return };
        let st = self.lock();
        let mut dir = disk.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = dir.persist(&st.durable) {
            tracing::error!(me = %self.me(), error = %e, "cannot write the data directory; this member stops");
            self.inner.cancel.cancel();
        }
    }

    pub(crate) fn notify(&self) {
        self.inner.changed.send_replace(());
    }

    pub(crate) fn defaults(&self) -> Defaults {
        Defaults {
            heartbeat_interval_millis: self.inner.opts.heartbeat_interval.as_millis() as i64,
            election_timeout_millis: self.inner.opts.election_timeout.as_millis() as i64,
        }
    }

    /// Waits until `f` returns `Some`, re-checking whenever the member's state changes.
    /// `None` when the deadline passes; once the member is killed it never returns (the task
    /// that awaits it is dropped by its own cancellation).
    pub(crate) async fn wait_until<T>(
        &self,
        deadline: Option<tokio::time::Instant>,
        mut f: impl FnMut(&NodeState) -> Option<T>,
    ) -> Option<T> {
        let mut rx = self.inner.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(v) = f(&self.lock()) {
                return Some(v);
            }
            let changed = async {
                tokio::select! {
                    r = rx.changed() => r.is_ok(),
                    _ = self.inner.cancel.cancelled() => false,
                }
            };
            let ok = match deadline {
                Some(d) => tokio::time::timeout_at(d, changed).await.unwrap_or(false),
                None => changed.await,
            };
            if !ok {
                if self.inner.cancel.is_cancelled() {
                    // A killed member answers nothing: wait here until the task that runs
                    // this future is dropped by its own cancellation.
                    std::future::pending::<()>().await;
                }
                return f(&self.lock());
            }
        }
    }

    /// Whether `host` names this member: the advertised name, an alias, or a loopback /
    /// bind address with this member's port (MongoDB's isSelf fast path).
    pub(crate) fn is_self_fast(&self, host: &str) -> bool {
        if host == self.me() || self.inner.opts.host_aliases.iter().any(|a| a == host) {
            return true;
        }
        let Some((h, p)) = host.rsplit_once(':') else {
            return false;
        };
        if p.parse::<u16>().ok() != Some(self.inner.port) {
            return false;
        }
        let bind = self.inner.opts.bind_ip.to_string();
        h == "localhost" || h == "127.0.0.1" || h == bind || h == hostname()
    }
}

/// `OID::fromTerm`: 0x7fffffff then the term, big-endian.
pub fn election_id(term: i64) -> ObjectId {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    b[4..].copy_from_slice(&term.to_be_bytes());
    ObjectId::from_bytes(b)
}

pub(crate) fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".to_string())
}
