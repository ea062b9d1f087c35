//! TLS as mongod 7.0 does it (`net.tls`): `--tlsMode`, one PEM with the member's certificate
//! and key (`--tlsCertificateKeyFile`), the CA that signs members and clients (`--tlsCAFile`),
//! an optional certificate for member-to-member connections (`--tlsClusterFile`),
//! `--tlsAllowConnectionsWithoutCertificates` and `--tlsAllowInvalidHostnames`.
//!
//! What the server does, and the simulator with it (src/mongo/transport/asio/asio_session_impl.cpp,
//! src/mongo/util/net/ssl_manager_openssl.cpp, the manual's "Configure mongod and mongos for
//! TLS/SSL"):
//! - `disabled`: plain TCP only. `allowTLS`: accepts both; connects to other members in plain
//!   text. `preferTLS`: accepts both; connects to other members with TLS. `requireTLS`: TLS
//!   only, both ways.
//! - It tells a TLS connection from a plain one by its first bytes (a TLS handshake record).
//!   A plain connection to `requireTLS` is closed without an answer: the server logs "The
//!   server is configured to only allow SSL connections".
//! - TLS without `--tlsCAFile` does not start ("The use of TLS without specifying a chain of
//!   trust is no longer supported"); neither does TLS without a certificate key file, nor an
//!   unreadable file, nor a key that is not the certificate's.
//! - With a CA file, a client must present a certificate that the CA signed: a connection
//!   without one is closed after the handshake ("no SSL certificate provided by peer;
//!   connection rejected") unless `--tlsAllowConnectionsWithoutCertificates`; one with a
//!   certificate the CA did not sign fails the handshake whatever that flag says.
//! - Connections to other members check the other member's certificate against the CA and
//!   its name against the host of the config (unless `--tlsAllowInvalidHostnames`), and present
//!   the cluster file's certificate, or else the member's own.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// `net.tls.mode`, with mongod's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Disabled,
    AllowTls,
    PreferTls,
    RequireTls,
}

