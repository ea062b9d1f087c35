//! Certificates for tests of TLS stores: a CA of the test's own, a server certificate for
//! 127.0.0.1 and `localhost`, and client certificates it signed, as PEM files in a temporary
//! directory (rcgen; nothing from the machine).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::TempDir;

/// A CA, a server certificate and a client certificate (common name `swarm-registrator`).
pub struct Pki {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = TempDir::new("pki");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "swarm-registrator test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "server.dc1.consul");
        server_params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into().expect("DNS name")),
        ];
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_cert = server_params
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("server certificate");
        let write = |name: &str, pem: String| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write a PEM file");
            path
        };
        let ca = write("ca.pem", ca_cert.pem());
        let server_cert = write("server.pem", server_cert.pem());
        let server_key = write("server-key.pem", server_key.serialize_pem());
        let mut pki = Pki {
            ca,
            server_cert,
            server_key,
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            dir,
            ca_cert,
            ca_key,
        };
        (pki.client_cert, pki.client_key) = pki.client("swarm-registrator");
        pki
    }

    /// A client certificate with the common name `name` (etcd takes it as the user when a
    /// request carries no token), and its key: the paths of their PEM files.
    pub fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("client certificate");
        let cert_path = self.dir.path().join(format!("client-{name}.pem"));
        let key_path = self.dir.path().join(format!("client-{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write a PEM file");
        std::fs::write(&key_path, key.serialize_pem()).expect("write a PEM file");
        (cert_path, key_path)
    }
}
