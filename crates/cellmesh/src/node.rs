//! A cellmesh node on tokio: listeners, one driver task per connection, the peer table.
//!
//! ```text
//!  TcpListener ──accept──► limits ─[TLS]─[WS?]─► driver task ───────────────────────┐
//!  Node::join ───dial────► limits ─[TLS]─[WS]──► driver task ───────────────────────┤
//!    limits: connections, unauthenticated, per address; TLS, WebSocket when set     │
//!    at JOIN (inbound): join rates, joined per cell and per address, `admit`        │
//!                                                                                   │
//!  driver task (one per connection; owns the socket and the core Connection):       │
//!    socket bytes ─► Connection::handle_input ─► events ─► peer table / NodeEvent / inbox
//!    Cmd (send, update, close) ─► Connection ─► poll_transmit ─► one batched write
//!    timer ─► Connection::handle_timeout (setup deadline, keepalive, idle)          │
//!                                                                                   │
//!  Shared: PeerTable<ConnId> (core), each connection's command sender ◄─────────────┘
//! ```
//!
//! All protocol decisions are the core's; this module moves bytes, keeps time and applies
//! limits. Writing is a `select!` branch next to reading, so two peers that both send faster
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::connection::{Check, Connection, ConnectionConfig, Event, JoinPolicy, Refusal};
use cellmesh_core::device::{BindError, DeviceBinding, Revocations};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keystore::DeviceSecrets;
use cellmesh_core::limits::{AddrGroup, Buckets, Rate, Slots, TokenBucket};
use cellmesh_core::peers::PeerTable;
use cellmesh_core::token::{RealmAnchor, Token, VerifiedToken};
use cellmesh_core::wire::{CloseCode, MAX_PAYLOAD, NackCode};
use rand_core::OsRng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot, watch};
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
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most connections that have not completed handshake and join.
    pub max_unauthenticated: usize,
    /// Most such connections from one IPv4 address or IPv6 /64, so one host cannot hold
    /// every slot.
    pub max_unauthenticated_per_ip: usize,
    /// Most joined inbound connections of one cell (beyond: NACK `busy`). A device joining
    /// again while its old connection lingers is let in; the old one is replaced.
    pub max_joined_per_cell: usize,
    /// Most joined inbound connections from one IPv4 address or IPv6 /64 (beyond: NACK
    /// `busy`). Many users behind one carrier-grade NAT share an IPv4 address: set it high
    /// enough for them.
    pub max_joined_per_ip: usize,
    /// Inbound joins accepted from one IPv4 address or IPv6 /64 (beyond: NACK `busy`).
    pub join_rate_per_ip: Rate,
    /// Inbound joins accepted from everyone together (beyond: NACK `busy`).
    pub join_rate: Rate,
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
            max_connections: 1024,
            max_unauthenticated: 64,
            max_unauthenticated_per_ip: 8,
            max_joined_per_cell: 64,
            max_joined_per_ip: 256,
            join_rate_per_ip: Rate::new(20, 100),
            join_rate: Rate::new(500, 1000),
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

/// A joined peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its node.
    pub node: NodeId,
    /// Its cell.
    pub cell: CellId,
    /// Its address.
    pub addr: SocketAddr,
    /// Whether it dialed us.
    pub inbound: bool,
    /// Its node token and its cell's identity token, as verified at join.
    pub binding: Arc<DeviceBinding>,
}

/// Something that happened at this node.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A peer joined us, or we joined it.
    Joined(PeerInfo),
    /// A join was refused, by us (`by_peer` false) or by the peer.
    JoinRefused {
        /// The peer's address.
        addr: SocketAddr,
        /// Its node.
        node: NodeId,
        /// The cell it claimed.
        cell: CellId,
        /// The NACK code.
        code: NackCode,
        /// Detail.
        reason: String,
        /// Whether the peer refused us.
        by_peer: bool,
    },
    /// A peer told us of a node that joined it.
    Learned {
        /// The node.
        node: NodeId,
        /// Its cell.
        cell: CellId,
        /// Who told us.
        via: NodeId,
    },
    /// A joined peer went away.
    Left {
        /// The peer.
        peer: PeerInfo,
        /// Why.
        reason: String,
    },
    /// A connection ended before joining (handshake failure, timeout, limits).
    Failed {
        /// The peer's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
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
    Update(Box<DeviceBinding>),
}

