//! A cellmesh node on tokio: listeners, one driver task per connection, the peer table.
//!
//! ```text
//!  TcpListener ──accept──► limits ─[TLS]─[WS?]─► driver task ───────────────────────┐
//!  Node::join ───dial────► limits ─[TLS]─[WS]──► driver task ───────────────────────┤
//!    limits (core NodeState::accept/dial); TLS, WebSocket when set                  │
//!    at JOIN (inbound): NodeState::admit (join rates, joined caps, `admit`)         │
//!                                                                                   │
//!  driver task (one per connection; owns the socket and the core Connection):       │
//!    socket bytes ─► Connection::handle_input ─► data ─► inbox                      │
//!                                                └─► joins, refusals, UPDATEs ─► NodeState
//!    Cmd (send, update, close) ─► Connection ─► poll_transmit ─► one batched write
//!    timer ─► Connection::handle_timeout (setup deadline, keepalive, idle)          │
//!                                                                                   │
//!  Shared: the core NodeState (peer table, limits, bootstrap, renewal) and each ◄───┘
//!  connection's command sender; NodeState's actions (dial, UPDATE, close, events,
//!  reconfigure) are applied under its lock, its timers run in one task.
//! ```
//!
//! All protocol decisions are the core's ([`cellmesh_core::node::NodeState`] for the node,
//! [`Connection`] for each link); this module moves bytes, keeps time and applies what they
//! decide. Writing is a `select!` branch next to reading, so two peers that both send faster
//! than the other reads cannot deadlock; commands are taken only while the write backlog is
//! under a high-water mark, which is the back-pressure an application feels through
//! [`PeerSender::send`]. Received data goes to an inbox bounded in messages and in bytes: an
//! application that does not read stops its peers' connections from being read, and TCP
//! pushes back on them. What waits in each connection's command queue is counted in bytes
//! ([`PeerSender::queued_bytes`], [`Node::queued_bytes`]), for callers that bound memory.
//!
//! Per-address limits count an IPv4 address, or an IPv6 /64, as one address
//! ([`AddrGroup`]): one subscriber holds a whole /64.
//!
//! TLS ([`NodeConfig::tls`], [`Transport::Tls`]) and WebSocket ([`NodeConfig::websocket`],
//! [`Transport::WebSocket`], see [`crate::ws`]) are optional outer layers for standard ports;
//! the link inside is the same. Their handshakes run before the driver starts, holding the
//! connection's limit slots and within its setup deadline; a listener that also accepts
//! WebSocket first looks at each connection's opening bytes (`WS?`: `GET ` is an upgrade).
//! The driver is generic over the two halves of the stream: plain TCP keeps `into_split` (no
//! lock), TLS and WebSocket use `tokio::io::split`, and are flushed whenever the backlog
//! empties (rustls buffers records, tungstenite messages).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::connection::{Check, Connection, ConnectionConfig, Event, JoinPolicy, Refusal};
use cellmesh_core::device::{BindError, DeviceBinding, Revocations};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keystore::DeviceSecrets;
use cellmesh_core::node::{Action, ConnId, JoinFailure, NoRoom, NodeRules, NodeState};
pub use cellmesh_core::node::{NodeEvent, NodeLimits, PeerInfo};
use cellmesh_core::token::{RealmAnchor, Token, VerifiedToken};
use cellmesh_core::wire::{CloseCode, MAX_PAYLOAD, NackCode};
use rand_core::OsRng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::home::Unlocked;
use crate::identity::{DeviceIdentity, IdentityError};
use crate::tls::{ClientConfig, ServerConfig, ServerName, TlsFailure};
use crate::ws::{BoxedIo, Opening, WebSocketIo, WsRequest};

/// Write backlog above which a connection stops taking new commands.
const HIGH_WATER: usize = 1 << 20;
/// Write backlog above which a connection also stops reading. Commands alone never get it
/// there (they stop at HIGH_WATER, overshooting by at most one message), so two peers both
/// sending cannot deadlock on it; only replies the peer provokes (PONGs) while it does not
/// read can, and reading stops before they take more memory.
const READ_STOP: usize = HIGH_WATER + (2 << 20);
/// Commands applied per wake-up before writing.
const CMD_BATCH: usize = 1024;
/// Read buffer sizes: small while a connection is quiet, doubled while reads fill it.
const READ_MIN: usize = 4 * 1024;
const READ_MAX: usize = 256 * 1024;

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Addresses to listen on (none: a node that only dials out).
    pub listen: Vec<SocketAddr>,
    /// Nodes to join on start. Connection failures are retried with backoff for about 15 s
    /// (a peer may still be starting); refusals are final. Outcomes arrive as events.
    pub bootstrap: Vec<SocketAddr>,
    /// Who may join.
    pub policy: JoinPolicy,
    /// The realm joiners must belong to.
    pub realm: Option<RealmAnchor>,
    /// Revocations to honour.
    pub revocations: Revocations,
    /// Bounds on connections and joins (see [`NodeLimits`]; beyond each: NACK `busy`).
    pub limits: NodeLimits,
    /// A last check on every inbound join, after the node's own limits (a relay's
    /// registrations); a refusal gives the slots back.
    pub admit: Option<JoinCheck>,
    /// Tell joined peers of each node that joins this one (UPDATE, PROTOCOL 10): the mesh's
    /// peer exchange, shown as `learned` by `cellmesh node`. A relay turns it off: its devices
    /// need no list of each other, and each join would cost every one of them a message.
    pub announce_joins: bool,
    /// Verify UPDATEs from peers and report them ([`NodeEvent::Learned`]). When false they
    /// are ignored unread (a device on a relay has no use for them).
    pub learn_updates: bool,
    /// Deadline from connect to joined.
    pub setup_timeout: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Close after this long without hearing from a peer.
    pub idle_timeout: Duration,
    /// Received messages buffered before the node stops reading from its peers.
    pub inbox_capacity: usize,
    /// Bytes of received messages buffered before the node stops reading from its peers
    /// (counted until [`Node::recv`] or [`Node::recv_many`] takes them). A message larger
    /// than this counts as this much.
    pub inbox_bytes: usize,
    /// Commands buffered per connection before senders wait.
    pub send_capacity: usize,
    /// How often the node re-mints its node token (valid for a day) and identity token.
    pub token_renewal: Duration,
    /// TLS on every listener (see [`crate::tls::server_config`]): connections run a TLS
    /// handshake, within `setup_timeout` and the unauthenticated limits, before the link's.
    pub tls: Option<Arc<ServerConfig>>,
    /// Also accept WebSocket connections on every listener (after TLS when `tls` is set): a
    /// connection whose first bytes are `GET ` is an HTTP upgrade, anything else a link as
    /// before. Telling them apart and the WebSocket handshake run within `setup_timeout` and
    /// the unauthenticated limits.
    pub websocket: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            bootstrap: Vec::new(),
            policy: JoinPolicy::default(),
            realm: None,
            revocations: Revocations::new(),
            limits: NodeLimits::default(),
            admit: None,
            announce_joins: true,
            learn_updates: true,
            setup_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            inbox_capacity: 8192,
            inbox_bytes: 64 << 20,
            send_capacity: 8192,
            token_renewal: Duration::from_secs(12 * 3600),
            tls: None,
            websocket: false,
        }
    }
}

