//! The relay protocol: what a device and a relay say to each other inside a joined link.
//!
//! A relay is a node that devices join with an outbound connection. It keeps a directory of
//! the devices that joined it (their node and identity tokens, which the link already
//! verified), forwards end-to-end envelopes ([`crate::e2e`]) to a device that is online, and
//! stores them for one that is not. It reads only the routing fields below; an envelope is
//! opaque to it.
//!
//! Every link DATA payload between a device and a relay is a batch of one or more records:
//!
//! ```text
//! payload   = { length:u32 record }+            length = record length, 1..=MAX_RECORD
//! record    = kind:u8 fields
//!   device → relay
//!   0x20 LOOKUP     request:u32 cell:[32]
//!   0x21 FORWARD    to_node:[32] id:[16] envelope:rest          envelope ≤ MAX_ENVELOPE
//!   0x22 DELIVERED  count:u16 id:[16]*count                     1 ≤ count ≤ MAX_IDS
//!   0x23 RECEIVE                                                this link takes messages
//!   0x24 REVOKE     request:u32 revocation:bytes16               one signed revocation token
//!   relay → device
//!   0x31 ACCEPTED   to_node:[32] id:[16] status:u8              1 pushed, 2 queued
//!   0x32 REFUSED    to_node:[32] id:[16] code:u8                see RefuseCode
//!   0x33 DELIVER    from_node:[32] id:[16] envelope:rest
//!   0x34 DIRECTORY  request:u32 cell:[32] count:u8 { node_token:bytes16 identity:bytes16 }*
//!                   rcount:u8 { revocation:bytes16 }*            count, rcount ≤ 64
//!   0x35 REVOKED    request:u32 code:u8                          0 accepted, else RefuseCode
//! ```
//!
//! 0x30 was the DIRECTORY of relays before revocations travelled (no `rcount`): it decodes as
//! [`DecodeError::UnsupportedVersion`], so that a mailbox can say its relay is too old
//! rather than that it is broken.
//!
//! Ids in these records are routing fields: they are compared with ids of verified devices,
//! never used to check a signature, so decoding does not check that they are curve points.
//!
//! FORWARD names the recipient *device*; the relay answers each FORWARD with exactly one
//! ACCEPTED or REFUSED for its id. DELIVERED tells the relay that the device has taken the
//! messages with those ids, so the relay may delete them. The tokens in a DIRECTORY are only
//! claims until the asker checks them against the cell id it asked for
//! ([`crate::e2e::Directory::verify`]).

#[cfg(any(test, feature = "testing"))]
pub mod harness;
#[cfg(any(test, feature = "testing"))]
pub mod mem_store;
pub mod server;

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, check_len, put_bytes16};
use crate::id::{CellId, NodeId};
use crate::keys::PublicKey;
use crate::token::{MAX_TOKEN_LEN, Token};
use crate::wire::MAX_PAYLOAD;

/// Largest envelope a FORWARD or DELIVER carries.
pub const MAX_ENVELOPE: usize = MAX_PAYLOAD - 128;
/// Largest record in a relay payload.
pub const MAX_RECORD: usize = MAX_PAYLOAD;
/// Records are batched into link payloads of about this size (a record larger than it goes
/// alone): big enough to amortise framing and encryption, small enough that the buffers are
/// reused from the heap rather than mapped and zeroed by the kernel each time.
pub const MAX_BATCH: usize = 64 * 1024;
/// Most ids in one DELIVERED.
pub const MAX_IDS: usize = 4096;
/// Most devices one DIRECTORY lists.
pub const MAX_DEVICES: usize = 64;
/// Most revocations one DIRECTORY carries (as many as a relay keeps for one cell).
pub const MAX_REVOCATIONS: usize = 64;

/// A message id: 16 random bytes chosen by the sender, the same on every retry, so that
/// receivers and relays can drop duplicates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub [u8; 16]);

