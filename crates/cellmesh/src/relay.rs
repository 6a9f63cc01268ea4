//! A relay: a node that devices behind NAT join with an outbound connection, which forwards
//! end-to-end envelopes it cannot read and stores them for devices that are offline.
//!
//! ```text
//!  device A ──link──► Node ──inbox──► relay loop ──► outbox(B) ──link──► device B (online)
//!                       │ JOIN: rates, caps,    │                  ▲
//!                       │ registrations          ▼                  │ drain(B): on connect, after a spill
//!                       └────────────────►     Store (redb): directory, queues (device B offline)
//! ```
//!
//! - **Registration** is the join itself: the link already verified the device's node token
//!   and its cell's identity token, and the relay records both in its directory, which any
//!   device can query by cell id (LOOKUP). Askers check the tokens against the id. A join
//!   that would take a cell or the relay past its bound of registrations is refused (NACK
//!   `busy`), as are joins past the node's rates and connection caps; a device not seen for
//!   the registrations' time to live is dropped, with its queue.
//! - **Forwarding.** A FORWARD to an online device is batched with the other records for it
//!   from the same inbox batch and written to its link. Until the device says DELIVERED, the
//!   relay keeps a copy of the envelope in memory; if the device leaves first, the copy moves
//!   to the store. A FORWARD to an offline device, or to one with too much pushed and not
//!   taken (see Memory), is stored durably (one redb transaction per batch) before the sender
//!   hears ACCEPTED(queued).
//! - **Answers.** Every FORWARD gets exactly one ACCEPTED or REFUSED. Nothing accepted is
//!   dropped silently: a store at its bound refuses with QUEUE_FULL, a sender over its rate
//!   with RATE_LIMITED. A LOOKUP over its cell's rate waits (bounded) for its turn.
//! - **Memory** is bounded in bytes ([`RelayConfig::memory`]): pushed envelopes not yet
//!   DELIVERED, per device, per cell and for the whole relay together with everything written
//!   for devices that their links have not taken. Past a bound, envelopes go to the store.
//! - **Back-pressure.** The relay's loop never waits on a device's link: what it writes goes
//!   straight into the link while that has room, and otherwise waits, in order, in the
//!   device's outbox. Deliveries to a device with `outlet_bytes` waiting spill to the store;
//!   a device with twice that waiting (answers to its own FORWARDs that it does not read), or
//!   with the most waiting when the whole relay is over its bound, is disconnected.
//! - **Revocations.** A REVOKE is decided by the core's [`RelayRevocations`] (the token
//!   verifies, its cell has a device registered here, the device is not another cell's;
//!   10 a second per sending cell, bursts of 100; 64 per cell, 100,000 in all). One it keeps
//!   is written to the store's `revoked` table in the same transaction that drops the
//!   device's registration and queue, before REVOKED(ok) is sent; then the device is
//!   disconnected, its joins are refused (NACK `revoked`), and every DIRECTORY of its cell
//!   carries the revocation, so that senders that never imported it still honour it.
//! - **Events** ([`RelayEvent`]) say what the relay did. Per-envelope events, which name who
//!   sends to whom, are made only when [`RelayConfig::envelope_events`] asks for them.
//!
//! The decisions on limits are the core's pure structures ([`cellmesh_core::limits`]), fed the
//! time by this loop.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::connection::{Authorization, JoinPolicy, Refusal};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::limits::{
    Buckets, ByteBudget, ByteLimits, Rate, Registered, RegistrationLimits, Registrations,
};
use cellmesh_core::relay::{
    Accepted, DirectoryEntry, MAX_ENVELOPE, MsgId, Record, RefuseCode, put_record, records,
};
use cellmesh_core::revoked::{Offered, RelayRevocations, RevocationLimits};
use cellmesh_core::token::Token;
use cellmesh_core::wire::NackCode;
use thiserror::Error;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::node::{
    Incoming, JoinCheck, Node, NodeConfig, NodeEvent, PeerInfo, PeerSender, StartError,
};
use crate::outbox::{MAX_BATCH, Outbox, batch_payloads};
use crate::store::{Enqueued, NewMessage, Store, StoreError, StoreLimits};

/// What one pushed envelope costs in memory beyond its bytes (its map entry and allocation),
/// counted against [`RelayConfig::memory`] so that tiny envelopes are bounded too.
const IN_FLIGHT_OVERHEAD: usize = 128;

/// Most devices remembered as disconnected for misbehaving (see `Loop::dropped`).
const MAX_DROPPED: usize = 1024;

/// LOOKUPs over their cell's rate that wait for their turn: per device, and in all. A device
/// past either is disconnected (it sends them again when it reconnects).
const MAX_DEFERRED_PER_DEVICE: usize = 256;
const MAX_DEFERRED: usize = 16_384;

/// The default of [`RelayConfig::fit_memory`]: a relay that fits a 1 GiB host.
pub const DEFAULT_MEMORY: usize = 512 << 20;