/// A check on inbound joins ([`NodeConfig::admit`]): the core's [`Check`], named for `Debug`.
#[derive(Clone)]
pub struct JoinCheck(pub Check);

impl std::fmt::Debug for JoinCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinCheck(..)")
    }
}

/// How [`Node::join_with`] reaches a peer.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum Transport {
    /// Plain TCP.
    #[default]
    Tcp,
    /// TLS over TCP, to a listener with [`NodeConfig::tls`] set.
    Tls {
        /// The name the peer's certificate must be valid for (a DNS name or an IP address).
        server_name: ServerName<'static>,
        /// Roots and protocol versions (see [`crate::tls::client_config`]).
        config: Arc<ClientConfig>,
    },
    /// WebSocket, over TCP (`ws://`) or over TLS (`wss://`), to a listener with
    /// [`NodeConfig::websocket`] set.
    WebSocket {
        /// The upgrade request's `Host` and path (the address dialed is given apart).
        request: WsRequest,
        /// TLS under the WebSocket, for `wss://`: the name the peer's certificate must be
        /// valid for, and roots and protocol versions (see [`crate::tls::client_config`]).
        /// `None` for `ws://`.
        tls: Option<(ServerName<'static>, Arc<ClientConfig>)>,
    },
}

/// Application data received from a peer.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The sending node.
    pub from: NodeId,
    /// Its cell.
    pub cell: CellId,
    /// The data.
    pub data: Bytes,
}

/// Starting a node failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The node's tokens could not be made.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A join did not complete.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The TCP connection failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// The TLS handshake under the link failed.
    #[error("TLS with {addr} failed: {reason}")]
    Tls {
        /// The address.
        addr: SocketAddr,
        /// Whether the peer's certificate was refused, or the handshake failed otherwise.
        failure: TlsFailure,
        /// rustls's reason.
        reason: String,
    },
    /// The WebSocket handshake under the link failed: the peer does not speak WebSocket (a
    /// listener without [`NodeConfig::websocket`]), refused the upgrade, or timed out.
    #[error("WebSocket with {addr} failed: {reason}")]
    WebSocket {
        /// The address.
        addr: SocketAddr,
        /// The HTTP status of a refused upgrade (404 for a wrong path, say), when there was one.
        status: Option<u16>,
        /// What failed.
        reason: String,
    },
    /// The peer refused us.
    #[error("{addr} refused the join ({}): {reason}", code.name())]
    Refused {
        /// The address.
        addr: SocketAddr,
        /// The NACK code.
        code: NackCode,
        /// Detail.
        reason: String,
    },
    /// The handshake or join failed otherwise.
    #[error("join with {addr} failed: {reason}")]
    Failed {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// This node is at its connection limit.
    #[error("connection limit reached")]
    Busy,
    /// This node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
}

/// Sending to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// No joined peer with that node id.
    #[error("no joined peer {0}")]
    UnknownPeer(NodeId),
    /// The connection closed.
    #[error("connection closed")]
    Closed,
    /// Over [`MAX_PAYLOAD`].
    #[error("message of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
}

/// Why [`PeerSender::try_send`] did not queue.
#[derive(Debug)]
#[non_exhaustive]
pub enum TrySendError {
    /// The connection's buffer is full: here is the payload back.
    Full(Bytes),
    /// The connection closed.
    Closed,
    /// Over [`MAX_PAYLOAD`].
    TooLarge(usize),
}

enum Cmd {
    Send(Bytes),
    Update(Arc<DeviceBinding>),
}

type JoinReply = oneshot::Sender<Result<PeerInfo, JoinError>>;

struct ConnEntry {
    tx: mpsc::Sender<Cmd>,
    /// Bytes of `Cmd::Send` in `tx`'s queue.
    queued: Arc<AtomicUsize>,
    /// Closing does not queue behind commands: a peer that does not read keeps the command
    /// queue full, and it is the one most likely to be closed.
    close: watch::Sender<Option<(CloseCode, &'static str)>>,
}

impl ConnEntry {
    /// Asks the connection's driver to close it (the first reason given wins).
    fn close(&self, code: CloseCode, reason: &'static str) {
        self.close.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some((code, reason));
            }
            first
        });
    }
}

struct State {
    /// Every decision: limits, admission, the peer table, bootstrap, renewal.
    core: NodeState,
    /// The drivers' channels, from the start of each connection's link to its end.
    conns: HashMap<ConnId, ConnEntry>,
    /// Where the dials [`Node::join`] made wait for their outcome, with their address.
    replies: HashMap<ConnId, (SocketAddr, JoinReply)>,
}

/// One connection the core counts, from [`NodeState::accept`] or [`NodeState::dial`] to its
/// end: dropping it (whatever ends the task: an error, the end of the link, a panic) tells the
/// core, which frees its slots and reports it, and forgets the driver's channels.
struct Counted {
    shared: Arc<Shared>,
    id: ConnId,
    /// Whether its link started (a driver ran it): the end is then `closed`, else `abandoned`.
    linked: bool,
    reason: String,
}

