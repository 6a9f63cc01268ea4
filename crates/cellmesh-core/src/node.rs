//! The node as a state machine: which connections it takes, who may join, the peer table,
//! which connection stays when a node has two, whom to tell of a join, which peers a
//! revocation disconnects, when to retry a bootstrap peer, when to renew tokens, and what is
//! reported. No sockets and no clock: the caller drives one [`Connection`] per connection
//! (each named by the [`ConnId`] this state gave it), passes the time in, and applies the
//! [`Action`]s it gets back.
//!
//! # Calling it
//!
//! A [`NodeState`] is made with [`NodeState::new`]; then, in any order as things happen:
//!
//! 1. **New connections.** [`NodeState::accept`] before reading from an inbound connection,
//!    [`NodeState::dial`] before opening an outbound one. Each gives a [`ConnId`] (counted
//!    against the node's limits from then on) or says why not.
//! 2. **What a connection says.** The [`Connection`]'s admission check calls
//!    [`NodeState::admit`] on an inbound JOIN; its events go to [`NodeState::joined`],
//!    [`NodeState::join_refused`] and [`NodeState::learned`].
//! 3. **Its end**, exactly once for every id given out: [`NodeState::abandoned`] if it ended
//!    before its link started (the TCP connect, TLS or WebSocket failed),
//!    [`NodeState::closed`] otherwise.
//! 4. **Commands:** [`NodeState::add_revocation`], [`NodeState::disconnect`],
//!    [`NodeState::shutdown`].
//! 5. **Time:** [`NodeState::handle_timeout`] once [`NodeState::poll_timeout`] has passed.
//!
//! After each call, [`NodeState::poll_action`] until `None`, applying every action in the
//! order given. Queries ([`NodeState::peer`], [`NodeState::peers`], ...) answer at any time.
//!
//! Every map is ordered and nothing is random: the same calls give the same actions.
//!
//! [`Connection`]: crate::connection::Connection

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::Instant;
use crate::connection::{Check, Refusal};
use crate::device::{BindError, DeviceBinding, Revocations};
use crate::id::{CellId, NodeId};
use crate::limits::{AddrGroup, Buckets, Rate, Slots, TokenBucket};
use crate::token::{RealmAnchor, VerifiedToken};
use crate::wire::{CloseCode, NackCode};

/// The name a [`NodeState`] gives one connection.
pub type ConnId = u64;

/// A second connection between two nodes that joined within this long of the first is taken
/// to be a simultaneous dial (each dialed the other): both nodes keep the one dialed by the
/// lower node id, so they agree on one link. Past it, the newer connection replaces the older
/// (a device that reconnected while its old connection lingers).
pub const SIMULTANEOUS_MS: u64 = 5_000;

/// Bootstrap peers that cannot be reached are dialed again after 250 ms, then after twice as
/// long each time; the dial after a wait of more than 8 s is the last (about 15 s in all).
pub const BOOTSTRAP_FIRST_RETRY_MS: u64 = 250;
/// See [`BOOTSTRAP_FIRST_RETRY_MS`].
pub const BOOTSTRAP_LAST_RETRY_MS: u64 = 8_000;

/// Addresses whose join rate is tracked at once; beyond, joins from new addresses are refused
/// until older buckets fill up again (the node-wide rate still applies).
const MAX_JOIN_BUCKETS: usize = 65_536;

/// A node's bounds on connections and joins; past each, a connection is refused (a join
/// with NACK `busy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    /// Most simultaneous connections, inbound and outbound.
    pub max_connections: usize,
    /// Most connections that have not completed handshake and join.
    pub max_unauthenticated: usize,
    /// Most such connections from one IPv4 address or IPv6 /64, so one host cannot hold
    /// every slot.
    pub max_unauthenticated_per_ip: usize,
    /// Most joined inbound connections of one cell. A device joining again while its old
    /// connection lingers is let in; the old one is replaced.
    pub max_joined_per_cell: usize,
    /// Most joined inbound connections from one IPv4 address or IPv6 /64. Many users behind
    /// one carrier-grade NAT share an IPv4 address: set it high enough for them.
    pub max_joined_per_ip: usize,
    /// Inbound joins accepted from one IPv4 address or IPv6 /64.
    pub join_rate_per_ip: Rate,
    /// Inbound joins accepted from everyone together.
    pub join_rate: Rate,
}

