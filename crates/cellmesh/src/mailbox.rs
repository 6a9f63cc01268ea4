//! A device's mailbox at a relay: send end-to-end encrypted messages to cells, receive theirs.
//!
//! ```text
//!  send(cell, body) ──cmd──► driver ── LOOKUP ──► relay      (directory checked against the id)
//!                             │  seal once per recipient device (core e2e::Endpoint)
//!                             ├─ FORWARD ×n ──► relay ── ACCEPTED pushed/queued ──┐
//!                             │◄─ DELIVER (ACK envelope from a recipient device) ─┘ → Delivered
//!  recv() ◄── messages ◄──────┤◄─ DELIVER (message) → open, hand over, DELIVERED to relay, ACK back
//! ```
//!
//! One driver task owns the node (whose only peer is the relay) and the end-to-end endpoint.
//! What the application submits to one cell while the driver is busy is sealed together, in
//! bundles (one envelope, one FORWARD and one acknowledgement for up to 256 messages), each
//! message keeping its own id and outcome; a message submitted alone goes alone, at once.
//! A send resolves as *delivered* when any device of the recipient cell acknowledges it end to
//! end, as *queued* when the relay stored it for every device it did not push to, or fails
//! with the relay's refusal. Until then its envelopes are kept: they are sent again when the
//! relay link comes back, and sealed anew when a recipient device lost its session (RESET).
//! A received message has its place in the application's queue before the relay is told
//! DELIVERED (and if nobody takes messages any more, nothing is acknowledged), and the ids of
//! the last 65,536 envelopes are remembered, so a retry or a redelivery is dropped,
//! not shown twice, while this process runs. (After a crash between the two, the message may
//! be shown again: the memory of ids is not on disk yet.)
//!
//! Ephemeral and session keys come from the operating system's generator. Message ids are
//! public but unpredictable: a secret permutation of a sequence number (see `Sends`), so that
//! the driver finds a send without hashing its id; acknowledgement ids come from a generator
//! seeded from the operating system's.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh_core::Timestamp;
use cellmesh_core::e2e::{
    Directory, DirectoryError, Endpoint, LocalDevice, Message, Opened, Padding, RemoteDevice,
    SealError,
};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::relay::{Accepted, MsgId, Record, RefuseCode, records};
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, SeedableRng as _};
use std::sync::Arc;
use thiserror::Error;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::identity::DeviceIdentity;
use crate::node::{JoinError, Node, NodeConfig, NodeEvent, StartError, Transport};
use crate::outbox::Outbox;

/// How a mailbox connects.
#[derive(Clone, Debug)]
pub struct MailboxConfig {
    /// The relay's address.
    pub relay: SocketAddr,
    /// The relay's node id, if known: the link refuses any other node there.
    pub relay_node: Option<NodeId>,
    /// How to reach the relay: plain TCP, or TLS for a relay on a standard port.
    pub transport: Transport,
    /// Pad bodies to hide their size.
    pub padding: Padding,
    /// How long a send waits for an end-to-end acknowledgement after the relay pushed it.
    pub ack_timeout: Duration,
    /// Messages received but not yet taken by [`Mailbox::recv`] before the relay link pauses
    /// (give or take one piece of up to 256 that `recv` is handing out).
    pub inbox_capacity: usize,
    /// Sends whose outcome is not known yet; [`Mailbox::submit`] waits while this many are.
    pub max_in_flight: usize,
    /// The node underneath (it does not listen).
    pub node: NodeConfig,
}

impl MailboxConfig {
    /// Defaults for a relay at `relay`.
    pub fn new(relay: SocketAddr) -> Self {
        Self {
            relay,
            relay_node: None,
            transport: Transport::Tcp,
            padding: Padding::None,
            ack_timeout: Duration::from_secs(10),
            inbox_capacity: 8192,
            max_in_flight: 16_384,
            node: NodeConfig::default(),
        }
    }
}

/// How a send ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A device of the recipient cell acknowledged it end to end.
    Delivered,
    /// The relay stored it: no device of the recipient cell was online.
    Queued,
}

impl Status {
    /// `delivered` or `queued`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Queued => "queued",
        }
    }
}

/// A send that ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message id.
    pub id: MsgId,
    /// Delivered or queued.
    pub status: Status,
    /// How many devices of the recipient cell it was sealed for.
    pub devices: usize,
}

/// A mailbox operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The node could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The relay could not be reached or refused us.
    #[error("relay unreachable: {0}")]
    Relay(#[from] JoinError),
    /// The relay knows no device of that cell.
    #[error("unknown cell {0}: no device of it is registered at this relay")]
    UnknownCell(CellId),
    /// The relay's directory for the cell does not check out: it may be substituting keys.
    #[error("the relay's directory for {cell} is not trustworthy: {error}")]
    Directory {
        /// The cell.
        cell: CellId,
        /// What failed.
        error: DirectoryError,
    },
    /// The message could not be sealed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The relay refused the message for every device.
    #[error("the relay refused the message: {}", .0.name())]
    Refused(RefuseCode),
    /// The relay pushed it but no device acknowledged it in time.
    #[error("no device acknowledged the message in time")]
    NotAcknowledged,
    /// The relay did not answer in time.
    #[error("the relay did not answer in time")]
    Timeout,
    /// The mailbox is closed.
    #[error("mailbox closed")]
    Closed,
}