impl Counted {
    fn new(shared: &Arc<Shared>, id: ConnId) -> Self {
        Self {
            shared: Arc::clone(shared),
            id,
            linked: false,
            reason: "connection task ended".into(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let reason = std::mem::take(&mut self.reason);
        let (id, linked) = (self.id, self.linked);
        self.shared.with_state(|state| {
            state.conns.remove(&id);
            if linked {
                state.core.closed(id, reason);
            } else {
                state.core.abandoned(id, reason, now());
            }
        });
        // After the core's outcome went out: what is left waits for nothing.
        self.shared.state().replies.remove(&id);
        self.shared.gone.notify_waiters();
    }
}

/// The check an inbound connection runs last on its JOIN: the core's admission for it.
fn admission(shared: &Arc<Shared>, id: ConnId) -> Check {
    let shared = Arc::downgrade(shared);
    Arc::new(move |binding: &DeviceBinding| {
        let Some(shared) = shared.upgrade() else {
            return Err(Refusal::new(NackCode::Busy, "node is shutting down"));
        };
        shared.with_core(|core| core.admit(id, binding, now()))
    })
}

struct Shared {
    /// The configuration new connections start with; replaced when tokens are renewed or
    /// revocations added. Connections keep the one they started with.
    config: Mutex<Arc<ConnectionConfig>>,
    node_config: NodeConfig,
    secrets: DeviceSecrets,
    advertise: Option<SocketAddr>,
    state: Mutex<State>,
    events: broadcast::Sender<NodeEvent>,
    inbox: mpsc::Sender<Incoming>,
    /// Bytes the inbox may still take (see [`inbox_cost`]).
    inbox_room: Semaphore,
    /// Bytes of `Cmd::Send` in every connection's command queue.
    queued: Arc<AtomicUsize>,
    /// Woken when a connection's driver is gone.
    gone: Notify,
    /// Woken when the core's next deadline may have moved.
    timers: Notify,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated in a way that
        // matters more than losing the node; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection_config(&self) -> Arc<ConnectionConfig> {
        Arc::clone(&self.config.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Mints fresh tokens and a configuration with `revocations`.
    fn refresh(&self, revocations: Revocations) -> Result<(), IdentityError> {
        let config = build_config(
            &self.secrets,
            self.advertise,
            &self.node_config,
            revocations,
        )?;
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        Ok(())
    }

    fn emit(&self, event: NodeEvent) {
        match &event {
            NodeEvent::Joined(p) => {
                tracing::info!(peer = %p.node, cell = %p.cell, addr = %p.addr, inbound = p.inbound, "joined");
            }
            NodeEvent::JoinRefused {
                addr,
                node,
                cell,
                code,
                reason,
                by_peer,
            } => {
                tracing::info!(%node, %cell, %addr, code = code.name(), %reason, by_peer, "join refused");
            }
            NodeEvent::Failed { addr, reason } => {
                tracing::debug!(%addr, %reason, "connection failed");
            }
            _ => {}
        }
        // No subscriber is fine: events are informational.
        let _ = self.events.send(event);
    }

    /// Runs `f` on the core, then applies what it decided.
    fn with_core<T>(self: &Arc<Self>, f: impl FnOnce(&mut NodeState) -> T) -> T {
        self.with_state(|state| f(&mut state.core))
    }

    /// Runs `f` on the state, then applies what the core decided: under the lock, except the
    /// dials, started once it is released (a task that cannot start ends its connection,
    /// which takes the lock).
    fn with_state<T>(self: &Arc<Self>, f: impl FnOnce(&mut State) -> T) -> T {
        let mut dials = Vec::new();
        let out = {
            let mut state = self.state();
            let out = f(&mut state);
            self.apply(&mut state, &mut dials);
            out
        };
        for (conn, addr) in dials {
            let counted = Counted::new(self, conn);
            tokio::spawn(async move {
                let shared = Arc::clone(&counted.shared);
                // Its outcome, and a retry, are the core's to decide.
                let _ = open(&shared, counted, addr, &Transport::Tcp, None).await;
            });
        }
        out
    }

    /// Applies the core's actions, in order, but for dials, which go to `dials`.
    fn apply(&self, state: &mut State, dials: &mut Vec<(ConnId, SocketAddr)>) {
        let mut reconfigure = false;
        while let Some(action) = state.core.poll_action() {
            match action {
                Action::Dial { conn, addr } => dials.push((conn, addr)),
                Action::Update { conn, about } => {
                    if let Some(c) = state.conns.get(&conn)
                        && c.tx.try_send(Cmd::Update(about)).is_err()
                    {
                        tracing::debug!(conn, "update not queued: send buffer full");
                    }
                }
                Action::Close { conn, code, reason } => {
                    if let Some(c) = state.conns.get(&conn) {
                        c.close(code, reason);
                    }
                }
                Action::JoinOutcome { conn, result } => {
                    if let Some((addr, reply)) = state.replies.remove(&conn) {
                        let _ = reply.send(result.map_err(|failure| match failure {
                            JoinFailure::Refused { code, reason } => {
                                JoinError::Refused { addr, code, reason }
                            }
                            JoinFailure::Failed(reason) => JoinError::Failed { addr, reason },
                        }));
                    }
                }
                Action::Reconfigure { .. } => reconfigure = true,
                Action::Event(event) => self.emit(event),
            }
        }
        if reconfigure {
            match self.refresh(state.core.revocations().clone()) {
                Ok(()) => tracing::debug!("node configuration rebuilt with fresh tokens"),
                Err(e) => tracing::warn!(error = %e, "could not rebuild the node's configuration"),
            }
        }
        self.timers.notify_one();
    }
}

/// A running node. Dropping it without [`Node::shutdown`] aborts its listeners; its
/// connections end when their peers or timers end them.
pub struct Node {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    listeners: Vec<JoinHandle<()>>,
    inbox: mpsc::Receiver<Incoming>,
    /// Subscribed before the bootstrap joins started, for the first subscriber.
    first_events: Mutex<Option<broadcast::Receiver<NodeEvent>>>,
    cell: CellId,
    node: NodeId,
}

impl Node {
    /// Binds the listen addresses, mints this run's tokens, and starts accepting.
    pub async fn start(unlocked: &Unlocked, config: NodeConfig) -> Result<Self, StartError> {
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(l);
        }
        let local_addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let secrets = unlocked.secrets.dangerous_clone();
        let advertise = local_addrs.first().copied();
        let cc = build_config(&secrets, advertise, &config, config.revocations.clone())?;
        let (cell, node) = (
            secrets.cell.cell_id(),
            NodeId::from_key(secrets.node.signing.public()),
        );
        let (events, first_events) = broadcast::channel(1024);
        let (inbox_tx, inbox) = mpsc::channel(config.inbox_capacity.max(1));
        let core = NodeState::new(node, rules(&config), now());
        let shared = Arc::new(Shared {
            config: Mutex::new(Arc::new(cc)),
            secrets,
            advertise,
            inbox_room: Semaphore::new(inbox_limit(&config)),
            queued: Arc::new(AtomicUsize::new(0)),
            state: Mutex::new(State {
                core,
                conns: HashMap::new(),
                replies: HashMap::new(),
            }),
            node_config: config,
            events,
            inbox: inbox_tx,
            gone: Notify::new(),
            timers: Notify::new(),
        });
        let mut listeners: Vec<JoinHandle<()>> = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(Arc::clone(&shared), l)))
            .collect();
        listeners.push(tokio::spawn(run_timers(Arc::clone(&shared))));
        tracing::info!(%cell, %node, addrs = ?local_addrs, "node started");
        // The bootstrap dials the core asked for at its start.
        shared.with_core(|_| ());
        Ok(Self {
            shared,
            local_addrs,
            listeners,
            inbox,
            first_events: Mutex::new(Some(first_events)),
            cell,
            node,
        })
    }

