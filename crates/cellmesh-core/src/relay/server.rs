//! The relay server as a state machine: every decision a relay makes, with no I/O.
//!
//! A [`RelayServer`] is told what happened (a device joined or left, a batch of records
//! arrived, a store operation finished, time passed) and answers with [`Action`]s: payloads
//! to write to a device's link, devices to disconnect, operations on the store, and events
//! for operators. It never reads a clock, a socket or a file: the driver (the runtime's
//! `relay` module, or a simulated world) passes the time in and carries the actions out.
//!
//! # The store as operations
//!
//! The relay's durable store (the directory of registered devices and the queues of offline
//! devices) is an interface of operations the machine emits ([`StoreOp`]) and whose results it
//! is handed back ([`RelayServer::store_done`]). The driver runs them off its event loop, in
//! the order emitted, and may commit a run of writes in one transaction (one `fsync` for
//! many). A FORWARD to a device that is offline is answered ACCEPTED(queued) only when the
//! [`StoreOp::Enqueue`] that holds it reports that it committed. Reads ([`StoreOp::Devices`],
//! [`StoreOp::Pending`]) see every write emitted before them.
//!
//! A restart is: drop the machine, and build a new one over the same store with what the
//! store holds ([`RelayServer::new`] takes the registrations and the devices with queues).
//!
//! # Order of calls
//!
//! 0. At start, [`RelayServer::load_revocation`] for each revocation the store keeps.
//! 1. [`RelayServer::check_join`] from the link's join check, before a device is admitted.
//! 2. [`RelayServer::joined`] once it is, [`RelayServer::left`] once its link is gone *and*
//!    every record it sent before has been handed to [`RelayServer::records`].
//! 3. [`RelayServer::records`] for each payload a joined device sent, in arrival order.
//! 4. [`RelayServer::store_done`] for each [`Action::Store`], with the same [`OpId`].
//! 5. [`RelayServer::handle_timeout`] when [`RelayServer::poll_timeout`] is reached.
//! 6. After each call, [`RelayServer::poll_action`] until it returns `None`.
//!
//! Calls that take [`Outlets`] are told how much each device's link has not yet taken of
//! what was written for it: the machine never waits on a link, and uses that to decide
//! between pushing and storing, and to drop a device that does not read.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;

use super::{
    Accepted, DirectoryEntry, MAX_BATCH, MAX_DEVICES, MAX_ENVELOPE, MsgId, Record, RefuseCode,
    put_record, records,
};
use crate::id::{CellId, NodeId};
use crate::limits::{
    Buckets, ByteBudget, ByteLimits, Rate, Registered, RegistrationLimits, Registrations,
};
use crate::revoked::{InvalidRevocation, Offered, RelayRevocations, RevocationLimits};
use crate::token::Token;
use crate::wire::NackCode;
use crate::{Instant, Timestamp};

/// What one pushed envelope costs in memory beyond its bytes (its map entry and allocation),
/// counted against [`ServerConfig::memory`] so that tiny envelopes are bounded too.
pub const IN_FLIGHT_OVERHEAD: usize = 128;

/// Most devices remembered as disconnected for misbehaving (see [`RelayServer::records`]).
pub const MAX_DROPPED: usize = 1024;

/// LOOKUPs over their cell's rate that wait for their turn: per device, and in all. A device
/// past either is disconnected (it sends them again when it reconnects).
pub const MAX_DEFERRED_PER_DEVICE: usize = 256;
/// See [`MAX_DEFERRED_PER_DEVICE`].
pub const MAX_DEFERRED: usize = 16_384;

/// How often waiting LOOKUPs and held-back drains are looked at again, in milliseconds.
pub const RETRY_MS: u64 = 20;

/// How often expired queued envelopes are deleted, in milliseconds.
pub const EXPIRE_EVERY_MS: u64 = 60_000;

/// Most envelopes one drain reads from the store at a time.
pub const DRAIN_COUNT: usize = 1024;

/// How a relay decides.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// FORWARDs each sending cell may make.
    pub forward_rate: Rate,
    /// LOOKUPs each asking cell may make; one over the rate waits for its turn.
    pub lookup_rate: Rate,
    /// Bytes of pushed envelopes not yet DELIVERED, per device, per cell, and (with what the
    /// links have not taken, [`Outlets::total`]) for the whole relay.
    pub memory: ByteLimits,
    /// Bytes written for an online device that its link has not taken yet, beyond which new
    /// envelopes for it go to the store; a device with twice this waiting is disconnected.
    pub outlet_bytes: usize,
    /// Devices registered per cell and in all, and how long one may stay away.
    pub registrations: RegistrationLimits,
    /// Revocations kept (REVOKE): the sending cell's rate, per issuing cell, in all.
    pub revocations: RevocationLimits,
    /// Make [`ServerEvent::Forwarded`] and [`ServerEvent::Refused`], naming who sends to whom.
    pub envelope_events: bool,
    /// How often to make a [`ServerEvent::Summary`], in milliseconds; `None`: never.
    pub summary_every_ms: Option<u64>,
}

/// How much of what was written for devices their links have not taken yet. The driver
/// knows (it owns the links); the machine asks.
pub trait Outlets {
    /// Bytes written for `node` and not yet taken by its link.
    fn waiting(&self, node: NodeId) -> usize;
    /// Bytes written for every device and not yet taken, in all.
    fn total(&self) -> usize;
}

/// Names one store operation, to match its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// One envelope to store for an offline device.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreEnvelope {
    /// The recipient device.
    pub to: NodeId,
    /// The sender's message id.
    pub id: MsgId,
    /// The sending device.
    pub from: NodeId,
    /// The envelope, copied out of the frame it came in.
    pub envelope: Bytes,
}

impl std::fmt::Debug for StoreEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreEnvelope")
            .field("to", &self.to)
            .field("id", &self.id)
            .field("from", &self.from)
            .field("len", &self.envelope.len())
            .finish()
    }
}

/// An envelope the store holds for a device, as [`StoreOp::Pending`] reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// The sender's message id.
    pub id: MsgId,
    /// The sending device.
    pub from: NodeId,
    /// The envelope.
    pub envelope: Bytes,
}

impl std::fmt::Debug for StoredEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredEnvelope")
            .field("id", &self.id)
            .field("from", &self.from)
            .field("len", &self.envelope.len())
            .finish()
    }
}

/// What the store did with one envelope of an [`StoreOp::Enqueue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Written durably.
    Stored,
    /// That id from that sender was already queued for that device, byte for byte.
    Duplicate,
    /// That id from that sender was queued with another envelope, which this one replaced.
    Replaced,
}

