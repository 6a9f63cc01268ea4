//! One link to one peer, as a state machine with no I/O: handshake, session, join, keepalive.
//!
//! ```text
//!            bytes from the socket                       bytes for the socket
//!   runtime ───────────────────► handle_input ─┐    ┌──► poll_transmit ───────────► runtime
//!   runtime ─── the clock ─────► handle_timeout ┼──► Connection ──► poll_event ────► runtime (Joined, Data, ...)
//!   runtime ─── app commands ──► send / send_update / close
//!                                                    └──► poll_timeout: when to call handle_timeout next
//! ```
//!
//! Polling order after any `handle_*` or command: write out [`Connection::pending_transmit`]
//! (everything, in order, as one batch; report progress with
//! [`Connection::advance_transmit`]; or take a copy with [`Connection::poll_transmit`]), then [`Connection::poll_event`] until it
//! returns `None`, then re-arm a timer for [`Connection::poll_timeout`]. Once
//! [`Connection::is_closed`] is true and `poll_transmit` is empty, drop the connection and the
//! socket.
//!
//! The life of a link: the initiator sends hello, the responder answers, the initiator
//! finishes and immediately sends JOIN with its cell's identity token. The responder verifies
//! the token (and the realm's co-signature when it has a realm), checks that it binds to the
//! node authenticated in the handshake, honours revocations, then asks the authenticate and
//! authorize checks of its [`JoinPolicy`]. It answers ACK with its own identity (the initiator
//! checks that binding too) or NACK with a code, after which it closes and forgets the peer.
//! Either side reports [`Event::Joined`] once joined. A setup deadline bounds the time from
//! creation to joined; keepalives and an idle timeout bound silence afterwards.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::Instant;
use crate::device::{self, BindError, DeviceBinding, Revocations};
use crate::handshake::{
    AuthenticatedPeer, Established, HandshakeError, Initiator, LocalNode, PeerChecks, Responder,
    ResponderSent,
};
use crate::id::{CellId, Fingerprint, NodeId};
use crate::limits::{Rate, TokenBucket};
use crate::session::{Session, SessionConfig};
use crate::token::{DEFAULT_SKEW, RealmAnchor, Token, TokenKind, VerifiedToken, VerifyError};
use crate::wire::{self, CloseCode, FrameType, MAX_PAYLOAD, Message, NackCode};

/// Output buffer capacity kept once everything is written; more is released.
const OUT_KEEP: usize = 256 * 1024;

/// A check run on a joining peer's binding. Returns a refusal to send back in NACK.
pub type Check = Arc<dyn Fn(&DeviceBinding) -> Result<(), Refusal> + Send + Sync>;

/// Why a join was refused, as the NACK will say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: NackCode,
    /// Detail for the peer's logs.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: NackCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// Who may join this node.
#[derive(Clone, Default)]
pub enum Authorization {
    /// Any authenticated identity.
    #[default]
    AllowAll,
    /// Only these cells.
    AllowCells(BTreeSet<CellId>),
    /// A user-supplied check.
    Custom(Check),
}

/// The checks a responder runs on a JOIN, after the built-in ones (token signature and
/// validity, realm co-signature, binding to the handshake's node, revocations).
#[derive(Clone, Default)]
pub struct JoinPolicy {
    /// Extra authentication (default: none beyond the built-in checks).
    pub authenticate: Option<Check>,
    /// Authorization (default: allow all).
    pub authorize: Authorization,
}

impl std::fmt::Debug for JoinPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let authorize = match &self.authorize {
            Authorization::AllowAll => "allow all".to_string(),
            Authorization::AllowCells(c) => format!("{} cells", c.len()),
            Authorization::Custom(_) => "custom".to_string(),
        };
        f.debug_struct("JoinPolicy")
            .field("authenticate", &self.authenticate.is_some())
            .field("authorize", &authorize)
            .finish()
    }
}

impl JoinPolicy {
    fn check(&self, binding: &DeviceBinding) -> Result<(), Refusal> {
        if let Some(check) = &self.authenticate {
            check(binding)?;
        }
        match &self.authorize {
            Authorization::AllowAll => Ok(()),
            Authorization::AllowCells(cells) if cells.contains(&binding.cell()) => Ok(()),
            Authorization::AllowCells(_) => Err(Refusal::new(
                NackCode::Unauthorized,
                format!("cell {} is not on the allow-list", binding.cell()),
            )),
            Authorization::Custom(check) => check(binding),
        }
    }
}

