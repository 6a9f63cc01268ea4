//! Property tests of the relay protocol and of end-to-end envelopes on hostile input.
//!
//! Relay records and batches: round trips with exact lengths, every cut of a batch, and
//! arbitrary or bit-flipped bytes (never a panic; whatever decodes is the input's own, canonical
//! encoding). End-to-end: bit flips in sealed envelopes never open, arbitrary bytes never panic
//! `Endpoint::open`, and directory checks accept exactly the genuine (node token, identity)
//! pairs of the cell asked about.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use bytes::Bytes;
use cellmesh_core::Timestamp;
use cellmesh_core::codec::DecodeError;
use cellmesh_core::device::{self, Revocations};
use cellmesh_core::e2e::{Directory, DirectoryError, Endpoint, OpenError, Opened, RemoteDevice};
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keys::SigningSecret;
use cellmesh_core::relay::{
    Accepted, DirectoryEntry, MsgId, Record, RefuseCode, put_record, records,
};
use cellmesh_core::testing::TestNode;
use cellmesh_core::token::Token;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng as _;

/// When the test nodes' tokens were issued.
const T0: Timestamp = Timestamp(1_800_000_000);
/// When the tests run.
const T: Timestamp = Timestamp(1_800_000_100);
/// `T` as the endpoint counts time.
const NOW: cellmesh_core::Instant = cellmesh_core::Instant(T.0 * 1000);

/// Alice and Mallory each have a cell of one device; Bob's cell has two devices (Bob, Bob 2).
struct Fixture {
    nodes: [TestNode; 4],
    /// Bob's cell has revoked Bob 2.
    bob2_revoked: Revocations,
}

const ALICE: usize = 0;
const BOB: usize = 1;
const BOB2: usize = 2;
const MALLORY: usize = 3;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let bob = TestNode::new(2, T0);
        let bob2 = bob.sibling(6, T0);
        let mut bob2_revoked = Revocations::new();
        let token = device::revocation(
            &bob.cell,
            bob2.node_id(),
            T0,
            &mut ChaCha20Rng::from_seed([1; 32]),
        )
        .unwrap();
        bob2_revoked.insert(&token.verify(T, 60).unwrap()).unwrap();
        Fixture {
            nodes: [TestNode::new(1, T0), bob, bob2, TestNode::new(7, T0)],
            bob2_revoked,
        }
    })
}

/// The fixture's tokens: node token of node `i` at `2 * i`, its identity token at `2 * i + 1`.
fn pool_token(i: usize) -> Token {
    let n = &fixture().nodes[i / 2];
    if i.is_multiple_of(2) {
        n.node_token.clone()
    } else {
        n.identity.clone()
    }
}

const POOL: usize = 8;

/// Flips the bits at `positions` (at least one, all distinct, so `bytes` always changes).
fn flip(bytes: &mut [u8], positions: &[Index]) {
    let bits: BTreeSet<usize> = positions.iter().map(|p| p.index(bytes.len() * 8)).collect();
    for b in bits {
        bytes[b / 8] ^= 1 << (b % 8);
    }
}

// ---------------------------------------------------------------------------------------------
// Relay records and batches
// ---------------------------------------------------------------------------------------------

fn key_seed() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn node_id() -> impl Strategy<Value = NodeId> {
    key_seed().prop_map(|s| NodeId::from_key(SigningSecret::from_seed(&s).public()))
}

fn cell_id() -> impl Strategy<Value = CellId> {
    key_seed().prop_map(|s| CellId::from_key(SigningSecret::from_seed(&s).public()))
}

fn msg_id() -> impl Strategy<Value = MsgId> {
    any::<[u8; 16]>().prop_map(MsgId)
}

fn envelope() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..200).prop_map(Bytes::from)
}

