//! SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) as MongoDB runs them, both sides: the
//! server's conversation for `saslStart` / `saslContinue`, and the client that members use to
//! authenticate to each other as `__system` with the key file.
//!
//! MongoDB's details (src/mongo/db/auth/sasl_scram_server_conversation.cpp,
//! src/mongo/crypto/mechanism_scram.h, src/mongo/db/auth/security_key.cpp):
//! - SCRAM-SHA-1 hashes the hex MD5 of `"<user>:mongo:<password>"`, not the password itself
//!   (`createPasswordDigest`); SCRAM-SHA-256 hashes the SASLprep'ed password (RFC 4013).
//! - Stored credentials are `{iterationCount, salt, storedKey, serverKey}`, base64, under
//!   `credentials.SCRAM-SHA-1` / `credentials.SCRAM-SHA-256` of the user document; the salt is
//!   as long as the hash minus 4 bytes (16 and 28 bytes); the default iteration counts are the
//!   `scramIterationCount` (10000) and `scramSHA256IterationCount` (15000) parameters.
//! - No channel binding: the GS2 header must be `n,,` (`c=biws` in the final message); the
//!   `a=` authzid is refused unless it names the same user.
//! - After the server's `v=` the conversation is done only if the client asked for
//!   `skipEmptyExchange`; otherwise one more empty `saslContinue` ends it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bson::{doc, Document};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rand::Rng;
use sha1::Sha1;
use sha2::Sha256;

/// The two SCRAM mechanisms MongoDB 7.0 offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Sha1,
    Sha256,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha1 => "SCRAM-SHA-1",
            Mechanism::Sha256 => "SCRAM-SHA-256",
        }
    }

    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "SCRAM-SHA-1" => Some(Mechanism::Sha1),
            "SCRAM-SHA-256" => Some(Mechanism::Sha256),
            _ => None,
        }
    }

    /// `scramIterationCount` / `scramSHA256IterationCount` defaults.
    pub fn default_iterations(self) -> u32 {
        match self {
            Mechanism::Sha1 => 10_000,
            Mechanism::Sha256 => 15_000,
        }
    }

    fn hash_len(self) -> usize {
        match self {
            Mechanism::Sha1 => 20,
            Mechanism::Sha256 => 32,
        }
    }

    fn salt_len(self) -> usize {
        self.hash_len() - 4
    }

    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha1 => {
                let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            Mechanism::Sha256 => {
                let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
                    .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Mechanism::Sha1 => Sha1::digest(data).to_vec(),
            Mechanism::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    /// `Hi(password, salt, i)`: PBKDF2 with this mechanism's HMAC.
    fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.hash_len()];
        match self {
            Mechanism::Sha1 => pbkdf2::pbkdf2::<Hmac<Sha1>>(password, salt, iterations, &mut out),
            Mechanism::Sha256 => {
                pbkdf2::pbkdf2::<Hmac<Sha256>>(password, salt, iterations, &mut out)
            }
        }
        .unwrap_or_else(|_| unreachable!("PBKDF2 output length is the hash length"));
        out
    }

    /// What MongoDB feeds to PBKDF2 for `user`'s `password` under this mechanism.
    pub fn normalize_password(self, user: &str, password: &str) -> Result<String, ScramError> {
        match self {
            Mechanism::Sha1 => Ok(password_digest(user, password)),
            Mechanism::Sha256 => stringprep::saslprep(password)
                .map(|p| p.into_owned())
                .map_err(|_| ScramError::Saslprep),
        }
    }
}

/// `createPasswordDigest`: hex MD5 of `"<user>:mongo:<password>"` (SCRAM-SHA-1's input).
pub fn password_digest(user: &str, password: &str) -> String {
    hex(&Md5::digest(format!("{user}:mongo:{password}").as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("the password cannot be SASLprep'ed (it has prohibited characters)")]
    Saslprep,
    #[error("invalid SCRAM message: {0}")]
    Malformed(String),
    #[error("the nonce does not match")]
    Nonce,
    #[error("authentication failed")]
    Proof,
    #[error("the server's signature does not match")]
    ServerSignature,
}

/// One mechanism's stored credential, as in `credentials.<mechanism>` of a user document.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("iterations", &self.iterations)
            .field("keys", &"<redacted>")
            .finish()
    }
}

