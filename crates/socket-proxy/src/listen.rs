//! Where the proxy listens: a unix socket (the way to give it to a container on the same
//! node, through a shared volume) or TCP (a network that only the bridge reaches).

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A listen address, in `DOCKER_HOST`'s form: `unix:///path/to.sock` or `tcp://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// An error binding or parsing a listen address.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listen address {given:?}: write unix:///absolute/path.sock or tcp://ip:port")]
    Form { given: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: ListenAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: another process answers on that socket; stop it or choose another --listen path")]
    InUse { addr: ListenAddr },
    #[error("cannot listen on {addr}: the path exists and is not a socket; remove it or choose another --listen path")]
    NotASocket { addr: ListenAddr },
}

impl FromStr for ListenAddr {
    type Err = ListenError;

    fn from_str(s: &str) -> Result<ListenAddr, ListenError> {
        let form = || ListenError::Form {
            given: s.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(form());
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            addr.parse().map(ListenAddr::Tcp).map_err(|_| form())
        } else {
            Err(form())
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

/// Who is on the other end of a connection, for the log of refusals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A process on this host: its uid and pid, where the kernel says.
    Local {
        uid: Option<u32>,
        pid: Option<i32>,
    },
    Tcp(SocketAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Local { uid, pid } => {
                f.write_str("local")?;
                if let Some(uid) = uid {
                    write!(f, " uid {uid}")?;
                }
                if let Some(pid) = pid {
                    write!(f, " pid {pid}")?;
                }
                Ok(())
            }
            Peer::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// An accepted connection.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

/// A bound listener. A unix socket's file is removed when it is dropped.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: UnixListener,
        socket: SocketFile,
    },
    Tcp(TcpListener, SocketAddr),
}

/// The file of a unix socket this process created; removed when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    /// Binds `addr`. A unix socket is created with `mode` (its parent directory too, if
    /// missing); a stale socket file left by a proxy that died is replaced, a live one is not.
    pub async fn bind(addr: &ListenAddr, mode: u32) -> Result<Listener, ListenError> {
        let bind_err = |source| ListenError::Bind {
            addr: addr.clone(),
            source,
        };
        match addr {
            ListenAddr::Tcp(socket) => {
                let listener = TcpListener::bind(socket).await.map_err(bind_err)?;
                let local = listener.local_addr().map_err(bind_err)?;
                Ok(Listener::Tcp(listener, local))
            }
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(ListenError::NotASocket { addr: addr.clone() });
                    }
                    if UnixStream::connect(path).await.is_ok() {
                        return Err(ListenError::InUse { addr: addr.clone() });
                    }
                    std::fs::remove_file(path).map_err(bind_err)?;
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(bind_err)?;
                }
                let listener = UnixListener::bind(path).map_err(bind_err)?;
                let socket = SocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(bind_err)?;
                Ok(Listener::Unix { listener, socket })
            }
        }
    }

    /// The address it listens on (for TCP with port 0: the port it got).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Unix { socket, .. } => ListenAddr::Unix(socket.path().to_path_buf()),
            Listener::Tcp(_, addr) => ListenAddr::Tcp(*addr),
        }
    }

    /// The next connection and who made it.
    pub async fn accept(&self) -> std::io::Result<(Box<dyn Connection>, Peer)> {
        match self {
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                let cred = stream.peer_cred().ok();
                let peer = Peer::Local {
                    uid: cred.map(|c| c.uid()),
                    // 0 for a process in another pid namespace (another container).
                    pid: cred.and_then(|c| c.pid()).filter(|pid| *pid > 0),
                };
                Ok((Box::new(stream), peer))
            }
            Listener::Tcp(listener, _) => {
                let (stream, addr): (TcpStream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Box::new(stream), Peer::Tcp(addr)))
            }
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.local_addr().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_docker_hosts_form() {
        assert_eq!(
            "unix:///run/p/docker.sock".parse::<ListenAddr>().ok(),
            Some(ListenAddr::Unix("/run/p/docker.sock".into()))
        );
        assert_eq!(
            "tcp://127.0.0.1:2375".parse::<ListenAddr>().ok(),
            Some(ListenAddr::Tcp("127.0.0.1:2375".parse().expect("addr")))
        );
        for bad in [
            "/run/x.sock",
            "unix://relative.sock",
            "tcp://localhost:2375",
            "http://x",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_and_a_plain_file_are_not() {
        let dir = test_support::TempDir::new("listen");
        let addr = ListenAddr::Unix(dir.path().join("sub/p.sock"));
        let live = Listener::bind(&addr, 0o600).await.expect("binds");
        let mode = std::fs::metadata(dir.path().join("sub/p.sock"))
            .expect("socket file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            Listener::bind(&addr, 0o600).await,
            Err(ListenError::InUse { .. })
        ));
        // A listener that is gone without removing its file (a killed process).
        let Listener::Unix { listener, socket } = live else {
            panic!("a unix listener");
        };
        drop(listener);
        std::mem::forget(socket);
        let again = Listener::bind(&addr, 0o600)
            .await
            .expect("replaces the stale socket");
        drop(again);
        assert!(
            !dir.path().join("sub/p.sock").exists(),
            "removed when dropped"
        );

        let file = dir.path().join("plain");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(
            Listener::bind(&ListenAddr::Unix(file), 0o600).await,
            Err(ListenError::NotASocket { .. })
        ));
    }
}
