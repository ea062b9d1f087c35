//! The HTTP side: one [`Client`] of one agent (address, token, TLS), how a request's failure
//! maps onto [`BackendError`], and the configuration errors found before any request.

use std::path::PathBuf;
use std::time::Duration;

use backend_core::{error_chain, is_tls_failure, BackendError};
use reqwest::StatusCode;

use crate::STORE;

/// How long one request may take, blocking queries aside.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An ACL token and where it came from. Its value is never printed.
pub type Token = backend_core::Secret;

/// How to reach Consul and what to publish there.
#[derive(Debug, Clone)]
pub struct ConsulOptions {
    pub token: Option<Token>,
    /// `CONSUL_CACERT`: a PEM file of the CA that signed the agent's certificate.
    pub ca_cert: Option<PathBuf>,
    /// `CONSUL_CLIENT_CERT` and `CONSUL_CLIENT_KEY`: PEM files for mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Write the records into KV.
    pub kv: bool,
    /// Register the records as agent services.
    pub catalog: bool,
    /// How long a catalog service may stay critical before Consul removes it (at least 1 m).
    pub deregister_critical_after: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            token: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
            kv: true,
            catalog: true,
            deregister_critical_after: Duration::from_secs(60),
        }
    }
}

/// A configuration that cannot work, found before any request.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a valid PEM file: {detail}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be given together")]
    HalfIdentity,
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        what,
        path: path.clone(),
        source,
    })
}

/// The HTTP client of one agent, with its token. Cheap to clone (the connection pool is
/// shared), so background tasks (renewals, watches) hold their own copy; it holds no session
/// state. Its `Debug` shows the token redacted.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    pub(crate) endpoint: String,
    token: Option<Token>,
}

impl Client {
    /// A client for the agent at `endpoint` (`host:port`), over HTTPS when `tls`, with the
    /// token and TLS files of `options`.
    pub fn new(endpoint: &str, tls: bool, options: &ConsulOptions) -> Result<Client, ConfigError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        if let Some(path) = &options.ca_cert {
            let pem = read("CONSUL_CACERT", path)?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ConfigError::Pem {
                    what: "CONSUL_CACERT",
                    path: path.clone(),
                    detail: error_chain(&e),
                })?;
            if certs.is_empty() {
                return Err(ConfigError::Pem {
                    what: "CONSUL_CACERT",
                    path: path.clone(),
                    detail: "it holds no certificate".into(),
                });
            }
            // Like Consul's own clients: the given CA, and only it.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        match (&options.client_cert, &options.client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = read("CONSUL_CLIENT_CERT", cert)?;
                pem.push(b'\n');
                pem.extend(read("CONSUL_CLIENT_KEY", key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| ConfigError::Pem {
                    what: "CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY",
                    path: cert.clone(),
                    detail: e.to_string(),
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err(ConfigError::HalfIdentity),
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError::Client(error_chain(&e)))?;
        let scheme = if tls { "https" } else { "http" };
        Ok(Client {
            http,
            base: format!("{scheme}://{endpoint}"),
            endpoint: endpoint.to_string(),
            token: options.token.clone(),
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT);
        match &self.token {
            Some(t) => rb.header("X-Consul-Token", t.expose()),
            None => rb,
        }
    }

    /// Sends a request; maps transport errors and refusals. Returns the response for any
    /// 2xx and for 404 (which callers interpret).
    pub(crate) async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, BackendError> {
        send(rb, what, &self.endpoint, self.token.as_ref()).await
    }

    /// Decodes a JSON answer; one that does not decode is `Unavailable` (a proxy's page, a
    /// truncated body), saying what was asked.
    pub(crate) async fn decode<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
        what: &str,
    ) -> Result<T, BackendError> {
        resp.json().await.map_err(|e| BackendError::Unavailable {
            store: STORE,
            endpoints: self.endpoint.clone(),
            detail: format!("{what}: unreadable answer: {e}"),
            source: Some(Box::new(e)),
        })
    }
}

async fn send(
    rb: reqwest::RequestBuilder,
    what: &str,
    endpoint: &str,
    token: Option<&Token>,
) -> Result<reqwest::Response, BackendError> {
    let resp = rb.send().await.map_err(|e| {
        let chain = error_chain(&e);
        if is_tls_failure(&e) {
            // Retrying cannot fix a certificate: say what to check, and stop.
            BackendError::Rejected {
                store: STORE,
                detail: format!(
                    "{what}: TLS handshake with {endpoint} failed: {chain}; check CONSUL_CACERT \
                     (the CA of the agent's certificate) and CONSUL_CLIENT_CERT / CONSUL_CLIENT_KEY"
                ),
                source: Some(Box::new(e)),
            }
        } else {
            BackendError::Unavailable {
                store: STORE,
                endpoints: endpoint.to_string(),
                detail: format!("{what}: {chain}"),
                source: Some(Box::new(e)),
            }
        }
    })?;
    match resp.status() {
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => {
            let body = resp.text().await.unwrap_or_default();
            let source = token
                .map(|t| format!("the ACL token from {}", t.source()))
                .unwrap_or_else(|| {
                    "no ACL token (set CONSUL_HTTP_TOKEN or --consul-token-file)".to_string()
                });
            Err(BackendError::Rejected {
                store: STORE,
                detail: format!("{what}: permission denied with {source}: {}", body.trim()),
                source: None,
            })
        }
        s if s.is_server_error() => {
            let body = resp.text().await.unwrap_or_default();
            Err(BackendError::Unavailable {
                store: STORE,
                endpoints: endpoint.to_string(),
                detail: format!("{what}: {s}: {}", body.trim()),
                source: None,
            })
        }
        _ => Ok(resp),
    }
}

pub(crate) async fn expect_success(
    resp: reqwest::Response,
    what: &str,
) -> Result<(), BackendError> {
    successful(resp, what).await.map(drop)
}

/// The response of a 2xx answer; any other is `Rejected` with its status and body.
pub(crate) async fn successful(
    resp: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response, BackendError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(BackendError::Rejected {
        store: STORE,
        detail: format!("{what}: {status}: {}", body.trim()),
        source: None,
    })
}

/// An answer's `X-Consul-Index` (0 when it has none).
pub(crate) fn consul_index(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}
