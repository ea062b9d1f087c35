//! `saslStart` / `saslContinue` (src/mongo/db/auth/sasl_commands.cpp) on the server side, and
//! the same exchange as a client, which members run on every new connection to a peer when
//! they hold a key file (internal authentication as `__system@local`,
//! src/mongo/client/authenticate.cpp `authenticateInternalClient`).
//!
//! The replies are MongoDB's: `{conversationId, done, payload: BinData(0)}`; a failure of the
//! proof (wrong password, unknown user) is AuthenticationFailed (18) "Authentication
//! failed."; an unknown mechanism MechanismUnavailable (334).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

use super::scram::{ClientConversation, Mechanism, ScramError, ServerConversation};
use super::users::{user_credential, UserName};
use super::{ClientSession, KeyFile, SystemCredentials};
use crate::error::ServerError;
use crate::wire;

/// A conversation in progress on one connection.
#[derive(Debug, Clone)]
pub(crate) struct Conversation {
    db: String,
    scram: ServerConversation,
    /// The proof was checked; only the client's empty closing message is left.
    proved: bool,
    /// The client asked for `options.skipEmptyExchange`: done with the server's `v=`.
    skip_empty: bool,
}

fn auth_failed() -> ServerError {
    ServerError::authentication_failed("Authentication failed.")
}

/// The payload of a SASL command: BinData, or a base64 string (older shells).
fn payload(body: &Document) -> Result<(Vec<u8>, bool), ServerError> {
    match body.get("payload") {
        Some(Bson::Binary(b)) => Ok((b.bytes.clone(), true)),
        Some(Bson::String(s)) => B64
            .decode(s)
            .map(|b| (b, false))
            .map_err(|_| ServerError::bad_value("Invalid base64 payload")),
        _ => Err(ServerError::bad_value("Missing required field: payload")),
    }
}

fn reply_payload(bytes: &[u8], binary: bool) -> Bson {
    if binary {
        Bson::Binary(Binary {
            subtype: BinarySubtype::Generic,
            bytes: bytes.to_vec(),
        })
    } else {
        Bson::String(B64.encode(bytes))
    }
}

fn scram_error(e: ScramError) -> ServerError {
    match e {
        ScramError::Proof | ScramError::Nonce => auth_failed(),
        ScramError::Malformed(m) => ServerError::bad_value(m),
        other => ServerError::bad_value(other.to_string()),
    }
}

/// `saslStart` on `db`. `user_doc` finds a user document of admin.system.users; `system`
/// is the key file's `__system` credential when the member has one.
pub fn sasl_start(
    session: &mut ClientSession,
    body: &Document,
    db: &str,
    user_doc: impl Fn(&UserName) -> Option<Document>,
    system: Option<&SystemCredentials>,
) -> Result<Document, ServerError> {
    let mech_name = body.get_str("mechanism").unwrap_or("");
    let Some(mech) = Mechanism::parse(mech_name) else {
        return Err(ServerError::mechanism_unavailable(format!(
            "Received authentication for mechanism {mech_name} which is unknown or not enabled"
        )));
    };
    let (bytes, binary) = payload(body)?;
    let text =
        String::from_utf8(bytes).map_err(|_| ServerError::bad_value("payload is not UTF-8"))?;
    let (scram, server_first) = ServerConversation::start(mech, &text, |user| {
        let name = UserName::new(user, db);
        if name == UserName::system() {
            return system.map(|s| s.get(mech));
        }
        user_doc(&name).and_then(|d| user_credential(&d, mech))
    })
    .map_err(scram_error)?;
    if session.user.is_some() && session.user.as_ref() != Some(&UserName::new(&scram.user, db)) {
        // AuthorizationSessionImpl::addAndAuthorizeUser
        return Err(ServerError {
            code: 5626702,
            code_name: "Location5626702",
            message: format!(
                "Client has attempted to authenticate on multiple databases.Already authenticated as: {}",
                session.user.as_ref().map(|u| u.to_string()).unwrap_or_default()
            ),
        });
    }
    let skip_empty = body
        .get_document("options")
        .ok()
        .and_then(|o| o.get_bool("skipEmptyExchange").ok())
        == Some(true);
    let id = session.next_conversation;
    session.next_conversation += 1;
    session.conversations.insert(
        id,
        Conversation {
            db: db.to_string(),
            scram,
            proved: false,
            skip_empty,
        },
    );
    Ok(doc! {
        "conversationId": id,
        "done": false,
        "payload": reply_payload(server_first.as_bytes(), binary),
    })
}