fn token() -> impl Strategy<Value = Token> {
    (0..POOL).prop_map(pool_token)
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (any::<u32>(), cell_id()).prop_map(|(request, cell)| Record::Lookup { request, cell }),
        (node_id(), msg_id(), envelope()).prop_map(|(to, id, envelope)| Record::Forward {
            to,
            id,
            envelope
        }),
        vec(msg_id(), 1..20).prop_map(Record::Delivered),
        Just(Record::Receive),
        (
            any::<u32>(),
            cell_id(),
            // The codec does not care whether the pairs belong together; the directory check
            // does (see below).
            vec((token(), token()), 0..3),
            vec(token(), 0..3),
        )
            .prop_map(|(request, cell, devices, revocations)| Record::Directory {
                request,
                cell,
                devices: devices
                    .into_iter()
                    .map(|(node_token, identity)| DirectoryEntry {
                        node_token,
                        identity
                    })
                    .collect(),
                revocations,
            }),
        (any::<u32>(), token()).prop_map(|(request, revocation)| Record::Revoke {
            request,
            revocation: Box::new(revocation),
        }),
        // 0 is the one way to say "kept"; every other code is a refusal.
        (any::<u32>(), any::<u8>()).prop_map(|(request, c)| Record::Revoked {
            request,
            result: match c {
                0 => Ok(()),
                c => Err(RefuseCode::from_code(c)),
            },
        }),
        (node_id(), msg_id(), any::<bool>()).prop_map(|(to, id, pushed)| Record::Accepted {
            to,
            id,
            status: if pushed {
                Accepted::Pushed
            } else {
                Accepted::Queued
            },
        }),
        // Only the canonical value per wire code round-trips: `Other(1)` goes out as 1, which
        // reads back as `UnknownDevice`.
        (node_id(), msg_id(), any::<u8>()).prop_map(|(to, id, c)| Record::Refused {
            to,
            id,
            code: RefuseCode::from_code(c),
        }),
        (node_id(), msg_id(), envelope()).prop_map(|(from, id, envelope)| Record::Deliver {
            from,
            id,
            envelope
        }),
    ]
}

fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    record.encode(&mut out);
    out
}

/// A batch payload, and the offset at which each record ends.
fn batch(recs: &[Record]) -> (Vec<u8>, Vec<usize>) {
    let mut out = Vec::new();
    let mut ends = Vec::new();
    for r in recs {
        put_record(&mut out, r);
        ends.push(out.len());
    }
    (out, ends)
}

/// Feeds `input` to [`records`]: it must stop at the first error, and the records before it
/// must re-encode to exactly the bytes they came from (every record has one encoding).
fn check_batch_decoding(input: &[u8]) -> Result<(), TestCaseError> {
    let mut reencoded = Vec::new();
    let mut failed = false;
    for result in records(Bytes::copy_from_slice(input)) {
        prop_assert!(!failed, "records() went on after an error");
        match result {
            Ok(record) => {
                let before = reencoded.len();
                put_record(&mut reencoded, &record);
                prop_assert_eq!(reencoded.len() - before, 4 + record.encoded_len());
            }
            Err(_) => failed = true,
        }
    }
    prop_assert!(reencoded.len() <= input.len());
    prop_assert_eq!(
        &reencoded[..],
        &input[..reencoded.len()],
        "a decoded record is not its input's encoding"
    );
    if !failed {
        prop_assert_eq!(
            reencoded.len(),
            input.len(),
            "input left over without an error"
        );
    }
    Ok(())
}