impl TlsMode {
    /// Parses mongod's spelling (`disabled`, `allowTLS`, `preferTLS`, `requireTLS`).
    pub fn parse(s: &str) -> Result<TlsMode, TlsError> {
        match s {
            "disabled" => Ok(TlsMode::Disabled),
            "allowTLS" => Ok(TlsMode::AllowTls),
            "preferTLS" => Ok(TlsMode::PreferTls),
            "requireTLS" => Ok(TlsMode::RequireTls),
            other => Err(TlsError::BadMode(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Disabled => "disabled",
            TlsMode::AllowTls => "allowTLS",
            TlsMode::PreferTls => "preferTLS",
            TlsMode::RequireTls => "requireTLS",
        }
    }

    /// Whether plain-text connections are served.
    pub fn accepts_plain(self) -> bool {
        self != TlsMode::RequireTls
    }

    /// Whether this member's own connections (to other members; the probe's) use TLS.
    pub fn dials_tls(self) -> bool {
        matches!(self, TlsMode::PreferTls | TlsMode::RequireTls)
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The `--tls*` flags as given.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    pub mode: TlsMode,
    pub certificate_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cluster_file: Option<PathBuf>,
    pub allow_connections_without_certificates: bool,
    pub allow_invalid_hostnames: bool,
}

impl TlsOptions {
    /// `--tlsMode requireTLS --tlsCertificateKeyFile certificate_key_file --tlsCAFile ca_file`.
    pub fn require_tls(certificate_key_file: PathBuf, ca_file: PathBuf) -> TlsOptions {
        TlsOptions {
            mode: TlsMode::RequireTls,
            certificate_key_file: Some(certificate_key_file),
            ca_file: Some(ca_file),
            ..TlsOptions::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tlsMode {0} is not one of disabled, allowTLS, preferTLS, requireTLS")]
    BadMode(String),
    #[error("--tlsMode {mode} needs --tlsCertificateKeyFile: one PEM file with this member's certificate and its private key (mongod: need tlsCertificateKeyFile or certificateSelector when TLS is enabled)")]
    NoCertificateKeyFile { mode: TlsMode },
    #[error("--tlsMode {mode} needs --tlsCAFile, the PEM of the CA that signs the members' and clients' certificates (mongod: the use of TLS without specifying a chain of trust is no longer supported)")]
    NoCaFile { mode: TlsMode },
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path} holds no certificate (no PEM block `BEGIN CERTIFICATE`)")]
    NoCertificate { flag: &'static str, path: PathBuf },
    #[error("{flag} {path} is not valid PEM: {source}")]
    Pem {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{flag} {path} holds no private key (it must hold the certificate AND its key, e.g. `cat member.crt member.key > member.pem`)")]
    NoKey { flag: &'static str, path: PathBuf },
    #[error("{flag} {path}: the private key is not the key of the certificate in the file (a certificate and a key of different pairs?)")]
    KeyMismatch {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{flag} {path}: the certificate or key cannot be used: {source}")]
    Unusable {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "--tlsCAFile {path}: a certificate in it is not a CA certificate rustls accepts: {source}"
    )]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("--tlsCAFile {path}: cannot build a certificate verifier from it: {source}")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("TLS setup failed: {0}")]
    Setup(#[source] rustls::Error),
}

/// A member's TLS, loaded and checked at start. `Debug` shows the mode only: the keys stay out
/// of logs.
#[derive(Clone)]
pub struct Tls {
    pub mode: TlsMode,
    allow_without_certificates: bool,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field(
                "allow_without_certificates",
                &self.allow_without_certificates,
            )
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            flag,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            flag,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A certificate chain and its key from one PEM file, checked to belong together.
fn certified_key(
    flag: &'static str,
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let pem = read(flag, path)?;
    let chain = certificates(flag, path, &pem)?;
    let key = match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => k,
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                flag,
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(TlsError::Pem {
                flag,
                path: path.to_path_buf(),
                source,
            })
        }
    };
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(
        |source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                flag,
                path: path.to_path_buf(),
                source,
            },
            source => TlsError::Unusable {
                flag,
                path: path.to_path_buf(),
                source,
            },
        },
    )?;
    Ok((chain, key))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let pem = read("--tlsCAFile", path)?;
    let mut roots = RootCertStore::empty();
    for cert in certificates("--tlsCAFile", path, &pem)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// The client side: trusts `roots`, presents `identity` if any, checks names unless told not
/// to.
fn client_config(
    roots: Arc<RootCertStore>,
    ca_path: &Path,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    check_names: bool,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = if check_names {
        builder.with_root_certificates(roots)
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|source| TlsError::Verifier {
                path: ca_path.to_path_buf(),
                source,
            })?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
    };
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::Setup)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

impl Tls {
    /// Loads the flags' files as mongod does at start; `None` for `--tlsMode disabled`.
    pub fn load(opts: &TlsOptions) -> Result<Option<Tls>, TlsError> {
        let mode = opts.mode;
        if mode == TlsMode::Disabled {
            return Ok(None);
        }
        let key_path = opts
            .certificate_key_file
            .as_deref()
            .ok_or(TlsError::NoCertificateKeyFile { mode })?;
        let ca_path = opts.ca_file.as_deref().ok_or(TlsError::NoCaFile { mode })?;
        let (chain, key) = certified_key("--tlsCertificateKeyFile", key_path)?;
        let roots = roots(ca_path)?;
        // A client without a certificate gets through the handshake and is turned away after
        // it (see `accept`), as mongod does; a certificate the CA did not sign fails here.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|source| TlsError::Verifier {
                path: ca_path.to_path_buf(),
                source,
            })?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Setup)?;
        let cluster = match &opts.cluster_file {
            Some(p) => certified_key("--tlsClusterFile", p)?,
            None => (chain, key),
        };
        let client = client_config(roots, ca_path, Some(cluster), !opts.allow_invalid_hostnames)?;
        Ok(Some(Tls {
            mode,
            allow_without_certificates: opts.allow_connections_without_certificates,
            server: Arc::new(server),
            client,
        }))
    }

    /// The healthcheck's client (`--sim-probe`): `None` when the member serves plain text
    /// (`disabled`, `allowTLS`); else one that trusts `--tlsCAFile` and presents
    /// `--tlsCertificateKeyFile` if given. It does not check the certificate's name: it
    /// talks to 127.0.0.1 in its own container, which a member's certificate need not name.
    pub fn probe_client(opts: &TlsOptions) -> Result<Option<Arc<ClientConfig>>, TlsError> {
        let mode = opts.mode;
        if !mode.dials_tls() {
            return Ok(None);
        }
        let ca_path = opts.ca_file.as_deref().ok_or(TlsError::NoCaFile { mode })?;
        let identity = match &opts.certificate_key_file {
            Some(p) => Some(certified_key("--tlsCertificateKeyFile", p)?),
            None => None,
        };
        client_config(roots(ca_path)?, ca_path, identity, false).map(Some)
    }

    /// What a member does with a new connection: TLS or plain text by its first bytes, and
    /// the refusals of the module docs. `Ok(None)`: the connection is refused (logged here).
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<Option<Stream>> {
        let remote = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        if !looks_like_tls(&stream).await? {
            if !self.mode.accepts_plain() {
                tracing::warn!(%remote, error = "SSLHandshakeFailed", "The server is configured to only allow SSL connections: closing a plain-text connection");
                return Ok(None);
            }
            if self.mode == TlsMode::PreferTls {
                tracing::info!(%remote, "TLS mode is preferTLS and this connection is not using TLS");
            }
            return Ok(Some(Stream::Plain(stream)));
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server.clone());
        let tls = match acceptor.accept(stream).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "TLS handshake failed: closing the connection");
                return Ok(None);
            }
        };
        let has_certificate = tls
            .get_ref()
            .1
            .peer_certificates()
            .is_some_and(|c| !c.is_empty());
        if !has_certificate && !self.allow_without_certificates {
            tracing::warn!(%remote, "no SSL certificate provided by peer; connection rejected (the server has --tlsCAFile without --tlsAllowConnectionsWithoutCertificates)");
            return Ok(None);
        }
        Ok(Some(Stream::ServerTls(Box::new(tls))))
    }

    /// Whether this member's connections to other members use TLS.
    pub fn dials_tls(&self) -> bool {
        self.mode.dials_tls()
    }

    /// The client side of a connection to another member.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// mongod's test (asio_session_impl.cpp, `maybeHandshakeSSLForIngress`): it reads what would
