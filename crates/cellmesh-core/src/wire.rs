//! Frames on a stream transport, and the messages sessions carry.
//!
//! ```text
//! frame   = length:u32 || type:u8 || body            length = 1 + body length, at most MAX_FRAME
//! type    1 handshake hello     body = Noise XX message 1 (→ e)
//!         2 handshake response  body = Noise XX message 2 (← e, ee, s, es; payload = responder's node token)
//!         3 handshake finish    body = Noise XX message 3 (→ s, se; payload = initiator's node token)
//!         16 session            body = epoch:u32 || counter:u64 || AES-256-GCM(plaintext) (see session)
//! plaintext = message type:u8 || fields
//! ```
//!
//! A frame is parsed only once it is whole: [`split_frame`] returns `Ok(None)` until all of
//! its bytes have arrived, and refuses a length over [`MAX_FRAME`] before anything is
//! allocated for it.

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, check_len, put_bytes8};
use crate::token::{MAX_TOKEN_LEN, Token};

/// Largest application payload one DATA message carries.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest frame (type byte and body) accepted: a full DATA message plus headers and tag.
pub const MAX_FRAME: usize = MAX_PAYLOAD + 64;
/// Length of the frame length prefix.
pub const LEN_PREFIX: usize = 4;
/// Largest handshake message (Noise's limit).
pub const MAX_HANDSHAKE: usize = 65535;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// Noise XX message 1.
    Hello,
    /// Noise XX message 2.
    Response,
    /// Noise XX message 3.
    Finish,
    /// An encrypted session frame.
    Session,
}

impl FrameType {
    /// The type byte.
    pub fn code(self) -> u8 {
        match self {
            Self::Hello => 1,
            Self::Response => 2,
            Self::Finish => 3,
            Self::Session => 16,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Hello,
            2 => Self::Response,
            3 => Self::Finish,
            16 => Self::Session,
            _ => return None,
        })
    }
}

/// Splits one whole frame off the front of `buf`: its type, the range of its body within
/// `buf`, and how many bytes it took. `Ok(None)` means more bytes are needed.
pub fn split_frame(buf: &[u8]) -> Result<Option<(FrameType, std::ops::Range<usize>)>, DecodeError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut r = Reader::new(prefix);
    let len = r.u32()? as usize;
    if len == 0 {
        return Err(DecodeError::Invalid("empty frame"));
    }
    check_len("frame", len, MAX_FRAME)?;
    let Some(&code) = buf.get(LEN_PREFIX) else {
        return Ok(None);
    };
    let kind = FrameType::from_code(code).ok_or(DecodeError::Invalid("frame type"))?;
    if kind != FrameType::Session {
        check_len("handshake message", len - 1, MAX_HANDSHAKE)?;
    }
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    Ok(Some((kind, LEN_PREFIX + 1..LEN_PREFIX + len)))
}

/// The type of the frame at the front of `buf`, once its header has arrived (whatever its
/// length), so a receiver can refuse a frame it does not expect before buffering it.
pub fn peek_frame_type(buf: &[u8]) -> Option<FrameType> {
    buf.get(LEN_PREFIX).copied().and_then(FrameType::from_code)
}

/// Appends a frame of `kind` whose body is `body`.
pub fn put_frame(out: &mut Vec<u8>, kind: FrameType, body: &[u8]) {
    put_frame_header(out, kind, body.len());
    out.extend_from_slice(body);
}

/// Appends the length prefix and type byte of a frame whose body will be `body_len` bytes.
pub fn put_frame_header(out: &mut Vec<u8>, kind: FrameType, body_len: usize) {
    out.extend_from_slice(&((body_len + 1) as u32).to_be_bytes());
    out.push(kind.code());
}

/// Why a join was refused. Sent in NACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NackCode {
    /// The identity could not be authenticated (bad token, or it does not bind to the node).
    Unauthenticated,
    /// Authenticated, but not allowed to join.
    Unauthorized,
    /// The device or cell has been revoked.
    Revoked,
    /// The identity is not in the realm this node requires.
    NotInRealm,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// The node is at a limit; try later.
    Busy,
    /// A code this version does not know.
    Other(u8),
}

impl NackCode {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unauthenticated => 1,
            Self::Unauthorized => 2,
            Self::Revoked => 3,
            Self::NotInRealm => 4,
            Self::ProtocolViolation => 5,
            Self::Busy => 6,
            Self::Other(c) => c,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::Unauthenticated,
            2 => Self::Unauthorized,
            3 => Self::Revoked,
            4 => Self::NotInRealm,
            5 => Self::ProtocolViolation,
            6 => Self::Busy,
            c => Self::Other(c),
        }
    }

    /// A short lowercase name, for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Unauthorized => "unauthorized",
            Self::Revoked => "revoked",
            Self::NotInRealm => "not_in_realm",
            Self::ProtocolViolation => "protocol_violation",
            Self::Busy => "busy",
            Self::Other(_) => "other",
        }
    }
}

/// Why a session was closed. Sent in CLOSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// An orderly close.
    Normal,
    /// The peer broke the protocol.
    ProtocolViolation,
    /// Too many frames failed authentication.
    BadFrames,
    /// Nothing was heard for too long.
    Idle,
    /// A stage (handshake, join) took too long.
    Timeout,
    /// The node is shutting down.
    Shutdown,
    /// A code this version does not know.
    Other(u8),
}

impl CloseCode {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::ProtocolViolation => 1,
            Self::BadFrames => 2,
            Self::Idle => 3,
            Self::Timeout => 4,
            Self::Shutdown => 5,
            Self::Other(c) => c,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Normal,
            1 => Self::ProtocolViolation,
            2 => Self::BadFrames,
            3 => Self::Idle,
            4 => Self::Timeout,
            5 => Self::Shutdown,
            c => Self::Other(c),
        }
    }
}

