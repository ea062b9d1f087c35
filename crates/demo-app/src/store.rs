//! Where the application finds its database: the connection string that replset-reconciler
//! keeps at `<prefix>/replsets/<set>/uri`, in etcd or Consul.

use std::time::{Duration, Instant};

use backend_core::{BackendError, BackendUri, Backoff, Coordinator};
use backend_store::StoreOptions;

/// The key-value store named by the backend URI.
#[derive(Debug)]
pub struct Store(backend_store::Store);

/// Why no connection string could be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Open(#[from] backend_store::OpenError),
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
    pub async fn open(uri: &BackendUri, options: &StoreOptions) -> Result<Store, StoreError> {
        Ok(Store(backend_store::Store::open(uri, options).await?))
    }

    /// The value at `key`, if there is one.
    pub async fn get_text(&self, key: &str) -> Result<Option<String>, StoreError> {
        let value = self.0.get_value(key).await?;
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
