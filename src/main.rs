//! The `swarm-registrator` command.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendUri, StoreKind};
use backend_store::{Store, StoreArgs};
use clap::{Parser, ValueEnum};
use daemon::duration::{self, seconds_or_duration};
use daemon::LogFormat;
use prometheus_client::registry::Registry;
use swarm_registrator::bridge::{connect_engine, scan_engine, Bridge, BridgeConfig, Deregister};
use swarm_registrator::engine::{DockerEngine, Engine};
use swarm_registrator::metadata::{parse_tags, TagTemplate};
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
    #[arg(env = "REGISTRATOR_BACKEND", value_parser = backend_store::BackendUriParser)]
    backend: BackendUri,

    /// Publish plain containers with their own address and exposed ports instead of host ports.
    #[arg(long, env = "REGISTRATOR_INTERNAL")]
    internal: bool,

    /// The address to publish for host ports (default: the swarm's advertised address).
    #[arg(long, env = "REGISTRATOR_IP")]
    ip: Option<IpAddr>,

    /// Publish a container's IPv6 address (GlobalIPv6Address) on a network that has one,
    /// instead of its IPv4 address.
    #[arg(long, env = "REGISTRATOR_IPV6")]
    ipv6: bool,

    /// The network whose address to publish; a container's registrator.network label beats it.
    #[arg(long, env = "REGISTRATOR_NETWORK")]
    network: Option<String>,

    /// Lease or session TTL (`15s`, `1m`; a bare number is seconds): how long records outlive
    /// a dead bridge or node (Consul: at least 10s, and Consul may reap up to twice the TTL
    /// late). Whole seconds, 3s to 1h.
    #[arg(long, env = "REGISTRATOR_TTL", default_value = "15s", value_parser = parse_ttl)]
    ttl: Duration,

    /// Time between full resyncs of engine and store, the safety net (`60s`, `5m`; a bare
    /// number is seconds).
    #[arg(long, env = "REGISTRATOR_RESYNC", default_value = "60s", value_parser = parse_resync)]
    resync: Duration,

    /// How many times to retry reaching the engine and the store at start; -1 for ever.
    #[arg(long, env = "REGISTRATOR_RETRY_ATTEMPTS", default_value_t = -1,
          value_parser = clap::value_parser!(i64).range(-1..=1_000_000), allow_hyphen_values = true)]
    retry_attempts: i64,

    /// First retry delay (`500ms`, `1s`; a bare number is milliseconds), 10ms to 1m; it
    /// doubles, with jitter, up to 30 s.
    #[arg(long, env = "REGISTRATOR_RETRY_INTERVAL", default_value = "1s", value_parser = parse_retry_interval)]
    retry_interval: Duration,

    /// When an exited container's records are removed.
    #[arg(long, env = "REGISTRATOR_DEREGISTER", value_enum, default_value_t = DeregisterArg::Always)]
    deregister: DeregisterArg,

    /// Only publish containers that set SERVICE_NAME.
    #[arg(long, env = "REGISTRATOR_EXPLICIT")]
    explicit: bool,

    /// Tags added to every record, comma-separated, after the container's own SERVICE_TAGS
    /// (Registrator's -tags). Placeholders: {{.ID}}, {{.Name}}, {{.Config.Image}},
    /// {{.Config.Hostname}}, {{index .Config.Labels "<label>"}}.
    #[arg(long, env = "REGISTRATOR_TAGS", value_parser = parse_forced_tags)]
    tags: Option<ForcedTags>,

    /// Publish the address held in this container label, when a container sets it (a
    /// `/prefix` after it is dropped), in place of the one the bridge would choose
    /// (Registrator's -useIpFromLabel).
    #[arg(long, alias = "useIpFromLabel", env = "REGISTRATOR_USE_IP_FROM_LABEL")]
    use_ip_from_label: Option<String>,

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

    /// Consul: how long a catalog service may stay critical before Consul removes it (`60s`,
    /// `5m`; a bare number is seconds; at least 1m).
    #[arg(long, env = "REGISTRATOR_CONSUL_DEREGISTER_AFTER", default_value = "60s", value_parser = parse_deregister_after)]
    consul_deregister_after: Duration,

    /// Log format.
    #[arg(long, env = "REGISTRATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The parsed `--tags`.
#[derive(Debug, Clone)]
struct ForcedTags(Vec<TagTemplate>);

fn parse_forced_tags(s: &str) -> Result<ForcedTags, String> {
    parse_tags(s).map(ForcedTags).map_err(|e| e.to_string())
}