    /// The addresses actually bound (with real ports when `:0` was asked for).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// This node's cell.
    pub fn cell(&self) -> CellId {
        self.cell
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The node token new connections present (renewed every `token_renewal`).
    pub fn node_token(&self) -> Token {
        self.shared.connection_config().local.token().clone()
    }

    /// Honours a revocation from now on: new handshakes and joins refuse what it revokes, and
    /// a joined peer it revokes is disconnected.
    pub fn add_revocation(&self, revocation: &VerifiedToken) -> Result<(), BindError> {
        self.shared
            .with_core(|core| core.add_revocation(revocation))
    }

    /// Closes the session with the joined peer `node` because it broke the application's
    /// protocol (a CLOSE with code `protocol_violation`). False if it is not joined.
    pub fn disconnect(&self, node: NodeId, reason: &'static str) -> bool {
        self.shared.with_core(|core| core.disconnect(node, reason))
    }

    /// Events. The first subscriber receives every event since the node started (bootstrap
    /// outcomes included); later ones, events from the moment they subscribe. Slow
    /// subscribers lose the oldest events (see `broadcast::Receiver`), never block the node.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        let first = self
            .first_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        first.unwrap_or_else(|| self.shared.events.subscribe())
    }

    /// Dials `addr`, runs the handshake and join, and returns the peer once joined.
    pub async fn join(&self, addr: SocketAddr) -> Result<PeerInfo, JoinError> {
        join(&self.shared, addr, &Transport::Tcp, None).await
    }

    /// Dials `addr` for node `expected` only: any other node answering there, however valid
    /// its tokens, is refused before this node's token is sent, so it never learns who dialed.
    pub async fn join_node(
        &self,
        addr: SocketAddr,
        expected: NodeId,
    ) -> Result<PeerInfo, JoinError> {
        join(&self.shared, addr, &Transport::Tcp, Some(expected)).await
    }

    /// Dials `addr` over `transport` (TLS for a listener on a standard port), for node
    /// `expected` only when given (as [`Node::join_node`]), and returns the peer once joined.
    pub async fn join_with(
        &self,
        addr: SocketAddr,
        transport: &Transport,
        expected: Option<NodeId>,
    ) -> Result<PeerInfo, JoinError> {
        join(&self.shared, addr, transport, expected).await
    }

    /// [`Node::join_with`] on a task of its own, for a caller whose loop must not wait for a
    /// join: one to an address that drops packets takes the whole setup deadline.
    pub(crate) fn spawn_join(
        &self,
        addr: SocketAddr,
        transport: Transport,
        expected: Option<NodeId>,
    ) -> JoinHandle<Result<PeerInfo, JoinError>> {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move { join(&shared, addr, &transport, expected).await })
    }

    /// The joined peers.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.shared.state().core.peers().cloned().collect()
    }

    /// The proof by which the joined peer `node` acts for its cell: its node token and its
    /// cell's identity token, both verified at join.
    pub fn binding(&self, node: NodeId) -> Option<DeviceBinding> {
        let state = self.shared.state();
        state.core.peer(&node).map(|(_, p)| (*p.binding).clone())
    }

    /// A handle for sending to the joined peer `node`.
    pub fn sender(&self, node: NodeId) -> Result<PeerSender, SendError> {
        let state = self.shared.state();
        let (conn, _) = state.core.peer(&node).ok_or(SendError::UnknownPeer(node))?;
        let entry = state.conns.get(&conn).ok_or(SendError::UnknownPeer(node))?;
        Ok(PeerSender {
            tx: entry.tx.clone(),
            queued: Arc::clone(&entry.queued),
            total: Arc::clone(&self.shared.queued),
        })
    }

    /// Bytes given to every connection's [`PeerSender`] and not yet taken by its driver (the
    /// command queues; what a driver took waits in its write buffer, at most about 2 MiB).
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// The count behind [`Node::queued_bytes`], for a task that watches it without the node.
    pub(crate) fn queued_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.queued)
    }

    /// Sends `data` to the joined peer `node`, waiting while its send buffer is full.
    pub async fn send(&self, node: NodeId, data: Bytes) -> Result<(), SendError> {
        self.sender(node)?.send(data).await
    }

    /// The next message from any peer; `None` after shutdown.
    pub async fn recv(&mut self) -> Option<Incoming> {
        let msg = self.inbox.recv().await?;
        self.shared
            .inbox_room
            .add_permits(inbox_cost(&self.shared.node_config, msg.data.len()));
        Some(msg)
    }

    /// How many received messages wait in the inbox. Every message of a connection is in the
    /// inbox before the [`NodeEvent::Left`] of its end is sent: a consumer that handles this
    /// many more messages before the departure handles the peer's last words first.
    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Up to `limit` messages at once (at least one, waiting for it); 0 after shutdown.
    pub async fn recv_many(&mut self, buf: &mut Vec<Incoming>, limit: usize) -> usize {
        let start = buf.len();
        let n = self.inbox.recv_many(buf, limit).await;
        let config = &self.shared.node_config;
        let freed: usize = buf[start..]
            .iter()
            .map(|m| inbox_cost(config, m.data.len()))
            .sum();
        self.shared.inbox_room.add_permits(freed);
        n
    }

    /// Stops accepting, closes every connection with a CLOSE, and waits (at most `grace`)
    /// for them to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        for l in self.listeners.drain(..) {
            l.abort();
        }
        self.shared.with_core(NodeState::shutdown);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let gone = self.shared.gone.notified();
            if self.shared.state().conns.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                break;
            }
        }
        tracing::info!(node = %self.node, "node stopped");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for l in &self.listeners {
            l.abort();
        }
    }
}