impl Credential {
    /// A new credential for a normalized password, with a random salt.
    pub fn new(mech: Mechanism, normalized_password: &str, iterations: u32) -> Credential {
        let mut salt = vec![0u8; mech.salt_len()];
        rand::rng().fill(salt.as_mut_slice());
        Self::with_salt(mech, normalized_password, salt, iterations)
    }

    pub fn with_salt(
        mech: Mechanism,
        normalized_password: &str,
        salt: Vec<u8>,
        iterations: u32,
    ) -> Credential {
        let salted = mech.salted_password(normalized_password.as_bytes(), &salt, iterations);
        let client_key = mech.hmac(&salted, b"Client Key");
        Credential {
            iterations,
            stored_key: mech.hash(&client_key),
            server_key: mech.hmac(&salted, b"Server Key"),
            salt,
        }
    }

    pub fn to_document(&self) -> Document {
        doc! {
            "iterationCount": self.iterations as i32,
            "salt": B64.encode(&self.salt),
            "storedKey": B64.encode(&self.stored_key),
            "serverKey": B64.encode(&self.server_key),
        }
    }

    pub fn from_document(d: &Document) -> Option<Credential> {
        let b = |k: &str| d.get_str(k).ok().and_then(|s| B64.decode(s).ok());
        Some(Credential {
            iterations: crate::config::number(d.get("iterationCount")?)? as u32,
            salt: b("salt")?,
            stored_key: b("storedKey")?,
            server_key: b("serverKey")?,
        })
    }
}

/// `saslname` decoding of RFC 5802: `=2C` is `,`, `=3D` is `=`.
fn decode_saslname(s: &str) -> Result<String, ScramError> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in the user name".into())),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

fn encode_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

fn attr(part: &str, key: char) -> Result<&str, ScramError> {
    part.strip_prefix(key)
        .and_then(|r| r.strip_prefix('='))
        .ok_or_else(|| ScramError::Malformed(format!("expected the {key}= attribute")))
}

fn random_nonce() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill(&mut b);
    B64.encode(b)
}

/// The server side after the client-first message: what the client-final must prove.
#[derive(Debug, Clone)]
pub struct ServerConversation {
    pub mechanism: Mechanism,
    /// The user named in the client-first message.
    pub user: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    credential: Option<Credential>,
}

/// Parses the client-first message: `(user, client-first-bare, client nonce)`.
pub fn parse_client_first(msg: &str) -> Result<(String, String, String), ScramError> {
    // gs2-header: "n," (no channel binding), optional "a=authzid", ","
    let rest = if let Some(r) = msg.strip_prefix("n,") {
        r
    } else if msg.starts_with("p=") || msg.starts_with("y,") {
        return Err(ScramError::Malformed(
            "Server does not support channel binding".into(),
        ));
    } else {
        return Err(ScramError::Malformed(
            "Incorrect SCRAM client message prefix".into(),
        ));
    };
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or_else(|| ScramError::Malformed("missing the GS2 header".into()))?;
    let mut parts = bare.split(',');
    let user = decode_saslname(attr(parts.next().unwrap_or(""), 'n')?)?;
    let nonce = attr(parts.next().unwrap_or(""), 'r')?.to_string();
    if !authzid.is_empty() && decode_saslname(attr(authzid, 'a')?)? != user {
        return Err(ScramError::Malformed(
            "SCRAM authorization identity must match the user name".into(),
        ));
    }
    if nonce.is_empty() {
        return Err(ScramError::Malformed("empty client nonce".into()));
    }
    Ok((user, bare.to_string(), nonce))
}