impl MsgId {
    /// A fresh random id.
    pub fn random(rng: &mut impl rand_core::CryptoRngCore) -> Self {
        let mut id = [0; 16];
        rng.fill_bytes(&mut id);
        Self(id)
    }

    /// The id as 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl std::fmt::Debug for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MsgId({})", self.to_hex())
    }
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a relay did with a FORWARD it accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Handed to the recipient device's live link.
    Pushed,
    /// Stored durably until the device comes online (or the message's time to live ends).
    Queued,
}

/// Why a relay refused a FORWARD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseCode {
    /// The relay knows no such device.
    UnknownDevice,
    /// The device's queue is at its bound.
    QueueFull,
    /// The sender is over its rate limit; retry later.
    RateLimited,
    /// The envelope is larger than the relay accepts.
    TooLarge,
    /// The relay's policy does not let this sender or recipient use it.
    NotAllowed,
    /// The relay could not store the message (internal error); retry later.
    Unavailable,
    /// A REVOKE whose token does not verify or is no cell's revocation of one of its devices.
    Invalid,
    /// A REVOKE past the most revocations the relay keeps for a cell, or in all.
    TooMany,
    /// A code this version does not know.
    Other(u8),
}

impl RefuseCode {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Self::UnknownDevice => 1,
            Self::QueueFull => 2,
            Self::RateLimited => 3,
            Self::TooLarge => 4,
            Self::NotAllowed => 5,
            Self::Unavailable => 6,
            Self::Invalid => 7,
            Self::TooMany => 8,
            Self::Other(c) => c,
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8) -> Self {
        match code {
            1 => Self::UnknownDevice,
            2 => Self::QueueFull,
            3 => Self::RateLimited,
            4 => Self::TooLarge,
            5 => Self::NotAllowed,
            6 => Self::Unavailable,
            7 => Self::Invalid,
            8 => Self::TooMany,
            c => Self::Other(c),
        }
    }

    /// A short lowercase name, for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownDevice => "unknown_device",
            Self::QueueFull => "queue_full",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::NotAllowed => "not_allowed",
            Self::Unavailable => "unavailable",
            Self::Invalid => "invalid",
            Self::TooMany => "too_many",
            Self::Other(_) => "other",
        }
    }

    /// Whether the same FORWARD may succeed if sent again later.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::QueueFull | Self::RateLimited | Self::Unavailable
        )
    }
}

/// One device as a directory lists it: claims until verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// The device's node token.
    pub node_token: Token,
    /// The cell's identity token for that device.
    pub identity: Token,
}

/// One record of the relay protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Record {
    /// Device → relay: which devices does `cell` have?
    Lookup {
        /// Echoed in the answer.
        request: u32,
        /// The cell asked about.
        cell: CellId,
    },
    /// Device → relay: carry `envelope` to the device `to`.
    Forward {
        /// Recipient device.
        to: NodeId,
        /// Message id.
        id: MsgId,
        /// The end-to-end envelope, opaque to the relay.
        envelope: Bytes,
    },
    /// Device → relay: these messages were taken; delete them.
    Delivered(Vec<MsgId>),
    /// Device → relay: this link takes messages from now on (a link that never says so, as a
    /// one-shot send's, is handed only answers to what it sent: acknowledgements and
    /// RESETs; messages for the device wait in its queue).
    Receive,
    /// Device → relay: keep this revocation, refuse the device it revokes, and hand it to
    /// everyone who looks the cell up. Answered by one REVOKED with the same `request`.
    Revoke {
        /// Echoed in the answer.
        request: u32,
        /// A cell's signed revocation of one of its devices (a claim until the relay checks
        /// it).
        revocation: Box<Token>,
    },
    /// Relay → device: the answer to a LOOKUP (empty when the cell is unknown).
    Directory {
        /// The LOOKUP's request number.
        request: u32,
        /// The cell asked about.
        cell: CellId,
        /// Its devices, as the relay claims them.
        devices: Vec<DirectoryEntry>,
        /// The cell's revocations the relay holds: claims until the asker checks them.
        revocations: Vec<Token>,
    },
    /// Relay → device: the answer to a REVOKE.
    Revoked {
        /// The REVOKE's request number.
        request: u32,
        /// Kept (or already kept), or refused with a code.
        result: Result<(), RefuseCode>,
    },
    /// Relay → device: the FORWARD with this id to this device was accepted.
    Accepted {
        /// Recipient device of the FORWARD.
        to: NodeId,
        /// Message id.
        id: MsgId,
        /// Pushed or queued.
        status: Accepted,
    },
    /// Relay → device: the FORWARD with this id to this device was refused.
    Refused {
        /// Recipient device of the FORWARD.
        to: NodeId,
        /// Message id.
        id: MsgId,
        /// Why.
        code: RefuseCode,
    },
    /// Relay → device: an envelope from the device `from`.
    Deliver {
        /// Sending device, as the relay's link authenticated it.
        from: NodeId,
        /// Message id.
        id: MsgId,
        /// The end-to-end envelope.
        envelope: Bytes,
    },
}

