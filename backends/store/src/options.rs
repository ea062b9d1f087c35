//! How every program is told how to reach its store, beyond the URI: one set of flags and
//! environment variables ([`StoreArgs`], flattened into each binary's clap parser), read into
//! one [`StoreOptions`] the same way everywhere.
//!
//! The environment variables are Consul's own (`CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`,
//! `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`), so a node set up for the
//! `consul` command is set up for these programs too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backend_core::{BackendUri, Secret};

/// The environment variable that holds a Consul ACL token (a file is better: see
/// `--consul-token-file`).
pub const CONSUL_HTTP_TOKEN: &str = "CONSUL_HTTP_TOKEN";

/// The store flags, the same in every binary (`#[command(flatten)] store: StoreArgs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Consul: a file holding the ACL token (a Docker secret); beats CONSUL_HTTP_TOKEN.
    #[arg(
        long,
        env = "CONSUL_HTTP_TOKEN_FILE",
        value_name = "PATH",
        global = true
    )]
    pub consul_token_file: Option<PathBuf>,

    /// The bridge's earlier variable for --consul-token-file, still read.
    #[arg(
        long = "registrator-consul-token-file",
        env = "REGISTRATOR_CONSUL_TOKEN_FILE",
        hide = true,
        global = true
    )]
    pub legacy_consul_token_file: Option<PathBuf>,

    /// Consul over consul+https://: a PEM file of the CA that signed the agent's certificate;
    /// when given, only it is trusted.
    #[arg(long, env = "CONSUL_CACERT", value_name = "PATH", global = true)]
    pub consul_cacert: Option<PathBuf>,

    /// Consul over consul+https://: a PEM client certificate, for an agent that verifies
    /// clients (with --consul-client-key).
    #[arg(long, env = "CONSUL_CLIENT_CERT", value_name = "PATH", global = true)]
    pub consul_client_cert: Option<PathBuf>,

    /// Consul over consul+https://: the PEM key of --consul-client-cert.
    #[arg(long, env = "CONSUL_CLIENT_KEY", value_name = "PATH", global = true)]
    pub consul_client_key: Option<PathBuf>,
}

/// Options that cannot work, with what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("{option} is for a Consul store, but the backend URI is {uri}; remove it or use a consul:// URI")]
    NeedsConsul { option: &'static str, uri: String },
    #[error("cannot read {option} {path}: {source}")]
    ReadSecret {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {path} is empty; write the token into it, or leave the option out")]
    EmptySecret { option: &'static str, path: PathBuf },
}

/// What a store needs besides its URI. Built by [`StoreArgs::options`] in the binaries; tests
/// build it directly (`StoreOptions::default()` and the fields they need).
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Consul's ACL token.
    pub consul_token: Option<Secret>,
    /// Consul TLS: the CA to trust, and a client identity (certificate and key together).
    pub consul_ca_cert: Option<PathBuf>,
    pub consul_client_cert: Option<PathBuf>,
    pub consul_client_key: Option<PathBuf>,
    /// Consul publishing (the bridge's `--no-consul-kv`, `--no-consul-catalog`,
    /// `--consul-deregister-after`): whether records go to KV, to the catalog, and how long a
    /// catalog service may stay critical before Consul removes it.
    pub consul_kv: bool,
    pub consul_catalog: bool,
    pub consul_deregister_critical_after: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            consul_token: None,
            consul_ca_cert: None,
            consul_client_cert: None,
            consul_client_key: None,
            consul_kv: true,
            consul_catalog: true,
            consul_deregister_critical_after: Duration::from_secs(60),
        }
    }
}

impl StoreArgs {
    /// The token file given, and the name to report it under.
    fn token_file(&self) -> Option<(&'static str, &Path)> {
        match (&self.consul_token_file, &self.legacy_consul_token_file) {
            (Some(path), _) => Some(("--consul-token-file", path)),
            (None, Some(path)) => Some(("REGISTRATOR_CONSUL_TOKEN_FILE", path)),
            (None, None) => None,
        }
    }

    /// Checks that the options fit the store the URI names, before anything is read.
    pub fn check(&self, uri: &BackendUri) -> Result<(), OptionsError> {
        if let (Some((option, _)), BackendUri::Etcd(_)) = (self.token_file(), uri) {
            return Err(OptionsError::NeedsConsul {
                option,
                uri: uri.to_string(),
            });
        }
        Ok(())
    }

