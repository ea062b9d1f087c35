//! The `replset-reconciler` command.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backend_core::{BackendUri, Coordinator, Watcher};
use backend_store::{Store, StoreArgs};
use clap::{Parser, Subcommand};
use replset_reconciler::controller::{follow_records, run_set, ControllerConfig, Records};
use replset_reconciler::duration::parse_duration;
use replset_reconciler::mongo::{Credentials, Members};
use replset_reconciler::plan::{plan_next_step, PlanContext};
use replset_reconciler::records::{desired_sets, Selector};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Keeps MongoDB replica sets equal to the swarm tasks that swarm-registrator publishes.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The store: etcd://host:port[,host:port...]/<prefix> or consul://host:port/<prefix>.
    #[arg(env = "RECONCILER_BACKEND", value_parser = BackendUri::parse, global = true)]
    backend: Option<BackendUri>,

    /// How to reach the store: tokens and TLS files, the same flags in every program.
    #[command(flatten)]
    store: StoreArgs,

    /// A swarm service whose tasks form a replica set (with --replset, repeatable, in order).
    #[arg(long, env = "RECONCILER_SERVICE", value_delimiter = ',', global = true)]
    service: Vec<String>,

    /// The replica set of the --service at the same position.
    #[arg(long, env = "RECONCILER_REPLSET", value_delimiter = ',', global = true)]
    replset: Vec<String>,

    /// The mongod port, if not the records' own.
    #[arg(long, env = "RECONCILER_PORT", global = true)]
    port: Option<u16>,

    /// Also manage every set named by a registrator.replset=<set> label on the records.
    #[arg(long, env = "RECONCILER_DISCOVER", global = true)]
    discover: bool,

    /// How long a record must be gone before its member may be removed.
    #[arg(long, env = "RECONCILER_REMOVAL_GRACE", default_value = "30s", value_parser = parse_duration, global = true)]
    removal_grace: Duration,

    /// How long the records must be quiet before a reconcile.
    #[arg(long, env = "RECONCILER_DEBOUNCE", default_value = "1s", value_parser = parse_duration, global = true)]
    debounce: Duration,

    /// The leader lease or session TTL (Consul: at least 10s).
    #[arg(long, env = "RECONCILER_LEADER_TTL", default_value = "15s", value_parser = parse_duration, global = true)]
    leader_ttl: Duration,

    /// Allow a forced reconfig (to the members that are up) once a set has been without a
    /// majority for --force-after. Writes that only the lost members had are then lost.
    #[arg(long, env = "RECONCILER_ALLOW_FORCE", global = true)]
    allow_force: bool,

    /// With --allow-force: how long a set must be without a majority before it is forced.
    #[arg(long, env = "RECONCILER_FORCE_AFTER", default_value = "5m", value_parser = parse_duration, global = true)]
    force_after: Duration,

    /// Decide and log, but change nothing.
    #[arg(long, env = "RECONCILER_DRY_RUN", global = true)]
    dry_run: bool,

    /// Serve /metrics and /healthz on this address, e.g. 0.0.0.0:9101.
    #[arg(long, env = "RECONCILER_METRICS_ADDR", global = true)]
    metrics_addr: Option<std::net::SocketAddr>,

    /// MongoDB user (with --password-file).
    #[arg(long, env = "RECONCILER_USERNAME", global = true)]
    username: Option<String>,

    /// A file holding the MongoDB password (a Docker secret).
    #[arg(long, env = "RECONCILER_PASSWORD_FILE", global = true)]
    password_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the next step for each replica set, and exit.
    Plan,
    /// Change a service's replica count one task at a time, waiting after each step until the
    /// replica set has converged, so that quorum is never lost. Needs a manager's Docker API
    /// (the local socket or DOCKER_HOST). Example: `scale mongo=5`.
    Scale {
        /// `<service>=<replicas>`.
        target: String,
        /// How long one step may take to converge.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        step_timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "replset-reconciler stopped");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(msg: &str) -> ! {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, msg)
        .exit()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(backend) = cli.backend.clone() else {
        usage_error("a backend URI is required, e.g. etcd://127.0.0.1:2379/registrator");
    };
    if cli.service.len() != cli.replset.len() {
        usage_error("give one --replset for each --service, in the same order");
    }
    if cli.service.is_empty() && !cli.discover {
        usage_error("nothing to manage: give --service <svc> --replset <set>, or --discover");
    }
    let mut selectors: Vec<Selector> = cli
        .service
        .iter()
        .zip(&cli.replset)
        .map(|(service, set)| Selector::Service {
            service: service.clone(),
            set: set.clone(),
            port: cli.port,
        })
        .collect();
    if cli.discover {
        selectors.push(Selector::Label);
    }
    let credentials = match (&cli.username, &cli.password_file) {
        (Some(username), Some(path)) => Some(Credentials {
            username: username.clone(),
            password: std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --password-file {}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        }),
        (None, None) => None,
        _ => usage_error("--username and --password-file go together"),
    };
    let holder =
        std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    let metrics = Arc::new(replset_reconciler::metrics::Metrics::default());
    let health = Arc::new(replset_reconciler::metrics::Health::default());
    if let Some(addr) = cli.metrics_addr {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        let listener = ops_http::bind(addr).await?;
        let check = health.clone();
        tokio::spawn(ops_http::serve(
            listener,
            Arc::new(registry),
            Arc::new(move || check.check()),
            tokio_util::sync::CancellationToken::new(),
        ));
        tracing::info!(%addr, "serving /metrics and /healthz");
    }
    let config = ControllerConfig {
        metrics,
        force_after: cli.allow_force.then_some(cli.force_after),
        layout: backend.layout().clone(),
        selectors,
        removal_grace: cli.removal_grace,
        debounce: cli.debounce,
        resync: Duration::from_secs(15),
        leader_ttl: cli.leader_ttl,
        holder,
        dry_run: cli.dry_run,
    };
    let members = Arc::new(Members::new(credentials));
    if let Err(e) = cli.store.check(&backend) {
        usage_error(&e.to_string());
    }
    let store = Store::open(&backend, &cli.store.options(&backend)?).await?;
    drive(Arc::new(store), members, config, health, cli.command).await
}

