//! End-to-end sessions between devices of two cells, for messages that cross relays.
//!
//! A relay forwards envelopes it cannot read. Each sending device keeps one *session* per
//! recipient device; a cell's message is sealed once per device of the recipient cell (fan-out
//! happens at the sender, so the relay never holds a key).
//!
//! # Construction
//!
//! - **Directory.** The sender fetches the recipient cell's devices from a relay and checks
//!   each (node token, identity token) pair against the cell id it asked for
//!   ([`Directory::verify`]): the identity token must be signed by the cell key the id *is*,
//!   and name the node; the node token must be signed by that node and carry its X25519 key.
//!   A relay can withhold devices, never invent or swap one.
//! - **Session setup: HPKE** (RFC 9180) in Auth mode, suite DHKEM(X25519, HKDF-SHA256),
//!   HKDF-SHA256, export-only AEAD. The sender's key is its own device's X25519 key, the
//!   recipient's its device key; `info` binds both cells and both devices. From the context:
//!   `export("cellmesh e2e v1 keys", 64)` gives the epoch-0 keys (initiator → responder,
//!   responder → initiator), `export("cellmesh e2e v1 ratchet", 32)` a salt for epoch 1.
//! - **Forward secrecy.** Epoch-0 messages also carry the initiator's fresh X25519 public
//!   key; the responder's first replies carry its own. Both sides then derive epoch 1 from
//!   HKDF(salt, X25519(e_i, e_r)) and erase the ephemeral secrets: from then on, stealing
//!   either device's long-term keys does not open recorded traffic. Epoch 0 is like 0-RTT
//!   data: it is readable by whoever later steals the recipient device's key.
//! - **Messages** are AES-256-GCM under the session key of their epoch and direction, nonce
//!   = epoch ‖ counter. The associated data binds the protocol version, the envelope header
//!   (session, epoch, counter, time), the sender's and the recipient's cell and device, and
//!   the message id, so nothing can be moved from one context to another.
//! - **Bundles.** Several messages to one device can share an envelope, each with its own id
//!   inside the ciphertext ([`Endpoint::seal_bundle`]): one seal and one acknowledgement for
//!   all of them.
//! - **Replay.** A receiver accepts each (session, direction, epoch, counter) once, within a
//!   window of [`REPLAY_WINDOW`] behind the highest seen, and the endpoint forgets no envelope
//!   id among the last [`DEDUPE`] it delivered, so a re-sent envelope is acknowledged again
//!   but never delivered twice.
//!
//! # Envelope
//!
//! ```text
//! envelope = version:u8(=1) kind:u8 session:[16] rest
//!   kind 1 INIT  enc:[32] node_token:bytes16 identity:bytes16 sealed      (epoch 0, self-contained)
//!   kind 2 MSG   sealed                                                   (initiator → responder)
//!   kind 3 RESET                                                          (unauthenticated)
//!   kind 4 REPLY sealed                                                   (responder → initiator)
//! sealed   = epoch:u32 counter:u64 time:u64 AES-256-GCM(key, nonce = epoch ‖ counter, aad, plain)
//! aad      = "cellmesh e2e v1" ‖ envelope bytes before the ciphertext ‖ sender cell ‖ sender node
//!            ‖ recipient cell ‖ recipient node ‖ message id
//! plain    = ratchet_flag:u8 [ephemeral:[32]] kind:u8 fields
//!   kind 1 MESSAGE body_len:u32 body padding                              padding = zeros
//!   kind 2 ACK     count:u16 id:[16]*count
//!   kind 3 BUNDLE  count:u16 (id:[16] body_len:u32 body)*count padding    messages' own ids
//! ```
//!
//! Until the sender has heard from the recipient device, every message is an INIT (it carries
//! the HPKE encapsulation and the sender's tokens) so that each one can be opened on its own,
//! even by a device that restarted. A device that gets a MSG for a session it does not know
//! answers RESET; the sender then starts a new session and sends again what is unacknowledged.

use std::collections::{HashMap, VecDeque};

use foldhash::fast::RandomState;

use bytes::Bytes;
use hkdf::Hkdf;
use hpke::{Deserializable, Serializable};
use rand_core::CryptoRngCore;
use ring::aead;
use sha2::Sha256;
use thiserror::Error;
use zeroize::{Zeroize as _, Zeroizing};

use crate::Timestamp;
use crate::codec::{DecodeError, Reader, put_bytes16};
use crate::device::{BindError, DeviceBinding, Revocations, bind};
use crate::id::{CellId, NodeId};
use crate::keys::{AgreementPublicKey, AgreementSecret, KEY_LEN};
use crate::relay::{DirectoryEntry, MsgId};
use crate::token::{DEFAULT_SKEW, MAX_TOKEN_LEN, Token, TokenKind, VerifyError};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type ExportOnly = hpke::aead::ExportOnlyAead;

/// Envelope format version.
pub const E2E_VERSION: u8 = 1;
/// How far behind the highest counter a message may arrive and still be accepted (far more
/// than the relay's bounds let messages be reordered: a queue of 10,000, 65,536 in flight).
pub const REPLAY_WINDOW: u64 = 1 << 18;
/// How many delivered envelope ids an endpoint remembers to drop duplicates.
pub const DEDUPE: usize = 1 << 16;
/// Most sessions an endpoint keeps per direction; beyond it the oldest inbound session (and
/// some outbound one) is dropped.
pub const MAX_SESSIONS: usize = 4096;
/// Largest message body.
pub const MAX_BODY: usize = crate::relay::MAX_ENVELOPE - 2048;
/// Largest plaintext: ratchet key, kind, length and the largest body.
const MAX_PLAIN: usize = 1 + KEY_LEN + 1 + 4 + MAX_BODY;
/// Most ids one ACK carries.
pub const MAX_ACK_IDS: usize = 1024;
/// Most messages in one bundle ([`Endpoint::seal_bundle`]).
pub const MAX_BUNDLE: usize = 1024;
/// What a bundle adds to each message it carries: the message's id and its length.
pub const BUNDLE_ITEM: usize = 16 + 4;

const CONTEXT: &[u8] = b"cellmesh e2e v1";
const INFO_PREFIX: &[u8] = b"cellmesh e2e v1 session";
const EXPORT_KEYS: &[u8] = b"cellmesh e2e v1 keys";
const EXPORT_RATCHET: &[u8] = b"cellmesh e2e v1 ratchet";
const EPOCH1_INFO: &[u8] = b"cellmesh e2e v1 epoch 1";
const INIT: u8 = 1;
const MSG: u8 = 2;
const RESET: u8 = 3;
const REPLY: u8 = 4;
const PLAIN_MESSAGE: u8 = 1;
const PLAIN_ACK: u8 = 2;
const PLAIN_BUNDLE: u8 = 3;
const TAG_LEN: usize = 16;
const SEALED_HEADER: usize = 4 + 8 + 8;

/// A session id: 16 random bytes chosen by the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

/// A device of another cell whose keys were checked against its cell id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDevice {
    binding: DeviceBinding,
    agreement: AgreementPublicKey,
}

impl RemoteDevice {
    /// Checks one (node token, identity token) pair: the identity token signed by the cell and
    /// valid now, naming the node; the node token signed by the node (its validity period is
    /// not checked: a device that was offline for a day still owns its key) and carrying an
    /// X25519 key; the device not revoked.
    pub fn verify(
        node_token: &Token,
        identity: &Token,
        now: Timestamp,
        revocations: &Revocations,
    ) -> Result<Self, DirectoryError> {
        // Signatures first: a forged or altered token must fail as such (and fail a whole
        // directory), not pass for a lapsed one (which a directory merely leaves out).
        identity.verify_signatures()?;
        let identity = identity.verify(now, DEFAULT_SKEW)?;
        let node_token = node_token.verify_signatures()?;
        if identity.claims().kind != TokenKind::Identity {
            return Err(DirectoryError::Bind(BindError::WrongKind {
                expected: TokenKind::Identity,
            }));
        }
        let binding = bind(&node_token, &identity, revocations)?;
        let agreement = node_token
            .claims()
            .agreement_key
            .ok_or(DirectoryError::NoAgreementKey)?;
        Ok(Self { binding, agreement })
    }

    /// The device's cell.
    pub fn cell(&self) -> CellId {
        self.binding.cell()
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.binding.node()
    }

    /// The tokens that prove it.
    pub fn binding(&self) -> &DeviceBinding {
        &self.binding
    }
}

/// The devices of one cell, each checked against the cell id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directory {
    /// The cell.
    pub cell: CellId,
    /// Its devices.
    pub devices: Vec<RemoteDevice>,
}

