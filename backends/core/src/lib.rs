//! The shared core of the swarm-registrator backends.
//!
//! Everything that is a public contract lives here, in one place:
//!
//! * [`record`]: the JSON records the bridge writes ([`ServiceRecord`], [`NodeRecord`]);
//! * [`layout`]: where they go ([`KeyLayout`]);
//! * [`uri`]: how a user names a store (`etcd://host:port/prefix`, `consul://...`);
//! * [`status`]: the replica set's status document the reconciler writes ([`ReplSetStatus`]);
//! * [`secret`]: a token or password that is never printed;
//! * [`backend`]: the two traits a store implements, [`Publisher`] for the bridge and
//!   [`Watcher`] for tools such as the replica-set reconciler.
//!
//! The store crates (`backend-etcd`, `backend-consul`, and `backend-memory` for tests) depend on
//! this crate and on nothing of each other. `backend-store` puts them behind one type, `Store`,
//! with a Cargo feature per store, so a consumer compiles only the stores it enables.

pub mod backend;
pub mod error;
pub mod identity;
pub mod keepalive;
pub mod layout;
pub mod record;
pub mod secret;
pub mod status;
pub mod uri;

pub use backend::{
    Backoff, Coordinator, Fence, FenceToken, KvEntry, Leadership, LeaseDeadline, Publisher,
    WatchEvent, Watcher, LEASE_SAFETY_MARGIN,
};
pub use error::{error_chain, is_tls_failure, require_ttl, BackendError, Cause, Result};
pub use identity::{
    config_order, CommitPoint, IdentityDecodeError, IdentityMember, SetIdentity,
    IDENTITY_SCHEMA_VERSION,
};
pub use layout::{check_set_name, KeyLayout, ServiceKey, SetNameError};
pub use record::{
    batches, DecodeError, Health, NodeRecord, Protocol, ServiceCheck, ServiceRecord,
    RECORD_MAX_BYTES, SCHEMA_VERSION,
};
pub use secret::Secret;
pub use status::{
    unix_seconds, NextKind, NextStep, RecordGone, ReplSetStatus, StatusDecodeError, StatusMember,
    StatusProblem, STATUS_SCHEMA_VERSION,
};
pub use uri::{BackendUri, ConsulUri, EtcdUri, StoreKind, UriError};
