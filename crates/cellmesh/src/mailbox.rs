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
//! A send resolves as *delivered* when any device of the recipient cell acknowledges it end to
//! end, as *queued* when the relay stored it for every device it did not push to, or fails
//! with the relay's refusal. Until then its envelopes are kept: they are sent again when the
//! relay link comes back, and sealed anew when a recipient device lost its session (RESET).
//! A received message is handed to the application before the relay is told DELIVERED, and
//! message ids are remembered, so a redelivery after a crash is dropped, not shown twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellmesh_core::e2e::{
    Directory, DirectoryError, Endpoint, LocalDevice, Message, Opened, Padding, RemoteDevice,
    SealError,
};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::relay::{Accepted, MsgId, Record, RefuseCode, put_record, records};
use cellmesh_core::wire::MAX_PAYLOAD;
use rand_core::OsRng;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::identity::DeviceIdentity;
use crate::node::{JoinError, Node, NodeConfig, NodeEvent, StartError};

/// How a mailbox connects.
#[derive(Clone, Debug)]
pub struct MailboxConfig {
    /// The relay's address.
    pub relay: SocketAddr,
    /// The relay's node id, if known: the link refuses any other node there.
    pub relay_node: Option<NodeId>,
    /// Pad bodies to hide their size.
    pub padding: Padding,
    /// How long a send waits for an end-to-end acknowledgement after the relay pushed it.
    pub ack_timeout: Duration,
    /// Messages received but not yet taken by [`Mailbox::recv`] before the relay link pauses.
    pub inbox_capacity: usize,
    /// The node underneath (it does not listen).
    pub node: NodeConfig,
}

impl MailboxConfig {
    /// Defaults for a relay at `relay`.
    pub fn new(relay: SocketAddr) -> Self {
        Self {
            relay,
            relay_node: None,
            padding: Padding::None,
            ack_timeout: Duration::from_secs(10),
            inbox_capacity: 8192,
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
    cmds: mpsc::Sender<Cmd>,
    messages: mpsc::Receiver<Message>,
    relay_node: NodeId,
    cell: CellId,
    node: NodeId,
    task: JoinHandle<()>,
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

enum Cmd {
    Send {
        to: CellId,
        body: Bytes,
        done: oneshot::Sender<Result<Sent, MailboxError>>,
    },
    Lookup {
        cell: CellId,
        done: oneshot::Sender<Result<Directory, MailboxError>>,
    },
    Close,
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
        let relay = match config.relay_node {
            Some(expected) => node.join_node(config.relay, expected).await?,
            None => node.join(config.relay).await?,
        };
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
        let (msg_tx, messages) = mpsc::channel(config.inbox_capacity.max(1));
        let (cell, me) = (node.cell(), node.node_id());
        let revocations = unlocked.keystore.revocations();
        let driver = Driver {
            endpoint: Endpoint::new(local, config.padding),
            relay: relay.node,
            relay_addr: config.relay,
            connected: true,
            config,
            node,
            revocations,
            messages: msg_tx,
            sends: HashMap::new(),
            directories: HashMap::new(),
            lookups: HashMap::new(),
            next_request: 1,
            out: Vec::new(),
        };
        Ok(Self {
            cmds,
            messages,
            relay_node: relay.node,
            cell,
            node: me,
            task: tokio::spawn(driver.run(cmd_rx, events)),
        })
    }

    /// Sends `body` to every device of `to` and waits for the outcome.
    pub async fn send(&self, to: CellId, body: Bytes) -> Result<Sent, MailboxError> {
        self.submit(to, body).await?.await
    }

    /// Starts a send; await the ticket for its outcome. Many sends can be in flight at once.
    pub async fn submit(&self, to: CellId, body: Bytes) -> Result<Ticket, MailboxError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Send { to, body, done })
            .await
            .map_err(|_| MailboxError::Closed)?;
        Ok(Ticket(rx))
    }

    /// The devices of `cell`, as the relay lists them and checked against the id.
    pub async fn lookup(&self, cell: CellId) -> Result<Directory, MailboxError> {
        let (done, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Lookup { cell, done })
            .await
            .map_err(|_| MailboxError::Closed)?;
        rx.await.unwrap_or(Err(MailboxError::Closed))
    }