const LOOKUP: u8 = 0x20;
const FORWARD: u8 = 0x21;
const DELIVERED: u8 = 0x22;
const RECEIVE: u8 = 0x23;
const REVOKE: u8 = 0x24;
/// The DIRECTORY of relays without revocations; no longer spoken.
const DIRECTORY_V1: u8 = 0x30;
const ACCEPTED: u8 = 0x31;
const REFUSED: u8 = 0x32;
const DELIVER: u8 = 0x33;
const DIRECTORY: u8 = 0x34;
const REVOKED: u8 = 0x35;

impl Record {
    /// Exact length of [`Record::encode`]'s output (without the batch length prefix).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Self::Lookup { .. } => 4 + 32,
            Self::Forward { envelope, .. } => 32 + 16 + envelope.len(),
            Self::Delivered(ids) => 2 + 16 * ids.len(),
            Self::Receive => 0,
            Self::Revoke { revocation, .. } => 4 + 2 + revocation.encoded_len(),
            Self::Directory {
                devices,
                revocations,
                ..
            } => {
                4 + 32
                    + 1
                    + devices
                        .iter()
                        .map(|d| 4 + d.node_token.encoded_len() + d.identity.encoded_len())
                        .sum::<usize>()
                    + 1
                    + revocations
                        .iter()
                        .map(|t| 2 + t.encoded_len())
                        .sum::<usize>()
            }
            Self::Revoked { .. } => 4 + 1,
            Self::Accepted { .. } | Self::Refused { .. } => 32 + 16 + 1,
            Self::Deliver { envelope, .. } => 32 + 16 + envelope.len(),
        }
    }

    /// Appends the record (without the batch length prefix).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Lookup { request, cell } => {
                out.push(LOOKUP);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(cell.key().as_bytes());
            }
            Self::Forward { to, id, envelope } => {
                out.push(FORWARD);
                out.extend_from_slice(to.key().as_bytes());
                out.extend_from_slice(&id.0);
                out.extend_from_slice(envelope);
            }
            Self::Receive => out.push(RECEIVE),
            Self::Delivered(ids) => {
                out.push(DELIVERED);
                out.extend_from_slice(&(ids.len() as u16).to_be_bytes());
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
            }
            Self::Revoke {
                request,
                revocation,
            } => {
                out.push(REVOKE);
                out.extend_from_slice(&request.to_be_bytes());
                put_bytes16(out, &revocation.to_bytes());
            }
            Self::Directory {
                request,
                cell,
                devices,
                revocations,
            } => {
                // Callers keep both lists within their bounds (64 each), so the counts fit.
                out.push(DIRECTORY);
                out.extend_from_slice(&request.to_be_bytes());
                out.extend_from_slice(cell.key().as_bytes());
                out.push(devices.len() as u8);
                for d in devices {
                    put_bytes16(out, &d.node_token.to_bytes());
                    put_bytes16(out, &d.identity.to_bytes());
                }
                out.push(revocations.len() as u8);
                for t in revocations {
                    put_bytes16(out, &t.to_bytes());
                }
            }
            Self::Revoked { request, result } => {
                out.push(REVOKED);
                out.extend_from_slice(&request.to_be_bytes());
                out.push(match result {
                    Ok(()) => 0,
                    Err(code) => code.code(),
                });
            }
            Self::Accepted { to, id, status } => {
                out.push(ACCEPTED);
                out.extend_from_slice(to.key().as_bytes());
                out.extend_from_slice(&id.0);
                out.push(match status {
                    Accepted::Pushed => 1,
                    Accepted::Queued => 2,
                });
            }
            Self::Refused { to, id, code } => {
                out.push(REFUSED);
                out.extend_from_slice(to.key().as_bytes());
                out.extend_from_slice(&id.0);
                out.push(code.code());
            }
            Self::Deliver { from, id, envelope } => {
                out.push(DELIVER);
                out.extend_from_slice(from.key().as_bytes());
                out.extend_from_slice(&id.0);
                out.extend_from_slice(envelope);
            }
        }
    }

    /// Decodes one whole record. Envelopes share `bytes` rather than copying it.
    pub fn decode(bytes: Bytes) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&bytes);
        let kind = r.u8()?;
        let record = match kind {
            LOOKUP => {
                let request = r.u32()?;
                let cell = CellId::from_key(key(&mut r)?);
                r.finish()?;
                Self::Lookup { request, cell }
            }
            FORWARD | DELIVER => {
                let node = NodeId::from_key(key(&mut r)?);
                let id = MsgId(r.array()?);
                check_len("envelope", r.remaining(), MAX_ENVELOPE)?;
                let envelope = bytes.slice(1 + 32 + 16..);
                if kind == FORWARD {
                    Self::Forward {
                        to: node,
                        id,
                        envelope,
                    }
                } else {
                    Self::Deliver {
                        from: node,
                        id,
                        envelope,
                    }
                }
            }
            RECEIVE => {
                r.finish()?;
                Self::Receive
            }
            DELIVERED => {
                let n = r.u16()? as usize;
                if n == 0 {
                    return Err(DecodeError::Invalid("empty id list"));
                }
                check_len("id list", n, MAX_IDS)?;
                let mut ids = Vec::with_capacity(n.min(r.remaining() / 16));
                for _ in 0..n {
                    ids.push(MsgId(r.array()?));
                }
                r.finish()?;
                Self::Delivered(ids)
            }
            DIRECTORY => {
                let request = r.u32()?;
                let cell = CellId::from_key(key(&mut r)?);
                let n = r.u8()? as usize;
                check_len("directory", n, MAX_DEVICES)?;
                let mut devices = Vec::with_capacity(n);
                for _ in 0..n {
                    let node_token = Token::decode(r.bytes16("node token", MAX_TOKEN_LEN)?)?;
                    let identity = Token::decode(r.bytes16("identity token", MAX_TOKEN_LEN)?)?;
                    devices.push(DirectoryEntry {
                        node_token,
                        identity,
                    });
                }
                let n = r.u8()? as usize;
                check_len("revocations", n, MAX_REVOCATIONS)?;
                let mut revocations = Vec::with_capacity(n);
                for _ in 0..n {
                    revocations.push(Token::decode(r.bytes16("revocation", MAX_TOKEN_LEN)?)?);
                }
                r.finish()?;
                Self::Directory {
                    request,
                    cell,
                    devices,
                    revocations,
                }
            }
            DIRECTORY_V1 => return Err(DecodeError::UnsupportedVersion(DIRECTORY_V1)),
            REVOKE => {
                let request = r.u32()?;
                let revocation = Box::new(Token::decode(r.bytes16("revocation", MAX_TOKEN_LEN)?)?);
                r.finish()?;
                Self::Revoke {
                    request,
                    revocation,
                }
            }
            REVOKED => {
                let request = r.u32()?;
                let result = match r.u8()? {
                    0 => Ok(()),
                    c => Err(RefuseCode::from_code(c)),
                };
                r.finish()?;
                Self::Revoked { request, result }
            }
            ACCEPTED => {
                let to = NodeId::from_key(key(&mut r)?);
                let id = MsgId(r.array()?);
                let status = match r.u8()? {
                    1 => Accepted::Pushed,
                    2 => Accepted::Queued,
                    _ => return Err(DecodeError::Invalid("accepted status")),
                };
                r.finish()?;
                Self::Accepted { to, id, status }
            }
            REFUSED => {
                let to = NodeId::from_key(key(&mut r)?);
                let id = MsgId(r.array()?);
                let code = RefuseCode::from_code(r.u8()?);
                r.finish()?;
                Self::Refused { to, id, code }
            }
            _ => return Err(DecodeError::Invalid("relay record type")),
        };
        Ok(record)
    }
}

