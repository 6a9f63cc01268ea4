//! A test harness for the relay server: the machine, an in-memory store and links that take
//! everything, on virtual time. The seed of a simulated world, and what the server's tests,
//! property tests and fuzz target drive.

// A harness for tests: what it cannot do is a failed test.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;

use super::mem_store::{MemStore, MemStoreLimits};
use super::server::{Action, OpId, Outlets, RelayServer, ServerConfig, ServerEvent, StoreOp};
use super::{MsgId, Record, put_record, records};
use crate::Instant;
use crate::id::NodeId;
use crate::limits::{ByteLimits, Rate, RegistrationLimits};
use crate::testing::{START, TestNode};
use crate::token::Token;

/// A small relay's configuration: 1 MiB per device and outlet, 4 MiB in all, LOOKUPs at 2
/// a second, registrations kept an hour.
pub fn config() -> ServerConfig {
    ServerConfig {
        forward_rate: Rate::new(1000, 2000),
        lookup_rate: Rate::new(2, 2),
        memory: ByteLimits {
            per_device: 1 << 20,
            per_cell: 1 << 20,
            total: 4 << 20,
        },
        outlet_bytes: 1 << 20,
        registrations: RegistrationLimits {
            per_cell: 64,
            total: 1000,
            ttl_secs: 3600,
        },
        envelope_events: false,
        summary_every_ms: None,
        revocations: crate::revoked::RevocationLimits::default(),
    }
}

/// What each device's link has not taken yet, as a test sets it.
#[derive(Default)]
pub struct Links {
    /// Bytes per device.
    pub waiting: BTreeMap<NodeId, usize>,
}

impl Outlets for Links {
    fn waiting(&self, node: NodeId) -> usize {
        self.waiting.get(&node).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.waiting.values().sum()
    }
}

/// A relay server over an in-memory store on virtual time, and what it wrote to each
/// device, decoded: links take everything at once unless [`Links`] says otherwise.
pub struct RelayHarness {
    /// The machine.
    pub server: RelayServer,
    /// Its store.
    pub store: MemStore,
    /// What the links have not taken.
    pub links: Links,
    /// The time.
    pub now: Instant,
    /// Store operations not yet carried out, while `hold` is set.
    pub held: Vec<(OpId, StoreOp)>,
    /// Whether store operations wait for [`RelayHarness::commit`].
    pub hold: bool,
    /// The records written to each device.
    pub sent: BTreeMap<NodeId, Vec<Record>>,
    /// Devices disconnected, with why.
    pub disconnected: Vec<(NodeId, &'static str)>,
    /// Events, in order.
    pub events: Vec<ServerEvent>,
}

impl Default for RelayHarness {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayHarness {
    /// A relay with [`config`] over an empty store.
    pub fn new() -> Self {
        Self::over(MemStore::new(MemStoreLimits::default()), config())
    }

    /// A new relay over `store`: after a restart, or with another configuration.
    pub fn over(store: MemStore, config: ServerConfig) -> Self {
        let mut server =
            RelayServer::new(config, START, store.registered(), store.queued_devices());
        for bytes in store.revocations() {
            let token = Token::decode(&bytes).expect("the store keeps tokens");
            server
                .load_revocation(&token)
                .expect("the store keeps valid revocations");
        }
        Self {
            server,
            store,
            links: Links::default(),
            now: START,
            held: Vec::new(),
            hold: false,
            sent: BTreeMap::new(),
            disconnected: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The relay restarts: a new machine over the same store, at the same time. What was
    /// held and not committed is lost, as a crash loses it; what was written stays in
    /// `sent`.
    pub fn restart(self) -> Self {
        let config = self.server.config().clone();
        let now = self.now;
        let mut next = Self::over(self.store, config);
        next.now = now;
        // What was written before stays written.
        next.sent = self.sent;
        next.events = self.events;
        next
    }

    /// Carries out what the machine asks until it asks nothing more.
    pub fn run(&mut self) {
        loop {
            let before = self.disconnected.len();
            self.run_once();
            // A disconnected device's link closes: the relay hears of its departure.
            let gone: Vec<NodeId> = self.disconnected[before..].iter().map(|d| d.0).collect();
            if gone.is_empty() {
                return;
            }
            for node in gone {
                self.server.left(self.now, node);
            }
        }
    }

    fn run_once(&mut self) {
        while let Some(a) = self.server.poll_action() {
            match a {
                Action::Send { to, payload } => {
                    let e = self.sent.entry(to).or_default();
                    e.extend(records(payload).map(|r| r.expect("the relay writes records")));
                }
                Action::Disconnect { node, reason } => self.disconnected.push((node, reason)),
                Action::Store(id, op) if self.hold => self.held.push((id, op)),
                Action::Store(id, op) => {
                    let result = self.store.apply(&op);
                    self.server.store_done(self.now, id, result, &self.links);
                }
                Action::Event(e) => self.events.push(e),
            }
        }
    }

    /// Carries out the held store operations.
    pub fn commit(&mut self) {
        self.hold = false;
        for (id, op) in std::mem::take(&mut self.held) {
            let result = self.store.apply(&op);
            self.server.store_done(self.now, id, result, &self.links);
        }
        self.run();
    }

    /// `d` joins (its check first).
    pub fn join(&mut self, d: &TestNode) {
        self.server
            .check_join(self.now, d.cell_id(), d.node_id())
            .expect("room to register");
        self.server.joined(
            self.now,
            d.cell_id(),
            d.node_id(),
            SocketAddr::from(([127, 0, 0, 1], 4000)),
            d.node_token.to_bytes(),
            d.identity.to_bytes(),
        );
        self.run();
    }

    /// `d`'s link is gone.
    pub fn leave(&mut self, d: &TestNode) {
        self.server.left(self.now, d.node_id());
        self.run();
    }

    /// `from` sends these records in one payload.
    pub fn send(&mut self, from: &TestNode, rs: &[Record]) {
        let mut payload = Vec::new();
        for r in rs {
            put_record(&mut payload, r);
        }
        self.server.records(
            self.now,
            [(from.node_id(), from.cell_id(), Bytes::from(payload))],
            &self.links,
        );
        self.run();
    }

    /// `from` forwards [`message`] `id` to `to`.
    pub fn forward(&mut self, from: &TestNode, to: &TestNode, id: u8) {
        self.send(
            from,
            &[Record::Forward {
                to: to.node_id(),
                id: MsgId([id; 16]),
                envelope: message(id),
            }],
        );
    }

    /// Time passes.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_millis(ms);
        self.server.handle_timeout(self.now, &self.links);
        self.run();
    }

    /// What was written to `d` since the last take.
    pub fn take(&mut self, d: &TestNode) -> Vec<Record> {
        self.sent.remove(&d.node_id()).unwrap_or_default()
    }
}

/// An envelope that is a message (not an answer) of this version, from `id`.
pub fn message(id: u8) -> Bytes {
    let mut e = vec![crate::e2e::E2E_VERSION, 0x02];
    e.extend_from_slice(&[id; 40]);
    Bytes::from(e)
}
