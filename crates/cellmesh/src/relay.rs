//! A relay: a node that devices behind NAT join with an outbound connection, which forwards
//! end-to-end envelopes it cannot read and stores them for devices that are offline.
//!
//! ```text
//!  device A ──link──► Node ──inbox──► relay loop ──► outbox(B) ──link──► device B (online)
//!                                        │                  ▲
//!                                        ▼                  │ drain(B): on connect, after a spill
//!                                      Store (redb): directory, queues (device B offline)
//! ```
//!
//! - **Registration** is the join itself: the link already verified the device's node token
//!   and its cell's identity token, and the relay records both in its directory, which any
//!   device can query by cell id (LOOKUP). Askers check the tokens against the id.
//! - **Forwarding.** A FORWARD to an online device is batched with the other records for it
//!   from the same inbox batch and written to its link. Until the device says DELIVERED, the
//!   relay keeps the envelope in memory; if the device leaves first, the envelope moves to the
//!   store. A FORWARD to an offline device, or to one that has too much pushed and not taken
//!   (see Back-pressure), is stored durably (one redb transaction per batch) before the sender
//!   hears ACCEPTED(queued).
//! - **Answers.** Every FORWARD gets exactly one ACCEPTED or REFUSED. Nothing accepted is
//!   dropped silently: a store at its bound refuses with QUEUE_FULL, a sender over its rate
//!   with RATE_LIMITED.
//! - **Back-pressure.** The relay's loop never waits on a device's link: what it writes goes
//!   straight into the link while that has room, and otherwise waits, in order, in the
//!   device's outbox. Deliveries to a device with `outlet_bytes` waiting spill to the store;
//!   a device with twice that waiting (answers to its own FORWARDs that it does not read) is
//!   disconnected.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh_core::connection::{Authorization, JoinPolicy};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::relay::{
    Accepted, DirectoryEntry, MAX_ENVELOPE, MsgId, Record, RefuseCode, put_record, records,
};
use cellmesh_core::token::Token;
use thiserror::Error;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::node::{Incoming, Node, NodeConfig, NodeEvent, PeerInfo, PeerSender, StartError};
use crate::outbox::{MAX_BATCH, Outbox, batch_payloads};
use crate::store::{Enqueued, NewMessage, Store, StoreError, StoreLimits};

/// How long after a device left its departure is handled, so that what it sent just before
/// (already in the inbox) is handled first.
const LEAVE_GRACE: Duration = Duration::from_millis(200);

/// Most envelopes pushed to one online device and not yet DELIVERED; beyond it they queue.
const MAX_IN_FLIGHT: usize = 65_536;

/// Most devices remembered as disconnected for misbehaving (see `Loop::dropped`).
const MAX_DROPPED: usize = 1024;

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
    /// FORWARDs per second each sending cell may make (sustained).
    pub rate_per_cell: u32,
    /// FORWARDs a sending cell may make in a burst.
    pub burst_per_cell: u32,
    /// Bytes written for an online device that its link has not taken yet, beyond which new
    /// envelopes for it go to the store; a device with twice this waiting (its answers keep
    /// coming but it does not read) is disconnected.
    pub outlet_bytes: usize,
    /// TLS on every listener (see [`crate::tls::server_config`]), for standard ports.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The node underneath (its `listen`, `policy` and `tls` are set from the fields above).
    pub node: NodeConfig,
}

impl RelayConfig {
    /// A relay on `listen` storing into `data`, open to all, with default bounds.
    pub fn new(listen: Vec<SocketAddr>, data: PathBuf) -> Self {
        Self {
            listen,
            data,
            allow: None,
            limits: StoreLimits::default(),
            rate_per_cell: 200_000,
            burst_per_cell: 400_000,
            outlet_bytes: 16 << 20,
            tls: None,
            node: NodeConfig::default(),
        }
    }
}

