//! The one procedure every part of the bench follows: observe the store, spawn the subject (a
//! bridge or the floor agent), wait until it is ready, drive the engine, pair each container's
//! `start` with its record, collect, clean up.
//!
//! A bridge is ready once its `/metrics` shows a completed sync
//! (`swarm_registrator_syncs_total` of 1 or more; every bridge the bench starts serves
//! `--metrics-addr` on a free loopback port); the floor agent once it prints `"ready"`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backend_core::KeyLayout;
use backend_etcd::EtcdStore;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::floor::FloorTiming;
use crate::lab::Lab;
use crate::observe::{follow_starts, watch_store, RecordSeen, Tracker, Via};
use crate::report::Sample;
use crate::{consul, log, now_ns};

/// What turns engine events into records in a part.
#[derive(Debug, Clone)]
pub enum Subject {
    /// The bridge binary with this backend URI and these flags. `graceful`: stop it with
    /// SIGTERM (a `--cleanup` bridge then removes what it published) instead of SIGKILL.
    Bridge {
        uri: String,
        args: Vec<String>,
        graceful: bool,
    },
    /// The bench's own floor agent (see [`crate::floor`]).
    Floor { etcd: String, early: bool },
}

/// Where the bench sees records arrive.
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    /// An etcd watch of `<prefix>/services/`.
    Etcd,
    /// Consul blocking queries: of KV under `<prefix>/services/`, of the catalog `service`.
    Consul {
        kv: bool,
        catalog: bool,
        service: &'a str,
    },
}

impl Seen<'_> {
    /// The observers, in the order their samples are returned.
    pub fn vias(&self) -> Vec<Via> {
        match *self {
            Seen::Etcd => vec![Via::Etcd],
            Seen::Consul { kv, catalog, .. } => {
                let mut vias = Vec::new();
                if kv {
                    vias.push(Via::Kv);
                }
                if catalog {
                    vias.push(Via::Catalog);
                }
                vias
            }
        }
    }
}

/// The observers of one part, all sending to one channel; stopped when dropped.
#[derive(Debug)]
pub struct Observers {
    pub rx: mpsc::UnboundedReceiver<RecordSeen>,
    pub tasks: Tasks,
}

