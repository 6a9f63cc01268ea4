//! A device's mailbox at a relay: send end-to-end encrypted messages to cells, receive theirs.
//!
//! ```text
//!  send/submit ──cmd──► driver ──► core Mailbox (every decision) ──► poll_transmit ──► relay link
//!  recv() ◄── messages ◄─┤  ▲ handle_payload ◄──────────────────────────────────────── relay link
//!  (taken count) ────────┘  │ poll_commit ──► DeviceState (redb, spawn_blocking) ──► handle_committed
//! ```
//!
//! One driver task owns the node (whose only peer is the relay), the core's
//! [`cellmesh_core::mailbox::Mailbox`] and, with [`MailboxConfig::state`], the device's state
//! in its home ([`crate::state::DeviceState`]). The driver decides nothing: it feeds the core
//! what arrives (records, commands, the application's progress, the store's completions, the
//! clock) and carries out what it asks (payloads to write, commits to make, events to route).
//!
//! A received message is acknowledged (end to end, and to the relay) only once the
//! application has it: when [`Mailbox::recv`] returns it, or, for an application that must
//! first put it somewhere safe, when it calls [`Mailbox::ack`] after
//! [`Mailbox::recv_unacked`]. One it never took is offered again on the next run. With a
//! state directory, sessions, the duplicate memory and unfinished sends survive restarts:
//! nothing reported delivered or queued is lost, and nothing is shown twice (but a message
//! being handed over when the process is killed may be shown again).
//!
//! Revocations travel too: every DIRECTORY carries the looked-up cell's revocations, which
//! the core checks and honours (a revoked device is never sealed for), and which the driver
//! keeps in the home's keystore ([`MailboxConfig::home`]) so that the next run honours them
//! before it asks. [`MailboxSender::revoke`] hands the relay one of this cell's revocations.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::e2e::{Directory, LocalDevice, Message, Padding};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::mailbox::{self as core, Commit, Config, Event, Saved};
use cellmesh_core::relay::MsgId;
use rand_core::{OsRng, RngCore as _};
use thiserror::Error;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::identity::DeviceIdentity;
use crate::node::{JoinError, Node, NodeConfig, NodeEvent, PeerInfo, StartError, Transport};
use crate::outbox::Outbox;
use crate::state::{DeviceState, StateError, StateKeys};

pub use cellmesh_core::mailbox::{SendError, Sent, Status};

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
    /// How long after it is submitted a send's outcome is due, the lookup of the recipient's
    /// devices included: queued if the relay stored it, [`SendError::Unknown`] if it was
    /// sealed and no device acknowledged it, [`SendError::NotSent`] if the relay had not
    /// listed the devices yet (a relay that is down).
    pub ack_timeout: Duration,
    /// Messages handed over and not yet taken with [`Mailbox::recv`] before the relay link
    /// pauses.
    pub inbox_capacity: usize,
    /// Sends whose outcome is not known yet; [`Mailbox::submit`] waits while this many are.
    pub max_in_flight: usize,
    /// Whether this mailbox takes messages. One that only sends leaves them all to the relay
    /// for the device's next mailbox that does.
    pub receive: bool,
    /// The directory of the device's durable state (its home): sessions, duplicate memory
    /// and unfinished sends survive restarts, and one process at a time can be the device.
    /// `None` keeps all of it in memory, for this run only.
    pub state: Option<PathBuf>,
    /// The home whose keystore keeps the revocations learned from directories (imported as
    /// `cellmesh import-revocation` would), so that nodes and mailboxes started from it
    /// honour them. `None`: honoured for this run only.
    pub home: Option<PathBuf>,
    /// The node underneath (it does not listen).
    pub node: NodeConfig,
}

