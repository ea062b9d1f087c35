//! How every program is told how to reach its store, beyond the URI: one set of flags and
//! environment variables ([`StoreArgs`], flattened into each binary's clap parser), read into
//! one [`StoreOptions`] the same way everywhere.
//!
//! The environment variables are Consul's own (`CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE`,
//! `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`), so a node set up for the
//! `consul` command is set up for these programs too; etcd's TLS files are etcdctl's
//! (`ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`). Secrets (a token, a password) are only
//! ever read from files, never from a flag or a URI: both are printed in logs and seen in
//! process listings.

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

    /// etcd over etcd+https:// (required there): a PEM file of the CA that signed etcd's
    /// certificate; only it is trusted.
    #[arg(long, env = "ETCDCTL_CACERT", value_name = "PATH", global = true)]
    pub etcd_ca_file: Option<PathBuf>,

    /// etcd over etcd+https://: a PEM client certificate, for an etcd started with
    /// --client-cert-auth (with --etcd-client-key).
    #[arg(long, env = "ETCDCTL_CERT", value_name = "PATH", global = true)]
    pub etcd_client_cert: Option<PathBuf>,

    /// etcd over etcd+https://: the PEM key of --etcd-client-cert.
    #[arg(long, env = "ETCDCTL_KEY", value_name = "PATH", global = true)]
    pub etcd_client_key: Option<PathBuf>,

    /// etcd with authentication enabled: the user to authenticate as (with
    /// --etcd-password-file).
    #[arg(long, env = "ETCD_USERNAME", value_name = "NAME", global = true)]
    pub etcd_username: Option<String>,

    /// etcd with authentication enabled: a file holding --etcd-username's password (a Docker
    /// secret).
    #[arg(long, env = "ETCD_PASSWORD_FILE", value_name = "PATH", global = true)]
    pub etcd_password_file: Option<PathBuf>,
}