/// Sends to one peer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PeerSender {
    tx: mpsc::Sender<Cmd>,
    /// Bytes in this connection's command queue, and in every connection's.
    queued: Arc<AtomicUsize>,
    total: Arc<AtomicUsize>,
}

impl PeerSender {
    /// Queues `data`, waiting while the connection's buffer is full.
    pub async fn send(&self, data: Bytes) -> Result<(), SendError> {
        if data.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge(data.len()));
        }
        // Counted before it is queued, so the driver never takes away more than was added.
        let len = self.count(data.len());
        self.tx.send(Cmd::Send(data)).await.map_err(|_| {
            self.uncount(len);
            SendError::Closed
        })
    }

    /// Queues `data` if the connection's buffer has room now. Never waits.
    pub fn try_send(&self, data: Bytes) -> Result<(), TrySendError> {
        if data.len() > MAX_PAYLOAD {
            return Err(TrySendError::TooLarge(data.len()));
        }
        let len = self.count(data.len());
        self.tx.try_send(Cmd::Send(data)).map_err(|e| {
            self.uncount(len);
            match e {
                mpsc::error::TrySendError::Full(Cmd::Send(data)) => TrySendError::Full(data),
                _ => TrySendError::Closed,
            }
        })
    }

    /// Bytes given to this connection and not yet taken by its driver.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn count(&self, len: usize) -> usize {
        self.queued.fetch_add(len, Ordering::Relaxed);
        self.total.fetch_add(len, Ordering::Relaxed);
        len
    }

    fn uncount(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::Relaxed);
        self.total.fetch_sub(len, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(d) => write!(f, "Send({} bytes)", d.len()),
            Self::Update(b) => write!(f, "Update({})", b.node().short()),
        }
    }
}

async fn join(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    transport: &Transport,
    expected: Option<NodeId>,
) -> Result<PeerInfo, JoinError> {
    let id = shared
        .with_core(|core| core.dial(addr))
        .map_err(|e| match e {
            NoRoom::Busy => JoinError::Busy,
            NoRoom::ShuttingDown => JoinError::ShuttingDown,
        })?;
    let counted = Counted::new(shared, id);
    let (tx, rx) = oneshot::channel();
    shared.state().replies.insert(id, (addr, tx));
    open(shared, counted, addr, transport, expected).await?;
    rx.await.unwrap_or(Err(JoinError::Failed {
        addr,
        reason: "connection task ended".into(),
    }))
}

/// A dialed stream with its outer layers, for the link to run on.
enum Dialed {
    Tcp(TcpStream),
    // Boxed, being large; moved out to start the driver.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<BoxedIo>>),
}

/// Connects the counted connection to `addr` over `transport` and starts its driver. A
/// failure to connect, or of TLS or WebSocket, ends it (the core is told why) and is returned.
async fn open(
    shared: &Arc<Shared>,
    mut counted: Counted,
    addr: SocketAddr,
    transport: &Transport,
    expected: Option<NodeId>,
) -> Result<(), JoinError> {
    // Connecting and every outer handshake share the setup deadline.
    let deadline = tokio::time::Instant::now() + shared.node_config.setup_timeout;
    // Made before connecting, so that the outer handshakes count against its setup deadline.
    let conn = Connection::connect_to(shared.connection_config(), expected, now(), &mut OsRng);
    let dialed = match dial_layers(addr, transport, deadline).await {
        Ok(dialed) => dialed,
        Err(e) => {
            counted.reason = match &e {
                JoinError::Connect { reason, .. } => reason.clone(),
                e => e.to_string(),
            };
            return Err(e);
        }
    };
    let shared = Arc::clone(shared);
    match dialed {
        Dialed::Tcp(stream) => {
            let (rd, wr) = stream.into_split();
            tokio::spawn(drive(shared, (rd, wr, false), addr, conn, counted));
        }
        Dialed::Tls(stream) => {
            let (rd, wr) = tokio::io::split(tokio_rustls::TlsStream::from(*stream));
            tokio::spawn(drive(shared, (rd, wr, true), addr, conn, counted));
        }
        Dialed::WebSocket(ws) => {
            let (rd, wr) = tokio::io::split(WebSocketIo::new(*ws));
            tokio::spawn(drive(shared, (rd, wr, true), addr, conn, counted));
        }
    }
    Ok(())
}

/// Connects to `addr` and runs `transport`'s outer handshakes, all by `deadline`.
async fn dial_layers(
    addr: SocketAddr,
    transport: &Transport,
    deadline: tokio::time::Instant,
) -> Result<Dialed, JoinError> {
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(addr))
        .await
        .map_err(|_| JoinError::Connect {
            addr,
            reason: "timed out".into(),
        })?
        .map_err(|e| JoinError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let _ = stream.set_nodelay(true);
    match transport {
        Transport::Tcp => Ok(Dialed::Tcp(stream)),
        Transport::Tls {
            server_name,
            config,
        } => {
            let stream = connect_tls(stream, server_name, config, addr, deadline).await?;
            Ok(Dialed::Tls(Box::new(stream)))
        }
        Transport::WebSocket { request, tls } => {
            let under: BoxedIo = match tls {
                None => Box::new(stream),
                Some((server_name, config)) => {
                    Box::new(connect_tls(stream, server_name, config, addr, deadline).await?)
                }
            };
            let url = request.url(tls.is_some());
            let handshake =
                tokio_tungstenite::client_async_with_config(url, under, Some(crate::ws::config()));
            match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok((ws, _response))) => Ok(Dialed::WebSocket(Box::new(ws))),
                Ok(Err(e)) => {
                    let (status, reason) = crate::ws::describe_client_failure(&e);
                    Err(JoinError::WebSocket {
                        addr,
                        status,
                        reason,
                    })
                }
                Err(_) => Err(JoinError::WebSocket {
                    addr,
                    status: None,
                    reason: "WebSocket handshake timed out".into(),
                }),
            }
        }
    }
}