/// A running mailbox.
#[derive(Debug)]
pub struct Mailbox {
    sender: MailboxSender,
    /// Messages arrive in chunks; room for as many is given back as each is taken.
    messages: mpsc::UnboundedReceiver<Vec<Message>>,
    room: Arc<Semaphore>,
    /// Tells the driver to stop (not through the command queue, which may be full).
    closing: watch::Sender<bool>,
    ready: VecDeque<Message>,
    relay_node: NodeId,
    cell: CellId,
    node: NodeId,
    task: JoinHandle<()>,
}

/// The sending half of a [`Mailbox`], for other tasks: cheap to clone, and sends through the
/// mailbox's one connection (the same device), while the mailbox itself receives.
#[derive(Clone, Debug)]
pub struct MailboxSender {
    cmds: mpsc::Sender<Cmd>,
    in_flight: Arc<Semaphore>,
}

impl MailboxSender {
    /// Sends `body` to every device of `to` and waits for the outcome.
    pub async fn send(&self, to: CellId, body: Bytes) -> Result<Sent, MailboxError> {
        self.submit(to, body).await?.await
    }

    /// Starts a send; await the ticket for its outcome. Many sends can be in flight at once.
    pub async fn submit(&self, to: CellId, body: Bytes) -> Result<Ticket, MailboxError> {
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| MailboxError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let done = Done {
            tx,
            _permit: permit,
        };
        self.cmds
            .send(Cmd::Send { to, body, done })
            .await
            .map_err(|_| MailboxError::Closed)?;
        Ok(Ticket(rx))
    }
}

/// A send in progress: await it for the outcome.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<Sent, MailboxError>>);

impl std::future::Future for Ticket {
    type Output = Result<Sent, MailboxError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(MailboxError::Closed)))
    }
}

/// Where a send's outcome goes; holds its place among the sends in flight until then.
struct Done {
    tx: oneshot::Sender<Result<Sent, MailboxError>>,
    _permit: OwnedSemaphorePermit,
}

impl Done {
    fn send(self, outcome: Result<Sent, MailboxError>) {
        let _ = self.tx.send(outcome);
    }
}

enum Cmd {
    Send {
        to: CellId,
        body: Bytes,
        done: Done,
    },
    Lookup {
        cell: CellId,
        done: oneshot::Sender<Result<Directory, MailboxError>>,
    },
}

impl Mailbox {
    /// Starts a node that does not listen, joins the relay (which registers this device in
    /// its directory) and starts receiving.
    pub async fn connect(unlocked: &Unlocked, config: MailboxConfig) -> Result<Self, MailboxError> {
        let mut node_config = config.node.clone();
        node_config.listen.clear();
        node_config.bootstrap.clear();
        let node = Node::start(unlocked, node_config).await?;
        let events = node.subscribe();
        let relay = node
            .join_with(config.relay, &config.transport, config.relay_node)
            .await?;
        let identity = DeviceIdentity::mint(&unlocked.secrets, None).map_err(StartError::from)?;
        let agreement = cellmesh_core::keys::AgreementSecret::from_bytes(
            &unlocked.secrets.node.agreement.dangerous_bytes(),
        );
        let local =
            LocalDevice::new(node.node_token(), identity.identity, agreement).map_err(|error| {
                MailboxError::Directory {
                    cell: node.cell(),
                    error,
                }
            })?;
        let (cmds, cmd_rx) = mpsc::channel(1024);
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let capacity = config.inbox_capacity.clamp(1, Semaphore::MAX_PERMITS);
        let room = Arc::new(Semaphore::new(capacity));
        let (closing, close_rx) = watch::channel(false);
        let (cell, me) = (node.cell(), node.node_id());
        let revocations = unlocked.keystore.revocations();
        let outbox = node.sender(relay.node).ok().map(Outbox::new);
        let driver = Driver {
            endpoint: Endpoint::new(local, config.padding),
            relay: relay.node,
            relay_addr: config.relay,
            connected: true,
            config,
            node,
            revocations,
            to_app: ToApp {
                tx: msg_tx,
                room: Arc::clone(&room),
                chunk: HAND_OVER.min(capacity),
            },
            opened: Vec::new(),
            fresh: Vec::new(),
            clock: (crate::now(), Instant::now()),
            sends: Sends::new(&mut OsRng),
            deadlines: VecDeque::new(),
            expiries: VecDeque::new(),
            retries: Vec::new(),
            directories: HashMap::default(),
            rng: ChaCha20Rng::from_rng(OsRng).map_err(|_| MailboxError::Closed)?,
            lookups: HashMap::new(),
            next_request: 1,
            out: Vec::new(),
            outbox,
        };
        Ok(Self {
            sender: MailboxSender { cmds, in_flight },
            messages,
            room,
            closing,
            ready: VecDeque::new(),
            relay_node: relay.node,
            cell,
            node: me,
            task: tokio::spawn(driver.run(cmd_rx, events, close_rx)),
        })
    }

    /// Sends `body` to every device of `to` and waits for the outcome.
    pub async fn send(&self, to: CellId, body: Bytes) -> Result<Sent, MailboxError> {
        self.sender.send(to, body).await
    }

    /// Starts a send; await the ticket for its outcome. Many sends can be in flight at once.
    pub async fn submit(&self, to: CellId, body: Bytes) -> Result<Ticket, MailboxError> {
        self.sender.submit(to, body).await
    }

    /// A handle that sends through this mailbox from another task.
    pub fn sender(&self) -> MailboxSender {
        self.sender.clone()
    }

    /// The devices of `cell`, as the relay lists them and checked against the id.
    pub async fn lookup(&self, cell: CellId) -> Result<Directory, MailboxError> {
        let (done, rx) = oneshot::channel();
        self.sender
            .cmds
            .send(Cmd::Lookup { cell, done })
            .await
            .map_err(|_| MailboxError::Closed)?;
        rx.await.unwrap_or(Err(MailboxError::Closed))
    }