impl Directory {
    /// Checks what a relay claims are `cell`'s devices. Any entry that is not a device of
    /// exactly `cell` fails the whole answer: a relay that lies about one device is not
    /// trusted about the others. Revoked devices, and devices whose identity token is not
    /// valid now (lapsed, or ahead of our clock), are left out.
    pub fn verify(
        cell: CellId,
        entries: &[DirectoryEntry],
        now: Timestamp,
        revocations: &Revocations,
    ) -> Result<Self, DirectoryError> {
        let mut devices = Vec::with_capacity(entries.len());
        for e in entries {
            match RemoteDevice::verify(&e.node_token, &e.identity, now, revocations) {
                Ok(d) if d.cell() == cell => devices.push(d),
                Ok(d) => return Err(DirectoryError::WrongCell(d.cell())),
                // A revoked device, or one whose certificate lapsed (offline for a year) or
                // is not valid yet by our clock, is left out; the others still count.
                Err(DirectoryError::Bind(BindError::Revoked(_)))
                | Err(DirectoryError::Token(
                    VerifyError::Expired { .. } | VerifyError::NotYetValid { .. },
                )) => {}
                Err(e) => return Err(e),
            }
        }
        if devices.is_empty() {
            return Err(DirectoryError::NoDevices(cell));
        }
        Ok(Self { cell, devices })
    }
}

/// A cell's directory could not be trusted or was empty.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// The relay knows no (unrevoked) device of the cell.
    #[error("no device of cell {0} is registered")]
    NoDevices(CellId),
    /// A token failed verification.
    #[error("a device token does not verify: {0}")]
    Token(#[from] VerifyError),
    /// The tokens do not bind a device to the cell.
    #[error("a device does not belong to the cell: {0}")]
    Bind(#[from] BindError),
    /// An entry belongs to another cell: the relay substituted keys.
    #[error("the relay answered with a device of another cell ({0})")]
    WrongCell(CellId),
    /// The node token carries no X25519 key.
    #[error("a device token carries no agreement key")]
    NoAgreementKey,
}

/// This device, as the sender and recipient of end-to-end messages.
pub struct LocalDevice {
    cell: CellId,
    node: NodeId,
    node_token: Token,
    identity: Token,
    agreement: AgreementSecret,
}

impl LocalDevice {
    /// This device: its current tokens and its node's X25519 secret (the one its node token
    /// names). Refuses a token that names another key.
    pub fn new(
        node_token: Token,
        identity: Token,
        agreement: AgreementSecret,
    ) -> Result<Self, DirectoryError> {
        if node_token.claims().agreement_key != Some(agreement.public()) {
            return Err(DirectoryError::NoAgreementKey);
        }
        let cell = CellId::from_key(identity.claims().key);
        let node = NodeId::from_key(node_token.claims().key);
        Ok(Self {
            cell,
            node,
            node_token,
            identity,
            agreement,
        })
    }

    /// Replaces the tokens sent in INIT envelopes (after a renewal).
    pub fn renew(&mut self, node_token: Token, identity: Token) {
        self.node_token = node_token;
        self.identity = identity;
    }

    /// The cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// The device.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

impl std::fmt::Debug for LocalDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalDevice")
            .field("cell", &self.cell)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Whether message bodies are padded to hide their size from relays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Padding {
    /// Bodies are sent as they are.
    #[default]
    None,
    /// Bodies are padded to the next power of two, at least 256 bytes.
    PowerOfTwo,
}

/// What [`Endpoint::open`] found in an envelope.
#[derive(Debug)]
#[non_exhaustive]
pub enum Opened {
    /// A message for the application. Its acknowledgement is queued: see
    /// [`Endpoint::poll_acks`].
    Message(Message),
    /// An envelope (a message or a bundle) delivered before, sent again (a retry): not for
    /// the application. Its acknowledgement may have been lost, so it is acknowledged again.
    Duplicate(MsgId),
    /// A bundle ([`Endpoint::seal_bundle`]): its messages, in the order they were sealed.
    /// The bundle's acknowledgement is queued.
    Bundle(Vec<Message>),
    /// The recipient device acknowledged these messages of ours.
    Acked {
        /// The device that acknowledged.
        from: NodeId,
        /// The ids.
        ids: Vec<MsgId>,
    },
    /// The device lost our session: send again, in a new session, what it has not
    /// acknowledged.
    Reset {
        /// The device.
        from: NodeId,
    },
    /// A message for a session this device does not know: `reply` asks the sender to start
    /// again. Nothing is delivered.
    Unknown {
        /// The RESET envelope.
        reply: Reply,
    },
}

/// An envelope this endpoint wants forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The device to forward it to.
    pub to: NodeId,
    /// Its id.
    pub id: MsgId,
    /// The envelope.
    pub envelope: Bytes,
}

/// A message from another cell, opened and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sending cell.
    pub from_cell: CellId,
    /// The sending device.
    pub from_node: NodeId,
    /// The message id.
    pub id: MsgId,
    /// When the sender sent it (its clock).
    pub time: Timestamp,
    /// The body.
    pub body: Bytes,
}

/// An envelope was refused. No detail about why authentication failed, on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The envelope is not well formed.
    #[error("malformed envelope: {0}")]
    Malformed(#[from] DecodeError),
    /// The sender's tokens do not prove a device of a cell.
    #[error("sender not authenticated: {0}")]
    Sender(#[from] DirectoryError),
    /// The relay named a sending device other than the one the envelope is from.
    #[error("envelope relayed from the wrong device")]
    WrongSender,
    /// Decryption or authentication failed.
    #[error("envelope failed authentication")]
    Unauthentic,
    /// The counter is too far behind to tell whether it was seen before.
    #[error("replayed envelope")]
    Replayed,
    /// An acknowledgement or a RESET for a session this device does not have (it restarted,
    /// or another process of the same device made it): dropped, nothing to answer.
    #[error("no such session (an answer to a session this device no longer has)")]
    NoSession,
}

/// A message could not be sealed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SealError {
    /// The body is over [`MAX_BODY`].
    #[error("message of {0} bytes is too large (at most {MAX_BODY})")]
    TooLarge(usize),
    /// A bundle of no message, or of more than [`MAX_BUNDLE`].
    #[error("a bundle of {0} messages (1 to {MAX_BUNDLE})")]
    BundleCount(usize),
    /// HPKE refused a key (a key that is not a valid X25519 point).
    #[error("end-to-end session setup failed")]
    Setup,
}

/// The sending and receiving halves of all of a device's end-to-end sessions. Pure state: the
/// caller passes time and randomness in and forwards the envelopes it gets back.
///
/// Use: [`Endpoint::seal`] a message once per device of the recipient's [`Directory`];
/// [`Endpoint::open`] each envelope a relay delivers; after a batch of opens, forward what
/// [`Endpoint::poll_acks`] returns.
pub struct Endpoint {
    local: LocalDevice,
    padding: Padding,
    outbound: HashMap<NodeId, Outbound, RandomState>,
    inbound: HashMap<(NodeId, SessionId), Inbound, RandomState>,
    inbound_order: VecDeque<(NodeId, SessionId)>,
    /// Delivered messages by (sending cell, id): a sender picks its ids, so another cell
    /// reusing one must not hide the first sender's message.
    /// (A keyed hash, seeded per process: the ids are chosen by senders.)
    delivered: Delivered,
    pending_acks: Vec<((NodeId, SessionId), MsgId)>,
}

impl Endpoint {
    /// An endpoint for `local`.
    pub fn new(local: LocalDevice, padding: Padding) -> Self {
        Self {
            local,
            padding,
            outbound: HashMap::default(),
            inbound: HashMap::default(),
            inbound_order: VecDeque::new(),
            delivered: Delivered::default(),
            pending_acks: Vec::new(),
        }
    }

    /// This device.
    pub fn local(&self) -> &LocalDevice {
        &self.local
    }

    /// This device, mutably (to renew its tokens).
    pub fn local_mut(&mut self) -> &mut LocalDevice {
        &mut self.local
    }

