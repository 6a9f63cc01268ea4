//! End-to-end sessions between devices of two cells, for messages that cross relays.
//!
//! A relay forwards envelopes it cannot read. Each sending device keeps one *session* per
//! recipient device; a cell's message is sealed once per device of the recipient cell (fan-out
//! happens at the sender, so the relay never holds a key).
//!
//! # Construction
//!
//! - **Directory** (`directory`). The sender checks each (node token, identity token) pair a
//!   relay lists against the cell id it asked for: the identity token must be signed by the
//!   cell key the id *is*, and name the node; the node token must be signed by that node and
//!   carry its X25519 key. A relay can withhold devices, never invent or swap one.
//! - **Session setup: HPKE** (RFC 9180) in Auth mode (`schedule`). The sender's key is its
//!   own device's X25519 key, the recipient's its device key; `info` binds both cells and both
//!   devices. The context exports the initiator's epoch-0 key, the base of the replies' keys
//!   and a salt for epoch 1.
//! - **Instances.** Each time a recipient device builds a session from an INIT it draws a
//!   16-byte *instance*: its replies carry it in clear and are sealed under a key derived from
//!   it, so two instances of one session (a restart, two processes of one device) never seal
//!   under the same key and nonce. The initiator keeps to the first instance it hears from; a
//!   reply from another ends the session (the mailbox seals what is unacknowledged anew).
//! - **Forward secrecy.** Epoch-0 envelopes also carry the initiator's fresh X25519 public
//!   key; the responder's first replies carry its own. Both sides then derive epoch 1 and
//!   erase the ephemeral secrets. Epoch 0 is like 0-RTT data: readable by whoever later steals
//!   the recipient device's key. Sessions are retired after [`SESSION_LIFETIME`].
//! - **Messages** are AES-256-GCM under the key of their epoch and direction, nonce = epoch ‖
//!   counter, counters handed out under leases that survive restarts (`session`). The
//!   associated data binds the protocol version, the clear header, both cells and devices and
//!   the envelope id.
//! - **Bundles.** Several messages to one device can share an envelope, each with its own id
//!   inside the ciphertext ([`Endpoint::seal_bundle`]): one seal and one acknowledgement.
//! - **Duplicates and age.** The endpoint opens; the caller decides what is new, with the
//!   duplicate memory [`Seen`], by (sending cell, envelope id). Envelopes older than
//!   [`MAX_AGE`] (or more than [`MAX_AHEAD`] ahead of this device's clock) are refused, so the
//!   memory need only reach that far back.
//! - **Saving.** Sessions change in memory and are handed out as records to persist
//!   ([`Endpoint::take_changes`]); [`Endpoint::restore`] takes them back after a restart.
//!
//! # Envelope
//!
//! ```text
//! envelope = version:u8(=2) kind:u8 session:[16] rest
//!   kind 1 INIT  enc:[32] node_token:bytes16 identity:bytes16 sealed      (epoch 0, self-contained)
//!   kind 2 MSG   sealed                                                   (initiator → responder)
//!   kind 3 RESET                                                          (unauthenticated)
//!   kind 4 REPLY instance:[16] sealed                                     (responder → initiator)
//! sealed   = epoch:u32 counter:u64 time:u64 AES-256-GCM(key, nonce = epoch ‖ counter, aad, plain)
//! aad      = "cellmesh e2e v2" ‖ envelope bytes before the ciphertext ‖ sender cell ‖ sender node
//!            ‖ recipient cell ‖ recipient node ‖ envelope id
//! plain    = ratchet_flag:u8 [ephemeral:[32]] kind:u8 fields
//!   kind 1 MESSAGE body_len:u32 body padding                              padding = zeros
//!   kind 2 ACK     count:u16 id:[16]*count
//!   kind 3 BUNDLE  count:u16 (id:[16] body_len:u32 body)*count padding    messages' own ids
//! ```
//!
//! Until the sender has heard from the recipient device, every message is an INIT (it carries
//! the HPKE encapsulation and the sender's tokens) so that each one can be opened on its own,
//! even by a device that lost the session. A device that gets a MSG it cannot open in any
//! session it has answers RESET; the sender then starts a new session and sends again what
//! is unacknowledged.

mod directory;
mod envelope;
mod schedule;
mod seen;
mod session;
#[cfg(any(test, feature = "testing"))]
mod trace;

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader, put_bytes16};
use crate::device::Revocations;
use crate::id::{CellId, NodeId};
use crate::keys::KEY_LEN;
use crate::limits::{Buckets, Rate};
use crate::relay::MsgId;
use crate::token::{MAX_TOKEN_LEN, Token};
use crate::{Instant, Timestamp};

pub use directory::{Directory, DirectoryError, LocalDevice, RemoteDevice};
pub use seen::{SEEN_PER_CELL, SEEN_TOTAL, Seen, SeenChange, Verdict};
pub use session::LEASE;
#[cfg(any(test, feature = "testing"))]
pub use trace::{KeyTrace, dangerous_key_trace};

