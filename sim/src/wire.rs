//! The MongoDB wire protocol, as far as a replica-set member needs it.
//!
//! Every message starts with a 16-byte header (`messageLength`, `requestID`, `responseTo`,
//! `opCode`, all little-endian int32). The simulator understands:
//! - `OP_MSG` (2013): flag bits, then sections: kind 0 is the command body, kind 1 is a
//!   document sequence (`documents` of an insert) that belongs in the body under its
//!   identifier. Bit 0 (`checksumPresent`) adds a CRC-32C of the whole message at its end,
//!   which we verify on input; bit 1 (`moreToCome`) means no reply is expected.
//! - `OP_QUERY` (2004) on `<db>.$cmd`, which drivers still use for the first `hello` /
//!   `isMaster` of a connection, answered with `OP_REPLY` (1).
//!
//! Compression (`OP_COMPRESSED`) is not offered in `hello`, so no driver sends it.

use bson::Document;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const OP_REPLY: i32 = 1;
pub const OP_QUERY: i32 = 2004;
pub const OP_MSG: i32 = 2013;
pub const OP_COMPRESSED: i32 = 2012;

/// `maxMessageSizeBytes` of MongoDB 7.0.
pub const MAX_MESSAGE_SIZE: usize = 48_000_000;

const FLAG_CHECKSUM_PRESENT: u32 = 1;
/// `moreToCome`: on a request, no reply is expected; on a reply, another reply follows
/// without a request (the streaming / exhaust protocol).
pub const FLAG_MORE_TO_COME: u32 = 1 << 1;
/// `exhaustAllowed`: the client accepts replies with `moreToCome` to this request.
pub const FLAG_EXHAUST_ALLOWED: u32 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("message length {0} is out of range")]
    BadLength(i32),
    #[error("unsupported opcode {0}")]
    UnsupportedOpcode(i32),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("checksum mismatch: message says {expected:#010x}, computed {actual:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("invalid BSON: {0}")]
    Bson(#[from] bson::de::Error),
    #[error("cannot encode BSON: {0}")]
    BsonEncode(#[from] bson::ser::Error),
}

/// One request, decoded.
#[derive(Debug, Clone)]
pub enum Request {
    /// An OP_MSG command: the body with the document sequences folded in.
    Msg {
        request_id: i32,
        body: Document,
        more_to_come: bool,
        exhaust_allowed: bool,
    },
    /// A legacy OP_QUERY on `<db>.$cmd`.
    Query {
        request_id: i32,
        collection: String,
        query: Document,
    },
}

/// Reads one message. Returns [`WireError::Closed`] on a clean end of stream.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, WireError> {
    let (request_id, _response_to, op_code, payload) = read_frame(r).await?;
    match op_code {
        OP_MSG => {
            let (body, flags) = decode_op_msg(&payload)?;
            Ok(Request::Msg {
                request_id,
                body,
                more_to_come: flags & FLAG_MORE_TO_COME != 0,
                exhaust_allowed: flags & FLAG_EXHAUST_ALLOWED != 0,
            })
        }
        OP_QUERY => decode_op_query(request_id, &payload),
        other => Err(WireError::UnsupportedOpcode(other)),
    }
}

/// Reads one OP_MSG reply (used by the member-to-member client).
pub async fn read_reply<R: AsyncRead + Unpin>(r: &mut R) -> Result<(i32, Document), WireError> {
    let (_request_id, response_to, op_code, payload) = read_frame(r).await?;
    if op_code != OP_MSG {
        return Err(WireError::UnsupportedOpcode(op_code));
    }
    let (body, _) = decode_op_msg(&payload)?;
    Ok((response_to, body))
}

/// Reads a frame: header fields and the bytes after the header. The payload keeps the header
/// in front so that the checksum can be computed over the whole message.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(i32, i32, i32, Vec<u8>), WireError> {
    let mut header = [0u8; 16];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = le_i32(&header[0..4]);
    if len < 16 || len as usize > MAX_MESSAGE_SIZE {
        return Err(WireError::BadLength(len));
    }
    let request_id = le_i32(&header[4..8]);
    let response_to = le_i32(&header[8..12]);
    let op_code = le_i32(&header[12..16]);
    let mut msg = vec![0u8; len as usize];
    msg[..16].copy_from_slice(&header);
    r.read_exact(&mut msg[16..]).await?;
    Ok((request_id, response_to, op_code, msg))
}

fn le_i32(b: &[u8]) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    i32::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Reads a BSON document at the start of `b` and returns it with its length.
fn read_document(b: &[u8]) -> Result<(Document, usize), WireError> {
    if b.len() < 5 {
        return Err(WireError::Malformed("truncated document"));
    }
    let len = le_i32(b);
    if len < 5 || len as usize > b.len() {
        return Err(WireError::Malformed("document length out of range"));
    }
    let doc = Document::from_reader(&b[..len as usize])?;
    Ok((doc, len as usize))
}