    /// The next message from another cell; `None` once closed.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Some(m);
            }
            // Room is given back a piece (at most 256 messages) at a time.
            let chunk = self.messages.recv().await?;
            self.room.add_permits(chunk.len());
            self.ready.extend(chunk);
        }
    }

    /// The relay's node id (pin it with [`MailboxConfig::relay_node`] next time).
    pub fn relay_node(&self) -> NodeId {
        self.relay_node
    }

    /// This device's cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// This device.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Stops: pending sends fail with [`MailboxError::Closed`]. Returns the messages that
    /// were received (and so acknowledged to their senders and the relay) but not yet taken
    /// with [`Mailbox::recv`]: the application must not drop them.
    pub async fn close(mut self) -> Vec<Message> {
        let _ = self.closing.send(true);
        let mut unread: Vec<Message> = self.ready.drain(..).collect();
        // Taken as the driver finishes its turn: it may be waiting for room to hand over.
        loop {
            tokio::select! {
                _ = &mut self.task => break,
                Some(chunk) = self.messages.recv() => {
                    self.room.add_permits(chunk.len());
                    unread.extend(chunk);
                }
            }
        }
        while let Ok(chunk) = self.messages.try_recv() {
            unread.extend(chunk);
        }
        unread
    }
}

/// Where one device of the recipient cell stands for one message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum DevState {
    /// Forwarded; no answer from the relay yet.
    Sent,
    /// Refused for a reason that may pass; send again at `retry`.
    Retry(Instant),
    Pushed,
    Queued,
    Refused(RefuseCode),
    Acked,
}

/// A checked directory (its devices shared by every send to the cell), and when it came.
type CachedDirectory = (Arc<[Arc<RemoteDevice>]>, Directory, Instant);

/// One device of the recipient cell, for one message.
struct DeviceSend {
    device: Arc<RemoteDevice>,
    envelope: Bytes,
    state: DevState,
}

/// One envelope's worth of messages to one cell: a single message (whose id is the
/// envelope's) or a bundle of messages submitted together (each with its own id).
struct PendingSend {
    /// The envelope's id, in every FORWARD and acknowledgement of it.
    id: MsgId,
    messages: Vec<(MsgId, Bytes)>,
    devices: Vec<DeviceSend>,
    /// One per message, until the outcome is known (then empty). The send itself is kept
    /// until every device acknowledged (or for [`RETAIN`]): a device that was offline may come
    /// back having lost its session, and ask (RESET) for the messages again.
    done: Vec<Done>,
}

impl PendingSend {
    /// Tells every message's sender how the send ended.
    fn resolve(&mut self, outcome: Result<Status, MailboxError>) {
        let devices = self.devices.len();
        for (done, (id, _)) in self.done.drain(..).zip(&self.messages) {
            done.send(match &outcome {
                Ok(status) => Ok(Sent {
                    id: *id,
                    status: *status,
                    devices,
                }),
                Err(e) => Err(copy_error(e)),
            });
        }
    }
}

/// Seals a send's messages for one device: alone, or as a bundle.
fn seal_for(
    endpoint: &mut Endpoint,
    device: &RemoteDevice,
    id: MsgId,
    now: Timestamp,
    messages: &[(MsgId, Bytes)],
) -> Result<Bytes, SealError> {
    match messages {
        [(only, body)] if *only == id => endpoint.seal(device, id, now, body, &mut OsRng),
        _ => endpoint.seal_bundle(device, id, now, messages, &mut OsRng),
    }
}

struct Driver {
    endpoint: Endpoint,
    relay: NodeId,
    relay_addr: SocketAddr,
    connected: bool,
    config: MailboxConfig,
    node: Node,
    revocations: cellmesh_core::device::Revocations,
    to_app: ToApp,
    /// The clocks read once per batch of commands and once per sealing (wall, monotonic).
    clock: (Timestamp, Instant),
    /// Opened in this turn, handed over at its end.
    opened: Vec<Message>,
    /// Sends of this turn whose directory is known, sealed at its end: those to one cell go
    /// together, in bundles.
    fresh: Vec<(CellId, Bytes, Done)>,
    sends: Sends,
    /// Sends by when their outcome is due, and by when they are forgotten (both in the order
    /// they were made, since every send gets the same delays).
    deadlines: VecDeque<(Instant, MsgId)>,
    expiries: VecDeque<(Instant, MsgId)>,
    /// Devices refused for a reason that may pass, to forward to again.
    retries: Vec<(Instant, MsgId, NodeId)>,
    /// Looked up on every send: a fast hash (cell ids are public, and the relay's answers
    /// only replace entries of cells this device asked about).
    directories: HashMap<CellId, CachedDirectory, foldhash::fast::RandomState>,
    rng: ChaCha20Rng,
    lookups: HashMap<u32, (CellId, Vec<Waiting>)>,
    next_request: u32,
    /// Records for the relay, flushed at the end of each turn.
    out: Vec<Record>,
    /// The relay link's writer, replaced on each (re)connection.
    outbox: Option<Outbox>,
}

enum Waiting {
    Send { body: Bytes, done: Done },
    Lookup(oneshot::Sender<Result<Directory, MailboxError>>),
}