    /// The next message from another cell; `None` once closed.
    pub async fn recv(&mut self) -> Option<Message> {
        self.messages.recv().await
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

    /// Stops: pending sends fail with [`MailboxError::Closed`].
    pub async fn close(self) {
        let _ = self.cmds.send(Cmd::Close).await;
        let _ = self.task.await;
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

struct PendingSend {
    body: Bytes,
    devices: HashMap<NodeId, (RemoteDevice, Bytes, DevState)>,
    done: Option<oneshot::Sender<Result<Sent, MailboxError>>>,
    deadline: Instant,
    /// Kept until every device acknowledged, or until then: a device that was offline may
    /// come back having lost its session, and ask (RESET) for the message again.
    keep_until: Instant,
}

struct Driver {
    endpoint: Endpoint,
    relay: NodeId,
    relay_addr: SocketAddr,
    connected: bool,
    config: MailboxConfig,
    node: Node,
    revocations: cellmesh_core::device::Revocations,
    messages: mpsc::Sender<Message>,
    sends: HashMap<MsgId, PendingSend>,
    directories: HashMap<CellId, (Directory, Instant)>,
    lookups: HashMap<u32, (CellId, Vec<Waiting>)>,
    next_request: u32,
    /// Records for the relay, flushed at the end of each turn.
    out: Vec<Record>,
}

enum Waiting {
    Send {
        body: Bytes,
        done: oneshot::Sender<Result<Sent, MailboxError>>,
    },
    Lookup(oneshot::Sender<Result<Directory, MailboxError>>),
}

const DIRECTORY_TTL: Duration = Duration::from_secs(30);
/// How long a sent message is kept for devices that have not acknowledged it.
const RETAIN: Duration = Duration::from_secs(24 * 3600);
/// Most messages kept for devices that have not acknowledged them.
const MAX_RETAINED: usize = 65_536;
const RETRY_AFTER: Duration = Duration::from_millis(100);

impl Driver {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut events: broadcast::Receiver<NodeEvent>,
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
                    let mut close = false;
                    for cmd in cmd_buf.drain(..) {
                        match cmd {
                            Cmd::Send { to, body, done } => self.send(to, body, done),
                            Cmd::Lookup { cell, done } => self.lookup(cell, Waiting::Lookup(done)),
                            Cmd::Close => close = true,
                        }
                    }
                    if close {
                        break;
                    }
                }
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
            self.flush().await;
        }
        for (_, mut s) in self.sends.drain() {
            if let Some(done) = s.done.take() {
                let _ = done.send(Err(MailboxError::Closed));
            }
        }
        self.node.shutdown(Duration::from_secs(1)).await;
    }