/// Background tasks, aborted when dropped.
#[derive(Debug)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// How one latency part starts its next container.
#[derive(Debug, Clone, Copy)]
pub enum Starter<'a> {
    /// A plain container `--expose 8080`, labelled `SERVICE_NAME=<service>` when given.
    Plain { service: Option<&'a str> },
    /// One more task of this swarm service.
    Task { service: &'a str },
}

/// What a latency part measured.
#[derive(Debug)]
pub struct Latency {
    /// One list of samples per observer, in the order of [`Seen::vias`].
    pub samples: Vec<Vec<Sample>>,
    pub rss_kib: Option<(u64, u64)>,
}

/// What one initial sync measured.
#[derive(Debug)]
pub struct Sync {
    /// Per observer: from the spawn to the arrival of the last of the containers' records.
    pub elapsed_ns: Vec<i64>,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The settings every part shares.
#[derive(Debug)]
pub struct Harness<'a> {
    pub lab: &'a Lab,
    pub bridge: &'a Path,
    pub log_dir: &'a Path,
    /// How long to wait for any one thing.
    pub timeout: Duration,
    /// Unmeasured starts before each latency part.
    pub warmup: usize,
}

impl Harness<'_> {
    /// Starts the observers of `prefix` and returns once each follows the store.
    pub async fn observe(&self, prefix: &str, seen: Seen<'_>) -> Result<Observers> {
        let services = format!("{prefix}/services/");
        match seen {
            Seen::Etcd => {
                let (tx, rx) = mpsc::unbounded_channel();
                let layout = KeyLayout::new(prefix);
                let endpoints = [self.lab.etcd_endpoint.clone()];
                let store = EtcdStore::connect(&endpoints, layout)
                    .await
                    .context("cannot connect backend-etcd")?;
                let task = watch_store(&store, &services, Via::Etcd, tx).await?;
                Ok(Observers {
                    rx,
                    tasks: Tasks(vec![task]),
                })
            }
            Seen::Consul {
                kv,
                catalog,
                service,
            } => {
                let c = self.lab.consul()?;
                let (tx, rx) = mpsc::unbounded_channel();
                let mut tasks = Vec::new();
                if kv {
                    tasks.push(consul::watch_kv(c, &services, tx.clone()).await?);
                }
                if catalog {
                    tasks.push(consul::watch_catalog(c, service, tx).await?);
                }
                Ok(Observers {
                    rx,
                    tasks: Tasks(tasks),
                })
            }
        }
    }

    /// Spawns the subject, publishing under `prefix`; its log goes to `<log dir>/<prefix>.log`.
    pub fn spawn(&self, subject: &Subject, prefix: &str) -> Result<Proc> {
        let log_file = self
            .log_dir
            .join(format!("{}.log", prefix.replace('/', "_")));
        let file = std::fs::File::create(&log_file)
            .with_context(|| format!("cannot create {}", log_file.display()))?;
        let (mut cmd, metrics_addr, graceful) = match subject {
            Subject::Bridge {
                uri,
                args,
                graceful,
            } => {
                let addr = format!("127.0.0.1:{}", free_port()?);
                let mut cmd = Command::new(self.bridge);
                cmd.arg(uri).args(args).args(["--metrics-addr", &addr]);
                (cmd, Some(addr), *graceful)
            }
            Subject::Floor { etcd, early } => {
                let exe = std::env::current_exe().context("cannot find the bench's own binary")?;
                let mut cmd = Command::new(exe);
                cmd.args(["floor", "--etcd", etcd, "--prefix", prefix]);
                if *early {
                    cmd.arg("--early");
                }
                (cmd, None, false)
            }
        };
        let floor = metrics_addr.is_none();
        cmd.stdin(Stdio::null())
            .stderr(file)
            .stdout(if floor { Stdio::piped() } else { Stdio::null() })
            .kill_on_drop(true);
        log(&format!("  {prefix}: log in {}", log_file.display()));
        let spawned_ns = now_ns();
        let mut child = cmd.spawn().context("cannot spawn the subject")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("{prefix} exited at once"))?;
        let (ready, timings) = match child.stdout.take() {
            Some(out) => {
                let (ready, timings) = read_floor_lines(out);
                (Some(ready), Some(timings))
            }
            None => (None, None),
        };
        Ok(Proc {
            child,
            pid,
            log: log_file,
            spawned_ns,
            metrics_addr,
            graceful,
            ready,
            timings,
        })
    }

    /// [`Harness::spawn`], then waits until the subject is ready.
    pub async fn launch(&self, subject: &Subject, prefix: &str) -> Result<Proc> {
        let mut proc = self.spawn(subject, prefix)?;
        proc.wait_ready(self.timeout).await?;
        Ok(proc)
    }

    /// A latency part: `warmup + count` containers started one at a time by `starter`, each
    /// timed from its `start` event to its record on every observer of `seen`.
    pub async fn latency(
        &self,
        subject: &Subject,
        prefix: &str,
        seen: Seen<'_>,
        starter: Starter<'_>,
        count: usize,
    ) -> Result<Latency> {
        let Observers { rx, tasks: _tasks } = self.observe(prefix, seen).await?;
        let (starts_rx, events) = follow_starts(self.lab);
        let _events = Tasks(vec![events]);
        let mut tracker = Tracker::new(starts_rx, rx);
        let mut proc = self.launch(subject, prefix).await?;
        let vias = seen.vias();
        let mut samples: Vec<Vec<Sample>> = vec![Vec::with_capacity(count); vias.len()];
        let outcome: Result<()> = async {
            for i in 0..self.warmup + count {
                let start = match starter {
                    Starter::Plain { service } => {
                        let name = format!("{prefix}-{i}").replace('/', "-");
                        let id = self.lab.create_plain(&name, service).await?;
                        self.lab.start(&id).await?;
                        tracker.start_of(&id, self.timeout).await?
                    }
                    Starter::Task { service } => {
                        self.lab.scale_service(service, (i + 1) as i64).await?;
                        // A task is scheduled, attached and created before it starts.
                        tracker.next_start(self.timeout * 4).await?
                    }
                };
                for (via, samples) in vias.iter().zip(samples.iter_mut()) {
                    let record = match tracker
                        .record_of(&start.container_id, *via, self.timeout)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            proc.check_alive()?;
                            return Err(e);
                        }
                    };
                    if i >= self.warmup {
                        samples.push(Sample {
                            container_id: start.container_id.clone(),
                            time_nano: start.time_nano,
                            recv_ns: start.recv_ns,
                            arrival_ns: record.arrival_ns,
                            floor: None,
                        });
                    }
                }
                if (i + 1) % 50 == 0 {
                    log(&format!("  {prefix}: {} starts", i + 1));
                }
            }
            Ok(())
        }
        .await;
        let rss_kib = proc.rss_kib().ok();
        let timings = proc.stop().await;
        outcome?;
        for t in timings {
            for s in samples.iter_mut().flatten() {
                if s.container_id == t.container_id {
                    s.floor = Some(t.clone());
                }
            }
        }
        Ok(Latency { samples, rss_kib })
    }

    /// The RSS (VmRSS, VmHWM) of a ready subject after 2 s.
    pub async fn idle_rss(&self, subject: &Subject, prefix: &str) -> Result<(u64, u64)> {
        let proc = self.launch(subject, prefix).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = proc.rss_kib();
        proc.stop().await;
        rss
    }

    /// One initial sync: spawns the subject on an engine that runs `ours` and times until
    /// every observer has seen a record of each of them. The subject is stopped afterwards;
    /// `count` reads the records in the store before that.
    pub async fn initial_sync<F, Fut>(
        &self,
        subject: &Subject,
        prefix: &str,
        seen: Seen<'_>,
        ours: &HashSet<String>,
        count: F,
    ) -> Result<(Sync, Vec<i64>)>
    where
        F: Fn(Via) -> Fut,
        Fut: std::future::Future<Output = Result<i64>>,
    {
        let mut observers = self.observe(prefix, seen).await?;
        let mut proc = self.spawn(subject, prefix)?;
        let vias = seen.vias();
        let mut seen_ids: Vec<HashSet<String>> = vec![HashSet::new(); vias.len()];
        let mut done: Vec<Option<i64>> = vec![None; vias.len()];
        let deadline = Instant::now() + self.timeout * 2;
        while done.iter().any(Option::is_none) {
            tokio::select! {
                rec = observers.rx.recv() => match rec {
                    Some(rec) if ours.contains(&rec.container_id) => {
                        if let Some(i) = vias.iter().position(|v| *v == rec.via) {
                            seen_ids[i].insert(rec.container_id);
                            if seen_ids[i].len() == ours.len() && done[i].is_none() {
                                done[i] = Some(rec.arrival_ns);
                            }
                        }
                    }
                    Some(_) => {}
                    None => bail!("the observers ended during the sync"),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    proc.check_alive()?;
                    let seen: Vec<usize> = seen_ids.iter().map(HashSet::len).collect();
                    bail!("{seen:?} of {} records seen by {vias:?} after {} s", ours.len(), (self.timeout * 2).as_secs());
                }
            }
        }
        let mut totals = Vec::with_capacity(vias.len());
        for via in &vias {
            totals.push(count(*via).await?);
        }
        // Let the subject settle before its memory is read.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_kib, hwm_kib) = proc.rss_kib()?;
        let spawned_ns = proc.spawned_ns;
        proc.stop().await;
        let sync = Sync {
            elapsed_ns: done
                .iter()
                .map(|d| d.unwrap_or_default() - spawned_ns)
                .collect(),
            rss_kib,
            hwm_kib,
        };
        Ok((sync, totals))
    }
}