/// Everything a connection needs to know about its own node. Shared by all connections.
#[derive(Debug)]
pub struct ConnectionConfig {
    /// This node's token and key-agreement secret.
    pub local: LocalNode,
    /// The cell's identity token naming this node (sent in JOIN and ACK).
    pub identity: Token,
    /// Revocations to honour.
    pub revocations: Revocations,
    /// The realm this node requires joiners to belong to, if any.
    pub realm: Option<RealmAnchor>,
    /// Who may join.
    pub policy: JoinPolicy,
    /// Allowed clock skew for tokens, in seconds.
    pub skew: u64,
    /// Milliseconds from creation to joined before the connection is dropped.
    pub setup_timeout_ms: u64,
    /// Send a keepalive after this many milliseconds without sending.
    pub keepalive_ms: u64,
    /// Close after this many milliseconds without hearing from the peer.
    pub idle_timeout_ms: u64,
    /// The connection closes on this many frames that failed authentication or came out of
    /// order (counted over the connection's life): the default 4 tolerates 3.
    pub max_bad_frames: u32,
    /// Rekeying.
    pub session: SessionConfig,
    /// Whether UPDATEs from peers are verified and reported ([`Event::Update`]). When false
    /// they are ignored unread, at no cost: for a node that has no use for them (a device on
    /// a relay).
    pub accept_updates: bool,
}

impl ConnectionConfig {
    /// A configuration with the default limits.
    pub fn new(local: LocalNode, identity: Token) -> Self {
        Self {
            local,
            identity,
            revocations: Revocations::new(),
            realm: None,
            policy: JoinPolicy::default(),
            skew: DEFAULT_SKEW,
            setup_timeout_ms: 10_000,
            keepalive_ms: 15_000,
            idle_timeout_ms: 60_000,
            max_bad_frames: 4,
            session: SessionConfig::default(),
            accept_updates: true,
        }
    }
}

/// Something that happened on a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The handshake completed; the peer's node is authenticated (not yet joined).
    Handshaked {
        /// The peer's node.
        node: NodeId,
    },
    /// The join completed; the peer is who its binding says.
    Joined(Box<DeviceBinding>),
    /// A join was refused: by this node (`by_peer` false) or by the peer.
    JoinRefused {
        /// The peer's node, when the handshake got that far.
        node: NodeId,
        /// The cell the peer claimed.
        cell: CellId,
        /// The code.
        code: NackCode,
        /// Detail.
        reason: String,
        /// Whether the peer refused us.
        by_peer: bool,
    },
    /// The peer told us of a node that joined it. Its tokens are verified and bound.
    Update(Box<DeviceBinding>),
    /// Application data from the peer.
    Data(Bytes),
    /// The connection is closed; nothing about the peer is kept.
    Closed {
        /// Why.
        code: CloseCode,
        /// Detail.
        reason: String,
        /// Whether the peer closed it.
        by_peer: bool,
    },
}

/// A command could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The peer has not joined yet.
    #[error("not joined yet")]
    NotJoined,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// The payload is over [`MAX_PAYLOAD`].
    #[error("message of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
}

enum State {
    InitiatorHello(Initiator),
    ResponderIdle,
    ResponderSent(ResponderSent),
    Live(Box<Live>),
    Closed,
}

struct Live {
    session: Session,
    peer: AuthenticatedPeer,
    joined: Option<DeviceBinding>,
    initiator: bool,
}

/// One link to one peer. See the module documentation for the polling order.
pub struct Connection {
    config: Arc<ConnectionConfig>,
    state: State,
    inbuf: BytesMut,
    out: Vec<u8>,
    out_sent: usize,
    events: VecDeque<Event>,
    created: Instant,
    last_sent: Instant,
    last_heard: Instant,
    bad_frames: u32,
    ping: u64,
    seen_updates: VecDeque<(Fingerprint, Fingerprint)>,
    /// UPDATEs this peer may still send (each costs two or three signature verifications).
    update_budget: TokenBucket,
    admission: Option<Check>,
}

/// UPDATEs a peer may send: bursts of 256, then 20 a second.
const UPDATE_RATE: Rate = Rate::every(50, 256);

/// UPDATEs remembered per connection, so replays are ignored.
const SEEN_UPDATES: usize = 256;

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::InitiatorHello(_) => "initiator-hello",
            State::ResponderIdle => "responder-idle",
            State::ResponderSent(_) => "responder-sent",
            State::Live(l) if l.joined.is_some() => "joined",
            State::Live(_) => "joining",
            State::Closed => "closed",
        };
        f.debug_struct("Connection").field("state", &state).finish()
    }
}

