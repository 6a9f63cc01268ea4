//! A deterministic in-memory world: the core's relay server and mailboxes, with their stores
//! in memory, on virtual time, talking over in-memory links with seeded latencies. Nothing
//! in it is a model of the real thing: the relay is [`RelayServer`] over a [`MemStore`], each
//! device is a [`Mailbox`] over a [`Disk`], and every payload between them is the records
//! the real ones write. The world adds only what the runtime adds: delays, connections that
//! come and go, processes that stop, crash and start again.
//!
//! One seed gives one history: the same seed and the same calls give the same
//! [`World::trace_hash`]. Device and relay crashes lose exactly what a crash loses: a
//! mailbox's uncommitted state, the relay's store operations not yet carried out, the
//! payloads on the wire.
//!
//! The delivery checker (`tests/world_checker.rs`) runs thousands of seeded histories in it;
//! the mesh simulator will add nodes and links as real `Connection`s.

// A harness for tests and simulations: what it cannot do is a failed run.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::device::Revocations;
use crate::e2e::{Message, SeenChange, SessionKey};
use crate::id::{CellId, NodeId};
use crate::mailbox::{
    Commit, Config as MailboxConfig, Event, Mailbox, Saved, SendError, Sent, StoreOp as DiskOp,
    Token,
};
use crate::relay::harness::config as relay_config;
use crate::relay::mem_store::{MemStore, MemStoreLimits};
use crate::relay::server::{Action, OpId, Outlets, RelayServer, ServerConfig, StoreOp};
use crate::relay::{MsgId, Record, records};
use crate::testing::{START, TestNode};
use crate::{Instant, Timestamp};

/// What a device keeps on disk, in memory.
#[derive(Clone, Default)]
pub struct Disk {
    sessions: BTreeMap<SessionKey, Vec<u8>>,
    seen: BTreeMap<(CellId, MsgId), Timestamp>,
    floors: BTreeMap<CellId, Timestamp>,
    sends: BTreeMap<MsgId, Vec<u8>>,
    /// Commits applied.
    pub commits: u64,
}

impl Disk {
    /// Writes one commit, whole.
    pub fn apply(&mut self, commit: Commit) {
        self.commits += 1;
        for op in commit.ops {
            match op {
                DiskOp::PutSession(k, v) => {
                    self.sessions.insert(k, v.to_vec());
                }
                DiskOp::DeleteSession(k) => {
                    self.sessions.remove(&k);
                }
                DiskOp::Seen(SeenChange::Put { cell, id, time }) => {
                    self.seen.insert((cell, id), time);
                }
                DiskOp::Seen(SeenChange::Forget { cell, id, .. }) => {
                    self.seen.remove(&(cell, id));
                }
                DiskOp::Seen(SeenChange::Floor { cell, floor }) => {
                    self.floors.insert(cell, floor);
                }
                DiskOp::Seen(SeenChange::ExpireBefore(t)) => self.seen.retain(|_, v| *v >= t),
                DiskOp::PutSend(id, v) => {
                    self.sends.insert(id, v.to_vec());
                }
                DiskOp::DeleteSend(id) => {
                    self.sends.remove(&id);
                }
            }
        }
    }

    /// What a mailbox starts from.
    pub fn saved(&self) -> Saved {
        Saved {
            sessions: self
                .sessions
                .iter()
                .map(|(k, v)| (*k, Zeroizing::new(v.clone())))
                .collect(),
            seen: self.seen.iter().map(|((c, i), t)| (*c, *i, *t)).collect(),
            floors: self.floors.iter().map(|(c, t)| (*c, *t)).collect(),
            sends: self
                .sends
                .values()
                .map(|v| Zeroizing::new(v.clone()))
                .collect(),
        }
    }

    /// Sends kept on disk (not yet acknowledged by every device they were sealed for).
    pub fn sends_kept(&self) -> usize {
        self.sends.len()
    }

    /// The keys of the sessions kept.
    pub fn session_keys(&self) -> impl Iterator<Item = &SessionKey> {
        self.sessions.keys()
    }

    /// Envelopes in the duplicate memory.
    pub fn seen_len(&self) -> usize {
        self.seen.len()
    }
}