/// A free TCP port on loopback.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port")?
        .port())
}

/// Reads the floor agent's stdout: a oneshot for its `"ready"` line, and its timings.
fn read_floor_lines(
    out: tokio::process::ChildStdout,
) -> (oneshot::Receiver<()>, JoinHandle<Vec<FloorTiming>>) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(out).lines();
        let mut timings = Vec::new();
        let mut ready = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("\"ready\"") {
                if let Some(tx) = ready.take() {
                    tx.send(()).ok();
                }
            } else if let Some(t) = FloorTiming::parse(&line) {
                timings.push(t);
            }
        }
        timings
    });
    (ready_rx, reader)
}

/// A spawned subject, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pid: u32,
    log: PathBuf,
    /// When it was spawned (wall clock, ns).
    pub spawned_ns: i64,
    /// A bridge's `--metrics-addr`.
    metrics_addr: Option<String>,
    graceful: bool,
    /// The floor agent's `"ready"` line.
    ready: Option<oneshot::Receiver<()>>,
    /// The floor agent's timings, read from its stdout until it exits.
    timings: Option<JoinHandle<Vec<FloorTiming>>>,
}

impl Proc {
    /// Fails if the process has exited, quoting the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "process {} exited ({status}); end of {}:\n{}",
                self.pid,
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// A bridge: until `/metrics` shows a completed sync. The floor: until it prints ready.
    async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        if let Some(ready) = self.ready.take() {
            if tokio::time::timeout(within, ready).await.is_err() {
                self.check_alive()?;
                bail!(
                    "the floor agent was not ready within {} s",
                    within.as_secs()
                );
            }
            return Ok(());
        }
        let addr = self.metrics_addr.clone().unwrap_or_default();
        let url = format!("http://{addr}/metrics");
        let http = reqwest::Client::new();
        loop {
            self.check_alive()?;
            let syncs = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(resp) => resp.text().await.ok().and_then(|body| {
                    body.lines().find_map(|l| {
                        l.strip_prefix("swarm_registrator_syncs_total ")?
                            .trim()
                            .parse::<f64>()
                            .ok()
                    })
                }),
                Err(_) => None,
            };
            if syncs.is_some_and(|n| n >= 1.0) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the bridge completed no sync within {} s (swarm_registrator_syncs_total at {url}; see {})",
                    within.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// VmRSS and VmHWM in KiB.
    pub fn rss_kib(&self) -> Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .with_context(|| format!("cannot read /proc/{}/status", self.pid))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{}/status", self.pid))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Stops the subject (SIGTERM first when graceful, SIGKILL after 15 s; else SIGKILL) and
    /// returns the floor agent's timings, if it is the floor.
    pub async fn stop(mut self) -> Vec<FloorTiming> {
        if self.timings.is_some() {
            // The agent prints a start's timings after its put returns, which can be after the
            // record reached the bench: give the last line time to come.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if self.graceful {
            let term = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await;
            if matches!(term, Ok(s) if s.success())
                && tokio::time::timeout(Duration::from_secs(15), self.child.wait())
                    .await
                    .is_err()
            {
                log(&format!(
                    "warning: {} still running 15 s after SIGTERM; killing it",
                    self.pid
                ));
            }
        }
        self.child.start_kill().ok();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            log(&format!(
                "warning: process {} did not exit after SIGKILL",
                self.pid
            ));
        }
        match self.timings.take() {
            Some(reader) => match tokio::time::timeout(Duration::from_secs(5), reader).await {
                Ok(Ok(timings)) => timings,
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }
}