/// be a message header; a client's first request has `responseTo` 0 (or -1), where the same
/// bytes of a TLS ClientHello are not. Peeked, so that the handshake still sees them.
async fn looks_like_tls(stream: &TcpStream) -> std::io::Result<bool> {
    let mut header = [0u8; 16];
    let mut n = 0;
    // The header normally comes in one segment; wait a little for a client that splits it.
    for _ in 0..100 {
        n = stream.peek(&mut header).await?;
        if n == 0 || n >= 12 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if n < 12 {
        // A TLS record of type handshake (22) opens every TLS connection.
        return Ok(n > 0 && header[0] == 0x16);
    }
    let response_to = i32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    Ok(response_to != 0 && response_to != -1)
}

/// A TLS client handshake on `stream` with `host` (`name:port` or `[v6]:port`): the name the
/// server's certificate must carry.
pub async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    stream: TcpStream,
) -> std::io::Result<Stream> {
    let name = host_name(host);
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(server_name, stream)
        .await?;
    Ok(Stream::ClientTls(Box::new(tls)))
}

/// The host part of `host:port`, without the brackets of an IPv6 address.
fn host_name(host: &str) -> &str {
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    name.trim_start_matches('[').trim_end_matches(']')
}

/// A connection, plain or TLS, server or client side.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Checks the chain against the CA but not the name (`--tlsAllowInvalidHostnames`, and the
/// probe).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_lose_their_port_and_brackets() {
        assert_eq!(host_name("10.0.0.5:27017"), "10.0.0.5");
        assert_eq!(host_name("mongo-1:27017"), "mongo-1");
        assert_eq!(host_name("[::1]:27017"), "::1");
        assert_eq!(host_name("mongo-1"), "mongo-1");
    }

    #[test]
    fn modes_are_mongods() {
        for m in ["disabled", "allowTLS", "preferTLS", "requireTLS"] {
            assert_eq!(TlsMode::parse(m).map(TlsMode::name).ok(), Some(m));
        }
        assert!(TlsMode::parse("requireSSL").is_err());
        assert!(!TlsMode::RequireTls.accepts_plain());
        assert!(!TlsMode::AllowTls.dials_tls() && TlsMode::PreferTls.dials_tls());
    }
}