use envelope::{
    Header, INIT, MSG, PLAIN_ACK, PLAIN_BUNDLE, PLAIN_MESSAGE, REPLY, RESET, SealKey, binding,
    open_envelope, reset_envelope, reversed, seal_envelope, sealed_epoch,
};
use session::{Inbound, Loaded, Outbound, Ratchet, RecvKey, Responder, SendKey};

/// Envelope format version.
pub const E2E_VERSION: u8 = 2;
/// Most sessions an endpoint keeps per direction.
pub const MAX_SESSIONS: usize = 4096;
/// Most inbound sessions kept for one sending cell: a cell floods only its own.
pub const MAX_SESSIONS_PER_CELL: usize = 256;
/// New inbound sessions one sending cell may open at once...
pub const NEW_SESSION_BURST: u64 = 64;
/// ... and then one per this many milliseconds.
pub const NEW_SESSION_EVERY_MS: u64 = 10_000;
/// The oldest envelope (by its authenticated time) a device opens: a relay keeps messages
/// for at most 7 days, and a day more allows for clocks and late drains. Seconds.
pub const MAX_AGE: u64 = 8 * 24 * 3600;
/// How far ahead of this device's clock an envelope's time may be. Seconds.
pub const MAX_AHEAD: u64 = 24 * 3600;
/// How long an outbound session is used before the next message starts a new one (for
/// forward secrecy: epoch-1 keys live no longer). Seconds.
pub const SESSION_LIFETIME: u64 = 24 * 3600;
/// How long an inbound session is kept after an envelope last opened in it: long enough for
/// anything its initiator sealed in it to arrive ([`SESSION_LIFETIME`] + [`MAX_AGE`]).
pub const INBOUND_IDLE: u64 = SESSION_LIFETIME + MAX_AGE;
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

/// A session id: 16 random bytes chosen by the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

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
    /// An envelope of messages (one, or a bundle's) that authenticated. Whether it is new is
    /// for the caller to tell ([`Seen`]); acknowledge it with [`Endpoint::ack`] once its
    /// messages are safe (or at once, if it is a duplicate).
    Messages(Received),
    /// The recipient device acknowledged these envelopes of ours.
    Acked {
        /// The device that acknowledged.
        from: NodeId,
        /// The envelope ids.
        ids: Vec<MsgId>,
        /// The acknowledgement came from another instance of the device than the one the
        /// session had heard from: the session is dropped, so send again, in a new one,
        /// what that device has not acknowledged.
        reset: bool,
    },
    /// The device lost our session: send again, in a new session, what it has not
    /// acknowledged.
    Reset {
        /// The device.
        from: NodeId,
    },
    /// A message for a session this device cannot open it in: `reply` asks the sender to
    /// start again. Nothing is delivered.
    Unknown {
        /// The RESET envelope.
        reply: Reply,
    },
}

/// An envelope of messages that authenticated.
#[derive(Debug)]
pub struct Received {
    /// The sending cell.
    pub from_cell: CellId,
    /// The sending device.
    pub from_node: NodeId,
    /// The envelope's id.
    pub id: MsgId,
    /// When the sender sealed it (its clock).
    pub time: Timestamp,
    /// Its messages, in the order they were sealed.
    pub messages: Vec<Message>,
    /// What [`Endpoint::ack`] needs to acknowledge it.
    pub ack: AckHandle,
}

/// Names an envelope to acknowledge: the session it came in and its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckHandle {
    from: NodeId,
    session: SessionId,
    id: MsgId,
}

impl AckHandle {
    /// The envelope's id.
    pub fn id(&self) -> MsgId {
        self.id
    }
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
    /// Its time is older than [`MAX_AGE`] or too far ahead: a replay, or a clock far off.
    #[error("envelope of time {time} is too old or too far ahead")]
    Stale {
        /// The envelope's (authenticated) time.
        time: Timestamp,
    },
    /// The sending cell opened new sessions faster than [`NEW_SESSION_EVERY_MS`] allows:
    /// not opened now (the relay keeps it for later).
    #[error("sending cell {0} opens too many sessions")]
    RateLimited(CellId),
    /// An acknowledgement or a RESET for a session this device does not have (it lost it,
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

/// Which saved session a record is: the outbound one to a device, or an inbound one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SessionKey {
    /// This device's session to `0`.
    Outbound(NodeId),
    /// A retired outbound session, kept to open late acknowledgements.
    Retired(NodeId, SessionId),
    /// The session `1` of device `0` with this one.
    Inbound(NodeId, SessionId),
}

impl SessionKey {
    /// 49 bytes: a kind byte, the device and the session id (zero for outbound).
    pub fn to_bytes(&self) -> [u8; 49] {
        let (kind, node, session) = match self {
            Self::Outbound(n) => (1, n, SessionId([0; 16])),
            Self::Retired(n, s) => (3, n, *s),
            Self::Inbound(n, s) => (2, n, *s),
        };
        let mut out = [0; 49];
        out[0] = kind;
        out[1..33].copy_from_slice(node.key().as_bytes());
        out[33..].copy_from_slice(&session.0);
        out
    }
}