impl Connection {
    /// Starts a connection as initiator: the hello is ready in `poll_transmit`.
    pub fn connect(
        config: Arc<ConnectionConfig>,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        Self::connect_to(config, None, now, rng)
    }

    /// Like [`Connection::connect`], but only node `expected` (when given) may answer; any
    /// other responder is refused before this node's token is sent.
    pub fn connect_to(
        config: Arc<ConnectionConfig>,
        expected: Option<NodeId>,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        let mut conn = Self::new(config, now, State::Closed);
        match Initiator::start_expecting(&conn.config.local, expected, rng) {
            Ok((initiator, hello)) => {
                wire::put_frame(&mut conn.out, FrameType::Hello, &hello);
                conn.state = State::InitiatorHello(initiator);
            }
            Err(e) => conn.finish(CloseCode::ProtocolViolation, e.to_string(), false),
        }
        conn
    }

    /// Starts a connection as responder, waiting for a hello.
    pub fn accept(config: Arc<ConnectionConfig>, now: Instant) -> Self {
        Self::new(config, now, State::ResponderIdle)
    }

    fn new(config: Arc<ConnectionConfig>, now: Instant, state: State) -> Self {
        Self {
            config,
            state,
            inbuf: BytesMut::new(),
            out: Vec::new(),
            out_sent: 0,
            events: VecDeque::new(),
            created: now,
            last_sent: now,
            last_heard: now,
            bad_frames: 0,
            ping: 0,
            seen_updates: VecDeque::new(),
            // 256 at once (a hub's peer list), then 20 a second.
            update_budget: TokenBucket::full(UPDATE_RATE, now),
            admission: None,
        }
    }

    /// Adds a last check on the peer's JOIN, run after the policy's (responder only): for
    /// limits that depend on this connection (its address) or on the node's other
    /// connections, which the shared configuration cannot know. A check that takes something
    /// (a slot) must give it back itself if the connection ends; passing it means the peer is
    /// joined.
    pub fn set_admission(&mut self, check: Check) {
        self.admission = Some(check);
    }