impl MailboxConfig {
    /// Defaults for a relay at `relay`, with state in memory only.
    pub fn new(relay: SocketAddr) -> Self {
        Self {
            relay,
            relay_node: None,
            transport: Transport::Tcp,
            padding: Padding::None,
            ack_timeout: Duration::from_secs(10),
            inbox_capacity: 8192,
            max_in_flight: 16_384,
            receive: true,
            state: None,
            home: None,
            node: NodeConfig::default(),
        }
    }
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
    /// The device's state could not be opened or read (or another process holds it).
    #[error(transparent)]
    State(#[from] StateError),
    /// A send or lookup failed.
    #[error(transparent)]
    Send(#[from] SendError),
}

impl MailboxError {
    /// The send's error, if this is one.
    pub fn send_error(&self) -> Option<&SendError> {
        match self {
            Self::Send(e) => Some(e),
            _ => None,
        }
    }
}

/// A running mailbox.
#[derive(Debug)]
pub struct Mailbox {
    sender: MailboxSender,
    messages: mpsc::UnboundedReceiver<Vec<Message>>,
    ready: VecDeque<Message>,
    /// Messages returned by `recv` so far.
    returned: u64,
    /// The count the driver was last woken for.
    notified: u64,
    progress: Arc<Progress>,
    /// Tells the driver to stop, with how many messages the application has.
    closing: watch::Sender<Option<u64>>,
    relay_node: NodeId,
    cell: CellId,
    node: NodeId,
    /// Set by the driver when the relay refused to take this device back: revoked.
    revoked: Arc<std::sync::atomic::AtomicBool>,
    task: Option<JoinHandle<()>>,
}

/// How far the application is: messages it has (a count), and a wake-up for the driver.
#[derive(Debug, Default)]
struct Progress {
    taken: AtomicU64,
    notify: Notify,
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
        self.submit_as(to, body, None).await
    }

    /// Starts a send under an id of the caller's: the message travels alone, and sending it
    /// again under the same id (after [`SendError::Unknown`], or from another run) delivers
    /// it at most once.
    pub async fn submit_as(
        &self,
        to: CellId,
        body: Bytes,
        id: Option<MsgId>,
    ) -> Result<Ticket, MailboxError> {
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed)?;
        let (tx, rx) = oneshot::channel();
        let done = Done {
            tx,
            _permit: permit,
        };
        self.cmds
            .send(Cmd::Send { to, body, id, done })
            .await
            .map_err(|_| SendError::Closed)?;
        Ok(Ticket(rx))
    }

    /// The devices of `cell`, as the relay lists them and checked against the id.
    pub async fn lookup(&self, cell: CellId) -> Result<Directory, MailboxError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Lookup { cell, done })
            .await
            .map_err(|_| SendError::Closed)?;
        Ok(rx.await.unwrap_or(Err(SendError::Closed))?)
    }

    /// Hands the relay `revocation` (this cell's signed revocation of one of its devices, as
    /// [`crate::home::Home::revoke`] makes) and waits for its answer: `Ok` once the relay
    /// keeps it (it then refuses the device and gives the revocation to every sender that
    /// looks the cell up); [`SendError::Refused`] with the relay's code otherwise.
    pub async fn revoke(
        &self,
        revocation: cellmesh_core::token::Token,
    ) -> Result<(), MailboxError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Revoke {
                revocation: Box::new(revocation),
                done,
            })
            .await
            .map_err(|_| SendError::Closed)?;
        Ok(rx.await.unwrap_or(Err(SendError::Closed))?)
    }
}

/// A send in progress: await it for the outcome.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<Sent, SendError>>);

impl std::future::Future for Ticket {
    type Output = Result<Sent, MailboxError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or(Err(SendError::Closed))
                .map_err(MailboxError::Send)
        })
    }
}

/// Where a send's outcome goes; holds its place among the sends in flight until then.
struct Done {
    tx: oneshot::Sender<Result<Sent, SendError>>,
    _permit: OwnedSemaphorePermit,
}

enum Cmd {
    Send {
        to: CellId,
        body: Bytes,
        id: Option<MsgId>,
        done: Done,
    },
    Lookup {
        cell: CellId,
        done: oneshot::Sender<Result<Directory, SendError>>,
    },
    Revoke {
        revocation: Box<cellmesh_core::token::Token>,
        done: oneshot::Sender<Result<(), SendError>>,
    },
}

