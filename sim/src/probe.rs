//! `mongod --sim-probe`: the simulator image's healthcheck, a mode of its own binary (the image
//! is `FROM scratch`: no shell, no mongosh).
//!
//! It connects to the member in the same container, sends one `hello` and says whether the
//! member is PRIMARY or SECONDARY: a swarm healthcheck that passes only then holds a rolling
//! update (the stack's `update_config`) until the new member has finished its initial sync, so
//! that swarm never stops the next member while the previous one still copies its data. The
//! mongo image does the same with the mongosh it ships (`db.hello()`); see
//! docs/operations.md, "Upgrades".
//!
//! Against a member with `--tlsMode preferTLS` or `requireTLS` it connects with TLS: give it
//! the member's own `--tlsMode` and `--tlsCAFile` (and `--tlsCertificateKeyFile` when the
//! member requires client certificates); see `crate::tls::Tls::probe_client`.
//!
//! `hello` needs no authentication (drivers send it before they authenticate), so the probe
//! works with `--auth` and `--keyFile` too.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bson::{doc, Document};
use tokio::net::TcpStream;

use crate::tls::Stream;
use crate::wire::{self, WireError};

/// The probe's TLS client.
pub type TlsClient = std::sync::Arc<rustls::ClientConfig>;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed (does --tlsCAFile name the CA of the member's certificate? does the member require a client certificate: --tlsCertificateKeyFile?): {source}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("hello to {addr} failed on the wire: {source}")]
    Wire {
        addr: SocketAddr,
        #[source]
        source: WireError,
    },
    #[error("hello to {addr} answered ok: 0: {reply}")]
    Refused { addr: SocketAddr, reply: Document },
    #[error("replSetGetConfig as __system (with --keyFile) failed: {source}")]
    AsMember {
        #[source]
        source: crate::peer::PeerError,
    },
}

/// What the member said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Primary,
    Secondary,
    /// In a set's config but neither primary nor secondary: STARTUP2 (initial sync),
    /// RECOVERING, ROLLBACK, an arbiter, ...
    NotReady {
        set_name: String,
    },
    /// Started with `--replSet` but without a config yet (not initiated, or not added).
    NoConfig,
    /// A standalone (no `--replSet`).
    Standalone,
}

impl Health {
    /// The healthcheck passes only for a member that holds the set's data and serves it.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Primary | Health::Secondary)
    }

    /// The healthcheck's one line (Docker keeps it in the container's health log).
    pub fn describe(&self) -> String {
        match self {
            Health::Primary => "PRIMARY: healthy".into(),
            Health::Secondary => "SECONDARY: healthy".into(),
            Health::NotReady { set_name } => format!(
                "a member of {set_name} but neither PRIMARY nor SECONDARY (initial sync, recovering or arbiter): not healthy"
            ),
            Health::NoConfig => {
                "no replica set config yet (not initiated, or not added to the set): not healthy"
                    .into()
            }
            Health::Standalone => "a standalone, not a replica set member: not healthy".into(),
        }
    }

    /// Reads the answer to `hello`.
    pub fn from_hello(reply: &Document) -> Health {
        let flag = |k: &str| reply.get_bool(k).unwrap_or(false);
        if flag("isWritablePrimary") {
            Health::Primary
        } else if flag("secondary") {
            Health::Secondary
        } else if let Ok(set_name) = reply.get_str("setName") {
            Health::NotReady {
                set_name: set_name.to_string(),
            }
        } else if flag("isreplicaset") {
            Health::NoConfig
        } else {
            Health::Standalone
        }
    }
}

/// Sends `hello` to the member on `127.0.0.1:port` and reads its answer, within `timeout`.
/// `tls`: the client of [`crate::tls::Tls::probe_client`], for a member that wants TLS.
pub async fn probe(
    port: u16,
    tls: Option<&TlsClient>,
    timeout: Duration,
) -> Result<Health, ProbeError> {
    Ok(Health::from_hello(&hello(port, tls, timeout).await?))
}

