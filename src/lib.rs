//! swarm-registrator: publishes the containers and swarm tasks of the local Docker engine into
//! a key-value store (etcd v3, Consul), tied to a lease so that dead nodes take their records
//! with them.
//!
//! The binary (`src/main.rs`) only parses flags and wires these modules together:
//!
//! * [`engine`]: the local Docker engine (bollard): list, inspect, events;
//! * [`container`], [`metadata`], [`records`]: from a container to its records, pure;
//! * [`sync`]: the difference between engine and store, pure;
//! * [`bridge`]: the loop that keeps the store equal to the engine;
//! * [`internal_events`]: each decision of the bridge, logged and counted in one place;
//! * [`metrics`]: the metrics and health the `ops-http` crate serves on `/metrics` and
//!   `/healthz`.

pub mod bridge;
pub mod container;
pub mod engine;
pub mod internal_events;
pub mod metadata;
pub mod metrics;
pub mod records;
pub mod sync;