    /// The options, with the token read from its file, or else from `CONSUL_HTTP_TOKEN`.
    pub fn options(&self, uri: &BackendUri) -> Result<StoreOptions, OptionsError> {
        self.options_with_env(uri, |name| std::env::var(name).ok())
    }

    /// [`StoreArgs::options`] with the environment given by `env` (for tests).
    pub fn options_with_env(
        &self,
        uri: &BackendUri,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<StoreOptions, OptionsError> {
        self.check(uri)?;
        if !matches!(uri, BackendUri::Consul(_)) {
            return Ok(StoreOptions::default());
        }
        let consul_token = match self.token_file() {
            Some((option, path)) => {
                let secret =
                    Secret::from_file(path, option).map_err(|source| OptionsError::ReadSecret {
                        option,
                        path: path.to_path_buf(),
                        source,
                    })?;
                if secret.is_empty() {
                    return Err(OptionsError::EmptySecret {
                        option,
                        path: path.to_path_buf(),
                    });
                }
                Some(secret)
            }
            None => env(CONSUL_HTTP_TOKEN)
                .map(|t| Secret::new(t, CONSUL_HTTP_TOKEN))
                .filter(|t| !t.is_empty()),
        };
        Ok(StoreOptions {
            consul_token,
            consul_ca_cert: self.consul_cacert.clone(),
            consul_client_cert: self.consul_client_cert.clone(),
            consul_client_key: self.consul_client_key.clone(),
            ..StoreOptions::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        uri: String,
        #[command(flatten)]
        store: StoreArgs,
    }

    fn parse(args: &[&str]) -> (BackendUri, StoreArgs) {
        let cli = Cli::try_parse_from(std::iter::once("prog").chain(args.iter().copied()))
            .expect("parses");
        (BackendUri::parse(&cli.uri).expect("uri"), cli.store)
    }

    /// `consul://127.0.0.1:8500/p --consul-token-file <path>`.
    fn with_token_file(path: &str) -> (BackendUri, StoreArgs) {
        parse(&["consul://127.0.0.1:8500/p", "--consul-token-file", path])
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("store-options-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write");
        path
    }

    #[test]
    fn a_token_file_beats_the_environment_and_names_its_source() {
        let path = temp_file("token", "from-file\n");
        let (uri, args) = with_token_file(path.to_str().expect("utf-8"));
        let options = args
            .options_with_env(&uri, |_| Some("from-env".into()))
            .expect("options");
        let token = options.consul_token.expect("a token");
        assert_eq!(token.expose(), "from-file");
        assert_eq!(
            token.source(),
            format!("--consul-token-file {}", path.display())
        );
        let (uri, args) = parse(&["consul://127.0.0.1:8500/p"]);
        let options = args
            .options_with_env(&uri, |name| {
                (name == CONSUL_HTTP_TOKEN).then(|| "from-env".into())
            })
            .expect("options");
        let token = options.consul_token.expect("a token");
        assert_eq!(
            (token.expose(), token.source()),
            ("from-env", CONSUL_HTTP_TOKEN)
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bad_token_files_are_clear_errors() {
        let etcd_with_a_consul_option = ["etcd://127.0.0.1:2379/p", "--consul-token-file", "/x"];
        let (uri, args) = parse(&etcd_with_a_consul_option);
        let err = args.check(&uri).expect_err("a Consul option with etcd");
        assert!(err.to_string().contains("consul://"), "{err}");

        let (uri, args) = with_token_file("/nonexistent/token");
        let err = args.options_with_env(&uri, |_| None).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/token"), "{err}");

        let path = temp_file("empty", "\n");
        let (uri, args) = with_token_file(path.to_str().expect("utf-8"));
        let err = args.options_with_env(&uri, |_| None).expect_err("empty");
        assert!(matches!(err, OptionsError::EmptySecret { .. }), "{err}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn tls_files_are_passed_on() {
        let (uri, args) = parse(&[
            "consul+https://127.0.0.1:8501/p",
            "--consul-cacert",
            "/ca.pem",
            "--consul-client-cert",
            "/c.pem",
            "--consul-client-key",
            "/k.pem",
        ]);
        let options = args.options_with_env(&uri, |_| None).expect("options");
        assert_eq!(
            options.consul_ca_cert.as_deref(),
            Some(Path::new("/ca.pem"))
        );
        assert_eq!(
            options.consul_client_cert.as_deref(),
            Some(Path::new("/c.pem"))
        );
        assert_eq!(
            options.consul_client_key.as_deref(),
            Some(Path::new("/k.pem"))
        );
    }
}
