//! `replset-sim`: one simulated mongod per process, with mongod's own flag names, so that it
//! can stand in for `mongod` in a container image.
//!
//!     replset-sim --port 27017 --replSet rs0 [--bind_ip ADDR | --bind_ip_all]
//!                 [--auth] [--keyFile PATH]
//!                 [--tlsMode MODE --tlsCertificateKeyFile PEM --tlsCAFile PEM
//!                  [--tlsClusterFile PEM] [--tlsAllowConnectionsWithoutCertificates]
//!                  [--tlsAllowInvalidHostnames]]
//!     replset-sim --sim-probe [--port 27017] [--sim-probe-config]
//!                 [--tlsMode MODE --tlsCAFile PEM [--tlsCertificateKeyFile PEM]]
//!
//! `--sim-probe` is the image's healthcheck (see `replset_sim::probe`): it asks the member on
//! 127.0.0.1:PORT `hello`, prints its state on one line to stderr and exits 0 only if it is
//! PRIMARY or SECONDARY, 1 otherwise. With `--sim-probe-config` it also prints the member's
//! current config (`replSetGetConfig`) as one line of JSON on stdout, if it has one, then its
//! whole `hello` answer as another (the config has `members`, the answer `isWritablePrimary`;
//! a primary's `electionId` names its term): tests record every config a set goes through,
//! and every primary with its term, this way.
//!
//! Without a bind flag it listens on 127.0.0.1 only, as mongod does. As the official mongo
//! image's entrypoint does, `MONGO_INITDB_ROOT_USERNAME` with `MONGO_INITDB_ROOT_PASSWORD`
//! or `MONGO_INITDB_ROOT_PASSWORD_FILE` creates a root user on a first start with an empty
//! data set, and turns on `--auth`; `MONGO_INITDB_USERS_FILE` names the users that the
//! stack's init script creates in the mongo image, created here at the same moment.

use anyhow::Context;
use clap::Parser;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use replset_sim::auth::initdb::{self, InitUser};
use replset_sim::auth::{KeyFile, Security};
use replset_sim::disk::DataDir;
use replset_sim::node::InitialSyncPace;
use replset_sim::probe::Health;
use replset_sim::tls::{Tls, TlsMode, TlsOptions};
use replset_sim::{DurableState, History, Network, Node, NodeOptions};