    /// Seals a message for one device of the recipient cell, starting a session with it if
    /// there is none (or if the device's keys changed). `id` is the message's id and the
    /// envelope's.
    pub fn seal(
        &mut self,
        to: &RemoteDevice,
        id: MsgId,
        time: Timestamp,
        body: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Bytes, SealError> {
        if body.len() > MAX_BODY {
            return Err(SealError::TooLarge(body.len()));
        }
        self.seal_plain(to, id, time, 5 + body.len(), rng, |plain| {
            plain.push(PLAIN_MESSAGE);
            plain.extend_from_slice(&(body.len() as u32).to_be_bytes());
            plain.extend_from_slice(body);
        })
    }

    /// Seals several messages for one device in one envelope (a *bundle*), each with its own
    /// id; `id` is the envelope's, and an acknowledgement names it, not the messages. One
    /// seal, one FORWARD and one acknowledgement then serve them all. At most [`MAX_BUNDLE`]
    /// messages, and [`bundle_len`] at most [`MAX_BODY`].
    pub fn seal_bundle(
        &mut self,
        to: &RemoteDevice,
        id: MsgId,
        time: Timestamp,
        messages: &[(MsgId, Bytes)],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Bytes, SealError> {
        let len = bundle_len(messages.iter().map(|(_, b)| b.len()));
        if len > MAX_BODY {
            return Err(SealError::TooLarge(len));
        }
        if messages.is_empty() || messages.len() > MAX_BUNDLE {
            return Err(SealError::BundleCount(messages.len()));
        }
        self.seal_plain(to, id, time, 1 + len, rng, |plain| {
            plain.push(PLAIN_BUNDLE);
            plain.extend_from_slice(&(messages.len() as u16).to_be_bytes());
            for (id, body) in messages {
                plain.extend_from_slice(&id.0);
                plain.extend_from_slice(&(body.len() as u32).to_be_bytes());
                plain.extend_from_slice(body);
            }
        })
    }

    /// Seals the plaintext `write` appends (`len` bytes, from its kind on) in the session
    /// with `to`, after the ratchet key it carries, and pads it if configured.
    fn seal_plain(
        &mut self,
        to: &RemoteDevice,
        id: MsgId,
        time: Timestamp,
        len: usize,
        rng: &mut impl CryptoRngCore,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Bytes, SealError> {
        let padding = self.padding;
        let session = self.outbound_for(to, rng)?;
        let ratchet = session.ratchet.as_ref().map(|r| r.public);
        let (kind, extra) = if session.send.epoch == 0 {
            (INIT, &session.init[..])
        } else {
            (MSG, &[][..])
        };
        Ok(seal_envelope(
            Header {
                kind,
                session: session.id,
                extra,
                time,
            },
            &mut session.send,
            &session.binding,
            id,
            1 + KEY_LEN + len,
            |plain| {
                let start = plain.len();
                match &ratchet {
                    Some(eph) => {
                        plain.push(1);
                        plain.extend_from_slice(eph.as_bytes());
                    }
                    None => plain.push(0),
                }
                write(plain);
                if padding == Padding::PowerOfTwo {
                    // Never past what an envelope can carry: the largest bodies are padded
                    // to the largest plaintext instead.
                    let len = plain.len() - start;
                    let target = len.next_power_of_two().clamp(256, MAX_PLAIN).max(len);
                    plain.resize(start + target, 0);
                }
            },
        ))
    }

    /// Forgets the session with `device`, so the next message to it starts a new one.
    pub fn reset(&mut self, device: NodeId) {
        self.outbound.remove(&device);
    }

    /// Opens an envelope that the relay says came from device `from` with id `id`.
    pub fn open(
        &mut self,
        from: NodeId,
        id: MsgId,
        envelope: &[u8],
        now: Timestamp,
        revocations: &Revocations,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Opened, OpenError> {
        let mut r = Reader::new(envelope);
        let version = r.u8()?;
        if version != E2E_VERSION {
            return Err(DecodeError::UnsupportedVersion(version).into());
        }
        let kind = r.u8()?;
        let session = SessionId(r.array()?);
        match kind {
            INIT => {
                let enc: [u8; KEY_LEN] = r.array()?;
                let node_token = r.bytes16("node token", MAX_TOKEN_LEN)?;
                let identity = r.bytes16("identity token", MAX_TOKEN_LEN)?;
                let header_len = envelope.len() - r.remaining();
                let key = (from, session);
                // The tokens are parsed and checked once per session, not per message.
                if !self.inbound.contains_key(&key) {
                    let (node_token, identity) =
                        (Token::decode(node_token)?, Token::decode(identity)?);
                    let peer = RemoteDevice::verify(&node_token, &identity, now, revocations)?;
                    if peer.node() != from {
                        return Err(OpenError::WrongSender);
                    }
                    let inbound = Inbound::accept(&self.local, peer, session, &enc, rng)?;
                    self.remember_inbound(key, inbound);
                    // A session is kept only once an envelope authenticates in it: a copy
                    // with a forged or damaged `enc` must not take the session's place.
                    let opened = self.open_inbound(key, id, envelope, header_len);
                    if opened.is_err() {
                        self.inbound.remove(&key);
                        self.inbound_order.pop_back();
                    }
                    return opened;
                }
                self.open_inbound(key, id, envelope, header_len)
            }
            MSG => {
                let header_len = envelope.len() - r.remaining();
                let key = (from, session);
                if self.inbound.contains_key(&key) {
                    return self.open_inbound(key, id, envelope, header_len);
                }
                Ok(Opened::Unknown {
                    reply: Reply {
                        to: from,
                        id: MsgId::random(rng),
                        envelope: reset_envelope(session),
                    },
                })
            }
            REPLY => {
                let header_len = envelope.len() - r.remaining();
                match self.outbound.get_mut(&from) {
                    Some(out) if out.id == session => out.open_reply(id, envelope, header_len),
                    // An acknowledgement for a session this device no longer has (it
                    // restarted): nothing to do, and nothing to ask for.
                    _ => Err(OpenError::NoSession),
                }
            }
            RESET => {
                r.finish()?;
                match self.outbound.get(&from) {
                    Some(out) if out.id == session => {
                        self.outbound.remove(&from);
                        Ok(Opened::Reset { from })
                    }
                    _ => Err(OpenError::NoSession),
                }
            }
            _ => Err(DecodeError::Invalid("envelope kind").into()),
        }
    }

    /// Envelopes acknowledging every message opened since the last call, one per session
    /// (more if a session has over [`MAX_ACK_IDS`] to acknowledge).
    pub fn poll_acks(&mut self, rng: &mut impl CryptoRngCore) -> Vec<Reply> {
        let mut pending = std::mem::take(&mut self.pending_acks);
        pending.sort_by_key(|(key, _)| (key.0, key.1.0));
        let mut out = Vec::new();
        for chunk in pending.chunk_by(|a, b| a.0 == b.0) {
            let key = chunk[0].0;
            let Some(inbound) = self.inbound.get_mut(&key) else {
                continue;
            };
            for ids in chunk.chunks(MAX_ACK_IDS) {
                let ids: Vec<MsgId> = ids.iter().map(|(_, id)| *id).collect();
                let id = MsgId::random(rng);
                out.push(Reply {
                    to: key.0,
                    id,
                    envelope: inbound.seal_ack(key.1, id, &ids),
                });
            }
        }
        out
    }

    fn outbound_for(
        &mut self,
        to: &RemoteDevice,
        rng: &mut impl CryptoRngCore,
    ) -> Result<&mut Outbound, SealError> {
        let node = to.node();
        let reuse = matches!(
            self.outbound.get(&node),
            Some(s) if s.peer.agreement == to.agreement && s.peer.cell() == to.cell()
        );
        if !reuse {
            if self.outbound.len() >= MAX_SESSIONS
                && let Some(victim) = self.outbound.keys().next().copied()
            {
                self.outbound.remove(&victim);
            }
            let session = Outbound::start(&self.local, to, rng)?;
            self.outbound.insert(node, session);
        }
        self.outbound.get_mut(&node).ok_or(SealError::Setup)
    }

    fn remember_inbound(&mut self, key: (NodeId, SessionId), inbound: Inbound) {
        if self.inbound.len() >= MAX_SESSIONS
            && let Some(old) = self.inbound_order.pop_front()
        {
            self.inbound.remove(&old);
        }
        self.inbound.insert(key, inbound);
        self.inbound_order.push_back(key);
    }

    fn open_inbound(
        &mut self,
        key: (NodeId, SessionId),
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<Opened, OpenError> {
        let inbound = self.inbound.get_mut(&key).ok_or(OpenError::Unauthentic)?;
        let (time, plain, replayed) = inbound.open(id, envelope, header_len)?;
        let mut r = Reader::new(&plain);
        let theirs = read_ratchet(&mut r)?;
        // Each message's id and where its body lies in the plaintext.
        let mut items: Vec<(MsgId, usize, usize)> = Vec::new();
        let bundle = match r.u8()? {
            PLAIN_MESSAGE => false,
            PLAIN_BUNDLE => true,
            _ => return Err(DecodeError::Invalid("inbound plaintext kind").into()),
        };
        let count = if bundle { r.u16()? as usize } else { 1 };
        if count == 0 || count > MAX_BUNDLE {
            return Err(DecodeError::Invalid("bundle count").into());
        }
        items.reserve_exact(count);
        for _ in 0..count {
            let message = if bundle { MsgId(r.array()?) } else { id };
            let len = r.u32()? as usize;
            let start = plain.len() - r.remaining();
            r.bytes(len)?;
            items.push((message, start, len));
        }
        if !r.bytes(r.remaining())?.iter().all(|&b| b == 0) {
            return Err(DecodeError::Invalid("padding").into());
        }
        if let Some(theirs) = theirs {
            inbound.advance(&theirs)?;
        }
        // Bodies are views into the decrypted buffer, not copies.
        let from_cell = inbound.peer.cell();
        self.pending_acks.push((key, id));
        // Duplicates are told by envelope: a sender sends a message again only in its
        // envelope, with that envelope's id and messages (a bundle does not change).
        if replayed || !self.delivered.insert((from_cell, id)) {
            return Ok(Opened::Duplicate(id));
        }
        let plain = Bytes::from(plain);
        let mut messages = items.into_iter().map(|(message, start, len)| Message {
            from_cell,
            from_node: key.0,
            id: message,
            time,
            body: plain.slice(start..start + len),
        });
        Ok(match (bundle, messages.next()) {
            (false, Some(m)) => Opened::Message(m),
            (_, first) => Opened::Bundle(first.into_iter().chain(messages).collect()),
        })
    }
}

/// The plaintext size of a bundle of messages of these lengths, from its count on (what
/// [`Endpoint::seal_bundle`] holds to [`MAX_BODY`]).
pub fn bundle_len(bodies: impl IntoIterator<Item = usize>) -> usize {
    bodies
        .into_iter()
        .map(|len| BUNDLE_ITEM + len)
        .sum::<usize>()
        + 2
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("outbound", &self.outbound.len())
            .field("inbound", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

/// A session this device started, to one recipient device.
struct Outbound {
    id: SessionId,
    peer: RemoteDevice,
    /// Sender cell, sender node, recipient cell, recipient node.
    binding: [u8; 128],
    /// INIT fields (enc, tokens), sent until the peer has answered.
    init: Vec<u8>,
    send: Keys,
    recv0: Keys,
    recv1: Option<Keys>,
    ratchet: Option<Ratchet>,
    window: [Window; 2],
}

/// A session another device started with this one.
struct Inbound {
    peer: RemoteDevice,
    binding: [u8; 128],
    recv0: Keys,
    send0: Keys,
    recv1: Option<Keys>,
    send1: Option<Keys>,
    /// This side's ephemeral secret, until the initiator's ephemeral arrives.
    ratchet: Option<Ratchet>,
    /// This side's ephemeral public key, sent until the initiator moves to epoch 1.
    announce: Option<[u8; KEY_LEN]>,
    window: [Window; 2],
}

struct Ratchet {
    secret: AgreementSecret,
    /// Its public key, computed once (it is sent with every epoch-0 message).
    public: AgreementPublicKey,
    salt: Zeroizing<[u8; 32]>,
}

impl Ratchet {
    fn new(salt: Zeroizing<[u8; 32]>, rng: &mut impl CryptoRngCore) -> Self {
        let secret = AgreementSecret::generate(rng);
        Self {
            public: secret.public(),
            secret,
            salt,
        }
    }
}

/// One direction's key in one epoch, with its next counter.
struct Keys {
    key: aead::LessSafeKey,
    epoch: u32,
    next: u64,
}

impl Keys {
    fn new(key: &[u8; 32], epoch: u32) -> Self {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
        Self {
            key: aead::LessSafeKey::new(unbound),
            epoch,
            next: 0,
        }
    }
}

/// The (sending cell, envelope id) pairs of the last [`DEDUPE`] envelopes delivered, first in
/// first out.
///
/// A ring holds the pairs in the order they came; an index maps a keyed 64-bit hash of each
/// pair to its place in the ring. A lookup hashes the 48 bytes once and reads the ring only to
/// confirm a match, and forgetting the oldest needs no second hash. Two different pairs with
/// one hash (about one chance in 2^48 per message, and the key is secret) leave the newer one
/// out of the index: it could then show twice if sent again, never be dropped.
#[derive(Default)]
struct Delivered {
    hasher: RandomState,
    index: HashMap<u64, u64, std::hash::BuildHasherDefault<Prehashed>>,
    ring: VecDeque<((CellId, MsgId), u64)>,
    /// The position of `ring[0]` among all pairs ever remembered.
    first: u64,
}

impl Delivered {
    /// Remembers `pair`; false if it was remembered already.
    fn insert(&mut self, pair: (CellId, MsgId)) -> bool {
        use std::collections::hash_map::Entry;
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(pair);
        let at = self.first + self.ring.len() as u64;
        match self.index.entry(hash) {
            Entry::Occupied(e) => {
                let known = usize::try_from(*e.get() - self.first).ok();
                if known
                    .and_then(|i| self.ring.get(i))
                    .is_some_and(|(p, _)| *p == pair)
                {
                    return false;
                }
            }
            Entry::Vacant(e) => {
                e.insert(at);
            }
        }
        self.ring.push_back((pair, hash));
        if self.ring.len() > DEDUPE
            && let Some((_, old)) = self.ring.pop_front()
        {
            if self.index.get(&old) == Some(&self.first) {
                self.index.remove(&old);
            }
            self.first += 1;
        }
        true
    }
}

/// A hasher for keys that are already keyed hashes: it passes them through.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Which counters of one direction and epoch were seen: all below `base` (a multiple of 64)
/// except those below `lost`, and a bitmap from `base` on. The bitmap only grows while
/// counters arrive out of order (a queue drained while newer messages are pushed live), and
/// spans at most [`REPLAY_WINDOW`] counters: a counter further ahead moves it, and the
/// counters it leaves behind unseen become too old to tell.
#[derive(Default)]
struct Window {
    base: u64,
    lost: u64,
    words: std::collections::VecDeque<u64>,
}

impl Window {
    const WORDS: u64 = REPLAY_WINDOW / 64;

    /// Records `counter`. `Ok(true)` if it was seen before, an error if it is too old to tell.
    fn accept(&mut self, counter: u64) -> Result<bool, OpenError> {
        if counter < self.lost {
            return Err(OpenError::Replayed);
        }
        if counter < self.base {
            return Ok(true);
        }
        if (counter - self.base) / 64 >= Self::WORDS {
            let base = (counter / 64 + 1 - Self::WORDS) * 64;
            let drop = (base - self.base) / 64;
            if drop >= self.words.len() as u64 {
                self.words.clear();
            } else {
                self.words.drain(..drop as usize);
            }
            self.base = base;
            self.lost = base;
        }
        let word = ((counter - self.base) / 64) as usize;
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (counter % 64);
        let seen = self.words[word] & bit != 0;
        self.words[word] |= bit;
        while self.words.front() == Some(&u64::MAX) {
            self.words.pop_front();
            self.base += 64;
        }
        Ok(seen)
    }
}

impl Outbound {
    fn start(
        local: &LocalDevice,
        peer: &RemoteDevice,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, SealError> {
        let mut sid = [0; 16];
        rng.fill_bytes(&mut sid);
        let id = SessionId(sid);
        let binding = binding(local.cell, local.node, peer.cell(), peer.node());
        let info = info(id, &binding);
        let sk = hpke_secret(&local.agreement).map_err(|_| SealError::Setup)?;
        let pk = hpke_public(&local.agreement.public()).map_err(|_| SealError::Setup)?;
        let pk_recip = hpke_public(&peer.agreement).map_err(|_| SealError::Setup)?;
        let (enc, ctx) = hpke::setup_sender::<ExportOnly, Kdf, Kem, _>(
            &hpke::OpModeS::Auth((sk, pk)),
            &pk_recip,
            &info,
            &mut RngAdapter(rng),
        )
        .map_err(|_| SealError::Setup)?;
        let (i2r, r2i, salt) =
            exports(|label, out| ctx.export(label, out)).map_err(|_| SealError::Setup)?;
        let mut init = Vec::with_capacity(600);
        init.extend_from_slice(&enc.to_bytes());
        put_bytes16(&mut init, &local.node_token.to_bytes());
        put_bytes16(&mut init, &local.identity.to_bytes());
        Ok(Self {
            id,
            peer: peer.clone(),
            binding,
            init,
            send: Keys::new(&i2r, 0),
            recv0: Keys::new(&r2i, 0),
            recv1: None,
            ratchet: Some(Ratchet::new(salt, rng)),
            window: Default::default(),
        })
    }

    fn open_reply(
        &mut self,
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<Opened, OpenError> {
        let epoch = sealed_epoch(envelope, header_len)?;
        let keys = match (epoch, &self.recv1) {
            (0, _) => &self.recv0,
            (1, Some(k)) => k,
            _ => return Err(OpenError::Unauthentic),
        };
        let binding = reversed(&self.binding);
        let (counter, _, plain) = open_envelope(keys, envelope, header_len, &binding, id)?;
        if self.window[epoch as usize].accept(counter)? {
            return Err(OpenError::Replayed);
        }
        let mut r = Reader::new(&plain);
        let theirs = read_ratchet(&mut r)?;
        if r.u8()? != PLAIN_ACK {
            return Err(DecodeError::Invalid("reply plaintext kind").into());
        }
        let n = r.u16()? as usize;
        if n == 0 || n > MAX_ACK_IDS {
            return Err(DecodeError::Invalid("ack count").into());
        }
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(MsgId(r.array()?));
        }
        r.finish()?;
        if let Some(theirs) = theirs
            && let Some(ratchet) = self.ratchet.take()
        {
            let (i2r, r2i) = epoch1(&ratchet, &theirs).ok_or(OpenError::Unauthentic)?;
            self.send = Keys::new(&i2r, 1);
            self.recv1 = Some(Keys::new(&r2i, 1));
            self.init = Vec::new();
        }
        Ok(Opened::Acked {
            from: self.peer.node(),
            ids,
        })
    }
}

impl Inbound {
    fn accept(
        local: &LocalDevice,
        peer: RemoteDevice,
        session: SessionId,
        enc: &[u8; KEY_LEN],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, OpenError> {
        let binding = binding(peer.cell(), peer.node(), local.cell, local.node);
        let info = info(session, &binding);
        let fail = |_| OpenError::Unauthentic;
        let sk = hpke_secret(&local.agreement).map_err(fail)?;
        let pk_sender = hpke_public(&peer.agreement).map_err(fail)?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(fail)?;
        let ctx = hpke::setup_receiver::<ExportOnly, Kdf, Kem>(
            &hpke::OpModeR::Auth(pk_sender),
            &sk,
            &enc,
            &info,
        )
        .map_err(fail)?;
        let (i2r, r2i, salt) = exports(|label, out| ctx.export(label, out)).map_err(fail)?;
        Ok(Self {
            peer,
            binding,
            recv0: Keys::new(&i2r, 0),
            send0: Keys::new(&r2i, 0),
            recv1: None,
            send1: None,
            ratchet: Some(Ratchet::new(salt, rng)),
            announce: None,
            window: Default::default(),
        })
    }

    /// Opens a message; returns its time, plaintext and whether its counter was seen before.
    fn open(
        &mut self,
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<(Timestamp, Vec<u8>, bool), OpenError> {
        let epoch = sealed_epoch(envelope, header_len)?;
        let keys = match (epoch, &self.recv1) {
            (0, _) => &self.recv0,
            (1, Some(k)) => k,
            _ => return Err(OpenError::Unauthentic),
        };
        let (counter, time, plain) = open_envelope(keys, envelope, header_len, &self.binding, id)?;
        let seen = self.window[epoch as usize].accept(counter)?;
        if epoch == 1 {
            // The initiator has our ephemeral: stop announcing it.
            self.announce = None;
        }
        Ok((time, plain, seen))
    }

    /// The initiator's ephemeral arrived: derive epoch 1 and erase our ephemeral secret.
    fn advance(&mut self, theirs: &[u8; KEY_LEN]) -> Result<(), OpenError> {
        if let Some(ratchet) = self.ratchet.take() {
            let (i2r, r2i) = epoch1(&ratchet, theirs).ok_or(OpenError::Unauthentic)?;
            self.recv1 = Some(Keys::new(&i2r, 1));
            self.send1 = Some(Keys::new(&r2i, 1));
            self.announce = Some(*ratchet.public.as_bytes());
        }
        Ok(())
    }

    fn seal_ack(&mut self, session: SessionId, id: MsgId, ids: &[MsgId]) -> Bytes {
        let announce = self.announce;
        let keys = match (&announce, &mut self.send1) {
            (None, Some(k)) => k,
            _ => &mut self.send0,
        };
        let binding = reversed(&self.binding);
        let header = Header {
            kind: REPLY,
            session,
            extra: &[],
            time: Timestamp(0),
        };
        seal_envelope(header, keys, &binding, id, 35 + 16 * ids.len(), |plain| {
            match &announce {
                Some(eph) => {
                    plain.push(1);
                    plain.extend_from_slice(eph);
                }
                None => plain.push(0),
            }
            plain.push(PLAIN_ACK);
            plain.extend_from_slice(&(ids.len() as u16).to_be_bytes());
            for i in ids {
                plain.extend_from_slice(&i.0);
            }
        })
    }
}

/// The clear part of an envelope before its sealed part.
struct Header<'a> {
    kind: u8,
    session: SessionId,
    /// INIT fields, or nothing.
    extra: &'a [u8],
    time: Timestamp,
}

/// Builds an envelope: the header, then the plaintext `write` appends, sealed in place (so
/// the plaintext is never in a second buffer).
fn seal_envelope(
    header: Header<'_>,
    keys: &mut Keys,
    binding: &[u8; 128],
    id: MsgId,
    plain_len: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Bytes {
    let counter = keys.next;
    keys.next += 1;
    let mut out = Vec::with_capacity(18 + header.extra.len() + SEALED_HEADER + plain_len + TAG_LEN);
    out.extend_from_slice(&[E2E_VERSION, header.kind]);
    out.extend_from_slice(&header.session.0);
    out.extend_from_slice(header.extra);
    out.extend_from_slice(&keys.epoch.to_be_bytes());
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&header.time.0.to_be_bytes());
    let sealed_at = out.len();
    write(&mut out);
    let (clear, plain) = out.split_at_mut(sealed_at);
    let tag = with_aad(clear, binding, id, |aad| {
        keys.key
            .seal_in_place_separate_tag(nonce(keys.epoch, counter), aead::Aad::from(aad), plain)
    })
    .unwrap_or_else(|_| unreachable!("AES-GCM seals any length under 64 GiB"));
    out.extend_from_slice(tag.as_ref());
    Bytes::from(out)
}

/// Opens the sealed part of `envelope` (which starts at `header_len`): counter, time,
/// plaintext.
fn open_envelope(
    keys: &Keys,
    envelope: &[u8],
    header_len: usize,
    binding: &[u8; 128],
    id: MsgId,
) -> Result<(u64, Timestamp, Vec<u8>), OpenError> {
    let sealed_at = header_len + SEALED_HEADER;
    if envelope.len() < sealed_at + TAG_LEN {
        return Err(DecodeError::Truncated.into());
    }
    let mut r = Reader::new(&envelope[header_len..sealed_at]);
    let epoch = r.u32()?;
    let counter = r.u64()?;
    let time = Timestamp(r.u64()?);
    // The plaintext is the application's message, handed over as it is (not zeroized);
    // whatever a failed open leaves in the buffer is wiped.
    let mut buf = envelope[sealed_at..].to_vec();
    let opened = with_aad(&envelope[..sealed_at], binding, id, |aad| {
        keys.key
            .open_in_place(nonce(epoch, counter), aead::Aad::from(aad), &mut buf)
            .map(|p| p.len())
    });
    match opened {
        Ok(len) => {
            buf.truncate(len);
            Ok((counter, time, buf))
        }
        Err(_) => {
            buf.zeroize();
            Err(OpenError::Unauthentic)
        }
    }
}

fn sealed_epoch(envelope: &[u8], header_len: usize) -> Result<u32, OpenError> {
    let mut r = Reader::new(envelope.get(header_len..).unwrap_or_default());
    Ok(r.u32()?)
}

/// Calls `f` with the associated data: context, clear header, binding, message id. On the
/// stack when it fits (every MSG and REPLY), on the heap for INIT's long header.
fn with_aad<R>(header: &[u8], binding: &[u8; 128], id: MsgId, f: impl FnOnce(&[u8]) -> R) -> R {
    const STACK: usize = 256;
    let len = CONTEXT.len() + header.len() + 128 + 16;
    let fill = |buf: &mut [u8]| {
        let (a, rest) = buf.split_at_mut(CONTEXT.len());
        a.copy_from_slice(CONTEXT);
        let (b, rest) = rest.split_at_mut(header.len());
        b.copy_from_slice(header);
        let (c, d) = rest.split_at_mut(128);
        c.copy_from_slice(binding);
        d.copy_from_slice(&id.0);
    };
    if len <= STACK {
        let mut buf = [0u8; STACK];
        fill(&mut buf[..len]);
        f(&buf[..len])
    } else {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        f(&buf)
    }
}

fn nonce(epoch: u32, counter: u64) -> aead::Nonce {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn binding(from_cell: CellId, from_node: NodeId, to_cell: CellId, to_node: NodeId) -> [u8; 128] {
    let mut b = [0; 128];
    b[..32].copy_from_slice(from_cell.key().as_bytes());
    b[32..64].copy_from_slice(from_node.key().as_bytes());
    b[64..96].copy_from_slice(to_cell.key().as_bytes());
    b[96..].copy_from_slice(to_node.key().as_bytes());
    b
}

/// The binding seen from the other direction (replies: the recipient is the sender).
fn reversed(b: &[u8; 128]) -> [u8; 128] {
    let mut r = [0; 128];
    r[..64].copy_from_slice(&b[64..]);
    r[64..].copy_from_slice(&b[..64]);
    r
}

fn info(session: SessionId, binding: &[u8; 128]) -> Vec<u8> {
    [INFO_PREFIX, &session.0, binding].concat()
}

type Exported = ([u8; 32], [u8; 32], Zeroizing<[u8; 32]>);

fn exports(
    export: impl Fn(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
) -> Result<Exported, hpke::HpkeError> {
    let mut keys = Zeroizing::new([0u8; 64]);
    export(EXPORT_KEYS, &mut keys[..])?;
    let mut salt = Zeroizing::new([0u8; 32]);
    export(EXPORT_RATCHET, &mut salt[..])?;
    let mut i2r = [0; 32];
    let mut r2i = [0; 32];
    i2r.copy_from_slice(&keys[..32]);
    r2i.copy_from_slice(&keys[32..]);
    Ok((i2r, r2i, salt))
}

/// Epoch-1 keys (initiator → responder, responder → initiator) from our ephemeral and theirs;
/// `None` when their key is of small order.
fn epoch1(ours: &Ratchet, theirs: &[u8; KEY_LEN]) -> Option<([u8; 32], [u8; 32])> {
    let shared = ours
        .secret
        .diffie_hellman(&AgreementPublicKey::from_bytes_unchecked(theirs))?;
    let hk = Hkdf::<Sha256>::new(Some(&ours.salt[..]), &shared[..]);
    let mut okm = Zeroizing::new([0u8; 64]);
    hk.expand(EPOCH1_INFO, &mut okm[..])
        .unwrap_or_else(|_| unreachable!("64 bytes is a valid HKDF-SHA256 length"));
    let mut i2r = [0; 32];
    let mut r2i = [0; 32];
    i2r.copy_from_slice(&okm[..32]);
    r2i.copy_from_slice(&okm[32..]);
    Some((i2r, r2i))
}

fn read_ratchet(r: &mut Reader<'_>) -> Result<Option<[u8; KEY_LEN]>, OpenError> {
    Ok(match r.flag("ratchet flag")? {
        true => Some(r.array()?),
        false => None,
    })
}

fn reset_envelope(session: SessionId) -> Bytes {
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&[E2E_VERSION, RESET]);
    out.extend_from_slice(&session.0);
    Bytes::from(out)
}

fn hpke_secret(s: &AgreementSecret) -> Result<<Kem as hpke::Kem>::PrivateKey, hpke::HpkeError> {
    <Kem as hpke::Kem>::PrivateKey::from_bytes(&s.dangerous_bytes()[..])
}

fn hpke_public(p: &AgreementPublicKey) -> Result<<Kem as hpke::Kem>::PublicKey, hpke::HpkeError> {
    <Kem as hpke::Kem>::PublicKey::from_bytes(p.as_bytes())
}

/// hpke 0.12 takes `rand_core` 0.6's `CryptoRng + RngCore`; this passes our RNG through.
struct RngAdapter<'a, R: CryptoRngCore>(&'a mut R);

impl<R: CryptoRngCore> rand_core::RngCore for RngAdapter<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl<R: CryptoRngCore> rand_core::CryptoRng for RngAdapter<'_, R> {}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;
    use crate::testing::TestNode;

    const T: Timestamp = Timestamp(1_800_000_100);

    fn endpoint(n: &TestNode) -> Endpoint {
        n.endpoint()
    }

    fn remote(n: &TestNode) -> RemoteDevice {
        n.remote(T)
    }

    struct World {
        rng: ChaCha20Rng,
        alice: Endpoint,
        bob: Endpoint,
        bob_device: RemoteDevice,
        alice_node: NodeId,
    }

    fn world() -> World {
        let t0 = Timestamp(1_800_000_000);
        let (a, b) = (TestNode::new(1, t0), TestNode::new(2, t0));
        World {
            rng: ChaCha20Rng::from_seed([9; 32]),
            alice: endpoint(&a),
            bob: endpoint(&b),
            bob_device: remote(&b),
            alice_node: a.node_id(),
        }
    }

    impl World {
        fn send(&mut self, body: &[u8]) -> (MsgId, Bytes) {
            let id = MsgId::random(&mut self.rng);
            let env = self
                .alice
                .seal(&self.bob_device, id, T, body, &mut self.rng)
                .unwrap();
            (id, env)
        }

        fn bob_opens(&mut self, id: MsgId, env: &[u8]) -> Result<Opened, OpenError> {
            let from = self.alice_node;
            self.bob
                .open(from, id, env, T, &Revocations::new(), &mut self.rng)
        }

        /// Bob's acknowledgements, opened by Alice.
        fn acks_back(&mut self) -> Vec<MsgId> {
            let mut acked = Vec::new();
            let bob = self.bob_device.node();
            for reply in self.bob.poll_acks(&mut self.rng) {
                assert_eq!(reply.to, self.alice_node);
                match self
                    .alice
                    .open(
                        bob,
                        reply.id,
                        &reply.envelope,
                        T,
                        &Revocations::new(),
                        &mut self.rng,
                    )
                    .unwrap()
                {
                    Opened::Acked { ids, .. } => acked.extend(ids),
                    other => panic!("{other:?}"),
                }
            }
            acked
        }
    }

    #[test]
    fn messages_flow_and_the_session_moves_to_ephemeral_keys() {
        let mut w = world();
        let (id1, env1) = w.send(b"hello bob");
        assert_eq!(env1[1], INIT, "the first message sets the session up");
        match w.bob_opens(id1, &env1).unwrap() {
            Opened::Message(m) => {
                assert_eq!(m.body, &b"hello bob"[..]);
                assert_eq!(m.id, id1);
                assert_eq!(m.time, T);
                assert_eq!(m.from_node, w.alice_node);
            }
            other => panic!("{other:?}"),
        }
        // A second message before the acknowledgement is still a self-contained INIT.
        let (id2, env2) = w.send(b"again");
        assert_eq!(env2[1], INIT);
        assert!(matches!(
            w.bob_opens(id2, &env2).unwrap(),
            Opened::Message(_)
        ));
        assert_eq!(w.acks_back(), vec![id1, id2]);
        // After the acknowledgement (which carried Bob's ephemeral key): compact, epoch 1.
        let (id3, env3) = w.send(b"three");
        assert_eq!(env3[1], MSG);
        assert_eq!(&env3[18..22], &1u32.to_be_bytes());
        assert!(env3.len() < 18 + SEALED_HEADER + 1 + 1 + 4 + 5 + TAG_LEN + 1);
        assert!(matches!(
            w.bob_opens(id3, &env3).unwrap(),
            Opened::Message(_)
        ));
        assert_eq!(w.acks_back(), vec![id3]);
        // Bob's replies are now in epoch 1 too, and without his ephemeral key.
        let (id4, env4) = w.send(b"four");
        w.bob_opens(id4, &env4).unwrap();
        let acks = w.bob.poll_acks(&mut w.rng);
        assert_eq!(&acks[0].envelope[18..22], &1u32.to_be_bytes());
    }

    #[test]
    fn a_resent_message_is_acknowledged_again_but_delivered_once() {
        let mut w = world();
        let (id, env) = w.send(b"once");
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Message(_)));
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Duplicate(d) if d == id));
        assert_eq!(w.acks_back(), vec![id, id]);
    }

    impl World {
        fn bundle(&mut self, bodies: &[&[u8]]) -> (MsgId, Vec<MsgId>, Bytes) {
            let messages: Vec<(MsgId, Bytes)> = bodies
                .iter()
                .map(|b| (MsgId::random(&mut self.rng), Bytes::copy_from_slice(b)))
                .collect();
            let id = MsgId::random(&mut self.rng);
            let env = self
                .alice
                .seal_bundle(&self.bob_device, id, T, &messages, &mut self.rng)
                .unwrap();
            (id, messages.into_iter().map(|(m, _)| m).collect(), env)
        }
    }

    #[test]
    fn a_bundle_carries_its_messages_under_one_acknowledgement() {
        let mut w = world();
        // The first envelope of a session is an INIT, the next ones MSG: both can bundle.
        for _ in 0..2 {
            let (id, ids, env) = w.bundle(&[b"one", b"", b"three"]);
            match w.bob_opens(id, &env).unwrap() {
                Opened::Bundle(messages) => {
                    let got: Vec<(MsgId, &[u8])> =
                        messages.iter().map(|m| (m.id, &m.body[..])).collect();
                    assert_eq!(
                        got,
                        vec![(ids[0], &b"one"[..]), (ids[1], b""), (ids[2], b"three")]
                    );
                    assert!(messages.iter().all(|m| m.time == T));
                }
                other => panic!("{other:?}"),
            }
            // One acknowledgement, naming the envelope.
            assert_eq!(w.acks_back(), vec![id]);
        }
    }

    #[test]
    fn a_bundle_sent_again_delivers_nothing_twice() {
        let mut w = world();
        let messages = vec![
            (MsgId([3; 16]), Bytes::from_static(b"a")),
            (MsgId([4; 16]), Bytes::from_static(b"b")),
        ];
        let id = MsgId([5; 16]);
        let to = w.bob_device.clone();
        let env = w.alice.seal_bundle(&to, id, T, &messages, &mut w.rng);
        let env = env.unwrap();
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Bundle(m) if m.len() == 2));
        // The same envelope again (a relay's redelivery), or sealed again under a new counter
        // (as after a RESET): a duplicate, acknowledged again.
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Duplicate(d) if d == id));
        let again = w.alice.seal_bundle(&to, id, T, &messages, &mut w.rng);
        let again = again.unwrap();
        assert!(matches!(w.bob_opens(id, &again).unwrap(), Opened::Duplicate(d) if d == id));
        assert_eq!(w.acks_back(), vec![id, id, id]);
    }