impl Default for NodeLimits {
    /// 1,024 connections, 64 unauthenticated (8 per address), 64 joined per cell and 256 per
    /// address, joins at 20 a second (bursts of 100) per address and 500 (bursts of 1,000)
    /// in all.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_unauthenticated: 64,
            max_unauthenticated_per_ip: 8,
            max_joined_per_cell: 64,
            max_joined_per_ip: 256,
            join_rate_per_ip: Rate::new(20, 100),
            join_rate: Rate::new(500, 1000),
        }
    }
}

/// The rules a node runs by.
#[derive(Clone)]
pub struct NodeRules {
    /// Nodes to join at the start (see [`BOOTSTRAP_FIRST_RETRY_MS`] for retries).
    pub bootstrap: Vec<SocketAddr>,
    /// The realm whose revocations this node honours beside each cell's own.
    pub realm: Option<RealmAnchor>,
    /// Revocations to honour from the start.
    pub revocations: Revocations,
    /// Its bounds on connections and joins.
    pub limits: NodeLimits,
    /// A last check on every inbound join, after the node's own limits.
    pub admit: Option<Check>,
    /// Send every joined peer an UPDATE about each node that joins.
    pub announce_joins: bool,
    /// How often to renew the node's tokens, in milliseconds.
    pub token_renewal_ms: u64,
}

impl Default for NodeRules {
    fn default() -> Self {
        Self {
            bootstrap: Vec::new(),
            realm: None,
            revocations: Revocations::new(),
            limits: NodeLimits::default(),
            admit: None,
            announce_joins: true,
            token_renewal_ms: 12 * 3600 * 1000,
        }
    }
}

impl std::fmt::Debug for NodeRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRules")
            .field("bootstrap", &self.bootstrap)
            .field("limits", &self.limits)
            .field("announce_joins", &self.announce_joins)
            .finish_non_exhaustive()
    }
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

/// Why a dial the caller asked for ([`NodeState::dial`]) did not join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinFailure {
    /// The peer refused the join.
    Refused {
        /// The NACK code.
        code: NackCode,
        /// Detail.
        reason: String,
    },
    /// The handshake or join failed otherwise, or the connection ended first.
    Failed(String),
}

/// Why [`NodeState::dial`] or [`NodeState::accept`] gave no connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// At [`NodeLimits::max_connections`], or (inbound) at an unauthenticated limit.
    Busy,
    /// After [`NodeState::shutdown`].
    ShuttingDown,
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open connection `conn` (already counted) to `addr` for a bootstrap join, as for
    /// [`NodeState::dial`].
    Dial {
        /// The connection.
        conn: ConnId,
        /// Where.
        addr: SocketAddr,
    },
    /// Send an UPDATE about `about` on `conn`.
    Update {
        /// The connection.
        conn: ConnId,
        /// The node that joined.
        about: Arc<DeviceBinding>,
    },
    /// Close `conn` with this code and reason.
    Close {
        /// The connection.
        conn: ConnId,
        /// The CLOSE code.
        code: CloseCode,
        /// Its reason.
        reason: &'static str,
    },
    /// How the dial `conn` the caller asked for ended.
    JoinOutcome {
        /// The connection.
        conn: ConnId,
        /// The peer, or why not.
        result: Result<PeerInfo, JoinFailure>,
    },
    /// New connections are to use fresh node and identity tokens (`renew`) and the
    /// revocations of [`NodeState::revocations`].
    Reconfigure {
        /// Whether to mint fresh tokens.
        renew: bool,
    },
    /// Something to report.
    Event(NodeEvent),
}

/// Who opened a connection, and for what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Inbound,
    /// A dial the caller asked for: its outcome is reported as [`Action::JoinOutcome`].
    Dial,
    /// A dial of bootstrap peer number `n`.
    Bootstrap(usize),
}

