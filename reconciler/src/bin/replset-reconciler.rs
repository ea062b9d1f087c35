//! The `replset-reconciler` command.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backend_core::{BackendUri, Coordinator, Watcher};
use backend_store::{Store, StoreArgs};
use clap::{Parser, Subcommand};
use daemon::duration::parse_duration;
use daemon::LogFormat;
use replset_reconciler::commands::{self, StatusFormat};
use replset_reconciler::controller::{Controller, ControllerConfig};
use replset_reconciler::mongo::{Credentials, Members, MongoTls};
use replset_reconciler::records::Selector;

/// Keeps MongoDB replica sets equal to the swarm tasks that swarm-registrator publishes.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// The store: etcd://host:port[,host:port...]/<prefix> or consul://host:port/<prefix>.
    #[arg(env = "RECONCILER_BACKEND", value_parser = backend_store::BackendUriParser, global = true)]
    backend: Option<BackendUri>,

    /// How to reach the store: tokens and TLS files, the same flags in every program.
    #[command(flatten)]
    store: StoreArgs,

    /// A swarm service whose tasks form a replica set (with --replset, repeatable, in order).
    #[arg(long, env = "RECONCILER_SERVICE", value_delimiter = ',', global = true)]
    service: Vec<String>,

    /// The replica set of the --service at the same position.
    #[arg(long, env = "RECONCILER_REPLSET", value_delimiter = ',', value_parser = set_name, global = true)]
    replset: Vec<String>,

    /// The mongod port, if not the records' own.
    #[arg(long, env = "RECONCILER_PORT", value_parser = clap::value_parser!(u16).range(1..), global = true)]
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

    /// Decide and log, but change nothing: never campaign for leadership, never write to the
    /// store or the replica set.
    #[arg(long, env = "RECONCILER_DRY_RUN", global = true)]
    dry_run: bool,

    /// status and scale: a status observed longer ago than this is stale (the leader rewrites
    /// it at least every 15 s).
    #[arg(long, env = "RECONCILER_MAX_STATUS_AGE", default_value = "60s", value_parser = parse_duration, global = true)]
    max_status_age: Duration,

    /// Serve /metrics and /healthz on this address, e.g. 0.0.0.0:9101.
    #[arg(long, env = "RECONCILER_METRICS_ADDR", global = true)]
    metrics_addr: Option<std::net::SocketAddr>,

    /// MongoDB user (with --password-file).
    #[arg(long, env = "RECONCILER_USERNAME", global = true)]
    username: Option<String>,

    /// A file holding the MongoDB password (a Docker secret).
    #[arg(long, env = "RECONCILER_PASSWORD_FILE", global = true)]
    password_file: Option<std::path::PathBuf>,

    /// Reach the members with TLS (mongod --tlsMode requireTLS); the published URI then
    /// carries tls=true.
    #[arg(long, env = "RECONCILER_MONGO_TLS", global = true)]
    mongo_tls: bool,

    /// The PEM of the CA that signed the members' certificates (a Docker secret); implies
    /// --mongo-tls. Without it the system's roots are trusted.
    #[arg(long, env = "RECONCILER_MONGO_TLS_CA_FILE", global = true)]
    mongo_tls_ca_file: Option<std::path::PathBuf>,

    /// Log format.
    #[arg(long, env = "RECONCILER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the next step for each replica set, and exit.
    Plan,
    /// Print the status the leader published for each --replset (exit 1 if one has none).
    /// With --wait-converged N, first wait until each has converged with N members: the
    /// planner has nothing to do, there is a primary, and all N members are healthy.
    Status {
        /// Wait until each set has converged with this many members (exit 1 on --timeout).
        #[arg(long, value_name = "N")]
        wait_converged: Option<usize>,
        /// With --wait-converged: how long to wait (0s: check once).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
        /// Print the status documents as JSON, one line per set.
        #[arg(long)]
        json: bool,
    },
    /// Change a service's replica count one task at a time, waiting after each step until the
    /// replica set has converged, so that quorum is never lost. Needs a manager's Docker API
    /// (the local socket or DOCKER_HOST). Example: `scale mongo=5`.
    /// The operator's decision that a set whose members lost their data is gone: forget what
    /// the store remembers of it, so that the leader initiates a new, EMPTY set in its place
    /// (the reconciler refuses to on its own). Give the id that the refusal names.
    ForgetSet {
        /// The replica set id the store remembers (24 hex digits, from the refusal, the
        /// status or `plan`).
        #[arg(long)]
        replica_set_id: String,
    },
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
    daemon::run("replset-reconciler", cli.log_format, run(cli))
}

