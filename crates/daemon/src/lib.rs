//! The start-up of the workspace's three programs (swarm-registrator, replset-reconciler,
//! replset-demo-app), written once; registrator-bench uses its runtime and signals too:
//!
//! * [`run`]: tracing, the runtime, the future of the program, and its exit code; an error is
//!   logged as one line and exits 1;
//! * [`LogFormat`]: `--log-format text|json` (JSON: one object per line, fields flattened);
//! * [`shutdown_on_signals`]: SIGTERM and SIGINT cancel one `CancellationToken`;
//! * [`duration`]: one syntax for durations on the command line (`500ms`, `15s`, `2m`, `1h`),
//!   with a bare number read in a unit each flag chooses (the bridge's older forms).
//!
//! Argument parsing stays in each binary (clap derive); this crate only gives the pieces.

pub mod duration;

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// How log lines are written (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (no colours with NO_COLOR=1).
    #[default]
    Text,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

/// Sets up `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
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

/// How many worker threads the programs use: they wait on the network, they do not compute.
pub const WORKER_THREADS: usize = 2;

/// The programs' runtime: multi-threaded, [`WORKER_THREADS`] workers, I/O and time enabled.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
}

/// Runs a program: tracing in `format`, a multi-threaded runtime, `program` to its end. Its
/// `Ok` is the exit code; an `Err` is logged (`"<name> stopped"`, with the error and its
/// causes) and exits 1.
pub fn run<F, E>(name: &str, format: LogFormat, program: F) -> ExitCode
where
    F: Future<Output = Result<ExitCode, E>>,
    E: Display,
{
    init_tracing(format);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(program) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} stopped");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled at the first SIGTERM or SIGINT (logged once). Call it inside the runtime.
/// A program that runs as PID 1 in a container has no default handling of these signals:
/// without this it would not stop.
pub fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping"),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("SIGINT received; stopping");
            }
        }
        token.cancel();
    });
    shutdown
}
