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

use cellmesh_core::Instant;
use cellmesh_core::connection::{Authorization, JoinPolicy, Refusal};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::limits::{ByteLimits, Rate, RegistrationLimits, RegistrationRefused};
use cellmesh_core::relay::server::{
    Action, OpId, Outlets, RelayServer, ServerConfig, ServerEvent, StoreOp, StoreResult,
};
use cellmesh_core::revoked::RevocationLimits;
use cellmesh_core::token::Token;
use cellmesh_core::wire::NackCode;
use thiserror::Error;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::node::{Incoming, JoinCheck, Node, NodeConfig, NodeEvent, PeerInfo, StartError};
use crate::outbox::Outbox;
use crate::store::{Store, StoreError, StoreLimits};

/// Counters since start: envelopes pushed, queued, refused, and the bytes accepted.
pub use cellmesh_core::relay::server::Stats as RelayStats;

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
    /// in the store, and the device with the most waiting is disconnected. Envelopes on
    /// their way to the store (handed to its thread, not yet committed) are held too, up to
    /// a quarter of `total` (at least one envelope): past it a FORWARD for the store is
    /// refused `unavailable` and its sender retries, so a slow disk does not grow memory.
    /// Defaults (see
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

/// Something the relay did, for operators (and for the demo, to show what a relay sees): the
/// relay server machine's own events. Per-envelope ones ([`RelayEvent::Forwarded`],
/// [`RelayEvent::Refused`]), which name who sends to whom, are made only with
/// [`RelayConfig::envelope_events`].
pub use cellmesh_core::relay::server::ServerEvent as RelayEvent;