fn decode_op_msg(msg: &[u8]) -> Result<(Document, u32), WireError> {
    if msg.len() < 21 {
        return Err(WireError::Malformed("OP_MSG too short"));
    }
    let flags = le_u32(&msg[16..20]);
    let mut end = msg.len();
    if flags & FLAG_CHECKSUM_PRESENT != 0 {
        end -= 4;
        let expected = le_u32(&msg[end..]);
        let actual = crc32c(&msg[..end]);
        if expected != actual {
            return Err(WireError::Checksum { expected, actual });
        }
    }
    let mut pos = 20;
    let mut body: Option<Document> = None;
    let mut sequences: Vec<(String, Vec<bson::Bson>)> = Vec::new();
    while pos < end {
        let kind = msg[pos];
        pos += 1;
        match kind {
            0 => {
                let (doc, n) = read_document(&msg[pos..end])?;
                pos += n;
                body = Some(doc);
            }
            1 => {
                if pos + 4 > end {
                    return Err(WireError::Malformed("truncated document sequence"));
                }
                let size = le_i32(&msg[pos..]) as usize;
                if size < 4 || pos + size > end {
                    return Err(WireError::Malformed("document sequence size out of range"));
                }
                let seq_end = pos + size;
                let mut p = pos + 4;
                let nul = msg[p..seq_end]
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or(WireError::Malformed("unterminated sequence identifier"))?;
                let ident = String::from_utf8_lossy(&msg[p..p + nul]).into_owned();
                p += nul + 1;
                let mut docs = Vec::new();
                while p < seq_end {
                    let (doc, n) = read_document(&msg[p..seq_end])?;
                    p += n;
                    docs.push(bson::Bson::Document(doc));
                }
                sequences.push((ident, docs));
                pos = seq_end;
            }
            _ => return Err(WireError::Malformed("unknown OP_MSG section kind")),
        }
    }
    let mut body = body.ok_or(WireError::Malformed("OP_MSG without a body section"))?;
    for (ident, docs) in sequences {
        body.insert(ident, bson::Bson::Array(docs));
    }
    Ok((body, flags))
}

fn decode_op_query(request_id: i32, msg: &[u8]) -> Result<Request, WireError> {
    // flags(4) fullCollectionName(cstring) numberToSkip(4) numberToReturn(4) query [fields]
    let mut pos = 20;
    let nul = msg
        .get(pos..)
        .and_then(|s| s.iter().position(|&c| c == 0))
        .ok_or(WireError::Malformed("unterminated collection name"))?;
    let collection = String::from_utf8_lossy(&msg[pos..pos + nul]).into_owned();
    pos += nul + 1 + 8;
    if pos >= msg.len() {
        return Err(WireError::Malformed("OP_QUERY without a query"));
    }
    let (mut query, _) = read_document(&msg[pos..])?;
    // A wrapped query: {$query: {...}, $readPreference: ...}.
    if let Ok(inner) = query.get_document("$query") {
        query = inner.clone();
    }
    Ok(Request::Query {
        request_id,
        collection,
        query,
    })
}

/// A message's header with its length left at 0 for [`finish`] to fill in.
fn header(request_id: i32, response_to: i32, op_code: i32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&0i32.to_le_bytes());
    buf.extend_from_slice(&request_id.to_le_bytes());
    buf.extend_from_slice(&response_to.to_le_bytes());
    buf.extend_from_slice(&op_code.to_le_bytes());
    buf
}

/// Appends the last document of a message and writes the message's length.
fn finish(mut buf: Vec<u8>, last: &Document) -> Result<Vec<u8>, WireError> {
    last.to_writer(&mut buf)?;
    let len = buf.len() as i32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// Encodes an OP_MSG with one body section and no checksum.
pub fn encode_op_msg(
    request_id: i32,
    response_to: i32,
    body: &Document,
) -> Result<Vec<u8>, WireError> {
    encode_op_msg_with_flags(request_id, response_to, 0, body)
}

/// Encodes an OP_MSG with the given flag bits (e.g. [`FLAG_MORE_TO_COME`]).
pub fn encode_op_msg_with_flags(
    request_id: i32,
    response_to: i32,
    flags: u32,
    body: &Document,
) -> Result<Vec<u8>, WireError> {
    let mut buf = header(request_id, response_to, OP_MSG);
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.push(0);
    finish(buf, body)
}

/// Encodes an OP_REPLY with one document, the answer to a legacy OP_QUERY.
pub fn encode_op_reply(
    request_id: i32,
    response_to: i32,
    doc: &Document,
) -> Result<Vec<u8>, WireError> {
    let mut buf = header(request_id, response_to, OP_REPLY);
    buf.extend_from_slice(&0i32.to_le_bytes()); // responseFlags
    buf.extend_from_slice(&0i64.to_le_bytes()); // cursorID
    buf.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
    buf.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
    finish(buf, doc)
}

/// Writes a whole message.
pub async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, msg: &[u8]) -> Result<(), WireError> {
    w.write_all(msg).await?;
    w.flush().await?;
    Ok(())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as OP_MSG checksums use.
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[tokio::test]
    async fn op_msg_with_checksum_and_sequence_round_trips() -> Result<(), WireError> {
        let mut buf = header(7, 0, OP_MSG);
        buf.extend_from_slice(&FLAG_CHECKSUM_PRESENT.to_le_bytes());
        buf.push(0);
        doc! {"insert": "c", "$db": "test"}.to_writer(&mut buf)?;
        buf.push(1);
        let mut seq = Vec::new();
        seq.extend_from_slice(b"documents\0");
        doc! {"a": 1}.to_writer(&mut seq)?;
        doc! {"a": 2}.to_writer(&mut seq)?;
        buf.extend_from_slice(&((seq.len() + 4) as i32).to_le_bytes());
        buf.extend_from_slice(&seq);
        let total = buf.len() + 4;
        buf[..4].copy_from_slice(&(total as i32).to_le_bytes());
        let crc = crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        let req = read_request(&mut &buf[..]).await?;
        match req {
            Request::Msg {
                request_id, body, ..
            } => {
                assert_eq!(request_id, 7);
                assert_eq!(body.get_array("documents").map(|a| a.len()).ok(), Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }
        // A corrupted byte fails the checksum.
        let mut bad = buf.clone();
        bad[30] ^= 0xff;
        assert!(matches!(
            read_request(&mut &bad[..]).await,
            Err(WireError::Checksum { .. }) | Err(WireError::Bson(_))
        ));
        Ok(())
    }
}
