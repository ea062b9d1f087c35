//! Backend URIs, in the shape Registrator's users know:
//!
//! ```text
//! etcd://host:port[,host:port...]/<prefix>    etcd+https://host:port[,host:port...]/<prefix>
//! consul://host:port/<prefix>                 consul+https://host:port/<prefix>
//! ```
//!
//! A missing port gets the store's default (2379, 8500); a missing prefix gets
//! [`crate::layout::DEFAULT_PREFIX`]. A URI never carries credentials: `etcd://user:pass@host`
//! is refused, with an error that names the flags to use instead and never repeats the URI
//! (which would print the password).

use crate::layout::KeyLayout;

/// Which store a URI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Etcd,
    Consul,
}

impl StoreKind {
    pub fn default_port(self) -> u16 {
        match self {
            StoreKind::Etcd => 2379,
            StoreKind::Consul => 8500,
        }
    }

    /// The shortest session TTL the store accepts: etcd grants leases in whole seconds, Consul
    /// refuses session TTLs below 10 s.
    pub const fn min_session_ttl(self) -> std::time::Duration {
        match self {
            StoreKind::Etcd => std::time::Duration::from_secs(1),
            StoreKind::Consul => std::time::Duration::from_secs(10),
        }
    }

    /// The store's name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Etcd => "etcd",
            StoreKind::Consul => "consul",
        }
    }
}

/// A parsed backend URI: one variant per store, each with what that store needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendUri {
    Etcd(EtcdUri),
    Consul(ConsulUri),
}

/// `etcd://host:port[,host:port...]/<prefix>` or `etcd+https://...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUri {
    /// `host:port` pairs, in the order given.
    pub endpoints: Vec<String>,
    /// Whether to speak TLS (`etcd+https://`).
    pub tls: bool,
    pub layout: KeyLayout,
}

/// `consul://host:port/<prefix>` or `consul+https://host:port/<prefix>`: one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulUri {
    /// `host:port` of the agent.
    pub endpoint: String,
    /// Whether to speak TLS (`consul+https://`).
    pub tls: bool,
    pub layout: KeyLayout,
}

/// A URI that cannot be used, with what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("backend URI {uri:?} has no scheme; write it like etcd://127.0.0.1:2379/registrator or consul://127.0.0.1:8500/registrator")]
    NoScheme { uri: String },
    #[error(
        "backend URI scheme {scheme:?} is not supported; use etcd://, etcd+https://, consul:// or consul+https://"
    )]
    UnknownScheme { scheme: String },
    #[error("backend URI {uri:?} names no host; write it like {example}")]
    NoHost { uri: String, example: &'static str },
    #[error("backend URI endpoint {endpoint:?} has an invalid port; the port must be a number from 1 to 65535")]
    BadPort { endpoint: String },
    #[error("backend URI prefix {prefix:?} is invalid: {reason}")]
    BadPrefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("backend URI {uri:?}: {reason}")]
    Unsupported { uri: String, reason: &'static str },
    /// `scheme://user:password@host`: the URI (and so the password) is not repeated.
    #[error("the {scheme}:// backend URI cannot carry credentials (the part before '@'): a URI is printed in logs and seen in process arguments; write {scheme}://<host:port>/<prefix> and give {instead}")]
    Credentials {
        scheme: String,
        instead: &'static str,
    },
}