impl ServerConversation {
    /// Answers the client-first message. `credential` is `None` for an unknown user: the
    /// conversation goes on with a made-up salt and fails at the proof, so that the reply
    /// does not tell which users exist (as the server does).
    pub fn start(
        mechanism: Mechanism,
        client_first: &str,
        credential: impl FnOnce(&str) -> Option<Credential>,
    ) -> Result<(ServerConversation, String), ScramError> {
        let (user, client_first_bare, client_nonce) = parse_client_first(client_first)?;
        let credential = credential(&user);
        let (salt, iterations) = match &credential {
            Some(c) => (c.salt.clone(), c.iterations),
            None => {
                let mut s = vec![0u8; mechanism.salt_len()];
                rand::rng().fill(s.as_mut_slice());
                (s, mechanism.default_iterations())
            }
        };
        let nonce = format!("{client_nonce}{}", random_nonce());
        let server_first = format!("r={nonce},s={},i={iterations}", B64.encode(&salt));
        Ok((
            ServerConversation {
                mechanism,
                user,
                client_first_bare,
                server_first: server_first.clone(),
                nonce,
                credential,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; returns the server-final message (`v=...`).
    pub fn finish(&self, client_final: &str) -> Result<String, ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or_else(|| ScramError::Malformed("missing the proof".into()))?;
        let mut parts = without_proof.split(',');
        let cbind = attr(parts.next().unwrap_or(""), 'c')?;
        if cbind != "biws" {
            return Err(ScramError::Malformed(
                "Unexpected channel binding data".into(),
            ));
        }
        if attr(parts.next().unwrap_or(""), 'r')? != self.nonce {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("the proof is not base64".into()))?;
        let Some(cred) = &self.credential else {
            return Err(ScramError::Proof);
        };
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let m = self.mechanism;
        let signature = m.hmac(&cred.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(ScramError::Proof);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if m.hash(&client_key) != cred.stored_key {
            return Err(ScramError::Proof);
        }
        let server_signature = m.hmac(&cred.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The client side, for member-to-member authentication.
#[derive(Debug, Clone)]
pub struct ClientConversation {
    mechanism: Mechanism,
    normalized_password: String,
    client_first_bare: String,
    client_nonce: String,
}

/// What the client computed for the final message, kept to check the server's signature.
#[derive(Debug, Clone)]
pub struct ClientFinal {
    pub message: String,
    server_signature: Vec<u8>,
}

impl ClientConversation {
    pub fn new(
        mechanism: Mechanism,
        user: &str,
        password: &str,
    ) -> Result<(ClientConversation, String), ScramError> {
        let normalized_password = mechanism.normalize_password(user, password)?;
        let client_nonce = random_nonce();
        let client_first_bare = format!("n={},r={client_nonce}", encode_saslname(user));
        Ok((
            ClientConversation {
                mechanism,
                normalized_password,
                client_first_bare: client_first_bare.clone(),
                client_nonce,
            },
            format!("n,,{client_first_bare}"),
        ))
    }

    /// The client-final message for the server-first message.
    pub fn respond(&self, server_first: &str) -> Result<ClientFinal, ScramError> {
        let mut parts = server_first.split(',');
        let nonce = attr(parts.next().unwrap_or(""), 'r')?;
        let salt = B64
            .decode(attr(parts.next().unwrap_or(""), 's')?)
            .map_err(|_| ScramError::Malformed("the salt is not base64".into()))?;
        let iterations: u32 = attr(parts.next().unwrap_or(""), 'i')?
            .parse()
            .map_err(|_| ScramError::Malformed("bad iteration count".into()))?;
        if !nonce.starts_with(&self.client_nonce) || iterations == 0 {
            return Err(ScramError::Nonce);
        }
        let m = self.mechanism;
        let salted = cached_salted_password(m, &self.normalized_password, &salt, iterations);
        let client_key = m.hmac(&salted, b"Client Key");
        let stored_key = m.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = m.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = m.hmac(&salted, b"Server Key");
        Ok(ClientFinal {
            message: format!("{without_proof},p={}", B64.encode(proof)),
            server_signature: m.hmac(&server_key, auth_message.as_bytes()),
        })
    }
}

/// The salted password for a (password, salt, iterations), computed once per process, as
/// the drivers cache it: a member's `__system` salt does not change while it runs, so a
/// member reconnecting to a peer does not redo PBKDF2 each time.
fn cached_salted_password(m: Mechanism, password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    type Key = (Mechanism, Vec<u8>, Vec<u8>, u32);
    static CACHE: OnceLock<Mutex<HashMap<Key, Vec<u8>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Keyed by a hash of the password, so the cache holds no password.
    let key = (m, m.hash(password.as_bytes()), salt.to_vec(), iterations);
    if let Some(v) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return v;
    }
    let v = m.salted_password(password.as_bytes(), salt, iterations);
    if let Ok(mut c) = cache.lock() {
        c.insert(key, v.clone());
    }
    v
}

impl ClientFinal {
    pub fn verify(&self, server_final: &str) -> Result<(), ScramError> {
        let v = server_final
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("v="))
            .ok_or(ScramError::ServerSignature)?;
        match B64.decode(v) {
            Ok(sig) if sig == self.server_signature => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's side of an RFC example after its first message (user "user", password
    /// "pencil", the RFC's salt, 4096 iterations, the client's nonce and the combined one):
    /// the client's final message with `proof` is accepted with the RFC's `signature`.
    fn rfc_example(
        mechanism: Mechanism,
        [salt, client_nonce, nonce]: [&str; 3],
        proof: &str,
        signature: &str,
    ) -> ServerConversation {
        let salt_bytes = B64.decode(salt).expect("salt");
        let conv = ServerConversation {
            mechanism,
            user: "user".into(),
            client_first_bare: format!("n=user,r={client_nonce}"),
            server_first: format!("r={nonce},s={salt},i=4096"),
            nonce: nonce.into(),
            credential: Some(Credential::with_salt(mechanism, "pencil", salt_bytes, 4096)),
        };
        let v = conv
            .finish(&format!("c=biws,r={nonce},p={proof}"))
            .expect("the RFC's proof is valid");
        assert_eq!(v, format!("v={signature}"));
        conv
    }

    /// RFC 7677 section 3: user "user", password "pencil", 4096 iterations.
    #[test]
    fn rfc7677_example_verifies() {
        let conv = rfc_example(
            Mechanism::Sha256,
            [
                "W22ZaJ0SNY7soEsUEjb6gQ==",
                "rOprNGfwEbeRWgbNEkqO",
                "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            ],
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
        let wrong = conv.finish("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert_eq!(wrong, Err(ScramError::Proof));
    }

    /// RFC 5802 section 5 (SCRAM-SHA-1 on the raw password, before MongoDB's digest).
    #[test]
    fn rfc5802_example_verifies() {
        rfc_example(
            Mechanism::Sha1,
            [
                "QSXCR+Q6sek8bf92",
                "fyko+d2lbbFgONRv9qkxdawL",
                "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j",
            ],
            "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        );
    }

    #[test]
    fn client_and_server_agree_and_a_wrong_password_fails() {
        for mech in [Mechanism::Sha1, Mechanism::Sha256] {
            let stored = Credential::new(
                mech,
                &mech.normalize_password("alice", "s3cret").expect("prep"),
                4096,
            );
            for (password, ok) in [("s3cret", true), ("wrong", false)] {
                let (client, first) =
                    ClientConversation::new(mech, "alice", password).expect("client");
                let (server, server_first) = ServerConversation::start(mech, &first, |u| {
                    (u == "alice").then(|| stored.clone())
                })
                .expect("start");
                assert_eq!(server.user, "alice");
                let fin = client.respond(&server_first).expect("respond");
                match server.finish(&fin.message) {
                    Ok(v) => {
                        assert!(ok, "{mech:?}: a wrong password was accepted");
                        fin.verify(&v).expect("server signature");
                    }
                    Err(e) => {
                        assert!(!ok, "{mech:?}: the right password failed: {e}");
                        assert_eq!(e, ScramError::Proof);
                    }
                }
            }
        }
    }

    #[test]
    fn mongodb_password_digest() {
        // The MD5 of "user:mongo:pencil" (computed with Python's hashlib.md5).
        assert_eq!(
            password_digest("user", "pencil"),
            "1c33006ec1ffd90f9cadcbcc0e118200"
        );
    }

    #[test]
    fn channel_binding_and_bad_messages_are_refused() {
        let none = |_: &str| None;
        assert!(
            ServerConversation::start(Mechanism::Sha256, "p=tls-unique,,n=u,r=x", none).is_err()
        );
        assert!(ServerConversation::start(Mechanism::Sha256, "n,,r=x", none).is_err());
        assert!(ServerConversation::start(Mechanism::Sha256, "n,a=bob,n=alice,r=x", none).is_err());
        let (c, _) = ServerConversation::start(Mechanism::Sha256, "n,,n=a=2Cb,r=x", none)
            .expect("escaped name");
        assert_eq!(c.user, "a,b");
    }
}