/// Runs a dialer's TLS handshake by `deadline`.
async fn connect_tls(
    stream: TcpStream,
    server_name: &ServerName<'static>,
    config: &Arc<ClientConfig>,
    addr: SocketAddr,
    deadline: tokio::time::Instant,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, JoinError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
    let handshake = connector.connect(server_name.clone(), stream);
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(JoinError::Tls {
            addr,
            failure: crate::tls::classify(&e),
            reason: e.to_string(),
        }),
        Err(_) => Err(JoinError::Tls {
            addr,
            failure: TlsFailure::Handshake,
            reason: "TLS handshake timed out".into(),
        }),
    }
}

/// The connection configuration for a node: fresh tokens from `secrets`, the node's limits,
/// policy, realm and `revocations`.
fn build_config(
    secrets: &DeviceSecrets,
    advertise: Option<SocketAddr>,
    config: &NodeConfig,
    revocations: Revocations,
) -> Result<ConnectionConfig, IdentityError> {
    let identity = DeviceIdentity::mint(secrets, advertise)?;
    let mut cc = ConnectionConfig::new(identity.local, identity.identity);
    cc.revocations = revocations;
    cc.realm = config.realm.clone();
    cc.policy = config.policy.clone();
    cc.setup_timeout_ms = millis(config.setup_timeout);
    cc.keepalive_ms = millis(config.keepalive);
    cc.idle_timeout_ms = millis(config.idle_timeout);
    cc.accept_updates = config.learn_updates;
    Ok(cc)
}

/// Runs the core's timers (bootstrap retries, token renewal): sleeps to its next deadline,
/// or until a change may have moved it.
async fn run_timers(shared: Arc<Shared>) {
    loop {
        let moved = shared.timers.notified();
        let due = shared.state().core.poll_timeout();
        tokio::select! {
            () = tokio::time::sleep_until(deadline(due)) => {
                shared.with_core(|core| core.handle_timeout(now()));
            }
            () = moved => {}
        }
    }
}

/// The core's rules from a node's configuration.
fn rules(config: &NodeConfig) -> NodeRules {
    NodeRules {
        bootstrap: config.bootstrap.clone(),
        realm: config.realm.clone(),
        revocations: config.revocations.clone(),
        limits: config.limits,
        admit: config
            .admit
            .as_ref()
            .map(|JoinCheck(check)| Arc::clone(check)),
        announce_joins: config.announce_joins,
        token_renewal_ms: millis(config.token_renewal),
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let tls = shared
        .node_config
        .tls
        .as_ref()
        .map(|config| tokio_rustls::TlsAcceptor::from(Arc::clone(config)));
    let websocket = shared.node_config.websocket;
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // At a limit, the core reports it and the connection is dropped.
        let Ok(id) = shared.with_core(|core| core.accept(addr)) else {
            continue;
        };
        let counted = Counted::new(&shared, id);
        let _ = stream.set_nodelay(true);
        // Made before any TLS or WebSocket handshake, so that it counts against the setup
        // deadline.
        let mut conn = Connection::accept(shared.connection_config(), now());
        conn.set_admission(admission(&shared, id));
        if tls.is_none() && !websocket {
            let (rd, wr) = stream.into_split();
            tokio::spawn(drive(
                Arc::clone(&shared),
                (rd, wr, false),
                addr,
                conn,
                counted,
            ));
            continue;
        }
        tokio::spawn(accept_layers(
            Arc::clone(&shared),
            stream,
            tls.clone(),
            addr,
            (conn, counted),
        ));
    }
}

/// What a listener's outer layers leave for the link to run on.
enum Layered {
    Tcp(TcpStream),
    // Boxed, being large (rustls's and tungstenite's state); moved out to start the driver.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<BoxedIo>>),
}

/// Runs a listener's outer layers (holding the connection's limit slots, within its setup
/// deadline): TLS when configured, then when WebSocket is accepted too a look at the opening
/// bytes and for an upgrade the WebSocket handshake. Then drives the link inside them.
async fn accept_layers(
    shared: Arc<Shared>,
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
    (mut conn, mut counted): (Connection, Counted),
) {
    let deadline = tokio::time::Instant::now() + shared.node_config.setup_timeout;
    let websocket = shared.node_config.websocket;
    let layered = outer_layers(stream, tls, websocket, deadline, &mut conn).await;
    let reason = match layered {
        Ok(_) if shared.state().core.is_shutting_down() => "node is shutting down".to_string(),
        Ok(Layered::Tcp(stream)) => {
            let (rd, wr) = stream.into_split();
            return drive(shared, (rd, wr, false), addr, conn, counted).await;
        }
        Ok(Layered::Tls(stream)) => {
            let (rd, wr) = tokio::io::split(tokio_rustls::TlsStream::from(*stream));
            return drive(shared, (rd, wr, true), addr, conn, counted).await;
        }
        Ok(Layered::WebSocket(ws)) => {
            let (rd, wr) = tokio::io::split(WebSocketIo::new(*ws));
            return drive(shared, (rd, wr, true), addr, conn, counted).await;
        }
        Err(reason) => reason,
    };
    tracing::debug!(%addr, %reason, "connection failed before the link");
    // Reported by the core as the connection ends.
    counted.reason = reason;
}