#[derive(Debug)]
struct Conn {
    addr: SocketAddr,
    origin: Origin,
    /// Holds a slot among the connections that have not joined.
    unauthenticated: bool,
    /// The cell whose joined-connection slots (its own and its address's) this inbound
    /// connection holds since its JOIN passed [`NodeState::admit`].
    join_slots: Option<CellId>,
    /// The peer, once joined, and when.
    peer: Option<(PeerInfo, Instant)>,
    /// Its JOIN was refused (reported then, not again at its end).
    refused: bool,
}

impl Conn {
    fn inbound(&self) -> bool {
        self.origin == Origin::Inbound
    }
}

#[derive(Debug)]
struct Bootstrap {
    addr: SocketAddr,
    /// The wait before the next dial, should this one not connect.
    delay_ms: u64,
    /// When to dial again; `None` while a dial is under way or after the last.
    due: Option<Instant>,
}

/// The state of one node (see the module documentation for how to call it).
pub struct NodeState {
    rules: NodeRules,
    me: NodeId,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// The connection each joined node is on.
    peers: BTreeMap<NodeId, ConnId>,
    unauthenticated: Slots<AddrGroup>,
    joined_cells: Slots<CellId>,
    joined_addrs: Slots<AddrGroup>,
    joins_by_addr: Buckets<AddrGroup>,
    joins: TokenBucket,
    revocations: Revocations,
    bootstraps: Vec<Bootstrap>,
    renew_at: Instant,
    shutting_down: bool,
    actions: VecDeque<Action>,
}

impl NodeState {
    /// The state of node `me`, started at `now`: it dials its bootstrap peers at once.
    pub fn new(me: NodeId, rules: NodeRules, now: Instant) -> Self {
        let mut state = Self {
            me,
            conns: BTreeMap::new(),
            next_conn: 1,
            peers: BTreeMap::new(),
            unauthenticated: Slots::new(
                rules.limits.max_unauthenticated_per_ip,
                rules.limits.max_unauthenticated,
            ),
            joined_cells: Slots::new(rules.limits.max_joined_per_cell, usize::MAX),
            joined_addrs: Slots::new(rules.limits.max_joined_per_ip, usize::MAX),
            joins_by_addr: Buckets::new(rules.limits.join_rate_per_ip, MAX_JOIN_BUCKETS),
            joins: TokenBucket::full(rules.limits.join_rate, now),
            revocations: rules.revocations.clone(),
            bootstraps: rules
                .bootstrap
                .iter()
                .map(|&addr| Bootstrap {
                    addr,
                    delay_ms: BOOTSTRAP_FIRST_RETRY_MS,
                    due: None,
                })
                .collect(),
            renew_at: now.plus_millis(rules.token_renewal_ms.max(10)),
            shutting_down: false,
            actions: VecDeque::new(),
            rules,
        };
        for n in 0..state.bootstraps.len() {
            state.dial_bootstrap(n);
        }
        state
    }

    /// The rules it runs by.
    pub fn rules(&self) -> &NodeRules {
        &self.rules
    }

    /// The revocations it honours.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Takes an inbound connection from `addr`, unless at a limit (reported as
    /// [`NodeEvent::Failed`]) or shutting down.
    pub fn accept(&mut self, addr: SocketAddr) -> Result<ConnId, NoRoom> {
        if self.shutting_down {
            return Err(NoRoom::ShuttingDown);
        }
        if self.conns.len() >= self.rules.limits.max_connections
            || self.unauthenticated.take(addr.ip().into()).is_err()
        {
            self.event(NodeEvent::Failed {
                addr,
                reason: "connection limit reached".into(),
            });
            return Err(NoRoom::Busy);
        }
        Ok(self.add(addr, Origin::Inbound, true))
    }

    /// Counts a connection the caller is about to open to `addr`; its outcome comes as an
    /// [`Action::JoinOutcome`] (unless it is [`NodeState::abandoned`]).
    pub fn dial(&mut self, addr: SocketAddr) -> Result<ConnId, NoRoom> {
        if self.shutting_down {
            return Err(NoRoom::ShuttingDown);
        }
        if self.conns.len() >= self.rules.limits.max_connections {
            return Err(NoRoom::Busy);
        }
        Ok(self.add(addr, Origin::Dial, false))
    }