#[derive(Debug, Parser)]
#[command(
    name = "replset-sim",
    version,
    about = "A MongoDB 7.0 replica-set member simulator on the real wire protocol (not a database)"
)]
struct Args {
    /// TCP port to listen on.
    #[arg(long, default_value_t = 27017)]
    port: u16,
    /// Replica set name; without it the member is a standalone.
    #[arg(long = "replSet")]
    repl_set: Option<String>,
    /// Address to listen on (the first of a comma-separated list is used).
    #[arg(long = "bind_ip", conflicts_with = "bind_ip_all")]
    bind_ip: Option<String>,
    /// Listen on every IPv4 address (0.0.0.0); `--ipv6` makes it `::`.
    #[arg(long = "bind_ip_all")]
    bind_ip_all: bool,
    #[arg(long)]
    ipv6: bool,
    /// The data directory: the config, the oplog (and the data it makes), the term and the
    /// last vote are kept there, locked by mongod.lock, and come back after a restart (see
    /// docs/replset-sim.md for the format). It must exist. Without it, unlike mongod, the
    /// member keeps everything in memory only.
    #[arg(long)]
    dbpath: Option<std::path::PathBuf>,
    /// Turn on authorization (`security.authorization: enabled`).
    #[arg(long)]
    auth: bool,
    /// The key file of internal authentication between members; implies --auth.
    #[arg(long = "keyFile")]
    key_file: Option<std::path::PathBuf>,
    /// `disabled`, `allowTLS` (serves TLS and plain text, connects to members in plain text),
    /// `preferTLS` (serves both, connects with TLS) or `requireTLS` (TLS only). See
    /// docs/replset-sim.md, "TLS".
    #[arg(long = "tlsMode", default_value = "disabled", value_parser = TlsMode::parse)]
    tls_mode: TlsMode,
    /// One PEM file with this member's certificate (and chain) and its private key.
    #[arg(long = "tlsCertificateKeyFile")]
    tls_certificate_key_file: Option<std::path::PathBuf>,
    /// The PEM of the CA(s) that sign the members' and clients' certificates (required with TLS).
    #[arg(long = "tlsCAFile")]
    tls_ca_file: Option<std::path::PathBuf>,
    /// The certificate and key this member presents to other members (default: --tlsCertificateKeyFile).
    #[arg(long = "tlsClusterFile")]
    tls_cluster_file: Option<std::path::PathBuf>,
    /// Accept TLS clients that present no certificate (a certificate presented must still be
    /// signed by --tlsCAFile).
    #[arg(long = "tlsAllowConnectionsWithoutCertificates")]
    tls_allow_connections_without_certificates: bool,
    /// Do not check the names in other members' certificates (their chain still is).
    #[arg(long = "tlsAllowInvalidHostnames")]
    tls_allow_invalid_hostnames: bool,
    /// The `host:port` this member calls itself (default: the bind address, or the
    /// hostname with --bind_ip_all). Not a mongod flag.
    #[arg(long = "sim-advertise", env = "REPLSET_SIM_ADVERTISE")]
    advertise: Option<String>,
    /// Default heartbeat interval filled into new configs. Not a mongod flag.
    #[arg(long = "sim-heartbeat-ms", default_value_t = 500)]
    heartbeat_ms: u64,
    /// Initial sync pace: a new or emptied member stays in STARTUP2 this long at least while
    /// it copies its data. Not a mongod flag.
    #[arg(long = "sim-initial-sync-floor-ms", default_value_t = 100)]
    initial_sync_floor_ms: u64,
    /// Initial sync pace: milliseconds per MB of data copied. Not a mongod flag.
    #[arg(long = "sim-initial-sync-ms-per-mb", default_value_t = 50)]
    initial_sync_ms_per_mb: u64,
    /// Default election timeout filled into new configs. Not a mongod flag.
    #[arg(long = "sim-election-timeout-ms", default_value_t = 2000)]
    election_timeout_ms: u64,
    /// Do not serve: ask the member on 127.0.0.1:--port `hello` and exit 0 only if it is
    /// PRIMARY or SECONDARY (the image's healthcheck). Not a mongod flag.
    #[arg(long = "sim-probe")]
    probe: bool,
    /// With --sim-probe: also print the member's config and its `hello` answer, each as one
    /// line of JSON on stdout.
    #[arg(long = "sim-probe-config", requires = "probe")]
    probe_config: bool,
    /// How long --sim-probe waits for the answer. Not a mongod flag.
    #[arg(long = "sim-probe-timeout-ms", default_value_t = 5000)]
    probe_timeout_ms: u64,
}

impl Args {
    fn tls(&self) -> TlsOptions {
        TlsOptions {
            mode: self.tls_mode,
            certificate_key_file: self.tls_certificate_key_file.clone(),
            ca_file: self.tls_ca_file.clone(),
            cluster_file: self.tls_cluster_file.clone(),
            allow_connections_without_certificates: self.tls_allow_connections_without_certificates,
            allow_invalid_hostnames: self.tls_allow_invalid_hostnames,
        }
    }
}

