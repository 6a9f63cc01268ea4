//! The responder's message decoder and join checks, behind the AEAD. TestNode 1 completes a
//! genuine handshake with a responder (TestNode 2); then, where the initiator's JOIN would go,
//! the responder gets one session frame, correctly sealed under the initiator's session keys,
//! whose plaintext the fuzzer chose. The responder must never panic, and must report `Joined`
//! only for a JOIN whose identity token verifies and names TestNode 1's node.
//!
//! The initiator is driven at the handshake level ([`Initiator`] and a [`Session`] on its keys)
//! rather than as a `Connection`: a `Connection` seals its JOIN (session counter 0) as soon as
//! the handshake finishes, and the responder accepts only the next counter, so a frame sealed
//! after dropping that JOIN would carry counter 1 and never be opened.
//!
//! Input: byte 0 picks the plaintext's base: 0 none (the plaintext is the rest of the input
//! verbatim), 1 the genuine JOIN (TestNode 1's identity), 2 a JOIN carrying TestNode 2's
//! identity (valid, but names another node), 3 a JOIN carrying TestNode 1's node token (valid,
//! but the wrong kind). With a base, the rest of the input is XORed into it and may extend it;
//! a tail shorter than the base leaves the base's remaining bytes alone. Without the bases the
//! fuzzer could not reach the checks that run after a token's signature verifies.
#![no_main]

use std::sync::{Arc, OnceLock};

use cellmesh_core::connection::{Connection, ConnectionConfig, Event};
use cellmesh_core::handshake::{Initiator, PeerChecks};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::session::{Session, SessionConfig};
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::token::{DEFAULT_SKEW, Token, TokenKind, attr};
use cellmesh_core::wire::{self, FrameType, Message};
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

struct Fixture {
    initiator: Arc<ConnectionConfig>,
    responder: Arc<ConnectionConfig>,
    node: NodeId,
    cell: CellId,
    bases: [Vec<u8>; 3],
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let t = START.timestamp();
        let (n1, n2) = (TestNode::new(1, t), TestNode::new(2, t));
        let join = |identity: &Token| {
            let mut out = Vec::new();
            Message::Join {
                identity: identity.clone(),
            }
            .encode(&mut out);
            out
        };
        Fixture {
            initiator: Arc::new(n1.config()),
            responder: Arc::new(n2.config()),
            node: n1.node_id(),
            cell: n1.cell_id(),
            bases: [join(&n1.identity), join(&n2.identity), join(&n1.node_token)],
        }
    })
}

fn plaintext(fx: &Fixture, data: &[u8]) -> Vec<u8> {
    let Some((&selector, fuzz)) = data.split_first() else {
        return Vec::new();
    };
    let mut out = match selector % 4 {
        0 => return fuzz.to_vec(),
        n => fx.bases[usize::from(n) - 1].clone(),
    };
    for (i, f) in fuzz.iter().enumerate() {
        match out.get_mut(i) {
            Some(b) => *b ^= f,
            None => out.push(*f),
        }
    }
    out
}

/// The single whole frame `conn` has queued, as (type, body).
fn frame(conn: &mut Connection) -> (FrameType, Vec<u8>) {
    let bytes = conn.poll_transmit().expect("a frame");
    let Ok(Some((kind, body))) = wire::split_frame(&bytes) else {
        panic!("not a whole frame");
    };
    assert_eq!(body.end, bytes.len(), "more than one frame");
    (kind, bytes[body].to_vec())
}

/// What must hold of a plaintext the responder joined on.
fn check_joined_on(fx: &Fixture, plaintext: &[u8]) {
    assert_eq!(plaintext.first(), Some(&1), "joined on a non-JOIN message");
    let token = Token::decode(&plaintext[1..]).expect("joined on an undecodable token");
    let verified = token
        .verify(START.timestamp(), DEFAULT_SKEW)
        .expect("joined on a token that does not verify");
    let claims = verified.claims();
    assert_eq!(
        claims.kind,
        TokenKind::Identity,
        "joined on a non-identity token"
    );
    assert_eq!(
        claims.key_attribute(attr::NODE),
        Some(fx.node.key()),
        "joined on an identity naming another node"
    );
    assert_eq!(claims.issuer, fx.cell.key(), "joined on another cell's identity");
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let plaintext = plaintext(fx, data);
    let now = START;
    let mut rng = ChaCha20Rng::seed_from_u64(0);

    // The genuine handshake: hello, response, finish.
    let (initiator, hello) = Initiator::start(&fx.initiator.local, &mut rng).expect("hello");
    let mut b = Connection::accept(Arc::clone(&fx.responder), now);
    let mut bytes = Vec::new();
    wire::put_frame(&mut bytes, FrameType::Hello, &hello);
    b.handle_input(&bytes, now, &mut rng);
    let (kind, response) = frame(&mut b);
    assert_eq!(kind, FrameType::Response);
    let checks = PeerChecks {
        now: now.timestamp(),
        skew: fx.initiator.skew,
        revocations: &fx.initiator.revocations,
        realm_issuer: None,
    };
    let (established, finish) = initiator
        .read_response(&response, &fx.initiator.local, &checks)
        .expect("the genuine response is accepted");
    bytes.clear();
    wire::put_frame(&mut bytes, FrameType::Finish, &finish);
    b.handle_input(&bytes, now, &mut rng);
    let handshaked = b.poll_event();
    assert!(
        matches!(handshaked, Some(Event::Handshaked { node }) if node == fx.node),
        "the genuine handshake failed: {handshaked:?}"
    );

    // In place of the JOIN: the fuzzer's plaintext, sealed under the initiator's keys.
    let mut session = Session::new(established.keys, now, SessionConfig::default());
    bytes.clear();
    session
        .seal_raw(&plaintext, now, &mut bytes)
        .expect("nonces");
    b.handle_input(&bytes, now, &mut rng);
    while b.poll_transmit().is_some() {}
    let mut joined = false;
    while let Some(event) = b.poll_event() {
        if let Event::Joined(binding) = event {
            check_joined_on(fx, &plaintext);
            assert_eq!(binding.node(), fx.node, "joined as another node");
            assert_eq!(binding.cell(), fx.cell, "joined as another cell");
            joined = true;
        }
    }
    // A check on the harness: the genuine JOIN gets through.
    if plaintext == fx.bases[0] {
        assert!(joined, "the genuine JOIN did not lead to a join");
    }
});