/// Registrator's options as its users write them, with one dash (`-tags a,b`,
/// `-useIpFromLabel=l`), in this program's spelling (`--tags`); everything after `--` is left
/// as it is. Only Registrator's options that mean the same here are rewritten (not `-cleanup`,
/// which is something else in Registrator).
fn registrator_spelling(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    const NAMES: [&str; 10] = [
        "tags",
        "useIpFromLabel",
        "internal",
        "ip",
        "explicit",
        "resync",
        "ttl",
        "deregister",
        "retry-attempts",
        "retry-interval",
    ];
    let mut rest_is_positional = false;
    args.into_iter()
        .map(|arg| {
            if rest_is_positional || arg == "--" {
                rest_is_positional = true;
                return arg;
            }
            let Some(text) = arg.to_str() else {
                return arg;
            };
            match text.strip_prefix('-') {
                Some(name) if !name.starts_with('-') => {
                    let bare = name.split('=').next().unwrap_or(name);
                    if NAMES.contains(&bare) {
                        OsString::from(format!("-{text}"))
                    } else {
                        arg
                    }
                }
                _ => arg,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeregisterArg {
    Always,
    OnSuccess,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = seconds_or_duration(s).map_err(|e| e.to_string())?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{} is not whole seconds", duration::show(d)));
    }
    duration::within(d, Duration::from_secs(3), Duration::from_secs(3600))
}

fn parse_resync(s: &str) -> Result<Duration, String> {
    let d = seconds_or_duration(s).map_err(|e| e.to_string())?;
    duration::within(d, Duration::from_secs(1), Duration::MAX)
}

fn parse_retry_interval(s: &str) -> Result<Duration, String> {
    let d = duration::millis_or_duration(s).map_err(|e| e.to_string())?;
    duration::within(d, Duration::from_millis(10), Duration::from_secs(60))
}

fn parse_deregister_after(s: &str) -> Result<Duration, String> {
    let d = seconds_or_duration(s).map_err(|e| e.to_string())?;
    duration::within(d, Duration::from_secs(60), Duration::MAX)
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(registrator_spelling(std::env::args_os()));
    if let Err(e) = check_combinations(&cli) {
        e.exit();
    }
    daemon::run("swarm-registrator", cli.log_format, async {
        run(cli).await.map(|()| ExitCode::SUCCESS)
    })
}

/// Checks that depend on several flags; errors exit with status 2 like clap's own.
fn check_combinations(cli: &Cli) -> Result<(), clap::Error> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    if let Err(e) = cli.store.check(&cli.backend) {
        return Err(cmd.error(clap::error::ErrorKind::ArgumentConflict, e));
    }
    if cli.backend.kind() == StoreKind::Consul {
        let floor = StoreKind::Consul.min_session_ttl();
        if cli.ttl < floor {
            return Err(cmd.error(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--ttl {} is below Consul's session TTL floor of {}; use --ttl {} or more",
                    duration::show(cli.ttl),
                    duration::show(floor),
                    duration::show(floor)
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
    options.consul_deregister_critical_after = cli.consul_deregister_after;
    Ok(options)
}

fn build_options(cli: &Cli) -> BuildOptions {
    BuildOptions {
        internal: cli.internal,
        host_ip: cli.ip,
        network: cli.network.clone(),
        explicit: cli.explicit,
        ipv6: cli.ipv6,
        tags: cli.tags.clone().map(|t| t.0).unwrap_or_default(),
        ip_label: cli.use_ip_from_label.clone(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.dry_run {
        return dry_run(&cli).await;
    }
    let shutdown = daemon::shutdown_on_signals();

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
        ttl: cli.ttl,
        resync: cli.resync,
        retry_attempts: u32::try_from(cli.retry_attempts).ok(),
        retry_interval: cli.retry_interval,
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
        ttl_secs = cli.ttl.as_secs(),
        resync_secs = cli.resync.as_secs(),
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
    let started = match connect_engine(&config, &metrics, &shutdown).await? {
        Some(engine) => {
            Bridge::start_with(engine, store, config, metrics, health, &shutdown).await?
        }
        None => None,
    };
    let Some(bridge) = started else {
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
    for (c, built) in scanned {
        match built {
            Ok(built) => {
                for bad in &built.bad_checks {
                    tracing::warn!(container = %c.name, problem = %bad, "publishing container without its check");
                }
                for r in built.records {
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