    fn send(&mut self, to: CellId, body: Bytes, done: oneshot::Sender<Result<Sent, MailboxError>>) {
        if body.len() > cellmesh_core::e2e::MAX_BODY {
            let _ = done.send(Err(SealError::TooLarge(body.len()).into()));
            return;
        }
        match self.directories.get(&to) {
            Some((dir, at)) if at.elapsed() < DIRECTORY_TTL => {
                let dir = dir.clone();
                self.seal_and_forward(&dir, body, done);
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

    fn seal_and_forward(
        &mut self,
        dir: &Directory,
        body: Bytes,
        done: oneshot::Sender<Result<Sent, MailboxError>>,
    ) {
        let id = MsgId::random(&mut OsRng);
        let now = crate::now();
        let mut devices = HashMap::new();
        for device in &dir.devices {
            match self.endpoint.seal(device, id, now, &body, &mut OsRng) {
                Ok(envelope) => {
                    self.out.push(Record::Forward {
                        to: device.node(),
                        id,
                        envelope: envelope.clone(),
                    });
                    devices.insert(device.node(), (device.clone(), envelope, DevState::Sent));
                }
                Err(e) => {
                    let _ = done.send(Err(e.into()));
                    return;
                }
            }
        }
        if self.sends.len() >= MAX_RETAINED {
            let resolved: Vec<MsgId> = self
                .sends
                .iter()
                .filter(|(_, s)| s.done.is_none())
                .map(|(id, _)| *id)
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
        let now = Instant::now();
        self.sends.insert(
            id,
            PendingSend {
                body,
                devices,
                done: Some(done),
                deadline: now + self.config.ack_timeout,
                keep_until: now + RETAIN,
            },
        );
    }

    async fn incoming(&mut self, batch: &mut Vec<crate::node::Incoming>) {
        let mut delivered = Vec::new();
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
                        self.deliver(from, id, &envelope).await;
                        delivered.push(id);
                    }
                    _ => tracing::debug!("relay sent a device-only record"),
                }
            }
        }
        for reply in self.endpoint.poll_acks(&mut OsRng) {
            self.out.push(Record::Forward {
                to: reply.to,
                id: reply.id,
                envelope: reply.envelope,
            });
        }
        for ids in delivered.chunks(cellmesh_core::relay::MAX_IDS) {
            self.out.push(Record::Delivered(ids.to_vec()));
        }
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
        if let Ok(dir) = &result {
            self.directories.insert(cell, (dir.clone(), Instant::now()));
        }
        for w in waiters {
            match (w, &result) {
                (Waiting::Lookup(done), Ok(dir)) => {
                    let _ = done.send(Ok(dir.clone()));
                }
                (Waiting::Send { body, done }, Ok(dir)) => {
                    let dir = dir.clone();
                    self.seal_and_forward(&dir, body, done);
                }
                (Waiting::Lookup(done), Err(e)) => {
                    let _ = done.send(Err(copy_error(e)));
                }
                (Waiting::Send { done, .. }, Err(e)) => {
                    let _ = done.send(Err(copy_error(e)));
                }
            }
        }
    }

    fn relay_answer(&mut self, to: NodeId, id: MsgId, answer: Result<Accepted, RefuseCode>) {
        let Some(send) = self.sends.get_mut(&id) else {
            return;
        };
        let Some((_, _, state)) = send.devices.get_mut(&to) else {
            return;
        };
        if *state != DevState::Sent {
            return;
        }
        *state = match answer {
            Ok(Accepted::Pushed) => DevState::Pushed,
            Ok(Accepted::Queued) => DevState::Queued,
            Err(code) if code.is_transient() => DevState::Retry(Instant::now() + RETRY_AFTER),
            Err(code) => DevState::Refused(code),
        };
        self.settle(id);
    }