fn usage_error(msg: &str) -> ! {
    use clap::CommandFactory;
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, msg)
        .exit()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(backend) = cli.backend.clone() else {
        usage_error("a backend URI is required, e.g. etcd://127.0.0.1:2379/registrator");
    };
    // `status` reads the sets' status documents only: it needs their names, no service.
    let status_only = matches!(
        cli.command,
        Some(Command::Status { .. } | Command::ForgetSet { .. })
    );
    if status_only && cli.replset.is_empty() {
        usage_error("status and forget-set: give --replset <set> (or RECONCILER_REPLSET)");
    }
    if !status_only && cli.service.len() != cli.replset.len() {
        usage_error("give one --replset for each --service, in the same order");
    }
    if !status_only && cli.service.is_empty() && !cli.discover {
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
    let config = ControllerConfig {
        metrics: Arc::new(replset_reconciler::metrics::Metrics::default()),
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
    let tls = match &cli.mongo_tls_ca_file {
        Some(path) => {
            // Read now, so that a wrong path stops the start instead of every connection.
            std::fs::metadata(path)
                .with_context(|| format!("cannot read --mongo-tls-ca-file {}", path.display()))?;
            Some(MongoTls {
                ca_file: Some(path.clone()),
            })
        }
        None => cli.mongo_tls.then(MongoTls::default),
    };
    let members = Arc::new(Members::new(credentials).with_tls(tls));
    let command = Invocation {
        command: cli.command,
        replsets: cli.replset,
        metrics_addr: cli.metrics_addr,
        max_status_age: cli.max_status_age,
    };
    if let Err(e) = cli.store.check(&backend) {
        usage_error(&e.to_string());
    }
    let store = Store::open(&backend, &cli.store.options(&backend)?).await?;
    drive(Arc::new(store), members, config, command).await
}

/// What to do once the store is set up.
struct Invocation {
    command: Option<Command>,
    replsets: Vec<String>,
    metrics_addr: Option<std::net::SocketAddr>,
    max_status_age: Duration,
}

async fn drive<S: Watcher + Coordinator>(
    store: Arc<S>,
    members: Arc<Members>,
    config: ControllerConfig,
    invocation: Invocation,
) -> anyhow::Result<ExitCode> {
    match invocation.command {
        Some(Command::Status {
            wait_converged,
            timeout,
            json,
        }) => {
            let format = if json {
                StatusFormat::Json
            } else {
                StatusFormat::Text
            };
            let all = commands::status(
                &*store,
                &config.layout,
                &invocation.replsets,
                wait_converged,
                timeout,
                invocation.max_status_age,
                format,
            )
            .await?;
            return Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Some(Command::ForgetSet { replica_set_id }) => {
            let [set] = invocation.replsets.as_slice() else {
                usage_error("forget-set: give exactly one --replset");
            };
            let forgotten =
                commands::forget_set(&*store, &config.layout, set, &replica_set_id).await?;
            println!(
                "{set}: forgot replica set {} (config version {}); the reconciler's leader will \
                 initiate a new, empty set on the members that answer",
                forgotten.replica_set_id, forgotten.config_version
            );
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Scale {
            target,
            step_timeout,
        }) => {
            let (service, want) = scale_target(&target);
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
            let max_age = invocation.max_status_age;
            commands::scale(
                &*store,
                &config.layout,
                service,
                &set,
                want,
                step_timeout,
                max_age,
            )
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Plan) | None => {}
    }
    let shutdown = daemon::shutdown_on_signals();
    let plan_only = matches!(invocation.command, Some(Command::Plan));
    let mut controller =
        Controller::start(store.clone(), members.clone(), config, shutdown.clone());
    let records = controller.first_snapshot().await?;
    if plan_only {
        commands::plan(&*store, &records, &controller.context().config, &*members).await;
        controller.stop().await;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(addr) = invocation.metrics_addr {
        controller.serve_ops(addr).await?;
    }
    controller.run().await;
    Ok(ExitCode::SUCCESS)
}

/// A `--replset` value: a name that can be a key segment and a `replicaSet=` value.
fn set_name(name: &str) -> Result<String, backend_core::SetNameError> {
    backend_core::check_set_name(name).map(|()| name.to_string())
}

/// `<service>=<replicas>`.
fn scale_target(target: &str) -> (&str, i64) {
    let Some((service, n)) = target.split_once('=') else {
        usage_error("scale takes <service>=<replicas>, e.g. mongo=5");
    };
    let Ok(want) = n.parse::<i64>() else {
        usage_error("scale takes <service>=<replicas> with a number, e.g. mongo=5");
    };
    (service, want)
}
