//! One store type for every program: [`Store`], an enum over the backends, each behind a Cargo
//! feature (`etcd`, `consul`, and `memory` for tests), implementing the three traits of
//! backend-core ([`Publisher`], [`Watcher`], [`Coordinator`]).
//!
//! A program parses a [`BackendUri`], flattens [`StoreArgs`] into its clap parser (so the flags
//! and environment variables are the same in every binary), and calls [`Store::open`]. It then
//! holds one type whatever the store, and compiles only the stores it enables: a URI of a store
//! left out of the build is a clear error, not a missing match arm.

mod options;

use std::time::Duration;

use backend_core::{
    BackendError, BackendUri, Coordinator, KeyLayout, KvEntry, Leadership, NodeRecord, Publisher,
    Result, ServiceKey, ServiceRecord, WatchEvent, Watcher,
};
use futures::stream::BoxStream;

pub use options::{BackendUriParser, OptionsError, StoreArgs, StoreOptions, CONSUL_HTTP_TOKEN};

#[cfg(not(any(feature = "etcd", feature = "consul", feature = "memory")))]
compile_error!("backend-store needs at least one of its features: etcd, consul, memory");

/// A client of one store.
#[derive(Debug)]
pub enum Store {
    #[cfg(feature = "etcd")]
    Etcd(Box<backend_etcd::EtcdStore>),
    #[cfg(feature = "consul")]
    Consul(Box<backend_consul::ConsulStore>),
    /// The in-memory store of unit tests (see backend-memory); made with `Store::from`, never
    /// from a URI.
    #[cfg(feature = "memory")]
    Memory(backend_memory::MemoryStore),
}

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("this build has no {store} support: build it with the Cargo feature `{feature}`, or use another backend URI")]
    NotBuiltIn {
        store: &'static str,
        feature: &'static str,
    },
    #[error(transparent)]
    Options(#[from] OptionsError),
    #[cfg(feature = "etcd")]
    #[error("cannot set up the etcd client")]
    Etcd(#[source] backend_etcd::ConfigError),
    #[cfg(feature = "consul")]
    #[error("cannot set up the Consul client")]
    Consul(#[source] backend_consul::ConfigError),
}

/// Runs `$body` with `$s` bound to the store of whichever variant `$self` is.
macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            #[cfg(feature = "etcd")]
            Store::Etcd($s) => $body,
            #[cfg(feature = "consul")]
            Store::Consul($s) => $body,
            #[cfg(feature = "memory")]
            Store::Memory($s) => $body,
        }
    };
}

impl Store {
    /// A client of the store `uri` names. No connection is made yet: the first request
    /// connects, so a store that is down at start is reported by that request (transient, for
    /// the caller to retry).
    pub async fn open(uri: &BackendUri, options: &StoreOptions) -> Result<Store, OpenError> {
        match uri {
            #[cfg(feature = "etcd")]
            BackendUri::Etcd(u) => {
                let etcd = backend_etcd::EtcdOptions {
                    tls: u.tls,
                    ca_file: options.etcd_ca_file.clone(),
                    client_cert: options.etcd_client_cert.clone(),
                    client_key: options.etcd_client_key.clone(),
                    user: options.etcd_user.clone(),
                };
                backend_etcd::EtcdStore::connect_with(&u.endpoints, u.layout.clone(), &etcd)
                    .await
                    .map(|s| Store::Etcd(Box::new(s)))
                    .map_err(OpenError::Etcd)
            }
            #[cfg(feature = "consul")]
            BackendUri::Consul(u) => {
                let consul = backend_consul::ConsulOptions {
                    token: options.consul_token.clone(),
                    ca_cert: options.consul_ca_cert.clone(),
                    client_cert: options.consul_client_cert.clone(),
                    client_key: options.consul_client_key.clone(),
                    kv: options.consul_kv,
                    catalog: options.consul_catalog,
                    deregister_critical_after: options.consul_deregister_critical_after,
                };
                backend_consul::ConsulStore::new(&u.endpoint, u.tls, u.layout.clone(), consul)
                    .map(|s| Store::Consul(Box::new(s)))
                    .map_err(OpenError::Consul)
            }
            #[allow(unreachable_patterns)]
            other => {
                let _ = options;
                let store = other.kind().name();
                Err(OpenError::NotBuiltIn {
                    store,
                    feature: store,
                })
            }
        }
    }