impl BackendUri {
    pub fn parse(uri: &str) -> Result<BackendUri, UriError> {
        refuse_credentials(uri)?;
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::NoScheme {
            uri: uri.to_string(),
        })?;
        let (kind, tls) = match scheme.to_ascii_lowercase().as_str() {
            "etcd" => (StoreKind::Etcd, false),
            "etcd+https" | "etcds" => (StoreKind::Etcd, true),
            "consul" => (StoreKind::Consul, false),
            "consul+https" | "consuls" => (StoreKind::Consul, true),
            other => {
                return Err(UriError::UnknownScheme {
                    scheme: other.to_string(),
                })
            }
        };
        let example = match kind {
            StoreKind::Etcd => "etcd://127.0.0.1:2379/registrator",
            StoreKind::Consul => "consul://127.0.0.1:8500/registrator",
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if prefix.contains('?') || prefix.contains('#') {
            return Err(UriError::BadPrefix {
                prefix: prefix.to_string(),
                reason: "query strings and fragments are not allowed",
            });
        }
        if prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(UriError::BadPrefix {
                prefix: prefix.to_string(),
                reason: "'.' and '..' segments are not allowed",
            });
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let host = host.trim();
            if host.is_empty() {
                return Err(UriError::NoHost {
                    uri: uri.to_string(),
                    example,
                });
            }
            endpoints.push(with_port(host, kind.default_port())?);
        }
        let layout = KeyLayout::new(prefix);
        match kind {
            StoreKind::Etcd => Ok(BackendUri::Etcd(EtcdUri {
                endpoints,
                tls,
                layout,
            })),
            StoreKind::Consul => match <[String; 1]>::try_from(endpoints) {
                Ok([endpoint]) => Ok(BackendUri::Consul(ConsulUri {
                    endpoint,
                    tls,
                    layout,
                })),
                Err(_) => Err(UriError::Unsupported {
                    uri: uri.to_string(),
                    reason: "a Consul URI names one agent (the local one); run a Consul agent on every node",
                }),
            },
        }
    }

    /// Whether the store is spoken to over TLS (`etcd+https://`, `consul+https://`).
    pub fn tls(&self) -> bool {
        match self {
            BackendUri::Etcd(u) => u.tls,
            BackendUri::Consul(u) => u.tls,
        }
    }

    /// Which store the URI names.
    pub fn kind(&self) -> StoreKind {
        match self {
            BackendUri::Etcd(_) => StoreKind::Etcd,
            BackendUri::Consul(_) => StoreKind::Consul,
        }
    }

    /// The key layout (the prefix) the URI names.
    pub fn layout(&self) -> &KeyLayout {
        match self {
            BackendUri::Etcd(u) => &u.layout,
            BackendUri::Consul(u) => &u.layout,
        }
    }

    /// The same store under another layout.
    pub fn with_layout(mut self, layout: KeyLayout) -> BackendUri {
        match &mut self {
            BackendUri::Etcd(u) => u.layout = layout,
            BackendUri::Consul(u) => u.layout = layout,
        }
        self
    }

    /// The endpoints, comma-separated, for logs and errors.
    pub fn endpoints(&self) -> String {
        match self {
            BackendUri::Etcd(u) => u.endpoints.join(","),
            BackendUri::Consul(u) => u.endpoint.clone(),
        }
    }
}

impl std::fmt::Display for BackendUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self {
            BackendUri::Etcd(EtcdUri { tls: false, .. }) => "etcd",
            BackendUri::Etcd(EtcdUri { tls: true, .. }) => "etcd+https",
            BackendUri::Consul(ConsulUri { tls: false, .. }) => "consul",
            BackendUri::Consul(ConsulUri { tls: true, .. }) => "consul+https",
        };
        write!(
            f,
            "{scheme}://{}/{}",
            self.endpoints(),
            self.layout().prefix()
        )
    }
}

impl std::str::FromStr for BackendUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendUri::parse(s)
    }
}

/// Refuses `scheme://user[:password]@host...` (and `user:password@host` without a scheme)
/// before anything else can echo the URI in an error.
fn refuse_credentials(uri: &str) -> Result<(), UriError> {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    let authority = rest.split('/').next().unwrap_or_default();
    if !authority.contains('@') {
        return Ok(());
    }
    let scheme = scheme.to_ascii_lowercase();
    let instead = if scheme.starts_with("consul") {
        "the ACL token with --consul-token-file (a file, such as a Docker secret)"
    } else {
        "the user with --etcd-username and the password with --etcd-password-file (a file, such as a Docker secret)"
    };
    let scheme = match scheme.as_str() {
        "" => "etcd".to_string(),
        s if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') => s.to_string(),
        _ => "etcd".to_string(),
    };
    Err(UriError::Credentials { scheme, instead })
}

