//! Prints the handshake and join test vectors of docs/PROTOCOL.md: the frames a deterministic
//! link puts on the wire, and the handshake hash.
//!
//! `cargo run -p cellmesh-core --features testing --example handshake_vectors`
//!
//! The initiator is `TestNode::new(1, ..)`, the responder `TestNode::new(2, ..)`, both with
//! tokens issued at `testing::START`, and the link runs at `START` on one
//! `ChaCha20Rng::seed_from_u64(2026)`, from which the initiator draws its Noise seed when it
//! connects and the responder draws its own when it reads the hello.

use std::sync::Arc;

use cellmesh_core::connection::Connection;
use cellmesh_core::device::Revocations;
use cellmesh_core::handshake::{Initiator, LocalNode, PeerChecks, Responder};
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::wire::{FrameType, split_frame};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

const SEED: u64 = 2026;

fn main() {
    let a = TestNode::new(1, START.timestamp());
    let b = TestNode::new(2, START.timestamp());
    let mut rng = ChaCha20Rng::seed_from_u64(SEED);

    let mut initiator = Connection::connect(Arc::new(a.config()), START, &mut rng);
    let mut responder = Connection::accept(Arc::new(b.config()), START);
    let hello = transmit(&mut initiator);
    responder.handle_input(&concat(&hello), START, &mut rng);
    let response = transmit(&mut responder);
    initiator.handle_input(&concat(&response), START, &mut rng);
    let finish_and_join = transmit(&mut initiator);
    responder.handle_input(&concat(&finish_and_join), START, &mut rng);
    let ack = transmit(&mut responder);
    initiator.handle_input(&concat(&ack), START, &mut rng);
    assert!(
        initiator.is_joined() && responder.is_joined(),
        "the link joins"
    );

    let frames = [
        ("hello", &hello[..]),
        ("response", &response[..]),
        ("finish", &finish_and_join[..1]),
        ("join", &finish_and_join[1..]),
        ("ack", &ack[..]),
    ];
    for (name, frames) in frames {
        assert_eq!(frames.len(), 1, "one {name} frame");
        println!("{name}: {}", hex::encode(&frames[0]));
    }

    // The connection keeps its handshake hash to itself; the same handshake through the typed
    // API, on the same random draws, gives the same messages and exposes it.
    let hash = handshake_hash(&a, &b, [&hello[0], &response[0], &finish_and_join[0]]);
    println!("handshake_hash: {}", hex::encode(hash));
}

/// The whole frames a connection has queued.
fn transmit(conn: &mut Connection) -> Vec<Vec<u8>> {
    let bytes = conn.poll_transmit().unwrap_or_default();
    let mut rest = &bytes[..];
    let mut frames = Vec::new();
    while let Some((_, body)) = split_frame(rest).expect("well-formed frames") {
        frames.push(rest[..body.end].to_vec());
        rest = &rest[body.end..];
    }
    assert!(rest.is_empty());
    frames
}

fn concat(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.concat()
}

fn handshake_hash(a: &TestNode, b: &TestNode, wire: [&[u8]; 3]) -> [u8; 32] {
    let local = |n: &TestNode| LocalNode::new(n.node_token.clone(), &n.node.agreement).unwrap();
    let (la, lb) = (local(a), local(b));
    let none = Revocations::new();
    let checks = PeerChecks {
        now: START.timestamp(),
        skew: 60,
        revocations: &none,
        realm_issuer: None,
    };
    let body = |frame: &[u8], kind: FrameType| {
        let (got, range) = split_frame(frame).unwrap().unwrap();
        assert_eq!(got, kind);
        frame[range].to_vec()
    };
    let mut rng = ChaCha20Rng::seed_from_u64(SEED);
    let (initiator, hello) = Initiator::start(&la, &mut rng).unwrap();
    assert_eq!(hello, body(wire[0], FrameType::Hello));
    let (responder, response) = Responder::read_hello(&hello, &lb, &mut rng).unwrap();
    assert_eq!(response, body(wire[1], FrameType::Response));
    let (ia, finish) = initiator.read_response(&response, &la, &checks).unwrap();
    assert_eq!(finish, body(wire[2], FrameType::Finish));
    let rb = responder.read_finish(&finish, &checks).unwrap();
    assert_eq!(ia.handshake_hash, rb.handshake_hash);
    ia.handshake_hash
}
