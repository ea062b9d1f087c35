//! The `swarm-registrator` command.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendUri, StoreKind};
use backend_store::{Store, StoreArgs};
use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;
use swarm_registrator::bridge::{scan_engine, Bridge, BridgeConfig, Deregister};
use swarm_registrator::engine::{DockerEngine, Engine};
use swarm_registrator::metrics::{Health, Metrics};
use swarm_registrator::records::BuildOptions;
use tokio_util::sync::CancellationToken;

/// Publishes Docker Swarm tasks and containers of this node into etcd or Consul.
///
/// Run it as a global service with the Docker socket mounted read-only. Every option can also
/// be given as the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Where to publish: etcd://host:port[,host:port...]/<prefix>, consul://host:port/<prefix>
    /// or consul+https://host:port/<prefix>.
    #[arg(env = "REGISTRATOR_BACKEND", value_parser = BackendUri::parse)]
    backend: BackendUri,

    /// Publish plain containers with their own address and exposed ports instead of host ports.
    #[arg(long, env = "REGISTRATOR_INTERNAL")]
    internal: bool,

    /// The address to publish for host ports (default: the swarm's advertised address).
    #[arg(long, env = "REGISTRATOR_IP")]
    ip: Option<IpAddr>,

    /// The network whose address to publish; a container's registrator.network label beats it.
    #[arg(long, env = "REGISTRATOR_NETWORK")]
    network: Option<String>,

    /// Lease or session TTL in seconds: how long records outlive a dead bridge or node
    /// (Consul: at least 10, and Consul may reap up to twice the TTL late).
    #[arg(long, env = "REGISTRATOR_TTL", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(3..=3600))]
    ttl: u64,

    /// Seconds between full resyncs of engine and store (the safety net).
    #[arg(long, env = "REGISTRATOR_RESYNC", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    resync: u64,

    /// How many times to retry reaching the engine and the store at start; -1 for ever.
    #[arg(long, env = "REGISTRATOR_RETRY_ATTEMPTS", default_value_t = -1,
          value_parser = clap::value_parser!(i64).range(-1..=1_000_000), allow_hyphen_values = true)]
    retry_attempts: i64,

    /// First retry delay in milliseconds; it doubles, with jitter, up to 30 s.
    #[arg(long, env = "REGISTRATOR_RETRY_INTERVAL", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    retry_interval: u64,

    /// When an exited container's records are removed.
    #[arg(long, env = "REGISTRATOR_DEREGISTER", value_enum, default_value_t = DeregisterArg::Always)]
    deregister: DeregisterArg,

    /// Only publish containers that set SERVICE_NAME.
    #[arg(long, env = "REGISTRATOR_EXPLICIT")]
    explicit: bool,

    /// On a graceful stop, remove this node's records at once (revoke the lease) instead of
    /// leaving them for the next bridge on this node.
    #[arg(long, env = "REGISTRATOR_CLEANUP")]
    cleanup: bool,

    /// Print the records that would be written, as JSON lines, and exit.
    #[arg(long, env = "REGISTRATOR_DRY_RUN")]
    dry_run: bool,

    /// Serve /metrics and /healthz on this address, e.g. 0.0.0.0:9100.
    #[arg(long, env = "REGISTRATOR_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// How to reach the store: tokens and TLS files, the same flags in every program.
    #[command(flatten)]
    store: StoreArgs,

    /// Consul: do not write records into KV (catalog only).
    #[arg(long, env = "REGISTRATOR_NO_CONSUL_KV")]
    no_consul_kv: bool,

    /// Consul: do not register records in the catalog (KV only).
    #[arg(long, env = "REGISTRATOR_NO_CONSUL_CATALOG")]
    no_consul_catalog: bool,

    /// Consul: seconds a catalog service may stay critical before Consul removes it (>= 60).
    #[arg(long, env = "REGISTRATOR_CONSUL_DEREGISTER_AFTER", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(60..))]
    consul_deregister_after: u64,

    /// Log format.
    #[arg(long, env = "REGISTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeregisterArg {
    Always,
    OnSuccess,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = check_combinations(&cli) {
        e.exit();
    }
    init_tracing(cli.log_format);
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
            tracing::error!(error = format!("{e:#}"), "swarm-registrator stopped");
            ExitCode::FAILURE
        }
    }
}