/// What changed in an endpoint's sessions since the last [`Endpoint::take_changes`].
#[derive(Default)]
pub struct Changes {
    /// Sessions to save (secrets: encrypt them at rest), as records for
    /// [`Endpoint::restore`].
    pub put: Vec<(SessionKey, Zeroizing<Vec<u8>>)>,
    /// Sessions to delete.
    pub delete: Vec<SessionKey>,
    /// Something sealed since depends on these changes being durable first: they must be
    /// on disk before any envelope sealed since the last call leaves the device.
    pub critical: bool,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Changes")
            .field("put", &self.put.iter().map(|(k, _)| *k).collect::<Vec<_>>())
            .field("delete", &self.delete)
            .field("critical", &self.critical)
            .finish()
    }
}

/// The sending and receiving halves of all of a device's end-to-end sessions. Pure state: the
/// caller passes time and randomness in and forwards the envelopes it gets back.
///
/// Use: [`Endpoint::seal`] a message once per device of the recipient's [`Directory`];
/// [`Endpoint::open`] each envelope a relay delivers; [`Endpoint::ack`] what was delivered
/// once it is safe, then forward what [`Endpoint::poll_acks`] returns. Persist what
/// [`Endpoint::take_changes`] returns (a *critical* change before anything sealed since goes
/// out) and call [`Endpoint::expire`] now and then.
///
/// Ordered maps only: the same inputs (and random bytes) give the same outputs.
pub struct Endpoint {
    local: LocalDevice,
    padding: Padding,
    outbound: BTreeMap<NodeId, Outbound>,
    /// Retired outbound sessions, until nothing sealed in them can still be acknowledged.
    retired: BTreeMap<(NodeId, SessionId), Outbound>,
    inbound: BTreeMap<(NodeId, SessionId), Inbound>,
    /// Inbound sessions per sending cell.
    per_cell: BTreeMap<CellId, usize>,
    /// New inbound sessions per sending cell.
    new_sessions: Buckets<CellId>,
    pending_acks: Vec<AckHandle>,
    dirty: BTreeSet<SessionKey>,
    gone: BTreeSet<SessionKey>,
    critical: bool,
}

impl Endpoint {
    /// An endpoint for `local`, with no session.
    pub fn new(local: LocalDevice, padding: Padding) -> Self {
        Self {
            local,
            padding,
            outbound: BTreeMap::new(),
            retired: BTreeMap::new(),
            inbound: BTreeMap::new(),
            per_cell: BTreeMap::new(),
            new_sessions: Buckets::new(
                Rate::every(NEW_SESSION_EVERY_MS, NEW_SESSION_BURST as u32),
                MAX_SESSIONS,
            ),
            pending_acks: Vec::new(),
            dirty: BTreeSet::new(),
            gone: BTreeSet::new(),
            critical: false,
        }
    }