/// Record kinds, so that arbitrary bodies get past the first byte.
fn kind() -> impl Strategy<Value = u8> {
    prop_oneof![(0x20u8..=0x24), (0x30u8..=0x35), any::<u8>(),]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn records_round_trip_with_exact_lengths(record in record()) {
        let bytes = encode(&record);
        prop_assert_eq!(bytes.len(), record.encoded_len());
        prop_assert_eq!(Record::decode(Bytes::from(bytes)), Ok(record));
    }

    #[test]
    fn batches_round_trip(recs in vec(record(), 1..6)) {
        let (bytes, _) = batch(&recs);
        prop_assert_eq!(
            bytes.len(),
            recs.iter().map(|r| 4 + r.encoded_len()).sum::<usize>()
        );
        let got: Result<Vec<Record>, DecodeError> = records(Bytes::from(bytes)).collect();
        prop_assert_eq!(got, Ok(recs));
    }

    /// A cut between two records leaves a shorter, valid batch (the link's AEAD, not the
    /// batch framing, protects the payload's length); every other cut ends in `Truncated`
    /// after the whole records before it, and nothing after.
    #[test]
    fn every_cut_of_a_batch_is_refused_unless_it_falls_between_records(
        recs in vec(record(), 1..5),
    ) {
        let (bytes, ends) = batch(&recs);
        let bytes = Bytes::from(bytes);
        for n in 1..bytes.len() {
            let got: Vec<_> = records(bytes.slice(..n)).collect();
            let whole = ends.iter().take_while(|&&e| e <= n).count();
            prop_assert!(got.len() >= whole, "cut at {}: {} results", n, got.len());
            for (g, r) in got.iter().zip(&recs[..whole]) {
                prop_assert_eq!(g.as_ref(), Ok(r), "cut at {}", n);
            }
            if ends.contains(&n) {
                prop_assert_eq!(got.len(), whole, "cut at {} (a record boundary)", n);
            } else {
                prop_assert_eq!(got.len(), whole + 1, "cut at {}", n);
                prop_assert_eq!(&got[whole], &Err(DecodeError::Truncated), "cut at {}", n);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_whatever_decodes_is_canonical(
        bytes in vec(any::<u8>(), 0..300),
        kind in kind(),
        slack in 0u32..3,
    ) {
        // Raw bytes mostly fail on the length prefix; a prefix that (nearly) matches and a
        // known record kind get into the record decoders.
        let len = bytes.len() as u32 + 1;
        let framed = [&(len - slack.min(len)).to_be_bytes()[..], &[kind], &bytes].concat();
        check_batch_decoding(&bytes)?;
        check_batch_decoding(&framed)?;
        let mut record = vec![kind];
        record.extend_from_slice(&bytes);
        if let Ok(r) = Record::decode(Bytes::from(record.clone())) {
            prop_assert_eq!(r.encoded_len(), record.len());
            prop_assert_eq!(encode(&r), record);
        }
    }

    #[test]
    fn bit_flips_in_a_batch_never_panic_and_whatever_decodes_is_canonical(
        recs in vec(record(), 1..4),
        flips in vec(any::<Index>(), 1..4),
    ) {
        let (mut bytes, _) = batch(&recs);
        flip(&mut bytes, &flips);
        check_batch_decoding(&bytes)?;
    }
}

// ---------------------------------------------------------------------------------------------
// End-to-end envelopes
// ---------------------------------------------------------------------------------------------

fn endpoint(n: &TestNode) -> Endpoint {
    n.endpoint()
}

fn remote(n: &TestNode) -> RemoteDevice {
    n.remote(T)
}

/// Where a conversation from Alice to Bob is when the envelope under test arrives.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Alice's first message (an INIT), to a Bob who has seen nothing.
    Init,
    /// Bob's acknowledgement of it (epoch 0, carrying his ephemeral key), to Alice.
    Ack,
    /// Alice's second message (a MSG in epoch 1, after the acknowledgement), to Bob.
    Msg,
    /// Instead of that message, a bundle of three, to Bob.
    Bundle,
}

fn stage() -> impl Strategy<Value = Stage> {
    prop_oneof![
        Just(Stage::Init),
        Just(Stage::Ack),
        Just(Stage::Msg),
        Just(Stage::Bundle)
    ]
}

/// Alice and Bob on a seeded RNG: the same envelopes every time, fresh endpoint state for
/// every test case (endpoints are cheap; the fixture's key derivation is not).
struct Conversation {
    rng: ChaCha20Rng,
    alice: Endpoint,
    bob: Endpoint,
    /// The envelope under test: (id, bytes), and whether Bob (or, for an ACK, Alice) opens it.
    next: (MsgId, Bytes),
    to_bob: bool,
}

impl Conversation {
    fn at(stage: Stage) -> Self {
        let fx = fixture();
        let bob_device = remote(&fx.nodes[BOB]);
        let mut c = Self {
            rng: ChaCha20Rng::from_seed([9; 32]),
            alice: endpoint(&fx.nodes[ALICE]),
            bob: endpoint(&fx.nodes[BOB]),
            next: (MsgId([0; 16]), Bytes::new()),
            to_bob: true,
        };
        let first = c.seal(&bob_device, b"first");
        if let Stage::Init = stage {
            c.next = first;
            return c;
        }
        match c.bob_opens(first.0, &first.1) {
            Ok(Opened::Messages(got)) => c.bob.ack(got.ack),
            other => panic!("{other:?}"),
        }
        let ack = c.bob.poll_acks(&mut c.rng).remove(0);
        if let Stage::Ack = stage {
            c.next = (ack.id, ack.envelope);
            c.to_bob = false;
            return c;
        }
        assert!(matches!(
            c.alice_opens(ack.id, &ack.envelope),
            Ok(Opened::Acked { .. })
        ));
        c.next = match stage {
            Stage::Bundle => {
                let id = MsgId::random(&mut c.rng);
                let messages: Vec<(MsgId, Bytes)> = [&b"x"[..], b"", b"third"]
                    .iter()
                    .map(|b| (MsgId::random(&mut c.rng), Bytes::copy_from_slice(b)))
                    .collect();
                let env = c
                    .alice
                    .seal_bundle(&bob_device, id, NOW, &messages, &mut c.rng);
                (id, env.unwrap())
            }
            _ => c.seal(&bob_device, b"second"),
        };
        assert_eq!(c.next.1[1], 2, "a MSG once Bob has answered");
        c
    }

    fn seal(&mut self, to: &RemoteDevice, body: &[u8]) -> (MsgId, Bytes) {
        let id = MsgId::random(&mut self.rng);
        let env = self.alice.seal(to, id, NOW, body, &mut self.rng).unwrap();
        (id, env)
    }

    fn bob_opens(&mut self, id: MsgId, env: &[u8]) -> Result<Opened, OpenError> {
        let from = fixture().nodes[ALICE].node_id();
        self.bob
            .open(from, id, env, NOW, &Revocations::new(), &mut self.rng)
    }

    fn alice_opens(&mut self, id: MsgId, env: &[u8]) -> Result<Opened, OpenError> {
        let from = fixture().nodes[BOB].node_id();
        self.alice
            .open(from, id, env, NOW, &Revocations::new(), &mut self.rng)
    }

    /// Opens `env` with `id` where the envelope under test would go.
    fn deliver(&mut self, id: MsgId, env: &[u8]) -> Result<Opened, OpenError> {
        if self.to_bob {
            self.bob_opens(id, env)
        } else {
            self.alice_opens(id, env)
        }
    }
}

/// Whether `opened` is what only a genuine envelope may produce.
fn is_authentic(opened: &Result<Opened, OpenError>) -> bool {
    matches!(opened, Ok(Opened::Messages(_) | Opened::Acked { .. }))
}

/// The envelope under test with `flips` applied to its bytes followed by its id's.
fn tampered(c: &Conversation, flips: &[Index]) -> (MsgId, Vec<u8>) {
    let (id, env) = &c.next;
    let mut bytes = [&env[..], &id.0[..]].concat();
    flip(&mut bytes, flips);
    let id = MsgId(bytes[env.len()..].try_into().unwrap());
    bytes.truncate(env.len());
    (id, bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn bit_flips_in_an_envelope_or_its_id_never_open(
        stage in stage(),
        flips in vec(any::<Index>(), 1..4),
    ) {
        let mut c = Conversation::at(stage);
        let (id, bad) = tampered(&c, &flips);
        let got = c.deliver(id, &bad);
        prop_assert!(!is_authentic(&got), "{:?}: tampered envelope opened: {:?}", stage, got);
        // A check on the harness: the genuine envelope opens.
        let (id, env) = c.next.clone();
        let mut fresh = Conversation::at(stage);
        prop_assert!(is_authentic(&fresh.deliver(id, &env)));
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_open(
        stage in stage(),
        raw in vec(any::<u8>(), 0..400),
        cut in any::<Index>(),
        id in msg_id(),
    ) {
        let mut c = Conversation::at(stage);
        // Raw bytes stop at the version or kind; a prefix of the genuine envelope (its header,
        // session id, HPKE encapsulation, tokens or sealed header) followed by arbitrary bytes
        // gets as far as the AEAD.
        let env = c.next.1.clone();
        let spliced = [&env[..cut.index(env.len() + 1)], &raw[..]].concat();
        for input in [&raw[..], &spliced[..]] {
            if input == &env[..] {
                continue;
            }
            let got = c.deliver(id, input);
            prop_assert!(!is_authentic(&got), "{:?}: arbitrary bytes opened: {:?}", stage, got);
        }
    }
}

/// A refused envelope must leave no trace: the genuine one, arriving after it, still opens.
/// (The fuzz target `e2e_open` checks the same.) In particular an INIT with an altered HPKE
/// encapsulation (bytes 18..50) must not leave a session with wrong keys behind: a session is
/// kept only once an envelope authenticates in it.
#[test]
fn a_refused_envelope_leaves_no_trace() {
    let mut c = Conversation::at(Stage::Init);
    let (id, env) = c.next.clone();
    let mut bad = env.to_vec();
    bad[18] ^= 1; // the first byte of the HPKE encapsulation
    assert!(!is_authentic(&c.deliver(id, &bad)));
    assert!(
        matches!(c.deliver(id, &env), Ok(Opened::Messages(_))),
        "the genuine INIT no longer opens after a tampered copy of it"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The same, for every stage and any bit flips.
    #[test]
    fn refused_envelopes_leave_no_trace(
        stage in stage(),
        flips in vec(any::<Index>(), 1..4),
    ) {
        let mut c = Conversation::at(stage);
        let (id, bad) = tampered(&c, &flips);
        // Only a refusal must leave no trace (a RESET, unauthenticated by design, is obeyed).
        if c.deliver(id, &bad).is_ok() {
            return Ok(());
        }
        let (id, env) = c.next.clone();
        let got = c.deliver(id, &env);
        prop_assert!(is_authentic(&got), "{:?}: genuine envelope refused after a tampered one: {:?}", stage, got);
    }
}

// ---------------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------------

/// The pair (pool tokens `n`, `i`) as the relay might list it.
fn entry(n: usize, i: usize) -> DirectoryEntry {
    DirectoryEntry {
        node_token: pool_token(n),
        identity: pool_token(i),
    }
}

/// The device whose genuine pair (`n`, `i`) is, if it is one.
fn genuine(n: usize, i: usize) -> Option<usize> {
    (n.is_multiple_of(2) && i == n + 1).then_some(n / 2)
}

/// Token pairs biased towards genuine ones, so that whole directories verify often.
fn pair() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        (0..4usize).prop_map(|d| (2 * d, 2 * d + 1)),
        (0..POOL, 0..POOL),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_device_verifies_only_from_its_own_pair_of_tokens(
        (n, i) in pair(),
        revoked in any::<bool>(),
    ) {
        let fx = fixture();
        let revocations = if revoked { fx.bob2_revoked.clone() } else { Revocations::new() };
        let got = RemoteDevice::verify(&pool_token(n), &pool_token(i), T, &revocations);
        match genuine(n, i) {
            Some(d) if revoked && d == BOB2 => prop_assert!(
                matches!(got, Err(DirectoryError::Bind(device::BindError::Revoked(_)))),
                "{:?}", got
            ),
            Some(d) => {
                let got = got.unwrap();
                prop_assert_eq!(got.node(), fx.nodes[d].node_id());
                prop_assert_eq!(got.cell(), fx.nodes[d].cell_id());
            }
            None => prop_assert!(got.is_err(), "tokens {} and {} verified as a device", n, i),
        }
    }

    #[test]
    fn a_directory_verifies_only_if_every_entry_is_a_device_of_the_cell(
        pairs in vec(pair(), 0..5),
        asked in prop_oneof![Just(ALICE), Just(BOB), Just(MALLORY)],
        revoked in any::<bool>(),
    ) {
        let fx = fixture();
        let cell = fx.nodes[asked].cell_id();
        let revocations = if revoked { fx.bob2_revoked.clone() } else { Revocations::new() };
        let entries: Vec<_> = pairs.iter().map(|&(n, i)| entry(n, i)).collect();
        // The oracle: any entry that is not a genuine pair, or a genuine device of another
        // cell, fails the whole answer; revoked devices are left out; nothing left is an error.
        let mut expected = Some(Vec::new());
        for &(n, i) in &pairs {
            match genuine(n, i) {
                Some(BOB2) if revoked => {}
                Some(d) if fx.nodes[d].cell_id() == cell => {
                    if let Some(e) = expected.as_mut() {
                        e.push(fx.nodes[d].node_id());
                    }
                }
                _ => expected = None,
            }
        }
        let got = Directory::verify(cell, &entries, T, &revocations);
        match expected {
            Some(nodes) if !nodes.is_empty() => {
                let dir = got.unwrap();
                prop_assert_eq!(dir.cell, cell);
                let got: Vec<_> = dir.devices.iter().map(RemoteDevice::node).collect();
                prop_assert_eq!(got, nodes);
                prop_assert!(dir.devices.iter().all(|d| d.cell() == cell));
            }
            Some(_) => prop_assert_eq!(got, Err(DirectoryError::NoDevices(cell))),
            None => prop_assert!(got.is_err(), "{:?} verified for {:?}", pairs, cell),
        }
    }

    #[test]
    fn a_token_with_flipped_bits_never_verifies(
        d in 0..4usize,
        identity_slot in any::<bool>(),
        flips in vec(any::<Index>(), 1..4),
    ) {
        let (n, i) = (2 * d, 2 * d + 1);
        let mut bytes = pool_token(if identity_slot { i } else { n }).to_bytes();
        flip(&mut bytes, &flips);
        // Most flips fail to decode; what decodes must fail verification.
        let Ok(bad) = Token::decode(&bytes) else {
            return Ok(());
        };
        let (node_token, identity) = if identity_slot {
            (pool_token(n), bad)
        } else {
            (bad, pool_token(i))
        };
        let none = Revocations::new();
        prop_assert!(RemoteDevice::verify(&node_token, &identity, T, &none).is_err());
        let cell = fx_cell(d);
        let entries = [DirectoryEntry { node_token, identity }, entry(n, i)];
        prop_assert!(Directory::verify(cell, &entries, T, &none).is_err());
    }
}

fn fx_cell(d: usize) -> CellId {
    fixture().nodes[d].cell_id()
}
