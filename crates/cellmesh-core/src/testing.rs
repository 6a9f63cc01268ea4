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
use crate::token::{Claims, Name, Token, TokenKind, attr};
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

    /// This device as the sender and recipient of end-to-end messages.
    pub fn local(&self) -> crate::e2e::LocalDevice {
        crate::e2e::LocalDevice::new(
            self.node_token.clone(),
            self.identity.clone(),
            crate::keys::AgreementSecret::from_bytes(&self.node.agreement.dangerous_bytes()),
        )
        .expect("the node token names the node's X25519 key")
    }

    /// An end-to-end endpoint for this device, without padding.
    pub fn endpoint(&self) -> crate::e2e::Endpoint {
        crate::e2e::Endpoint::new(self.local(), crate::e2e::Padding::None)
    }

    /// This device as another device sees it once its tokens are checked at `now`.
    pub fn remote(&self, now: Timestamp) -> crate::e2e::RemoteDevice {
        crate::e2e::RemoteDevice::verify(
            &self.node_token,
            &self.identity,
            now,
            &device::Revocations::new(),
        )
        .expect("a test device's tokens verify")
    }

    /// This device's node token and identity token, bound as a peer sees them at join.
    pub fn binding(&self) -> crate::device::DeviceBinding {
        device::bind(
            &self
                .node_token
                .verify_signatures()
                .expect("a test node token verifies"),
            &self
                .identity
                .verify_signatures()
                .expect("a test identity token verifies"),
            &device::Revocations::new(),
        )
        .expect("a test device's tokens bind")
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
        match side {
            Side::A => frames(&mut self.a),
            Side::B => frames(&mut self.b),
        }
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

/// Everything `conn` has queued to send, split into whole frames.
pub fn frames(conn: &mut Connection) -> Vec<Vec<u8>> {
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

/// The identity token docs/PROTOCOL.md publishes as the token vector: the cell of
/// `abandon ×11 about` certifying the node whose Ed25519 seed is 32 bytes of `0x42`, in realm
/// `example.org`, with fixed uuid and times.
pub fn vector_identity_token() -> Token {
    let cell = Mnemonic::from_entropy(&[0; 16]).derive("");
    let node = crate::keys::SigningSecret::from_seed(&[0x42; 32]);
    let key = cell.signing().public();
    Claims {
        kind: TokenKind::Identity,
        realm: Some(Name::new("example.org").expect("valid name")),
        subject: "cellmesh cell".into(),
        issuer: key,
        audience: None,
        uuid: [0x11; 16],
        issued_at: Timestamp(1_800_000_000),
        not_before: Timestamp(1_800_000_000),
        expires_at: Timestamp(1_831_536_000),
        key,
        agreement_key: Some(cell.agreement().public()),
        attributes: Default::default(),
    }
    .with_attribute(attr::NODE, node.public().as_bytes().to_vec())
    .and_then(|c| c.sign(cell.signing()))
    .expect("the vector's claims are within limits")
}

/// The revocation docs/PROTOCOL.md publishes in the relay vectors (13.7): the cell of
/// `abandon ×11 about` revoking the node whose Ed25519 seed is 32 bytes of `0x42`, with a
/// fixed uuid (`0x22` × 16) and issued at 1800000000; it never expires.
pub fn vector_revocation_token() -> Token {
    let cell = Mnemonic::from_entropy(&[0; 16]).derive("");
    let node = crate::keys::SigningSecret::from_seed(&[0x42; 32]);
    let key = cell.signing().public();
    Claims {
        kind: TokenKind::Revocation,
        realm: None,
        subject: "cellmesh revocation".into(),
        issuer: key,
        audience: None,
        uuid: [0x22; 16],
        issued_at: Timestamp(1_800_000_000),
        not_before: Timestamp(1_800_000_000),
        expires_at: Timestamp(u64::MAX),
        key,
        agreement_key: None,
        attributes: Default::default(),
    }
    .with_attribute(attr::NODE, node.public().as_bytes().to_vec())
    .and_then(|c| c.sign(cell.signing()))
    .expect("the vector's claims are within limits")
}

/// The RNG seed of the handshake vectors.
pub const VECTOR_SEED: u64 = 2026;

/// The deterministic link docs/PROTOCOL.md publishes as the handshake vectors:
/// `TestNode::new(1, ..)` dials `TestNode::new(2, ..)` at [`START`] on
/// `ChaCha20Rng::seed_from_u64(VECTOR_SEED)`.
pub struct VectorLink {
    /// Whole frames, in the order they crossed the link.
    pub hello: Vec<u8>,
    /// The response frame.
    pub response: Vec<u8>,
    /// The finish frame.
    pub finish: Vec<u8>,
    /// The first session frame from the initiator.
    pub join: Vec<u8>,
    /// The first session frame from the responder.
    pub ack: Vec<u8>,
    /// The handshake hash both sides derived.
    pub handshake_hash: [u8; 32],
    /// The initiator, joined.
    pub initiator: Connection,
    /// The responder, joined.
    pub responder: Connection,
}

/// Runs the vector link. The connections keep the handshake hash to themselves, so the same
/// handshake is run again through the typed API on the same random draws; that it produces the
/// same three messages is asserted here, which ties the hash to these frames.
pub fn vector_link() -> VectorLink {
    let (a, b) = (
        TestNode::new(1, START.timestamp()),
        TestNode::new(2, START.timestamp()),
    );
    let mut rng = ChaCha20Rng::seed_from_u64(VECTOR_SEED);
    let mut initiator = Connection::connect(Arc::new(a.config()), START, &mut rng);
    let mut responder = Connection::accept(Arc::new(b.config()), START);
    let one = |frames: Vec<Vec<u8>>| -> Vec<u8> {
        assert_eq!(frames.len(), 1, "one frame");
        frames.concat()
    };
    let hello = one(frames(&mut initiator));
    responder.handle_input(&hello, START, &mut rng);
    let response = one(frames(&mut responder));
    initiator.handle_input(&response, START, &mut rng);
    let mut finish_and_join = frames(&mut initiator);
    assert_eq!(finish_and_join.len(), 2, "finish and JOIN in one write");
    let join = finish_and_join.pop().expect("two frames");
    let finish = finish_and_join.pop().expect("two frames");
    responder.handle_input(&[&finish[..], &join[..]].concat(), START, &mut rng);
    let ack = one(frames(&mut responder));
    initiator.handle_input(&ack, START, &mut rng);
    assert!(
        initiator.is_joined() && responder.is_joined(),
        "the link joins"
    );
    let handshake_hash = typed_handshake_hash(&a, &b, [&hello, &response, &finish]);
    VectorLink {
        hello,
        response,
        finish,
        join,
        ack,
        handshake_hash,
        initiator,
        responder,
    }
}

fn typed_handshake_hash(a: &TestNode, b: &TestNode, wire: [&[u8]; 3]) -> [u8; 32] {
    use crate::handshake::{Initiator, PeerChecks, Responder};
    let local = |n: &TestNode| {
        LocalNode::new(n.node_token.clone(), &n.node.agreement).expect("matching keys")
    };
    let (la, lb) = (local(a), local(b));
    let none = crate::device::Revocations::new();
    let checks = PeerChecks {
        now: START.timestamp(),
        skew: 60,
        revocations: &none,
        realm_issuer: None,
    };
    let body = |frame: &[u8]| frame[wire::LEN_PREFIX + 1..].to_vec();
    let mut rng = ChaCha20Rng::seed_from_u64(VECTOR_SEED);
    let (initiator, hello) = Initiator::start(&la, &mut rng).expect("start");
    assert_eq!(
        hello,
        body(wire[0]),
        "typed hello differs from the connection's"
    );
    let (responder, response) = Responder::read_hello(&hello, &lb, &mut rng).expect("hello");
    assert_eq!(response, body(wire[1]), "typed response differs");
    let (ia, finish) = initiator
        .read_response(&response, &la, &checks)
        .expect("response");
    assert_eq!(finish, body(wire[2]), "typed finish differs");
    let rb = responder.read_finish(&finish, &checks).expect("finish");
    assert_eq!(ia.handshake_hash, rb.handshake_hash);
    ia.handshake_hash
}

/// The end-to-end vectors `docs/PROTOCOL.md` publishes (section 14.9).
pub struct E2eVector {
    /// Sender and recipient.
    pub alice: TestNode,
    /// The recipient.
    pub bob: TestNode,
    /// The first message ("hello", id 0x11…): an INIT envelope.
    pub envelope: Bytes,
    /// Bob's acknowledgement of it.
    pub ack: crate::e2e::Reply,
    /// The second message ("again", id 0x22…), in epoch 1.
    pub second: Bytes,
    /// A bundle (envelope id 0x33…) of "one" (id 0x44…) and "two" (id 0x55…), in epoch 1.
    pub bundle: Bytes,
    /// The key schedule's values in between, re-derived from the same random draws.
    pub keys: crate::e2e::KeyTrace,
}

/// One message from `TestNode::new(1, ..)`'s device to `TestNode::new(2, ..)`'s, the
/// acknowledgement it gets back, and a second message, which the acknowledgement moved to
/// epoch 1; every random draw from `ChaCha20Rng::from_seed([7; 32])`, at time 1_800_000_100.
/// The draws, in order: session id (16), HPKE ephemeral (32), `e_i` (32), then at the
/// recipient its instance (16) and `e_r` (32), then the acknowledgement's envelope id (16).
pub fn vector_e2e() -> E2eVector {
    use crate::e2e::Opened;
    use crate::relay::MsgId;

    let issued = Timestamp(1_800_000_000);
    let now = Instant(1_800_000_100_000);
    let none = device::Revocations::new();
    let (a, b) = (TestNode::new(1, issued), TestNode::new(2, issued));
    let (mut alice, mut bob) = (a.endpoint(), b.endpoint());
    let bob_device = b.remote(now.timestamp());
    let mut rng = ChaCha20Rng::from_seed([7; 32]);
    let bodies = |opened| match opened {
        Ok(Opened::Messages(r)) => r,
        other => panic!("the recipient did not get the envelope: {other:?}"),
    };
    let id = MsgId([0x11; 16]);
    let envelope = alice
        .seal(&bob_device, id, now, b"hello", &mut rng)
        .expect("sealed");
    let got = bodies(bob.open(a.node_id(), id, &envelope, now, &none, &mut rng));
    assert_eq!(&got.messages[0].body[..], b"hello");
    bob.ack(got.ack);
    let ack = bob.poll_acks(&mut rng).remove(0);
    match alice.open(b.node_id(), ack.id, &ack.envelope, now, &none, &mut rng) {
        Ok(Opened::Acked { ids, .. }) => assert_eq!(ids, vec![id]),
        other => panic!("the sender did not get the acknowledgement: {other:?}"),
    }
    let id2 = MsgId([0x22; 16]);
    let second = alice
        .seal(&bob_device, id2, now, b"again", &mut rng)
        .expect("sealed");
    let got = bodies(bob.open(a.node_id(), id2, &second, now, &none, &mut rng));
    assert_eq!(&got.messages[0].body[..], b"again");
    let id3 = MsgId([0x33; 16]);
    let messages = [
        (MsgId([0x44; 16]), Bytes::from_static(b"one")),
        (MsgId([0x55; 16]), Bytes::from_static(b"two")),
    ];
    let bundle = alice
        .seal_bundle(&bob_device, id3, now, &messages, &mut rng)
        .expect("sealed");
    let got = bodies(bob.open(a.node_id(), id3, &bundle, now, &none, &mut rng));
    let got: Vec<_> = got.messages.into_iter().map(|m| (m.id, m.body)).collect();
    assert_eq!(got, messages);
    // The same draws again, through the key schedule alone: the values in between.
    let keys = crate::e2e::dangerous_key_trace(
        &a.local(),
        &b.local(),
        &mut ChaCha20Rng::from_seed([7; 32]),
    )
    .expect("both sides derive the same keys");
    assert_eq!(&envelope[2..18], &keys.session.0, "the INIT's session id");
    assert_eq!(&envelope[18..50], &keys.enc, "the INIT's enc");
    assert_eq!(
        &ack.envelope[18..34],
        &keys.instance,
        "the REPLY's instance"
    );
    E2eVector {
        alice: a,
        bob: b,
        envelope,
        ack,
        second,
        bundle,
        keys,
    }
}