type ConnId = u64;
type JoinReply = oneshot::Sender<Result<PeerInfo, JoinError>>;

struct ConnEntry {
    tx: mpsc::Sender<Cmd>,
    /// Bytes of `Cmd::Send` in `tx`'s queue.
    queued: Arc<AtomicUsize>,
    /// Closing does not queue behind commands: a peer that does not read keeps the command
    /// queue full, and it is the one most likely to be closed.
    close: watch::Sender<Option<(CloseCode, &'static str)>>,
    peer: Option<PeerInfo>,
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
    table: PeerTable<ConnId>,
    conns: HashMap<ConnId, ConnEntry>,
    unauthenticated_by_ip: HashMap<AddrGroup, usize>,
    /// Joined inbound connections, per cell and per address.
    joined_cells: Slots<CellId>,
    joined_addrs: Slots<AddrGroup>,
    joins_by_addr: Buckets<AddrGroup>,
    joins: TokenBucket,
    shutting_down: bool,
}

/// Addresses whose join rate is tracked at once; beyond, joins from new addresses are
/// refused until older buckets fill up again (the node-wide rate still applies).
const MAX_JOIN_BUCKETS: usize = 65_536;

impl State {
    fn new(config: &NodeConfig) -> Self {
        Self {
            table: PeerTable::default(),
            conns: HashMap::new(),
            unauthenticated_by_ip: HashMap::new(),
            joined_cells: Slots::new(config.max_joined_per_cell, usize::MAX),
            joined_addrs: Slots::new(config.max_joined_per_ip, usize::MAX),
            joins_by_addr: Buckets::new(config.join_rate_per_ip, MAX_JOIN_BUCKETS),
            joins: TokenBucket::full(config.join_rate, now()),
            shutting_down: false,
        }
    }
}

/// A connection's place among those not yet joined: a slot of the node-wide limit and one of
/// its address's. Dropping it (on join, or when the connection ends) frees both.
struct UnauthSlot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    ip: AddrGroup,
}

impl UnauthSlot {
    fn take(shared: &Arc<Shared>, ip: AddrGroup) -> Option<Self> {
        let permit = Arc::clone(&shared.unauth_limit).try_acquire_owned().ok()?;
        let mut state = shared.state();
        let count = state.unauthenticated_by_ip.entry(ip).or_insert(0);
        if *count >= shared.node_config.max_unauthenticated_per_ip {
            return None;
        }
        *count += 1;
        drop(state);
        Some(Self {
            _permit: permit,
            shared: Arc::clone(shared),
            ip,
        })
    }
}

impl Drop for UnauthSlot {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        if let Some(count) = state.unauthenticated_by_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                state.unauthenticated_by_ip.remove(&self.ip);
            }
        }
    }
}

/// The joined-connection slots an inbound connection holds once its JOIN passed the node's
/// limits (see [`admission`]); given back when the connection, which owns the check holding
/// this, is dropped.
struct JoinSlot {
    shared: Arc<Shared>,
    addr: AddrGroup,
    held: Mutex<Option<CellId>>,
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(cell) = held {
            let mut state = self.shared.state();
            state.joined_cells.release(cell);
            state.joined_addrs.release(self.addr);
        }
    }
}

