//! Certificates for TLS to MongoDB in tests: a CA and one member certificate for 127.0.0.1,
//! made with rcgen in a temporary directory (removed on drop), as `mongod
//! --tlsCertificateKeyFile` and `--tlsCAFile` want them.

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

/// `ca.pem` (the CA's certificate) and `member.pem` (a member's certificate and key, for
/// 127.0.0.1, serving both ends).
#[derive(Debug)]
pub struct MemberPki {
    dir: PathBuf,
}

impl MemberPki {
    /// Panics when the files cannot be made (a test's setup).
    pub fn generate(tag: &str) -> MemberPki {
        let dir = std::env::temp_dir().join(format!(
            "{tag}-pki-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("member key");
        let mut member = CertificateParams::new(Vec::<String>::new()).expect("params");
        member.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
        member.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = member
            .signed_by(&key, &ca_cert, &ca_key)
            .expect("member certificate");
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
        std::fs::write(
            dir.join("member.pem"),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )
        .expect("write member.pem");
        MemberPki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn member(&self) -> PathBuf {
        self.dir.join("member.pem")
    }
}

impl Drop for MemberPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