    /// An endpoint with the sessions saved from an earlier run (the records
    /// [`Endpoint::take_changes`] handed out). Records that do not decode, whose peer no
    /// longer verifies at `now` (revoked, lapsed), or that are past their time, are dropped
    /// and listed in the first [`Endpoint::take_changes`] for deletion.
    pub fn restore<'a>(
        local: LocalDevice,
        padding: Padding,
        records: impl IntoIterator<Item = (SessionKey, &'a [u8])>,
        now: Instant,
        revocations: &Revocations,
    ) -> Self {
        let mut endpoint = Self::new(local, padding);
        let time = now.timestamp();
        let (cell, node) = (endpoint.local.cell, endpoint.local.node);
        let make_binding = |peer: &RemoteDevice, outbound: bool| {
            if outbound {
                binding(cell, node, peer.cell(), peer.node())
            } else {
                binding(peer.cell(), peer.node(), cell, node)
            }
        };
        for (key, record) in records {
            match (key, session::load(record, time, revocations, make_binding)) {
                (SessionKey::Outbound(n), Ok(Loaded::Outbound(s))) if s.peer.node() == n => {
                    endpoint.outbound.insert(n, *s);
                }
                (SessionKey::Retired(n, id), Ok(Loaded::Outbound(s)))
                    if s.peer.node() == n && s.id == id =>
                {
                    endpoint.retired.insert((n, id), *s);
                }
                (SessionKey::Inbound(n, id), Ok(Loaded::Inbound(s)))
                    if s.peer.node() == n && s.session == id =>
                {
                    *endpoint.per_cell.entry(s.peer.cell()).or_default() += 1;
                    endpoint.inbound.insert((n, id), *s);
                }
                _ => {
                    endpoint.gone.insert(key);
                }
            }
        }
        endpoint.expire(now);
        endpoint
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
    /// there is none (or if the device's keys changed, or the session is past its
    /// lifetime). `id` is the message's id and the envelope's; `now` gives its time.
    pub fn seal(
        &mut self,
        to: &RemoteDevice,
        id: MsgId,
        now: Instant,
        body: &[u8],
        rng: &mut impl CryptoRngCore,
    ) -> Result<Bytes, SealError> {
        if body.len() > MAX_BODY {
            return Err(SealError::TooLarge(body.len()));
        }
        self.seal_plain(to, id, now, 5 + body.len(), rng, |plain| {
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
        now: Instant,
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
        self.seal_plain(to, id, now, 1 + len, rng, |plain| {
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
        now: Instant,
        len: usize,
        rng: &mut impl CryptoRngCore,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Bytes, SealError> {
        let padding = self.padding;
        let time = now.timestamp();
        let node = to.node();
        self.outbound_for(to, time, rng)?;
        let session = self.outbound.get_mut(&node).ok_or(SealError::Setup)?;
        let ratchet = session.ratchet.as_ref().map(|r| r.public);
        let (kind, extra) = if session.send.epoch == 0 {
            (INIT, &session.init[..])
        } else {
            (MSG, &[][..])
        };
        let (counter, grew) = session.send.take();
        if grew {
            self.dirty.insert(SessionKey::Outbound(node));
            self.critical |= session.saved;
        }
        Ok(seal_envelope(
            Header {
                kind,
                session: session.id,
                extra,
                time,
            },
            &session.send.key,
            session.send.epoch,
            counter,
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
        if self.outbound.remove(&device).is_some() {
            self.gone.insert(SessionKey::Outbound(device));
            self.dirty.remove(&SessionKey::Outbound(device));
        }
    }

    /// The id of the session this device now uses to send to `device`, if any.
    pub fn session_with(&self, device: NodeId) -> Option<SessionId> {
        self.outbound.get(&device).map(|s| s.id)
    }

    /// Opens an envelope that the relay says came from device `from` with id `id`, at `now`.
    pub fn open(
        &mut self,
        from: NodeId,
        id: MsgId,
        envelope: &[u8],
        now: Instant,
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
        let key = (from, session);
        match kind {
            INIT => {
                let enc: [u8; KEY_LEN] = r.array()?;
                let node_token = r.bytes16("node token", MAX_TOKEN_LEN)?;
                let identity = r.bytes16("identity token", MAX_TOKEN_LEN)?;
                let header_len = envelope.len() - r.remaining();
                if self.inbound.contains_key(&key) {
                    // The tokens are parsed and checked once per session, not per message;
                    // the INIT fields are checked through the associated data.
                    return self.open_inbound(key, id, envelope, header_len, now);
                }
                let (node_token, identity) = (Token::decode(node_token)?, Token::decode(identity)?);
                let peer =
                    RemoteDevice::verify(&node_token, &identity, now.timestamp(), revocations)?;
                if peer.node() != from {
                    return Err(OpenError::WrongSender);
                }
                // Built and tried aside: nothing is kept, and nothing evicted, unless this
                // envelope authenticates in it.
                let inbound = Inbound::accept(&self.local, peer, session, &enc, now, rng)?;
                let (epoch, time, plain) = inbound.open(id, envelope, header_len)?;
                check_age(time, now)?;
                let parsed = Parsed::new(id, plain)?;
                let cell = inbound.peer.cell();
                if !self.new_sessions.take(cell, now) {
                    return Err(OpenError::RateLimited(cell));
                }
                self.remember_inbound(key, inbound);
                self.received(key, id, epoch, time, parsed, now)
            }
            MSG => {
                let header_len = envelope.len() - r.remaining();
                let epoch = sealed_epoch(envelope, header_len)?;
                match self.inbound.get(&key) {
                    Some(s) if epoch == 0 || s.recv1.is_some() => {
                        match self.open_inbound(key, id, envelope, header_len, now) {
                            // Sealed under epoch-1 keys this instance does not share (the
                            // sender moved on with another instance of this device).
                            Err(OpenError::Unauthentic) if epoch > 0 => {
                                Ok(reset_reply(from, session, rng))
                            }
                            other => other,
                        }
                    }
                    // A session this instance does not have (or not yet in epoch 1): ask the
                    // sender to start again.
                    _ => Ok(reset_reply(from, session, rng)),
                }
            }
            REPLY => {
                let instance: [u8; 16] = r.array()?;
                let header_len = envelope.len() - r.remaining();
                self.open_reply(from, session, instance, id, envelope, header_len)
            }
            RESET => {
                r.finish()?;
                match self.outbound.get(&from) {
                    Some(out) if out.id == session => {
                        self.reset(from);
                        Ok(Opened::Reset { from })
                    }
                    _ if self.retired.contains_key(&key) => Ok(Opened::Reset { from }),
                    _ => Err(OpenError::NoSession),
                }
            }
            _ => Err(DecodeError::Invalid("envelope kind").into()),
        }
    }

    /// Queues an acknowledgement for an envelope [`Endpoint::open`] delivered; sealed by the
    /// next [`Endpoint::poll_acks`]. Nothing is sent if its session is gone by then.
    pub fn ack(&mut self, handle: AckHandle) {
        self.pending_acks.push(handle);
    }

    /// Envelopes acknowledging everything [`Endpoint::ack`]ed since the last call, one per
    /// session (more if a session has over [`MAX_ACK_IDS`]), in order of sender and session,
    /// each listing its ids in the order they were acknowledged.
    pub fn poll_acks(&mut self, rng: &mut impl CryptoRngCore) -> Vec<Reply> {
        let mut pending = std::mem::take(&mut self.pending_acks);
        // Stable: each session's ids stay in the order they were acknowledged.
        pending.sort_by_key(|h| (h.from, h.session));
        let mut out = Vec::new();
        for chunk in pending.chunk_by(|a, b| (a.from, a.session) == (b.from, b.session)) {
            let key = (chunk[0].from, chunk[0].session);
            let Some(inbound) = self.inbound.get_mut(&key) else {
                continue;
            };
            for ids in chunk.chunks(MAX_ACK_IDS) {
                let ids: Vec<MsgId> = ids.iter().map(|h| h.id).collect();
                let id = MsgId::random(rng);
                let (envelope, grew) = inbound.seal_ack(id, &ids);
                if grew {
                    self.dirty.insert(SessionKey::Inbound(key.0, key.1));
                    self.critical |= inbound.saved;
                }
                out.push(Reply {
                    to: key.0,
                    id,
                    envelope,
                });
            }
        }
        out
    }

    /// Retires outbound sessions past [`SESSION_LIFETIME`] (the next message to the device
    /// starts a new one), and forgets retired sessions and inbound sessions nothing can
    /// arrive in any more, and rate buckets that are full again.
    pub fn expire(&mut self, now: Instant) {
        let time = now.timestamp();
        let due: Vec<NodeId> = self
            .outbound
            .iter()
            .filter(|(_, s)| time.0 >= s.started.0.saturating_add(SESSION_LIFETIME))
            .map(|(n, _)| *n)
            .collect();
        for node in due {
            self.retire(node);
        }
        let old: Vec<(NodeId, SessionId)> = self
            .retired
            .iter()
            .filter(|(_, s)| time.0 >= s.started.0.saturating_add(INBOUND_IDLE))
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.retired.remove(&k);
            self.forget(SessionKey::Retired(k.0, k.1));
        }
        let idle: Vec<(NodeId, SessionId)> = self
            .inbound
            .iter()
            .filter(|(_, s)| time.0 >= s.last_used.0.saturating_add(INBOUND_IDLE))
            .map(|(k, _)| *k)
            .collect();
        for k in idle {
            self.drop_inbound(k);
        }
    }

    /// What changed since the last call: sessions to save and to delete, and whether they
    /// must be durable before anything sealed since leaves.
    pub fn take_changes(&mut self) -> Changes {
        let mut changes = Changes {
            critical: std::mem::take(&mut self.critical),
            ..Changes::default()
        };
        for key in std::mem::take(&mut self.dirty) {
            let record = match key {
                SessionKey::Outbound(n) => self.outbound.get_mut(&n).map(|s| {
                    s.saved = true;
                    s.save()
                }),
                SessionKey::Retired(n, id) => self.retired.get_mut(&(n, id)).map(|s| {
                    s.saved = true;
                    s.save()
                }),
                SessionKey::Inbound(n, id) => self.inbound.get_mut(&(n, id)).map(|s| {
                    s.saved = true;
                    s.save()
                }),
            };
            if let Some(record) = record {
                changes.put.push((key, record));
            }
        }
        changes.delete = std::mem::take(&mut self.gone).into_iter().collect();
        changes
    }

    /// Whether something sealed since the last [`Endpoint::take_changes`] waits for a
    /// critical change to be durable.
    pub fn is_critical(&self) -> bool {
        self.critical
    }

    /// Sessions held: outbound, retired, inbound.
    pub fn sessions(&self) -> (usize, usize, usize) {
        (self.outbound.len(), self.retired.len(), self.inbound.len())
    }

    fn outbound_for(
        &mut self,
        to: &RemoteDevice,
        time: Timestamp,
        rng: &mut impl CryptoRngCore,
    ) -> Result<(), SealError> {
        let node = to.node();
        let current = match self.outbound.get(&node) {
            Some(s) if s.peer.agreement != to.agreement || s.peer.cell() != to.cell() => {
                Some(false)
            }
            Some(s) if time.0 >= s.started.0.saturating_add(SESSION_LIFETIME) => Some(false),
            Some(_) => Some(true),
            None => None,
        };
        match current {
            Some(true) => return Ok(()),
            Some(false) => self.retire(node),
            None => {}
        }
        if self.outbound.len() >= MAX_SESSIONS
            && let Some(victim) = self
                .outbound
                .iter()
                .min_by_key(|(n, s)| (s.started, **n))
                .map(|(n, _)| *n)
        {
            self.retire(victim);
        }
        let session = Outbound::start(&self.local, to, time, rng)?;
        self.outbound.insert(node, session);
        self.dirty.insert(SessionKey::Outbound(node));
        Ok(())
    }

    /// Moves the session with `node` aside: it still opens acknowledgements, never seals.
    fn retire(&mut self, node: NodeId) {
        let Some(s) = self.outbound.remove(&node) else {
            return;
        };
        self.forget(SessionKey::Outbound(node));
        let key = (node, s.id);
        if self.retired.len() >= MAX_SESSIONS
            && let Some(old) = self
                .retired
                .iter()
                .min_by_key(|(k, s)| (s.started, **k))
                .map(|(k, _)| *k)
        {
            self.retired.remove(&old);
            self.forget(SessionKey::Retired(old.0, old.1));
        }
        self.retired.insert(key, s);
        self.dirty.insert(SessionKey::Retired(key.0, key.1));
    }

    fn forget(&mut self, key: SessionKey) {
        self.dirty.remove(&key);
        self.gone.insert(key);
    }

    fn remember_inbound(&mut self, key: (NodeId, SessionId), inbound: Inbound) {
        let cell = inbound.peer.cell();
        if self.per_cell.get(&cell).copied().unwrap_or(0) >= MAX_SESSIONS_PER_CELL {
            // A cell that opens many sessions replaces its own least recently used one.
            let victim = self
                .inbound
                .iter()
                .filter(|(_, s)| s.peer.cell() == cell)
                .min_by_key(|(k, s)| (s.last_used, **k))
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.drop_inbound(v);
            }
        } else if self.inbound.len() >= MAX_SESSIONS {
            // Otherwise the least recently used session of the cell that holds the most.
            let largest = self
                .per_cell
                .iter()
                .max_by_key(|(c, n)| (**n, **c))
                .map(|(c, _)| *c);
            let victim = self
                .inbound
                .iter()
                .filter(|(_, s)| Some(s.peer.cell()) == largest)
                .min_by_key(|(k, s)| (s.last_used, **k))
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.drop_inbound(v);
            }
        }
        *self.per_cell.entry(cell).or_default() += 1;
        self.inbound.insert(key, inbound);
        self.dirty.insert(SessionKey::Inbound(key.0, key.1));
    }

    fn drop_inbound(&mut self, key: (NodeId, SessionId)) {
        let Some(s) = self.inbound.remove(&key) else {
            return;
        };
        let cell = s.peer.cell();
        if let Some(n) = self.per_cell.get_mut(&cell) {
            *n -= 1;
            if *n == 0 {
                self.per_cell.remove(&cell);
            }
        }
        self.forget(SessionKey::Inbound(key.0, key.1));
    }

    fn open_inbound(
        &mut self,
        key: (NodeId, SessionId),
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        let inbound = self.inbound.get_mut(&key).ok_or(OpenError::NoSession)?;
        let (epoch, time, plain) = inbound.open(id, envelope, header_len)?;
        check_age(time, now)?;
        let parsed = Parsed::new(id, plain)?;
        self.received(key, id, epoch, time, parsed, now)
    }

    /// Hands over a message or bundle that opened in session `key`, and moves the session on
    /// (its epoch, when it carries the initiator's ephemeral).
    fn received(
        &mut self,
        key: (NodeId, SessionId),
        id: MsgId,
        epoch: u32,
        time: Timestamp,
        parsed: Parsed,
        now: Instant,
    ) -> Result<Opened, OpenError> {
        let Parsed {
            theirs,
            items,
            plain,
        } = parsed;
        let inbound = self.inbound.get_mut(&key).ok_or(OpenError::NoSession)?;
        let mut changed = false;
        if let Some(theirs) = theirs {
            changed |= inbound.advance(&theirs)?;
        }
        if epoch > 0 && inbound.announce.take().is_some() {
            // The initiator has our ephemeral: stop announcing it.
            changed = true;
        }
        // The saved form need not follow every message: once an hour is enough for expiry.
        let time_now = now.timestamp();
        if time_now.0 >= inbound.last_used.0.saturating_add(3600) {
            inbound.last_used = time_now;
            changed = true;
        }
        if changed {
            self.dirty.insert(SessionKey::Inbound(key.0, key.1));
        }
        let from_cell = inbound.peer.cell();
        let messages = items
            .into_iter()
            .map(|(message, start, len)| Message {
                from_cell,
                from_node: key.0,
                id: message,
                time,
                body: plain.slice(start..start + len),
            })
            .collect();
        Ok(Opened::Messages(Received {
            from_cell,
            from_node: key.0,
            id,
            time,
            messages,
            ack: AckHandle {
                from: key.0,
                session: key.1,
                id,
            },
        }))
    }

    fn open_reply(
        &mut self,
        from: NodeId,
        session: SessionId,
        instance: [u8; 16],
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<Opened, OpenError> {
        if let Some(out) = self.outbound.get_mut(&from).filter(|o| o.id == session) {
            let (ids, heard) = out.open_reply(instance, id, envelope, header_len)?;
            match heard {
                Heard::Other => {
                    // Another instance of the device answers: the one we moved on with may
                    // not be the one that receives. Start again.
                    self.retire(from);
                    return Ok(Opened::Acked {
                        from,
                        ids,
                        reset: true,
                    });
                }
                // New epoch-1 keys: sealing under them makes their lease critical.
                Heard::Changed => {
                    self.dirty.insert(SessionKey::Outbound(from));
                }
                Heard::Same => {}
            }
            return Ok(Opened::Acked {
                from,
                ids,
                reset: false,
            });
        }
        if let Some(old) = self.retired.get_mut(&(from, session)) {
            let (ids, _) = old.open_reply(instance, id, envelope, header_len)?;
            return Ok(Opened::Acked {
                from,
                ids,
                reset: false,
            });
        }
        // An acknowledgement for a session this device no longer has: nothing to do, and
        // nothing to ask for.
        Err(OpenError::NoSession)
    }
}

/// The plaintext of a message or bundle, checked: the initiator's ephemeral if it carries
/// one, and each message's id and where its body lies.
struct Parsed {
    theirs: Option<[u8; KEY_LEN]>,
    items: Vec<(MsgId, usize, usize)>,
    /// Bodies are views into the decrypted buffer, not copies.
    plain: Bytes,
}

impl Parsed {
    fn new(id: MsgId, plain: Vec<u8>) -> Result<Self, OpenError> {
        let mut r = Reader::new(&plain);
        let theirs = read_ratchet(&mut r)?;
        let bundle = match r.u8()? {
            PLAIN_MESSAGE => false,
            PLAIN_BUNDLE => true,
            _ => return Err(DecodeError::Invalid("inbound plaintext kind").into()),
        };
        let count = if bundle { r.u16()? as usize } else { 1 };
        if count == 0 || count > MAX_BUNDLE {
            return Err(DecodeError::Invalid("bundle count").into());
        }
        let mut items = Vec::with_capacity(count);
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
        Ok(Self {
            theirs,
            items,
            plain: Bytes::from(plain),
        })
    }
}

/// Whose acknowledgement an outbound session opened.
enum Heard {
    /// The instance it heard from before; nothing changed.
    Same,
    /// Its first instance, or the one that moved it to epoch 1: the session changed.
    Changed,
    /// Another instance than the one it heard from first.
    Other,
}

/// Whether `envelope` answers a message (an acknowledgement or a RESET) rather than carrying
/// one, as its clear header says: what a relay hands even to a link that takes no messages
/// (PROTOCOL 13.3). Anything of another version counts as a message.
pub fn is_answer(envelope: &[u8]) -> bool {
    matches!(envelope, [E2E_VERSION, REPLY | RESET, ..])
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

fn check_age(time: Timestamp, now: Instant) -> Result<(), OpenError> {
    let now = now.timestamp();
    if time.0.saturating_add(MAX_AGE) < now.0 || time.0 > now.0.saturating_add(MAX_AHEAD) {
        return Err(OpenError::Stale { time });
    }
    Ok(())
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("outbound", &self.outbound.len())
            .field("retired", &self.retired.len())
            .field("inbound", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

impl Outbound {
    fn start(
        local: &LocalDevice,
        peer: &RemoteDevice,
        time: Timestamp,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, SealError> {
        let mut sid = [0; 16];
        rng.fill_bytes(&mut sid);
        let id = SessionId(sid);
        let binding = binding(local.cell, local.node, peer.cell(), peer.node());
        let (enc, exported) =
            schedule::setup_sender(&local.agreement, &peer.agreement, id, &binding, rng)
                .ok_or(SealError::Setup)?;
        let mut init = Vec::with_capacity(600);
        init.extend_from_slice(&enc);
        put_bytes16(&mut init, &local.node_token.to_bytes());
        put_bytes16(&mut init, &local.identity.to_bytes());
        Ok(Self {
            id,
            peer: peer.clone(),
            binding,
            started: time,
            init,
            send: SendKey::new(exported.i2r, 0),
            reply_base: exported.reply_base,
            responder: None,
            ratchet: Some(Ratchet::new(exported.salt, rng)),
            saved: false,
        })
    }

    /// Opens an acknowledgement from responder `instance`: its ids, and whose it was.
    fn open_reply(
        &mut self,
        instance: [u8; 16],
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<(Vec<MsgId>, Heard), OpenError> {
        let epoch = sealed_epoch(envelope, header_len)?;
        let binding = reversed(&self.binding);
        let ours = self.responder.as_ref().filter(|r| r.instance == instance);
        let derived;
        let key: &SealKey = match (ours, epoch) {
            (Some(r), 0) => &r.recv0.key,
            (Some(Responder { recv1: Some(k), .. }), 1) => &k.key,
            (None, 0) => {
                derived = RecvKey::new(schedule::reply_key(&self.reply_base, &instance));
                &derived.key
            }
            _ => return Err(OpenError::Unauthentic),
        };
        let (_, plain) = open_envelope(key, envelope, header_len, &binding, id)?;
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
        let mut heard = Heard::Same;
        match &self.responder {
            Some(r) if r.instance != instance => return Ok((ids, Heard::Other)),
            Some(_) => {}
            None => {
                self.responder = Some(Responder {
                    instance,
                    recv0: RecvKey::new(schedule::reply_key(&self.reply_base, &instance)),
                    recv1: None,
                });
                heard = Heard::Changed;
            }
        }
        if let Some(theirs) = theirs
            && let Some(ratchet) = self.ratchet.take()
        {
            let (i2r, r2i) = schedule::epoch1(&ratchet.secret, &theirs, &ratchet.salt, &instance)
                .ok_or(OpenError::Unauthentic)?;
            self.send = SendKey::new(i2r, 1);
            if let Some(r) = &mut self.responder {
                r.recv1 = Some(RecvKey::new(r2i));
            }
            self.init = Vec::new();
            heard = Heard::Changed;
        }
        Ok((ids, heard))
    }
}

impl Inbound {
    fn accept(
        local: &LocalDevice,
        peer: RemoteDevice,
        session: SessionId,
        enc: &[u8; KEY_LEN],
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Result<Self, OpenError> {
        let binding = binding(peer.cell(), peer.node(), local.cell, local.node);
        let exported =
            schedule::setup_receiver(&local.agreement, &peer.agreement, session, &binding, enc)
                .ok_or(OpenError::Unauthentic)?;
        let mut instance = [0; 16];
        rng.fill_bytes(&mut instance);
        Ok(Self {
            peer,
            binding,
            session,
            instance,
            last_used: now.timestamp(),
            recv0: RecvKey::new(exported.i2r),
            send0: SendKey::new(schedule::reply_key(&exported.reply_base, &instance), 0),
            recv1: None,
            send1: None,
            ratchet: Some(Ratchet::new(exported.salt, rng)),
            announce: None,
            saved: false,
        })
    }

    /// Opens a message: its epoch, time and plaintext.
    fn open(
        &self,
        id: MsgId,
        envelope: &[u8],
        header_len: usize,
    ) -> Result<(u32, Timestamp, Vec<u8>), OpenError> {
        let epoch = sealed_epoch(envelope, header_len)?;
        let key = match (epoch, &self.recv1) {
            (0, _) => &self.recv0,
            (1, Some(k)) => k,
            _ => return Err(OpenError::Unauthentic),
        };
        let (time, plain) = open_envelope(&key.key, envelope, header_len, &self.binding, id)?;
        Ok((epoch, time, plain))
    }

    /// The initiator's ephemeral arrived: derive epoch 1 and erase our ephemeral secret.
    /// True if the session changed.
    fn advance(&mut self, theirs: &[u8; KEY_LEN]) -> Result<bool, OpenError> {
        let Some(ratchet) = self.ratchet.take() else {
            return Ok(false);
        };
        let (i2r, r2i) = schedule::epoch1(&ratchet.secret, theirs, &ratchet.salt, &self.instance)
            .ok_or(OpenError::Unauthentic)?;
        self.recv1 = Some(RecvKey::new(i2r));
        self.send1 = Some(SendKey::new(r2i, 1));
        self.announce = Some(*ratchet.public.as_bytes());
        Ok(true)
    }

    /// Seals an acknowledgement of `ids` as envelope `id`; true if a counter lease grew.
    fn seal_ack(&mut self, id: MsgId, ids: &[MsgId]) -> (Bytes, bool) {
        let announce = self.announce;
        let keys = match (&announce, &mut self.send1) {
            (None, Some(k)) => k,
            _ => &mut self.send0,
        };
        let binding = reversed(&self.binding);
        let (counter, grew) = keys.take();
        let header = Header {
            kind: REPLY,
            session: self.session,
            extra: &self.instance,
            time: Timestamp(0),
        };
        let envelope = seal_envelope(
            header,
            &keys.key,
            keys.epoch,
            counter,
            &binding,
            id,
            35 + 16 * ids.len(),
            |plain| {
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
            },
        );
        (envelope, grew)
    }
}

fn reset_reply(to: NodeId, session: SessionId, rng: &mut impl CryptoRngCore) -> Opened {
    Opened::Unknown {
        reply: Reply {
            to,
            id: MsgId::random(rng),
            envelope: reset_envelope(session),
        },
    }
}

fn read_ratchet(r: &mut Reader<'_>) -> Result<Option<[u8; KEY_LEN]>, OpenError> {
    Ok(match r.flag("ratchet flag")? {
        true => Some(r.array()?),
        false => None,
    })
}

#[cfg(test)]
mod tests;