/// An operation on the relay's store. Writes are durable when their result is handed back,
/// except where said otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Record device `node` of `cell` with its tokens, seen at `now`, durably: a device
    /// that registered and went offline must be found by its senders after a crash.
    PutDevice {
        /// Its cell.
        cell: CellId,
        /// The device.
        node: NodeId,
        /// Its node token, encoded.
        node_token: Vec<u8>,
        /// Its cell's identity token for it, encoded.
        identity: Vec<u8>,
        /// When.
        now: Timestamp,
    },
    /// Queue these envelopes (kept until `now` plus the store's time to live); answered with
    /// [`StoreResult::Enqueued`], one result per envelope, in order.
    Enqueue {
        /// When.
        now: Timestamp,
        /// What.
        envelopes: Vec<StoreEnvelope>,
    },
    /// Delete these envelopes, each named by its id and its sender, from `device`'s queue;
    /// answered with [`StoreResult::Removed`]. Need not be durable: a message delivered
    /// again after a crash is dropped by its receiver as a duplicate.
    Remove {
        /// The device that took them.
        device: NodeId,
        /// Their ids and senders.
        items: Vec<(MsgId, NodeId)>,
    },
    /// Read the tokens of every device registered in `cell`; answered with
    /// [`StoreResult::Devices`].
    Devices {
        /// The cell.
        cell: CellId,
    },
    /// Read up to `limit` envelopes queued for `device` that have not expired at `now`,
    /// oldest first, stopping once they reach `max_bytes` (at least one); answered with
    /// [`StoreResult::Pending`].
    Pending {
        /// The device.
        device: NodeId,
        /// When.
        now: Timestamp,
        /// Most envelopes.
        limit: usize,
        /// Most bytes.
        max_bytes: usize,
    },
    /// Delete every envelope expired at `now`; answered with [`StoreResult::Count`].
    Expire {
        /// When.
        now: Timestamp,
    },
    /// Keep `revocation` (a token, encoded) of `node` by `cell`, and drop the device's
    /// registration and everything queued for it, in one durable write; answered with
    /// [`StoreResult::Count`] (the envelopes dropped).
    Revoke {
        /// The issuing cell.
        cell: CellId,
        /// The revoked device.
        node: NodeId,
        /// The revocation token, encoded.
        revocation: Vec<u8>,
    },
    /// Set these devices' last seen time to `now`, then drop these registrations with their
    /// queues; answered with [`StoreResult::Count`] (the envelopes dropped).
    Sweep {
        /// Devices seen now.
        touch: Vec<(CellId, NodeId)>,
        /// Registrations that expired.
        forget: Vec<(CellId, NodeId)>,
        /// When.
        now: Timestamp,
    },
}

/// The result of a [`StoreOp`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreResult {
    /// A write without a result of its own was done.
    Done,
    /// Per envelope of an [`StoreOp::Enqueue`]: stored, or refused with a code.
    Enqueued(Vec<Result<Stored, RefuseCode>>),
    /// How many envelopes an [`StoreOp::Remove`] deleted.
    Removed(usize),
    /// The tokens (node token, identity token) of a cell's devices, as stored.
    Devices(Vec<(Vec<u8>, Vec<u8>)>),
    /// What a device has queued.
    Pending(Vec<StoredEnvelope>),
    /// How many envelopes were deleted.
    Count(usize),
    /// The operation failed (the store says why); nothing it would have answered holds.
    Failed(String),
}

/// What the driver is to do.
#[derive(Debug)]
pub enum Action {
    /// Write this payload (a batch of records) to `to`'s link, after what was written before.
    Send {
        /// The device.
        to: NodeId,
        /// The payload.
        payload: Bytes,
    },
    /// Close `node`'s link.
    Disconnect {
        /// The device.
        node: NodeId,
        /// Why, for its log.
        reason: &'static str,
    },
    /// Run this operation on the store and hand its result to [`RelayServer::store_done`].
    Store(OpId, StoreOp),
    /// Tell operators.
    Event(ServerEvent),
}

/// Something the relay did, for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A device joined (and, if it was not registered, was recorded in the directory).
    Registered {
        /// Its cell.
        cell: CellId,
        /// The device.
        node: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// Whether it was not registered before.
        new: bool,
    },
    /// A join was refused (NACK), by the relay's limits, its allow-list or a revocation.
    JoinRefused {
        /// The cell the device claimed.
        cell: CellId,
        /// The device.
        node: NodeId,
        /// The NACK code.
        code: NackCode,
        /// Why.
        reason: String,
    },
    /// A device went offline.
    Offline {
        /// The device.
        node: NodeId,
    },
    /// An envelope was accepted (only with [`ServerConfig::envelope_events`]).
    Forwarded {
        /// Sending device.
        from: NodeId,
        /// Recipient device.
        to: NodeId,
        /// Message id.
        id: MsgId,
        /// Envelope size in bytes.
        bytes: usize,
        /// Pushed or queued.
        status: Accepted,
    },
    /// A FORWARD was refused (only with [`ServerConfig::envelope_events`]).
    Refused {
        /// Sending device.
        from: NodeId,
        /// Message id.
        id: MsgId,
        /// Why.
        code: RefuseCode,
    },
    /// Queued envelopes were handed to an online device.
    Drained {
        /// The device.
        node: NodeId,
        /// How many.
        count: usize,
    },
    /// A device was disconnected for misbehaving or for holding too much of the relay.
    Disconnected {
        /// The device.
        node: NodeId,
        /// Why.
        reason: &'static str,
    },
    /// A cell's revocation of one of its devices was kept: the device was dropped with its
    /// queue, disconnected if online, and is refused from now on.
    Revoked {
        /// The issuing cell.
        cell: CellId,
        /// The revoked device.
        node: NodeId,
        /// The device that carried the REVOKE.
        by: NodeId,
        /// Queued envelopes that went with the device.
        messages: usize,
    },
    /// A REVOKE was refused, or could not be kept.
    RevokeRefused {
        /// The device that sent it.
        by: NodeId,
        /// The code REVOKED carried.
        code: RefuseCode,
        /// Why.
        reason: String,
    },
    /// Registrations not seen for their time to live were dropped, with their queues.
    Expired {
        /// Devices.
        devices: usize,
        /// Queued envelopes that went with them.
        messages: usize,
    },
    /// Queued envelopes outlived their time to live and were deleted.
    EnvelopesExpired {
        /// How many.
        count: usize,
    },
    /// A store operation failed.
    StoreFailed {
        /// What the relay was doing.
        doing: &'static str,
        /// The store's error.
        error: String,
    },
    /// Counts since the last summary.
    Summary(Summary),
}

/// Counters of envelopes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Envelopes pushed to an online device.
    pub pushed: u64,
    /// Envelopes stored for a device.
    pub queued: u64,
    /// FORWARDs refused.
    pub refused: u64,
    /// Envelope bytes accepted.
    pub bytes: u64,
}

impl Stats {
    fn add(&mut self, t: &Stats) {
        self.pushed += t.pushed;
        self.queued += t.queued;
        self.refused += t.refused;
        self.bytes += t.bytes;
    }
}

/// Counts over one period, for [`ServerEvent::Summary`]: no device or message is named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The period's length.
    pub period: std::time::Duration,
    /// Envelopes pushed, queued and refused in the period, and the bytes accepted.
    pub stats: Stats,
    /// The period's refusals by code (codes with none left out), by code.
    pub refusals: Vec<(RefuseCode, u64)>,
    /// Joins in the period.
    pub joins: u64,
    /// Devices registered for the first time in the period.
    pub new_devices: u64,
    /// Joins refused in the period.
    pub joins_refused: u64,
    /// Devices online now.
    pub online: usize,
    /// Devices registered now.
    pub registered: usize,
    /// Bytes held now for pushed envelopes not yet DELIVERED.
    pub in_flight_bytes: usize,
    /// Bytes written now for devices that their links have not taken.
    pub waiting_bytes: usize,
}

/// The drain key of an envelope: id, sender, and its last 16 bytes (its AEAD tag), so that a
/// copy sealed anew that took an old one's place in the queue is handed too.
type DrainKey = (MsgId, NodeId, [u8; 16]);

