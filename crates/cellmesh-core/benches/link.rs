//! The cost of a link: the Noise XX handshake alone and with the join, the primitives that
//! bound it (X25519, Ed25519 verification), and sealing and opening session frames.
//!
//! `cargo bench -p cellmesh-core --bench link`. The handshake's floor is what its public-key
//! operations cost: per side one X25519 key generation and three X25519 agreements, and one
//! Ed25519 verification of the peer's node token (the join adds one more per side, for the
//! identity token).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cellmesh_core::connection::{Connection, Event};
use cellmesh_core::device::Revocations;
use cellmesh_core::handshake::{Initiator, LocalNode, PeerChecks, Responder, SessionKeys};
use cellmesh_core::session::{Session, SessionConfig};
use cellmesh_core::testing::{START, TestNode};
use cellmesh_core::wire::{LEN_PREFIX, Message};
use cellmesh_core::{Instant, Timestamp};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ed25519_dalek::Signer as _;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

const SIZES: [usize; 4] = [64, 1024, 16 * 1024, 64 * 1024];
/// Frames opened per measured batch (each batch needs a fresh receiver at counter 0).
const OPEN_BATCH: usize = 32;

fn t0() -> Timestamp {
    START.timestamp()
}

fn local(node: &TestNode) -> LocalNode {
    LocalNode::new(node.node_token.clone(), &node.node.agreement).expect("matching keys")
}

fn handshake(c: &mut Criterion) {
    let (a, b) = (TestNode::new(1, t0()), TestNode::new(2, t0()));
    let mut g = c.benchmark_group("handshake");

    let (la, lb) = (local(&a), local(&b));
    let none = Revocations::new();
    let checks = PeerChecks {
        now: t0(),
        skew: 60,
        revocations: &none,
        realm_issuer: None,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    g.bench_function("noise_xx_full", |bench| {
        bench.iter(|| {
            let (initiator, hello) = Initiator::start(&la, &mut rng).expect("hello");
            let (responder, response) =
                Responder::read_hello(&hello, &lb, &mut rng).expect("response");
            let (ia, finish) = initiator
                .read_response(&response, &la, &checks)
                .expect("initiator established");
            let rb = responder
                .read_finish(&finish, &checks)
                .expect("responder established");
            black_box((ia, rb))
        })
    });

    let (ca, cb) = (Arc::new(a.config()), Arc::new(b.config()));
    g.bench_function("connection_join", |bench| {
        bench.iter(|| {
            let mut x = Connection::connect(Arc::clone(&ca), START, &mut rng);
            let mut y = Connection::accept(Arc::clone(&cb), START);
            let mut joined = 0;
            loop {
                let (to_y, to_x) = (x.poll_transmit(), y.poll_transmit());
                if to_y.is_none() && to_x.is_none() {
                    break;
                }
                if let Some(bytes) = to_y {
                    y.handle_input(&bytes, START, &mut rng);
                }
                if let Some(bytes) = to_x {
                    x.handle_input(&bytes, START, &mut rng);
                }
                for conn in [&mut x, &mut y] {
                    while let Some(e) = conn.poll_event() {
                        joined += usize::from(matches!(e, Event::Joined(_)));
                    }
                }
            }
            assert_eq!(joined, 2, "both sides join");
            black_box((x, y))
        })
    });
    g.finish();
}

fn reference(c: &mut Criterion) {
    let mut g = c.benchmark_group("reference");
    let scalar = [0x5au8; 32];
    let point = x25519_dalek::x25519([0x21; 32], x25519_dalek::X25519_BASEPOINT_BYTES);
    g.bench_function("x25519", |bench| {
        bench.iter(|| x25519_dalek::x25519(black_box(scalar), black_box(point)))
    });
    // Key generation (deriving a public key) is a fixed-base multiplication, which dalek
    // does with a precomputed table, as snow does for its ephemeral and static keys.
    g.bench_function("x25519_keygen", |bench| {
        bench.iter(|| {
            let secret = x25519_dalek::StaticSecret::from(black_box(scalar));
            x25519_dalek::PublicKey::from(&secret)
        })
    });

    // A message the size of a node token, verified as tokens are (strictly).
    let key = ed25519_dalek::SigningKey::from_bytes(&[0x42; 32]);
    let message = TestNode::new(1, t0()).node_token.to_bytes();
    let signature = key.sign(&message);
    let public = key.verifying_key();
    g.bench_function("ed25519_verify", |bench| {
        bench.iter(|| {
            public
                .verify_strict(black_box(&message), black_box(&signature))
                .expect("valid signature")
        })
    });
    g.finish();
}

fn keys() -> (SessionKeys, SessionKeys) {
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    (
        SessionKeys::dangerous_from_bytes(k1, k2),
        SessionKeys::dangerous_from_bytes(k2, k1),
    )
}

fn session(c: &mut Criterion) {
    let now = Instant(0);
    let config = SessionConfig::default();

    let mut g = c.benchmark_group("session/seal");
    for size in SIZES {
        let msg = Message::Data(Bytes::from(vec![0xabu8; size]));
        let mut sender = Session::new(keys().0, now, config);
        let mut out = Vec::with_capacity(size + 64);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("{size}"), |bench| {
            bench.iter(|| {
                out.clear();
                sender.seal(&msg, now, &mut out).expect("nonces left");
                black_box(&out);
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("session/open");
    for size in SIZES {
        let msg = Message::Data(Bytes::from(vec![0xabu8; size]));
        let mut sender = Session::new(keys().0, now, config);
        let bodies: Vec<Vec<u8>> = (0..OPEN_BATCH)
            .map(|_| {
                let mut frame = Vec::new();
                sender.seal(&msg, now, &mut frame).expect("nonces left");
                frame.split_off(LEN_PREFIX + 1)
            })
            .collect();
        g.throughput(Throughput::Bytes((size * OPEN_BATCH) as u64));
        g.bench_function(format!("{size}"), |bench| {
            bench.iter_batched(
                || (Session::new(keys().1, now, config), bodies.clone()),
                |(mut receiver, mut bodies)| {
                    for body in &mut bodies {
                        let plain = receiver.open(body).expect("authentic in order");
                        black_box(&body[plain]);
                    }
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = handshake, reference, session
}
criterion_main!(benches);