/// Checks that depend on several flags; errors exit with status 2 like clap's own.
fn check_combinations(cli: &Cli) -> Result<(), clap::Error> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    if let Err(e) = cli.store.check(&cli.backend) {
        return Err(cmd.error(clap::error::ErrorKind::ArgumentConflict, e));
    }
    if cli.backend.kind() == StoreKind::Consul {
        let floor = StoreKind::Consul.min_session_ttl().as_secs();
        if cli.ttl < floor {
            return Err(cmd.error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--ttl {} is below Consul's session TTL floor of {floor} s; use --ttl {floor} or more",
                    cli.ttl
                ),
            ));
        }
        if cli.no_consul_kv && cli.no_consul_catalog {
            return Err(cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                "--no-consul-kv with --no-consul-catalog leaves nothing to publish",
            ));
        }
    } else if cli.no_consul_kv || cli.no_consul_catalog {
        return Err(cmd.error(
            clap::error::ErrorKind::ArgumentConflict,
            "--consul-* options need a consul:// backend URI",
        ));
    }
    Ok(())
}

/// The store options of every program, with the bridge's own Consul publishing flags.
fn store_options(cli: &Cli) -> anyhow::Result<backend_store::StoreOptions> {
    let mut options = cli.store.options(&cli.backend)?;
    options.consul_kv = !cli.no_consul_kv;
    options.consul_catalog = !cli.no_consul_catalog;
    options.consul_deregister_critical_after = Duration::from_secs(cli.consul_deregister_after);
    Ok(options)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn build_options(cli: &Cli) -> BuildOptions {
    BuildOptions {
        internal: cli.internal,
        host_ip: cli.ip,
        network: cli.network.clone(),
        explicit: cli.explicit,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.dry_run {
        return dry_run(&cli).await;
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    if let Some(addr) = cli.metrics_addr {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let listener = ops_http::bind(addr).await?;
        tracing::info!(%addr, "serving /metrics and /healthz");
        let check = health.clone();
        tokio::spawn(ops_http::serve(
            listener,
            Arc::new(registry),
            Arc::new(move || check.check()),
            shutdown.clone(),
        ));
    }

    let config = BridgeConfig {
        build: build_options(&cli),
        ttl: Duration::from_secs(cli.ttl),
        resync: Duration::from_secs(cli.resync),
        retry_attempts: u32::try_from(cli.retry_attempts).ok(),
        retry_interval: Duration::from_millis(cli.retry_interval),
        deregister: match cli.deregister {
            DeregisterArg::Always => Deregister::Always,
            DeregisterArg::OnSuccess => Deregister::OnSuccess,
        },
        cleanup: cli.cleanup,
    };
    tracing::info!(
        store = cli.backend.kind().name(),
        endpoints = %cli.backend.endpoints(),
        prefix = cli.backend.layout().prefix(),
        ttl_secs = cli.ttl,
        resync_secs = cli.resync,
        internal = cli.internal,
        network = cli.network.as_deref().unwrap_or(""),
        "starting swarm-registrator {}",
        env!("CARGO_PKG_VERSION")
    );
    let store = Store::open(&cli.backend, &store_options(&cli)?).await?;
    run_bridge(store, config, metrics, health, shutdown).await
}

async fn run_bridge(
    store: Store,
    config: BridgeConfig,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(bridge) = Bridge::start(store, config, metrics, health, &shutdown).await? else {
        tracing::info!("stopped before the bridge was up");
        return Ok(());
    };
    bridge.run(shutdown).await?;
    Ok(())
}

async fn dry_run(cli: &Cli) -> anyhow::Result<()> {
    let engine = DockerEngine::connect().await?;
    let (node, _) = engine.identity().await?;
    let scanned = scan_engine(&engine, &build_options(cli), &node).await?;
    let mut out = String::new();
    for (c, records) in scanned {
        match records {
            Ok(records) => {
                for r in records {
                    let key = cli.backend.layout().service_key(&r.service, &r.id);
                    let json = serde_json::to_string(&r)?;
                    out.push_str(&format!("{key} {json}\n"));
                }
            }
            Err(reason) => {
                tracing::warn!(container = %c.name, reason = %reason, "not publishing container")
            }
        }
    }
    print!("{out}");
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
        }
        shutdown.cancel();
    });
}