/// Adds the default port to `host` unless it has one; checks a port that is there.
fn with_port(host: &str, default_port: u16) -> Result<String, UriError> {
    let bad = || UriError::BadPort {
        endpoint: host.to_string(),
    };
    // [v6]:port, [v6], host:port, host
    if let Some(rest) = host.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after.strip_prefix(':') {
            Some(port) => parse_port(port)
                .map(|p| format!("[{addr}]:{p}"))
                .ok_or_else(bad),
            None if after.is_empty() => Ok(format!("[{addr}]:{default_port}")),
            None => Err(bad()),
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') => {
            parse_port(port).map(|p| format!("{h}:{p}")).ok_or_else(bad)
        }
        Some(_) => Err(bad()), // a bare IPv6 address needs brackets
        None => Ok(format!("{host}:{default_port}")),
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_with_several_endpoints_and_prefix() {
        let u = BackendUri::parse("etcd://10.0.0.1:2379,10.0.0.2/prod/registrator").expect("valid");
        assert_eq!(u.kind(), StoreKind::Etcd);
        let BackendUri::Etcd(etcd) = &u else {
            panic!("an etcd URI: {u:?}")
        };
        assert_eq!(etcd.endpoints, vec!["10.0.0.1:2379", "10.0.0.2:2379"]);
        assert_eq!(u.layout().prefix(), "prod/registrator");
        assert_eq!(
            u.to_string(),
            "etcd://10.0.0.1:2379,10.0.0.2:2379/prod/registrator"
        );
    }

    #[test]
    fn defaults() {
        let u = BackendUri::parse("consul://localhost").expect("valid");
        assert_eq!(
            u,
            BackendUri::Consul(ConsulUri {
                endpoint: "localhost:8500".into(),
                tls: false,
                layout: KeyLayout::new("registrator"),
            })
        );
        let u = BackendUri::parse("consul+https://[::1]/x").expect("valid");
        assert_eq!(
            u,
            BackendUri::Consul(ConsulUri {
                endpoint: "[::1]:8500".into(),
                tls: true,
                layout: KeyLayout::new("x"),
            })
        );
        assert_eq!(u.to_string(), "consul+https://[::1]:8500/x");
    }

    #[test]
    fn errors_say_what_to_write() {
        let e = BackendUri::parse("127.0.0.1:2379").expect_err("no scheme");
        assert!(e.to_string().contains("etcd://"), "{e}");
        let refused = |uri: &str| BackendUri::parse(uri).expect_err(uri);
        assert!(matches!(
            refused("zk://h/p"),
            UriError::UnknownScheme { .. }
        ));
        assert!(matches!(refused("etcd:///p"), UriError::NoHost { .. }));
        assert!(matches!(
            refused("etcd://h:99999/p"),
            UriError::BadPort { .. }
        ));
        assert!(matches!(refused("etcd://h:0/p"), UriError::BadPort { .. }));
        assert!(matches!(refused("etcd://::1/p"), UriError::BadPort { .. }));
        assert!(matches!(
            refused("etcd://h/a/../b"),
            UriError::BadPrefix { .. }
        ));
        assert!(matches!(
            refused("consul://a,b/p"),
            UriError::Unsupported { .. }
        ));
    }

    #[test]
    fn etcd_over_tls() {
        let u = BackendUri::parse("etcd+https://10.0.0.1,10.0.0.2:2380/p").expect("valid");
        assert_eq!(
            u,
            BackendUri::Etcd(EtcdUri {
                endpoints: vec!["10.0.0.1:2379".into(), "10.0.0.2:2380".into()],
                tls: true,
                layout: KeyLayout::new("p"),
            })
        );
        assert!(u.tls());
        assert_eq!(u.to_string(), "etcd+https://10.0.0.1:2379,10.0.0.2:2380/p");
        assert!(!BackendUri::parse("etcd://h/p").expect("valid").tls());
    }

    #[test]
    fn credentials_in_a_uri_are_refused_without_repeating_them() {
        let cases = [
            (
                "etcd://root:hunter2-secret@10.0.0.1:2379/p",
                "--etcd-password-file",
            ),
            (
                "etcd+https://root:hunter2-secret@h,h2/p",
                "--etcd-password-file",
            ),
            ("ETCD://root:hunter2-secret@h", "--etcd-password-file"),
            (
                "consul://hunter2-secret@127.0.0.1:8500/p",
                "--consul-token-file",
            ),
            ("root:hunter2-secret@127.0.0.1:2379", "--etcd-password-file"),
            ("zk://root:hunter2-secret@h/p", "--etcd-password-file"),
        ];
        for (uri, flag) in cases {
            let e = BackendUri::parse(uri).expect_err(uri);
            let shown = format!("{e} {e:?}");
            assert!(matches!(e, UriError::Credentials { .. }), "{uri}: {shown}");
            assert!(
                !shown.contains("hunter2"),
                "{uri}: the secret is shown: {shown}"
            );
            assert!(!shown.contains("root"), "{uri}: the user is shown: {shown}");
            assert!(shown.contains(flag), "{uri}: names {flag}: {shown}");
        }
        // An '@' in the prefix is not a credential.
        let u = BackendUri::parse("etcd://h/team@site").expect("an '@' in the prefix");
        assert_eq!(u.layout().prefix(), "team@site");
    }
}