fn drain_key(id: MsgId, from: NodeId, envelope: &[u8]) -> DrainKey {
    let mut tag = [0u8; 16];
    let tail = &envelope[envelope.len().saturating_sub(16)..];
    tag[..tail.len()].copy_from_slice(tail);
    (id, from, tag)
}

/// An online device.
struct Online {
    cell: CellId,
    /// Whether the link said RECEIVE: until then it is handed only answers, and its queue is
    /// not drained to it.
    receiving: bool,
    /// Pushed envelopes not yet DELIVERED (copies, each with its sender).
    in_flight: BTreeMap<MsgId, (NodeId, Bytes)>,
    /// The drain: whether a read of its queue is out, whether another is wanted, and what
    /// was handed from the store and is still queued there (as small as the queue).
    reading: bool,
    wanted: bool,
    drained: BTreeSet<DrainKey>,
    /// After a failed read or removal: no read of the queue before then, so that a failing
    /// store is asked again every [`RETRY_MS`], not as fast as it fails.
    not_before: Option<Instant>,
}

/// A LOOKUP waiting for its cell's rate.
#[derive(Clone, Copy)]
struct Deferred {
    from: NodeId,
    from_cell: CellId,
    request: u32,
    cell: CellId,
}

/// What a store operation's result is for.
enum Pending {
    PutDevice,
    /// Answers owed, in order: from, to, id, bytes; `answer` false for envelopes kept after a
    /// departure, whose senders were answered `pushed` and are told `queued` once they are
    /// (if they are still here to hear it).
    Enqueue {
        items: Vec<(NodeId, NodeId, MsgId, usize)>,
        answer: bool,
    },
    /// The device and the ids it acknowledged.
    Remove(NodeId, BTreeSet<MsgId>),
    Lookup(Deferred),
    Drain(NodeId),
    Expire,
    Sweep(usize),
    /// A revocation being kept: who asked, under which request.
    Revoke {
        by: NodeId,
        request: u32,
        cell: CellId,
        node: NodeId,
    },
}

/// What one call of [`RelayServer::records`] collects for the store.
struct Batch<'a> {
    to_store: &'a mut Vec<StoreEnvelope>,
    /// Bytes of the envelopes in `to_store`.
    to_store_bytes: &'a mut usize,
    removed: &'a mut BTreeMap<NodeId, Vec<(MsgId, NodeId)>>,
}

/// Counts for the next [`Summary`].
#[derive(Default)]
struct Period {
    started: Instant,
    stats: Stats,
    refusals: BTreeMap<u8, (RefuseCode, u64)>,
    joins: u64,
    new_devices: u64,
    joins_refused: u64,
}

/// Records for devices made during one call, batched per device.
#[derive(Default)]
struct Out {
    to: BTreeMap<NodeId, Outgoing>,
    /// Bytes in all of them.
    bytes: usize,
}

#[derive(Default)]
struct Outgoing {
    payloads: Vec<Bytes>,
    full: usize,
    buf: Vec<u8>,
}

impl Outgoing {
    fn push(&mut self, r: &Record) -> usize {
        let len = 4 + r.encoded_len();
        if !self.buf.is_empty() && self.buf.len() + len > MAX_BATCH {
            self.full += self.buf.len();
            self.payloads
                .push(Bytes::from(std::mem::take(&mut self.buf)));
        }
        put_record(&mut self.buf, r);
        len
    }

    fn len(&self) -> usize {
        self.full + self.buf.len()
    }
}

impl Out {
    fn push(&mut self, to: NodeId, r: &Record) {
        self.bytes += self.to.entry(to).or_default().push(r);
    }

    fn len_for(&self, to: NodeId) -> usize {
        self.to.get(&to).map_or(0, Outgoing::len)
    }
}

/// The relay server's state machine; see the [module docs](self).
pub struct RelayServer {
    config: ServerConfig,
    registrations: Registrations,
    revocations: RelayRevocations,
    /// Devices the join check registered for the first time, until they are seen joining.
    fresh: BTreeSet<NodeId>,
    /// Devices whose queue in the store may hold something.
    stored: BTreeSet<NodeId>,
    online: BTreeMap<NodeId, Online>,
    forwards: Buckets<CellId>,
    lookups: Buckets<CellId>,
    deferred: VecDeque<Deferred>,
    deferred_by: BTreeMap<NodeId, usize>,
    budget: ByteBudget,
    /// Devices disconnected for misbehaving, until they join again: of what they sent
    /// before, only DELIVERED still counts. The last [`MAX_DROPPED`], in order.
    dropped: BTreeSet<NodeId>,
    dropped_order: VecDeque<NodeId>,
    next_op: u64,
    ops: BTreeMap<OpId, Pending>,
    actions: VecDeque<Action>,
    out: Out,
    tally: Stats,
    stats: Stats,
    period: Period,
    next_expire: Instant,
    next_sweep: Instant,
    next_summary: Option<Instant>,
    /// Whether per-envelope events are wanted now (asked for, and someone listens).
    watched: bool,
    /// When waiting LOOKUPs and held-back drains are looked at again, while there are any.
    retry_at: Option<Instant>,
    /// Bytes of [`Action::Send`]s not yet polled, per device and in all: written for the
    /// device as far as the bounds are concerned, though the links have not seen them.
    unpolled: BTreeMap<NodeId, usize>,
    unpolled_total: usize,
    /// Bytes of envelopes in [`StoreOp::Enqueue`]s not yet answered: held in memory until
    /// the store has them, bounded by [`RelayServer::storing_bound`].
    storing: usize,
}