const DIRECTORY_TTL: Duration = Duration::from_secs(30);
/// How long a sent message is kept for devices that have not acknowledged it.
const RETAIN: Duration = Duration::from_secs(24 * 3600);
/// Most envelopes (messages or bundles) kept for devices that have not acknowledged them.
const MAX_RETAINED: usize = 65_536;
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Most bytes of bodies in one bundle: messages submitted together to one cell share an
/// envelope up to this size (one seal, one FORWARD, one acknowledgement for all).
const BUNDLE_BYTES: usize = 64 * 1024;
/// Most messages in one bundle.
const BUNDLE_MESSAGES: usize = 256;
/// Most messages handed to the application in one piece.
const HAND_OVER: usize = 256;

/// The way to the application: bounded in messages, not in pieces (one turn of the driver can
/// open one message or a hundred thousand). The driver takes room before it hands messages
/// over; [`Mailbox::recv`] gives it back as it takes a piece to hand out.
struct ToApp {
    tx: mpsc::UnboundedSender<Vec<Message>>,
    room: Arc<Semaphore>,
    /// Most messages in one piece (at most the room there is).
    chunk: usize,
}

impl ToApp {
    /// Waits for room for `n` messages (at most `chunk`); false once nobody receives.
    async fn room_for(&self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        tokio::select! {
            permit = self.room.acquire_many(n) => match permit {
                Ok(permit) => {
                    permit.forget();
                    true
                }
                Err(_) => false,
            },
            () = self.tx.closed() => false,
        }
    }

    fn hand_over(&self, messages: Vec<Message>) {
        let _ = self.tx.send(messages);
    }
}
/// Sends kept by position before the oldest still kept move to a map.
const RECENT: usize = 1 << 17;

/// The sends a mailbox keeps, found by message id without hashing it.
///
/// A message id is a secret permutation (AES-128 under a key this mailbox drew) of eight
/// zero bytes and a sequence number: to everyone else ids look random and cannot be
/// predicted, while this mailbox reads the sequence number back and finds the send by its
/// position. Answers and acknowledgements come back in about the order the sends went out,
/// so the sends they touch sit next to each other in memory. An id that does not decode to
/// eight zero bytes is not one of this mailbox's.
struct Sends {
    ids: aes::Aes128,
    next: u64,
    /// The next bundled message's number (its id has a 1 in its eighth byte, so it is never
    /// taken for a send's).
    next_message: u64,
    /// Sends from sequence `base` on, by position; `None` once forgotten.
    recent: VecDeque<Option<PendingSend>>,
    base: u64,
    /// Sends older than `recent` reaches, still kept for devices that have not acknowledged.
    old: HashMap<u64, PendingSend, foldhash::fast::RandomState>,
    len: usize,
}

impl Sends {
    fn new(rng: &mut impl rand_core::CryptoRngCore) -> Self {
        use aes::cipher::KeyInit as _;
        let mut key = zeroize::Zeroizing::new([0u8; 16]);
        rng.fill_bytes(&mut key[..]);
        Self {
            ids: aes::Aes128::new(&(*key).into()),
            next: 0,
            next_message: 0,
            recent: VecDeque::new(),
            base: 0,
            old: HashMap::default(),
            len: 0,
        }
    }

    /// The id the next send gets.
    fn next_id(&self) -> MsgId {
        self.permute(0, self.next)
    }

    /// An id for a message in a bundle.
    fn message_id(&mut self) -> MsgId {
        self.next_message += 1;
        self.permute(1, self.next_message - 1)
    }

    fn permute(&self, domain: u8, seq: u64) -> MsgId {
        use aes::cipher::BlockEncrypt as _;
        let mut block = [0u8; 16];
        block[7] = domain;
        block[8..].copy_from_slice(&seq.to_be_bytes());
        let mut block = block.into();
        self.ids.encrypt_block(&mut block);
        MsgId(block.into())
    }

    fn seq(&self, id: &MsgId) -> Option<u64> {
        use aes::cipher::BlockDecrypt as _;
        let mut block = id.0.into();
        self.ids.decrypt_block(&mut block);
        let block: [u8; 16] = block.into();
        let (zero, seq) = block.split_at(8);
        zero.iter()
            .all(|&b| b == 0)
            .then(|| u64::from_be_bytes(seq.try_into().unwrap_or_default()))
    }

    /// Keeps `send`, whose id must be [`Sends::next_id`].
    fn insert(&mut self, send: PendingSend) {
        debug_assert_eq!(send.id, self.next_id());
        self.next += 1;
        if self.recent.is_empty() {
            self.base = self.next - 1;
        }
        self.recent.push_back(Some(send));
        self.len += 1;
        if self.recent.len() > RECENT {
            if let Some(Some(oldest)) = self.recent.pop_front() {
                self.old.insert(self.base, oldest);
            }
            self.base += 1;
            self.trim();
        }
    }

    fn get_mut(&mut self, id: &MsgId) -> Option<&mut PendingSend> {
        let seq = self.seq(id)?;
        if seq < self.base {
            return self.old.get_mut(&seq);
        }
        let at = usize::try_from(seq - self.base).ok()?;
        self.recent.get_mut(at)?.as_mut()
    }

    fn contains(&self, id: &MsgId) -> bool {
        let Some(seq) = self.seq(id) else {
            return false;
        };
        if seq < self.base {
            return self.old.contains_key(&seq);
        }
        usize::try_from(seq - self.base)
            .ok()
            .and_then(|at| self.recent.get(at))
            .is_some_and(Option::is_some)
    }