/// Something the relay did, for operators (and for the demo, to show what a relay sees).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayEvent {
    /// A device joined and was recorded in the directory.
    Registered {
        /// Its cell.
        cell: CellId,
        /// The device.
        node: NodeId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A device went offline.
    Offline {
        /// The device.
        node: NodeId,
    },
    /// An envelope was accepted: pushed to its online device, or queued.
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
    /// A FORWARD was refused.
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
        config.node.listen = config.listen.clone();
        config.node.tls = config.tls.clone();
        // Devices need no list of each other, and a join must not cost every device a message.
        config.node.announce_joins = false;
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
        let mut registry = HashMap::new();
        for (cell, device, _) in store.registered()? {
            registry.insert(device, cell);
        }
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
            node,
            store,
            registry,
            online: HashMap::new(),
            buckets: HashMap::new(),
            events,
            stats,
            tally: RelayStats::default(),
            now: Instant::now(),
            watched: false,
            leaving: Vec::new(),
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

/// An online device: its link's outbox, the pushed envelopes it has not acknowledged, and
/// the task that hands it what the store holds for it.
struct Online {
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
    fn push(&mut self, r: &Record) {
        if !self.buf.is_empty() && self.buf.len() + 4 + r.encoded_len() > MAX_BATCH {
            self.full += self.buf.len();
            self.payloads
                .push(Bytes::from(std::mem::take(&mut self.buf)));
        }
        put_record(&mut self.buf, r);
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

type Out = HashMap<NodeId, Outgoing, foldhash::fast::RandomState>;

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Loop {
    node: Node,
    store: Arc<Store>,
    registry: HashMap<NodeId, CellId>,
    online: HashMap<NodeId, Online>,
    buckets: HashMap<CellId, Bucket>,
    events: broadcast::Sender<RelayEvent>,
    stats: Arc<Mutex<RelayStats>>,
    /// Counted during one batch, added to `stats` at its end.
    tally: RelayStats,
    /// The monotonic clock, read once per batch.
    now: Instant,
    /// Whether anyone subscribed to events, read once per batch (it takes a lock).
    watched: bool,
    /// Devices that left, handled after LEAVE_GRACE (in order of leaving).
    leaving: Vec<(tokio::time::Instant, NodeId)>,
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
                    Ok(NodeEvent::Left { peer, .. }) => {
                        self.leaving.push((tokio::time::Instant::now() + LEAVE_GRACE, peer.node));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "relay lagged behind node events; resyncing");
                        self.resync().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                // Before the inbox, which a busy device keeps ready: departures are not put off.
                _ = tokio::time::sleep_until(self.leaving.first().map_or_else(tokio::time::Instant::now, |l| l.0)), if !self.leaving.is_empty() => {
                    let now = tokio::time::Instant::now();
                    let due: Vec<NodeId> = self.leaving.iter().filter(|l| l.0 <= now).map(|l| l.1).collect();
                    self.leaving.retain(|l| l.0 > now);
                    for node in due {
                        self.left(node).await;
                    }
                }
                n = self.node.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch).await;
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
            }
        }
        let devices: Vec<NodeId> = self.online.keys().copied().collect();
        for d in devices {
            self.left(d).await;
        }
        self.node.shutdown(Duration::from_secs(2)).await;
    }

    async fn joined(&mut self, peer: &PeerInfo) {
        let (node, cell, addr) = (peer.node, peer.cell, peer.addr);
        // Back before its departure was handled: the new connection replaces the old below.
        self.leaving.retain(|l| l.1 != node);
        if self.dropped.remove(&node) {
            self.dropped_order.retain(|n| *n != node);
        }
        // Recorded from the event, which carries the tokens: the device may have left
        // already, and must still be known.
        let store = Arc::clone(&self.store);
        let (nt, id) = (
            peer.binding.node_token().token().to_bytes(),
            peer.binding.identity().token().to_bytes(),
        );
        let put = tokio::task::spawn_blocking(move || {
            store.put_device(cell, node, &nt, &id, crate::now())
        })
        .await;
        if !matches!(put, Ok(Ok(()))) {
            tracing::warn!(%node, "could not record device in the directory");
        }
        self.registry.insert(node, cell);
        let Ok(sender) = self.node.sender(node) else {
            return;
        };
        if let Some(old) = self.online.remove(&node) {
            old.drain.abort();
            self.persist_in_flight(node, old.in_flight).await;
        }
        let backlog = Arc::new(Notify::new());
        backlog.notify_one();
        let drain = tokio::spawn(drain(
            node,
            sender.clone(),
            Arc::clone(&self.store),
            Arc::clone(&backlog),
            self.events.clone(),
        ));
        self.online.insert(
            node,
            Online {
                outbox: Outbox::new(sender),
                in_flight: HashMap::default(),
                backlog,
                drain,
            },
        );
        let _ = self
            .events
            .send(RelayEvent::Registered { cell, node, addr });
    }

    async fn left(&mut self, node: NodeId) {
        if let Some(online) = self.online.remove(&node) {
            online.drain.abort();
            self.persist_in_flight(node, online.in_flight).await;
            let _ = self.events.send(RelayEvent::Offline { node });
        }
    }

    /// Moves what was pushed to `node` but not acknowledged into the store.
    async fn persist_in_flight(
        &mut self,
        node: NodeId,
        in_flight: HashMap<MsgId, (NodeId, Bytes), foldhash::fast::RandomState>,
    ) {
        let items: Vec<(MsgId, (NodeId, Bytes))> = in_flight.into_iter().collect();
        if items.is_empty() {
            return;
        }
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
                out.entry(from).or_default().push(&Record::Accepted {
                    to: node,
                    id,
                    status: Accepted::Queued,
                });
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

    async fn handle(&mut self, batch: &mut Vec<Incoming>) {
        self.now = Instant::now();
        self.watched = self.events.receiver_count() > 0;
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
        let t = std::mem::take(&mut self.tally);
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.pushed += t.pushed;
        s.queued += t.queued;
        s.refused += t.refused;
        s.bytes += t.bytes;
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
                let store = Arc::clone(&self.store);
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
                    .take(cellmesh_core::relay::MAX_DEVICES)
                    .collect();
                out.entry(from).or_default().push(&Record::Directory {
                    request,
                    cell,
                    devices,
                });
            }
            Record::Forward { to, id, envelope } => {
                let refuse = if envelope.len() > MAX_ENVELOPE {
                    Some(RefuseCode::TooLarge)
                } else if !self.registry.contains_key(&to) {
                    Some(RefuseCode::UnknownDevice)
                } else if !self.take_token(from_cell) {
                    Some(RefuseCode::RateLimited)
                } else {
                    None
                };
                if let Some(code) = refuse {
                    self.refused(from, to, id, code, out);
                    return;
                }
                let bytes = envelope.len();
                // A device is pushed at most MAX_IN_FLIGHT envelopes it has not said
                // DELIVERED for, and at most `outlet_bytes` its link has not taken: the rest
                // go to its (bounded) queue.
                if let Some(online) = self.online.get_mut(&to) {
                    let outgoing = out.entry(to).or_default();
                    if online.in_flight.len() < MAX_IN_FLIGHT
                        && online.outbox.waiting() + outgoing.len() < self.config.outlet_bytes
                    {
                        outgoing.push(&Record::Deliver {
                            from,
                            id,
                            envelope: envelope.clone(),
                        });
                        online.in_flight.insert(id, (from, envelope));
                        self.accepted(from, to, id, bytes, Accepted::Pushed, out);
                        return;
                    }
                    online.backlog.notify_one();
                }
                to_store.push(ToStore {
                    from,
                    to,
                    id,
                    envelope,
                });
            }
            Record::Delivered(ids) => {
                if let Some(online) = self.online.get_mut(&from) {
                    for id in &ids {
                        online.in_flight.remove(id);
                    }
                }
                if self.store.queued(from).0 > 0 {
                    let store = Arc::clone(&self.store);
                    let removed =
                        tokio::task::spawn_blocking(move || store.remove(from, &ids)).await;
                    if !matches!(removed, Ok(Ok(_))) {
                        tracing::warn!(%from, "could not delete acknowledged envelopes");
                    }
                    if let Some(online) = self.online.get(&from)
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
                Ok(Enqueued::Stored | Enqueued::Duplicate) => {
                    self.accepted(m.from, m.to, m.id, m.envelope.len(), Accepted::Queued, out);
                    if let Some(online) = self.online.get(&m.to) {
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
        out.entry(from)
            .or_default()
            .push(&Record::Accepted { to, id, status });
    }

    fn refused(&mut self, from: NodeId, to: NodeId, id: MsgId, code: RefuseCode, out: &mut Out) {
        self.tally.refused += 1;
        let _ = self.events.send(RelayEvent::Refused { from, id, code });
        out.entry(from)
            .or_default()
            .push(&Record::Refused { to, id, code });
    }

    /// Writes what one batch produced, device by device, without waiting: an online device
    /// gets it through its outbox (straight into its link when that has room). A device with
    /// more than twice `outlet_bytes` waiting is not reading what it asked for: it is
    /// disconnected, and its departure keeps what was pushed to it.
    fn write_out(&mut self, out: Out) {
        for (to, outgoing) in out {
            let payloads = outgoing.finish();
            if payloads.is_empty() {
                continue;
            }
            if let Some(online) = self.online.get(&to) {
                let mut waiting = 0;
                for p in payloads {
                    waiting = online.outbox.send(p);
                }
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
    }

    /// Disconnects a misbehaving device (see `dropped`).
    fn drop_device(&mut self, node: NodeId, reason: &'static str) {
        self.node.disconnect(node, reason);
        if self.dropped.insert(node) {
            self.dropped_order.push_back(node);
            if self.dropped_order.len() > MAX_DROPPED
                && let Some(old) = self.dropped_order.pop_front()
            {
                self.dropped.remove(&old);
            }
        }
    }

    fn take_token(&mut self, cell: CellId) -> bool {
        let (rate, burst) = (
            f64::from(self.config.rate_per_cell),
            f64::from(self.config.burst_per_cell),
        );
        let now = self.now;
        let b = self.buckets.entry(cell).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Hands one online device what the store holds for it whenever told there is a backlog,
/// 1,024 envelopes at a time, waiting for room on its link (what it drains needs no order
/// with what is pushed live).
async fn drain(
    node: NodeId,
    sender: PeerSender,
    store: Arc<Store>,
    backlog: Arc<Notify>,
    events: broadcast::Sender<RelayEvent>,
) {
    let mut drained: BTreeSet<MsgId> = BTreeSet::new();
    loop {
        backlog.notified().await;
        let st = Arc::clone(&store);
        let Ok(Ok(pending)) =
            tokio::task::spawn_blocking(move || st.pending(node, crate::now(), 1024, usize::MAX))
                .await
        else {
            continue;
        };
        // Only ids still queued are remembered: the set stays as small as the queue.
        drained.retain(|id| pending.iter().any(|q| q.id == *id));
        let fresh: Vec<_> = pending
            .into_iter()
            .filter(|q| drained.insert(q.id))
            .collect();
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
        if count == 1024 {
            backlog.notify_one();
        }
    }
}