/// Appends `record` to a batch payload, with its length prefix.
pub fn put_record(out: &mut Vec<u8>, record: &Record) {
    out.extend_from_slice(&(record.encoded_len() as u32).to_be_bytes());
    record.encode(out);
}

/// The records of a batch payload, in order. Stops at the first malformed record (an empty
/// payload is one); the caller should treat that as a protocol violation by the peer.
pub fn records(payload: Bytes) -> impl Iterator<Item = Result<Record, DecodeError>> {
    let mut failed = payload.is_empty();
    let mut empty = failed;
    let mut rest = payload;
    std::iter::from_fn(move || {
        if std::mem::take(&mut empty) {
            return Some(Err(DecodeError::Invalid("empty relay payload")));
        }
        if failed || rest.is_empty() {
            return None;
        }
        let result = next_record(&mut rest);
        failed = result.is_err();
        Some(result)
    })
}

fn next_record(rest: &mut Bytes) -> Result<Record, DecodeError> {
    let mut r = Reader::new(rest);
    let len = r.u32()? as usize;
    if len == 0 {
        return Err(DecodeError::Invalid("empty record"));
    }
    check_len("record", len, MAX_RECORD)?;
    if r.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    let record = rest.slice(4..4 + len);
    *rest = rest.slice(4 + len..);
    Record::decode(record)
}