/// The outer layers of an inbound connection, each step by `deadline`; the error is the
/// reason reported in [`NodeEvent::Failed`].
async fn outer_layers(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    websocket: bool,
    deadline: tokio::time::Instant,
    conn: &mut Connection,
) -> Result<Layered, String> {
    let opening_failed = |e: io::Error| format!("reading the opening bytes failed: {e}");
    let opening_timed_out = || "timed out waiting for the opening bytes".to_string();
    let upgrade: BoxedIo = match tls {
        None => {
            if !websocket {
                return Ok(Layered::Tcp(stream));
            }
            match tokio::time::timeout_at(deadline, peek_opening(&stream)).await {
                Ok(Ok(Opening::Link)) => return Ok(Layered::Tcp(stream)),
                Ok(Ok(Opening::WebSocket)) => Box::new(stream),
                Ok(Err(e)) => return Err(opening_failed(e)),
                Err(_) => return Err(opening_timed_out()),
            }
        }
        Some(acceptor) => {
            let mut stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                Err(_) => return Err("TLS handshake timed out".to_string()),
            };
            if !websocket {
                return Ok(Layered::Tls(Box::new(stream)));
            }
            match tokio::time::timeout_at(deadline, read_opening(&mut stream)).await {
                Ok(Ok((Opening::Link, first))) => {
                    // TLS has no peek: the bytes read are the link's first, handed to it here
                    // (fewer than a frame header, so the core only buffers them).
                    conn.handle_input(&first, now(), &mut OsRng);
                    return Ok(Layered::Tls(Box::new(stream)));
                }
                Ok(Ok((Opening::WebSocket, first))) => {
                    Box::new(crate::ws::Rewind::new(first, stream))
                }
                Ok(Err(e)) => return Err(opening_failed(e)),
                Err(_) => return Err(opening_timed_out()),
            }
        }
    };
    let handshake = tokio_tungstenite::accept_async_with_config(upgrade, Some(crate::ws::config()));
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ws)) => Ok(Layered::WebSocket(Box::new(ws))),
        Ok(Err(e)) => Err(format!("WebSocket handshake failed: {e}")),
        Err(_) => Err("WebSocket handshake timed out".to_string()),
    }
}

/// Whether a plain TCP connection opens with an HTTP upgrade, looked at without taking its
/// bytes, which stay for the link or the WebSocket handshake. A connection that ends first is
/// a link (whose driver then sees it end).
async fn peek_opening(stream: &TcpStream) -> io::Result<Opening> {
    let mut first = [0u8; crate::ws::OPENING_LEN];
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(Opening::Link);
        }
        if let Some(opening) = crate::ws::opening(&first[..n]) {
            return Ok(opening);
        }
        // `G`, `GE` or `GET` so far: peek returns at once while they wait, so pause for more.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads the opening bytes of a stream that cannot be peeked (TLS): what the connection is,
/// and the bytes read, which the caller hands on.
async fn read_opening<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(Opening, Bytes)> {
    let mut first = [0u8; crate::ws::OPENING_LEN];
    let mut n = 0;
    loop {
        let got = stream.read(&mut first[n..]).await?;
        n += got;
        let opening = match got {
            0 => Some(Opening::Link),
            _ => crate::ws::opening(&first[..n]),
        };
        if let Some(opening) = opening {
            return Ok((opening, Bytes::copy_from_slice(&first[..n])));
        }
    }
}

/// What the driver learned: whom received data comes from, and why the link closed.
#[derive(Default)]
struct Outcome {
    peer: Option<(NodeId, CellId)>,
    closed: Option<String>,
}

/// Runs one connection to its end. `rd` and `wr` are the two halves of its stream: TCP's
/// owned halves, or TLS's through `tokio::io::split`, whose writer `buffers` (rustls keeps
/// what the socket did not take) and must be flushed.
async fn drive<R, W>(
    shared: Arc<Shared>,
    (mut rd, mut wr, buffers): (R, W, bool),
    addr: SocketAddr,
    mut conn: Connection,
    mut counted: Counted,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = counted.id;
    counted.linked = true;
    let (tx, mut rx) = mpsc::channel(shared.node_config.send_capacity.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    let (close, mut closing) = watch::channel(None);
    {
        let mut state = shared.state();
        // A shutdown that came while the outer layers ran had no driver to tell.
        if state.core.is_shutting_down() {
            conn.close(CloseCode::Shutdown, "node shutting down", now());
        }
        state.conns.insert(
            id,
            ConnEntry {
                tx,
                queued: Arc::clone(&queued),
                close,
            },
        );
    }
    let mut rbuf = vec![0u8; READ_MIN];
    let mut outcome = Outcome::default();
    // A received message the inbox had no room for. While it waits, this connection reads
    // nothing more (that is the back-pressure) but keeps writing, running its timers and
    // taking commands.
    let mut undelivered: Option<Incoming> = None;
    let mut ended = "connection closed".to_string();
    // Written since the last flush (only ever set when the writer buffers).
    let mut unflushed = false;
    let mut timer_due = conn.poll_timeout();
    let timer = tokio::time::sleep_until(deadline(timer_due));
    tokio::pin!(timer);
    loop {
        let mut handed = false;
        while undelivered.is_none() {
            let Some(event) = conn.poll_event() else {
                break;
            };
            let data = matches!(event, Event::Data(_));
            undelivered = on_event(&shared, id, addr, &mut outcome, event);
            handed |= data && undelivered.is_none();
        }
        // Let the receiver run before this task reads again (which only finds the socket
        // empty, most of the time): it waits in this thread's next-to-run slot, which no
        // other thread can take it from.
        if handed {
            tokio::task::yield_now().await;
        }
        if conn.is_closed() && undelivered.is_none() {
            // Flush the last frames (a NACK or CLOSE) briefly, then go.
            let flush = wr.write_all(conn.pending_transmit());
            let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
            break;
        }
        let backlog = conn.pending_transmit().len();
        // The timer is moved only when the connection's deadline (in milliseconds) moved, not
        // re-armed on every pass.
        let due = conn.poll_timeout();
        if due != timer_due || timer.is_elapsed() {
            timer_due = due;
            timer.as_mut().reset(deadline(due));
        }
        let reading = undelivered.is_none() && backlog < READ_STOP && !conn.is_closed();
        tokio::select! {
            r = write_or_flush(&mut wr, conn.pending_transmit()), if backlog > 0 || unflushed => match r {
                Ok(n) => {
                    conn.advance_transmit(n);
                    unflushed = buffers && backlog > 0;
                }
                Err(e) => { ended = format!("write failed: {e}"); break; }
            },
            permit = inbox_place(&shared, undelivered.as_ref().map_or(0, |m| m.data.len())), if undelivered.is_some() => match (permit, undelivered.take()) {
                (Some((room, place)), Some(msg)) => {
                    room.forget();
                    place.send(msg);
                }
                _ => { ended = "node stopped".into(); break; }
            },
            r = rd.read(&mut rbuf), if reading => match r {
                Ok(0) => { ended = "peer closed the connection".into(); break; }
                Ok(n) => {
                    conn.handle_input(&rbuf[..n], now(), &mut OsRng);
                    if n == rbuf.len() && n < READ_MAX {
                        rbuf = vec![0u8; n * 2];
                    } else if n < READ_MIN && rbuf.len() > READ_MIN {
                        rbuf = vec![0u8; READ_MIN];
                    }
                }
                // TLS's word for a peer gone without saying so (no close_notify).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    ended = "peer closed the connection".into();
                    break;
                }
                Err(e) => { ended = format!("read failed: {e}"); break; }
            },
            cmd = rx.recv(), if backlog < HIGH_WATER && !conn.is_closed() => {
                let t = now();
                match cmd {
                    Some(cmd) => apply(&mut conn, took(&shared, &queued, cmd), t),
                    None => conn.close(CloseCode::Shutdown, "node shutting down", t),
                }
                // Take what else is queued, up to the high-water mark: one write for many.
                for _ in 0..CMD_BATCH {
                    if conn.pending_transmit().len() >= HIGH_WATER {
                        break;
                    }
                    match rx.try_recv() {
                        Ok(cmd) => apply(&mut conn, took(&shared, &queued, cmd), t),
                        Err(_) => break,
                    }
                }
            },
            Ok(()) = closing.changed(), if !conn.is_closed() => {
                if let Some((code, reason)) = *closing.borrow_and_update() {
                    // A shutdown sends first what was sent before it (a mailbox's last
                    // DELIVERED); any other close drops it.
                    if code == CloseCode::Shutdown {
                        let t = now();
                        while let Ok(cmd) = rx.try_recv() {
                            apply(&mut conn, took(&shared, &queued, cmd), t);
                        }
                    }
                    conn.close(code, reason, now());
                }
            }
            () = &mut timer => conn.handle_timeout(now()),
        }
    }
    // Under TLS this also sends close_notify and flushes, which a peer that does not read
    // could hold up.
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    // Senders now fail; what they had queued is no longer waiting.
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        took(&shared, &queued, cmd);
    }
    // The core hears of the end as `counted` is dropped.
    counted.reason = outcome.closed.unwrap_or(ended);
}