    /// Feeds bytes received from the transport.
    pub fn handle_input(&mut self, data: &[u8], now: Instant, rng: &mut impl CryptoRngCore) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.inbuf.extend_from_slice(data);
        self.last_heard = now;
        loop {
            let (kind, body) = match wire::split_frame(&self.inbuf) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    // Refuse a frame this state cannot take as soon as its header shows it,
                    // rather than buffering up to MAX_FRAME bytes of it first.
                    match wire::peek_frame_type(&self.inbuf) {
                        Some(kind) if !self.expects(kind) => {
                            return self.violation(format!("unexpected {kind:?} frame"), now);
                        }
                        _ => break,
                    }
                }
                Err(e) => return self.violation(format!("bad frame: {e}"), now),
            };
            let frame = self.inbuf.split_to(body.end);
            self.handle_frame(kind, frame, body.start, now, rng);
            if matches!(self.state, State::Closed) {
                self.inbuf.clear();
                return;
            }
        }
        // A quiet connection should not keep a large buffer from a past burst.
        if self.inbuf.is_empty() && self.inbuf.capacity() > 64 * 1024 {
            self.inbuf = BytesMut::new();
        }
    }

    /// Advances timers: keepalive, idle timeout, setup deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        let c = Arc::clone(&self.config);
        match &self.state {
            State::Closed => {}
            State::Live(live) if live.joined.is_some() => {
                if now.millis_since(self.last_heard) >= c.idle_timeout_ms {
                    self.close_with(CloseCode::Idle, "nothing heard from the peer", now);
                } else if now.millis_since(self.last_sent) >= c.keepalive_ms {
                    self.ping += 1;
                    self.send_message(&Message::Ping(self.ping), now);
                }
            }
            _ => {
                if now.millis_since(self.created) >= c.setup_timeout_ms {
                    self.close_with(CloseCode::Timeout, "handshake and join took too long", now);
                }
            }
        }
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = &self.config;
        match &self.state {
            State::Closed => None,
            State::Live(live) if live.joined.is_some() => Some(std::cmp::min(
                self.last_heard.plus_millis(c.idle_timeout_ms),
                self.last_sent.plus_millis(c.keepalive_ms),
            )),
            _ => Some(self.created.plus_millis(c.setup_timeout_ms)),
        }
    }

    /// Everything to write to the transport, in order, as one batch (copies out).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let pending = self.pending_transmit();
        if pending.is_empty() {
            return None;
        }
        let bytes = pending.to_vec();
        self.advance_transmit(bytes.len());
        Some(bytes)
    }

    /// The bytes not yet written, in order, for writing straight from this buffer.
    pub fn pending_transmit(&self) -> &[u8] {
        &self.out[self.out_sent..]
    }

    /// Records that the first `n` bytes of [`Connection::pending_transmit`] were written.
    pub fn advance_transmit(&mut self, n: usize) {
        self.out_sent = (self.out_sent + n).min(self.out.len());
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
            if self.out.capacity() > OUT_KEEP {
                self.out = Vec::new();
            }
        }
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether the connection is over (write out [`Connection::pending_transmit`] first).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the peer has joined.
    pub fn is_joined(&self) -> bool {
        matches!(&self.state, State::Live(l) if l.joined.is_some())
    }

    /// The peer's binding, once joined.
    pub fn peer(&self) -> Option<&DeviceBinding> {
        match &self.state {
            State::Live(l) => l.joined.as_ref(),
            _ => None,
        }
    }

    /// Sends application data to the joined peer.
    pub fn send(&mut self, data: Bytes, now: Instant) -> Result<(), SendError> {
        if data.len() > MAX_PAYLOAD {
            return Err(SendError::TooLarge(data.len()));
        }
        self.ready()?;
        self.send_message(&Message::Data(data), now);
        Ok(())
    }

    /// Tells the joined peer about another node that joined us.
    pub fn send_update(&mut self, about: &DeviceBinding, now: Instant) -> Result<(), SendError> {
        self.ready()?;
        let msg = Message::Update {
            node: Box::new(about.node_token().token().clone()),
            identity: Box::new(about.identity().token().clone()),
        };
        self.send_message(&msg, now);
        Ok(())
    }

    /// Closes the connection, telling the peer why when a session exists.
    pub fn close(&mut self, code: CloseCode, reason: &str, now: Instant) {
        self.close_with(code, reason, now);
    }

    fn ready(&self) -> Result<(), SendError> {
        match &self.state {
            State::Live(l) if l.joined.is_some() => Ok(()),
            State::Closed => Err(SendError::Closed),
            _ => Err(SendError::NotJoined),
        }
    }

    /// Whether a frame of `kind` is what this state waits for.
    fn expects(&self, kind: FrameType) -> bool {
        matches!(
            (&self.state, kind),
            (State::ResponderIdle, FrameType::Hello)
                | (State::InitiatorHello(_), FrameType::Response)
                | (State::ResponderSent(_), FrameType::Finish)
                | (State::Live(_), FrameType::Session)
        )
    }

    fn checks(&self, now: Instant) -> PeerChecks<'_> {
        PeerChecks {
            now: now.timestamp(),
            skew: self.config.skew,
            revocations: &self.config.revocations,
            realm_issuer: self.config.realm.as_ref().map(|r| r.issuer),
        }
    }

    fn handle_frame(
        &mut self,
        kind: FrameType,
        frame: BytesMut,
        body_start: usize,
        now: Instant,
        rng: &mut impl CryptoRngCore,
    ) {
        let body = &frame[body_start..];
        let state = std::mem::replace(&mut self.state, State::Closed);
        match (state, kind) {
            (State::ResponderIdle, FrameType::Hello) => {
                match Responder::read_hello(body, &self.config.local, rng) {
                    Ok((sent, response)) => {
                        wire::put_frame(&mut self.out, FrameType::Response, &response);
                        self.last_sent = now;
                        self.state = State::ResponderSent(sent);
                    }
                    Err(e) => self.handshake_failed(e),
                }
            }
            (State::InitiatorHello(initiator), FrameType::Response) => {
                let result = {
                    let checks = self.checks(now);
                    initiator.read_response(body, &self.config.local, &checks)
                };
                match result {
                    Ok((established, finish)) => {
                        wire::put_frame(&mut self.out, FrameType::Finish, &finish);
                        self.go_live(established, true, now);
                        let join = Message::Join {
                            identity: self.config.identity.clone(),
                        };
                        self.send_message(&join, now);
                    }
                    Err(e) => self.handshake_failed(e),
                }
            }
            (State::ResponderSent(sent), FrameType::Finish) => {
                let result = sent.read_finish(body, &self.checks(now));
                match result {
                    Ok(established) => self.go_live(established, false, now),
                    Err(e) => self.handshake_failed(e),
                }
            }
            (State::Live(mut live), FrameType::Session) => {
                let mut frame = frame;
                let opened = live.session.open(&mut frame[body_start..]);
                self.state = State::Live(live);
                match opened {
                    Ok(range) => {
                        let plain = frame
                            .freeze()
                            .slice(body_start + range.start..body_start + range.end);
                        match Message::decode(plain) {
                            Ok(msg) => self.handle_message(msg, now),
                            Err(e) => self.violation(format!("bad message: {e}"), now),
                        }
                    }
                    Err(_) => {
                        self.bad_frames += 1;
                        if self.bad_frames >= self.config.max_bad_frames {
                            self.close_with(
                                CloseCode::BadFrames,
                                "too many frames failed authentication",
                                now,
                            );
                        }
                    }
                }
            }
            (state, kind) => {
                self.state = state;
                self.violation(format!("unexpected {kind:?} frame"), now);
            }
        }
    }

    fn go_live(&mut self, established: Established, initiator: bool, now: Instant) {
        let node = established.peer.node();
        self.state = State::Live(Box::new(Live {
            session: Session::new(established.keys, now, self.config.session),
            peer: established.peer,
            joined: None,
            initiator,
        }));
        self.last_sent = now;
        self.events.push_back(Event::Handshaked { node });
    }

    fn handle_message(&mut self, msg: Message, now: Instant) {
        let State::Live(live) = &self.state else {
            return;
        };
        let (joined, initiator) = (live.joined.is_some(), live.initiator);
        match (msg, joined, initiator) {
            (Message::Join { identity }, false, false)
            | (Message::Ack { identity }, false, true) => self.handle_identity(&identity, now),
            (Message::Nack { code, reason }, false, true) => {
                let (node, cell) = (live.peer.node(), live.peer.claimed_cell());
                self.events.push_back(Event::JoinRefused {
                    node,
                    cell,
                    code,
                    reason: reason.clone(),
                    by_peer: true,
                });
                self.finish(CloseCode::Normal, format!("join refused: {reason}"), true);
            }
            (Message::Update { .. }, true, _) if !self.config.accept_updates => {}
            (Message::Update { node, identity }, true, _) => {
                if !self.update_budget.take(UPDATE_RATE, now) {
                    return self.violation("UPDATE flood".into(), now);
                }
                let key = (node.fingerprint(), identity.fingerprint());
                if self.seen_updates.contains(&key) {
                    return; // a replay: told once is enough
                }
                if self.seen_updates.len() == SEEN_UPDATES {
                    self.seen_updates.pop_front();
                }
                self.seen_updates.push_back(key);
                if let Some(binding) = self.verify_update(&node, &identity, now) {
                    self.events.push_back(Event::Update(Box::new(binding)));
                }
            }
            (Message::Ping(n), true, _) => self.send_message(&Message::Pong(n), now),
            (Message::Pong(_), true, _) => {}
            (Message::Data(d), true, _) => self.events.push_back(Event::Data(d)),
            (Message::Close { code, reason }, _, _) => self.finish(code, reason, true),
            (msg, _, _) => self.violation(format!("unexpected message {}", kind_name(&msg)), now),
        }
    }

    /// A JOIN (as responder) or an ACK (as initiator): the same checks either way. The
    /// responder answers ACK or NACK (then closes without CLOSE, as the NACK says it all); the
    /// initiator refusing its responder closes with CLOSE.
    fn handle_identity(&mut self, identity: &Token, now: Instant) {
        let State::Live(live) = &self.state else {
            return;
        };
        let (peer, responder) = (live.peer.clone(), !live.initiator);
        match self.admit(&peer, identity, now) {
            Ok(binding) => {
                if responder {
                    let ack = Message::Ack {
                        identity: self.config.identity.clone(),
                    };
                    self.send_message(&ack, now);
                }
                if let State::Live(live) = &mut self.state {
                    live.joined = Some(binding.clone());
                }
                self.events.push_back(Event::Joined(Box::new(binding)));
            }
            Err(refusal) => {
                self.events.push_back(Event::JoinRefused {
                    node: peer.node(),
                    cell: peer.claimed_cell(),
                    code: refusal.code,
                    reason: refusal.reason.clone(),
                    by_peer: false,
                });
                if responder {
                    let nack = Message::Nack {
                        code: refusal.code,
                        reason: refusal.reason.clone(),
                    };
                    self.send_message(&nack, now);
                    self.finish(CloseCode::Normal, refusal.reason, false);
                } else {
                    let reason = format!("responder refused: {}", refusal.reason);
                    self.close_with(CloseCode::Normal, &reason, now);
                }
            }
        }
    }

    /// The checks on a JOIN (responder) or an ACK (initiator): every identity check, then
    /// the policy's authenticate and authorize, then (on a JOIN) the connection's admission.
    fn admit(
        &self,
        peer: &AuthenticatedPeer,
        identity: &Token,
        now: Instant,
    ) -> Result<DeviceBinding, Refusal> {
        let binding = self.check_identity(peer.token(), identity, now)?;
        self.config.policy.check(&binding)?;
        // An initiator checks its responder's ACK here too; the admission is for joiners.
        let responder = matches!(&self.state, State::Live(l) if !l.initiator);
        if let Some(admit) = self.admission.as_ref().filter(|_| responder) {
            admit(&binding)?;
        }
        Ok(binding)
    }

    /// The checks every identity this node accepts goes through (JOIN, ACK, UPDATE), in
    /// order: the identity token's signature and validity, the realm's co-signature when this
    /// node has a realm, its binding to the (already verified) node token, and revocations:
    /// the cell's of its device, and the realm's of the cell or the device.
    fn check_identity(
        &self,
        node_token: &VerifiedToken,
        identity: &Token,
        now: Instant,
    ) -> Result<DeviceBinding, Refusal> {
        let c = &self.config;
        let t = now.timestamp();
        let verified = match &c.realm {
            Some(realm) => identity.verify_in_realm(realm, t, c.skew),
            None => identity.verify(t, c.skew),
        }
        .map_err(|e| match e {
            VerifyError::WrongRealm(_) | VerifyError::NotCoSigned => {
                Refusal::new(NackCode::NotInRealm, e.to_string())
            }
            e => Refusal::new(NackCode::Unauthenticated, format!("identity token: {e}")),
        })?;
        let binding = device::bind(node_token, &verified, &c.revocations).map_err(|e| match e {
            BindError::Revoked(_) => Refusal::new(NackCode::Revoked, e.to_string()),
            e => Refusal::new(NackCode::Unauthenticated, e.to_string()),
        })?;
        if let Some(realm) = &c.realm {
            let revoked = c
                .revocations
                .is_revoked_by(realm.issuer, binding.cell().key())
                || c.revocations
                    .is_revoked_by(realm.issuer, binding.node().key());
            if revoked {
                return Err(Refusal::new(NackCode::Revoked, "revoked by the realm"));
            }
        }
        Ok(binding)
    }

    fn verify_update(&self, node: &Token, identity: &Token, now: Instant) -> Option<DeviceBinding> {
        let node = node.verify(now.timestamp(), self.config.skew).ok()?;
        if node.claims().kind != TokenKind::Node {
            return None;
        }
        self.check_identity(&node, identity, now).ok()
    }

    fn send_message(&mut self, msg: &Message, now: Instant) {
        let State::Live(live) = &mut self.state else {
            return;
        };
        if live.session.seal(msg, now, &mut self.out).is_err() {
            return self.finish(
                CloseCode::ProtocolViolation,
                "session nonces exhausted".into(),
                false,
            );
        }
        self.last_sent = now;
    }

    fn handshake_failed(&mut self, e: HandshakeError) {
        self.finish(
            CloseCode::ProtocolViolation,
            format!("handshake failed: {e}"),
            false,
        );
    }

    fn violation(&mut self, reason: String, now: Instant) {
        self.close_with(CloseCode::ProtocolViolation, &reason, now);
    }

    fn close_with(&mut self, code: CloseCode, reason: &str, now: Instant) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.send_message(
            &Message::Close {
                code,
                reason: reason.to_string(),
            },
            now,
        );
        self.finish(code, reason.to_string(), false);
    }

    /// Enters the closed state: the session keys and everything learned of the peer are
    /// dropped here.
    fn finish(&mut self, code: CloseCode, reason: String, by_peer: bool) {
        self.state = State::Closed;
        self.events.push_back(Event::Closed {
            code,
            reason,
            by_peer,
        });
    }
}

fn kind_name(msg: &Message) -> &'static str {
    match msg {
        Message::Join { .. } => "JOIN",
        Message::Ack { .. } => "ACK",
        Message::Nack { .. } => "NACK",
        Message::Update { .. } => "UPDATE",
        Message::Ping(_) => "PING",
        Message::Pong(_) => "PONG",
        Message::Data(_) => "DATA",
        _ => "CLOSE",
    }
}