/// Options that cannot work, with what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("{option} is for a Consul store, but the backend URI is {uri}; remove it or use a consul:// URI")]
    NeedsConsul { option: &'static str, uri: String },
    #[error("{option} is for an etcd store, but the backend URI is {uri}; remove it or use an etcd:// or etcd+https:// URI")]
    NeedsEtcd { option: &'static str, uri: String },
    #[error("{option} is for TLS, but the backend URI {uri} is plain etcd://; write it as etcd+https://, or remove the option")]
    NeedsTls { option: &'static str, uri: String },
    #[error("the backend URI {uri} speaks TLS to etcd: give --etcd-ca-file, the PEM file of the CA that signed etcd's certificate")]
    NeedsCa { uri: String },
    #[error("{given} needs {missing} too")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("cannot read {option} {path}: {source}")]
    ReadSecret {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{option} {path} is empty; write the secret into it, or leave the option out")]
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
    /// etcd TLS: the CA to trust, and a client identity (certificate and key together).
    pub etcd_ca_file: Option<PathBuf>,
    pub etcd_client_cert: Option<PathBuf>,
    pub etcd_client_key: Option<PathBuf>,
    /// etcd authentication: the user and its password.
    pub etcd_user: Option<(String, Secret)>,
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
            etcd_ca_file: None,
            etcd_client_cert: None,
            etcd_client_key: None,
            etcd_user: None,
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

    /// The etcd options given, by flag name.
    fn etcd_options(&self) -> [(&'static str, bool); 5] {
        [
            ("--etcd-ca-file", self.etcd_ca_file.is_some()),
            ("--etcd-client-cert", self.etcd_client_cert.is_some()),
            ("--etcd-client-key", self.etcd_client_key.is_some()),
            ("--etcd-username", self.etcd_username.is_some()),
            ("--etcd-password-file", self.etcd_password_file.is_some()),
        ]
    }

    /// Checks that the options fit the store the URI names, before anything is read.
    pub fn check(&self, uri: &BackendUri) -> Result<(), OptionsError> {
        let given = |(option, set): &(&'static str, bool)| set.then_some(*option);
        match uri {
            BackendUri::Etcd(etcd) => {
                if let Some((option, _)) = self.token_file() {
                    return Err(OptionsError::NeedsConsul {
                        option,
                        uri: uri.to_string(),
                    });
                }
                if !etcd.tls {
                    if let Some(option) = self.etcd_options()[..3].iter().find_map(given) {
                        return Err(OptionsError::NeedsTls {
                            option,
                            uri: uri.to_string(),
                        });
                    }
                } else if self.etcd_ca_file.is_none() {
                    return Err(OptionsError::NeedsCa {
                        uri: uri.to_string(),
                    });
                }
                let pairs = [
                    (
                        ("--etcd-client-cert", self.etcd_client_cert.is_some()),
                        ("--etcd-client-key", self.etcd_client_key.is_some()),
                    ),
                    (
                        ("--etcd-username", self.etcd_username.is_some()),
                        ("--etcd-password-file", self.etcd_password_file.is_some()),
                    ),
                ];
                for (a, b) in pairs {
                    for ((given, has), (missing, has_other)) in [(a, b), (b, a)] {
                        if has && !has_other {
                            return Err(OptionsError::Incomplete { given, missing });
                        }
                    }
                }
            }
            BackendUri::Consul(_) => {
                if let Some(option) = self.etcd_options().iter().find_map(given) {
                    return Err(OptionsError::NeedsEtcd {
                        option,
                        uri: uri.to_string(),
                    });
                }
            }
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
        if let BackendUri::Etcd(_) = uri {
            let etcd_user = match (&self.etcd_username, &self.etcd_password_file) {
                (Some(name), Some(path)) => {
                    Some((name.clone(), read_secret("--etcd-password-file", path)?))
                }
                _ => None,
            };
            return Ok(StoreOptions {
                etcd_ca_file: self.etcd_ca_file.clone(),
                etcd_client_cert: self.etcd_client_cert.clone(),
                etcd_client_key: self.etcd_client_key.clone(),
                etcd_user,
                ..StoreOptions::default()
            });
        }
        let consul_token = match self.token_file() {
            Some((option, path)) => Some(read_secret(option, path)?),
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

/// The secret in the file at `path`, given by `option`; an empty file is an error.
fn read_secret(option: &'static str, path: &Path) -> Result<Secret, OptionsError> {
    let secret = Secret::from_file(path, option).map_err(|source| OptionsError::ReadSecret {
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
    Ok(secret)
}

/// The value parser of every program's backend URI argument. Unlike `BackendUri::parse`
/// given to clap directly, its errors never repeat the value: a URI someone wrote with a
/// password in it (`etcd://user:pass@host`) is refused without printing the password.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackendUriParser;

impl clap::builder::TypedValueParser for BackendUriParser {
    type Value = BackendUri;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<BackendUri, clap::Error> {
        let name = arg.map_or_else(|| "backend".into(), |a| a.get_id().to_string());
        let invalid = |message: String| {
            cmd.clone().error(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for <{}>: {message}", name.to_uppercase()),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("the backend URI is not UTF-8".into()))?;
        BackendUri::parse(text).map_err(|e| invalid(e.to_string()))
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
    fn etcd_tls_and_user_are_read_from_files() {
        let password = temp_file("etcd-password", "  p4ss-w0rd\n");
        let password = password.to_str().expect("utf-8");
        let (uri, args) = parse(&[
            "etcd+https://127.0.0.1:2379/p",
            "--etcd-ca-file",
            "/ca.pem",
            "--etcd-client-cert",
            "/c.pem",
            "--etcd-client-key",
            "/k.pem",
            "--etcd-username",
            "bridge",
            "--etcd-password-file",
            password,
        ]);
        let options = args.options_with_env(&uri, |_| None).expect("options");
        assert_eq!(options.etcd_ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(
            options.etcd_client_cert.as_deref(),
            Some(Path::new("/c.pem"))
        );
        assert_eq!(
            options.etcd_client_key.as_deref(),
            Some(Path::new("/k.pem"))
        );
        let (user, secret) = options.etcd_user.expect("a user");
        assert_eq!((user.as_str(), secret.expose()), ("bridge", "p4ss-w0rd"));
        assert_eq!(secret.source(), format!("--etcd-password-file {password}"));
        assert!(!format!("{args:?}").contains("p4ss-w0rd"));
        let _ = std::fs::remove_file(password);
    }

    #[test]
    fn etcd_options_that_cannot_work_say_what_to_give() {
        let refused = |args: &[&str]| {
            let (uri, store) = parse(args);
            store
                .options_with_env(&uri, |_| None)
                .expect_err("refused")
                .to_string()
        };
        let e = refused(&["etcd+https://h/p"]);
        assert!(e.contains("--etcd-ca-file"), "{e}");
        let e = refused(&["etcd://h/p", "--etcd-ca-file", "/ca.pem"]);
        assert!(e.contains("etcd+https://"), "{e}");
        let e = refused(&["etcd://h/p", "--etcd-username", "u"]);
        assert!(e.contains("--etcd-password-file"), "{e}");
        let e = refused(&["etcd://h/p", "--etcd-password-file", "/pw"]);
        assert!(e.contains("--etcd-username"), "{e}");
        let e = refused(&[
            "etcd+https://h/p",
            "--etcd-ca-file",
            "/ca.pem",
            "--etcd-client-cert",
            "/c.pem",
        ]);
        assert!(e.contains("--etcd-client-key"), "{e}");
        let e = refused(&["consul://h/p", "--etcd-username", "u"]);
        assert!(e.contains("etcd://"), "{e}");
        let e = refused(&[
            "etcd://h/p",
            "--etcd-username",
            "u",
            "--etcd-password-file",
            "/nonexistent/pw",
        ]);
        assert!(e.contains("/nonexistent/pw"), "{e}");
    }

    /// The backend URI argument of every program, parsed as the programs do.
    #[derive(Debug, Parser)]
    struct Program {
        #[arg(env = "STORE_OPTIONS_TEST_BACKEND", value_parser = BackendUriParser)]
        backend: BackendUri,
    }

    #[test]
    fn a_password_in_the_uri_is_refused_and_never_shown() {
        for uri in [
            "etcd://root:hunter2-secret@127.0.0.1:2379/p",
            "etcd+https://root:hunter2-secret@127.0.0.1:2379/p",
        ] {
            let err = Program::try_parse_from(["prog", uri]).expect_err("refused");
            let shown = format!("{err} {err:?} {}", err.render());
            assert!(!shown.contains("hunter2"), "the password is shown: {shown}");
            assert!(shown.contains("--etcd-password-file"), "{shown}");
            assert!(shown.contains("--etcd-username"), "{shown}");
        }
        let err = Program::try_parse_from(["prog", "consul://t0ken-secret@h/p"]).expect_err("x");
        assert!(!err.to_string().contains("t0ken-secret"), "{err}");
        assert!(err.to_string().contains("--consul-token-file"), "{err}");
        // Other mistakes are still explained.
        let err = Program::try_parse_from(["prog", "zk://h/p"]).expect_err("a bad scheme");
        assert!(err.to_string().contains("etcd+https://"), "{err}");
        let ok = Program::try_parse_from(["prog", "etcd+https://h/p"]).expect("valid");
        assert!(ok.backend.tls());
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