/// The check an inbound connection from `addr` runs last on its JOIN: the join rates (the
/// address's, then everyone's), the joined-connection caps of its cell and address (waived for
/// a device already joined, whose old connection the new one replaces), then the node's
/// `admit`. Passing takes the slots, which the connection holds until it is dropped.
fn admission(shared: &Arc<Shared>, addr: AddrGroup) -> Check {
    let slot = Arc::new(JoinSlot {
        shared: Arc::clone(shared),
        addr,
        held: Mutex::new(None),
    });
    Arc::new(move |binding: &DeviceBinding| {
        let shared = &slot.shared;
        let config = &shared.node_config;
        let busy = |reason: &str| Err(Refusal::new(NackCode::Busy, reason));
        let cell = binding.cell();
        {
            let t = now();
            let mut state = shared.state();
            if !state.joins_by_addr.take(addr, t) {
                return busy("too many joins from this address; try again later");
            }
            let rate = config.join_rate;
            if !state.joins.take(rate, t) {
                return busy("too many joins; try again later");
            }
            let replacing = state.table.get(&binding.node()).is_some();
            if !replacing {
                if state.joined_cells.held(cell) >= config.max_joined_per_cell {
                    return busy("this cell has the most connections this node takes");
                }
                if state.joined_addrs.held(addr) >= config.max_joined_per_ip {
                    return busy("this address has the most connections this node takes");
                }
            }
            state.joined_cells.add(cell);
            state.joined_addrs.add(addr);
            *slot.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(cell);
        }
        if let Some(JoinCheck(check)) = &config.admit
            && let Err(refusal) = check(binding)
        {
            if let Some(cell) = slot.held.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let mut state = shared.state();
                state.joined_cells.release(cell);
                state.joined_addrs.release(addr);
            }
            return Err(refusal);
        }
        Ok(())
    })
}

struct Shared {
    /// The configuration new connections start with; replaced when tokens are renewed or
    /// revocations added. Connections keep the one they started with.
    config: Mutex<Arc<ConnectionConfig>>,
    node_config: NodeConfig,
    secrets: DeviceSecrets,
    advertise: Option<SocketAddr>,
    revocations: Mutex<Revocations>,
    state: Mutex<State>,
    events: broadcast::Sender<NodeEvent>,
    inbox: mpsc::Sender<Incoming>,
    /// Bytes the inbox may still take (see [`inbox_cost`]).
    inbox_room: Semaphore,
    /// Bytes of `Cmd::Send` in every connection's command queue.
    queued: Arc<AtomicUsize>,
    conn_limit: Arc<Semaphore>,
    unauth_limit: Arc<Semaphore>,
    next_id: AtomicU64,
    gone: Notify,
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

    /// Mints fresh tokens and a configuration with the current revocations.
    fn refresh(&self) -> Result<(), IdentityError> {
        let revocations = self
            .revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
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
        // No subscriber is fine: events are informational.
        let _ = self.events.send(event);
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
        let shared = Arc::new(Shared {
            config: Mutex::new(Arc::new(cc)),
            secrets,
            advertise,
            revocations: Mutex::new(config.revocations.clone()),
            conn_limit: Arc::new(Semaphore::new(config.max_connections)),
            unauth_limit: Arc::new(Semaphore::new(config.max_unauthenticated)),
            inbox_room: Semaphore::new(inbox_limit(&config)),
            queued: Arc::new(AtomicUsize::new(0)),
            state: Mutex::new(State::new(&config)),
            node_config: config,
            events,
            inbox: inbox_tx,
            next_id: AtomicU64::new(1),
            gone: Notify::new(),
        });
        let mut listeners: Vec<JoinHandle<()>> = listeners
            .into_iter()
            .map(|l| tokio::spawn(accept_loop(Arc::clone(&shared), l)))
            .collect();
        listeners.push(tokio::spawn(renew_tokens(Arc::clone(&shared))));
        tracing::info!(%cell, %node, addrs = ?local_addrs, "node started");
        let node = Self {
            shared,
            local_addrs,
            listeners,
            inbox,
            first_events: Mutex::new(Some(first_events)),
            cell,
            node,
        };
        for addr in node.shared.node_config.bootstrap.clone() {
            let shared = Arc::clone(&node.shared);
            tokio::spawn(async move { bootstrap(&shared, addr).await });
        }
        Ok(node)
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
        let (issuer, subject) = self
            .shared
            .revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(revocation)?;
        if let Err(e) = self.shared.refresh() {
            tracing::warn!(error = %e, "could not rebuild the node's configuration");
        }
        let realm = self.shared.node_config.realm.as_ref().map(|r| r.issuer);
        let state = self.shared.state();
        for peer in state.table.iter() {
            let b = &peer.binding;
            // A revocation speaks only for its issuer: the peer's own cell, or our realm.
            let hit = (issuer == b.cell().key() && subject == b.node().key())
                || (Some(issuer) == realm
                    && (subject == b.cell().key() || subject == b.node().key()));
            if hit && let Some(c) = state.conns.get(&peer.conn) {
                c.close(CloseCode::Normal, "revoked");
            }
        }
        Ok(())
    }