impl Mailbox {
    /// Opens the device's state (with [`MailboxConfig::state`]), starts a node that does not
    /// listen, joins the relay (which registers this device in its directory) and starts.
    pub async fn connect(unlocked: &Unlocked, config: MailboxConfig) -> Result<Self, MailboxError> {
        let (store, saved) = match &config.state {
            Some(dir) => {
                let dir = dir.clone();
                let keys = StateKeys::new(unlocked);
                let opened = tokio::task::spawn_blocking(move || {
                    let state = DeviceState::open_with(&dir, keys)?;
                    let saved = state.load()?;
                    Ok::<_, StateError>((state, saved))
                })
                .await
                .map_err(|_| SendError::Closed)??;
                (Some(Arc::new(opened.0)), opened.1)
            }
            None => (None, Saved::default()),
        };
        let mut node_config = config.node.clone();
        node_config.listen.clear();
        node_config.bootstrap.clear();
        // Its only peer is the relay, which announces nothing a device acts on.
        node_config.learn_updates = false;
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
                SendError::Directory {
                    cell: node.cell(),
                    error,
                }
            })?;
        let core_config = Config {
            padding: config.padding,
            ack_timeout_ms: u64::try_from(config.ack_timeout.as_millis()).unwrap_or(u64::MAX),
            inbox_capacity: config.inbox_capacity.max(1) as u64,
            receive: config.receive,
        };
        let mut core = core::Mailbox::new(
            local,
            relay.node,
            core_config,
            saved,
            unlocked.keystore.revocations(),
            crate::clock::now(),
            &mut OsRng,
        );
        core.handle_connected();
        let (cmds, cmd_rx) = mpsc::channel(1024);
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let (msg_tx, messages) = mpsc::unbounded_channel();
        let (closing, close_rx) = watch::channel(None);
        let progress = Arc::new(Progress::default());
        let (cell, me) = (node.cell(), node.node_id());
        let outbox = node.sender(relay.node).ok().map(Outbox::new);
        let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let driver = Driver {
            core,
            relay: relay.node,
            relay_addr: config.relay,
            transport: config.transport.clone(),
            connected: true,
            joining: None,
            node,
            outbox,
            store,
            commit: None,
            failed: None,
            to_app: msg_tx,
            progress: Arc::clone(&progress),
            sends: BTreeMap::new(),
            lookups: BTreeMap::new(),
            revokes: BTreeMap::new(),
            home: config.home.clone(),
            imports: Vec::new(),
            revoked: Arc::clone(&revoked),
            next_token: 1,
            incoming: VecDeque::new(),
        };
        Ok(Self {
            sender: MailboxSender { cmds, in_flight },
            messages,
            ready: VecDeque::new(),
            returned: 0,
            notified: 0,
            progress,
            closing,
            relay_node: relay.node,
            cell,
            node: me,
            revoked,
            task: Some(tokio::spawn(driver.run(cmd_rx, events, close_rx))),
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

    /// Starts a send under an id of the caller's (see [`MailboxSender::submit_as`]).
    pub async fn submit_as(
        &self,
        to: CellId,
        body: Bytes,
        id: Option<MsgId>,
    ) -> Result<Ticket, MailboxError> {
        self.sender.submit_as(to, body, id).await
    }

    /// A handle that sends through this mailbox from another task.
    pub fn sender(&self) -> MailboxSender {
        self.sender.clone()
    }

    /// The devices of `cell`, as the relay lists them and checked against the id.
    pub async fn lookup(&self, cell: CellId) -> Result<Directory, MailboxError> {
        self.sender.lookup(cell).await
    }

    /// Hands the relay one of this cell's revocations (see [`MailboxSender::revoke`]).
    pub async fn revoke(
        &self,
        revocation: cellmesh_core::token::Token,
    ) -> Result<(), MailboxError> {
        self.sender.revoke(revocation).await
    }

    /// The next message from another cell; `None` once closed. Once returned it is the
    /// application's: it is acknowledged (end to end, and to the relay).
    pub async fn recv(&mut self) -> Option<Message> {
        let m = self.recv_unacked().await?;
        self.ack();
        Some(m)
    }

    /// The next message, left unacknowledged until [`Mailbox::ack`]: for an application
    /// that must first put it somewhere safe (`cellmesh listen` writes and flushes its line).
    /// What is not acknowledged when the mailbox closes is offered again in the next run.
    pub async fn recv_unacked(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                self.returned += 1;
                return Some(m);
            }
            let chunk = self.messages.recv().await?;
            self.ready.extend(chunk);
        }
    }

    /// Acknowledges every message returned so far.
    pub fn ack(&mut self) {
        let before = self.progress.taken.swap(self.returned, Ordering::AcqRel);
        // The driver also reads the count when it wakes for anything else (at least every
        // 50 ms): woken at once only at the end of what has arrived, or every 64 messages.
        if self.returned > before && (self.ready.is_empty() || self.returned - self.notified >= 64)
        {
            self.notified = self.returned;
            self.progress.notify.notify_one();
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

    /// Whether the mailbox ended because the relay refuses this device as revoked by its
    /// cell (it then stops reconnecting, and [`Mailbox::recv`] returns `None`).
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// This device.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Stops: what was acknowledged stays so, and nothing else is (the relay keeps the rest
    /// for the next run); sends still waiting end with [`SendError::Closed`] (with a state
    /// directory, those reported queued or delivered carry on in the next run).
    pub async fn close(mut self) {
        let taken = self.progress.taken.load(Ordering::Acquire);
        let _ = self.closing.send(Some(taken));
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // Dropped without close: as close, without waiting.
        let taken = self.progress.taken.load(Ordering::Acquire);
        let _ = self.closing.send(Some(taken));
    }
}

struct Driver {
    core: core::Mailbox,
    relay: NodeId,
    relay_addr: SocketAddr,
    transport: Transport,
    connected: bool,
    /// A join of the relay under way: on a task of its own, so that timers, commands and
    /// the store are served while it lasts (against a relay that drops packets, the whole
    /// setup deadline).
    joining: Option<JoinHandle<Result<PeerInfo, JoinError>>>,
    node: Node,
    outbox: Option<Outbox>,
    store: Option<Arc<DeviceState>>,
    /// The commit being written.
    commit: Option<JoinHandle<(Commit, Result<(), StateError>)>>,
    /// A commit that failed, to be written again.
    failed: Option<(Commit, tokio::time::Instant)>,
    to_app: mpsc::UnboundedSender<Vec<Message>>,
    progress: Arc<Progress>,
    sends: BTreeMap<u64, Done>,
    lookups: BTreeMap<u64, oneshot::Sender<Result<Directory, SendError>>>,
    revokes: BTreeMap<u64, oneshot::Sender<Result<(), SendError>>>,
    /// Where learned revocations are kept, and the imports under way (awaited at the end).
    home: Option<PathBuf>,
    imports: Vec<JoinHandle<()>>,
    /// The relay refused this device as revoked: it does not try again.
    revoked: Arc<std::sync::atomic::AtomicBool>,
    next_token: u64,
    /// Payloads from the relay not yet fed to the core (it wanted no more for now).
    incoming: VecDeque<Bytes>,
}

impl Driver {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut events: broadcast::Receiver<NodeEvent>,
        mut closing: watch::Receiver<Option<u64>>,
    ) {
        let mut cmd_buf = Vec::with_capacity(256);
        let mut in_buf = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let progress = Arc::clone(&self.progress);
        let taken = loop {
            self.pump();
            let timer = deadline(self.core.poll_timeout());
            let reading = self.core.wants_input() && self.incoming.is_empty();
            tokio::select! {
                n = cmds.recv_many(&mut cmd_buf, 256) => {
                    if n == 0 {
                        break self.progress.taken.load(Ordering::Acquire);
                    }
                    let now = crate::clock::now();
                    for cmd in cmd_buf.drain(..) {
                        self.command(cmd, now);
                    }
                }
                Ok(()) = closing.changed() => {
                    if let Some(taken) = *closing.borrow_and_update() {
                        break taken;
                    }
                }
                n = self.node.recv_many(&mut in_buf, 256), if reading => {
                    if n == 0 {
                        break self.progress.taken.load(Ordering::Acquire);
                    }
                    self.incoming.extend(
                        in_buf.drain(..).filter(|i| i.from == self.relay).map(|i| i.data),
                    );
                }
                () = progress.notify.notified() => {}
                done = wait_commit(&mut self.commit) => self.committed(done),
                joined = wait_join(&mut self.joining) => {
                    self.joined(joined);
                    if self.revoked.load(Ordering::Acquire) {
                        break self.progress.taken.load(Ordering::Acquire);
                    }
                }
                ev = events.recv() => match ev {
                    Ok(NodeEvent::Left { peer, .. }) if peer.node == self.relay => {
                        self.connected = false;
                        self.outbox = None;
                        self.core.handle_disconnected();
                        self.reconnect();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        break self.progress.taken.load(Ordering::Acquire);
                    }
                    _ => {}
                },
                () = tokio::time::sleep_until(timer) => {
                    self.core.handle_timeout(crate::clock::now());
                }
                _ = tick.tick() => {
                    if !self.connected {
                        self.reconnect();
                    }
                    if let Some((_, at)) = &self.failed
                        && *at <= tokio::time::Instant::now()
                        && let Some((commit, _)) = self.failed.take()
                    {
                        self.write(commit);
                    }
                }
            }
            self.core
                .handle_taken(self.progress.taken.load(Ordering::Acquire));
            self.feed();
        };
        self.finish(taken).await;
    }

    /// Feeds the core what the relay sent, as long as it wants more.
    fn feed(&mut self) {
        let now = crate::clock::now();
        while self.core.wants_input()
            && let Some(data) = self.incoming.pop_front()
        {
            self.core.handle_payload(data, now, &mut OsRng);
        }
    }

    fn command(&mut self, cmd: Cmd, now: cellmesh_core::Instant) {
        let token = self.next_token;
        self.next_token += 1;
        match cmd {
            Cmd::Send { to, body, id, done } => {
                self.sends.insert(token, done);
                self.core.submit(to, body, id, token, now);
            }
            Cmd::Lookup { cell, done } => {
                self.lookups.insert(token, done);
                self.core.lookup(cell, token);
            }
            Cmd::Revoke { revocation, done } => {
                self.revokes.insert(token, done);
                self.core.revoke(*revocation, token);
            }
        }
    }

    /// Carries out what the core asks, in the order its docs give: commits, payloads, events.
    fn pump(&mut self) {
        let now = crate::clock::now();
        if self.commit.is_none()
            && self.failed.is_none()
            && let Some(commit) = self.core.poll_commit(now, &mut OsRng)
        {
            self.write(commit);
        }
        if let Some(outbox) = &self.outbox {
            while let Some(payload) = self.core.poll_transmit(now, &mut OsRng) {
                outbox.send(payload);
            }
        }
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::Sent { token, result } => {
                    if let Some(done) = self.sends.remove(&token) {
                        let _ = done.tx.send(result);
                    }
                }
                Event::Looked { token, result } => {
                    if let Some(done) = self.lookups.remove(&token) {
                        let _ = done.send(result);
                    }
                }
                Event::Messages(messages) => {
                    let _ = self.to_app.send(messages);
                }
                Event::RevokeAnswered { token, result } => {
                    if let Some(done) = self.revokes.remove(&token) {
                        let _ = done.send(result);
                    }
                }
                Event::Revocations(tokens) => self.keep_revocations(tokens),
                _ => {}
            }
        }
    }

    /// Imports revocations a directory taught the core into the home's keystore, off the
    /// driver's thread (each is a keystore rewrite; they are rare).
    fn keep_revocations(&mut self, tokens: Vec<cellmesh_core::token::Token>) {
        let Some(dir) = self.home.clone() else {
            return;
        };
        self.imports.retain(|t| !t.is_finished());
        self.imports.push(tokio::task::spawn_blocking(move || {
            let home = crate::home::Home::new(dir);
            for token in tokens {
                match home.import_revocation(token) {
                    Ok((issuer, key)) => tracing::info!(
                        cell = %CellId::from_key(issuer),
                        node = %NodeId::from_key(key),
                        "kept a revocation learned from the relay's directory"
                    ),
                    Err(e) => tracing::warn!(error = %e, "could not keep a revocation"),
                }
            }
        }));
    }

    /// Starts writing `commit`: to the store, or (state in memory) at once.
    fn write(&mut self, commit: Commit) {
        match &self.store {
            None => {
                self.core.handle_committed(commit.id);
                // What waited for it may now go out.
                self.pump();
            }
            Some(store) => {
                let store = Arc::clone(store);
                self.commit = Some(tokio::task::spawn_blocking(move || {
                    let result = store.commit(&commit.ops);
                    (commit, result)
                }));
            }
        }
    }

    fn committed(&mut self, done: Option<(Commit, Result<(), StateError>)>) {
        self.commit = None;
        match done {
            Some((commit, Ok(()))) => self.core.handle_committed(commit.id),
            Some((commit, Err(e))) => {
                // Nothing of it was applied: what waits for it stays waiting, and it is
                // written again in a second.
                tracing::error!(error = %e, "cannot save the device's state; retrying");
                self.failed = Some((commit, tokio::time::Instant::now() + Duration::from_secs(1)));
            }
            None => tracing::error!("the state writer failed"),
        }
    }

    /// Starts joining the relay again (pinned to the same node), unless a join is under way.
    fn reconnect(&mut self) {
        if self.joining.is_none() {
            self.joining = Some(self.node.spawn_join(
                self.relay_addr,
                self.transport.clone(),
                Some(self.relay),
            ));
        }
    }

    /// A join started by [`Driver::reconnect`] ended.
    fn joined(&mut self, result: Option<Result<PeerInfo, JoinError>>) {
        self.joining = None;
        match result {
            Some(Ok(_)) => {
                tracing::info!(relay = %self.relay, "reconnected to the relay");
                let Ok(link) = self.node.sender(self.relay) else {
                    return;
                };
                self.outbox = Some(Outbox::new(link));
                self.connected = true;
                self.core.handle_connected();
            }
            Some(Err(JoinError::Refused {
                code: cellmesh_core::wire::NackCode::Revoked,
                reason,
                ..
            })) => {
                tracing::error!(%reason, "the relay refuses this device: its cell revoked it");
                self.revoked.store(true, Ordering::Release);
            }
            Some(Err(e)) => tracing::debug!(error = %e, "relay still unreachable"),
            None => tracing::error!("the task joining the relay failed"),
        }
    }

    /// Closes the core with what the application has, writes its last commits and payloads
    /// (DELIVERED above all: without it the relay hands the same messages to the next run),
    /// and stops.
    async fn finish(mut self, taken: u64) {
        self.core.handle_taken(taken);
        self.core.close(taken);
        let patience = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            self.pump();
            if self.core.is_idle() && self.commit.is_none() {
                break;
            }
            match &mut self.commit {
                Some(_) => {
                    let done = tokio::select! {
                        done = wait_commit(&mut self.commit) => done,
                        () = tokio::time::sleep_until(patience) => break,
                    };
                    self.committed(done);
                }
                // Nothing to wait for but the link: what is left goes, or not.
                None => break,
            }
        }
        self.pump();
        for (_, done) in std::mem::take(&mut self.sends) {
            let _ = done.tx.send(Err(SendError::Closed));
        }
        if let Some(joining) = self.joining.take() {
            joining.abort();
        }
        for (_, done) in std::mem::take(&mut self.revokes) {
            let _ = done.send(Err(SendError::Closed));
        }
        // The keystore has what the directories taught before the process may end.
        for import in std::mem::take(&mut self.imports) {
            let _ = import.await;
        }
        if let Some(outbox) = self.outbox.take() {
            outbox.finish(Duration::from_secs(2)).await;
        }
        self.node.shutdown(Duration::from_secs(1)).await;
    }
}

async fn wait_commit(
    commit: &mut Option<JoinHandle<(Commit, Result<(), StateError>)>>,
) -> Option<(Commit, Result<(), StateError>)> {
    match commit {
        Some(task) => task.await.ok(),
        None => std::future::pending().await,
    }
}

async fn wait_join(
    joining: &mut Option<JoinHandle<Result<PeerInfo, JoinError>>>,
) -> Option<Result<PeerInfo, JoinError>> {
    match joining {
        Some(task) => task.await.ok(),
        None => std::future::pending().await,
    }
}

fn deadline(at: Option<cellmesh_core::Instant>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    match at {
        Some(at) => now + Duration::from_millis(at.millis_since(crate::clock::now())),
        None => now + Duration::from_secs(3600),
    }
}

/// A fresh random message id.
pub fn random_id() -> MsgId {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    MsgId(id)
}