    fn remove(&mut self, id: &MsgId) -> Option<PendingSend> {
        let seq = self.seq(id)?;
        let removed = if seq < self.base {
            self.old.remove(&seq)
        } else {
            let at = usize::try_from(seq - self.base).ok()?;
            let removed = self.recent.get_mut(at)?.take();
            self.trim();
            removed
        };
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Drops forgotten positions at the front.
    fn trim(&mut self) {
        while let Some(None) = self.recent.front() {
            self.recent.pop_front();
            self.base += 1;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> impl Iterator<Item = &PendingSend> {
        self.old.values().chain(self.recent.iter().flatten())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut PendingSend> {
        self.old
            .values_mut()
            .chain(self.recent.iter_mut().flatten())
    }

    fn drain(&mut self) -> impl Iterator<Item = PendingSend> + '_ {
        self.len = 0;
        self.old
            .drain()
            .map(|(_, s)| s)
            .chain(self.recent.drain(..).flatten())
    }
}

impl Driver {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut events: broadcast::Receiver<NodeEvent>,
        mut closing: watch::Receiver<bool>,
    ) {
        let mut cmd_buf = Vec::with_capacity(256);
        let mut in_buf = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                n = cmds.recv_many(&mut cmd_buf, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.clock = (crate::now(), Instant::now());
                    for cmd in cmd_buf.drain(..) {
                        match cmd {
                            Cmd::Send { to, body, done } => self.send(to, body, done),
                            Cmd::Lookup { cell, done } => self.lookup(cell, Waiting::Lookup(done)),
                        }
                    }
                }
                Ok(()) = closing.changed() => break,
                n = self.node.recv_many(&mut in_buf, 256) => {
                    if n == 0 {
                        break;
                    }
                    self.incoming(&mut in_buf).await;
                }
                ev = events.recv() => match ev {
                    Ok(NodeEvent::Left { peer, .. }) if peer.node == self.relay => {
                        self.connected = false;
                        self.reconnect().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                    _ => {}
                },
                _ = tick.tick() => {
                    if !self.connected {
                        self.reconnect().await;
                    }
                    self.timers();
                }
            }
            self.seal_fresh();
            self.flush();
        }
        for (_, _, done) in self.fresh.drain(..) {
            done.send(Err(MailboxError::Closed));
        }
        for mut s in self.sends.drain() {
            s.resolve(Err(MailboxError::Closed));
        }
        // What this turn produced (DELIVERED above all: without it the relay would hand the
        // same messages to this device's next run) is written before the link closes.
        self.flush();
        if let Some(outbox) = self.outbox.take() {
            outbox.finish(Duration::from_secs(2)).await;
        }
        self.node.shutdown(Duration::from_secs(1)).await;
    }

    fn send(&mut self, to: CellId, body: Bytes, done: Done) {
        if body.len() > cellmesh_core::e2e::MAX_BODY {
            done.send(Err(SealError::TooLarge(body.len()).into()));
            return;
        }
        match self.directories.get(&to) {
            Some((_, _, at)) if self.clock.1.saturating_duration_since(*at) < DIRECTORY_TTL => {
                self.fresh.push((to, body, done));
            }
            _ => self.lookup(to, Waiting::Send { body, done }),
        }
    }

    fn lookup(&mut self, cell: CellId, waiting: Waiting) {
        if let Some((_, waiters)) = self.lookups.values_mut().find(|(c, _)| *c == cell) {
            waiters.push(waiting);
            return;
        }
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.lookups.insert(request, (cell, vec![waiting]));
        self.out.push(Record::Lookup { request, cell });
    }

    /// Seals this turn's sends: those to one cell in bundles of up to [`BUNDLE_MESSAGES`]
    /// messages and [`BUNDLE_BYTES`] of bodies, in the order they were submitted.
    fn seal_fresh(&mut self) {
        if self.fresh.is_empty() {
            return;
        }
        // Sends that waited for a directory are sealed now, not when they were submitted.
        self.clock = (crate::now(), Instant::now());
        let mut fresh = std::mem::take(&mut self.fresh);
        // Stable: each cell's messages keep their order.
        fresh.sort_by_key(|(cell, ..)| *cell);
        let mut fresh = fresh.into_iter().peekable();
        while let Some((cell, body, done)) = fresh.next() {
            let Some(devices) = self.directories.get(&cell).map(|(d, ..)| Arc::clone(d)) else {
                done.send(Err(MailboxError::Closed));
                continue;
            };
            let mut bytes = body.len();
            let mut bundle = vec![(body, done)];
            while let Some((_, next, _)) = fresh.peek_mut().filter(|(c, ..)| *c == cell)
                && bundle.len() < BUNDLE_MESSAGES
                && bytes + next.len() <= BUNDLE_BYTES
            {
                bytes += next.len();
                if let Some((_, body, done)) = fresh.next() {
                    bundle.push((body, done));
                }
            }
            self.seal_and_forward(&devices, bundle);
        }
        self.fresh = fresh.collect();
    }

    fn seal_and_forward(&mut self, devices: &[Arc<RemoteDevice>], bundle: Vec<(Bytes, Done)>) {
        let id = self.sends.next_id();
        let (now, at) = self.clock;
        let (messages, done): (Vec<(MsgId, Bytes)>, Vec<Done>) = match <[_; 1]>::try_from(bundle) {
            Ok([(body, done)]) => (vec![(id, body)], vec![done]),
            Err(bundle) => bundle
                .into_iter()
                .map(|(body, done)| ((self.sends.message_id(), body), done))
                .unzip(),
        };
        let mut send = PendingSend {
            id,
            messages,
            devices: Vec::with_capacity(devices.len()),
            done,
        };
        for device in devices {
            match seal_for(&mut self.endpoint, device, id, now, &send.messages) {
                Ok(envelope) => {
                    self.out.push(Record::Forward {
                        to: device.node(),
                        id,
                        envelope: envelope.clone(),
                    });
                    send.devices.push(DeviceSend {
                        device: Arc::clone(device),
                        envelope,
                        state: DevState::Sent,
                    });
                }
                Err(e) => {
                    // None of its FORWARDs go out (sealing for a device failed, after earlier
                    // devices of the cell were sealed for): its messages fail as one.
                    self.out
                        .retain(|r| !matches!(r, Record::Forward { id: f, .. } if *f == id));
                    send.resolve(Err(e.into()));
                    return;
                }
            }
        }
        if self.sends.len() >= MAX_RETAINED {
            self.forget_resolved();
        }
        let deadline = at + self.config.ack_timeout;
        self.deadlines.push_back((deadline, id));
        self.expiries.push_back((at + RETAIN, id));
        self.sends.insert(send);
    }

    /// Makes room: forgets sends whose outcome is known but that some device has not
    /// acknowledged yet.
    fn forget_resolved(&mut self) {
        let resolved: Vec<MsgId> = self
            .sends
            .iter()
            .filter(|s| s.done.is_empty())
            .map(|s| s.id)
            .take(MAX_RETAINED / 16)
            .collect();
        tracing::warn!(
            dropped = resolved.len(),
            "too many messages not acknowledged by every device; forgetting some"
        );
        for id in resolved {
            self.sends.remove(&id);
        }
    }

    async fn incoming(&mut self, batch: &mut Vec<crate::node::Incoming>) {
        let mut delivered = Vec::new();
        let mut received = true;
        let now = crate::now();
        for incoming in batch.drain(..) {
            if incoming.from != self.relay {
                continue;
            }
            for record in records(incoming.data) {
                let Ok(record) = record else {
                    tracing::warn!("malformed record from the relay");
                    break;
                };
                match record {
                    Record::Directory {
                        request,
                        cell,
                        devices,
                    } => {
                        self.directory(request, cell, &devices);
                    }
                    Record::Accepted { to, id, status } => self.relay_answer(to, id, Ok(status)),
                    Record::Refused { to, id, code } => self.relay_answer(to, id, Err(code)),
                    Record::Deliver { from, id, envelope } => {
                        self.deliver(from, id, &envelope, now);
                        delivered.push(id);
                        // Full pieces go at once: one turn can open many messages.
                        if received && self.opened.len() > self.to_app.chunk {
                            received = self.hand_over_full().await;
                        }
                    }
                    _ => tracing::debug!("relay sent a device-only record"),
                }
            }
        }
        // The messages have their place in the application's queue before the relay hears
        // DELIVERED (and before the acknowledgements go out): waits while the application is
        // behind. The last piece is handed over only after the acknowledgements are written:
        // the application is woken last, so that its answer, not they, runs next.
        let last = std::mem::take(&mut self.opened);
        if received && !last.is_empty() {
            received = self.to_app.room_for(last.len()).await;
        }
        if !received {
            // Nobody takes messages any more (the mailbox was dropped): nothing of this turn
            // is acknowledged, so the relay keeps it for this device's next run.
            tracing::debug!("nobody receives messages any more; not acknowledging them");
            let _ = self.endpoint.poll_acks(&mut self.rng);
            return;
        }
        for reply in self.endpoint.poll_acks(&mut self.rng) {
            self.out.push(Record::Forward {
                to: reply.to,
                id: reply.id,
                envelope: reply.envelope,
            });
        }
        for ids in delivered.chunks(cellmesh_core::relay::MAX_IDS) {
            self.out.push(Record::Delivered(ids.to_vec()));
        }
        self.flush();
        if !last.is_empty() {
            self.to_app.hand_over(last);
        }
    }

    /// Hands full pieces over while more than a piece is open; false once nobody receives.
    async fn hand_over_full(&mut self) -> bool {
        while self.opened.len() > self.to_app.chunk {
            let rest = self.opened.split_off(self.to_app.chunk);
            let piece = std::mem::replace(&mut self.opened, rest);
            if !self.to_app.room_for(piece.len()).await {
                return false;
            }
            self.to_app.hand_over(piece);
        }
        true
    }

    fn directory(
        &mut self,
        request: u32,
        cell: CellId,
        entries: &[cellmesh_core::relay::DirectoryEntry],
    ) {
        let Some((asked, waiters)) = self.lookups.remove(&request) else {
            return;
        };
        let result = if asked != cell {
            Err(MailboxError::Directory {
                cell: asked,
                error: DirectoryError::WrongCell(cell),
            })
        } else {
            match Directory::verify(cell, entries, crate::now(), &self.revocations) {
                Ok(dir) => Ok(dir),
                Err(DirectoryError::NoDevices(c)) => Err(MailboxError::UnknownCell(c)),
                Err(error) => Err(MailboxError::Directory { cell, error }),
            }
        };
        let devices: Option<Arc<[Arc<RemoteDevice>]>> = result
            .as_ref()
            .ok()
            .map(|dir| dir.devices.iter().cloned().map(Arc::new).collect());
        if let (Ok(dir), Some(devices)) = (&result, &devices) {
            self.directories
                .insert(cell, (Arc::clone(devices), dir.clone(), Instant::now()));
        }
        for w in waiters {
            match (w, &result, &devices) {
                (Waiting::Lookup(done), Ok(dir), _) => {
                    let _ = done.send(Ok(dir.clone()));
                }
                (Waiting::Send { body, done }, Ok(_), Some(_)) => {
                    self.fresh.push((cell, body, done));
                }
                (Waiting::Lookup(done), Err(e), _) => {
                    let _ = done.send(Err(copy_error(e)));
                }
                (Waiting::Send { done, .. }, Err(e), _) => done.send(Err(copy_error(e))),
                (Waiting::Send { done, .. }, Ok(_), None) => done.send(Err(MailboxError::Closed)),
            }
        }
    }

    fn relay_answer(&mut self, to: NodeId, id: MsgId, answer: Result<Accepted, RefuseCode>) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        let Some(dev) = send.devices.iter_mut().find(|d| d.device.node() == to) else {
            return;
        };
        // One answer per FORWARD, except that a pushed envelope whose device left before
        // taking it is reported again, as queued.
        let later_queued = dev.state == DevState::Pushed && answer == Ok(Accepted::Queued);
        if dev.state != DevState::Sent && !later_queued {
            return;
        }
        dev.state = match answer {
            Ok(Accepted::Pushed) => DevState::Pushed,
            Ok(Accepted::Queued) => DevState::Queued,
            Err(code) if code.is_transient() => {
                let at = Instant::now() + RETRY_AFTER;
                self.retries.push((at, id, to));
                DevState::Retry(at)
            }
            Err(code) => DevState::Refused(code),
        };
        self.settle(id);
    }