    /// Closes the session with the joined peer `node` because it broke the application's
    /// protocol (a CLOSE with code `protocol_violation`). False if it is not joined.
    pub fn disconnect(&self, node: NodeId, reason: &'static str) -> bool {
        let state = self.shared.state();
        let Some(c) = state
            .table
            .get(&node)
            .and_then(|p| state.conns.get(&p.conn))
        else {
            return false;
        };
        c.close(CloseCode::ProtocolViolation, reason);
        true
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

    /// The joined peers.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let state = self.shared.state();
        state
            .table
            .iter()
            .filter_map(|p| state.conns.get(&p.conn).and_then(|c| c.peer.clone()))
            .collect()
    }

    /// The proof by which the joined peer `node` acts for its cell: its node token and its
    /// cell's identity token, both verified at join.
    pub fn binding(&self, node: NodeId) -> Option<DeviceBinding> {
        self.shared
            .state()
            .table
            .get(&node)
            .map(|p| p.binding.clone())
    }

    /// A handle for sending to the joined peer `node`.
    pub fn sender(&self, node: NodeId) -> Result<PeerSender, SendError> {
        let state = self.shared.state();
        let conn = state
            .table
            .get(&node)
            .ok_or(SendError::UnknownPeer(node))?
            .conn;
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
        {
            let mut state = self.shared.state();
            state.shutting_down = true;
            for c in state.conns.values() {
                c.close(CloseCode::Shutdown, "node shutting down");
            }
        }
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
    if shared.state().shutting_down {
        return Err(JoinError::ShuttingDown);
    }
    let permit = Arc::clone(&shared.conn_limit)
        .try_acquire_owned()
        .map_err(|_| JoinError::Busy)?;
    // Connecting and every outer handshake share the setup deadline.
    let deadline = tokio::time::Instant::now() + shared.node_config.setup_timeout;
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
    // Made before the TLS and WebSocket handshakes, so that they count against the setup
    // deadline.
    let conn = Connection::connect_to(shared.connection_config(), expected, now(), &mut OsRng);
    let (tx, rx) = oneshot::channel();
    let shared = Arc::clone(shared);
    let job = (conn, (permit, None), Some(tx));
    match transport {
        Transport::Tcp => {
            let (rd, wr) = stream.into_split();
            tokio::spawn(drive(shared, (rd, wr, false), addr, false, job));
        }
        Transport::Tls {
            server_name,
            config,
        } => {
            let stream = connect_tls(stream, server_name, config, addr, deadline).await?;
            let (rd, wr) = tokio::io::split(tokio_rustls::TlsStream::from(stream));
            tokio::spawn(drive(shared, (rd, wr, true), addr, false, job));
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
            let ws = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok((ws, _response))) => ws,
                Ok(Err(e)) => {
                    let (status, reason) = crate::ws::describe_client_failure(&e);
                    return Err(JoinError::WebSocket {
                        addr,
                        status,
                        reason,
                    });
                }
                Err(_) => {
                    return Err(JoinError::WebSocket {
                        addr,
                        status: None,
                        reason: "WebSocket handshake timed out".into(),
                    });
                }
            };
            let (rd, wr) = tokio::io::split(WebSocketIo::new(ws));
            tokio::spawn(drive(shared, (rd, wr, true), addr, false, job));
        }
    }
    rx.await.unwrap_or(Err(JoinError::Failed {
        addr,
        reason: "connection task ended".into(),
    }))
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