/// `--sim-probe`: one line to stderr, and the exit code a healthcheck reads.
async fn run_probe(args: &Args) -> std::process::ExitCode {
    let timeout = Duration::from_millis(args.probe_timeout_ms);
    let tls = match Tls::probe_client(&args.tls()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("port {}: not healthy: {e}", args.port);
            return std::process::ExitCode::FAILURE;
        }
    };
    let tls = tls.as_ref();
    if args.probe_config {
        let config = match &args.key_file {
            // With authentication on, the config is read as a member reads it.
            Some(path) => match KeyFile::load(path) {
                Ok(key) => {
                    replset_sim::probe::current_config_with_key(args.port, key, timeout).await
                }
                Err(e) => {
                    eprintln!("port {}: no config: {e}", args.port);
                    Ok(None)
                }
            },
            None => replset_sim::probe::current_config(args.port, tls, timeout).await,
        };
        match config {
            Ok(Some(config)) => println!("{}", bson::Bson::Document(config).into_relaxed_extjson()),
            Ok(None) => {}
            Err(e) => eprintln!("port {}: no config: {e}", args.port),
        }
    }
    match replset_sim::probe::hello(args.port, tls, timeout).await {
        Ok(reply) => {
            if args.probe_config {
                println!(
                    "{}",
                    bson::Bson::Document(reply.clone()).into_relaxed_extjson()
                );
            }
            let health = Health::from_hello(&reply);
            eprintln!("port {}: {}", args.port, health.describe());
            if health.is_healthy() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("port {}: not healthy: {e}", args.port);
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    if args.probe {
        return Ok(run_probe(&args).await);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let bind_ip: IpAddr = if args.bind_ip_all {
        if args.ipv6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    } else {
        match &args.bind_ip {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(list) => {
                let first = list.split(',').next().unwrap_or("127.0.0.1").trim();
                if first == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    first
                        .parse()
                        .with_context(|| format!("--bind_ip {first} is not an IP address"))?
                }
            }
        }
    };
    let root_user = root_user_from_env()?;
    let key_file = match &args.key_file {
        Some(p) => Some(KeyFile::load(p).context("reading --keyFile")?),
        None => None,
    };
    let tls = Tls::load(&args.tls())
        .context("setting up TLS")?
        .map(Arc::new);
    if let Some(t) = &tls {
        tracing::info!(mode = %t.mode, "TLS on");
    }
    let security = Security {
        // The image adds --auth when it creates the root user.
        authorization: args.auth || root_user.is_some(),
        key_file,
    };
    let opts = NodeOptions {
        set_name: args.repl_set.clone(),
        bind_ip,
        port: args.port,
        advertised_host: args.advertise.clone(),
        host_aliases: Vec::new(),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
        election_timeout: Duration::from_millis(args.election_timeout_ms),
        security,
        tls,
        initial_sync: InitialSyncPace {
            floor: Duration::from_millis(args.initial_sync_floor_ms),
            per_mb: Duration::from_millis(args.initial_sync_ms_per_mb),
        },
    };
    let node = match &args.dbpath {
        Some(path) => {
            let defaults = replset_sim::config::Defaults {
                heartbeat_interval_millis: args.heartbeat_ms as i64,
                election_timeout_millis: args.election_timeout_ms as i64,
            };
            let (dir, durable) = DataDir::open(path, defaults)?;
            Node::start_on_disk(opts, dir, durable, Network::default(), History::default()).await
        }
        None => {
            Node::start(
                opts,
                DurableState::default(),
                Network::default(),
                History::default(),
            )
            .await
        }
    }
    .context("starting the member")?;
    let mut users: Vec<InitUser> = root_user
        .iter()
        .map(|(user, password)| InitUser::root(user, password))
        .collect();
    users.extend(init_users_from_env()?);
    if !users.is_empty() {
        node.bootstrap_users(&users)
            .map_err(|e| anyhow::anyhow!("creating the users of the first start: {e}"))?;
    }
    tracing::info!(me = node.host(), set = ?args.repl_set, "replset-sim ready (a simulator, not mongod)");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    node.kill();
    tracing::info!("shut down");
    Ok(std::process::ExitCode::SUCCESS)
}

/// `MONGO_INITDB_ROOT_USERNAME` and its password (`MONGO_INITDB_ROOT_PASSWORD`, or the
/// first line of the file `MONGO_INITDB_ROOT_PASSWORD_FILE` names, as the image's
/// `file_env` reads Docker secrets). A user name without a password, or both password
/// variables, is an error, as the entrypoint says.
/// The users of `MONGO_INITDB_USERS_FILE`, which the stack's init script creates in the mongo
/// image (see `replset_sim::auth::initdb`).
fn init_users_from_env() -> anyhow::Result<Vec<InitUser>> {
    match std::env::var_os(initdb::USERS_FILE_VAR).filter(|v| !v.is_empty()) {
        Some(path) => Ok(initdb::load(std::path::Path::new(&path))?),
        None => Ok(Vec::new()),
    }
}

fn root_user_from_env() -> anyhow::Result<Option<(String, String)>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let user = var("MONGO_INITDB_ROOT_USERNAME");
    let password = var("MONGO_INITDB_ROOT_PASSWORD");
    let file = var("MONGO_INITDB_ROOT_PASSWORD_FILE");
    let password = match (password, file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "both MONGO_INITDB_ROOT_PASSWORD and MONGO_INITDB_ROOT_PASSWORD_FILE are set (but they are exclusive)"
        ),
        (Some(p), None) => Some(p),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("reading MONGO_INITDB_ROOT_PASSWORD_FILE {f}"))?;
            Some(text.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, None) => None,
    };
    match (user, password) {
        (Some(u), Some(p)) => Ok(Some((u, p))),
        (None, None) => Ok(None),
        (Some(_), None) | (None, Some(_)) => anyhow::bail!(
            "MONGO_INITDB_ROOT_USERNAME and MONGO_INITDB_ROOT_PASSWORD (or _FILE) must be set together: both to create the root user, or neither"
        ),
    }
}