/// Takes a command out of a connection's queue, and its bytes out of the counts.
fn took(shared: &Shared, queued: &AtomicUsize, cmd: Cmd) -> Cmd {
    if let Cmd::Send(data) = &cmd {
        queued.fetch_sub(data.len(), Ordering::Relaxed);
        shared.queued.fetch_sub(data.len(), Ordering::Relaxed);
    }
    cmd
}

/// The inbox's room in bytes, as semaphore permits (which count in `u32` at a time).
fn inbox_limit(config: &NodeConfig) -> usize {
    config.inbox_bytes.clamp(1, u32::MAX as usize)
}

/// What a message of `len` bytes counts against the inbox: a message larger than the whole
/// room counts as all of it, so it still gets in once the inbox is empty.
fn inbox_cost(config: &NodeConfig, len: usize) -> usize {
    len.min(inbox_limit(config))
}

/// Waits for room for a message of `len` bytes, then for a place in the inbox.
async fn inbox_place(
    shared: &Shared,
    len: usize,
) -> Option<(tokio::sync::SemaphorePermit<'_>, mpsc::Permit<'_, Incoming>)> {
    let cost = inbox_cost(&shared.node_config, len) as u32;
    let room = shared.inbox_room.acquire_many(cost).await.ok()?;
    let place = shared.inbox.reserve().await.ok()?;
    Some((room, place))
}

/// Writes some of `buf`, or when it is empty flushes what the writer buffered; returns how
/// much of `buf` was written.
async fn write_or_flush<W: AsyncWrite + Unpin>(wr: &mut W, buf: &[u8]) -> io::Result<usize> {
    if buf.is_empty() {
        wr.flush().await.map(|()| 0)
    } else {
        wr.write(buf).await
    }
}

fn apply(conn: &mut Connection, cmd: Cmd, t: cellmesh_core::Instant) {
    let result = match cmd {
        Cmd::Send(data) => conn.send(data, t),
        Cmd::Update(binding) => conn.send_update(&binding, t),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "command dropped");
    }
}

/// Applies one event; returns a received message the inbox had no room for.
fn on_event(
    shared: &Arc<Shared>,
    id: ConnId,
    addr: SocketAddr,
    outcome: &mut Outcome,
    event: Event,
) -> Option<Incoming> {
    match event {
        Event::Data(data) => {
            let (from, cell) = outcome.peer?;
            let msg = Incoming { from, cell, data };
            let cost = inbox_cost(&shared.node_config, msg.data.len()) as u32;
            let Ok(room) = shared.inbox_room.try_acquire_many(cost) else {
                return Some(msg);
            };
            match shared.inbox.try_send(msg) {
                // The room goes back with the permit.
                Err(mpsc::error::TrySendError::Full(msg)) => return Some(msg),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Ok(()) => room.forget(),
            }
        }
        Event::Joined(binding) => {
            outcome.peer = Some((binding.node(), binding.cell()));
            shared.with_core(|core| core.joined(id, &binding, now()));
        }
        Event::JoinRefused {
            node,
            cell,
            code,
            reason,
            by_peer,
        } => {
            let refusal = Refusal::new(code, reason);
            shared.with_core(|core| core.join_refused(id, (node, cell), refusal, by_peer));
        }
        Event::Update(binding) => shared.with_core(|core| core.learned(id, &binding)),
        Event::Closed {
            code,
            reason,
            by_peer,
        } => {
            tracing::debug!(%addr, ?code, %reason, by_peer, "connection closed");
            let who = if by_peer { "peer closed" } else { "closed" };
            outcome.closed = Some(format!("{who}: {reason}"));
        }
        Event::Handshaked { node } => tracing::debug!(%addr, %node, "handshake complete"),
        _ => {}
    }
    None
}

/// The runtime's clock (see [`crate::clock`]).
pub(crate) fn now() -> cellmesh_core::Instant {
    crate::clock::now()
}

fn deadline(at: Option<cellmesh_core::Instant>) -> tokio::time::Instant {
    let now_tokio = tokio::time::Instant::now();
    match at {
        Some(at) => now_tokio + Duration::from_millis(at.millis_since(now())),
        None => now_tokio + Duration::from_secs(3600),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
