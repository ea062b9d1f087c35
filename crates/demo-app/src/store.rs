//! Where the application finds its database: the connection string that replset-reconciler
//! keeps at `<prefix>/replsets/<set>/uri`, in etcd or Consul.

use std::time::{Duration, Instant};

use backend_core::{BackendError, BackendUri, Backoff, Coordinator, StoreKind};
use backend_etcd::EtcdStore;

/// The key-value store named by the backend URI.
#[derive(Debug)]
pub enum Store {
    Etcd(Box<EtcdStore>),
    Consul(Box<backend_consul::ConsulStore>),
}

/// Why no connection string could be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot set up the {store} client: {detail}")]
    Setup { store: &'static str, detail: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{key} is not UTF-8 text")]
    NotText { key: String },
    #[error("no connection string at {key} after {waited:?} (last problem: {last}); is replset-reconciler running and has it initiated the set?")]
    Timeout {
        key: String,
        waited: Duration,
        last: String,
    },
}

impl Store {
    /// A client for the store; no connection is made until the first read.
    pub async fn open(uri: &BackendUri) -> Result<Store, StoreError> {
        match uri.kind {
            StoreKind::Etcd => EtcdStore::connect(&uri.endpoints, uri.layout.clone())
                .await
                .map(|s| Store::Etcd(Box::new(s)))
                .map_err(|e| StoreError::Setup {
                    store: "etcd",
                    detail: e.to_string(),
                }),
            StoreKind::Consul => {
                let endpoint = uri.endpoints.first().cloned().unwrap_or_default();
                let options = backend_consul::ConsulOptions {
                    token: std::env::var("CONSUL_HTTP_TOKEN")
                        .ok()
                        .filter(|t| !t.trim().is_empty())
                        .map(|t| backend_consul::Token::new(t, "CONSUL_HTTP_TOKEN")),
                    ca_cert: std::env::var_os("CONSUL_CACERT").map(Into::into),
                    ..Default::default()
                };
                backend_consul::ConsulStore::new(&endpoint, uri.tls, uri.layout.clone(), options)
                    .map(|s| Store::Consul(Box::new(s)))
                    .map_err(|e| StoreError::Setup {
                        store: "Consul",
                        detail: e.to_string(),
                    })
            }
        }
    }

    /// The value at `key`, if there is one.
    pub async fn get_text(&self, key: &str) -> Result<Option<String>, StoreError> {
        let value = match self {
            Store::Etcd(s) => s.get_value(key).await?,
            Store::Consul(s) => s.get_value(key).await?,
        };
        value
            .map(|v| {
                String::from_utf8(v).map_err(|_| StoreError::NotText {
                    key: key.to_string(),
                })
            })
            .transpose()
            .map(|v| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()))
    }

    /// Waits, with backoff, until `key` holds a value, for at most `limit` (`None`: for ever).
    pub async fn wait_for_text(
        &self,
        key: &str,
        limit: Option<Duration>,
    ) -> Result<String, StoreError> {
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        loop {
            let last = match self.get_text(key).await {
                Ok(Some(text)) => return Ok(text),
                Ok(None) => "the key does not exist yet".to_string(),
                Err(e) => e.to_string(),
            };
            let delay = backoff.next_delay(rand::random::<f64>());
            if let Some(limit) = limit {
                if start.elapsed() + delay > limit {
                    return Err(StoreError::Timeout {
                        key: key.to_string(),
                        waited: start.elapsed(),
                        last,
                    });
                }
            }
            tracing::info!(key, retry_in_ms = delay.as_millis() as u64, problem = %last, "waiting for the connection string");
            tokio::time::sleep(delay).await;
        }
    }
}