/// The member's whole answer to `hello`: what [`probe`] reads, for a test that records more
/// than the health (`electionId`, which names the term of a primary; `me`; `setVersion`).
pub async fn hello(
    port: u16,
    tls: Option<&TlsClient>,
    timeout: Duration,
) -> Result<Document, ProbeError> {
    command(port, tls, doc! {"hello": 1, "$db": "admin"}, timeout).await
}

/// The member's current replica set config (`replSetGetConfig`), or `None` when it has none
/// (not initiated, or removed): what a test records to check each reconfig against the last.
pub async fn current_config(
    port: u16,
    tls: Option<&TlsClient>,
    timeout: Duration,
) -> Result<Option<Document>, ProbeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match command(
        port,
        tls,
        doc! {"replSetGetConfig": 1, "$db": "admin"},
        timeout,
    )
    .await
    {
        Ok(reply) => match reply.get_document("config") {
            Ok(config) => Ok(Some(config.clone())),
            Err(_) => Err(ProbeError::Refused { addr, reply }),
        },
        // NotYetInitialized (94), or any other refusal: no config to show.
        Err(ProbeError::Refused { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`current_config`] of a member that runs with authentication (`--keyFile`, the stack's
/// default), where `replSetGetConfig` needs a login: the probe logs in as `__system` with the
/// key file, as the members do with each other. (Without TLS: the members' TLS client is the
/// member's own; this is for tests that record configs.)
pub async fn current_config_with_key(
    port: u16,
    key: crate::auth::KeyFile,
    timeout: Duration,
) -> Result<Option<Document>, ProbeError> {
    let host = format!("127.0.0.1:{port}");
    let client = crate::peer::PeerClient::new("sim-probe".into(), crate::peer::Network::default())
        .with_key(Some(key));
    let reply = client
        .run(
            &host,
            &doc! {"replSetGetConfig": 1, "$db": "admin"},
            timeout,
        )
        .await
        .map_err(|source| ProbeError::AsMember { source })?;
    Ok(reply.get_document("config").ok().cloned())
}

/// One command on a new connection to `127.0.0.1:port`; the reply if it says `ok: 1`.
async fn command(
    port: u16,
    tls: Option<&TlsClient>,
    cmd: Document,
    timeout: Duration,
) -> Result<Document, ProbeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        let mut stream = match tls {
            None => Stream::Plain(stream),
            Some(config) => crate::tls::connect(config.clone(), &addr.to_string(), stream)
                .await
                .map_err(|source| ProbeError::Tls { addr, source })?,
        };
        let wire_err = |source| ProbeError::Wire { addr, source };
        let msg = wire::encode_op_msg(1, 0, &cmd).map_err(wire_err)?;
        wire::write_all(&mut stream, &msg).await.map_err(wire_err)?;
        let (_, reply) = wire::read_reply(&mut stream).await.map_err(wire_err)?;
        Ok(reply)
    };
    let reply = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout { addr, timeout })??;
    let ok = match reply.get("ok") {
        Some(bson::Bson::Double(v)) => *v == 1.0,
        Some(bson::Bson::Int32(v)) => *v == 1,
        Some(bson::Bson::Int64(v)) => *v == 1,
        Some(bson::Bson::Boolean(v)) => *v,
        _ => false,
    };
    if ok {
        Ok(reply)
    } else {
        Err(ProbeError::Refused { addr, reply })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_primary_and_secondary_are_healthy() {
        let cases = [
            (
                doc! {"isWritablePrimary": true, "setName": "rs0"},
                Health::Primary,
            ),
            (
                doc! {"isWritablePrimary": false, "secondary": true, "setName": "rs0"},
                Health::Secondary,
            ),
            (
                doc! {"isWritablePrimary": false, "secondary": false, "setName": "rs0"},
                Health::NotReady {
                    set_name: "rs0".into(),
                },
            ),
            (
                doc! {"isWritablePrimary": false, "secondary": false, "isreplicaset": true},
                Health::NoConfig,
            ),
            (doc! {"isWritablePrimary": true}, Health::Primary),
            (doc! {"isWritablePrimary": false}, Health::Standalone),
        ];
        for (reply, want) in cases {
            let got = Health::from_hello(&reply);
            assert_eq!(got, want, "{reply}");
            assert_eq!(
                got.is_healthy(),
                matches!(want, Health::Primary | Health::Secondary)
            );
        }
    }
}