/// Joins a bootstrap peer, retrying connection failures with backoff (250 ms doubling, about
/// 15 s in all). Joins, refusals and handshake failures report themselves as events; only a
/// peer that could not be reached at all is reported here.
async fn bootstrap(shared: &Arc<Shared>, addr: SocketAddr) {
    let mut delay = Duration::from_millis(250);
    loop {
        match join(shared, addr, &Transport::Tcp, None).await {
            Err(JoinError::Connect { reason, .. }) if delay > Duration::from_secs(8) => {
                shared.emit(NodeEvent::Failed { addr, reason });
                return;
            }
            Err(JoinError::Connect { .. }) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e @ (JoinError::Busy | JoinError::ShuttingDown)) => {
                shared.emit(NodeEvent::Failed {
                    addr,
                    reason: e.to_string(),
                });
                return;
            }
            _ => return,
        }
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

/// Node tokens live a day: re-mint them well before they expire, so a long-running node stays
/// reachable. Sessions already established are not affected.
async fn renew_tokens(shared: Arc<Shared>) {
    let every = shared
        .node_config
        .token_renewal
        .max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        match shared.refresh() {
            Ok(()) => tracing::debug!("node and identity tokens renewed"),
            Err(e) => tracing::warn!(error = %e, "token renewal failed"),
        }
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
        let permits = Arc::clone(&shared.conn_limit)
            .try_acquire_owned()
            .ok()
            .zip(UnauthSlot::take(&shared, addr.ip().into()));
        let Some((conn_permit, unauth)) = permits else {
            tracing::debug!(%addr, "connection refused: at a limit");
            shared.emit(NodeEvent::Failed {
                addr,
                reason: "connection limit reached".into(),
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Made before any TLS or WebSocket handshake, so that it counts against the setup
        // deadline.
        let mut conn = Connection::accept(shared.connection_config(), now());
        conn.set_admission(admission(&shared, addr.ip().into()));
        let job = (conn, (conn_permit, Some(unauth)), None);
        if tls.is_none() && !websocket {
            let (rd, wr) = stream.into_split();
            tokio::spawn(drive(Arc::clone(&shared), (rd, wr, false), addr, true, job));
            continue;
        }
        tokio::spawn(accept_layers(
            Arc::clone(&shared),
            stream,
            tls.clone(),
            addr,
            job,
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
    mut job: Job,
) {
    let deadline = tokio::time::Instant::now() + shared.node_config.setup_timeout;
    let websocket = shared.node_config.websocket;
    let layered = outer_layers(stream, tls, websocket, deadline, &mut job.0).await;
    let reason = match layered {
        Ok(_) if shared.state().shutting_down => "node is shutting down".to_string(),
        Ok(Layered::Tcp(stream)) => {
            let (rd, wr) = stream.into_split();
            return drive(shared, (rd, wr, false), addr, true, job).await;
        }
        Ok(Layered::Tls(stream)) => {
            let (rd, wr) = tokio::io::split(tokio_rustls::TlsStream::from(*stream));
            return drive(shared, (rd, wr, true), addr, true, job).await;
        }
        Ok(Layered::WebSocket(ws)) => {
            let (rd, wr) = tokio::io::split(WebSocketIo::new(*ws));
            return drive(shared, (rd, wr, true), addr, true, job).await;
        }
        Err(reason) => reason,
    };
    tracing::debug!(%addr, %reason, "connection failed before the link");
    shared.emit(NodeEvent::Failed { addr, reason });
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

/// What a driver starts with: the core connection, its limit slots (the node-wide one, and for
/// an inbound connection its unauthenticated one), and where a dialer waits for the outcome.
type Job = (
    Connection,
    (OwnedSemaphorePermit, Option<UnauthSlot>),
    Option<JoinReply>,
);

/// What the driver learned, for the cleanup when the connection ends.
struct Outcome {
    peer: Option<PeerInfo>,
    refused: bool,
    reply: Option<JoinReply>,
    closed: Option<String>,
}

/// Runs one connection to its end. `rd` and `wr` are the two halves of its stream: TCP's
/// owned halves, or TLS's through `tokio::io::split`, whose writer `buffers` (rustls keeps
/// what the socket did not take) and must be flushed.
async fn drive<R, W>(
    shared: Arc<Shared>,
    (mut rd, mut wr, buffers): (R, W, bool),
    addr: SocketAddr,
    inbound: bool,
    job: Job,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (mut conn, (_conn_permit, mut unauth), reply) = job;
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel(shared.node_config.send_capacity.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    let (close, mut closing) = watch::channel(None);
    shared.state().conns.insert(
        id,
        ConnEntry {
            tx,
            queued: Arc::clone(&queued),
            close,
            peer: None,
        },
    );
    let mut rbuf = vec![0u8; READ_MIN];
    let mut outcome = Outcome {
        peer: None,
        refused: false,
        reply,
        closed: None,
    };
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
            undelivered = on_event(&shared, id, addr, inbound, &mut outcome, &mut unauth, event);
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
    finish(&shared, id, addr, outcome, ended);
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
    shared: &Shared,
    id: ConnId,
    addr: SocketAddr,
    inbound: bool,
    outcome: &mut Outcome,
    unauth: &mut Option<UnauthSlot>,
    event: Event,
) -> Option<Incoming> {
    match event {
        Event::Data(data) => {
            let peer = outcome.peer.as_ref()?;
            let msg = Incoming {
                from: peer.node,
                cell: peer.cell,
                data,
            };
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
            unauth.take();
            let info = PeerInfo {
                node: binding.node(),
                cell: binding.cell(),
                addr,
                inbound,
                binding: Arc::new((*binding).clone()),
            };
            {
                let mut state = shared.state();
                let joined = state.table.joined(id, (*binding).clone());
                if let Some(entry) = state.conns.get_mut(&id) {
                    entry.peer = Some(info.clone());
                }
                let notify = if shared.node_config.announce_joins {
                    joined.notify
                } else {
                    Vec::new()
                };
                for other in notify {
                    if let Some(c) = state.conns.get(&other)
                        && c.tx.try_send(Cmd::Update(binding.clone())).is_err()
                    {
                        tracing::debug!(conn = other, "update not queued: send buffer full");
                    }
                }
                if let Some(old) = joined.replaced.and_then(|old| state.conns.get(&old)) {
                    old.close(CloseCode::Normal, "replaced by a newer connection");
                }
            }
            tracing::info!(peer = %info.node, cell = %info.cell, %addr, inbound, "joined");
            if let Some(reply) = outcome.reply.take() {
                let _ = reply.send(Ok(info.clone()));
            }
            outcome.peer = Some(info.clone());
            shared.emit(NodeEvent::Joined(info));
        }
        Event::JoinRefused {
            node,
            cell,
            code,
            reason,
            by_peer,
        } => {
            outcome.refused = true;
            tracing::info!(%node, %cell, %addr, code = code.name(), %reason, by_peer, "join refused");
            if let Some(reply) = outcome.reply.take() {
                let _ = reply.send(Err(JoinError::Refused {
                    addr,
                    code,
                    reason: reason.clone(),
                }));
            }
            shared.emit(NodeEvent::JoinRefused {
                addr,
                node,
                cell,
                code,
                reason,
                by_peer,
            });
        }
        Event::Update(binding) => {
            if let Some(peer) = &outcome.peer {
                shared.emit(NodeEvent::Learned {
                    node: binding.node(),
                    cell: binding.cell(),
                    via: peer.node,
                });
            }
        }
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

/// Forgets the connection and reports how it ended.
fn finish(shared: &Shared, id: ConnId, addr: SocketAddr, outcome: Outcome, ended: String) {
    let ended = outcome.closed.unwrap_or(ended);
    let still_in_table = {
        let mut state = shared.state();
        state.conns.remove(&id);
        state.table.left(&id).is_some()
    };
    shared.gone.notify_waiters();
    match outcome.peer {
        // A peer whose newer connection replaced this one has not left.
        Some(peer) if still_in_table => shared.emit(NodeEvent::Left {
            peer,
            reason: ended,
        }),
        Some(_) => {}
        None if !outcome.refused => {
            if let Some(reply) = outcome.reply {
                let _ = reply.send(Err(JoinError::Failed {
                    addr,
                    reason: ended.clone(),
                }));
            }
            shared.emit(NodeEvent::Failed {
                addr,
                reason: ended,
            });
        }
        None => {}
    }
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