    fn deliver(&mut self, from: NodeId, id: MsgId, envelope: &[u8], now: Timestamp) {
        let opened = self
            .endpoint
            .open(from, id, envelope, now, &self.revocations, &mut OsRng);
        match opened {
            Ok(Opened::Message(m)) => self.opened.push(m),
            Ok(Opened::Bundle(messages)) => self.opened.extend(messages),
            Ok(Opened::Duplicate(id)) => tracing::debug!(%id, "dropped a duplicate"),
            Ok(Opened::Acked { from, ids }) => {
                for id in ids {
                    if let Some(send) = self.sends.get_mut(&id)
                        && let Some(dev) = send.devices.iter_mut().find(|d| d.device.node() == from)
                    {
                        dev.state = DevState::Acked;
                        self.settle(id);
                    }
                }
            }
            Ok(Opened::Reset { from }) => self.resend_to(from),
            Ok(Opened::Unknown { reply }) => self.out.push(Record::Forward {
                to: reply.to,
                id: reply.id,
                envelope: reply.envelope,
            }),
            Ok(_) => {}
            // Answers to a session of an earlier process of this device.
            Err(e @ cellmesh_core::e2e::OpenError::NoSession) => {
                tracing::debug!(%from, %id, error = %e, "dropped an envelope");
            }
            Err(e) => tracing::warn!(%from, %id, error = %e, "refused an envelope"),
        }
    }

