//! A relay: a node that devices behind NAT join with an outbound connection, which forwards
//! end-to-end envelopes it cannot read and stores them for devices that are offline.
//!
//! ```text
//!  device A ──link──► Node ──inbox──► relay loop ──► outlet(B) ──link──► device B (online)
//!                                        │  ▲
//!                                        ▼  │ drain on connect / after a spill
//!                                      Store (redb): directory, queues (device B offline)
//! ```
//!
//! - **Registration** is the join itself: the link already verified the device's node token
//!   and its cell's identity token, and the relay records both in its directory, which any
//!   device can query by cell id (LOOKUP). Askers check the tokens against the id.
//! - **Forwarding.** A FORWARD to an online device goes to that device's *outlet*: a bounded
//!   queue and a task that batches records onto its link. Until the device says DELIVERED,
//!   the relay keeps the envelope in memory; if the device leaves first, the envelope moves to
//!   the store. A FORWARD to an offline device, or to one whose outlet is full, is stored
//!   durably (one redb transaction per batch) before the sender hears ACCEPTED(queued).
//! - **Answers.** Every FORWARD gets exactly one ACCEPTED or REFUSED. Nothing accepted is
//!   dropped silently: a store at its bound refuses with QUEUE_FULL, a sender over its rate
//!   with RATE_LIMITED.
//! - **Back-pressure.** Deliveries never wait: an outlet that is full spills to the store.
//!   Answers to a device's own FORWARDs wait for room in its outlet (that slows the device
//!   down); a device that takes none for two seconds is disconnected.

use std::collections::{BTreeSet, HashMap};
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
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::node::{Incoming, Node, NodeConfig, NodeEvent, PeerInfo, PeerSender, StartError};
use crate::store::{Enqueued, NewMessage, Store, StoreError, StoreLimits};

/// How long after a device left its departure is handled, so that what it sent just before
/// (already in the inbox) is handled first.
const LEAVE_GRACE: Duration = Duration::from_millis(200);

/// Most envelopes pushed to one online device and not yet DELIVERED; beyond it they queue.
const MAX_IN_FLIGHT: usize = 65_536;

/// How long the relay waits for room among a device's answers before it disconnects it.
const ANSWER_PATIENCE: Duration = Duration::from_secs(2);