    /// The last check on the JOIN of inbound connection `conn`, from its admission check:
    /// the join rates (its address's, then everyone's), the joined-connection caps of its cell
    /// and address (waived for a node already joined, whose old connection the new one will
    /// replace), then [`NodeRules::admit`]. Passing takes the slots, held until its end.
    pub fn admit(
        &mut self,
        conn: ConnId,
        binding: &DeviceBinding,
        now: Instant,
    ) -> Result<(), Refusal> {
        let busy = |reason: &str| Err(Refusal::new(NackCode::Busy, reason));
        let Some(c) = self
            .conns
            .get(&conn)
            .filter(|c| c.inbound() && c.join_slots.is_none())
        else {
            return Err(Refusal::new(NackCode::Busy, "not an inbound connection"));
        };
        let addr: AddrGroup = c.addr.ip().into();
        let cell = binding.cell();
        if !self.joins_by_addr.take(addr, now) {
            return busy("too many joins from this address; try again later");
        }
        if !self.joins.take(self.rules.limits.join_rate, now) {
            return busy("too many joins; try again later");
        }
        if !self.peers.contains_key(&binding.node()) {
            if self.joined_cells.held(cell) >= self.rules.limits.max_joined_per_cell {
                return busy("this cell has the most connections this node takes");
            }
            if self.joined_addrs.held(addr) >= self.rules.limits.max_joined_per_ip {
                return busy("this address has the most connections this node takes");
            }
        }
        if let Some(check) = &self.rules.admit {
            check(binding)?;
        }
        self.joined_cells.add(cell);
        self.joined_addrs.add(addr);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.join_slots = Some(cell);
        }
        Ok(())
    }

    /// Connection `conn` joined (either way) with the peer `binding`. If the node was joined
    /// over another connection, one of the two is closed (see [`SIMULTANEOUS_MS`]); joining
    /// is reported unless the new one is.
    pub fn joined(&mut self, conn: ConnId, binding: &DeviceBinding, now: Instant) {
        let node = binding.node();
        // A connection joins once.
        let Some(c) = self.conns.get_mut(&conn).filter(|c| c.peer.is_none()) else {
            return;
        };
        if c.unauthenticated {
            c.unauthenticated = false;
            self.unauthenticated.release(c.addr.ip().into());
        }
        let info = PeerInfo {
            node,
            cell: binding.cell(),
            addr: c.addr,
            inbound: c.inbound(),
            binding: Arc::new(binding.clone()),
        };
        c.peer = Some((info.clone(), now));
        let (inbound, origin) = (c.inbound(), c.origin);
        if origin == Origin::Dial {
            self.actions.push_back(Action::JoinOutcome {
                conn,
                result: Ok(info.clone()),
            });
        }
        if let Origin::Bootstrap(n) = origin {
            self.bootstraps[n].due = None;
        }
        let old = self.peers.get(&node).copied().filter(|&old| old != conn);
        if let Some(old) = old {
            let keep_old = self
                .conns
                .get(&old)
                .and_then(|o| o.peer.as_ref().map(|p| (o, p.1)));
            let keep_old = keep_old.is_some_and(|(o, since)| {
                // Each side dialed the other: keep the one the lower node id dialed.
                let simultaneous =
                    o.inbound() != inbound && now.millis_since(since) < SIMULTANEOUS_MS;
                let dialer = |inbound: bool| if inbound { node } else { self.me };
                simultaneous && dialer(o.inbound()) < dialer(inbound)
            });
            let (closing, reason) = if keep_old {
                (conn, "a simultaneous connection was kept instead")
            } else if self.conns.get(&old).is_some_and(|o| o.inbound() != inbound) {
                (old, "a simultaneous connection replaced this one")
            } else {
                (old, "replaced by a newer connection")
            };
            self.actions.push_back(Action::Close {
                conn: closing,
                code: CloseCode::Normal,
                reason,
            });
            if keep_old {
                return;
            }
        }
        self.peers.insert(node, conn);
        if self.rules.announce_joins {
            let about = Arc::clone(&info.binding);
            for (_, &other) in self.peers.iter().filter(|(n, _)| **n != node) {
                self.actions.push_back(Action::Update {
                    conn: other,
                    about: Arc::clone(&about),
                });
            }
        }
        self.event(NodeEvent::Joined(info));
    }

    /// The JOIN on `conn` was refused, by this node or (`by_peer`) by the peer.
    pub fn join_refused(
        &mut self,
        conn: ConnId,
        (node, cell): (NodeId, CellId),
        refusal: Refusal,
        by_peer: bool,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.refused = true;
        let (addr, origin) = (c.addr, c.origin);
        if origin == Origin::Dial {
            self.actions.push_back(Action::JoinOutcome {
                conn,
                result: Err(JoinFailure::Refused {
                    code: refusal.code,
                    reason: refusal.reason.clone(),
                }),
            });
        }
        self.event(NodeEvent::JoinRefused {
            addr,
            node,
            cell,
            code: refusal.code,
            reason: refusal.reason,
            by_peer,
        });
    }

    /// The peer on `conn` told of `about`, a node that joined it (an UPDATE that verified).
    pub fn learned(&mut self, conn: ConnId, about: &DeviceBinding) {
        if let Some((peer, _)) = self.conns.get(&conn).and_then(|c| c.peer.as_ref()) {
            let via = peer.node;
            self.event(NodeEvent::Learned {
                node: about.node(),
                cell: about.cell(),
                via,
            });
        }
    }

    /// Connection `conn` ended before its link started (connecting, TLS or WebSocket
    /// failed, for `reason`). An inbound one is reported; a bootstrap dial is retried (see
    /// [`BOOTSTRAP_FIRST_RETRY_MS`]); a dial the caller asked for is the caller's to report.
    pub fn abandoned(&mut self, conn: ConnId, reason: String, now: Instant) {
        if self.conns.get(&conn).is_some_and(|c| c.peer.is_some()) {
            // Its link had started after all.
            return self.closed(conn, reason);
        }
        let Some(c) = self.remove(conn) else {
            return;
        };
        match c.origin {
            Origin::Inbound => self.event(NodeEvent::Failed {
                addr: c.addr,
                reason,
            }),
            Origin::Dial => {}
            Origin::Bootstrap(n) => {
                let b = &mut self.bootstraps[n];
                if b.delay_ms > BOOTSTRAP_LAST_RETRY_MS || self.shutting_down {
                    b.due = None;
                    self.event(NodeEvent::Failed {
                        addr: c.addr,
                        reason,
                    });
                } else {
                    b.due = Some(now.plus_millis(b.delay_ms));
                    b.delay_ms = b.delay_ms.saturating_mul(2);
                }
            }
        }
    }

    /// Connection `conn`'s link ended, for `reason`: a joined peer whose entry it was has left;
    /// one that never joined (nor was refused) failed.
    pub fn closed(&mut self, conn: ConnId, reason: String) {
        let Some(c) = self.remove(conn) else {
            return;
        };
        match c.peer {
            // One whose node joined again over another connection has not left.
            Some((peer, _)) if self.peers.get(&peer.node) == Some(&conn) => {
                self.peers.remove(&peer.node);
                self.event(NodeEvent::Left { peer, reason });
            }
            Some(_) => {}
            None if !c.refused => {
                if c.origin == Origin::Dial {
                    self.actions.push_back(Action::JoinOutcome {
                        conn,
                        result: Err(JoinFailure::Failed(reason.clone())),
                    });
                }
                self.event(NodeEvent::Failed {
                    addr: c.addr,
                    reason,
                });
            }
            None => {}
        }
    }

    /// Honours `revocation` from now on: new connections refuse what it revokes (after the
    /// [`Action::Reconfigure`] this gives), and joined peers it revokes are closed. A
    /// revocation speaks only for its issuer: the peer's own cell, or this node's realm.
    pub fn add_revocation(&mut self, revocation: &VerifiedToken) -> Result<(), BindError> {
        let (issuer, subject) = self.revocations.insert(revocation)?;
        self.actions.push_back(Action::Reconfigure { renew: false });
        let realm = self.rules.realm.as_ref().map(|r| r.issuer);
        for &conn in self.peers.values() {
            let Some((peer, _)) = self.conns.get(&conn).and_then(|c| c.peer.as_ref()) else {
                continue;
            };
            let b = &peer.binding;
            let hit = (issuer == b.cell().key() && subject == b.node().key())
                || (Some(issuer) == realm
                    && (subject == b.cell().key() || subject == b.node().key()));
            if hit {
                self.actions.push_back(Action::Close {
                    conn,
                    code: CloseCode::Normal,
                    reason: "revoked",
                });
            }
        }
        Ok(())
    }

    /// Closes the joined peer `node`'s connection because it broke the application's
    /// protocol. False if it is not joined.
    pub fn disconnect(&mut self, node: NodeId, reason: &'static str) -> bool {
        let Some(&conn) = self.peers.get(&node) else {
            return false;
        };
        self.actions.push_back(Action::Close {
            conn,
            code: CloseCode::ProtocolViolation,
            reason,
        });
        true
    }

    /// Takes no more connections and closes every one.
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
        for b in &mut self.bootstraps {
            b.due = None;
        }
        for &conn in self.conns.keys() {
            self.actions.push_back(Action::Close {
                conn,
                code: CloseCode::Shutdown,
                reason: "node shutting down",
            });
        }
    }

    /// Whether [`NodeState::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Runs what was due at `now`: bootstrap dials, token renewal.
    pub fn handle_timeout(&mut self, now: Instant) {
        for n in 0..self.bootstraps.len() {
            if self.bootstraps[n].due.is_some_and(|due| due <= now) {
                self.bootstraps[n].due = None;
                self.dial_bootstrap(n);
            }
        }
        if now >= self.renew_at && !self.shutting_down {
            self.renew_at = now.plus_millis(self.rules.token_renewal_ms.max(10));
            self.actions.push_back(Action::Reconfigure { renew: true });
        }
    }

    /// When [`NodeState::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let bootstrap = self.bootstraps.iter().filter_map(|b| b.due).min();
        let renew = (!self.shutting_down).then_some(self.renew_at);
        bootstrap.into_iter().chain(renew).min()
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The joined peer `node`: its connection and what is known of it.
    pub fn peer(&self, node: &NodeId) -> Option<(ConnId, &PeerInfo)> {
        let conn = *self.peers.get(node)?;
        let (info, _) = self.conns.get(&conn)?.peer.as_ref()?;
        Some((conn, info))
    }

    /// The joined peers, by node id.
    pub fn peers(&self) -> impl Iterator<Item = &PeerInfo> {
        self.peers
            .values()
            .filter_map(|conn| self.conns.get(conn)?.peer.as_ref().map(|(p, _)| p))
    }

    /// Connections counted (joined or not).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn add(&mut self, addr: SocketAddr, origin: Origin, unauthenticated: bool) -> ConnId {
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            conn,
            Conn {
                addr,
                origin,
                unauthenticated,
                join_slots: None,
                peer: None,
                refused: false,
            },
        );
        conn
    }

    fn remove(&mut self, conn: ConnId) -> Option<Conn> {
        let c = self.conns.remove(&conn)?;
        if c.unauthenticated {
            self.unauthenticated.release(c.addr.ip().into());
        }
        if let Some(cell) = c.join_slots {
            self.joined_cells.release(cell);
            self.joined_addrs.release(c.addr.ip().into());
        }
        Some(c)
    }

    fn dial_bootstrap(&mut self, n: usize) {
        let addr = self.bootstraps[n].addr;
        if self.shutting_down {
            return;
        }
        if self.conns.len() >= self.rules.limits.max_connections {
            self.event(NodeEvent::Failed {
                addr,
                reason: "connection limit reached".into(),
            });
            return;
        }
        let conn = self.add(addr, Origin::Bootstrap(n), false);
        self.actions.push_back(Action::Dial { conn, addr });
    }

    fn event(&mut self, event: NodeEvent) {
        self.actions.push_back(Action::Event(event));
    }
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("me", &self.me)
            .field("connections", &self.conns.len())
            .field("peers", &self.peers.len())
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