/// How the world behaves.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// The seed of every choice the world makes.
    pub seed: u64,
    /// One-way latency of a link, drawn uniformly from this range, milliseconds.
    pub latency_ms: (u64, u64),
    /// How long the relay's store takes to carry out an operation, milliseconds: the window
    /// in which a relay crash loses it.
    pub store_ms: u64,
    /// How long a device waits to connect again after its link was cut, milliseconds.
    pub reconnect_ms: u64,
    /// The mailboxes' configuration.
    pub mailbox: MailboxConfig,
    /// The relay's.
    pub relay: ServerConfig,
}

impl WorldConfig {
    /// Latencies of 1-20 ms, a store of 2 ms, reconnects after 200 ms, a 10 s
    /// acknowledgement timeout, and a small relay ([`relay_config`]).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            latency_ms: (1, 20),
            store_ms: 2,
            reconnect_ms: 200,
            mailbox: MailboxConfig::default(),
            relay: relay_config(),
        }
    }
}

/// A device: its identity, its disk, and while its process runs, its mailbox and what its
/// application was handed.
pub struct Device {
    /// Its identity.
    pub id: TestNode,
    /// Its disk.
    pub disk: Disk,
    mailbox: Option<Mailbox>,
    rng: ChaCha20Rng,
    /// Every message its application took, in order, over every run.
    pub got: Vec<Message>,
    /// Handed to this run's application and not yet taken: lost if the process ends.
    unread: Vec<Message>,
    handed: u64,
    taken: u64,
    /// Outcomes of its sends, by token.
    pub outcomes: BTreeMap<Token, Result<Sent, SendError>>,
    /// Whether its application takes what it is handed (a slow one does not, for a while).
    takes: bool,
    /// The current connection's number, while it has one.
    link: Option<u64>,
    /// When it connects again, after a cut.
    reconnect_at: Option<Instant>,
}

impl Device {
    /// Whether its process runs.
    pub fn running(&self) -> bool {
        self.mailbox.is_some()
    }

    /// Whether it is connected to the relay.
    pub fn connected(&self) -> bool {
        self.link.is_some()
    }
}

/// Where a payload on the wire goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum To {
    Relay { from: usize },
    Device(usize),
}

struct Packet {
    to: To,
    /// The connection it travels on: dropped if that connection is gone.
    link: u64,
    payload: Bytes,
}

/// The relay's links take everything at once.
struct Instant0;

impl Outlets for Instant0 {
    fn waiting(&self, _: NodeId) -> usize {
        0
    }
    fn total(&self) -> usize {
        0
    }
}

/// The world; see the [module docs](self).
pub struct World {
    /// The virtual time.
    pub now: Instant,
    config: WorldConfig,
    rng: ChaCha20Rng,
    relay: Option<RelayServer>,
    relay_node: NodeId,
    /// The relay's store: survives its crashes.
    pub store: MemStore,
    /// Store operations waiting to be carried out, in order, each with when.
    store_queue: VecDeque<(Instant, OpId, StoreOp)>,
    /// Payloads on the wire, by arrival time and a sequence number (FIFO per link, as the
    /// latency of a link's packets only grows).
    wire: BTreeMap<(Instant, u64), Packet>,
    /// The last arrival time on each link, so a link keeps its order.
    last_arrival: BTreeMap<(u64, bool), Instant>,
    seq: u64,
    next_link: u64,
    next_token: Token,
    /// The devices.
    pub devices: Vec<Device>,
    by_node: BTreeMap<NodeId, usize>,
    /// Timers, by when: each entity's current deadline is in `deadlines`; an entry that no
    /// longer matches it is stale and skipped.
    timers: BTreeSet<(Instant, Timer)>,
    deadlines: BTreeMap<Timer, Instant>,
    /// Devices whose mailbox was called since their outputs were last taken.
    dirty: BTreeSet<usize>,
    trace: Sha256,
    events: u64,
}

/// What a timer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Relay,
    Mailbox(usize),
    Reconnect(usize),
}