/// `saslContinue`.
pub fn sasl_continue(
    session: &mut ClientSession,
    body: &Document,
) -> Result<Document, ServerError> {
    let id = body
        .get("conversationId")
        .and_then(crate::config::number)
        .unwrap_or(-1) as i32;
    let Some(conv) = session.conversations.get(&id).cloned() else {
        return Err(ServerError::protocol_error("No SASL session state found"));
    };
    let (bytes, binary) = payload(body)?;
    if conv.proved {
        session.conversations.remove(&id);
        return done(session, &conv, id, Vec::new(), binary);
    }
    let text =
        String::from_utf8(bytes).map_err(|_| ServerError::bad_value("payload is not UTF-8"))?;
    match conv.scram.finish(&text) {
        Ok(server_final) => {
            if conv.skip_empty {
                session.conversations.remove(&id);
                done(session, &conv, id, server_final.into_bytes(), binary)
            } else {
                if let Some(c) = session.conversations.get_mut(&id) {
                    c.proved = true;
                }
                Ok(
                    doc! {"conversationId": id, "done": false, "payload": reply_payload(server_final.as_bytes(), binary)},
                )
            }
        }
        Err(e) => {
            session.conversations.remove(&id);
            tracing::info!(user = %conv.scram.user, db = %conv.db, mechanism = conv.scram.mechanism.name(), "authentication failed");
            Err(scram_error(e))
        }
    }
}

fn done(
    session: &mut ClientSession,
    conv: &Conversation,
    id: i32,
    payload: Vec<u8>,
    binary: bool,
) -> Result<Document, ServerError> {
    let user = UserName::new(&conv.scram.user, &conv.db);
    tracing::debug!(user = %user, mechanism = conv.scram.mechanism.name(), "authenticated");
    session.user = Some(user);
    Ok(doc! {"conversationId": id, "done": true, "payload": reply_payload(&payload, binary)})
}

#[derive(Debug, thiserror::Error)]
pub enum InternalAuthError {
    #[error("wire error: {0}")]
    Wire(#[from] wire::WireError),
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    #[error("{0}")]
    Refused(String),
    #[error("timed out")]
    Timeout,
}

/// Authenticates a fresh connection to a peer as `__system@local` with SCRAM-SHA-256.
pub async fn authenticate_internal<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &KeyFile,
    timeout: Duration,
) -> Result<(), InternalAuthError> {
    tokio::time::timeout(timeout, async {
        let (client, first) = ClientConversation::new(Mechanism::Sha256, "__system", key.secret())?;
        let start = doc! {
            "saslStart": 1,
            "mechanism": "SCRAM-SHA-256",
            "payload": reply_payload(first.as_bytes(), true),
            "options": {"skipEmptyExchange": true},
            "$db": "local",
        };
        let r = exchange(stream, &start).await?;
        let server_first = reply_bytes(&r)?;
        let fin = client.respond(&String::from_utf8_lossy(&server_first))?;
        let id = r.get("conversationId").cloned().unwrap_or(Bson::Int32(1));
        let cont = doc! {
            "saslContinue": 1,
            "conversationId": id.clone(),
            "payload": reply_payload(fin.message.as_bytes(), true),
            "$db": "local",
        };
        let mut r = exchange(stream, &cont).await?;
        fin.verify(&String::from_utf8_lossy(&reply_bytes(&r)?))?;
        if !r.get_bool("done").unwrap_or(false) {
            let last = doc! {"saslContinue": 1, "conversationId": id, "payload": reply_payload(b"", true), "$db": "local"};
            r = exchange(stream, &last).await?;
            if !r.get_bool("done").unwrap_or(false) {
                return Err(InternalAuthError::Refused("the conversation did not end".into()));
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| InternalAuthError::Timeout)?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cmd: &Document,
) -> Result<Document, InternalAuthError> {
    let msg = wire::encode_op_msg(1, 0, cmd)?;
    wire::write_all(stream, &msg).await?;
    let (_, reply) = wire::read_reply(stream).await?;
    if reply.get("ok").and_then(crate::config::float) != Some(1.0) {
        return Err(InternalAuthError::Refused(
            reply
                .get_str("errmsg")
                .unwrap_or("authentication refused")
                .to_string(),
        ));
    }
    Ok(reply)
}

fn reply_bytes(r: &Document) -> Result<Vec<u8>, InternalAuthError> {
    match r.get("payload") {
        Some(Bson::Binary(b)) => Ok(b.bytes.clone()),
        Some(Bson::String(s)) => B64
            .decode(s)
            .map_err(|_| InternalAuthError::Refused("bad payload".into())),
        _ => Err(InternalAuthError::Refused("no payload".into())),
    }
}