    #[test]
    fn bundles_are_bounded_and_checked() {
        let mut w = world();
        let to = w.bob_device.clone();
        let one = (MsgId([1; 16]), Bytes::new());
        assert_eq!(
            w.alice.seal_bundle(&to, MsgId([0; 16]), T, &[], &mut w.rng),
            Err(SealError::BundleCount(0))
        );
        let many = vec![one.clone(); MAX_BUNDLE + 1];
        assert_eq!(
            w.alice
                .seal_bundle(&to, MsgId([0; 16]), T, &many, &mut w.rng),
            Err(SealError::BundleCount(MAX_BUNDLE + 1))
        );
        let huge = vec![(MsgId([1; 16]), Bytes::from(vec![0; MAX_BODY / 2])); 2];
        assert!(matches!(
            w.alice
                .seal_bundle(&to, MsgId([0; 16]), T, &huge, &mut w.rng),
            Err(SealError::TooLarge(_))
        ));
        // The largest bundle fits in an envelope, padded or not.
        w.alice.padding = Padding::PowerOfTwo;
        let full = vec![(
            MsgId([1; 16]),
            Bytes::from(vec![0; MAX_BODY - 2 - BUNDLE_ITEM]),
        )];
        let env = w
            .alice
            .seal_bundle(&to, MsgId([0; 16]), T, &full, &mut w.rng);
        assert!(env.unwrap().len() <= crate::relay::MAX_ENVELOPE);
        // Every altered byte of a bundle is refused.
        let (id, _, env) = w.bundle(&[b"x", b"y"]);
        every_flip_is_refused(id, &env);
    }