/// A message inside a session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Initiator → responder: the identity (cell identity token) using this node.
    Join {
        /// The cell's identity token naming the initiator's node.
        identity: Token,
    },
    /// Responder → initiator: joined; the responder's own identity.
    Ack {
        /// The cell's identity token naming the responder's node.
        identity: Token,
    },
    /// Responder → initiator: refused. The session ends after it.
    Nack {
        /// Why.
        code: NackCode,
        /// Human-readable detail (at most 255 bytes).
        reason: String,
    },
    /// A node tells its peers of a node that joined it.
    Update {
        /// The new node's node token.
        node: Box<Token>,
        /// Its cell's identity token.
        identity: Box<Token>,
    },
    /// Keepalive request.
    Ping(u64),
    /// Keepalive answer.
    Pong(u64),
    /// Application data.
    Data(Bytes),
    /// The sender closes the session.
    Close {
        /// Why.
        code: CloseCode,
        /// Detail (at most 255 bytes).
        reason: String,
    },
}

const JOIN: u8 = 1;
const ACK: u8 = 2;
const NACK: u8 = 3;
const UPDATE: u8 = 4;
const PING: u8 = 5;
const PONG: u8 = 6;
const DATA: u8 = 7;
const CLOSE: u8 = 8;

impl Message {
    /// Exact length of [`Message::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Self::Join { identity } | Self::Ack { identity } => identity.encoded_len(),
            Self::Nack { reason, .. } | Self::Close { reason, .. } => 2 + truncate(reason).len(),
            Self::Update { node, identity } => 2 + node.encoded_len() + identity.encoded_len(),
            Self::Ping(_) | Self::Pong(_) => 8,
            Self::Data(d) => d.len(),
        }
    }

    /// Appends the encoding. Reasons longer than 255 bytes are cut at a character boundary.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Join { identity } => {
                out.push(JOIN);
                identity.encode(out);
            }
            Self::Ack { identity } => {
                out.push(ACK);
                identity.encode(out);
            }
            Self::Nack { code, reason } => {
                out.extend_from_slice(&[NACK, code.code()]);
                put_bytes8(out, truncate(reason).as_bytes());
            }
            Self::Update { node, identity } => {
                out.push(UPDATE);
                out.extend_from_slice(&(node.encoded_len() as u16).to_be_bytes());
                node.encode(out);
                identity.encode(out);
            }
            Self::Ping(n) => {
                out.push(PING);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Self::Pong(n) => {
                out.push(PONG);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Self::Data(d) => {
                out.push(DATA);
                out.extend_from_slice(d);
            }
            Self::Close { code, reason } => {
                out.extend_from_slice(&[CLOSE, code.code()]);
                put_bytes8(out, truncate(reason).as_bytes());
            }
        }
    }

    /// Decodes one whole message. DATA shares `bytes` rather than copying it.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&bytes);
        let msg = match r.u8()? {
            JOIN => Self::Join {
                identity: rest_token(r)?,
            },
            ACK => Self::Ack {
                identity: rest_token(r)?,
            },
            NACK => {
                let code = NackCode::from_code(r.u8()?);
                let reason = reason(&mut r)?;
                r.finish()?;
                Self::Nack { code, reason }
            }
            UPDATE => {
                let node = Token::decode(r.bytes16("node token", MAX_TOKEN_LEN)?)?;
                Self::Update {
                    node: Box::new(node),
                    identity: Box::new(rest_token(r)?),
                }
            }
            PING | PONG => {
                let ping = bytes[0] == PING;
                let n = r.u64()?;
                r.finish()?;
                if ping { Self::Ping(n) } else { Self::Pong(n) }
            }
            DATA => {
                check_len("data", bytes.len() - 1, MAX_PAYLOAD)?;
                Self::Data(bytes.slice(1..))
            }
            CLOSE => {
                let code = CloseCode::from_code(r.u8()?);
                let reason = reason(&mut r)?;
                r.finish()?;
                Self::Close { code, reason }
            }
            _ => return Err(DecodeError::Invalid("message type")),
        };
        Ok(msg)
    }
}

fn rest_token(mut r: Reader<'_>) -> Result<Token, DecodeError> {
    let n = r.remaining();
    Token::decode(r.bytes(n)?)
}

fn reason(r: &mut Reader<'_>) -> Result<String, DecodeError> {
    let bytes = r.bytes8("reason", 255)?;
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| DecodeError::Invalid("reason"))
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_only_when_whole() {
        let mut out = Vec::new();
        put_frame(&mut out, FrameType::Hello, b"abc");
        for n in 0..out.len() {
            assert_eq!(split_frame(&out[..n]), Ok(None));
        }
        assert_eq!(split_frame(&out), Ok(Some((FrameType::Hello, 5..8))));
        let mut huge = Vec::new();
        put_frame_header(&mut huge, FrameType::Session, MAX_FRAME);
        assert!(matches!(
            split_frame(&huge),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(split_frame(&[0, 0, 0, 0]).is_err());
        assert!(split_frame(&[0, 0, 0, 1, 9]).is_err());
    }

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        let msg = Message::Close {
            code: CloseCode::Normal,
            reason: "é".repeat(200),
        };
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(out.len(), msg.encoded_len());
        match Message::decode(Bytes::from(out)).unwrap() {
            Message::Close { reason, .. } => assert_eq!(reason.len(), 254),
            other => panic!("{other:?}"),
        }
    }
}
