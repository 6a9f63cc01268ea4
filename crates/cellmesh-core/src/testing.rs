//! Test support (feature `testing`): deterministic identities and an in-memory pair of
//! connections on a virtual clock, with frame-level access so tests can drop, replay,
//! reorder and tamper with what crosses the link. Not for production use.
#![allow(clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use bytes::Bytes;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

use crate::connection::{Connection, ConnectionConfig, Event};
use crate::device;
use crate::handshake::LocalNode;
use crate::id::{CellId, NodeId};
use crate::keys::KeyPair;
use crate::mnemonic::{CellSecrets, Mnemonic};
use crate::token::Token;
use crate::wire;
use crate::{Instant, Timestamp};

/// Virtual time the tests start at (2027-01-15).
pub const START: Instant = Instant(1_800_000_000_000);

/// A cell with one device, all derived from a seed byte.
pub struct TestNode {
    /// The cell's secrets.
    pub cell: CellSecrets,
    /// The device's keys.
    pub node: KeyPair,
    /// The signed node token.
    pub node_token: Token,
    /// The cell's identity token naming the node.
    pub identity: Token,
}

impl TestNode {
    /// A cell from entropy `[seed; 16]` and a device drawn from a RNG seeded with `seed`,
    /// with tokens issued at `now`.
    pub fn new(seed: u8, now: Timestamp) -> Self {
        let cell = Mnemonic::from_entropy(&[seed; 16]).derive("");
        Self::device_of(cell, seed, now)
    }

    /// Another device of the same cell as `self`, from `seed`.
    pub fn sibling(&self, seed: u8, now: Timestamp) -> Self {
        let cell = CellSecrets::from_keys(KeyPair {
            signing: crate::keys::SigningSecret::from_seed(&self.cell.signing().dangerous_seed()),
            agreement: crate::keys::AgreementSecret::from_bytes(
                &self.cell.agreement().dangerous_bytes(),
            ),
        });
        Self::device_of(cell, seed, now)
    }

    fn device_of(cell: CellSecrets, seed: u8, now: Timestamp) -> Self {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        let node = KeyPair::generate(&mut rng);
        let node_token = device::node_token(&node, cell.cell_id(), now, &mut rng)
            .and_then(|c| c.sign(&node.signing))
            .expect("test node token");
        let identity = device::identity_token(
            &cell,
            NodeId::from_key(node.signing.public()),
            now,
            &mut rng,
        )
        .expect("test identity token");
        Self {
            cell,
            node,
            node_token,
            identity,
        }
    }

    /// The cell's id.
    pub fn cell_id(&self) -> CellId {
        self.cell.cell_id()
    }

    /// The device's id.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_key(self.node.signing.public())
    }

    /// A connection configuration with default limits.
    pub fn config(&self) -> ConnectionConfig {
        let local =
            LocalNode::new(self.node_token.clone(), &self.node.agreement).expect("matching keys");
        ConnectionConfig::new(local, self.identity.clone())
    }
}

/// One side of a [`Pair`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The initiator.
    A,
    /// The responder.
    B,
}

/// Two connections joined by an in-memory link on a virtual clock.
pub struct Pair {
    /// The initiator.
    pub a: Connection,
    /// The responder.
    pub b: Connection,
    /// Virtual time.
    pub now: Instant,
    /// Randomness for both sides.
    pub rng: ChaCha20Rng,
    /// Events A reported, in order.
    pub a_events: Vec<Event>,
    /// Events B reported, in order.
    pub b_events: Vec<Event>,
}

impl Pair {
    /// A connects to B.
    pub fn new(a: ConnectionConfig, b: ConnectionConfig, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let now = START;
        Self {
            a: Connection::connect(Arc::new(a), now, &mut rng),
            b: Connection::accept(Arc::new(b), now),
            now,
            rng,
            a_events: Vec::new(),
            b_events: Vec::new(),
        }
    }

    /// The frames `side` has queued for its peer, one whole frame each.
    pub fn transmit(&mut self, side: Side) -> Vec<Vec<u8>> {
        let conn = match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        };
        let bytes = conn.poll_transmit().unwrap_or_default();
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while let Ok(Some((_, body))) = wire::split_frame(rest) {
            frames.push(rest[..body.end].to_vec());
            rest = &rest[body.end..];
        }
        assert!(rest.is_empty(), "a connection queued a partial frame");
        frames
    }

    /// Delivers bytes to `to` and collects its events.
    pub fn deliver(&mut self, to: Side, bytes: &[u8]) {
        let (conn, events) = match to {
            Side::A => (&mut self.a, &mut self.a_events),
            Side::B => (&mut self.b, &mut self.b_events),
        };
        conn.handle_input(bytes, self.now, &mut self.rng);
        events.extend(std::iter::from_fn(|| conn.poll_event()));
    }

    /// Moves every frame across until neither side has anything to send.
    pub fn drive(&mut self) {
        self.drive_with(|_, f| vec![f]);
    }

    /// Like [`Pair::drive`], passing each frame through `hook` (which may drop it by
    /// returning nothing, alter it, or duplicate it) on its way from `side`.
    pub fn drive_with(&mut self, mut hook: impl FnMut(Side, Vec<u8>) -> Vec<Vec<u8>>) {
        for _ in 0..10_000 {
            let from_a = self.transmit(Side::A);
            let from_b = self.transmit(Side::B);
            if from_a.is_empty() && from_b.is_empty() {
                return;
            }
            for f in from_a.into_iter().flat_map(|f| hook(Side::A, f)) {
                self.deliver(Side::B, &f);
            }
            for f in from_b.into_iter().flat_map(|f| hook(Side::B, f)) {
                self.deliver(Side::A, &f);
            }
        }
        panic!("the pair never went quiet");
    }

    /// Moves the clock on by `ms`, runs both sides' timers, and drives.
    pub fn advance(&mut self, ms: u64) {
        self.now = self.now.plus_millis(ms);
        self.a.handle_timeout(self.now);
        self.b.handle_timeout(self.now);
        self.a_events
            .extend(std::iter::from_fn(|| self.a.poll_event()));
        self.b_events
            .extend(std::iter::from_fn(|| self.b.poll_event()));
        self.drive();
    }

    /// Sends `data` from `side` to its peer.
    pub fn send(&mut self, side: Side, data: &[u8]) {
        let conn = match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        };
        conn.send(Bytes::copy_from_slice(data), self.now)
            .expect("joined connection");
    }

    /// The application data `side` received, in order.
    pub fn received(&self, side: Side) -> Vec<Vec<u8>> {
        let events = match side {
            Side::A => &self.a_events,
            Side::B => &self.b_events,
        };
        events
            .iter()
            .filter_map(|e| match e {
                Event::Data(d) => Some(d.to_vec()),
                _ => None,
            })
            .collect()
    }
}