    /// The etcd client, when this is one (for tools and tests that need more of etcd).
    #[cfg(feature = "etcd")]
    pub fn as_etcd(&self) -> Option<&backend_etcd::EtcdStore> {
        match self {
            Store::Etcd(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The Consul client, when this is one.
    #[cfg(feature = "consul")]
    pub fn as_consul(&self) -> Option<&backend_consul::ConsulStore> {
        match self {
            Store::Consul(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The in-memory store, when this is one (for a test's controls).
    #[cfg(feature = "memory")]
    pub fn as_memory(&self) -> Option<&backend_memory::MemoryStore> {
        match self {
            Store::Memory(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[cfg(feature = "etcd")]
impl From<backend_etcd::EtcdStore> for Store {
    fn from(s: backend_etcd::EtcdStore) -> Store {
        Store::Etcd(Box::new(s))
    }
}

#[cfg(feature = "consul")]
impl From<backend_consul::ConsulStore> for Store {
    fn from(s: backend_consul::ConsulStore) -> Store {
        Store::Consul(Box::new(s))
    }
}

#[cfg(feature = "memory")]
impl From<backend_memory::MemoryStore> for Store {
    fn from(s: backend_memory::MemoryStore) -> Store {
        Store::Memory(s)
    }
}

impl Publisher for Store {
    fn store_name(&self) -> &'static str {
        each!(self, s => s.store_name())
    }

    fn layout(&self) -> &KeyLayout {
        each!(self, s => s.layout())
    }

    async fn open_session(&self, ttl: Duration) -> Result<(), BackendError> {
        each!(self, s => s.open_session(ttl).await)
    }

    async fn renew_session(&self) -> Result<(), BackendError> {
        each!(self, s => s.renew_session().await)
    }

    async fn close_session(&self, revoke: bool) -> Result<(), BackendError> {
        each!(self, s => s.close_session(revoke).await)
    }

    async fn publish(&self, records: &[ServiceRecord]) -> Result<(), BackendError> {
        each!(self, s => s.publish(records).await)
    }

    async fn unpublish(&self, keys: &[ServiceKey]) -> Result<(), BackendError> {
        each!(self, s => s.unpublish(keys).await)
    }

    async fn publish_node(&self, node: &NodeRecord) -> Result<(), BackendError> {
        each!(self, s => s.publish_node(node).await)
    }

    async fn list_services(&self) -> Result<Vec<KvEntry>, BackendError> {
        each!(self, s => s.list_services().await)
    }
}

impl Watcher for Store {
    fn watch_prefix(&self, prefix: String) -> BoxStream<'static, Result<WatchEvent, BackendError>> {
        each!(self, s => s.watch_prefix(prefix))
    }
}

impl Coordinator for Store {
    async fn campaign(&self, key: String, holder: String, ttl: Duration) -> Result<Leadership> {
        each!(self, s => s.campaign(key, holder, ttl).await)
    }

    async fn put_value(&self, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        each!(self, s => s.put_value(key, value).await)
    }

    async fn put_value_fenced(
        &self,
        fence: &backend_core::Fence,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), BackendError> {
        each!(self, s => s.put_value_fenced(fence, key, value).await)
    }

    async fn delete_value(&self, key: &str) -> Result<(), BackendError> {
        each!(self, s => s.delete_value(key).await)
    }

    async fn get_value(&self, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        each!(self, s => s.get_value(key).await)
    }
}
