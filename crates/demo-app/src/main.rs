//! `replset-demo-app`: the example application of the stack.
//!
//! It never names a MongoDB host. It reads the replica set's connection string from the store
//! (`<prefix>/replsets/<set>/uri`, kept by replset-reconciler), hands it to the official driver,
//! and lets the driver find the primary. `serve` writes and reads in a loop and logs one line per
//! round; `write` and `read` are one-shots for checks (`docker exec <app> replset-demo-app read
//! marker:...`).
//!
//! `workload` and `dump` are for a Jepsen-style fault-injection run, whose runner parses their
//! stdout (one JSON object a line; logs go to stderr):
//! * `workload --clients C --for DURATION [--pause-ms P] --run-id R` runs C logical clients,
//!   each with its own driver client on the URI from the store (re-read every 5 s and after a
//!   failed operation), for DURATION: majority inserts of `{_id: "R-c<k>-<n>", v, c: k}` (2/3
//!   of the operations) and majority reads of ids the client wrote, P ms apart. It prints one
//!   `{"type":"op",...}` line per operation with its outcome (`ok`, `fail`: certainly not
//!   applied, `info`: indeterminate), then one `{"type":"done","client":k,"ops":N}` per client,
//!   and exits 0. The driver's write retries are off unless `--retry-writes`.
//! * `dump --prefix R` prints `{"type":"final","id":...,"value":...}` for every document whose
//!   `_id` starts with R (read concern majority, primary), then `{"type":"final_done","count":N}`;
//!   it exits 1 if it cannot read them.
//!
//! workload.rs has the details and the outcome rules; the lines themselves are the records of
//! the `op-history` crate, which the runner reads with.

mod db;
mod store;
mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use backend_core::BackendUri;
use clap::{Parser, Subcommand};
use daemon::duration::{self, seconds_or_duration};
use daemon::LogFormat;

use crate::db::{Access, Db, DbError, Login, MongoTls, WriteRetries};
use crate::store::Store;
use crate::workload::{History, Plan};

/// The longest `dump` waits for its answer (the driver gives up on finding a primary after
/// 10 s; this bounds a member that accepted the query and then stopped answering).
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);

/// Uses a MongoDB replica set through the connection string that replset-reconciler publishes.
///
/// Every option can also be given as the environment variable shown.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// The store: etcd://host:port[,host:port...]/<prefix> or consul://host:port/<prefix>.
    #[arg(env = "DEMO_BACKEND", value_parser = backend_store::BackendUriParser)]
    backend: BackendUri,

    /// How to reach the store: tokens and TLS files, the same flags in every program.
    #[command(flatten)]
    store: backend_store::StoreArgs,

    #[command(subcommand)]
    command: Option<Command>,

    /// The replica set whose connection string to use.
    #[arg(long, env = "DEMO_REPLSET", default_value = "rs0", global = true)]
    replset: String,

    /// The database of the demo's documents.
    #[arg(long, env = "DEMO_DATABASE", default_value = "demo", global = true)]
    database: String,

    /// The collection of the demo's documents.
    #[arg(long, env = "DEMO_COLLECTION", default_value = "docs", global = true)]
    collection: String,

    /// How long to wait for the connection string to appear (`30s`, `2m`; a bare number is
    /// seconds; default: for ever with serve, 60s for write, read and dump; workload waits
    /// within its --for).
    #[arg(long, env = "DEMO_WAIT", global = true, value_parser = seconds_or_duration)]
    wait: Option<Duration>,

    /// Time between the rounds of serve (`5s`; a bare number is seconds), 1s to 1h.
    #[arg(long, env = "DEMO_INTERVAL", default_value = "5s", global = true, value_parser = parse_interval)]
    interval: Duration,

    /// The MongoDB user of the application (with --password-file); the published connection
    /// string carries no credentials.
    #[arg(long, env = "DEMO_USERNAME", global = true)]
    username: Option<String>,

    /// A file holding the user's password (a Docker secret); its first line is the password.
    #[arg(long, env = "DEMO_PASSWORD_FILE", global = true)]
    password_file: Option<std::path::PathBuf>,

    /// The database the user is defined in (default: --database).
    #[arg(long, env = "DEMO_AUTH_SOURCE", global = true)]
    auth_source: Option<String>,

    /// Reach MongoDB with TLS even if the connection string lacks tls=true.
    #[arg(long, env = "DEMO_MONGO_TLS", global = true)]
    mongo_tls: bool,

    /// The PEM of the CA that signed the members' certificates (a Docker secret); added to the
    /// published connection string, which never carries one. Implies --mongo-tls.
    #[arg(long, env = "DEMO_MONGO_TLS_CA_FILE", global = true)]
    mongo_tls_ca_file: Option<std::path::PathBuf>,

    /// Log format.
    #[arg(long, env = "DEMO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a marker document once, then write and read back a document every few seconds,
    /// logging one line per round (the default).
    Serve,
    /// Insert the document `<id>` with write concern majority; exit 1 if that fails.
    Write {
        id: String,
        /// The document's `value` field.
        #[arg(long, default_value = "")]
        value: String,
    },
    /// Print the document `<id>` (read concern majority) as one line of JSON; exit 1 if it is
    /// not there.
    Read { id: String },
    /// Run a fault-injection workload and print its history on stdout, one JSON line per
    /// operation: `{"type":"op","client":k,"op":"write"|"read","id","value","start_ms",
    /// "end_ms","outcome":"ok"|"fail"|"info","error"}`, then `{"type":"done","client":k,
    /// "ops":N}` per client; exit 0.
    ///
    /// Each of the clients has its own driver client on the URI from the store (re-read every
    /// 5 s and after a failed operation; store and connect failures are retried, never fatal).
    /// It writes (2/3 of the time) `{_id: "<run-id>-c<k>-<n>", v: "<id>-<8 hex>", c: k}` with
    /// w: majority (wtimeout 10s) or reads (read concern majority, primary) an id it wrote.
    /// Operations time out after 15s. "fail" means certainly not applied (no server selected,
    /// authentication failed, NotWritablePrimary, NotPrimaryNoSecondaryOk), "info" maybe
    /// applied (everything else); a failed read is "fail".
    Workload {
        /// How many concurrent logical clients.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        clients: u32,
        /// How long to start operations (`30s`, `5m`; a bare number is seconds), 1s to 24h.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_run_length)]
        run_for: Duration,
        /// The pause of each client between its operations, in milliseconds.
        #[arg(long, default_value_t = 50)]
        pause_ms: u64,
        /// The run's id: the prefix of every `_id` written (and dump's --prefix).
        #[arg(long, value_parser = parse_run_id)]
        run_id: String,
        /// Let the driver retry a write once (retryWrites). Off by default, so that an error
        /// answers the one attempt made; with retries NotWritablePrimary may answer the retry
        /// of an attempt that was applied, and is then reported as "info".
        #[arg(long)]
        retry_writes: bool,
    },
    /// Print every document whose `_id` starts with --prefix (read concern majority, primary),
    /// one JSON line each: `{"type":"final","id","value"}`, then `{"type":"final_done",
    /// "count":N}`. Exit 1 (no final line printed) if they cannot be read; retry then.
    Dump {
        /// The beginning of the ids (the workload's --run-id).
        #[arg(long)]
        prefix: String,
    },
}

