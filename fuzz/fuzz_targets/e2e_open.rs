//! `Endpoint::open` on envelopes from the network. Alice (TestNode 1) writes to Bob (TestNode
//! 2) on a seeded RNG, so every run sees the same genuine envelopes; the fuzzer's envelope
//! arrives, claimed to be from the other side, with the genuine envelope's message id, at one
//! of three points of the conversation:
//!
//! - stage 0: Bob has seen nothing; the genuine envelope is Alice's first message, an INIT;
//! - stage 1: Bob opened that INIT and Alice his acknowledgement, so both moved to epoch 1;
//!   the genuine envelope is Alice's second message, a MSG for a session Bob knows;
//! - stage 2: Alice has an outbound session; the genuine envelope is Bob's acknowledgement
//!   (epoch 0, carrying his ephemeral key);
//! - stage 3: as stage 1, but the genuine envelope is a bundle of three messages (Alice's
//!   third envelope).
//!
//! `open` must never panic; it must report a message or an acknowledgement only for the
//! genuine envelope (which it must, as a check on the harness); and an envelope it refuses must
//! leave no trace: the genuine envelope, arriving next, still opens.
//!
//! Input: byte 0 picks the stage (its low 7 bits `% 4`) and, with bit 7, the mode. Bit 7 clear: the rest of
//! the input is the envelope verbatim. Bit 7 set: the genuine envelope, with the rest of the
//! input after two more bytes (a big-endian offset, modulo the envelope's length + 1) XORed
//! into it from that offset on, extending it where the rest runs past its end. Without the
//! genuine base the fuzzer could not get past the signed tokens of an INIT or the AEAD; the
//! offset lets short inputs reach every field.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use cellmesh_core::{Instant, Timestamp};
use cellmesh_core::device::Revocations;
use cellmesh_core::e2e::{Endpoint, LocalDevice, OpenError, Opened, Padding, RemoteDevice};
use cellmesh_core::id::NodeId;
use cellmesh_core::keys::AgreementSecret;
use cellmesh_core::relay::MsgId;
use cellmesh_core::testing::TestNode;
use libfuzzer_sys::fuzz_target;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

/// When the test nodes' tokens were issued.
const T0: Timestamp = Timestamp(1_800_000_000);
/// When envelopes are sealed and opened.
const T: Instant = Instant(1_800_000_100_000);

/// The genuine envelopes of one conversation, sealed once: the endpoints draw from their own
/// seeded RNGs, so replaying an endpoint's steps rebuilds exactly the state they were sealed
/// against, without sealing them again on every run.
struct Fixture {
    alice: TestNode,
    bob: TestNode,
    bob_device: RemoteDevice,
    /// Alice's first message: an INIT.
    init: Bytes,
    /// Bob's acknowledgement of it.
    ack: (MsgId, Bytes),
    /// Alice's second message, after the acknowledgement: a MSG in epoch 1.
    msg: Bytes,
    /// Alice's third envelope: a bundle, in epoch 1.
    bundle: Bytes,
}

const INIT_ID: MsgId = MsgId([1; 16]);
const MSG_ID: MsgId = MsgId([2; 16]);
const BUNDLE_ID: MsgId = MsgId([3; 16]);

fn alice_rng() -> ChaCha20Rng {
    ChaCha20Rng::from_seed([1; 32])
}

fn bob_rng() -> ChaCha20Rng {
    ChaCha20Rng::from_seed([2; 32])
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (alice, bob) = (TestNode::new(1, T0), TestNode::new(2, T0));
        let bob_device =
            RemoteDevice::verify(&bob.node_token, &bob.identity, T.timestamp(), &Revocations::new())
                .expect("Bob's tokens verify");
        let (mut a, mut a_rng) = (endpoint(&alice), alice_rng());
        let init = a
            .seal(&bob_device, INIT_ID, T, b"first", &mut a_rng)
            .expect("seal");
        let (mut b, mut b_rng) = (endpoint(&bob), bob_rng());
        let opened = b.open(
            alice.node_id(),
            INIT_ID,
            &init,
            T,
            &Revocations::new(),
            &mut b_rng,
        );
        match opened {
            Ok(Opened::Messages(got)) => b.ack(got.ack),
            other => panic!("{other:?}"),
        }
        let ack = b.poll_acks(&mut b_rng).remove(0);
        let opened = a.open(
            bob.node_id(),
            ack.id,
            &ack.envelope,
            T,
            &Revocations::new(),
            &mut a_rng,
        );
        assert!(matches!(opened, Ok(Opened::Acked { .. })), "{opened:?}");
        let msg = a
            .seal(&bob_device, MSG_ID, T, b"second", &mut a_rng)
            .expect("seal");
        assert_eq!(msg[1], 2, "a MSG once Bob has answered");
        let bodies = [&b"third"[..], b"", b"fifth"];
        let messages: Vec<(MsgId, Bytes)> = (0u8..)
            .zip(bodies)
            .map(|(i, b)| (MsgId([0x10 + i; 16]), Bytes::from_static(b)))
            .collect();
        let bundle = a
            .seal_bundle(&bob_device, BUNDLE_ID, T, &messages, &mut a_rng)
            .expect("seal");
        Fixture {
            alice,
            bob,
            bob_device,
            init,
            ack: (ack.id, ack.envelope),
            msg,
            bundle,
        }
    })
}