/// A cell or node id in a routing field. Not checked to be a curve point (that costs a
/// decompression per record): ids are only compared with the ids of devices whose tokens
/// were verified, and an id that is no valid key matches none.
fn key(r: &mut Reader<'_>) -> Result<PublicKey, DecodeError> {
    Ok(PublicKey::from_bytes_unchecked(&r.array()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestNode;

    fn samples() -> Vec<Record> {
        let a = TestNode::new(1, crate::Timestamp(1_800_000_000));
        let id = MsgId([7; 16]);
        let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([3; 32]);
        let revocation = crate::device::revocation(
            &a.cell,
            a.node_id(),
            crate::Timestamp(1_800_000_000),
            &mut rng,
        )
        .unwrap();
        vec![
            Record::Lookup {
                request: 9,
                cell: a.cell_id(),
            },
            Record::Forward {
                to: a.node_id(),
                id,
                envelope: Bytes::from_static(b"sealed"),
            },
            Record::Delivered(vec![id, MsgId([8; 16])]),
            Record::Directory {
                request: 9,
                cell: a.cell_id(),
                devices: vec![DirectoryEntry {
                    node_token: a.node_token.clone(),
                    identity: a.identity.clone(),
                }],
                revocations: vec![revocation.clone()],
            },
            Record::Directory {
                request: 10,
                cell: a.cell_id(),
                devices: Vec::new(),
                revocations: Vec::new(),
            },
            Record::Revoke {
                request: 11,
                revocation: Box::new(revocation),
            },
            Record::Revoked {
                request: 11,
                result: Ok(()),
            },
            Record::Revoked {
                request: 12,
                result: Err(RefuseCode::TooMany),
            },
            Record::Accepted {
                to: a.node_id(),
                id,
                status: Accepted::Queued,
            },
            Record::Refused {
                to: a.node_id(),
                id,
                code: RefuseCode::QueueFull,
            },
            Record::Deliver {
                from: a.node_id(),
                id,
                envelope: Bytes::new(),
            },
        ]
    }

    #[test]
    fn every_record_round_trips_alone_and_in_a_batch() {
        let mut batch = Vec::new();
        for record in samples() {
            let mut out = Vec::new();
            record.encode(&mut out);
            assert_eq!(out.len(), record.encoded_len(), "{record:?}");
            assert_eq!(Record::decode(Bytes::from(out)).unwrap(), record);
            put_record(&mut batch, &record);
        }
        let decoded: Vec<_> = records(Bytes::from(batch)).map(Result::unwrap).collect();
        assert_eq!(decoded, samples());
    }

    #[test]
    fn a_directory_of_the_first_shape_is_an_unsupported_version() {
        let a = TestNode::new(1, crate::Timestamp(1_800_000_000));
        // 0x30 request cell count=0: what relays sent before revocations travelled.
        let mut old = vec![0x30, 0, 0, 0, 9];
        old.extend_from_slice(a.cell_id().key().as_bytes());
        old.push(0);
        assert_eq!(
            Record::decode(Bytes::from(old)),
            Err(DecodeError::UnsupportedVersion(0x30))
        );
    }

    #[test]
    fn directories_and_revoked_refuse_what_their_bounds_forbid() {
        let a = TestNode::new(1, crate::Timestamp(1_800_000_000));
        let mut out = vec![DIRECTORY, 0, 0, 0, 1];
        out.extend_from_slice(a.cell_id().key().as_bytes());
        out.push(0);
        out.push(MAX_REVOCATIONS as u8 + 1);
        assert!(matches!(
            Record::decode(Bytes::from(out)),
            Err(DecodeError::TooLarge { .. })
        ));
        // Every code but 0 is a refusal, known or not.
        for code in 1..=255u8 {
            let r = Record::decode(Bytes::from(vec![REVOKED, 0, 0, 0, 1, code])).unwrap();
            assert_eq!(
                r,
                Record::Revoked {
                    request: 1,
                    result: Err(RefuseCode::from_code(code))
                }
            );
            let mut again = Vec::new();
            r.encode(&mut again);
            assert_eq!(again, vec![REVOKED, 0, 0, 0, 1, code]);
        }
    }

    #[test]
    fn truncations_are_refused_and_stop_the_batch() {
        for record in samples() {
            let mut out = Vec::new();
            put_record(&mut out, &record);
            for n in 1..out.len() {
                let results: Vec<_> = records(Bytes::copy_from_slice(&out[..n])).collect();
                assert!(
                    results.iter().any(Result::is_err),
                    "{record:?} cut at {n} decoded"
                );
                assert_eq!(results.len(), 1);
            }
        }
    }

    /// SECURITY.md, "Threat model": a FORWARD or DELIVER in a payload is its envelope plus
    /// 53 bytes (length prefix, type, device, id).
    #[test]
    fn a_forward_or_deliver_costs_its_envelope_plus_53_bytes() {
        let a = TestNode::new(1, crate::Timestamp(1_800_000_000));
        for len in [0, 1, 1000] {
            let envelope = Bytes::from(vec![5; len]);
            for r in [
                Record::Forward {
                    to: a.node_id(),
                    id: MsgId([1; 16]),
                    envelope: envelope.clone(),
                },
                Record::Deliver {
                    from: a.node_id(),
                    id: MsgId([1; 16]),
                    envelope: envelope.clone(),
                },
            ] {
                let mut payload = Vec::new();
                put_record(&mut payload, &r);
                assert_eq!(payload.len(), len + 53);
            }
        }
    }
}