fn parse_run_length(s: &str) -> Result<Duration, String> {
    let d = seconds_or_duration(s).map_err(|e| e.to_string())?;
    duration::within(d, Duration::from_secs(1), Duration::from_secs(24 * 3600))
}

fn parse_run_id(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err("the run id must be nonempty, without control characters".into());
    }
    Ok(s.to_string())
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = seconds_or_duration(s).map_err(|e| e.to_string())?;
    duration::within(d, Duration::from_secs(1), Duration::from_secs(3600))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    daemon::run("replset-demo-app", cli.log_format, run(cli))
}

/// The application's database, collection and user, from the flags.
fn access(cli: &Cli) -> anyhow::Result<Access> {
    let login = match (&cli.username, &cli.password_file) {
        (Some(username), Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --password-file {}", path.display()))?;
            let password = text.split(['\n', '\r']).next().unwrap_or("").to_string();
            anyhow::ensure!(
                !password.is_empty(),
                "--password-file {} is empty; write the password of {username} into it",
                path.display()
            );
            Some(Login {
                username: username.clone(),
                password,
                source: cli
                    .auth_source
                    .clone()
                    .unwrap_or_else(|| cli.database.clone()),
            })
        }
        (None, None) => None,
        _ => anyhow::bail!(
            "--username and --password-file go together (DEMO_USERNAME, DEMO_PASSWORD_FILE)"
        ),
    };
    if let Some(path) = &cli.mongo_tls_ca_file {
        // Checked now, so that a wrong path stops the start instead of every connection.
        std::fs::metadata(path)
            .with_context(|| format!("cannot read --mongo-tls-ca-file {}", path.display()))?;
    }
    Ok(Access {
        database: cli.database.clone(),
        collection: cli.collection.clone(),
        login,
        tls: MongoTls {
            enabled: cli.mongo_tls,
            ca_file: cli.mongo_tls_ca_file.clone(),
        },
    })
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let access = access(&cli)?;
    let store = Store::open(&cli.backend, &cli.store.options(&cli.backend)?).await?;
    let key = cli.backend.layout().replset_uri_key(&cli.replset);
    let one_shot_wait = Some(cli.wait.unwrap_or(Duration::from_secs(60)));
    let writer = std::env::var("HOSTNAME").unwrap_or_else(|_| "replset-demo-app".into());
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            // SIGTERM (docker stop, a service update) or Ctrl-C. In a FROM scratch image the
            // program is PID 1, which has no default signal handling: without this it would
            // not stop.
            let shutdown = daemon::shutdown_on_signals();
            let serve = async {
                let uri = store.wait_for_text(&key, cli.wait).await?;
                let app = App {
                    store,
                    key,
                    uri: String::new(),
                    db: None,
                    access,
                    writer,
                };
                app.serve(uri, cli.interval).await
            };
            tokio::select! {
                r = serve => r.map(|()| ExitCode::SUCCESS),
                () = shutdown.cancelled() => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Write { id, value } => {
            let uri = store.wait_for_text(&key, one_shot_wait).await?;
            let db = Db::connect(&uri, &access).await?;
            match db.write(&id, &value, &writer).await {
                Ok(()) => {
                    println!("wrote {id:?} with w: majority through {uri}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: cannot write {id:?} through {uri}: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Read { id } => {
            let uri = store.wait_for_text(&key, one_shot_wait).await?;
            let db = Db::connect(&uri, &access).await?;
            match db.read(&id).await {
                Ok(Some(doc)) => {
                    // One line of JSON (MongoDB's relaxed extended JSON), for scripts and tests.
                    println!("{}", bson::Bson::Document(doc).into_relaxed_extjson());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(None) => {
                    eprintln!("error: no document {id:?} (read concern majority) through {uri}");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("error: cannot read {id:?} through {uri}: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Workload {
            clients,
            run_for,
            pause_ms,
            run_id,
            retry_writes,
        } => {
            let plan = Plan {
                clients,
                duration: run_for,
                pause: Duration::from_millis(pause_ms),
                run_id,
                retries: if retry_writes {
                    WriteRetries::Driver
                } else {
                    WriteRetries::Off
                },
            };
            tracing::info!(?plan, %key, "workload starting");
            // SIGTERM ends the run early, with the done lines.
            let stop = daemon::shutdown_on_signals();
            let history = Arc::new(History::new(std::io::stdout()));
            workload::run(plan, Arc::new(store), key, access, history, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump { prefix } => {
            let uri = store.wait_for_text(&key, one_shot_wait).await?;
            let db = Db::connect(&uri, &access).await?;
            let docs = tokio::time::timeout(DUMP_TIMEOUT, db.values_with_prefix(&prefix))
                .await
                .map_err(|_| anyhow::anyhow!("no answer within {DUMP_TIMEOUT:?}"))
                .and_then(|r| r.map_err(anyhow::Error::from))
                .with_context(|| {
                    format!("cannot read the documents {prefix:?}* through {uri}; retry when the set has a primary")
                })?;
            workload::print_dump(&History::new(std::io::stdout()), &docs)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The serving application: its store, and a client on the current connection string.
#[derive(Debug)]
struct App {
    store: Store,
    key: String,
    uri: String,
    db: Option<Db>,
    access: Access,
    writer: String,
}

impl App {
    async fn serve(mut self, uri: String, interval: Duration) -> anyhow::Result<()> {
        self.use_uri(uri).await?;
        // The marker: written once per writer with w: majority; a restart finds it there.
        let marker = format!("marker:{}", self.writer);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut marker_written = false;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        for round in 1u64.. {
            ticker.tick().await;
            if !marker_written {
                match self
                    .db()?
                    .write(&marker, "written once at start", &self.writer)
                    .await
                {
                    Ok(()) | Err(DbError::Duplicate { .. }) => {
                        tracing::info!(id = %marker, uri = %self.uri, "marker written with w: majority");
                        marker_written = true;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot write the marker yet");
                        self.refresh_uri().await;
                        continue;
                    }
                }
            }
            let id = format!("round:{}:{started}:{round}", self.writer);
            match self.round(&id).await {
                Ok(primary) => tracing::info!(round, ok = true, %primary, %id, "round"),
                Err(e) => {
                    tracing::warn!(round, ok = false, error = %e, "round");
                    self.refresh_uri().await;
                }
            }
        }
        Ok(())
    }

    /// One round: a majority write, a majority read of it, and who the primary is.
    async fn round(&self, id: &str) -> anyhow::Result<String> {
        let db = self.db()?;
        let value = format!("round of {}", self.writer);
        db.write(id, &value, &self.writer).await?;
        let doc = db
            .read(id)
            .await?
            .context("the document just written is not there")?;
        if doc.get_str("value").ok() != Some(value.as_str()) {
            anyhow::bail!("the document read back differs: {doc}");
        }
        Ok(db.primary().await?)
    }

    fn db(&self) -> anyhow::Result<&Db> {
        self.db.as_ref().context("no database client")
    }

    async fn use_uri(&mut self, uri: String) -> anyhow::Result<()> {
        let db = Db::connect(&uri, &self.access).await?;
        tracing::info!(%uri, "using connection string");
        self.db = Some(db);
        self.uri = uri;
        Ok(())
    }

    /// After a failure: if the reconciler has published another connection string (members
    /// replaced), switch to it. The driver follows most changes by itself; this covers the case
    /// where none of the hosts it knew is left.
    async fn refresh_uri(&mut self) {
        match self.store.get_text(&self.key).await {
            Ok(Some(uri)) if uri != self.uri => {
                if let Err(e) = self.use_uri(uri).await {
                    tracing::warn!(error = %e, "cannot use the new connection string");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot re-read the connection string"),
        }
    }
}