    /// A device lost its session with us: seal what it has not acknowledged again.
    fn resend_to(&mut self, device: NodeId) {
        let now = crate::now();
        for send in self.sends.iter_mut() {
            let id = &send.id;
            let Some(dev) = send.devices.iter_mut().find(|d| d.device.node() == device) else {
                continue;
            };
            if !matches!(
                dev.state,
                DevState::Sent | DevState::Pushed | DevState::Queued
            ) {
                continue;
            }
            if let Ok(fresh) = seal_for(&mut self.endpoint, &dev.device, *id, now, &send.messages) {
                dev.envelope = fresh.clone();
                dev.state = DevState::Sent;
                self.out.push(Record::Forward {
                    to: device,
                    id: *id,
                    envelope: fresh,
                });
            }
        }
    }

    /// Resolves a send whose outcome is known; forgets it once every device is settled.
    fn settle(&mut self, id: MsgId) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        let mut acked = false;
        let mut queued = false;
        let mut waiting = false;
        let mut settled = true;
        let mut refused = None;
        for d in &send.devices {
            match d.state {
                DevState::Acked => acked = true,
                DevState::Queued => {
                    queued = true;
                    settled = false;
                }
                DevState::Sent | DevState::Retry(_) | DevState::Pushed => {
                    waiting = true;
                    settled = false;
                }
                DevState::Refused(c) => refused = refused.or(Some(c)),
            }
        }
        let outcome = if acked {
            Some(Ok(Status::Delivered))
        } else if waiting {
            None
        } else if queued {
            Some(Ok(Status::Queued))
        } else {
            Some(Err(MailboxError::Refused(
                refused.unwrap_or(RefuseCode::Other(0)),
            )))
        };
        if let Some(outcome) = outcome {
            send.resolve(outcome);
        }
        if settled {
            self.sends.remove(&id);
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let due: Vec<(Instant, MsgId, NodeId)> = {
            let (due, later) = self.retries.drain(..).partition(|(at, ..)| *at <= now);
            self.retries = later;
            due
        };
        for (_, id, node) in due {
            if let Some(send) = self.sends.get_mut(&id)
                && let Some(dev) = send.devices.iter_mut().find(|d| d.device.node() == node)
                && matches!(dev.state, DevState::Retry(_))
            {
                dev.state = DevState::Sent;
                self.out.push(Record::Forward {
                    to: node,
                    id,
                    envelope: dev.envelope.clone(),
                });
            }
        }
        while let Some(&(at, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(send) = self.sends.get_mut(&id) else {
                continue;
            };
            if send.done.is_empty() {
                continue;
            }
            let queued = send.devices.iter().any(|d| d.state == DevState::Queued);
            let pushed = send.devices.iter().any(|d| d.state == DevState::Pushed);
            send.resolve(if queued {
                Ok(Status::Queued)
            } else if pushed {
                Err(MailboxError::NotAcknowledged)
            } else {
                Err(MailboxError::Timeout)
            });
            if !queued {
                self.sends.remove(&id);
            }
        }
        // Entries of sends already settled go as soon as they reach the front.
        while let Some(&(_, id)) = self.deadlines.front()
            && !self.sends.contains(&id)
        {
            self.deadlines.pop_front();
        }
        while let Some(&(_, id)) = self.expiries.front()
            && !self.sends.contains(&id)
        {
            self.expiries.pop_front();
        }
        while let Some(&(at, id)) = self.expiries.front() {
            if at > now {
                break;
            }
            self.expiries.pop_front();
            if self.sends.remove(&id).is_some() {
                tracing::debug!(%id, "forgetting a message some device never acknowledged");
            }
        }
    }

    /// Joins the relay again (pinned to the same node) and sends again every envelope it has
    /// not answered, and every lookup.
    async fn reconnect(&mut self) {
        let transport = &self.config.transport;
        match self
            .node
            .join_with(self.relay_addr, transport, Some(self.relay))
            .await
        {
            Ok(_) => {
                tracing::info!(relay = %self.relay, "reconnected to the relay");
                let Ok(link) = self.node.sender(self.relay) else {
                    return;
                };
                self.outbox = Some(Outbox::new(link));
                self.connected = true;
                let sends = &self.sends;
                self.out.retain(|r| match r {
                    Record::Forward { id, .. } => !sends.contains(id),
                    Record::Lookup { .. } => false,
                    _ => true,
                });
                for send in self.sends.iter_mut() {
                    let id = &send.id;
                    for dev in &mut send.devices {
                        if matches!(dev.state, DevState::Sent | DevState::Pushed) {
                            dev.state = DevState::Sent;
                            self.out.push(Record::Forward {
                                to: dev.device.node(),
                                id: *id,
                                envelope: dev.envelope.clone(),
                            });
                        }
                    }
                }
                for (request, (cell, _)) in &self.lookups {
                    self.out.push(Record::Lookup {
                        request: *request,
                        cell: *cell,
                    });
                }
            }
            Err(e) => tracing::debug!(error = %e, "relay still unreachable"),
        }
    }

    /// Hands this turn's records to the relay link's outbox. Never waits: the driver must
    /// keep reading the relay's answers while the link is slow, or relay and device would
    /// wait on each other. What waits in the outbox is bounded in practice by the sends in
    /// flight (`max_in_flight`) and the acknowledgements of what the driver received; what
    /// was written to a link that closed is sent again after reconnecting.
    fn flush(&mut self) {
        if self.out.is_empty() || !self.connected {
            return;
        }
        let Some(outbox) = &self.outbox else {
            return;
        };
        for payload in crate::outbox::batch_payloads(self.out.drain(..)) {
            outbox.send(payload);
        }
    }
}

/// The same outcome for each message of a send (errors from joining never are one).
fn copy_error(e: &MailboxError) -> MailboxError {
    match e {
        MailboxError::UnknownCell(c) => MailboxError::UnknownCell(*c),
        MailboxError::Directory { cell, error } => MailboxError::Directory {
            cell: *cell,
            error: error.clone(),
        },
        MailboxError::Seal(e) => MailboxError::Seal(e.clone()),
        MailboxError::Refused(code) => MailboxError::Refused(*code),
        MailboxError::NotAcknowledged => MailboxError::NotAcknowledged,
        MailboxError::Timeout => MailboxError::Timeout,
        MailboxError::Start(_) | MailboxError::Relay(_) | MailboxError::Closed => {
            MailboxError::Closed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: MsgId) -> PendingSend {
        PendingSend {
            id,
            messages: Vec::new(),
            devices: Vec::new(),
            done: Vec::new(),
        }
    }

    #[test]
    fn sends_are_found_by_id_and_forgotten_in_any_order() {
        let mut sends = Sends::new(&mut OsRng);
        let ids: Vec<MsgId> = (0..10)
            .map(|_| {
                let id = sends.next_id();
                sends.insert(pending(id));
                id
            })
            .collect();
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), 10, "ids differ");
        assert_eq!(sends.len(), 10);
        assert!(
            ids.iter()
                .all(|id| sends.get_mut(id).is_some_and(|s| s.id == *id))
        );
        assert_eq!(sends.remove(&ids[3]).map(|s| s.id), Some(ids[3]));
        assert!(sends.remove(&ids[3]).is_none());
        assert!(!sends.contains(&ids[3]));
        assert_eq!(sends.remove(&ids[0]).map(|s| s.id), Some(ids[0]));
        assert!(sends.contains(&ids[1]) && sends.contains(&ids[9]));
        assert_eq!(sends.len(), 8);
        // An id this mailbox did not make (another run's, another device's) is not found.
        assert!(sends.get_mut(&MsgId([7; 16])).is_none());
        let other = Sends::new(&mut OsRng);
        assert!(!sends.contains(&other.next_id()));
        assert_eq!(sends.drain().count(), 8);
        assert_eq!(sends.len(), 0);
    }

    #[test]
    fn sends_kept_long_move_aside_and_stay_found() {
        let mut sends = Sends::new(&mut OsRng);
        let first = sends.next_id();
        sends.insert(pending(first));
        let mut last = first;
        for _ in 0..RECENT + 10 {
            last = sends.next_id();
            sends.insert(pending(last));
            sends.remove(&last);
        }
        assert_eq!(sends.len(), 1);
        assert!(sends.recent.len() <= RECENT);
        assert!(sends.contains(&first));
        assert!(!sends.contains(&last));
        assert_eq!(sends.iter().count(), 1);
        assert_eq!(sends.remove(&first).map(|s| s.id), Some(first));
        assert_eq!(sends.len(), 0);
    }
}