/// How a relay runs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Where the store lives (created if missing).
    pub data: PathBuf,
    /// Cells allowed to register and send; `None` admits every authenticated cell.
    pub allow: Option<BTreeSet<CellId>>,
    /// Bounds of each device's queue, and the messages' time to live.
    pub limits: StoreLimits,
    /// FORWARDs per second each sending cell may make (sustained). Default 200,000.
    pub rate_per_cell: u32,
    /// FORWARDs a sending cell may make in a burst. Default 400,000.
    pub burst_per_cell: u32,
    /// LOOKUPs each asking cell may make; one over the rate waits for its turn (a device with
    /// more than 256 waiting is disconnected). A DIRECTORY answers up to 64 devices' tokens,
    /// about 34 KB for a 41-byte question. Default 50 a second, bursts of 500.
    pub lookup_rate: Rate,
    /// Bytes held in memory for devices. `per_device` and `per_cell` bound the envelopes
    /// pushed to online devices and not yet DELIVERED (each counts its size plus 128 bytes);
    /// past them, envelopes for the device go to the store. `total` bounds those together
    /// with every byte written for devices that their links have not taken (outboxes and
    /// the links' command queues): past it, envelopes go to the store, queued envelopes wait
    /// in the store, and the device with the most waiting is disconnected. Defaults (see
    /// [`RelayConfig::fit_memory`]): 128 MiB, 128 MiB, 256 MiB.
    pub memory: ByteLimits,
    /// Bytes written for an online device that its link has not taken yet, beyond which new
    /// envelopes for it go to the store; a device with twice this waiting (its answers keep
    /// coming but it does not read) is disconnected. Default 64 MiB.
    pub outlet_bytes: usize,
    /// Devices registered per cell and in all (a new device past them is refused with NACK
    /// `busy`), and how long a device may stay away before its registration and its queue
    /// are dropped. Defaults 64 (as many as a DIRECTORY lists), 100,000, 30 days.
    pub registrations: RegistrationLimits,
    /// Bounds on the revocations the relay keeps (REVOKE): per sending cell's rate, per
    /// issuing cell, in all. Defaults 10 a second (bursts of 100), 64, 100,000.
    pub revocations: RevocationLimits,
    /// Make [`RelayEvent::Forwarded`] and [`RelayEvent::Refused`] events, one per envelope,
    /// naming its sending and receiving devices: a record of who talks to whom. Default false.
    pub envelope_events: bool,
    /// How often to make a [`RelayEvent::Summary`] of counts; `None`: never. Default 60 s.
    pub summary_every: Option<Duration>,
    /// TLS on every listener (see [`crate::tls::server_config`]), for standard ports.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The node underneath (its `listen`, `policy`, `tls`, `admit` and `announce_joins` are
    /// set from the fields above). [`RelayConfig::new`] gives it a relay's limits: an inbox of
    /// 32 MiB, joins at 20 a second (bursts of 100) per IPv4 address or IPv6 /64 and 500 a
    /// second (bursts of 1,000) in all, at most 64 joined connections per cell and 256 per
    /// address, 1,024 in all.
    pub node: NodeConfig,
}

impl RelayConfig {
    /// A relay on `listen` storing into `data`, open to all, with default bounds: those of
    /// [`RelayConfig::fit_memory`] for [`DEFAULT_MEMORY`].
    pub fn new(listen: Vec<SocketAddr>, data: PathBuf) -> Self {
        let mut config = Self {
            listen,
            data,
            allow: None,
            limits: StoreLimits::default(),
            rate_per_cell: 200_000,
            burst_per_cell: 400_000,
            lookup_rate: Rate::new(50, 500),
            memory: ByteLimits {
                per_device: 0,
                per_cell: 0,
                total: 0,
            },
            outlet_bytes: 0,
            registrations: RegistrationLimits {
                per_cell: cellmesh_core::relay::MAX_DEVICES,
                total: 100_000,
                ttl_secs: 30 * 24 * 3600,
            },
            revocations: RevocationLimits::default(),
            envelope_events: false,
            summary_every: Some(Duration::from_secs(60)),
            tls: None,
            node: NodeConfig::default(),
        };
        config.fit_memory(DEFAULT_MEMORY);
        config
    }

    /// Sizes what the relay holds in memory so that the process stays within about `bytes`
    /// plus some 40 MiB (the binary, its runtime, allocator slack) plus its connections'
    /// transport buffers (typically tens of KiB each; up to about 5 MiB for a peer that
    /// neither reads nor completes its frames): [`RelayConfig::memory`] gets `total` =
    /// `bytes`/2, `per_cell` and `per_device` `bytes`/4; `outlet_bytes` `bytes`/8; the
    /// node's inbox and the store's cache `bytes`/16 each (twice the inbox: a batch being
    /// handled and the next arriving); none of the last five above its default (128, 128,
    /// 64, 32 and 32 MiB).
    ///
    /// A device's bounds are its share of the relay's throughput: what a fast sender keeps
    /// in flight to it (up to the mailbox's `max_in_flight` messages) beyond them goes to the
    /// store, which is durable but slower (`docs/BENCHMARKS.md`).
    pub fn fit_memory(&mut self, bytes: usize) {
        let part = |div: usize, max: usize| (bytes / div).clamp(1 << 20, max);
        self.memory = ByteLimits {
            total: (bytes / 2).max(1 << 20),
            per_cell: part(4, 128 << 20),
            per_device: part(4, 128 << 20),
        };
        self.outlet_bytes = part(8, 64 << 20);
        self.node.inbox_bytes = part(16, 32 << 20);
        self.limits.cache_bytes = part(16, 32 << 20);
    }
}

/// Something the relay did, for operators (and for the demo, to show what a relay sees).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
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
    /// A join was refused (NACK), by the relay's limits or its allow-list.
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
    /// A cell's revocation of one of its devices was kept: the device was dropped from the
    /// directory with its queue, disconnected if online, and is refused from now on.
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
    /// A REVOKE was refused (or could not be kept).
    RevokeRefused {
        /// The device that sent it.
        by: NodeId,
        /// The code REVOKED carried.
        code: RefuseCode,
        /// Why.
        reason: String,
    },
    /// A device went offline.
    Offline {
        /// The device.
        node: NodeId,
    },
    /// An envelope was accepted: pushed to its online device, or queued. Made only with
    /// [`RelayConfig::envelope_events`].
    Forwarded {
        /// Sending device.
        from: NodeId,
        /// Recipient device.
        to: NodeId,
        /// Message id.
        id: MsgId,
        /// Envelope size in bytes (all the relay learns of the content).
        bytes: usize,
        /// Pushed or queued.
        status: Accepted,
    },
    /// A FORWARD was refused. Made only with [`RelayConfig::envelope_events`] (the summary
    /// counts refusals by code).
    Refused {
        /// Sending device.
        from: NodeId,
        /// Message id.
        id: MsgId,
        /// Why.
        code: RefuseCode,
    },
    /// Queued envelopes were handed to a device that came online.
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
    /// Registrations not seen for their time to live were dropped, with their queues.
    Expired {
        /// Devices.
        devices: usize,
        /// Queued envelopes that went with them.
        messages: usize,
    },
    /// Counts since the last summary (see [`RelayConfig::summary_every`]).
    Summary(RelaySummary),
}

/// Counts over one period, for [`RelayEvent::Summary`]: no device or message is named.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelaySummary {
    /// The period's length.
    pub period: Duration,
    /// Envelopes pushed, queued and refused in the period, and the bytes accepted.
    pub stats: RelayStats,
    /// The period's refusals by code (codes with none left out).
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

/// Starting a relay failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The store could not be opened.
    #[error("relay store: {0}")]
    Store(#[from] StoreError),
    /// The node could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A background task failed (a bug).
    #[error("relay task failed: {0}")]
    Task(String),
}

/// Counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Envelopes pushed to an online device.
    pub pushed: u64,
    /// Envelopes stored for a device.
    pub queued: u64,
    /// FORWARDs refused.
    pub refused: u64,
    /// Envelope bytes accepted.
    pub bytes: u64,
}

impl RelayStats {
    fn add(&mut self, t: &RelayStats) {
        self.pushed += t.pushed;
        self.queued += t.queued;
        self.refused += t.refused;
        self.bytes += t.bytes;
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    local_addrs: Vec<SocketAddr>,
    node: NodeId,
    cell: CellId,
    events: broadcast::Sender<RelayEvent>,
    stats: Arc<Mutex<RelayStats>>,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Opens the store and starts the relay's node.
    pub async fn start(unlocked: &Unlocked, mut config: RelayConfig) -> Result<Self, RelayError> {
        let store_path = config.data.join("relay.redb");
        let limits = config.limits.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&store_path, limits))
            .await
            .map_err(|e| RelayError::Task(e.to_string()))??;
        let store = Arc::new(store);
        let mut registrations = Registrations::new(config.registrations);
        for (cell, device, last_seen) in store.registered()? {
            registrations.load(cell, device, last_seen);
        }
        let mut revocations = RelayRevocations::new(config.revocations, config.registrations.total);
        for bytes in store.revocations()? {
            let loaded = Token::decode(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| revocations.load(&t).map_err(|e| e.to_string()));
            if let Err(error) = loaded {
                tracing::warn!(%error, "a stored revocation does not verify; ignored");
            }
        }
        let registrations = Arc::new(Mutex::new(Directory {
            registrations,
            revocations,
            fresh: HashSet::new(),
        }));
        config.node.listen = config.listen.clone();
        config.node.tls = config.tls.clone();
        // Devices need no list of each other, and a join must not cost every device a message.
        config.node.announce_joins = false;
        config.node.admit = Some(registrar(Arc::clone(&registrations)));
        if let Some(allow) = &config.allow {
            config.node.policy = JoinPolicy {
                authenticate: None,
                authorize: Authorization::AllowCells(allow.clone()),
            };
        }
        let node = Node::start(unlocked, config.node.clone()).await?;
        let node_events = node.subscribe();
        let (events, _) = broadcast::channel(4096);
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let stop = Arc::new(Notify::new());
        let relay = Self {
            local_addrs: node.local_addrs().to_vec(),
            node: node.node_id(),
            cell: node.cell(),
            events: events.clone(),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            task: tokio::spawn(async move {}),
        };
        let now = crate::node::now();
        let state = Loop {
            memory: Memory {
                waiting: Arc::new(AtomicUsize::new(0)),
                queued: node.queued_counter(),
                in_flight: Arc::new(AtomicUsize::new(0)),
                total: config.memory.total,
            },
            node,
            store,
            registrations,
            online: HashMap::default(),
            forwards: Buckets::new(
                Rate::new(config.rate_per_cell, config.burst_per_cell),
                config.registrations.total.max(1024),
            ),
            lookups: Buckets::new(config.lookup_rate, config.registrations.total.max(1024)),
            deferred: VecDeque::new(),
            deferred_by: HashMap::new(),
            budget: ByteBudget::new(config.memory),
            events,
            stats,
            tally: RelayStats::default(),
            period: Period::default(),
            now,
            watched: false,
            leaving: VecDeque::new(),
            dropped: HashSet::new(),
            dropped_order: VecDeque::new(),
            config,
        };
        Ok(Self {
            task: tokio::spawn(state.run(node_events, stop)),
            ..relay
        })
    }

    /// The addresses bound.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The relay's node id (devices may pin it).
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The cell the relay runs as.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// What the relay does from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RelayEvent> {
        self.events.subscribe()
    }

    /// Counters since start.
    pub fn stats(&self) -> RelayStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting, persists what online devices have not acknowledged, and closes.
    pub async fn shutdown(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// The relay's registrations as the join check and the loop share them.
struct Directory {
    registrations: Registrations,
    /// The revocations kept: checked on every join, handed out with every DIRECTORY.
    revocations: RelayRevocations,
    /// Devices the join check registered for the first time, until the loop has seen them
    /// join (to say so in [`RelayEvent::Registered`]).
    fresh: HashSet<NodeId>,
}

/// The node's last check on a join: the device must be registered, or fit as a new one.
fn registrar(directory: Arc<Mutex<Directory>>) -> JoinCheck {
    JoinCheck(Arc::new(move |binding| {
        let now = crate::now();
        let mut d = lock(&directory);
        if d.revocations.is_revoked(binding.cell(), binding.node()) {
            return Err(Refusal::new(
                NackCode::Revoked,
                format!("device {} has been revoked by its cell", binding.node()),
            ));
        }
        match d.registrations.join(binding.cell(), binding.node(), now) {
            Ok(Registered::New) => {
                d.fresh.insert(binding.node());
                Ok(())
            }
            Ok(Registered::Known) => Ok(()),
            Err(e) => Err(Refusal::new(NackCode::Busy, e.to_string())),
        }
    }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An online device: its cell, its link's outbox, the pushed envelopes it has not
/// acknowledged (copies, each with its sender), and the task that hands it what the store
/// holds for it.
struct Online {
    cell: CellId,
    /// Whether the link said RECEIVE: until then it is handed only answers (REPLY, RESET)
    /// and its queue is not drained to it.
    receiving: bool,
    outbox: Outbox,
    in_flight: HashMap<MsgId, (NodeId, Bytes), foldhash::fast::RandomState>,
    backlog: Arc<Notify>,
    drain: JoinHandle<()>,
}

/// Records for one device produced while handling one batch, encoded as they come.
#[derive(Default)]
struct Outgoing {
    payloads: Vec<Bytes>,
    /// Bytes in `payloads`.
    full: usize,
    buf: Vec<u8>,
}

impl Outgoing {
    /// Encodes `r`; returns the bytes it added.
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

    fn finish(mut self) -> Vec<Bytes> {
        if !self.buf.is_empty() {
            self.payloads.push(Bytes::from(self.buf));
        }
        self.payloads
    }
}

/// What one batch writes, per device, and how many bytes that is in all.
#[derive(Default)]
struct Out {
    to: HashMap<NodeId, Outgoing, foldhash::fast::RandomState>,
    bytes: usize,
}

impl Out {
    fn push(&mut self, to: NodeId, r: &Record) {
        self.bytes += self.to.entry(to).or_default().push(r);
    }
}

/// The bytes the relay holds for devices outside its [`ByteBudget`], read by the loop and
/// by the drains.
#[derive(Clone)]
struct Memory {
    /// In every device's outbox.
    waiting: Arc<AtomicUsize>,
    /// In the links' command queues (the node's count).
    queued: Arc<AtomicUsize>,
    /// The budget's total, as of the loop's last batch (for the drains).
    in_flight: Arc<AtomicUsize>,
    /// [`ByteLimits::total`].
    total: usize,
}

impl Memory {
    /// Written for devices and not taken by their links.
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed) + self.queued.load(Ordering::Relaxed)
    }

    /// Whether the relay holds its whole bound or more.
    fn full(&self) -> bool {
        self.waiting() + self.in_flight.load(Ordering::Relaxed) >= self.total
    }
}

/// A LOOKUP waiting for its cell's rate.
struct Deferred {
    from: NodeId,
    from_cell: CellId,
    request: u32,
    cell: CellId,
}

/// Counts for the next [`RelaySummary`].
#[derive(Default)]
struct Period {
    started: Option<cellmesh_core::Instant>,
    stats: RelayStats,
    refusals: HashMap<u8, (RefuseCode, u64)>,
    joins: u64,
    new_devices: u64,
    joins_refused: u64,
}

struct Loop {
    node: Node,
    store: Arc<Store>,
    registrations: Arc<Mutex<Directory>>,
    online: HashMap<NodeId, Online, foldhash::fast::RandomState>,
    /// FORWARDs and LOOKUPs per sending cell.
    forwards: Buckets<CellId>,
    lookups: Buckets<CellId>,
    /// LOOKUPs over their rate, in arrival order, and how many each device has there.
    deferred: VecDeque<Deferred>,
    deferred_by: HashMap<NodeId, usize>,
    /// Pushed envelopes not yet DELIVERED.
    budget: ByteBudget,
    memory: Memory,
    events: broadcast::Sender<RelayEvent>,
    stats: Arc<Mutex<RelayStats>>,
    /// Counted during one batch, added to `stats` at its end.
    tally: RelayStats,
    period: Period,
    /// The clock, read once per batch.
    now: cellmesh_core::Instant,
    /// Whether per-envelope events are made in this batch (asked for, and someone listens).
    watched: bool,
    /// Devices that left, in order of leaving, each with how many messages of the inbox are
    /// still to be handled before its departure: those that were there when it left, its
    /// last ones among them (see [`Node::inbox_len`]).
    leaving: VecDeque<(usize, NodeId)>,
    /// Devices this relay disconnected for misbehaving, until they join again: of what they
    /// sent before, only DELIVERED still counts (a flood already in the inbox is not
    /// worked through; anything else they meant, they send again). The last MAX_DROPPED.
    dropped: HashSet<NodeId>,
    dropped_order: VecDeque<NodeId>,
    config: RelayConfig,
}

/// What one batch of FORWARDs for offline devices waits on: the store.
struct ToStore {
    from: NodeId,
    to: NodeId,
    id: MsgId,
    envelope: Bytes,
}

impl Loop {
    async fn run(mut self, mut node_events: broadcast::Receiver<NodeEvent>, stop: Arc<Notify>) {
        let mut batch = Vec::with_capacity(256);
        let mut expiry = tokio::time::interval(Duration::from_secs(60));
        // Registrations are swept a few times per time to live, at most hourly.
        let sweep_every = Duration::from_secs(self.config.registrations.ttl_secs / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.tick().await;
        let every = self
            .config
            .summary_every
            .unwrap_or(Duration::from_secs(3600));
        let mut summary = tokio::time::interval(every.max(Duration::from_millis(10)));
        summary.tick().await;
        self.period.started = Some(crate::node::now());
        loop {
            tokio::select! {
                // Joins before records: a device's join is announced before its ACK is sent,
                // so whatever anyone sends after seeing it joined finds it registered.
                biased;
                _ = stop.notified() => break,
                ev = node_events.recv() => match ev {
                    Ok(NodeEvent::Joined(peer)) => self.joined(&peer).await,
                    // Records the device sent before it left may still be in the inbox (its
                    // last DELIVERED above all): they are handled first.
                    Ok(NodeEvent::Left { peer, .. }) => match self.node.inbox_len() {
                        0 => self.left(peer.node).await,
                        ahead => self.leaving.push_back((ahead, peer.node)),
                    },
                    Ok(NodeEvent::JoinRefused { node, cell, code, reason, by_peer: false, .. }) => {
                        self.period.joins_refused += 1;
                        let _ = self.events.send(RelayEvent::JoinRefused { cell, node, code, reason });
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "relay lagged behind node events; resyncing");
                        self.resync().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                n = self.node.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch).await;
                    self.departures(n).await;
                }
                _ = tokio::time::sleep(Duration::from_millis(20)), if !self.deferred.is_empty() => {
                    self.now = crate::node::now();
                    let mut out = Out::default();
                    self.answer_deferred(&mut out).await;
                    self.write_out(out);
                }
                _ = expiry.tick() => {
                    let store = Arc::clone(&self.store);
                    let now = crate::now();
                    match tokio::task::spawn_blocking(move || store.expire(now)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(expired = n, "expired queued envelopes"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "expiring queued envelopes failed"),
                        _ => {}
                    }
                }
                _ = sweep.tick() => self.sweep_registrations().await,
                _ = summary.tick(), if self.config.summary_every.is_some() => self.summarise(),
            }
        }
        let devices: Vec<NodeId> = self.online.keys().copied().collect();
        for d in devices {
            self.left(d).await;
        }
        self.node.shutdown(Duration::from_secs(2)).await;
    }

    /// Handles the departures whose last messages were among the `handled` just handled.
    async fn departures(&mut self, handled: usize) {
        for l in &mut self.leaving {
            l.0 = l.0.saturating_sub(handled);
        }
        while let Some(&(0, node)) = self.leaving.front() {
            self.leaving.pop_front();
            self.left(node).await;
        }
    }

    async fn joined(&mut self, peer: &PeerInfo) {
        let (node, cell, addr) = (peer.node, peer.cell, peer.addr);
        // Back before its departure was handled: the new connection replaces the old below.
        self.leaving.retain(|l| l.1 != node);
        if self.dropped.remove(&node) {
            self.dropped_order.retain(|n| *n != node);
        }
        self.period.joins += 1;
        // The join's check registered it (or found it registered). A peer that got in
        // without it (one the relay dialed) is registered here if there is room.
        let now = crate::now();
        let new = {
            let mut d = lock(&self.registrations);
            d.fresh.remove(&node)
                || matches!(d.registrations.join(cell, node, now), Ok(Registered::New))
        };
        if new {
            self.period.new_devices += 1;
        }
        // Recorded from the event, which carries the tokens: the device may have left
        // already, and must still be known.
        let store = Arc::clone(&self.store);
        let (nt, id) = (
            peer.binding.node_token().token().to_bytes(),
            peer.binding.identity().token().to_bytes(),
        );
        let put =
            tokio::task::spawn_blocking(move || store.put_device(cell, node, &nt, &id, now)).await;
        if !matches!(put, Ok(Ok(()))) {
            tracing::warn!(%node, "could not record device in the directory");
        }
        let Ok(sender) = self.node.sender(node) else {
            return;
        };
        if let Some(old) = self.online.remove(&node) {
            old.drain.abort();
            self.persist_in_flight(node, old.cell, old.in_flight).await;
        }
        // Drained once the link says RECEIVE.
        let backlog = Arc::new(Notify::new());
        let drain = tokio::spawn(drain(
            node,
            sender.clone(),
            Arc::clone(&self.store),
            Arc::clone(&backlog),
            self.events.clone(),
            self.memory.clone(),
            self.config.outlet_bytes,
        ));
        self.online.insert(
            node,
            Online {
                cell,
                receiving: false,
                outbox: Outbox::counted(sender, Arc::clone(&self.memory.waiting)),
                in_flight: HashMap::default(),
                backlog,
                drain,
            },
        );
        let _ = self.events.send(RelayEvent::Registered {
            cell,
            node,
            addr,
            new,
        });
    }

    async fn left(&mut self, node: NodeId) {
        if let Some(online) = self.online.remove(&node) {
            online.drain.abort();
            lock(&self.registrations)
                .registrations
                .seen(node, crate::now());
            self.persist_in_flight(node, online.cell, online.in_flight)
                .await;
            let _ = self.events.send(RelayEvent::Offline { node });
        }
    }

    /// Moves what was pushed to `node` but not acknowledged into the store.
    async fn persist_in_flight(
        &mut self,
        node: NodeId,
        cell: CellId,
        in_flight: HashMap<MsgId, (NodeId, Bytes), foldhash::fast::RandomState>,
    ) {
        let items: Vec<(MsgId, (NodeId, Bytes))> = in_flight.into_iter().collect();
        if items.is_empty() {
            return;
        }
        let held: usize = items
            .iter()
            .map(|(_, (_, e))| e.len() + IN_FLIGHT_OVERHEAD)
            .sum();
        self.budget.release(node, cell, held);
        self.memory
            .in_flight
            .store(self.budget.total(), Ordering::Relaxed);
        let store = Arc::clone(&self.store);
        let n = items.len();
        let done = tokio::task::spawn_blocking(move || {
            let batch: Vec<NewMessage<'_>> = items
                .iter()
                .map(|(id, (from, env))| NewMessage {
                    to: node,
                    id: *id,
                    from: *from,
                    envelope: env,
                })
                .collect();
            let results = store.enqueue(crate::now(), &batch);
            drop(batch);
            (items, results)
        })
        .await;
        let Ok((items, results)) = done else {
            tracing::warn!(%node, count = n, "could not keep unacknowledged envelopes");
            return;
        };
        tracing::debug!(%node, count = n, "kept unacknowledged envelopes for later");
        // Their senders were told `pushed`; now they are queued.
        let mut out = Out::default();
        for ((id, (from, _)), result) in items.into_iter().zip(results) {
            if result.is_ok() && self.online.contains_key(&from) {
                out.push(
                    from,
                    &Record::Accepted {
                        to: node,
                        id,
                        status: Accepted::Queued,
                    },
                );
            }
        }
        self.write_out(out);
    }

    async fn resync(&mut self) {
        let peers: BTreeSet<NodeId> = self.node.peers().iter().map(|p| p.node).collect();
        let gone: Vec<NodeId> = self
            .online
            .keys()
            .filter(|n| !peers.contains(n))
            .copied()
            .collect();
        for n in gone {
            self.left(n).await;
        }
        for p in self.node.peers() {
            if !self.online.contains_key(&p.node) {
                self.joined(&p).await;
            }
        }
    }

    /// Drops registrations not seen for their time to live (and their queues), after
    /// recording that every online device was seen now.
    async fn sweep_registrations(&mut self) {
        let now = crate::now();
        let online: Vec<(CellId, NodeId)> = self.online.iter().map(|(n, o)| (o.cell, *n)).collect();
        let expired = {
            let mut d = lock(&self.registrations);
            let regs = &mut d.registrations;
            for (_, n) in &online {
                regs.seen(*n, now);
            }
            let expired = regs.expired(now, |n| self.online.contains_key(&n));
            for (_, n) in &expired {
                regs.remove(*n);
            }
            // A join the loop never saw (its event lost) leaves nothing behind for long.
            d.fresh.clear();
            expired
        };
        let store = Arc::clone(&self.store);
        let devices = expired.len();
        let done = tokio::task::spawn_blocking(move || {
            store.touch_devices(&online, now)?;
            store.forget_devices(&expired)
        })
        .await;
        match done {
            Ok(Ok(messages)) if devices > 0 => {
                let _ = self.events.send(RelayEvent::Expired { devices, messages });
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweeping registrations failed"),
            Err(e) => tracing::error!(error = %e, "store task failed"),
        }
    }

    fn summarise(&mut self) {
        let now = crate::node::now();
        let p = std::mem::take(&mut self.period);
        self.period.started = Some(now);
        let period = p.started.map_or(Duration::ZERO, |s| {
            Duration::from_millis(now.millis_since(s))
        });
        let mut refusals: Vec<(RefuseCode, u64)> = p.refusals.into_values().collect();
        refusals.sort_by_key(|(c, _)| c.code());
        let summary = RelaySummary {
            period,
            stats: p.stats,
            refusals,
            joins: p.joins,
            new_devices: p.new_devices,
            joins_refused: p.joins_refused,
            online: self.online.len(),
            registered: lock(&self.registrations).registrations.len(),
            in_flight_bytes: self.budget.total(),
            waiting_bytes: self.memory.waiting(),
        };
        let _ = self.events.send(RelayEvent::Summary(summary));
    }

    async fn handle(&mut self, batch: &mut Vec<Incoming>) {
        self.now = crate::node::now();
        self.watched = self.config.envelope_events && self.events.receiver_count() > 0;
        let mut out = Out::default();
        let mut to_store = Vec::new();
        for incoming in batch.drain(..) {
            let from = incoming.from;
            for record in records(incoming.data) {
                let Ok(record) = record else {
                    // Every FORWARD before it was answered; after it, nothing can be trusted
                    // to be framed right: the device is disconnected and will send again.
                    tracing::info!(%from, "malformed relay record; disconnecting the device");
                    self.drop_device(from, "malformed relay record");
                    break;
                };
                if self.dropped.contains(&from) && !matches!(record, Record::Delivered(_)) {
                    continue;
                }
                self.record(from, incoming.cell, record, &mut out, &mut to_store)
                    .await;
            }
        }
        if !to_store.is_empty() {
            self.store_batch(to_store, &mut out).await;
        }
        self.write_out(out);
        self.memory
            .in_flight
            .store(self.budget.total(), Ordering::Relaxed);
        let t = std::mem::take(&mut self.tally);
        self.period.stats.add(&t);
        lock(&self.stats).add(&t);
    }

    async fn record(
        &mut self,
        from: NodeId,
        from_cell: CellId,
        record: Record,
        out: &mut Out,
        to_store: &mut Vec<ToStore>,
    ) {
        match record {
            Record::Lookup { request, cell } => {
                let d = Deferred {
                    from,
                    from_cell,
                    request,
                    cell,
                };
                if self.lookups.take(from_cell, self.now) {
                    self.lookup(d, out).await;
                } else {
                    self.defer(d);
                }
            }
            Record::Forward { to, id, envelope } => {
                let online = self.online.contains_key(&to);
                let refuse = if envelope.len() > MAX_ENVELOPE {
                    Some(RefuseCode::TooLarge)
                } else if !online && !lock(&self.registrations).registrations.contains(to) {
                    Some(RefuseCode::UnknownDevice)
                } else if !self.forwards.take(from_cell, self.now) {
                    Some(RefuseCode::RateLimited)
                } else {
                    None
                };
                if let Some(code) = refuse {
                    self.refused(from, to, id, code, out);
                    return;
                }
                let bytes = envelope.len();
                // Pushed only within the device's outlet and the memory bounds (the copy kept
                // until DELIVERED, against the device, its cell and the relay, with all that
                // waits for links); the rest go to the (bounded) queue.
                let elsewhere = self.memory.waiting() + out.bytes;
                // A link that takes no messages (a one-shot send) is handed only answers to
                // what it sent; a message for its device waits in the queue.
                let takes = |o: &Online| o.receiving || cellmesh_core::e2e::is_answer(&envelope);
                if let Some(online) = self.online.get_mut(&to).filter(|o| takes(o)) {
                    let outgoing = out.to.entry(to).or_default();
                    match online.in_flight.get(&id) {
                        // A retry of one still in flight: it is on its way already.
                        Some((sender, copy)) if *sender == from && copy[..] == envelope[..] => {
                            self.accepted(from, to, id, bytes, Accepted::Pushed, out);
                            return;
                        }
                        // Sealed again (its device lost the session of the copy in flight):
                        // this one is pushed too, and kept in its place.
                        Some((sender, copy)) if *sender == from => {
                            let freed = copy.len() + IN_FLIGHT_OVERHEAD;
                            self.budget.release(to, online.cell, freed);
                            online.in_flight.remove(&id);
                            if self.budget.charge(
                                to,
                                online.cell,
                                bytes + IN_FLIGHT_OVERHEAD,
                                elsewhere,
                            ) {
                                out.bytes += outgoing.push(&Record::Deliver {
                                    from,
                                    id,
                                    envelope: envelope.clone(),
                                });
                                online
                                    .in_flight
                                    .insert(id, (from, Bytes::copy_from_slice(&envelope)));
                                self.accepted(from, to, id, bytes, Accepted::Pushed, out);
                                return;
                            }
                        }
                        // The same id from another sender waits in the store.
                        Some(_) => {}
                        None if online.outbox.backlog() + outgoing.len()
                            < self.config.outlet_bytes
                            && self.budget.charge(
                                to,
                                online.cell,
                                bytes + IN_FLIGHT_OVERHEAD,
                                elsewhere,
                            ) =>
                        {
                            out.bytes += outgoing.push(&Record::Deliver {
                                from,
                                id,
                                envelope: envelope.clone(),
                            });
                            // A copy: the envelope shares the buffer of the whole frame it
                            // came in, which the relay must not keep for it.
                            online
                                .in_flight
                                .insert(id, (from, Bytes::copy_from_slice(&envelope)));
                            self.accepted(from, to, id, bytes, Accepted::Pushed, out);
                            return;
                        }
                        None => {}
                    }
                    if online.receiving {
                        online.backlog.notify_one();
                    }
                }
                to_store.push(ToStore {
                    from,
                    to,
                    id,
                    envelope,
                });
            }
            Record::Revoke {
                request,
                revocation,
            } => {
                let result = self.revoke(from, from_cell, &revocation, out).await;
                out.push(from, &Record::Revoked { request, result });
            }
            Record::Receive => {
                if let Some(online) = self.online.get_mut(&from)
                    && !online.receiving
                {
                    online.receiving = true;
                    online.backlog.notify_one();
                }
            }
            Record::Delivered(ids) => {
                if let Some(online) = self.online.get_mut(&from) {
                    let mut freed = 0;
                    for id in &ids {
                        if let Some((_, env)) = online.in_flight.remove(id) {
                            freed += env.len() + IN_FLIGHT_OVERHEAD;
                        }
                    }
                    self.budget.release(from, online.cell, freed);
                }
                if self.store.queued(from).0 > 0 {
                    let store = Arc::clone(&self.store);
                    let removed =
                        tokio::task::spawn_blocking(move || store.remove(from, &ids)).await;
                    if !matches!(removed, Ok(Ok(_))) {
                        tracing::warn!(%from, "could not delete acknowledged envelopes");
                    }
                    if let Some(online) = self.online.get(&from)
                        && online.receiving
                        && self.store.queued(from).0 > 0
                    {
                        online.backlog.notify_one();
                    }
                }
            }
            _ => {
                tracing::info!(%from, "device sent a relay's record; disconnecting it");
                self.drop_device(from, "relay-only record");
            }
        }
    }

    /// A REVOKE from `from`: decided by the core's [`RelayRevocations`]; one kept is made
    /// durable with the device's registration and queue dropped, and then the device is cut
    /// off. Returns what REVOKED says.
    async fn revoke(
        &mut self,
        from: NodeId,
        from_cell: CellId,
        revocation: &Token,
        out: &mut Out,
    ) -> Result<(), RefuseCode> {
        let offered = {
            let mut d = lock(&self.registrations);
            let Directory {
                registrations,
                revocations,
                ..
            } = &mut *d;
            revocations.offer(from_cell, revocation, registrations, self.now)
        };
        let r = match offered {
            Ok(Offered::Known) => return Ok(()),
            Ok(Offered::New(r)) => r,
            Err(e) => {
                tracing::info!(%from, code = e.code().name(), reason = %e, "revocation refused");
                let _ = self.events.send(RelayEvent::RevokeRefused {
                    by: from,
                    code: e.code(),
                    reason: e.to_string(),
                });
                return Err(e.code());
            }
        };
        let (cell, node) = (r.cell(), r.node());
        let store = Arc::clone(&self.store);
        let bytes = r.token().to_bytes();
        let kept = tokio::task::spawn_blocking(move || store.revoke(cell, node, &bytes)).await;
        let messages = match kept {
            Ok(Ok(messages)) => messages,
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(_)) => String::new(),
                };
                tracing::warn!(%node, %reason, "could not keep a revocation");
                lock(&self.registrations).revocations.remove(cell, node);
                let _ = self.events.send(RelayEvent::RevokeRefused {
                    by: from,
                    code: RefuseCode::Unavailable,
                    reason,
                });
                return Err(RefuseCode::Unavailable);
            }
        };
        {
            let mut d = lock(&self.registrations);
            d.registrations.remove(node);
            d.fresh.remove(&node);
        }
        // What was pushed to it and not taken goes with it, not to the store; nothing more
        // of this batch is written to it.
        if let Some(online) = self.online.remove(&node) {
            online.drain.abort();
            let held: usize = online
                .in_flight
                .values()
                .map(|(_, e)| e.len() + IN_FLIGHT_OVERHEAD)
                .sum();
            self.budget.release(node, online.cell, held);
        }
        out.bytes = out
            .bytes
            .saturating_sub(out.to.remove(&node).map_or(0, |o| o.len()));
        self.leaving.retain(|l| l.1 != node);
        if from == node {
            // A device that revoked itself (`revoke-device --force`) hears the answer on its
            // link, which it then closes: closing it here could overtake the answer. Until
            // then nothing it sends counts but DELIVERED, and nothing is forwarded to it.
            if self.dropped.insert(node) {
                self.dropped_order.push_back(node);
            }
        } else {
            self.node.disconnect(node, "revoked by its cell");
        }
        tracing::info!(%cell, %node, %from, messages, "device revoked");
        let _ = self.events.send(RelayEvent::Revoked {
            cell,
            node,
            by: from,
            messages,
        });
        Ok(())
    }

    /// Queues a LOOKUP over its cell's rate, or disconnects its device if it has too many
    /// waiting (or the relay does).
    fn defer(&mut self, d: Deferred) {
        let mine = self.deferred_by.entry(d.from).or_insert(0);
        if *mine >= MAX_DEFERRED_PER_DEVICE || self.deferred.len() >= MAX_DEFERRED {
            let from = d.from;
            tracing::info!(%from, "too many LOOKUPs waiting; disconnecting the device");
            self.drop_device(from, "too many LOOKUPs");
            return;
        }
        *mine += 1;
        self.deferred.push_back(d);
    }

    /// Answers the waiting LOOKUPs whose cells have a token now, in order.
    async fn answer_deferred(&mut self, out: &mut Out) {
        let mut keep = VecDeque::with_capacity(self.deferred.len());
        // A cell out of tokens stays out for this pass: its later LOOKUPs keep their order.
        let mut out_of_tokens: HashSet<CellId> = HashSet::new();
        while let Some(d) = self.deferred.pop_front() {
            if self.dropped.contains(&d.from) || !self.online.contains_key(&d.from) {
                self.undefer(d.from);
                continue;
            }
            if out_of_tokens.contains(&d.from_cell) || !self.lookups.take(d.from_cell, self.now) {
                out_of_tokens.insert(d.from_cell);
                keep.push_back(d);
                continue;
            }
            self.undefer(d.from);
            self.lookup(d, out).await;
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

    async fn lookup(&mut self, d: Deferred, out: &mut Out) {
        let store = Arc::clone(&self.store);
        let cell = d.cell;
        let revocations = lock(&self.registrations).revocations.of_cell(cell);
        let registry = Arc::clone(&self.registrations);
        let devices = tokio::task::spawn_blocking(move || store.devices(cell))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(nt, id)| {
                Some(DirectoryEntry {
                    node_token: Token::decode(&nt).ok()?,
                    identity: Token::decode(&id).ok()?,
                })
            })
            // A device revoked since its row was read is not listed beside its revocation.
            .filter(|e| {
                let node = NodeId::from_key(e.node_token.claims().key);
                !lock(&registry).revocations.is_revoked(cell, node)
            })
            .take(cellmesh_core::relay::MAX_DEVICES)
            .collect();
        out.push(
            d.from,
            &Record::Directory {
                request: d.request,
                cell,
                devices,
                revocations,
            },
        );
    }

    async fn store_batch(&mut self, items: Vec<ToStore>, out: &mut Out) {
        let store = Arc::clone(&self.store);
        let now = crate::now();
        let (items, results) = match tokio::task::spawn_blocking(move || {
            let batch: Vec<NewMessage<'_>> = items
                .iter()
                .map(|m| NewMessage {
                    to: m.to,
                    id: m.id,
                    from: m.from,
                    envelope: &m.envelope,
                })
                .collect();
            let results = store.enqueue(now, &batch);
            drop(batch);
            (items, results)
        })
        .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "store task failed");
                return;
            }
        };
        for (m, result) in items.into_iter().zip(results) {
            match result {
                Ok(Enqueued::Stored | Enqueued::Duplicate | Enqueued::Replaced) => {
                    self.accepted(m.from, m.to, m.id, m.envelope.len(), Accepted::Queued, out);
                    if let Some(online) = self.online.get(&m.to).filter(|o| o.receiving) {
                        online.backlog.notify_one();
                    }
                }
                Err(e) => self.refused(m.from, m.to, m.id, e.refuse_code(), out),
            }
        }
    }

    fn accepted(
        &mut self,
        from: NodeId,
        to: NodeId,
        id: MsgId,
        bytes: usize,
        status: Accepted,
        out: &mut Out,
    ) {
        match status {
            Accepted::Pushed => self.tally.pushed += 1,
            Accepted::Queued => self.tally.queued += 1,
        }
        self.tally.bytes += bytes as u64;
        if self.watched {
            let _ = self.events.send(RelayEvent::Forwarded {
                from,
                to,
                id,
                bytes,
                status,
            });
        }
        out.push(from, &Record::Accepted { to, id, status });
    }

    fn refused(&mut self, from: NodeId, to: NodeId, id: MsgId, code: RefuseCode, out: &mut Out) {
        self.tally.refused += 1;
        self.period
            .refusals
            .entry(code.code())
            .or_insert((code, 0))
            .1 += 1;
        if self.watched {
            let _ = self.events.send(RelayEvent::Refused { from, id, code });
        }
        out.push(from, &Record::Refused { to, id, code });
    }

    /// Writes what one batch produced, device by device, without waiting: an online device
    /// gets it through its outbox (straight into its link when that has room). A device with
    /// more than twice `outlet_bytes` waiting is not reading what it asked for, and when the
    /// relay holds more than its bound the device with the most waiting is the one to go:
    /// either is disconnected, and its departure keeps what was pushed to it.
    fn write_out(&mut self, out: Out) {
        for (to, outgoing) in out.to {
            let payloads = outgoing.finish();
            if payloads.is_empty() {
                continue;
            }
            if let Some(online) = self.online.get(&to) {
                for p in payloads {
                    online.outbox.send(p);
                }
                let waiting = online.outbox.backlog();
                if waiting > 2 * self.config.outlet_bytes {
                    tracing::warn!(%to, waiting, "device does not read what it is sent; disconnecting");
                    self.drop_device(to, "does not read what it is sent");
                }
                continue;
            }
            // Not (or no longer) online here: never wait on its link in this loop.
            if let Ok(sender) = self.node.sender(to) {
                tokio::spawn(async move {
                    for p in payloads {
                        if sender.send(p).await.is_err() {
                            break;
                        }
                    }
                });
            }
        }
        let over = self.memory.waiting() + self.budget.total();
        if over > self.memory.total + self.config.outlet_bytes {
            let heaviest = self
                .online
                .iter()
                .filter(|(n, _)| !self.dropped.contains(n))
                .max_by_key(|(_, o)| o.outbox.backlog())
                .map(|(n, o)| (*n, o.outbox.backlog()));
            if let Some((node, waiting)) = heaviest
                && waiting > 0
            {
                tracing::warn!(%node, waiting, held = over, "relay over its memory bound; disconnecting the device with most waiting");
                self.drop_device(node, "the relay is over its memory bound");
            }
        }
    }

    /// Disconnects a misbehaving device (see `dropped`).
    fn drop_device(&mut self, node: NodeId, reason: &'static str) {
        if !self.node.disconnect(node, reason) {
            return;
        }
        let _ = self.events.send(RelayEvent::Disconnected { node, reason });
        if self.dropped.insert(node) {
            self.dropped_order.push_back(node);
            if self.dropped_order.len() > MAX_DROPPED
                && let Some(old) = self.dropped_order.pop_front()
            {
                self.dropped.remove(&old);
            }
        }
    }
}