fn endpoint(n: &TestNode) -> Endpoint {
    let local = LocalDevice::new(
        n.node_token.clone(),
        n.identity.clone(),
        AgreementSecret::from_bytes(&n.node.agreement.dangerous_bytes()),
    )
    .expect("matching keys");
    Endpoint::new(local, Padding::None)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Init,
    Msg,
    Ack,
    Bundle,
}

/// The recipient of the envelope under test, in the state the stage describes.
struct Recipient {
    endpoint: Endpoint,
    rng: ChaCha20Rng,
    from: NodeId,
    id: MsgId,
    genuine: &'static [u8],
}

impl Recipient {
    fn at(stage: Stage) -> Self {
        let fx = fixture();
        match stage {
            Stage::Init => Self {
                endpoint: endpoint(&fx.bob),
                rng: bob_rng(),
                from: fx.alice.node_id(),
                id: INIT_ID,
                genuine: &fx.init,
            },
            Stage::Bundle => {
                let mut r = Self::at(Stage::Msg);
                r.id = BUNDLE_ID;
                r.genuine = &fx.bundle;
                r
            }
            Stage::Msg => {
                let mut r = Self::at(Stage::Init);
                match r.open(&fx.init) {
                    Ok(Opened::Messages(got)) => r.endpoint.ack(got.ack),
                    other => panic!("{other:?}"),
                }
                let acks = r.endpoint.poll_acks(&mut r.rng);
                assert_eq!(acks[0].envelope, fx.ack.1, "Bob's state was not rebuilt");
                r.id = MSG_ID;
                r.genuine = &fx.msg;
                r
            }
            Stage::Ack => {
                let mut endpoint = endpoint(&fx.alice);
                let mut rng = alice_rng();
                let init = endpoint
                    .seal(&fx.bob_device, INIT_ID, T, b"first", &mut rng)
                    .expect("seal");
                assert_eq!(init, fx.init, "Alice's state was not rebuilt");
                Self {
                    endpoint,
                    rng,
                    from: fx.bob.node_id(),
                    id: fx.ack.0,
                    genuine: &fx.ack.1,
                }
            }
        }
    }

    fn open(&mut self, envelope: &[u8]) -> Result<Opened, OpenError> {
        self.endpoint.open(
            self.from,
            self.id,
            envelope,
            T,
            &Revocations::new(),
            &mut self.rng,
        )
    }
}

fn is_authentic(opened: &Result<Opened, OpenError>) -> bool {
    matches!(opened, Ok(Opened::Messages(_) | Opened::Acked { .. }))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, fuzz)) = data.split_first() else {
        return;
    };
    let stage = match (selector & 0x7f) % 4 {
        0 => Stage::Init,
        1 => Stage::Msg,
        2 => Stage::Ack,
        _ => Stage::Bundle,
    };
    let mut r = Recipient::at(stage);
    let genuine = r.genuine;
    let input = match (selector & 0x80 != 0, fuzz) {
        (true, [hi, lo, xor @ ..]) => {
            let at = usize::from(u16::from_be_bytes([*hi, *lo])) % (genuine.len() + 1);
            let mut out = genuine.to_vec();
            for (i, f) in xor.iter().enumerate() {
                match out.get_mut(at + i) {
                    Some(b) => *b ^= f,
                    None => out.push(*f),
                }
            }
            out
        }
        _ => fuzz.to_vec(),
    };

    let got = r.open(&input);
    if input == genuine {
        assert!(
            is_authentic(&got),
            "{stage:?}: the genuine envelope was refused: {got:?}"
        );
        return;
    }
    assert!(
        !is_authentic(&got),
        "{stage:?}: a tampered envelope was accepted: {got:?}"
    );
    // Only a refusal must leave no trace (a RESET, unauthenticated by design, is obeyed).
    if got.is_ok() {
        return;
    }
    let again = r.open(genuine);
    let whole = match (&again, stage) {
        (Ok(Opened::Messages(got)), Stage::Bundle) => got.messages.len() == 3,
        (Ok(Opened::Messages(got)), _) => got.messages.len() == 1,
        (Ok(Opened::Acked { .. }), _) => true,
        _ => false,
    };
    assert!(
        whole,
        "{stage:?}: the genuine envelope no longer opens after a refused one ({got:?}): {again:?}"
    );
});
