//! Member-to-member traffic: commands sent over the same wire protocol that clients use, and
//! the simulated network that tests cut and heal.

use bson::Document;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

use crate::tls::Stream;
use crate::wire;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{from} cannot reach {to}: the link is cut by the test")]
    Partitioned { from: String, to: String },
    #[error("cannot connect to {host}: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("timed out talking to {0}")]
    Timeout(String),
    #[error("Authentication failed for __system@local on {host} (the members' key files differ?): {source}")]
    Auth {
        host: String,
        #[source]
        source: crate::auth::sasl::InternalAuthError,
    },
    #[error("TLS handshake with {host} failed (is its certificate signed by our --tlsCAFile and made out to {host}? does it trust ours?): {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wire error with {host}: {source}")]
    Wire {
        host: String,
        source: wire::WireError,
    },
}

/// Which links between members are cut. Only member-to-member traffic goes through it:
/// clients (drivers) still reach an isolated member, as they would across a real partition
/// that leaves the application on the member's side.
#[derive(Debug, Clone, Default)]
pub struct Network {
    cut: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Network {
    pub fn can_reach(&self, from: &str, to: &str) -> bool {
        self.cut
            .lock()
            .map(|c| !c.contains(&(from.to_string(), to.to_string())))
            .unwrap_or(true)
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: &str, b: &str) {
        if let Ok(mut c) = self.cut.lock() {
            c.insert((a.to_string(), b.to_string()));
            c.insert((b.to_string(), a.to_string()));
        }
    }

    pub fn heal(&self, a: &str, b: &str) {
        if let Ok(mut c) = self.cut.lock() {
            c.remove(&(a.to_string(), b.to_string()));
            c.remove(&(b.to_string(), a.to_string()));
        }
    }

    pub fn heal_all(&self) {
        if let Ok(mut c) = self.cut.lock() {
            c.clear();
        }
    }
}

/// A small pool of connections from one member to its peers.
#[derive(Debug)]
pub struct PeerClient {
    me: String,
    net: Network,
    idle: Mutex<HashMap<String, Vec<Stream>>>,
    next_id: AtomicI32,
    /// `--keyFile`: every new connection authenticates as `__system` with it.
    key: Option<crate::auth::KeyFile>,
    /// `--tlsMode preferTLS` or `requireTLS`: every new connection is TLS.
    tls: Option<Arc<crate::tls::Tls>>,
}

impl PeerClient {
    pub fn new(me: String, net: Network) -> PeerClient {
        PeerClient {
            me,
            net,
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicI32::new(1),
            key: None,
            tls: None,
        }
    }

    /// Authenticates new connections with the key file, as mongod's internal clients do.
    pub fn with_key(mut self, key: Option<crate::auth::KeyFile>) -> PeerClient {
        self.key = key;
        self
    }

    /// Makes new connections TLS when the mode says a member connects with TLS
    /// (`preferTLS`, `requireTLS`), as mongod's egress does.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> PeerClient {
        self.tls = tls.filter(|t| t.dials_tls());
        self
    }

    /// Runs one command on `host` (its `$db` must be in `cmd`) and returns the reply body,
    /// whatever its `ok`.
    pub async fn run(
        &self,
        host: &str,
        cmd: &Document,
        timeout: Duration,
    ) -> Result<Document, PeerError> {
        let partitioned = || PeerError::Partitioned {
            from: self.me.clone(),
            to: host.to_string(),
        };
        if !self.net.can_reach(&self.me, host) {
            return Err(partitioned());
        }
        let pooled = self
            .idle
            .lock()
            .ok()
            .and_then(|mut m| m.get_mut(host).and_then(|v| v.pop()));
        let mut stream = match pooled {
            Some(s) => s,
            None => {
                let connect = TcpStream::connect(host);
                match tokio::time::timeout(timeout, connect).await {
                    Err(_) => return Err(PeerError::Timeout(host.to_string())),
                    Ok(Err(e)) => {
                        return Err(PeerError::Connect {
                            host: host.to_string(),
                            source: e,
                        })
                    }
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        let mut s = match &self.tls {
                            None => Stream::Plain(s),
                            Some(tls) => {
                                let handshake = crate::tls::connect(tls.client_config(), host, s);
                                match tokio::time::timeout(timeout, handshake).await {
                                    Err(_) => return Err(PeerError::Timeout(host.to_string())),
                                    Ok(Err(source)) => {
                                        return Err(PeerError::Tls {
                                            host: host.to_string(),
                                            source,
                                        })
                                    }
                                    Ok(Ok(s)) => s,
                                }
                            }
                        };
                        if let Some(key) = &self.key {
                            crate::auth::sasl::authenticate_internal(&mut s, key, timeout)
                                .await
                                .map_err(|source| PeerError::Auth {
                                    host: host.to_string(),
                                    source,
                                })?;
                        }
                        s
                    }
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let msg = wire::encode_op_msg(id, 0, cmd)?;
            wire::write_all(&mut stream, &msg).await?;
            let (_, reply) = wire::read_reply(&mut stream).await?;
            Ok::<_, wire::WireError>(reply)
        };
        let reply = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(PeerError::Timeout(host.to_string())),
            Ok(Err(e)) => {
                return Err(PeerError::Wire {
                    host: host.to_string(),
                    source: e,
                })
            }
            Ok(Ok(r)) => r,
        };
        // A cut made while the request was in flight loses the answer too.
        if !self.net.can_reach(host, &self.me) {
            return Err(partitioned());
        }
        if let Ok(mut m) = self.idle.lock() {
            m.entry(host.to_string()).or_default().push(stream);
        }
        Ok(reply)
    }
}