async fn drive<S: Watcher + Coordinator>(
    store: Arc<S>,
    members: Arc<Members>,
    config: ControllerConfig,
    health: Arc<replset_reconciler::metrics::Health>,
    command: Option<Command>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            tracing::info!("stopping");
            shutdown.cancel();
        });
    }
    let (tx, mut rx) = watch::channel(Records::default());
    tokio::spawn(follow_records(
        store.clone(),
        config.layout.clone(),
        tx,
        health,
        shutdown.clone(),
    ));
    // The sets to manage: the configured ones now; discovered ones as they appear.
    rx.wait_for(|r| r.trusted)
        .await
        .context("the records' watch ended before its first snapshot")?;

    if let Some(Command::Scale {
        target,
        step_timeout,
    }) = &command
    {
        return scale(&*store, &config, target, *step_timeout).await;
    }

    if let Some(Command::Plan) = command {
        let records = rx.borrow().clone();
        let (sets, skipped) = desired_sets(&records.entries, &config.layout, &config.selectors);
        for s in skipped {
            println!("ignoring {}: {}", s.key, s.reason);
        }
        for (set, desired) in sets {
            let hosts: Vec<String> = desired.members.values().cloned().collect();
            let observed = members.observe(&set, &hosts, &hosts).await;
            let ctx = PlanContext {
                set_name: set.clone(),
                records_trusted: true,
                record_gone_for: Default::default(),
                removal_grace: config.removal_grace,
                // `plan` shows what would be done if the loss lasts: a force with
                // --allow-force.
                force_after: config.force_after,
                majority_lost_for: Duration::MAX,
            };
            let plan = plan_next_step(&observed.observation, &desired, &ctx);
            println!("{set}: {:?}", plan.step);
            for note in plan.notes {
                println!("{set}: note: {note:?}");
            }
        }
        return Ok(());
    }

    let mut running = std::collections::BTreeSet::new();
    loop {
        let sets: Vec<String> = {
            let records = rx.borrow();
            desired_sets(&records.entries, &config.layout, &config.selectors)
                .0
                .into_keys()
                .collect()
        };
        for set in sets {
            if running.insert(set.clone()) {
                tracing::info!(set = %set, "managing replica set");
                tokio::spawn(run_set(
                    store.clone(),
                    members.clone(),
                    config.clone(),
                    set,
                    rx.clone(),
                    shutdown.clone(),
                ));
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
    }
    // Give the set tasks a moment to resign.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// `scale <service>=<n>`: one replica at a time, each step waited for in the set's status.
async fn scale<S: Coordinator>(
    store: &S,
    config: &ControllerConfig,
    target: &str,
    step_timeout: Duration,
) -> anyhow::Result<()> {
    use bollard::models::{ServiceSpecMode, ServiceSpecModeReplicated};
    use bollard::query_parameters::UpdateServiceOptions;

    let Some((service, n)) = target.split_once('=') else {
        usage_error("scale takes <service>=<replicas>, e.g. mongo=5");
    };
    let Ok(want) = n.parse::<i64>() else {
        usage_error("scale takes <service>=<replicas> with a number, e.g. mongo=5");
    };
    let set = config
        .selectors
        .iter()
        .find_map(|s| match s {
            Selector::Service {
                service: svc, set, ..
            } if svc == service => Some(set.clone()),
            _ => None,
        })
        .unwrap_or_else(|| {
            usage_error("scale: give --service <svc> --replset <set> for this service")
        });
    let docker = bollard::Docker::connect_with_defaults()
        .context("cannot reach the Docker engine (a manager's socket or DOCKER_HOST)")?
        .negotiate_version()
        .await
        .context("cannot reach the Docker engine (a manager's socket or DOCKER_HOST)")?;
    loop {
        let current = docker
            .inspect_service(service, None)
            .await
            .with_context(|| format!("cannot inspect service {service}"))?;
        let version = current.version.and_then(|v| v.index).unwrap_or(0);
        let mut spec = current.spec.context("the service has no spec")?;
        let replicas = spec
            .mode
            .as_ref()
            .and_then(|m| m.replicated.as_ref())
            .and_then(|r| r.replicas)
            .context("scale works on replicated services only")?;
        if replicas == want {
            println!("{service} has {want} replicas and {set} has converged");
            return Ok(());
        }
        let next = if want > replicas {
            replicas + 1
        } else {
            replicas - 1
        };
        println!("{service}: {replicas} -> {next} replicas");
        spec.mode = Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(next),
            }),
            ..Default::default()
        });
        docker
            .update_service(
                service,
                spec,
                UpdateServiceOptions {
                    version: i32::try_from(version).unwrap_or(i32::MAX),
                    ..Default::default()
                },
                None,
            )
            .await
            .with_context(|| format!("cannot update service {service}"))?;
        // Wait until the reconciler reports the set converged with `next` members.
        let key = config.layout.replset_status_key(&set);
        let deadline = tokio::time::Instant::now() + step_timeout;
        loop {
            let status: Option<serde_json::Value> = store
                .get_value(&key)
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice(&v).ok());
            let members = status
                .as_ref()
                .and_then(|s| s["members"].as_array().map(Vec::len))
                .unwrap_or(0);
            let converged = status
                .as_ref()
                .and_then(|s| s["converged"].as_bool())
                .unwrap_or(false);
            if converged && members as i64 == next {
                println!("{set}: converged with {members} members");
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{set} did not converge to {next} members within {step_timeout:?} (status: {}); \
                     is a replset-reconciler running for it?",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "none".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