/// Records are batched into link payloads of about this size (a record larger than it goes
/// alone): big enough to amortise framing and encryption, small enough that the buffers are
/// reused from the heap rather than mapped and zeroed by the kernel each time.
const MAX_BATCH: usize = 64 * 1024;

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
    /// Records an online device's outlet holds before new ones spill to the store.
    pub outlet_capacity: usize,
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
            outlet_capacity: 16_384,
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
        for (cell, device) in store.registered()? {
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
            leaving: Vec::new(),
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

/// An online device: its outlet, and the pushed envelopes it has not acknowledged.
struct Online {
    outlet: mpsc::Sender<Record>,
    in_flight: Arc<Mutex<HashMap<MsgId, (NodeId, Bytes)>>>,
    backlog: Arc<Notify>,
    task: JoinHandle<()>,
}

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
    /// Devices that left, handled after LEAVE_GRACE (in order of leaving).
    leaving: Vec<(tokio::time::Instant, NodeId)>,
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
                n = self.node.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.handle(&mut batch).await;
                }
                _ = tokio::time::sleep_until(self.leaving.first().map_or_else(tokio::time::Instant::now, |l| l.0)), if !self.leaving.is_empty() => {
                    let now = tokio::time::Instant::now();
                    let due: Vec<NodeId> = self.leaving.iter().filter(|l| l.0 <= now).map(|l| l.1).collect();
                    self.leaving.retain(|l| l.0 > now);
                    for node in due {
                        self.left(node).await;
                    }
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
        // Recorded from the event, which carries the tokens: the device may have left
        // already, and must still be known.
        let store = Arc::clone(&self.store);
        let (nt, id) = (
            peer.binding.node_token().token().to_bytes(),
            peer.binding.identity().token().to_bytes(),
        );
        let put = tokio::task::spawn_blocking(move || store.put_device(cell, node, &nt, &id)).await;
        if !matches!(put, Ok(Ok(()))) {
            tracing::warn!(%node, "could not record device in the directory");
        }
        self.registry.insert(node, cell);
        let Ok(sender) = self.node.sender(node) else {
            return;
        };
        if let Some(old) = self.online.remove(&node) {
            self.persist_in_flight(node, &old).await;
            old.task.abort();
        }
        let (tx, rx) = mpsc::channel(self.config.outlet_capacity.max(16));
        let in_flight = Arc::new(Mutex::new(HashMap::new()));
        let backlog = Arc::new(Notify::new());
        backlog.notify_one();
        let task = tokio::spawn(outlet(
            node,
            sender,
            rx,
            Arc::clone(&self.store),
            Arc::clone(&backlog),
            self.events.clone(),
        ));
        self.online.insert(
            node,
            Online {
                outlet: tx,
                in_flight,
                backlog,
                task,
            },
        );
        let _ = self
            .events
            .send(RelayEvent::Registered { cell, node, addr });
    }

    async fn left(&mut self, node: NodeId) {
        if let Some(online) = self.online.remove(&node) {
            online.task.abort();
            self.persist_in_flight(node, &online).await;
            let _ = self.events.send(RelayEvent::Offline { node });
        }
    }

    /// Moves what was pushed to `node` but not acknowledged into the store.
    async fn persist_in_flight(&self, node: NodeId, online: &Online) {
        let items: Vec<(MsgId, (NodeId, Bytes))> = online
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
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
        // Their senders were told `pushed`; now they are queued. Best effort: a sender whose
        // answers are full learns it from its own timeout instead.
        for ((id, (from, _)), result) in items.into_iter().zip(results) {
            if result.is_ok()
                && let Some(sender) = self.online.get(&from)
            {
                let _ = sender.outlet.try_send(Record::Accepted {
                    to: node,
                    id,
                    status: Accepted::Queued,
                });
            }
        }
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
        let mut answers: HashMap<NodeId, Vec<Record>> = HashMap::new();
        let mut to_store = Vec::new();
        for incoming in batch.drain(..) {
            let from = incoming.from;
            for record in records(incoming.data) {
                let Ok(record) = record else {
                    // Every FORWARD before it was answered; after it, nothing can be trusted
                    // to be framed right: the device is disconnected and will send again.
                    tracing::info!(%from, "malformed relay record; disconnecting the device");
                    self.node.disconnect(from, "malformed relay record");
                    break;
                };
                self.record(from, incoming.cell, record, &mut answers, &mut to_store)
                    .await;
            }
        }
        if !to_store.is_empty() {
            self.store_batch(to_store, &mut answers).await;
        }
        for (to, records) in answers {
            self.answer(to, records).await;
        }
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
        answers: &mut HashMap<NodeId, Vec<Record>>,
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
                answers.entry(from).or_default().push(Record::Directory {
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
                    self.refused(from, to, id, code, answers);
                    return;
                }
                let bytes = envelope.len();
                // A device that does not say DELIVERED is not pushed more than
                // MAX_IN_FLIGHT envelopes: the rest go to its (bounded) queue.
                if let Some(online) = self.online.get(&to).filter(|o| {
                    o.in_flight.lock().unwrap_or_else(|p| p.into_inner()).len() < MAX_IN_FLIGHT
                }) {
                    let deliver = Record::Deliver {
                        from,
                        id,
                        envelope: envelope.clone(),
                    };
                    online
                        .in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, (from, envelope.clone()));
                    if online.outlet.try_send(deliver).is_ok() {
                        self.accepted(from, to, id, bytes, Accepted::Pushed, answers);
                        return;
                    }
                    online
                        .in_flight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
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
                if let Some(online) = self.online.get(&from) {
                    let mut in_flight = online.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    for id in &ids {
                        in_flight.remove(id);
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
                self.node.disconnect(from, "relay-only record");
            }
        }
    }

    async fn store_batch(
        &mut self,
        items: Vec<ToStore>,
        answers: &mut HashMap<NodeId, Vec<Record>>,
    ) {
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
                    self.accepted(
                        m.from,
                        m.to,
                        m.id,
                        m.envelope.len(),
                        Accepted::Queued,
                        answers,
                    );
                    if let Some(online) = self.online.get(&m.to) {
                        online.backlog.notify_one();
                    }
                }
                Err(e) => self.refused(m.from, m.to, m.id, e.refuse_code(), answers),
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
        answers: &mut HashMap<NodeId, Vec<Record>>,
    ) {
        match status {
            Accepted::Pushed => self.tally.pushed += 1,
            Accepted::Queued => self.tally.queued += 1,
        }
        self.tally.bytes += bytes as u64;
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(RelayEvent::Forwarded {
                from,
                to,
                id,
                bytes,
                status,
            });
        }
        answers
            .entry(from)
            .or_default()
            .push(Record::Accepted { to, id, status });
    }

    fn refused(
        &mut self,
        from: NodeId,
        to: NodeId,
        id: MsgId,
        code: RefuseCode,
        answers: &mut HashMap<NodeId, Vec<Record>>,
    ) {
        self.tally.refused += 1;
        let _ = self.events.send(RelayEvent::Refused { from, id, code });
        answers
            .entry(from)
            .or_default()
            .push(Record::Refused { to, id, code });
    }

    /// Sends answers through the device's outlet, or directly if it has none yet. A device
    /// whose outlet is full of answers is not reading: it is disconnected (it will retry).
    async fn answer(&mut self, to: NodeId, records: Vec<Record>) {
        if let Some(online) = self.online.get(&to) {
            let outlet = online.outlet.clone();
            for r in records {
                // Answers follow the device's own FORWARDs, so waiting for room is
                // back-pressure on that device; one that takes none for ANSWER_PATIENCE is
                // disconnected (it reconnects, and nothing it was told is lost).
                if !matches!(
                    tokio::time::timeout(ANSWER_PATIENCE, outlet.send(r)).await,
                    Ok(Ok(()))
                ) {
                    tracing::warn!(%to, "device does not read its answers; disconnecting");
                    self.node.disconnect(to, "does not read its answers");
                    self.left(to).await;
                    return;
                }
            }
            return;
        }
        // Not (or no longer) online here: never wait on its link in this loop.
        if let Ok(sender) = self.node.sender(to) {
            let payloads = batch_payloads(records);
            tokio::spawn(async move {
                for p in payloads {
                    if sender.send(p).await.is_err() {
                        break;
                    }
                }
            });
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

/// Encodes records into as few payloads as fit under the link's limit.
fn batch_payloads(records: impl IntoIterator<Item = Record>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for r in records {
        if !buf.is_empty() && buf.len() + 4 + r.encoded_len() > MAX_BATCH {
            out.push(Bytes::from(std::mem::take(&mut buf)));
        }
        put_record(&mut buf, &r);
    }
    if !buf.is_empty() {
        out.push(Bytes::from(buf));
    }
    out
}

/// One online device's outlet: batches records onto its link, and hands it what the store
/// holds for it whenever told there is a backlog.
async fn outlet(
    node: NodeId,
    sender: PeerSender,
    mut rx: mpsc::Receiver<Record>,
    store: Arc<Store>,
    backlog: Arc<Notify>,
    events: broadcast::Sender<RelayEvent>,
) {
    let mut buf = Vec::with_capacity(512);
    let mut drained: BTreeSet<MsgId> = BTreeSet::new();
    loop {
        tokio::select! {
            biased;
            n = rx.recv_many(&mut buf, 512) => {
                if n == 0 {
                    return;
                }
                for payload in batch_payloads(buf.drain(..)) {
                    if sender.send(payload).await.is_err() {
                        return;
                    }
                }
            }
            _ = backlog.notified() => {
                let st = Arc::clone(&store);
                let Ok(Ok(pending)) = tokio::task::spawn_blocking(move || st.pending(node, crate::now(), 1024)).await else {
                    continue;
                };
                // Only ids still queued are remembered: the set stays as small as the queue.
                drained.retain(|id| pending.iter().any(|q| q.id == *id));
                let fresh: Vec<_> = pending.into_iter().filter(|q| drained.insert(q.id)).collect();
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
    }
}