    /// Plaintexts that authenticate (sealed by the real sender) but are not well formed are
    /// refused whole, and deliver nothing.
    #[test]
    fn a_malformed_plaintext_that_authenticates_is_refused() {
        let id = [0x77u8; 16];
        let item = |len: u32, body: &[u8]| [&id[..], &len.to_be_bytes(), body].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("bundle of none", vec![PLAIN_BUNDLE, 0, 0]),
            (
                "bundle of 1025",
                [&[PLAIN_BUNDLE, 4, 1][..], &item(0, b"")].concat(),
            ),
            (
                "bundle cut short",
                [&[PLAIN_BUNDLE, 0, 2][..], &item(1, b"x")].concat(),
            ),
            (
                "body past the end",
                [&[PLAIN_BUNDLE, 0, 1][..], &item(9, b"x")].concat(),
            ),
            (
                "non-zero padding after a bundle",
                [&[PLAIN_BUNDLE, 0, 1][..], &item(1, b"x"), &[0, 1]].concat(),
            ),
            (
                "non-zero padding after a body",
                vec![PLAIN_MESSAGE, 0, 0, 0, 1, b'x', 7],
            ),
            ("an acknowledgement inbound", vec![PLAIN_ACK, 0, 1]),
            ("an unknown kind", vec![9, 0, 0]),
            ("nothing after the flag", vec![]),
        ];
        for (what, plain) in cases {
            let mut w = world();
            let to = w.bob_device.clone();
            let env = w
                .alice
                .seal_plain(&to, MsgId(id), T, plain.len(), &mut w.rng, |p| {
                    p.extend_from_slice(&plain)
                });
            let opened = w.bob_opens(MsgId(id), &env.unwrap());
            assert!(
                matches!(opened, Err(OpenError::Malformed(_))),
                "{what}: {opened:?}"
            );
        }
    }

    /// Flips each byte of `env` in turn: a fresh recipient opens none of them as a message.
    fn every_flip_is_refused(id: MsgId, env: &[u8]) {
        for i in 0..env.len() {
            let mut bad = env.to_vec();
            bad[i] ^= 0x01;
            let mut fresh = world();
            assert!(
                !matches!(
                    fresh.bob_opens(id, &bad),
                    Ok(Opened::Message(_) | Opened::Bundle(_))
                ),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    /// An acknowledgement reaching another process of the sending device (same node, none of
    /// its sessions) is dropped as such, not reported as a forgery.
    #[test]
    fn an_acknowledgement_for_a_session_this_process_lacks_is_no_session() {
        let mut w = world();
        let (id, env) = w.send(b"from the first process");
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Message(_)));
        let t0 = Timestamp(1_800_000_000);
        let mut second = endpoint(&TestNode::new(1, t0));
        for reply in w.bob.poll_acks(&mut w.rng) {
            let opened = second.open(
                w.bob_device.node(),
                reply.id,
                &reply.envelope,
                T,
                &Revocations::new(),
                &mut w.rng,
            );
            assert_eq!(opened.unwrap_err(), OpenError::NoSession);
        }
    }

    #[test]
    fn every_altered_byte_is_refused() {
        let mut w = world();
        let (id, env) = w.send(b"integrity");
        every_flip_is_refused(id, &env);
        // Another id, or another claimed sender, than the one sealed: refused.
        let mut other = MsgId([0; 16]);
        other.0[0] = 1;
        assert_eq!(
            w.bob_opens(other, &env).unwrap_err(),
            OpenError::Unauthentic
        );
        let mallory = TestNode::new(3, Timestamp(1_800_000_000)).node_id();
        assert_eq!(
            w.bob
                .open(mallory, id, &env, T, &Revocations::new(), &mut w.rng)
                .unwrap_err(),
            OpenError::WrongSender
        );
        // Truncations never deliver.
        for n in 0..env.len() {
            let mut fresh = world();
            assert!(fresh.bob_opens(id, &env[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn a_third_party_cannot_read_or_impersonate() {
        let mut w = world();
        let (id, env) = w.send(b"secret");
        // Carol, another cell, is not the recipient: the envelope is not for her keys.
        let carol = TestNode::new(4, Timestamp(1_800_000_000));
        let mut carol_ep = endpoint(&carol);
        assert!(
            carol_ep
                .open(w.alice_node, id, &env, T, &Revocations::new(), &mut w.rng)
                .is_err()
        );
        // Mallory seals to Bob claiming Alice's tokens but with her own key: refused.
        let mallory = TestNode::new(5, Timestamp(1_800_000_000));
        let forged = LocalDevice {
            cell: w.alice.local.cell,
            node: w.alice_node,
            node_token: w.alice.local.node_token.clone(),
            identity: w.alice.local.identity.clone(),
            agreement: AgreementSecret::from_bytes(&mallory.node.agreement.dangerous_bytes()),
        };
        let mut forger = Endpoint::new(forged, Padding::None);
        let env = forger
            .seal(&w.bob_device, id, T, b"from alice, honest", &mut w.rng)
            .unwrap();
        assert_eq!(w.bob_opens(id, &env).unwrap_err(), OpenError::Unauthentic);
    }

    #[test]
    fn a_directory_with_a_swapped_key_is_detected() {
        let t0 = Timestamp(1_800_000_000);
        let bob = TestNode::new(2, t0);
        let bob2 = bob.sibling(6, t0);
        let mallory = TestNode::new(7, t0);
        let entry = |n: &TestNode| DirectoryEntry {
            node_token: n.node_token.clone(),
            identity: n.identity.clone(),
        };
        let none = Revocations::new();
        let dir = Directory::verify(bob.cell_id(), &[entry(&bob), entry(&bob2)], T, &none).unwrap();
        assert_eq!(dir.devices.len(), 2);
        // The relay answers with Mallory's device for Bob's cell.
        assert_eq!(
            Directory::verify(bob.cell_id(), &[entry(&bob), entry(&mallory)], T, &none),
            Err(DirectoryError::WrongCell(mallory.cell_id()))
        );
        // Or with Bob's identity token over Mallory's node token (her X25519 key).
        let spliced = DirectoryEntry {
            node_token: mallory.node_token.clone(),
            identity: bob.identity.clone(),
        };
        assert!(Directory::verify(bob.cell_id(), &[spliced], T, &none).is_err());
        assert_eq!(
            Directory::verify(bob.cell_id(), &[], T, &none),
            Err(DirectoryError::NoDevices(bob.cell_id()))
        );
        // A revoked device is left out.
        let mut revoked = Revocations::new();
        let token = crate::device::revocation(
            &bob.cell,
            bob2.node_id(),
            t0,
            &mut ChaCha20Rng::from_seed([1; 32]),
        )
        .unwrap();
        revoked.insert(&token.verify(T, 60).unwrap()).unwrap();
        let dir =
            Directory::verify(bob.cell_id(), &[entry(&bob), entry(&bob2)], T, &revoked).unwrap();
        assert_eq!(dir.devices.len(), 1);
    }

    #[test]
    fn a_recipient_that_lost_its_session_asks_for_a_new_one() {
        let mut w = world();
        let (id, env) = w.send(b"first");
        w.bob_opens(id, &env).unwrap();
        w.acks_back();
        let (id2, env2) = w.send(b"second");
        // Bob restarts: a MSG for a session he does not know.
        let t0 = Timestamp(1_800_000_000);
        w.bob = endpoint(&TestNode::new(2, t0));
        let reset = match w.bob_opens(id2, &env2).unwrap() {
            Opened::Unknown { reply } => reply,
            other => panic!("{other:?}"),
        };
        let bob = w.bob_device.node();
        let got = w
            .alice
            .open(
                bob,
                reset.id,
                &reset.envelope,
                T,
                &Revocations::new(),
                &mut w.rng,
            )
            .unwrap();
        assert!(matches!(got, Opened::Reset { from } if from == bob));
        // Alice sends again, in a new session: delivered.
        let env2 = w
            .alice
            .seal(&w.bob_device, id2, T, b"second", &mut w.rng)
            .unwrap();
        assert_eq!(env2[1], INIT);
        assert!(matches!(
            w.bob_opens(id2, &env2).unwrap(),
            Opened::Message(_)
        ));
        // A RESET for a session that is not the current one is ignored.
        assert!(
            w.alice
                .open(
                    bob,
                    reset.id,
                    &reset.envelope,
                    T,
                    &Revocations::new(),
                    &mut w.rng
                )
                .is_err()
        );
    }

    #[test]
    fn padding_hides_the_size() {
        let mut w = world();
        w.alice.padding = Padding::PowerOfTwo;
        let (_, short) = w.send(b"a");
        let (_, longer) = w.send(&[7; 200]);
        assert_eq!(short.len(), longer.len());
        let (id, env) = w.send(&[7; 300]);
        match w.bob_opens(id, &env).unwrap() {
            Opened::Message(m) => assert_eq!(m.body.len(), 300),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn another_cell_reusing_an_id_does_not_hide_a_message() {
        let mut w = world();
        let (id, env) = w.send(b"from alice");
        // Mallory's cell sends Bob a message with the same id first.
        let mallory = TestNode::new(8, Timestamp(1_800_000_000));
        let mut m = endpoint(&mallory);
        let early = m.seal(&w.bob_device, id, T, b"decoy", &mut w.rng).unwrap();
        let got = w
            .bob
            .open(
                mallory.node_id(),
                id,
                &early,
                T,
                &Revocations::new(),
                &mut w.rng,
            )
            .unwrap();
        assert!(matches!(got, Opened::Message(_)));
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Message(_)));
    }

    #[test]
    fn padding_never_grows_an_envelope_past_the_limit() {
        let mut w = world();
        w.alice.padding = Padding::PowerOfTwo;
        let (id, env) = w.send(&vec![1; 600_000]);
        assert!(env.len() <= crate::relay::MAX_ENVELOPE, "{}", env.len());
        assert!(matches!(w.bob_opens(id, &env).unwrap(), Opened::Message(_)));
        let (_, env) = w.send(&vec![1; MAX_BODY]);
        assert!(env.len() <= crate::relay::MAX_ENVELOPE, "{}", env.len());
    }

    #[test]
    fn a_lapsed_device_is_left_out_of_a_directory_not_fatal_to_it() {
        let bob = TestNode::new(2, Timestamp(1_800_000_000));
        let old = bob.sibling(9, Timestamp(1_800_000_000 - 400 * 24 * 3600));
        let entry = |n: &TestNode| DirectoryEntry {
            node_token: n.node_token.clone(),
            identity: n.identity.clone(),
        };
        let dir = Directory::verify(
            bob.cell_id(),
            &[entry(&old), entry(&bob)],
            T,
            &Revocations::new(),
        )
        .unwrap();
        assert_eq!(dir.devices.len(), 1);
        assert_eq!(dir.devices[0].node(), bob.node_id());
    }

    #[test]
    fn the_replay_window_accepts_each_counter_once() {
        let mut w = Window::default();
        assert_eq!(w.accept(5), Ok(false));
        assert_eq!(w.accept(5), Ok(true));
        assert_eq!(w.accept(3), Ok(false));
        assert_eq!(w.accept(3), Ok(true));
        // In order: the bitmap stays one word long.
        for c in (0..3).chain(4..5).chain(6..10_000) {
            assert_eq!(w.accept(c), Ok(false), "{c}");
        }
        assert!(w.words.len() <= 1);
        assert_eq!(w.accept(9_999), Ok(true));
        assert_eq!(w.accept(17), Ok(true));
        // Far out of order (a long queue overtaken by live messages): still each once.
        let far = 10_000 + REPLAY_WINDOW - 64;
        assert_eq!(w.accept(far), Ok(false));
        assert_eq!(w.accept(10_000), Ok(false));
        assert_eq!(w.accept(10_000), Ok(true));
        // Further ahead than the window spans: what it leaves behind unseen is too old.
        assert_eq!(w.accept(far + 128), Ok(false));
        assert_eq!(w.accept(10_001), Err(OpenError::Replayed));
        assert_eq!(w.accept(far), Ok(true));
        assert_eq!(w.accept(u64::MAX), Ok(false));
        assert_eq!(w.accept(far), Err(OpenError::Replayed));
        assert_eq!(w.accept(u64::MAX), Ok(true));
        assert_eq!(w.accept(u64::MAX - 1), Ok(false));
        assert!(w.words.len() as u64 <= Window::WORDS);
    }

    #[test]
    fn delivered_pairs_are_remembered_first_in_first_out() {
        let mut d = Delivered::default();
        let pair = |n: u32| {
            let mut id = [0; 16];
            id[..4].copy_from_slice(&n.to_be_bytes());
            (
                CellId::from_key(crate::keys::PublicKey::from_bytes_unchecked(&[n as u8; 32])),
                MsgId(id),
            )
        };
        assert!(d.insert(pair(0)));
        assert!(!d.insert(pair(0)));
        // The same id from another cell is another message.
        let (cell, id) = pair(0);
        let other = (
            CellId::from_key(crate::keys::PublicKey::from_bytes_unchecked(&[0xee; 32])),
            id,
        );
        assert_ne!(other.0, cell);
        assert!(d.insert(other));
        for n in 1..DEDUPE as u32 {
            assert!(d.insert(pair(n)), "{n}");
        }
        // DEDUPE + 1 pairs were remembered: the first went, the rest are still known.
        assert!(!d.insert(other));
        assert!(!d.insert(pair(1)));
        assert!(d.insert(pair(0)), "forgotten, so new again");
        assert_eq!(d.ring.len(), DEDUPE);
        assert!(d.index.len() <= DEDUPE);
    }

    proptest::proptest! {
        /// Against a set of every counter seen: never a duplicate accepted, never a new
        /// counter within the window called seen.
        #[test]
        fn the_replay_window_agrees_with_a_set(counters in proptest::collection::vec(0u64..3 * REPLAY_WINDOW, 1..400)) {
            let mut w = Window::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut highest = 0;
            for c in counters {
                highest = highest.max(c);
                match w.accept(c) {
                    Ok(true) => proptest::prop_assert!(seen.contains(&c)),
                    Ok(false) => proptest::prop_assert!(seen.insert(c)),
                    Err(_) => proptest::prop_assert!(highest - c >= REPLAY_WINDOW - 64),
                }
                proptest::prop_assert!(w.words.len() as u64 <= Window::WORDS);
            }
        }
    }
}