/// Hands one online device what the store holds for it whenever told there is a backlog,
/// up to 1,024 envelopes and a quarter of `outlet` at a time, and only while its link has
/// taken most of what it was given and the relay is within its memory bound (what it drains
/// needs no order with what is pushed live).
async fn drain(
    node: NodeId,
    sender: PeerSender,
    store: Arc<Store>,
    backlog: Arc<Notify>,
    events: broadcast::Sender<RelayEvent>,
    memory: Memory,
    outlet: usize,
) {
    // By id, sender and the envelope's last 16 bytes (its AEAD tag): a copy sealed anew that
    // took an old one's place in the queue is handed too.
    let mut drained: BTreeSet<(MsgId, NodeId, [u8; 16])> = BTreeSet::new();
    let chunk = (outlet / 4).max(1);
    loop {
        backlog.notified().await;
        while sender.queued_bytes() >= outlet / 2 || memory.full() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let st = Arc::clone(&store);
        let Ok(Ok(pending)) =
            tokio::task::spawn_blocking(move || st.pending(node, crate::now(), 1024, chunk)).await
        else {
            continue;
        };
        let more = pending.len() == 1024
            || pending.iter().map(|q| q.envelope.len()).sum::<usize>() >= chunk;
        // Only those still queued are remembered: the set stays as small as the queue.
        let key = |q: &crate::store::Queued| {
            let mut tag = [0u8; 16];
            let tail = &q.envelope[q.envelope.len().saturating_sub(16)..];
            tag[..tail.len()].copy_from_slice(tail);
            (q.id, q.from, tag)
        };
        drained.retain(|k| pending.iter().any(|q| key(q) == *k));
        let fresh: Vec<_> = pending
            .into_iter()
            .filter(|q| drained.insert(key(q)))
            .collect();
        // Nothing new: what was read waits for DELIVERED, which wakes this again.
        if fresh.is_empty() {
            continue;
        }
        let count = fresh.len();
        let records = fresh.into_iter().map(|q| Record::Deliver {
            from: q.from,
            id: q.id,
            envelope: q.envelope,
        });
        for payload in batch_payloads(records) {
            if sender.send(payload).await.is_err() {
                return;
            }
        }
        let _ = events.send(RelayEvent::Drained { node, count });
        if more {
            backlog.notify_one();
        }
    }
}
