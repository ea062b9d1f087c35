//! The `docker-socket-proxy` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use daemon::LogFormat;
use docker_socket_proxy::{AllowList, ListenAddr, Listener, Proxy, Rule};
use tokio_util::task::TaskTracker;

/// Forwards to the Docker engine only the reads swarm-registrator makes (GET /_ping,
/// /version, /info, /containers/json, /containers/{id}/json, /networks/{id}, /events);
/// every other request, and any connection upgrade, is answered 403.
///
/// Run it next to the engine's socket, and point the bridge at the socket it creates
/// (DOCKER_HOST=unix:///run/docker-socket-proxy/docker.sock). Every option can also be given
/// as the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Where to listen: unix:///path.sock or tcp://ip:port; repeat the flag (or separate with
    /// commas) for several.
    #[arg(
        long = "listen",
        env = "SOCKET_PROXY_LISTEN",
        value_delimiter = ',',
        default_value = "unix:///run/docker-socket-proxy/docker.sock"
    )]
    listen: Vec<ListenAddr>,

    /// The engine's unix socket.
    #[arg(
        long,
        env = "SOCKET_PROXY_ENGINE",
        default_value = "/var/run/docker.sock"
    )]
    engine: PathBuf,

    /// Another read to forward, as "GET /path?param,param": {id} matches a container id or
    /// name; the query parameters named after "?" pass, "?*" lets any pass, none without "?".
    /// E.g. "GET /containers/{id}/logs?stdout,stderr,tail". Repeat the flag (or separate with
    /// ";") for several. Only GET and HEAD can be allowed.
    #[arg(long = "allow", env = "SOCKET_PROXY_ALLOW", value_delimiter = ';', value_parser = Rule::parse)]
    allow: Vec<Rule>,

    /// The permissions of the unix sockets it creates, in octal.
    #[arg(long, env = "SOCKET_PROXY_SOCKET_MODE", default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,

    /// Log format.
    #[arg(long, env = "SOCKET_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 660"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::run("docker-socket-proxy", cli.log_format, run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let shutdown = daemon::shutdown_on_signals();
    let proxy = Proxy::new(cli.engine, AllowList::for_bridge(&cli.allow));
    let mut listeners = Vec::new();
    for addr in &cli.listen {
        listeners.push(Listener::bind(addr, cli.socket_mode).await?);
    }
    tracing::info!(
        listen = %listeners.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        engine = %proxy.engine().display(),
        allow = %proxy.allow_list().summary(),
        "docker-socket-proxy started"
    );
    let tasks = TaskTracker::new();
    for listener in listeners {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move { proxy.serve(listener, shutdown).await });
    }
    tasks.close();
    tasks.wait().await;
    let stats = proxy.stats();
    tracing::info!(
        forwarded = stats.forwarded,
        refused = stats.refused,
        "docker-socket-proxy stopped"
    );
    Ok(ExitCode::SUCCESS)
}
