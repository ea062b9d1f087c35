//! A MongoDB 7.0 replica-set simulator on the real wire protocol.
//!
//! Each simulated member ([`Node`]) is its own TCP server that answers the real drivers
//! (the `mongodb` crate, pymongo) and talks to the other members over the same protocol:
//! heartbeats, elections, oplog fetching. It exists because no `mongod` binary can be had on
//! this project's machines, and it is an honest stand-in, not a substitute: see
//! docs/replset-sim.md for what is faithful and what is not.
//!
//! Tests drive a whole set through [`Cluster`]: start members on free loopback ports, kill
//! and restart them (keeping or losing data), cut them off and heal them, and read back the
//! [`History`] of configs and elections.

pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod config_change;
pub mod disk;
mod election;
pub mod error;
pub mod history;
pub mod node;
pub mod oplog;
pub mod peer;
pub mod probe;
pub mod query;
mod repl;
mod sync;
pub mod tls;
pub mod update;
pub mod wire;

pub use cluster::Cluster;
pub use error::ServerError;
pub use history::{ConfigSource, Event, History};
pub use node::{DurableState, MemberState, Node, NodeOptions};
pub use peer::Network;
