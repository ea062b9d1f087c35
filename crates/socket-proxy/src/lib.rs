//! docker-socket-proxy: the Docker engine's API, read-only and allow-listed, for
//! swarm-registrator.
//!
//! Whoever can write to the engine's socket is root on the node: mounting it `:ro` into a
//! container only stops the container from replacing the socket file, not from calling
//! `POST /containers/create` with the host's `/` bind-mounted. The bridge needs a handful of
//! reads (see [`allow::BRIDGE_RULES`]), so this proxy holds the socket instead, and the bridge
//! talks to the proxy's socket (`DOCKER_HOST=unix:///run/docker-socket-proxy/docker.sock`).
//!
//! * [`allow`]: the rules, and the decision on one request;
//! * [`proxy`]: HTTP/1.1 in and out, streamed, with refusals in the engine's error form;
//! * [`listen`]: unix socket and TCP listeners.
//!
//! docs/security.md ("The Docker socket") says how to deploy it and what it leaves open.

pub mod allow;
pub mod listen;
pub mod proxy;

pub use allow::{AllowList, Rule};
pub use listen::{ListenAddr, Listener};
pub use proxy::{Proxy, Stats};