/// Counts over one period, for [`RelayEvent::Summary`] (see [`RelayConfig::summary_every`]):
/// no device or message is named.
pub use cellmesh_core::relay::server::Summary as RelaySummary;

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
        let server = RelayServer::new(
            server_config(&config),
            crate::clock::now(),
            store.registered()?,
            store.queued_devices(),
        );
        let mut server = server;
        for bytes in store.revocations()? {
            let loaded = Token::decode(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| server.load_revocation(&t).map_err(|e| e.to_string()));
            if let Err(error) = loaded {
                tracing::warn!(%error, "a stored revocation does not verify; ignored");
            }
        }
        let server = Arc::new(Mutex::new(server));
        config.node.listen = config.listen.clone();
        config.node.tls = config.tls.clone();
        // Devices need no list of each other, and a join must not cost every device a message.
        config.node.announce_joins = false;
        config.node.admit = Some(registrar(Arc::clone(&server)));
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
        let (store_ops, store_results, store_thread) = store_worker(store)?;
        let relay = Self {
            local_addrs: node.local_addrs().to_vec(),
            node: node.node_id(),
            cell: node.cell(),
            events: events.clone(),
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            task: tokio::spawn(async move {}),
        };
        let state = Loop {
            memory: Memory {
                waiting: Arc::new(AtomicUsize::new(0)),
                queued: node.queued_counter(),
            },
            node,
            server,
            store_ops,
            store_results,
            store_thread,
            outstanding: 0,
            outboxes: HashMap::default(),
            events,
            stats,
            leaving: VecDeque::new(),
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

/// The relay server's decisions as the runtime configures them.
fn server_config(config: &RelayConfig) -> ServerConfig {
    ServerConfig {
        forward_rate: Rate::new(config.rate_per_cell, config.burst_per_cell),
        lookup_rate: config.lookup_rate,
        memory: config.memory,
        outlet_bytes: config.outlet_bytes,
        registrations: config.registrations,
        envelope_events: config.envelope_events,
        summary_every_ms: config
            .summary_every
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        revocations: config.revocations,
    }
}

/// The node's last check on a join: the device must be registered, or fit as a new one.
fn registrar(server: Arc<Mutex<RelayServer>>) -> JoinCheck {
    JoinCheck(Arc::new(move |binding| {
        lock(&server)
            .check_join(crate::clock::now(), binding.cell(), binding.node())
            .map_err(|e| match e {
                RegistrationRefused::Revoked => Refusal::new(
                    NackCode::Revoked,
                    format!("device {} has been revoked by its cell", binding.node()),
                ),
                e => Refusal::new(NackCode::Busy, e.to_string()),
            })
    }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Batches of store operations in, their results out.
type StoreOps = std::sync::mpsc::Sender<Vec<(OpId, StoreOp)>>;
type StoreResults = mpsc::UnboundedReceiver<Vec<(OpId, StoreResult)>>;

/// Runs the store on a thread of its own, off the relay's loop: it takes every batch that
/// waits, carries them out in order with consecutive writes in one transaction (one `fsync`
/// for many, see [`Store::apply`]), and hands back the results. It ends when the loop drops
/// its sender.
fn store_worker(
    store: Arc<Store>,
) -> Result<(StoreOps, StoreResults, std::thread::JoinHandle<()>), RelayError> {
    let (ops_tx, ops_rx) = std::sync::mpsc::channel::<Vec<(OpId, StoreOp)>>();
    let (results_tx, results_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("relay-store".into())
        .spawn(move || {
            while let Ok(mut batch) = ops_rx.recv() {
                while let Ok(more) = ops_rx.try_recv() {
                    batch.extend(more);
                }
                let (ids, ops): (Vec<OpId>, Vec<StoreOp>) = batch.into_iter().unzip();
                let results = store.apply(&ops);
                if results_tx
                    .send(ids.into_iter().zip(results).collect())
                    .is_err()
                {
                    break;
                }
            }
        })
        .map_err(|e| RelayError::Task(format!("cannot start the store's thread: {e}")))?;
    Ok((ops_tx, results_rx, thread))
}

/// The bytes written for devices that their links have not taken.
#[derive(Clone)]
struct Memory {
    /// In every device's outbox.
    waiting: Arc<AtomicUsize>,
    /// In the links' command queues (the node's count).
    queued: Arc<AtomicUsize>,
}

/// What the relay server is told of the links: each online device's outbox, and the totals.
struct Links<'a> {
    outboxes: &'a HashMap<NodeId, Outbox, foldhash::fast::RandomState>,
    memory: &'a Memory,
}

impl Outlets for Links<'_> {
    fn waiting(&self, node: NodeId) -> usize {
        self.outboxes.get(&node).map_or(0, Outbox::backlog)
    }

    fn total(&self) -> usize {
        self.memory.waiting.load(Ordering::Relaxed) + self.memory.queued.load(Ordering::Relaxed)
    }
}

/// The driver of the relay server: sockets (through the node), the outboxes, the store's
/// thread and the clock. It decides nothing.
struct Loop {
    node: Node,
    /// Shared with the join check, which asks it whether a device may register.
    server: Arc<Mutex<RelayServer>>,
    store_ops: StoreOps,
    store_results: StoreResults,
    /// Joined when the loop ends, so that the store is closed when [`Relay::shutdown`]
    /// returns (and a new relay may open it).
    store_thread: std::thread::JoinHandle<()>,
    /// Store operations handed to the thread and not yet answered.
    outstanding: usize,
    outboxes: HashMap<NodeId, Outbox, foldhash::fast::RandomState>,
    memory: Memory,
    events: broadcast::Sender<RelayEvent>,
    stats: Arc<Mutex<RelayStats>>,
    /// Devices that left, in order of leaving, each with how many messages of the inbox are
    /// still to be handled before its departure: those that were there when it left, its
    /// last ones among them (see [`Node::inbox_len`]).
    leaving: VecDeque<(usize, NodeId)>,
}

impl Loop {
    async fn run(mut self, mut node_events: broadcast::Receiver<NodeEvent>, stop: Arc<Notify>) {
        let mut batch = Vec::with_capacity(256);
        let mut results = Vec::new();
        loop {
            let due = lock(&self.server).poll_timeout();
            let wait = due.millis_since(crate::clock::now());
            let timer = tokio::time::sleep(Duration::from_millis(wait));
            tokio::select! {
                // Joins before records: a device's join is announced before its ACK is sent,
                // so whatever anyone sends after seeing it joined finds it registered.
                biased;
                _ = stop.notified() => break,
                ev = node_events.recv() => match ev {
                    Ok(NodeEvent::Joined(peer)) => self.joined(&peer),
                    // Records the device sent before it left may still be in the inbox (its
                    // last DELIVERED above all): they are handled first.
                    Ok(NodeEvent::Left { peer, .. }) => match self.node.inbox_len() {
                        0 => self.left(peer.node),
                        ahead => self.leaving.push_back((ahead, peer.node)),
                    },
                    Ok(NodeEvent::JoinRefused { node, cell, code, reason, by_peer: false, .. }) => {
                        self.with_server(|s, _, _| s.join_refused(cell, node, code, reason));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "relay lagged behind node events; resyncing");
                        self.resync();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                n = self.store_results.recv_many(&mut results, 64) => {
                    if n == 0 {
                        break;
                    }
                    self.store_done(&mut results);
                }
                n = self.node.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch);
                    self.departures(n);
                }
                () = timer => self.with_server(|s, now, links| s.handle_timeout(now, links)),
            }
        }
        self.finish().await;
    }

    /// Stops: what online devices have not acknowledged goes to the store, and the loop
    /// waits (bounded) until the store has it.
    async fn finish(mut self) {
        self.with_server(|s, now, _| s.shutdown(now));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut results = Vec::new();
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline, self.store_results.recv_many(&mut results, 64))
                .await
            {
                Ok(n) if n > 0 => self.store_done(&mut results),
                _ => {
                    tracing::warn!(
                        outstanding = self.outstanding,
                        "relay stopped before its store finished"
                    );
                    break;
                }
            }
        }
        let Self {
            node,
            store_ops,
            store_thread,
            ..
        } = self;
        node.shutdown(Duration::from_secs(2)).await;
        drop(store_ops);
        if tokio::task::spawn_blocking(move || store_thread.join())
            .await
            .is_err()
        {
            tracing::error!("the relay's store thread failed");
        }
    }

    /// Calls the server with the time and the links, then carries out what it asks.
    fn with_server(&mut self, f: impl FnOnce(&mut RelayServer, Instant, &Links<'_>)) {
        let mut actions = Vec::new();
        {
            let mut server = lock(&self.server);
            let links = Links {
                outboxes: &self.outboxes,
                memory: &self.memory,
            };
            server.set_watched(self.events.receiver_count() > 0);
            f(&mut server, crate::clock::now(), &links);
            while let Some(a) = server.poll_action() {
                actions.push(a);
            }
            *lock(&self.stats) = server.stats();
        }
        self.act(actions);
    }

    fn act(&mut self, actions: Vec<Action>) {
        let mut ops = Vec::new();
        for action in actions {
            match action {
                Action::Send { to, payload } => {
                    // A device without an outbox has left (or its link closed as it joined):
                    // what was for it goes as anything on a closed link does, and its mailbox
                    // asks again when it is back.
                    if let Some(outbox) = self.outboxes.get(&to) {
                        outbox.send(payload);
                    }
                }
                Action::Disconnect { node, reason } => {
                    tracing::info!(%node, reason, "disconnecting a device");

                    self.node.disconnect(node, reason);
                }
                Action::Store(id, op) => ops.push((id, op)),
                Action::Event(e) => self.event(e),
            }
        }
        if !ops.is_empty() {
            self.outstanding += ops.len();
            if self.store_ops.send(ops).is_err() {
                tracing::error!("the relay's store thread is gone");
            }
        }
    }

    fn event(&self, e: ServerEvent) {
        match &e {
            ServerEvent::EnvelopesExpired { count } => {
                tracing::info!(expired = count, "expired queued envelopes");
            }
            ServerEvent::StoreFailed { doing, error } => {
                tracing::warn!(doing, %error, "relay store failed");
            }
            _ => {}
        }
        let _ = self.events.send(e);
    }

    fn store_done(&mut self, results: &mut Vec<Vec<(OpId, StoreResult)>>) {
        for batch in results.drain(..) {
            self.outstanding -= batch.len().min(self.outstanding);
            self.with_server(|s, now, links| {
                for (id, result) in batch {
                    s.store_done(now, id, result, links);
                }
            });
        }
    }

    fn handle(&mut self, batch: &mut Vec<Incoming>) {
        self.with_server(|s, now, links| {
            s.records(
                now,
                batch.drain(..).map(|i| (i.from, i.cell, i.data)),
                links,
            );
        });
    }

    /// Handles the departures whose last messages were among the `handled` just handled.
    fn departures(&mut self, handled: usize) {
        for l in &mut self.leaving {
            l.0 = l.0.saturating_sub(handled);
        }
        while let Some(&(0, node)) = self.leaving.front() {
            self.leaving.pop_front();
            self.left(node);
        }
    }

    fn joined(&mut self, peer: &PeerInfo) {
        let node = peer.node;
        // Back before its departure was handled: the new connection replaces the old.
        self.leaving.retain(|l| l.1 != node);
        match self.node.sender(node) {
            Ok(sender) => {
                self.outboxes.insert(
                    node,
                    Outbox::counted(sender, Arc::clone(&self.memory.waiting)),
                );
            }
            // Gone already: registered all the same, and its departure follows.
            Err(_) => {
                self.outboxes.remove(&node);
            }
        }
        let (nt, id) = (
            peer.binding.node_token().token().to_bytes(),
            peer.binding.identity().token().to_bytes(),
        );
        self.with_server(|s, now, _| s.joined(now, peer.cell, node, peer.addr, nt, id));
    }

    fn left(&mut self, node: NodeId) {
        self.with_server(|s, now, _| s.left(now, node));
        self.outboxes.remove(&node);
    }

    /// After missed node events: devices online here that the node no longer has are gone,
    /// and peers the relay has not seen join are joined.
    fn resync(&mut self) {
        let peers = self.node.peers();
        let known: HashSet<NodeId> = peers.iter().map(|p| p.node).collect();
        let gone: Vec<NodeId> = lock(&self.server)
            .online()
            .filter(|n| !known.contains(n))
            .collect();
        for n in gone {
            self.left(n);
        }
        for p in peers {
            if !lock(&self.server).is_online(p.node) {
                self.joined(&p);
            }
        }
    }
}