impl RelayServer {
    /// A relay that knows what the store holds: `registered` (cell, device, last seen) and
    /// the devices with something queued.
    pub fn new(
        config: ServerConfig,
        now: Instant,
        registered: impl IntoIterator<Item = (CellId, NodeId, Timestamp)>,
        queued: impl IntoIterator<Item = NodeId>,
    ) -> Self {
        let mut registrations = Registrations::new(config.registrations);
        for (cell, node, seen) in registered {
            registrations.load(cell, node, seen);
        }
        let keys = config.registrations.total.max(1024);
        Self {
            forwards: Buckets::new(config.forward_rate, keys),
            lookups: Buckets::new(config.lookup_rate, keys),
            budget: ByteBudget::new(config.memory),
            revocations: RelayRevocations::new(config.revocations, keys),
            registrations,
            fresh: BTreeSet::new(),
            stored: queued.into_iter().collect(),
            online: BTreeMap::new(),
            deferred: VecDeque::new(),
            deferred_by: BTreeMap::new(),
            dropped: BTreeSet::new(),
            dropped_order: VecDeque::new(),
            next_op: 0,
            ops: BTreeMap::new(),
            actions: VecDeque::new(),
            out: Out::default(),
            tally: Stats::default(),
            stats: Stats::default(),
            period: Period {
                started: now,
                ..Period::default()
            },
            next_expire: now.plus_millis(EXPIRE_EVERY_MS),
            next_sweep: now.plus_millis(sweep_every_ms(config.registrations.ttl_secs)),
            next_summary: config
                .summary_every_ms
                .map(|ms| now.plus_millis(ms.max(10))),
            watched: config.envelope_events,
            retry_at: None,
            unpolled: BTreeMap::new(),
            unpolled_total: 0,
            storing: 0,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Devices online now.
    pub fn online(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.online.keys().copied()
    }

    /// Whether `node` is online here.
    pub fn is_online(&self, node: NodeId) -> bool {
        self.online.contains_key(&node)
    }

    /// Devices registered now.
    pub fn registered(&self) -> usize {
        self.registrations.len()
    }

    /// Bytes held for pushed envelopes not yet DELIVERED.
    pub fn in_flight_bytes(&self) -> usize {
        self.budget.total()
    }

    /// Whether per-envelope events are made (when [`ServerConfig::envelope_events`] asks for
    /// them; the driver turns them off while nobody listens).
    pub fn set_watched(&mut self, watched: bool) {
        self.watched = watched && self.config.envelope_events;
    }

    /// Keeps a revocation the store holds (at start, whatever the limits). One that does not
    /// verify is refused (a damaged store), and changes nothing.
    pub fn load_revocation(&mut self, token: &Token) -> Result<(), InvalidRevocation> {
        self.revocations.load(token).map(|_| ())
    }

    /// Whether `cell` has revoked `node` here.
    pub fn is_revoked(&self, cell: CellId, node: NodeId) -> bool {
        self.revocations.is_revoked(cell, node)
    }

    /// The join check: a device must not be revoked, and be registered or fit as a new
    /// one. A refusal says why ([`crate::limits::RegistrationRefused::Revoked`] is a NACK
    /// `revoked`, the others `busy`).
    pub fn check_join(
        &mut self,
        now: Instant,
        cell: CellId,
        node: NodeId,
    ) -> Result<(), crate::limits::RegistrationRefused> {
        if self.revocations.is_revoked(cell, node) {
            return Err(crate::limits::RegistrationRefused::Revoked);
        }
        match self.registrations.join(cell, node, now.timestamp())? {
            Registered::New => {
                self.fresh.insert(node);
            }
            Registered::Known => {}
        }
        Ok(())
    }

    /// A join was refused (by the link's checks or [`RelayServer::check_join`]): counted.
    pub fn join_refused(&mut self, cell: CellId, node: NodeId, code: NackCode, reason: String) {
        self.period.joins_refused += 1;
        self.event(ServerEvent::JoinRefused {
            cell,
            node,
            code,
            reason,
        });
    }

    /// Device `node` of `cell` joined from `addr` with these tokens. A device that joins
    /// again replaces its earlier connection: what was pushed on that one and not
    /// acknowledged goes to the store. One revoked since its [`RelayServer::check_join`]
    /// is disconnected instead.
    pub fn joined(
        &mut self,
        now: Instant,
        cell: CellId,
        node: NodeId,
        addr: SocketAddr,
        node_token: Vec<u8>,
        identity: Vec<u8>,
    ) {
        // Its join passed its check (on the link's task) before its revocation was kept
        // here: cut off, and not registered again.
        if self.revocations.is_revoked(cell, node) {
            self.fresh.remove(&node);
            self.period.joins_refused += 1;
            if let Some(old) = self.online.remove(&node) {
                let held: usize = old
                    .in_flight
                    .values()
                    .map(|(_, e)| e.len() + IN_FLIGHT_OVERHEAD)
                    .sum();
                self.budget.release(node, old.cell, held);
            }
            self.actions.push_back(Action::Disconnect {
                node,
                reason: "revoked by its cell",
            });
            if self.dropped.insert(node) {
                self.dropped_order.push_back(node);
            }
            return;
        }
        if self.dropped.remove(&node) {
            self.dropped_order.retain(|n| *n != node);
        }
        self.period.joins += 1;
        // The join's check registered it (or found it registered). A peer that got in
        // without it (one the relay dialed) is registered here if there is room.
        let new = self.fresh.remove(&node)
            || matches!(
                self.registrations.join(cell, node, now.timestamp()),
                Ok(Registered::New)
            );
        if new {
            self.period.new_devices += 1;
        }
        self.op(
            Pending::PutDevice,
            StoreOp::PutDevice {
                cell,
                node,
                node_token,
                identity,
                now: now.timestamp(),
            },
        );
        if let Some(old) = self.online.remove(&node) {
            self.keep_in_flight(now, node, old);
        }
        self.online.insert(
            node,
            Online {
                cell,
                receiving: false,
                in_flight: BTreeMap::new(),
                reading: false,
                wanted: false,
                drained: BTreeSet::new(),
                not_before: None,
            },
        );
        self.event(ServerEvent::Registered {
            cell,
            node,
            addr,
            new,
        });
    }

    /// Device `node` is gone, and every record it sent before was handed to
    /// [`RelayServer::records`]. What was pushed to it and not acknowledged goes to the store.
    pub fn left(&mut self, now: Instant, node: NodeId) {
        if let Some(online) = self.online.remove(&node) {
            self.registrations.seen(node, now.timestamp());
            self.keep_in_flight(now, node, online);
            self.event(ServerEvent::Offline { node });
        }
    }

    /// Handles payloads (each a batch of records) from joined devices, in arrival order:
    /// each with its device and the device's cell. What goes to the store from all of them
    /// is one [`StoreOp::Enqueue`], and what each device acknowledged one [`StoreOp::Remove`].
    pub fn records(
        &mut self,
        now: Instant,
        payloads: impl IntoIterator<Item = (NodeId, CellId, Bytes)>,
        outlets: &impl Outlets,
    ) {
        let mut to_store = Vec::new();
        let mut to_store_bytes = 0;
        let mut removed: BTreeMap<NodeId, Vec<(MsgId, NodeId)>> = BTreeMap::new();
        for (from, from_cell, payload) in payloads {
            for record in records(payload) {
                let Ok(record) = record else {
                    // Every FORWARD before it was answered; after it, nothing can be trusted
                    // to be framed right: the device is disconnected and will send again.
                    self.drop_device(from, "malformed relay record");
                    break;
                };
                if self.dropped.contains(&from) && !matches!(record, Record::Delivered(_)) {
                    continue;
                }
                let batch = Batch {
                    to_store: &mut to_store,
                    to_store_bytes: &mut to_store_bytes,
                    removed: &mut removed,
                };
                self.record(now, from, from_cell, record, outlets, batch);
            }
        }
        if !to_store.is_empty() {
            self.enqueue(now, to_store, true);
        }
        for (device, items) in removed {
            let acked = items.iter().map(|(id, _)| *id).collect();
            self.op(
                Pending::Remove(device, acked),
                StoreOp::Remove { device, items },
            );
        }
        self.drains(now, outlets);
        self.flush(now, outlets);
    }

    /// The result of store operation `op`.
    pub fn store_done(
        &mut self,
        now: Instant,
        op: OpId,
        result: StoreResult,
        outlets: &impl Outlets,
    ) {
        let Some(pending) = self.ops.remove(&op) else {
            return;
        };
        // Whatever the answer, the store is done with these envelopes.
        if let Pending::Enqueue { items, .. } = &pending {
            let bytes: usize = items.iter().map(|i| i.3).sum();
            self.storing = self.storing.saturating_sub(bytes);
        }
        match (pending, result) {
            (pending, StoreResult::Failed(error)) => {
                self.failed(pending.doing(), error);
                match pending {
                    // Nothing was queued: each sender is refused and retries with the same
                    // id; for pushed copies of a departed device (`answer: false`) after its
                    // `pushed`, so that it sends them again.
                    Pending::Enqueue { items, answer } => {
                        for (from, to, id, _) in items {
                            if answer {
                                self.refused(from, to, id, RefuseCode::Unavailable);
                            } else {
                                self.unkept(from, to, id, RefuseCode::Unavailable);
                            }
                        }
                    }
                    // Still in the store: read again after a pause (asked again at once, a
                    // failing store is asked as fast as it fails).
                    Pending::Drain(node) => {
                        if let Some(online) = self.online.get_mut(&node) {
                            online.reading = false;
                            online.wanted = true;
                            online.not_before = Some(now.plus_millis(RETRY_MS));
                        }
                    }
                    // Still queued: what the device acknowledged is handed again (it drops
                    // it as a duplicate and says DELIVERED again), or the reads of its
                    // queue, which skip what was handed, never get past it.
                    Pending::Remove(device, acked) => {
                        if let Some(online) = self.online.get_mut(&device) {
                            online.drained.retain(|k| !acked.contains(&k.0));
                            online.not_before = Some(now.plus_millis(RETRY_MS));
                            if online.receiving {
                                online.wanted = true;
                            }
                        }
                    }
                    // As a cell this relay cannot read: the asker's send finds no device.
                    Pending::Lookup(d) => {
                        let revocations = self.revocations.of_cell(d.cell);
                        self.out.push(
                            d.from,
                            &Record::Directory {
                                request: d.request,
                                cell: d.cell,
                                devices: Vec::new(),
                                revocations,
                            },
                        )
                    }
                    // Not kept: the asker hears so, and may send it again.
                    Pending::Revoke {
                        by,
                        request,
                        cell,
                        node,
                    } => {
                        self.revocations.remove(cell, node);
                        self.out.push(
                            by,
                            &Record::Revoked {
                                request,
                                result: Err(RefuseCode::Unavailable),
                            },
                        );
                        self.event(ServerEvent::RevokeRefused {
                            by,
                            code: RefuseCode::Unavailable,
                            reason: "the store failed".into(),
                        });
                    }
                    _ => {}
                }
            }
            (Pending::Enqueue { items, answer }, StoreResult::Enqueued(results)) => {
                let mut results = results.into_iter();
                for (from, to, id, bytes) in items {
                    let result = results.next().unwrap_or(Err(RefuseCode::Unavailable));
                    match result {
                        Ok(stored) => {
                            if stored != Stored::Duplicate {
                                self.stored.insert(to);
                            }
                            if answer {
                                self.accepted(from, to, id, bytes, Accepted::Queued);
                            } else if self.online.contains_key(&from) {
                                // Its sender was told `pushed`; now it is queued.
                                self.out.push(
                                    from,
                                    &Record::Accepted {
                                        to,
                                        id,
                                        status: Accepted::Queued,
                                    },
                                );
                            }
                            self.want_drain(to);
                        }
                        Err(code) if answer => self.refused(from, to, id, code),
                        Err(code) => {
                            self.event(ServerEvent::StoreFailed {
                                doing: "keeping an unacknowledged envelope",
                                error: code.name().to_owned(),
                            });
                            self.unkept(from, to, id, code);
                        }
                    }
                }
            }
            (Pending::Remove(device, _), StoreResult::Removed(n)) => {
                if n > 0 {
                    self.want_drain(device);
                }
            }
            (Pending::Lookup(d), StoreResult::Devices(devices)) => {
                let revocations = self.revocations.of_cell(d.cell);
                let devices = devices
                    .into_iter()
                    .filter_map(|(nt, id)| {
                        Some(DirectoryEntry {
                            node_token: Token::decode(&nt).ok()?,
                            identity: Token::decode(&id).ok()?,
                        })
                    })
                    // A device revoked since the read began is not listed beside its
                    // revocation.
                    .filter(|e| {
                        let node = NodeId::from_key(e.node_token.claims().key);
                        !self.revocations.is_revoked(d.cell, node)
                    })
                    .take(MAX_DEVICES)
                    .collect();
                self.out.push(
                    d.from,
                    &Record::Directory {
                        request: d.request,
                        cell: d.cell,
                        devices,
                        revocations,
                    },
                );
            }
            (
                Pending::Revoke {
                    by,
                    request,
                    cell,
                    node,
                },
                StoreResult::Count(messages),
            ) => self.revoked(by, request, cell, node, messages),
            (Pending::Drain(node), StoreResult::Pending(envelopes)) => {
                self.drained(node, envelopes);
            }
            (Pending::Expire, StoreResult::Count(count)) => {
                if count > 0 {
                    self.event(ServerEvent::EnvelopesExpired { count });
                }
            }
            (Pending::Sweep(devices), StoreResult::Count(messages)) => {
                if devices > 0 {
                    self.event(ServerEvent::Expired { devices, messages });
                }
            }
            (Pending::PutDevice, _) => {}
            (pending, other) => self.failed(
                pending.doing(),
                format!("unexpected store result {other:?}"),
            ),
        }
        self.drains(now, outlets);
        self.flush(now, outlets);
    }

    /// When [`RelayServer::handle_timeout`] is next due: the next periodic task, or sooner
    /// while LOOKUPs wait for their rate or drains wait for their device's link.
    pub fn poll_timeout(&self) -> Instant {
        let mut next = self.next_expire.min(self.next_sweep);
        if let Some(s) = self.next_summary {
            next = next.min(s);
        }
        if let Some(r) = self.retry_at {
            next = next.min(r);
        }
        next
    }

    /// Time passed: answers waiting LOOKUPs whose cells have tokens again, starts held-back
    /// drains that may go, and runs what is due (expiry, the sweep of registrations, the
    /// summary).
    pub fn handle_timeout(&mut self, now: Instant, outlets: &impl Outlets) {
        self.answer_deferred(now);
        if now >= self.next_expire {
            self.next_expire = now.plus_millis(EXPIRE_EVERY_MS);
            self.op(
                Pending::Expire,
                StoreOp::Expire {
                    now: now.timestamp(),
                },
            );
        }
        if now >= self.next_sweep {
            self.next_sweep = now.plus_millis(sweep_every_ms(self.config.registrations.ttl_secs));
            self.sweep(now);
        }
        if let Some(at) = self.next_summary
            && now >= at
        {
            self.next_summary = self
                .config
                .summary_every_ms
                .map(|ms| now.plus_millis(ms.max(10)));
            self.summarise(now, outlets);
        }
        self.drains(now, outlets);
        self.flush(now, outlets);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        let action = self.actions.pop_front()?;
        if let Action::Send { to, payload } = &action
            && let Some(n) = self.unpolled.get_mut(to)
        {
            *n = n.saturating_sub(payload.len());
            self.unpolled_total = self.unpolled_total.saturating_sub(payload.len());
            if *n == 0 {
                self.unpolled.remove(to);
            }
        }
        Some(action)
    }

    /// What was written for `node`: taken by its link or not, or not yet polled.
    fn waiting(&self, node: NodeId, outlets: &impl Outlets) -> usize {
        outlets.waiting(node) + self.unpolled.get(&node).copied().unwrap_or(0)
    }

    /// Bytes waiting for a device's link beyond which it is not reading what it asked for:
    /// pushes stay within `outlet_bytes` (or are one envelope alone) and drains start below
    /// half of it, so only answers to its own records, which it does not read, get it there.
    fn slow_reader(&self) -> usize {
        2 * self.config.outlet_bytes + MAX_ENVELOPE
    }

    /// Most bytes of FORWARDed envelopes on their way to the store (a quarter of the relay's
    /// memory bound, and room for one envelope at least); what is kept of a departed
    /// device's pushed envelopes is counted too, and never refused.
    fn storing_bound(&self) -> usize {
        (self.config.memory.total / 4).max(MAX_ENVELOPE)
    }

    /// What was written for every device and not taken, polled or not.
    fn waiting_total(&self, outlets: &impl Outlets) -> usize {
        outlets.total() + self.unpolled_total
    }

    /// Stops: what online devices have not acknowledged goes to the store.
    pub fn shutdown(&mut self, now: Instant) {
        let nodes: Vec<NodeId> = self.online.keys().copied().collect();
        for node in nodes {
            self.left(now, node);
        }
    }

    fn record(
        &mut self,
        now: Instant,
        from: NodeId,
        from_cell: CellId,
        record: Record,
        outlets: &impl Outlets,
        batch: Batch<'_>,
    ) {
        match record {
            Record::Lookup { request, cell } => {
                let d = Deferred {
                    from,
                    from_cell,
                    request,
                    cell,
                };
                if self.lookups.take(from_cell, now) {
                    self.op(Pending::Lookup(d), StoreOp::Devices { cell });
                } else {
                    self.defer(d);
                }
            }
            Record::Forward { to, id, envelope } => {
                let online = self.online.contains_key(&to);
                let to_cell = self
                    .online
                    .get(&to)
                    .map(|o| o.cell)
                    .or_else(|| self.registrations.get(to).map(|r| r.cell));
                let refuse = if envelope.len() > MAX_ENVELOPE {
                    Some(RefuseCode::TooLarge)
                } else if to_cell.is_some_and(|c| self.revocations.is_revoked(c, to)) {
                    // Its revocation is kept, or being kept: as after it is, no such device
                    // (queued now, it would be dropped with the registration or outlive it).
                    Some(RefuseCode::UnknownDevice)
                } else if !online && !self.registrations.contains(to) {
                    Some(RefuseCode::UnknownDevice)
                } else if !self.forwards.take(from_cell, now) {
                    Some(RefuseCode::RateLimited)
                } else {
                    None
                };
                if let Some(code) = refuse {
                    self.refused(from, to, id, code);
                    return;
                }
                if self.push(from, to, id, &envelope, outlets) {
                    return;
                }
                // A store slower than its senders: they retry later, rather than the relay
                // holding without bound what waits for the disk.
                if self.storing + *batch.to_store_bytes + envelope.len() > self.storing_bound() {
                    self.refused(from, to, id, RefuseCode::Unavailable);
                    return;
                }
                if let Some(online) = self.online.get_mut(&to)
                    && online.receiving
                {
                    online.wanted = true;
                }
                *batch.to_store_bytes += envelope.len();
                // A copy: the envelope shares the buffer of the whole frame it came in,
                // which the relay must not keep for it.
                batch.to_store.push(StoreEnvelope {
                    to,
                    id,
                    from,
                    envelope: Bytes::copy_from_slice(&envelope),
                });
            }
            Record::Revoke {
                request,
                revocation,
            } => {
                match self
                    .revocations
                    .offer(from_cell, &revocation, &self.registrations, now)
                {
                    Ok(Offered::Known) => self.out.push(
                        from,
                        &Record::Revoked {
                            request,
                            result: Ok(()),
                        },
                    ),
                    Ok(Offered::New(r)) => self.op(
                        Pending::Revoke {
                            by: from,
                            request,
                            cell: r.cell(),
                            node: r.node(),
                        },
                        StoreOp::Revoke {
                            cell: r.cell(),
                            node: r.node(),
                            revocation: r.token().to_bytes(),
                        },
                    ),
                    Err(e) => {
                        self.out.push(
                            from,
                            &Record::Revoked {
                                request,
                                result: Err(e.code()),
                            },
                        );
                        self.event(ServerEvent::RevokeRefused {
                            by: from,
                            code: e.code(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            Record::Receive => {
                if let Some(online) = self.online.get_mut(&from)
                    && !online.receiving
                {
                    online.receiving = true;
                    online.wanted = true;
                }
            }
            // An id names what this relay handed the device under it: the copy it pushed, and
            // the copies the store handed, each from its sender. Another sender's envelope
            // under the same id that the device was not handed stays queued (a sender that
            // can guess an id must not get another's message acknowledged in its place).
            Record::Delivered(ids) => {
                let Some(online) = self.online.get_mut(&from) else {
                    return;
                };
                let mut freed = 0;
                let mut items = Vec::new();
                let lowest =
                    NodeId::from_key(crate::keys::PublicKey::from_bytes_unchecked(&[0; 32]));
                for id in &ids {
                    if let Some((sender, env)) = online.in_flight.remove(id) {
                        freed += env.len() + IN_FLIGHT_OVERHEAD;
                        items.push((*id, sender));
                    }
                    items.extend(
                        online
                            .drained
                            .range((*id, lowest, [0; 16])..)
                            .take_while(|k| k.0 == *id)
                            .map(|k| (k.0, k.1)),
                    );
                }
                let cell = online.cell;
                self.budget.release(from, cell, freed);
                if self.stored.contains(&from) && !items.is_empty() {
                    items.sort_unstable();
                    items.dedup();
                    batch.removed.entry(from).or_default().extend(items);
                }
            }
            _ => self.drop_device(from, "relay-only record"),
        }
    }

    /// Pushes an envelope to its online device if its link and the memory bounds allow;
    /// returns whether it did (and answered).
    fn push(
        &mut self,
        from: NodeId,
        to: NodeId,
        id: MsgId,
        envelope: &Bytes,
        outlets: &impl Outlets,
    ) -> bool {
        let bytes = envelope.len();
        let elsewhere = self.waiting_total(outlets) + self.out.bytes;
        let queued_out = self.out.len_for(to) + self.waiting(to, outlets);
        let Some(online) = self.online.get_mut(&to) else {
            return false;
        };
        // A link that takes no messages (a one-shot send) is handed only answers to what it
        // sent (REPLY, RESET): an envelope for it waits in the store.
        if !online.receiving && !is_answer(envelope) {
            return false;
        }
        let cell = online.cell;
        match online.in_flight.get(&id) {
            // A retry of one still in flight: it is on its way already.
            Some((sender, copy)) if *sender == from && copy[..] == envelope[..] => {
                self.accepted(from, to, id, bytes, Accepted::Pushed);
                return true;
            }
            // The same id from the same sender, sealed again (the device lost the session of
            // the copy in flight): this one is pushed too, and kept in its place.
            Some((sender, copy)) if *sender == from => {
                let freed = copy.len() + IN_FLIGHT_OVERHEAD;
                online.in_flight.remove(&id);
                self.budget.release(to, cell, freed);
            }
            // The same id from another sender waits in the store.
            Some(_) => return false,
            // Within the outlet, or alone in it.
            None if queued_out > 0 && queued_out + bytes > self.config.outlet_bytes => {
                return false;
            }
            None => {}
        }
        if !self
            .budget
            .charge(to, cell, bytes + IN_FLIGHT_OVERHEAD, elsewhere)
        {
            return false;
        }
        self.out.push(
            to,
            &Record::Deliver {
                from,
                id,
                envelope: envelope.clone(),
            },
        );
        if let Some(online) = self.online.get_mut(&to) {
            online
                .in_flight
                .insert(id, (from, Bytes::copy_from_slice(envelope)));
        }
        self.accepted(from, to, id, bytes, Accepted::Pushed);
        true
    }

    fn enqueue(&mut self, now: Instant, envelopes: Vec<StoreEnvelope>, answer: bool) {
        let items: Vec<(NodeId, NodeId, MsgId, usize)> = envelopes
            .iter()
            .map(|e| (e.from, e.to, e.id, e.envelope.len()))
            .collect();
        self.storing += items.iter().map(|i| i.3).sum::<usize>();
        self.op(
            Pending::Enqueue { items, answer },
            StoreOp::Enqueue {
                now: now.timestamp(),
                envelopes,
            },
        );
    }

    /// Moves what was pushed to a device that is gone, and not acknowledged, into the store.
    fn keep_in_flight(&mut self, now: Instant, node: NodeId, online: Online) {
        if online.in_flight.is_empty() {
            return;
        }
        let held: usize = online
            .in_flight
            .values()
            .map(|(_, e)| e.len() + IN_FLIGHT_OVERHEAD)
            .sum();
        self.budget.release(node, online.cell, held);
        let envelopes = online
            .in_flight
            .into_iter()
            .map(|(id, (from, envelope))| StoreEnvelope {
                to: node,
                id,
                from,
                envelope,
            })
            .collect();
        self.enqueue(now, envelopes, false);
    }

    fn want_drain(&mut self, node: NodeId) {
        if let Some(online) = self.online.get_mut(&node)
            && online.receiving
        {
            online.wanted = true;
        }
    }

    /// Starts the drains that are wanted and may go: the device's link has taken most of what
    /// it was given, and the relay is within its memory bound.
    fn drains(&mut self, now: Instant, outlets: &impl Outlets) {
        let full = self.waiting_total(outlets) + self.budget.total() >= self.config.memory.total;
        let chunk = (self.config.outlet_bytes / 4).max(1);
        let waiting: BTreeMap<NodeId, usize> = self
            .online
            .keys()
            .map(|n| (*n, self.waiting(*n, outlets) + self.out.len_for(*n)))
            .collect();
        let mut go = Vec::new();
        for (node, online) in &mut self.online {
            if !online.wanted || online.reading || !online.receiving {
                continue;
            }
            if online.not_before.is_some_and(|t| now < t) {
                continue;
            }
            if !self.stored.contains(node) {
                online.wanted = false;
                continue;
            }
            if full || waiting[node] >= self.config.outlet_bytes / 2 {
                continue;
            }
            online.wanted = false;
            online.reading = true;
            go.push(*node);
        }
        for node in go {
            self.op(
                Pending::Drain(node),
                StoreOp::Pending {
                    device: node,
                    now: now.timestamp(),
                    limit: DRAIN_COUNT,
                    max_bytes: chunk,
                },
            );
        }
    }

    fn drained(&mut self, node: NodeId, envelopes: Vec<StoredEnvelope>) {
        let chunk = (self.config.outlet_bytes / 4).max(1);
        let Some(online) = self.online.get_mut(&node) else {
            return;
        };
        online.reading = false;
        if envelopes.is_empty() {
            self.stored.remove(&node);
            online.drained.clear();
            return;
        }
        let more = envelopes.len() == DRAIN_COUNT
            || envelopes.iter().map(|e| e.envelope.len()).sum::<usize>() >= chunk;
        let keys: BTreeSet<DrainKey> = envelopes
            .iter()
            .map(|e| drain_key(e.id, e.from, &e.envelope))
            .collect();
        online.drained.retain(|k| keys.contains(k));
        let fresh: Vec<StoredEnvelope> = envelopes
            .into_iter()
            .filter(|e| online.drained.insert(drain_key(e.id, e.from, &e.envelope)))
            .collect();
        // Nothing new: what was read waits for DELIVERED, which asks again.
        if fresh.is_empty() {
            return;
        }
        if more {
            online.wanted = true;
        }
        let count = fresh.len();
        for e in fresh {
            self.out.push(
                node,
                &Record::Deliver {
                    from: e.from,
                    id: e.id,
                    envelope: e.envelope,
                },
            );
        }
        self.event(ServerEvent::Drained { node, count });
    }

    /// Queues a LOOKUP over its cell's rate, or disconnects its device if it has too many
    /// waiting (or the relay does).
    fn defer(&mut self, d: Deferred) {
        let mine = self.deferred_by.entry(d.from).or_insert(0);
        if *mine >= MAX_DEFERRED_PER_DEVICE || self.deferred.len() >= MAX_DEFERRED {
            self.drop_device(d.from, "too many LOOKUPs");
            return;
        }
        *mine += 1;
        self.deferred.push_back(d);
    }

    /// Answers the waiting LOOKUPs whose cells have a token now, in order.
    fn answer_deferred(&mut self, now: Instant) {
        let mut keep = VecDeque::with_capacity(self.deferred.len());
        // A cell out of tokens stays out for this pass: its later LOOKUPs keep their order.
        let mut out_of_tokens = BTreeSet::new();
        while let Some(d) = self.deferred.pop_front() {
            if self.dropped.contains(&d.from) || !self.online.contains_key(&d.from) {
                self.undefer(d.from);
                continue;
            }
            if out_of_tokens.contains(&d.from_cell) || !self.lookups.take(d.from_cell, now) {
                out_of_tokens.insert(d.from_cell);
                keep.push_back(d);
                continue;
            }
            self.undefer(d.from);
            self.op(Pending::Lookup(d), StoreOp::Devices { cell: d.cell });
        }
        self.deferred = keep;
    }

    fn undefer(&mut self, from: NodeId) {
        if let Some(n) = self.deferred_by.get_mut(&from) {
            *n -= 1;
            if *n == 0 {
                self.deferred_by.remove(&from);
            }
        }
    }

    /// Drops registrations not seen for their time to live (and their queues), after
    /// recording that every online device was seen now.
    fn sweep(&mut self, now: Instant) {
        let ts = now.timestamp();
        let touch: Vec<(CellId, NodeId)> = self.online.iter().map(|(n, o)| (o.cell, *n)).collect();
        for (_, n) in &touch {
            self.registrations.seen(*n, ts);
        }
        let online = &self.online;
        let forget = self.registrations.expired(ts, |n| online.contains_key(&n));
        for (_, n) in &forget {
            self.registrations.remove(*n);
            self.stored.remove(n);
        }
        // A join the relay never saw (refused after its check) leaves nothing behind for long.
        self.fresh.clear();
        self.op(
            Pending::Sweep(forget.len()),
            StoreOp::Sweep {
                touch,
                forget,
                now: ts,
            },
        );
    }

    fn summarise(&mut self, now: Instant, outlets: &impl Outlets) {
        let p = std::mem::take(&mut self.period);
        self.period.started = now;
        let summary = Summary {
            period: std::time::Duration::from_millis(now.millis_since(p.started)),
            stats: p.stats,
            refusals: p.refusals.into_values().collect(),
            joins: p.joins,
            new_devices: p.new_devices,
            joins_refused: p.joins_refused,
            online: self.online.len(),
            registered: self.registrations.len(),
            in_flight_bytes: self.budget.total(),
            waiting_bytes: self.waiting_total(outlets),
        };
        self.event(ServerEvent::Summary(summary));
    }

    fn accepted(&mut self, from: NodeId, to: NodeId, id: MsgId, bytes: usize, status: Accepted) {
        match status {
            Accepted::Pushed => self.tally.pushed += 1,
            Accepted::Queued => self.tally.queued += 1,
        }
        self.tally.bytes += bytes as u64;
        if self.watched {
            self.event(ServerEvent::Forwarded {
                from,
                to,
                id,
                bytes,
                status,
            });
        }
        self.out.push(from, &Record::Accepted { to, id, status });
    }

    fn refused(&mut self, from: NodeId, to: NodeId, id: MsgId, code: RefuseCode) {
        self.tally.refused += 1;
        self.period
            .refusals
            .entry(code.code())
            .or_insert((code, 0))
            .1 += 1;
        if self.watched {
            self.event(ServerEvent::Refused { from, id, code });
        }
        self.out.push(from, &Record::Refused { to, id, code });
    }

    /// A pushed envelope whose device left before DELIVERED could not be kept in the store:
    /// its sender, answered `pushed`, is answered again, REFUSED with a transient code, so
    /// that it sends it again (13.5). One that is not online hears nothing: its mailbox sends
    /// what was pushed again when its link comes back. Not counted again in the stats: the
    /// FORWARD was counted `pushed`.
    fn unkept(&mut self, from: NodeId, to: NodeId, id: MsgId, code: RefuseCode) {
        // The store's refusals are transient (`queue_full`, `unavailable`); another would
        // end the sender's attempt for a device that may still take it.
        let code = if code.is_transient() {
            code
        } else {
            RefuseCode::Unavailable
        };
        if self.watched {
            self.event(ServerEvent::Refused { from, id, code });
        }
        if self.online.contains_key(&from) && !self.dropped.contains(&from) {
            self.out.push(from, &Record::Refused { to, id, code });
        }
    }

    fn failed(&mut self, doing: &'static str, error: String) {
        self.event(ServerEvent::StoreFailed { doing, error });
    }

    /// A revocation is kept in the store, which dropped the device's queue: the device goes
    /// from the registrations and (without keeping what was pushed to it) from the online
    /// devices, and is disconnected; nothing more of this call is written to it. A device
    /// that revoked itself keeps its link to hear the answer (closing it could overtake
    /// the answer), and closes it; until then only its DELIVEREDs count.
    fn revoked(&mut self, by: NodeId, request: u32, cell: CellId, node: NodeId, messages: usize) {
        self.registrations.remove(node);
        self.fresh.remove(&node);
        self.stored.remove(&node);
        if let Some(online) = self.online.remove(&node) {
            let held: usize = online
                .in_flight
                .values()
                .map(|(_, e)| e.len() + IN_FLIGHT_OVERHEAD)
                .sum();
            self.budget.release(node, online.cell, held);
            if let Some(o) = self.out.to.remove(&node) {
                self.out.bytes = self.out.bytes.saturating_sub(o.len());
            }
            if node != by {
                self.actions.push_back(Action::Disconnect {
                    node,
                    reason: "revoked by its cell",
                });
            }
            if self.dropped.insert(node) {
                self.dropped_order.push_back(node);
            }
        }
        self.out.push(
            by,
            &Record::Revoked {
                request,
                result: Ok(()),
            },
        );
        self.event(ServerEvent::Revoked {
            cell,
            node,
            by,
            messages,
        });
    }

    /// Disconnects a misbehaving device (see `dropped`).
    fn drop_device(&mut self, node: NodeId, reason: &'static str) {
        if !self.online.contains_key(&node) || self.dropped.contains(&node) {
            return;
        }
        self.actions.push_back(Action::Disconnect { node, reason });
        self.event(ServerEvent::Disconnected { node, reason });
        self.dropped.insert(node);
        self.dropped_order.push_back(node);
        if self.dropped_order.len() > MAX_DROPPED
            && let Some(old) = self.dropped_order.pop_front()
        {
            self.dropped.remove(&old);
        }
    }

    /// Hands what this call wrote to the devices' links, and drops a device that does not
    /// read what it is sent (more than twice `outlet_bytes` waiting) or, when the relay is
    /// over its bound, the one with the most waiting.
    fn flush(&mut self, now: Instant, outlets: &impl Outlets) {
        let out = std::mem::take(&mut self.out);
        let mut slow = Vec::new();
        for (to, mut outgoing) in out.to {
            let written = outgoing.len();
            if !outgoing.buf.is_empty() {
                outgoing
                    .payloads
                    .push(Bytes::from(std::mem::take(&mut outgoing.buf)));
            }
            for payload in outgoing.payloads {
                self.actions.push_back(Action::Send { to, payload });
            }
            *self.unpolled.entry(to).or_insert(0) += written;
            self.unpolled_total += written;
            if self.online.contains_key(&to) && self.waiting(to, outlets) > self.slow_reader() {
                slow.push(to);
            }
        }
        for to in slow {
            self.drop_device(to, "does not read what it is sent");
        }
        let held = self.waiting_total(outlets) + self.budget.total();
        if held > self.config.memory.total + self.config.outlet_bytes {
            let heaviest = self
                .online
                .keys()
                .filter(|n| !self.dropped.contains(n))
                .map(|n| (self.waiting(*n, outlets), *n))
                .max();
            if let Some((waiting, node)) = heaviest
                && waiting > 0
            {
                self.drop_device(node, "the relay is over its memory bound");
            }
        }
        let t = std::mem::take(&mut self.tally);
        self.period.stats.add(&t);
        self.stats.add(&t);
        let waiting = !self.deferred.is_empty()
            || self
                .online
                .iter()
                .any(|(n, o)| o.wanted && !o.reading && o.receiving && self.stored.contains(n));
        self.retry_at = waiting.then(|| now.plus_millis(RETRY_MS));
    }

    fn op(&mut self, pending: Pending, op: StoreOp) {
        let id = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(id, pending);
        self.actions.push_back(Action::Store(id, op));
    }

    fn event(&mut self, e: ServerEvent) {
        self.actions.push_back(Action::Event(e));
    }
}

impl Pending {
    /// What the relay was doing, for a failure's event.
    fn doing(&self) -> &'static str {
        match self {
            Self::PutDevice => "registering a device",
            Self::Enqueue { answer: true, .. } => "queueing envelopes",
            Self::Enqueue { answer: false, .. } => "keeping unacknowledged envelopes",
            Self::Remove(..) => "deleting delivered envelopes",
            Self::Lookup(_) => "reading the directory",
            Self::Drain(_) => "reading a queue",
            Self::Expire => "expiring envelopes",
            Self::Sweep(_) => "sweeping registrations",
            Self::Revoke { .. } => "keeping a revocation",
        }
    }
}

/// Registrations are swept a few times per time to live, between once a second and hourly.
fn sweep_every_ms(ttl_secs: u64) -> u64 {
    (ttl_secs / 4).clamp(1, 3600) * 1000
}

/// Whether an envelope is an answer (REPLY, RESET) that a link which takes no messages is
/// still handed.
fn is_answer(envelope: &[u8]) -> bool {
    crate::e2e::is_answer(envelope)
}

#[cfg(test)]
mod tests;