impl World {
    /// A world with a running relay and these devices, none of them running yet.
    pub fn new(config: WorldConfig, devices: Vec<TestNode>) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
        let relay_node = TestNode::new(250, START.timestamp()).node_id();
        let store = MemStore::new(MemStoreLimits::default());
        let by_node = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.node_id(), i))
            .collect();
        let devices = devices
            .into_iter()
            .map(|id| {
                let mut seed = [0; 32];
                rng.fill_bytes(&mut seed);
                Device {
                    id,
                    disk: Disk::default(),
                    mailbox: None,
                    rng: ChaCha20Rng::from_seed(seed),
                    got: Vec::new(),
                    unread: Vec::new(),
                    handed: 0,
                    taken: 0,
                    outcomes: BTreeMap::new(),
                    takes: true,
                    link: None,
                    reconnect_at: None,
                }
            })
            .collect();
        let mut w = Self {
            now: START,
            rng,
            relay: None,
            relay_node,
            store,
            store_queue: VecDeque::new(),
            wire: BTreeMap::new(),
            last_arrival: BTreeMap::new(),
            seq: 0,
            next_link: 1,
            next_token: 1,
            devices,
            by_node,
            timers: BTreeSet::new(),
            deadlines: BTreeMap::new(),
            dirty: BTreeSet::new(),
            trace: Sha256::new(),
            events: 0,
            config,
        };
        w.start_relay();
        w
    }

    /// A hash of everything that happened, in order.
    pub fn trace_hash(&self) -> [u8; 32] {
        self.trace.clone().finalize().into()
    }

    /// How many things happened.
    pub fn events(&self) -> u64 {
        self.events
    }

    fn note(&mut self, what: &str, detail: impl std::fmt::Debug) {
        self.events += 1;
        self.trace
            .update(format!("{} {what} {detail:?}\n", self.now.0).as_bytes());
    }

    /// Whether the relay runs.
    pub fn relay_running(&self) -> bool {
        self.relay.is_some()
    }

    /// Starts the relay over its store (after a crash: a new machine over the same store),
    /// and every running device connects.
    pub fn start_relay(&mut self) {
        if self.relay.is_some() {
            return;
        }
        let mut server = RelayServer::new(
            self.config.relay.clone(),
            self.now,
            self.store.registered(),
            self.store.queued_devices(),
        );
        for bytes in self.store.revocations() {
            let token = crate::token::Token::decode(&bytes).expect("the store keeps tokens");
            server
                .load_revocation(&token)
                .expect("the store keeps valid revocations");
        }
        self.relay = Some(server);
        self.note("relay started", ());
        for d in 0..self.devices.len() {
            if self.devices[d].running() {
                self.connect(d);
            }
        }
    }

    /// The relay's process dies: its store operations not yet carried out are lost, and
    /// every link with it.
    pub fn crash_relay(&mut self) {
        if self.relay.take().is_none() {
            return;
        }
        self.note("relay crashed", self.store_queue.len());
        self.store_queue.clear();
        for d in 0..self.devices.len() {
            self.drop_link(d, false);
        }
    }

    /// Device `d`'s process starts over its disk and connects.
    pub fn start(&mut self, d: usize) {
        let config = self.config.mailbox.clone();
        self.start_with(d, config);
    }

    /// Device `d` starts a process that only sends (a one-shot `cellmesh send`): it takes no
    /// messages, which wait at the relay for the device's next process that does.
    pub fn start_send_only(&mut self, d: usize) {
        let config = MailboxConfig {
            receive: false,
            ..self.config.mailbox.clone()
        };
        self.start_with(d, config);
    }

    /// Device `d`'s link is cut and stays down for `ms` (a partition from the relay), then
    /// it connects again.
    pub fn partition(&mut self, d: usize, ms: u64) {
        if self.devices[d].link.is_some() {
            self.note("partitioned", (d, ms));
            self.drop_link(d, false);
            let at = self.now.plus_millis(ms);
            self.set_reconnect(d, Some(at));
        }
    }

    /// Whether device `d`'s application takes what it is handed: one that does not leaves it
    /// unacknowledged, so that what happens next (a crash, a cut) finds it in flight.
    pub fn set_takes(&mut self, d: usize, takes: bool) {
        self.devices[d].takes = takes;
        self.dirty.insert(d);
        self.pump();
    }

    fn start_with(&mut self, d: usize, config: MailboxConfig) {
        if self.devices[d].running() {
            return;
        }
        let dev = &mut self.devices[d];
        let mailbox = Mailbox::new(
            dev.id.local(),
            self.relay_node,
            config,
            dev.disk.saved(),
            Revocations::new(),
            self.now,
            &mut dev.rng,
        );
        dev.mailbox = Some(mailbox);
        dev.handed = 0;
        dev.taken = 0;
        dev.unread.clear();
        self.note("started", d);
        self.dirty.insert(d);
        self.connect(d);
        self.pump();
    }

    /// Device `d` closes cleanly: what its application took is acknowledged, and its last
    /// payloads reach the relay before the link goes.
    pub fn stop(&mut self, d: usize) {
        let dev = &mut self.devices[d];
        let Some(mb) = dev.mailbox.as_mut() else {
            return;
        };
        mb.close(dev.taken);
        self.dirty.insert(d);
        self.pump();
        // Its last payloads arrive before its departure is seen.
        let link = self.devices[d].link;
        let due: Vec<(Instant, u64)> = self
            .wire
            .iter()
            .filter(|(_, p)| Some(p.link) == link && matches!(p.to, To::Relay { .. }))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(p) = self.wire.remove(&k) {
                self.arrive(p);
            }
        }
        self.crash(d);
    }

    /// Device `d`'s process dies: what its mailbox did not commit is lost.
    pub fn crash(&mut self, d: usize) {
        if self.devices[d].mailbox.take().is_none() {
            return;
        }
        self.note("crashed", d);
        self.drop_link(d, false);
    }

    /// Device `d`'s link is cut (what is on the wire is lost); it connects again after
    /// [`WorldConfig::reconnect_ms`].
    pub fn cut(&mut self, d: usize) {
        if self.devices[d].link.is_some() {
            self.note("cut", d);
            self.drop_link(d, true);
        }
    }

    /// Device `d` sends `body` to `cell`; returns the token its outcome is filed under.
    pub fn send(&mut self, d: usize, cell: CellId, body: &[u8]) -> Option<Token> {
        let token = self.next_token;
        let now = self.now;
        let mb = self.devices[d].mailbox.as_mut()?;
        self.next_token += 1;
        mb.submit(cell, Bytes::copy_from_slice(body), None, token, now);
        self.dirty.insert(d);
        self.note("send", (d, token));
        self.pump();
        Some(token)
    }

    fn connect(&mut self, d: usize) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        if self.devices[d].link.is_some() || !self.devices[d].running() {
            return;
        }
        let dev = &self.devices[d];
        let (cell, node) = (dev.id.cell_id(), dev.id.node_id());
        if relay.check_join(self.now, cell, node).is_err() {
            self.note("join refused", d);
            let at = self.now.plus_millis(self.config.reconnect_ms);
            self.set_reconnect(d, Some(at));
            return;
        }
        relay.joined(
            self.now,
            cell,
            node,
            std::net::SocketAddr::from(([10, 0, 0, 1], 4000 + d as u16)),
            dev.id.node_token.to_bytes(),
            dev.id.identity.to_bytes(),
        );
        let link = self.next_link;
        self.next_link += 1;
        let dev = &mut self.devices[d];
        dev.link = Some(link);
        if let Some(mb) = dev.mailbox.as_mut() {
            mb.handle_connected();
        }
        self.dirty.insert(d);
        self.set_reconnect(d, None);
        self.note("connected", (d, link));
        self.pump();
    }

    fn drop_link(&mut self, d: usize, reconnect: bool) {
        let Some(link) = self.devices[d].link.take() else {
            return;
        };
        self.wire.retain(|_, p| p.link != link);
        self.last_arrival.remove(&(link, true));
        self.last_arrival.remove(&(link, false));
        let node = self.devices[d].id.node_id();
        if let Some(relay) = self.relay.as_mut() {
            relay.left(self.now, node);
        }
        if let Some(mb) = self.devices[d].mailbox.as_mut() {
            mb.handle_disconnected();
        }
        self.dirty.insert(d);
        if reconnect {
            let at = self.now.plus_millis(self.config.reconnect_ms);
            self.set_reconnect(d, Some(at));
        }
        self.pump();
    }

    fn put_on_wire(&mut self, to: To, link: u64, payload: Bytes) {
        let (lo, hi) = self.config.latency_ms;
        let latency = lo + self.rng.next_u64() % (hi - lo + 1);
        let toward_relay = matches!(to, To::Relay { .. });
        let last = self
            .last_arrival
            .get(&(link, toward_relay))
            .copied()
            .unwrap_or(self.now);
        let at = self.now.plus_millis(latency).max(last);
        self.last_arrival.insert((link, toward_relay), at);
        self.seq += 1;
        self.wire
            .insert((at, self.seq), Packet { to, link, payload });
    }

    fn arrive(&mut self, p: Packet) {
        match p.to {
            To::Relay { from } => {
                if self.devices[from].link != Some(p.link) {
                    return;
                }
                let dev = &self.devices[from];
                let (node, cell) = (dev.id.node_id(), dev.id.cell_id());
                if let Some(relay) = self.relay.as_mut() {
                    relay.records(self.now, [(node, cell, p.payload)], &Instant0);
                }
            }
            To::Device(d) => {
                if self.devices[d].link != Some(p.link) {
                    return;
                }
                let now = self.now;
                let dev = &mut self.devices[d];
                if let Some(mb) = dev.mailbox.as_mut() {
                    mb.handle_payload(p.payload, now, &mut dev.rng);
                    self.dirty.insert(d);
                }
            }
        }
        self.pump();
    }

    /// Carries out what the relay and the mailboxes ask, until they ask nothing more.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(action) = self.relay.as_mut().and_then(RelayServer::poll_action) {
                moved = true;
                match action {
                    Action::Send { to, payload } => {
                        if let Some(&d) = self.by_node.get(&to)
                            && let Some(link) = self.devices[d].link
                        {
                            self.put_on_wire(To::Device(d), link, payload);
                        }
                    }
                    Action::Disconnect { node, reason } => {
                        if let Some(&d) = self.by_node.get(&node) {
                            self.note("disconnected", (d, reason));
                            self.drop_link(d, true);
                        }
                    }
                    Action::Store(id, op) => {
                        let at = self.now.plus_millis(self.config.store_ms);
                        self.store_queue.push_back((at, id, op));
                    }
                    Action::Event(e) => self.note("relay", e),
                }
            }
            let now = self.now;
            let dirty = std::mem::take(&mut self.dirty);
            for d in dirty {
                moved = true;
                self.pump_device(d, now);
            }
            self.refresh_timer(Timer::Relay);
            if !moved {
                return;
            }
        }
    }

    /// Takes what device `d`'s mailbox asks: commits (written at once), payloads for the
    /// relay, events for the application; its application takes what it is handed.
    fn pump_device(&mut self, d: usize, now: Instant) {
        let link = self.devices[d].link;
        let dev = &mut self.devices[d];
        let Some(mb) = dev.mailbox.as_mut() else {
            self.refresh_timer(Timer::Mailbox(d));
            return;
        };
        while let Some(commit) = mb.poll_commit(now, &mut dev.rng) {
            let id = commit.id;
            dev.disk.apply(commit);
            mb.handle_committed(id);
        }
        let mut out = Vec::new();
        while let Some(payload) = mb.poll_transmit(now, &mut dev.rng) {
            out.push(payload);
        }
        let mut events = Vec::new();
        while let Some(ev) = mb.poll_event() {
            events.push(ev);
        }
        let mut again = false;
        for ev in events {
            again = true;
            match ev {
                Event::Sent { token, result } => {
                    self.trace
                        .update(format!("sent {d} {token} {result:?}\n").as_bytes());
                    self.devices[d].outcomes.insert(token, result);
                }
                Event::Messages(m) => {
                    let dev = &mut self.devices[d];
                    dev.handed += m.len() as u64;
                    dev.unread.extend(m);
                }
                _ => {}
            }
        }
        let dev = &mut self.devices[d];
        if dev.takes
            && dev.taken < dev.handed
            && let Some(mb) = dev.mailbox.as_mut()
        {
            dev.taken = dev.handed;
            dev.got.append(&mut dev.unread);
            mb.handle_taken(dev.taken);
            again = true;
        }
        if let Some(link) = link {
            for payload in out {
                self.put_on_wire(To::Relay { from: d }, link, payload);
            }
        }
        if again {
            self.dirty.insert(d);
        }
        self.refresh_timer(Timer::Mailbox(d));
    }

    /// Records when `timer` is next due, as its owner says now.
    fn refresh_timer(&mut self, timer: Timer) {
        let due = match timer {
            Timer::Relay => self.relay.as_ref().map(RelayServer::poll_timeout),
            Timer::Mailbox(d) => self.devices[d]
                .mailbox
                .as_ref()
                .and_then(Mailbox::poll_timeout),
            Timer::Reconnect(d) => self.devices[d].reconnect_at,
        };
        if self.deadlines.get(&timer).copied() == due {
            return;
        }
        match due {
            Some(t) => {
                self.deadlines.insert(timer, t);
                self.timers.insert((t, timer));
            }
            None => {
                self.deadlines.remove(&timer);
            }
        }
    }

    fn set_reconnect(&mut self, d: usize, at: Option<Instant>) {
        self.devices[d].reconnect_at = at;
        self.refresh_timer(Timer::Reconnect(d));
    }

    /// The earliest timer that is still current.
    fn next_timer(&mut self) -> Option<(Instant, Timer)> {
        while let Some(&(t, timer)) = self.timers.first() {
            if self.deadlines.get(&timer) == Some(&t) {
                return Some((t, timer));
            }
            self.timers.pop_first();
        }
        None
    }

    /// The next time something is due.
    fn next_due(&mut self) -> Option<Instant> {
        [
            self.wire.keys().next().map(|k| k.0),
            self.store_queue.front().map(|e| e.0),
            self.next_timer().map(|t| t.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs everything due up to `ms` milliseconds from now, and moves the clock there.
    pub fn run_for(&mut self, ms: u64) {
        let end = self.now.plus_millis(ms);
        while let Some(t) = self.next_due().filter(|t| *t <= end) {
            self.now = self.now.max(t);
            self.step();
        }
        self.now = end;
    }

    fn step(&mut self) {
        let now = self.now;
        let due: Vec<(Instant, u64)> = self
            .wire
            .range(..=(now, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(p) = self.wire.remove(&k) {
                self.arrive(p);
            }
        }
        while self.store_queue.front().is_some_and(|(t, _, _)| *t <= now) {
            let Some((_, id, op)) = self.store_queue.pop_front() else {
                break;
            };
            let result = self.store.apply(&op);
            if let Some(relay) = self.relay.as_mut() {
                relay.store_done(now, id, result, &Instant0);
            }
            self.pump();
        }
        while let Some((t, timer)) = self.next_timer().filter(|(t, _)| *t <= now) {
            self.timers.remove(&(t, timer));
            self.deadlines.remove(&timer);
            match timer {
                Timer::Relay => {
                    if let Some(relay) = self.relay.as_mut() {
                        relay.handle_timeout(now, &Instant0);
                    }
                }
                Timer::Mailbox(d) => {
                    if let Some(mb) = self.devices[d].mailbox.as_mut() {
                        mb.handle_timeout(now);
                        self.dirty.insert(d);
                    }
                }
                Timer::Reconnect(d) => {
                    self.devices[d].reconnect_at = None;
                    self.connect(d);
                }
            }
            self.pump();
        }
    }

    /// The devices of `cell`.
    pub fn devices_of(&self, cell: CellId) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|d| self.devices[*d].id.cell_id() == cell)
            .collect()
    }

    /// Which tokens each device's sends have: every send made and not yet ended stays out of
    /// `outcomes`.
    pub fn outcome(&self, d: usize, token: Token) -> Option<&Result<Sent, SendError>> {
        self.devices[d].outcomes.get(&token)
    }

    /// The records on the wire toward device `d`, decoded (for tests that look).
    pub fn wire_to(&self, d: usize) -> Vec<Record> {
        self.wire
            .values()
            .filter(|p| p.to == To::Device(d))
            .flat_map(|p| records(p.payload.clone()).filter_map(Result::ok))
            .collect()
    }

    /// Cells of the devices.
    pub fn cells(&self) -> BTreeSet<CellId> {
        self.devices.iter().map(|d| d.id.cell_id()).collect()
    }
}