    async fn deliver(&mut self, from: NodeId, id: MsgId, envelope: &[u8]) {
        let opened = self.endpoint.open(
            from,
            id,
            envelope,
            crate::now(),
            &self.revocations,
            &mut OsRng,
        );
        match opened {
            Ok(Opened::Message(m)) => {
                if self.messages.send(m).await.is_err() {
                    tracing::debug!("nobody receives messages any more");
                }
            }
            Ok(Opened::Duplicate(id)) => tracing::debug!(%id, "dropped a duplicate"),
            Ok(Opened::Acked { from, ids }) => {
                for id in ids {
                    if let Some(send) = self.sends.get_mut(&id)
                        && let Some(dev) = send.devices.get_mut(&from)
                    {
                        dev.2 = DevState::Acked;
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
            Err(e) => tracing::warn!(%from, %id, error = %e, "refused an envelope"),
        }
    }

    /// A device lost its session with us: seal what it has not acknowledged again.
    fn resend_to(&mut self, device: NodeId) {
        let now = crate::now();
        for (id, send) in &mut self.sends {
            if let Some((remote, envelope, state)) = send.devices.get_mut(&device)
                && matches!(state, DevState::Sent | DevState::Pushed | DevState::Queued)
                && let Ok(fresh) = self.endpoint.seal(remote, *id, now, &send.body, &mut OsRng)
            {
                *envelope = fresh.clone();
                *state = DevState::Sent;
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
        let states: Vec<&DevState> = send.devices.values().map(|(_, _, s)| s).collect();
        let n = states.len();
        let acked = states.iter().any(|s| **s == DevState::Acked);
        let queued = states.iter().any(|s| **s == DevState::Queued);
        let waiting = states
            .iter()
            .any(|s| matches!(s, DevState::Sent | DevState::Retry(_) | DevState::Pushed));
        let outcome = if acked {
            Some(Ok(Status::Delivered))
        } else if !waiting && queued {
            Some(Ok(Status::Queued))
        } else if !waiting {
            let code = states.iter().find_map(|s| match s {
                DevState::Refused(c) => Some(*c),
                _ => None,
            });
            Some(Err(MailboxError::Refused(
                code.unwrap_or(RefuseCode::Other(0)),
            )))
        } else {
            None
        };
        if let Some(outcome) = outcome
            && let Some(done) = send.done.take()
        {
            let _ = done.send(outcome.map(|status| Sent {
                id,
                status,
                devices: n,
            }));
        }
        let settled = states
            .iter()
            .all(|s| matches!(s, DevState::Acked | DevState::Refused(_)));
        if settled {
            self.sends.remove(&id);
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (id, send) in &mut self.sends {
            for (node, (_, envelope, state)) in &mut send.devices {
                if let DevState::Retry(at) = state
                    && *at <= now
                {
                    *state = DevState::Sent;
                    self.out.push(Record::Forward {
                        to: *node,
                        id: *id,
                        envelope: envelope.clone(),
                    });
                }
            }
            if (send.deadline <= now && send.done.is_some()) || send.keep_until <= now {
                expired.push(*id);
            }
        }
        for id in expired {
            let Some(send) = self.sends.get_mut(&id) else {
                continue;
            };
            if send.keep_until <= now {
                tracing::debug!(%id, "forgetting a message some device never acknowledged");
            }
            let queued = send
                .devices
                .values()
                .any(|(_, _, s)| *s == DevState::Queued);
            let pushed = send
                .devices
                .values()
                .any(|(_, _, s)| *s == DevState::Pushed);
            if let Some(done) = send.done.take() {
                let outcome = if queued {
                    Ok(Sent {
                        id,
                        status: Status::Queued,
                        devices: send.devices.len(),
                    })
                } else if pushed {
                    Err(MailboxError::NotAcknowledged)
                } else {
                    Err(MailboxError::Timeout)
                };
                let _ = done.send(outcome);
            }
            if send.keep_until <= now
                || !send
                    .devices
                    .values()
                    .any(|(_, _, s)| *s == DevState::Queued)
            {
                self.sends.remove(&id);
            }
        }
    }

    /// Joins the relay again (pinned to the same node) and sends again every envelope it has
    /// not answered, and every lookup.
    async fn reconnect(&mut self) {
        match self.node.join_node(self.relay_addr, self.relay).await {
            Ok(_) => {
                tracing::info!(relay = %self.relay, "reconnected to the relay");
                self.connected = true;
                let sends = &self.sends;
                self.out.retain(|r| match r {
                    Record::Forward { id, .. } => !sends.contains_key(id),
                    Record::Lookup { .. } => false,
                    _ => true,
                });
                for (id, send) in &mut self.sends {
                    for (node, (_, envelope, state)) in &mut send.devices {
                        if matches!(state, DevState::Sent | DevState::Pushed) {
                            *state = DevState::Sent;
                            self.out.push(Record::Forward {
                                to: *node,
                                id: *id,
                                envelope: envelope.clone(),
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

    async fn flush(&mut self) {
        if self.out.is_empty() || !self.connected {
            return;
        }
        let Ok(sender) = self.node.sender(self.relay) else {
            self.connected = false;
            return;
        };
        let mut buf = Vec::new();
        for r in self.out.drain(..) {
            if !buf.is_empty() && buf.len() + 4 + r.encoded_len() > MAX_PAYLOAD {
                let _ = sender.send(Bytes::from(std::mem::take(&mut buf))).await;
            }
            put_record(&mut buf, &r);
        }
        if !buf.is_empty() {
            let _ = sender.send(Bytes::from(buf)).await;
        }
    }
}

fn copy_error(e: &MailboxError) -> MailboxError {
    match e {
        MailboxError::UnknownCell(c) => MailboxError::UnknownCell(*c),
        MailboxError::Directory { cell, error } => MailboxError::Directory {
            cell: *cell,
            error: error.clone(),
        },
        _ => MailboxError::Closed,
    }
}
