use std::collections::BTreeSet;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;
use crate::relay::DirectoryEntry;
use crate::testing::TestNode;

const T: Instant = Instant(1_800_000_100_000);
const T0: Timestamp = Timestamp(1_800_000_000);

fn endpoint(n: &TestNode) -> Endpoint {
    n.endpoint()
}

fn remote(n: &TestNode) -> RemoteDevice {
    n.remote(T.timestamp())
}

fn none() -> Revocations {
    Revocations::new()
}

struct World {
    rng: ChaCha20Rng,
    a: TestNode,
    b: TestNode,
    alice: Endpoint,
    bob: Endpoint,
    bob_device: RemoteDevice,
    alice_node: NodeId,
}

fn world() -> World {
    let (a, b) = (TestNode::new(1, T0), TestNode::new(2, T0));
    World {
        rng: ChaCha20Rng::from_seed([9; 32]),
        alice: endpoint(&a),
        bob: endpoint(&b),
        bob_device: remote(&b),
        alice_node: a.node_id(),
        a,
        b,
    }
}

fn messages(opened: Result<Opened, OpenError>) -> Received {
    match opened {
        Ok(Opened::Messages(r)) => r,
        other => panic!("{other:?}"),
    }
}

impl World {
    fn send(&mut self, body: &[u8]) -> (MsgId, Bytes) {
        let id = MsgId::random(&mut self.rng);
        let env = self
            .alice
            .seal(&self.bob_device, id, T, body, &mut self.rng)
            .unwrap();
        (id, env)
    }

    fn bob_opens(&mut self, id: MsgId, env: &[u8]) -> Result<Opened, OpenError> {
        let from = self.alice_node;
        self.bob.open(from, id, env, T, &none(), &mut self.rng)
    }

    /// Bob opens and acknowledges.
    fn deliver(&mut self, id: MsgId, env: &[u8]) -> Received {
        let got = messages(self.bob_opens(id, env));
        self.bob.ack(got.ack);
        got
    }

    /// Bob's acknowledgements, opened by Alice.
    fn acks_back(&mut self) -> Vec<MsgId> {
        let mut acked = Vec::new();
        let bob = self.bob_device.node();
        for reply in self.bob.poll_acks(&mut self.rng) {
            assert_eq!(reply.to, self.alice_node);
            match self
                .alice
                .open(bob, reply.id, &reply.envelope, T, &none(), &mut self.rng)
                .unwrap()
            {
                Opened::Acked { ids, reset, .. } => {
                    assert!(!reset);
                    acked.extend(ids)
                }
                other => panic!("{other:?}"),
            }
        }
        acked
    }
}

#[test]
fn messages_flow_and_the_session_moves_to_ephemeral_keys() {
    let mut w = world();
    let (id1, env1) = w.send(b"hello bob");
    assert_eq!(env1[0], E2E_VERSION);
    assert_eq!(env1[1], INIT, "the first message sets the session up");
    let got = w.deliver(id1, &env1);
    assert_eq!(got.messages.len(), 1);
    let m = &got.messages[0];
    assert_eq!(m.body, &b"hello bob"[..]);
    assert_eq!(
        (m.id, m.time, m.from_node),
        (id1, T.timestamp(), w.alice_node)
    );
    // A second message before the acknowledgement is still a self-contained INIT.
    let (id2, env2) = w.send(b"again");
    assert_eq!(env2[1], INIT);
    w.deliver(id2, &env2);
    assert_eq!(w.acks_back(), vec![id1, id2]);
    // After the acknowledgement (which carried Bob's ephemeral key): compact, epoch 1.
    let (id3, env3) = w.send(b"three");
    assert_eq!(env3[1], MSG);
    assert_eq!(&env3[18..22], &1u32.to_be_bytes());
    assert_eq!(env3.len(), 18 + 20 + 1 + 1 + 4 + 5 + 16);
    w.deliver(id3, &env3);
    assert_eq!(w.acks_back(), vec![id3]);
    // Bob's replies are now in epoch 1 too, and without his ephemeral key.
    let (id4, env4) = w.send(b"four");
    w.deliver(id4, &env4);
    let acks = w.bob.poll_acks(&mut w.rng);
    assert_eq!(&acks[0].envelope[34..38], &1u32.to_be_bytes());
}

#[test]
fn nothing_is_acknowledged_until_asked_and_the_endpoint_keeps_no_duplicate_memory() {
    let mut w = world();
    let (id, env) = w.send(b"once");
    let first = messages(w.bob_opens(id, &env));
    assert!(
        w.bob.poll_acks(&mut w.rng).is_empty(),
        "not acknowledged yet"
    );
    // Telling duplicates is the caller's: the endpoint opens the same envelope again, and
    // the duplicate memory says it was seen.
    let again = messages(w.bob_opens(id, &env));
    assert_eq!(again.id, first.id);
    let mut seen = Seen::new();
    assert_eq!(seen.check(first.from_cell, id, first.time), Verdict::New);
    seen.insert(first.from_cell, id, first.time);
    assert_eq!(seen.check(again.from_cell, id, again.time), Verdict::Seen);
    w.bob.ack(first.ack);
    w.bob.ack(again.ack);
    assert_eq!(
        w.acks_back(),
        vec![id, id],
        "each acknowledged copy is listed"
    );
}

impl World {
    fn bundle(&mut self, bodies: &[&[u8]]) -> (MsgId, Vec<MsgId>, Bytes) {
        let messages: Vec<(MsgId, Bytes)> = bodies
            .iter()
            .map(|b| (MsgId::random(&mut self.rng), Bytes::copy_from_slice(b)))
            .collect();
        let id = MsgId::random(&mut self.rng);
        let env = self
            .alice
            .seal_bundle(&self.bob_device, id, T, &messages, &mut self.rng)
            .unwrap();
        (id, messages.into_iter().map(|(m, _)| m).collect(), env)
    }
}

#[test]
fn a_bundle_carries_its_messages_under_one_acknowledgement() {
    let mut w = world();
    // The first envelope of a session is an INIT, the next ones MSG: both can bundle.
    for _ in 0..2 {
        let (id, ids, env) = w.bundle(&[b"one", b"", b"three"]);
        let got = w.deliver(id, &env);
        let bodies: Vec<(MsgId, &[u8])> =
            got.messages.iter().map(|m| (m.id, &m.body[..])).collect();
        assert_eq!(
            bodies,
            vec![(ids[0], &b"one"[..]), (ids[1], b""), (ids[2], b"three")]
        );
        assert!(got.messages.iter().all(|m| m.time == T.timestamp()));
        assert_eq!(w.acks_back(), vec![id]);
    }
}

#[test]
fn bundles_are_bounded_and_checked() {
    let mut w = world();
    let to = w.bob_device.clone();
    let one = (MsgId([1; 16]), Bytes::new());
    assert_eq!(
        w.alice.seal_bundle(&to, MsgId([0; 16]), T, &[], &mut w.rng),
        Err(SealError::BundleCount(0))
    );
    let many = vec![one.clone(); MAX_BUNDLE + 1];
    assert_eq!(
        w.alice
            .seal_bundle(&to, MsgId([0; 16]), T, &many, &mut w.rng),
        Err(SealError::BundleCount(MAX_BUNDLE + 1))
    );
    let huge = vec![(MsgId([1; 16]), Bytes::from(vec![0; MAX_BODY / 2])); 2];
    assert!(matches!(
        w.alice
            .seal_bundle(&to, MsgId([0; 16]), T, &huge, &mut w.rng),
        Err(SealError::TooLarge(_))
    ));
    // The largest bundle fits in an envelope, padded or not.
    w.alice.padding = Padding::PowerOfTwo;
    let full = vec![(
        MsgId([1; 16]),
        Bytes::from(vec![0; MAX_BODY - 2 - BUNDLE_ITEM]),
    )];
    let env = w
        .alice
        .seal_bundle(&to, MsgId([0; 16]), T, &full, &mut w.rng);
    assert!(env.unwrap().len() <= crate::relay::MAX_ENVELOPE);
    // Every altered byte of a bundle is refused.
    let (id, _, env) = w.bundle(&[b"x", b"y"]);
    every_flip_is_refused(id, &env);
}

/// Plaintexts that authenticate (sealed by the real sender) but are not well formed are
/// refused whole, and deliver nothing.
#[test]
fn a_malformed_plaintext_that_authenticates_is_refused() {
    let id = [0x77u8; 16];
    let item = |len: u32, body: &[u8]| [&id[..], &len.to_be_bytes(), body].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bundle of none", vec![PLAIN_BUNDLE, 0, 0]),
        (
            "bundle of 1025",
            [&[PLAIN_BUNDLE, 4, 1][..], &item(0, b"")].concat(),
        ),
        (
            "bundle cut short",
            [&[PLAIN_BUNDLE, 0, 2][..], &item(1, b"x")].concat(),
        ),
        (
            "body past the end",
            [&[PLAIN_BUNDLE, 0, 1][..], &item(9, b"x")].concat(),
        ),
        (
            "non-zero padding after a bundle",
            [&[PLAIN_BUNDLE, 0, 1][..], &item(1, b"x"), &[0, 1]].concat(),
        ),
        (
            "non-zero padding after a body",
            vec![PLAIN_MESSAGE, 0, 0, 0, 1, b'x', 7],
        ),
        ("an acknowledgement inbound", vec![PLAIN_ACK, 0, 1]),
        ("an unknown kind", vec![9, 0, 0]),
        ("nothing after the flag", vec![]),
    ];
    for (what, plain) in cases {
        let mut w = world();
        let to = w.bob_device.clone();
        let env = w
            .alice
            .seal_plain(&to, MsgId(id), T, plain.len(), &mut w.rng, |p| {
                p.extend_from_slice(&plain)
            });
        let opened = w.bob_opens(MsgId(id), &env.unwrap());
        assert!(
            matches!(opened, Err(OpenError::Malformed(_))),
            "{what}: {opened:?}"
        );
        assert_eq!(w.bob.sessions().2, 0, "{what}: no session kept");
    }
}

/// Flips each byte of `env` in turn: a fresh recipient opens none of them.
fn every_flip_is_refused(id: MsgId, env: &[u8]) {
    for i in 0..env.len() {
        let mut bad = env.to_vec();
        bad[i] ^= 0x01;
        let mut fresh = world();
        assert!(
            !matches!(fresh.bob_opens(id, &bad), Ok(Opened::Messages(_))),
            "flipping byte {i} went unnoticed"
        );
    }
}

/// An acknowledgement reaching another process of the sending device (same node, none of
/// its sessions) is dropped as such, not reported as a forgery.
#[test]
fn an_acknowledgement_for_a_session_this_process_lacks_is_no_session() {
    let mut w = world();
    let (id, env) = w.send(b"from the first process");
    w.deliver(id, &env);
    let mut second = endpoint(&TestNode::new(1, T0));
    for reply in w.bob.poll_acks(&mut w.rng) {
        let opened = second.open(
            w.bob_device.node(),
            reply.id,
            &reply.envelope,
            T,
            &none(),
            &mut w.rng,
        );
        assert_eq!(opened.unwrap_err(), OpenError::NoSession);
    }
}

#[test]
fn every_altered_byte_is_refused() {
    let mut w = world();
    let (id, env) = w.send(b"integrity");
    every_flip_is_refused(id, &env);
    // Another id, or another claimed sender, than the one sealed: refused.
    let mut other = MsgId([0; 16]);
    other.0[0] = 1;
    assert_eq!(
        w.bob_opens(other, &env).unwrap_err(),
        OpenError::Unauthentic
    );
    let mallory = TestNode::new(3, T0).node_id();
    assert_eq!(
        w.bob
            .open(mallory, id, &env, T, &none(), &mut w.rng)
            .unwrap_err(),
        OpenError::WrongSender
    );
    // Truncations never deliver.
    for n in 0..env.len() {
        let mut fresh = world();
        assert!(fresh.bob_opens(id, &env[..n]).is_err(), "cut at {n}");
    }
    // Nor does a version-1 envelope.
    let mut old = env.to_vec();
    old[0] = 1;
    assert_eq!(
        w.bob_opens(id, &old).unwrap_err(),
        OpenError::Malformed(DecodeError::UnsupportedVersion(1))
    );
}

#[test]
fn a_third_party_cannot_read_or_impersonate() {
    let mut w = world();
    let (id, env) = w.send(b"secret");
    // Carol, another cell, is not the recipient: the envelope is not for her keys.
    let carol = TestNode::new(4, T0);
    let mut carol_ep = endpoint(&carol);
    assert!(
        carol_ep
            .open(w.alice_node, id, &env, T, &none(), &mut w.rng)
            .is_err()
    );
    // Mallory seals to Bob claiming Alice's tokens but with her own key: refused.
    let mallory = TestNode::new(5, T0);
    let forged = LocalDevice {
        cell: w.alice.local.cell,
        node: w.alice_node,
        node_token: w.alice.local.node_token.clone(),
        identity: w.alice.local.identity.clone(),
        agreement: crate::keys::AgreementSecret::from_bytes(
            &mallory.node.agreement.dangerous_bytes(),
        ),
    };
    let mut forger = Endpoint::new(forged, Padding::None);
    let env = forger
        .seal(&w.bob_device, id, T, b"from alice, honest", &mut w.rng)
        .unwrap();
    assert_eq!(w.bob_opens(id, &env).unwrap_err(), OpenError::Unauthentic);
}

#[test]
fn a_directory_with_a_swapped_key_is_detected() {
    let bob = TestNode::new(2, T0);
    let bob2 = bob.sibling(6, T0);
    let mallory = TestNode::new(7, T0);
    let entry = |n: &TestNode| DirectoryEntry {
        node_token: n.node_token.clone(),
        identity: n.identity.clone(),
    };
    let t = T.timestamp();
    let dir = Directory::verify(bob.cell_id(), &[entry(&bob), entry(&bob2)], t, &none()).unwrap();
    assert_eq!(dir.devices.len(), 2);
    // The relay answers with Mallory's device for Bob's cell.
    assert_eq!(
        Directory::verify(bob.cell_id(), &[entry(&bob), entry(&mallory)], t, &none()),
        Err(DirectoryError::WrongCell(mallory.cell_id()))
    );
    // Or with Bob's identity token over Mallory's node token (her X25519 key).
    let spliced = DirectoryEntry {
        node_token: mallory.node_token.clone(),
        identity: bob.identity.clone(),
    };
    assert!(Directory::verify(bob.cell_id(), &[spliced], t, &none()).is_err());
    assert_eq!(
        Directory::verify(bob.cell_id(), &[], t, &none()),
        Err(DirectoryError::NoDevices(bob.cell_id()))
    );
    // A revoked device is left out.
    let mut revoked = Revocations::new();
    let token = crate::device::revocation(
        &bob.cell,
        bob2.node_id(),
        T0,
        &mut ChaCha20Rng::from_seed([1; 32]),
    )
    .unwrap();
    revoked.insert(&token.verify(t, 60).unwrap()).unwrap();
    let dir = Directory::verify(bob.cell_id(), &[entry(&bob), entry(&bob2)], t, &revoked).unwrap();
    assert_eq!(dir.devices.len(), 1);
}

fn reset_of(opened: Result<Opened, OpenError>) -> Reply {
    match opened {
        Ok(Opened::Unknown { reply }) => reply,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_recipient_that_lost_its_session_asks_for_a_new_one() {
    let mut w = world();
    let (id, env) = w.send(b"first");
    w.deliver(id, &env);
    w.acks_back();
    let (id2, env2) = w.send(b"second");
    // Bob restarts without his sessions: a MSG for a session he does not know.
    w.bob = endpoint(&w.b);
    let reset = reset_of(w.bob_opens(id2, &env2));
    let bob = w.bob_device.node();
    let got = w
        .alice
        .open(bob, reset.id, &reset.envelope, T, &none(), &mut w.rng)
        .unwrap();
    assert!(matches!(got, Opened::Reset { from } if from == bob));
    // Alice sends again, in a new session: delivered.
    let env2 = w
        .alice
        .seal(&w.bob_device, id2, T, b"second", &mut w.rng)
        .unwrap();
    assert_eq!(env2[1], INIT);
    w.deliver(id2, &env2);
    // A RESET for a session that is not the current one is ignored.
    assert!(
        w.alice
            .open(bob, reset.id, &reset.envelope, T, &none(), &mut w.rng)
            .is_err()
    );
}

/// Finding 4 of issue 10: two instances of the recipient built from one INIT (a restart
/// before the session was saved, two processes of one device) used to derive the same reply
/// keys and both seal their first acknowledgement under counter 0: two REPLYs under one
/// (key, nonce) give away the GHASH key. Now each instance keys its replies with its own id.
#[test]
fn two_instances_of_one_session_never_share_a_reply_key_and_the_sender_recovers() {
    let mut w = world();
    let (id, env) = w.send(b"hello");
    let mut bob2 = endpoint(&w.b);
    let first = w.deliver(id, &env);
    let second = messages(bob2.open(w.alice_node, id, &env, T, &none(), &mut w.rng));
    bob2.ack(second.ack);
    let key = (w.alice_node, first.ack.session);
    let (i1, i2) = (&w.bob.inbound[&key], &bob2.inbound[&key]);
    assert_ne!(i1.instance, i2.instance);
    assert_ne!(
        &i1.send0.key_bytes()[..],
        &i2.send0.key_bytes()[..],
        "reply keys differ"
    );
    let r1 = w.bob.poll_acks(&mut w.rng).remove(0);
    let r2 = bob2.poll_acks(&mut w.rng).remove(0);
    // Same counter (0) and epoch (0) in both: only the key tells them apart.
    assert_eq!(&r1.envelope[34..46], &r2.envelope[34..46]);
    assert_ne!(
        &r1.envelope[18..34],
        &r2.envelope[18..34],
        "instances in clear"
    );
    let bob = w.bob_device.node();
    // Alice hears the first instance and moves to epoch 1 with it.
    let got = w
        .alice
        .open(bob, r1.id, &r1.envelope, T, &none(), &mut w.rng)
        .unwrap();
    assert!(matches!(got, Opened::Acked { reset: false, .. }));
    // The second instance's acknowledgement opens (it is Bob's) but ends the session.
    let got = w
        .alice
        .open(bob, r2.id, &r2.envelope, T, &none(), &mut w.rng)
        .unwrap();
    assert!(matches!(&got, Opened::Acked { ids, reset: true, .. } if ids == &vec![id]));
    // The next message starts a new session, which the surviving instance opens.
    let (id3, env3) = w.send(b"still arrives");
    assert_eq!(env3[1], INIT);
    let got = messages(bob2.open(w.alice_node, id3, &env3, T, &none(), &mut w.rng));
    assert_eq!(got.messages[0].body, &b"still arrives"[..]);
}

/// The same finding's other half: an instance without the epoch-1 keys the sender moved to
/// used to fail those messages silently, wedging the session. It now asks for a new one.
#[test]
fn an_instance_without_the_senders_epoch_answers_reset() {
    let mut w = world();
    let (id, env) = w.send(b"hello");
    let mut bob2 = endpoint(&w.b);
    w.deliver(id, &env);
    let got = messages(bob2.open(w.alice_node, id, &env, T, &none(), &mut w.rng));
    bob2.ack(got.ack);
    w.acks_back();
    // Alice is in epoch 1 with the first instance's key; the second instance receives.
    let (id2, env2) = w.send(b"epoch one");
    assert_eq!(env2[1], MSG);
    let reset = reset_of(bob2.open(w.alice_node, id2, &env2, T, &none(), &mut w.rng));
    let bob = w.bob_device.node();
    assert!(matches!(
        w.alice
            .open(bob, reset.id, &reset.envelope, T, &none(), &mut w.rng)
            .unwrap(),
        Opened::Reset { .. }
    ));
    let env2 = w
        .alice
        .seal(&w.bob_device, id2, T, b"epoch one", &mut w.rng)
        .unwrap();
    let got = messages(bob2.open(w.alice_node, id2, &env2, T, &none(), &mut w.rng));
    assert_eq!(got.messages[0].body, &b"epoch one"[..]);
}

/// Finding 5 of issue 10: an INIT that failed authentication used to evict the oldest real
/// inbound session before it was tried; enough of them emptied the cache.
#[test]
fn inits_that_fail_authentication_evict_nothing_and_leave_no_state() {
    let mut w = world();
    let (id, env) = w.send(b"real");
    w.deliver(id, &env);
    w.acks_back();
    assert_eq!(w.bob.sessions().2, 1);
    // Mallory, a registered device of another cell, sends INITs with her real tokens and a
    // garbage ciphertext: each builds a session aside, fails, and is dropped.
    let m = TestNode::new(11, T0);
    let mut mallory = endpoint(&m);
    for n in 0..(MAX_SESSIONS as u32 + 50) {
        let mut mid = [0; 16];
        mid[..4].copy_from_slice(&n.to_be_bytes());
        mallory.reset(w.b.node_id());
        let mut forged = mallory
            .seal(&w.bob_device, MsgId(mid), T, b"x", &mut w.rng)
            .unwrap()
            .to_vec();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let got = w
            .bob
            .open(m.node_id(), MsgId(mid), &forged, T, &none(), &mut w.rng);
        assert_eq!(got.unwrap_err(), OpenError::Unauthentic);
    }
    assert_eq!(w.bob.sessions().2, 1, "nothing remembered, nothing evicted");
    // The real session still opens Alice's epoch-1 messages.
    let (id2, env2) = w.send(b"still here");
    assert_eq!(env2[1], MSG);
    assert_eq!(w.deliver(id2, &env2).messages[0].body, &b"still here"[..]);
}

#[test]
fn new_sessions_are_rate_limited_per_sending_cell() {
    let mut w = world();
    let to = w.bob_device.clone();
    let open_new = |w: &mut World, at: Instant| {
        w.alice.reset(to.node());
        let id = MsgId::random(&mut w.rng);
        let env = w.alice.seal(&to, id, at, b"hi", &mut w.rng).unwrap();
        w.bob.open(w.alice_node, id, &env, at, &none(), &mut w.rng)
    };
    for _ in 0..NEW_SESSION_BURST {
        assert!(matches!(open_new(&mut w, T), Ok(Opened::Messages(_))));
    }
    assert_eq!(
        open_new(&mut w, T).unwrap_err(),
        OpenError::RateLimited(w.a.cell_id())
    );
    let later = T.plus_millis(NEW_SESSION_EVERY_MS);
    assert!(matches!(open_new(&mut w, later), Ok(Opened::Messages(_))));
    // Another cell is not held back by this one.
    let c = TestNode::new(12, T0);
    let mut carol = endpoint(&c);
    let id = MsgId::random(&mut w.rng);
    let env = carol.seal(&to, id, T, b"hi", &mut w.rng).unwrap();
    assert!(matches!(
        w.bob.open(c.node_id(), id, &env, T, &none(), &mut w.rng),
        Ok(Opened::Messages(_))
    ));
}

#[test]
fn a_cell_with_many_sessions_replaces_its_own() {
    let mut w = world();
    let (id, env) = w.send(b"alice's");
    w.deliver(id, &env);
    let m = TestNode::new(13, T0);
    let mut mallory = endpoint(&m);
    let mut now = T;
    for _ in 0..MAX_SESSIONS_PER_CELL + 20 {
        now = now.plus_millis(NEW_SESSION_EVERY_MS);
        mallory.reset(w.b.node_id());
        let mid = MsgId::random(&mut w.rng);
        let env = mallory
            .seal(&w.bob_device, mid, now, b"x", &mut w.rng)
            .unwrap();
        assert!(matches!(
            w.bob.open(m.node_id(), mid, &env, now, &none(), &mut w.rng),
            Ok(Opened::Messages(_))
        ));
    }
    assert_eq!(w.bob.sessions().2, MAX_SESSIONS_PER_CELL + 1);
    assert_eq!(w.bob.per_cell[&w.a.cell_id()], 1, "Alice's session stays");
}

#[test]
fn envelopes_too_old_or_too_far_ahead_are_refused() {
    let mut w = world();
    let id = MsgId::random(&mut w.rng);
    let env = w
        .alice
        .seal(&w.bob_device, id, T, b"old", &mut w.rng)
        .unwrap();
    let late = T.plus_millis((MAX_AGE + 1) * 1000);
    assert_eq!(
        w.bob
            .open(w.alice_node, id, &env, late, &none(), &mut w.rng)
            .unwrap_err(),
        OpenError::Stale {
            time: T.timestamp()
        }
    );
    assert_eq!(w.bob.sessions().2, 0);
    w.deliver(id, &env);
    // Sealed by a clock more than a day ahead of Bob's.
    let ahead = T.plus_millis((MAX_AHEAD + 1) * 1000);
    let id2 = MsgId::random(&mut w.rng);
    let env2 = w
        .alice
        .seal(&w.bob_device, id2, ahead, b"future", &mut w.rng)
        .unwrap();
    assert!(matches!(
        w.bob_opens(id2, &env2),
        Err(OpenError::Stale { .. })
    ));
}

/// Saves both sides' changes into a map, as a store would.
fn save(store: &mut BTreeMap<SessionKey, Vec<u8>>, e: &mut Endpoint) -> bool {
    let changes = e.take_changes();
    for (k, v) in changes.put {
        store.insert(k, v.to_vec());
    }
    for k in changes.delete {
        store.remove(&k);
    }
    changes.critical
}

fn restored(n: &TestNode, store: &BTreeMap<SessionKey, Vec<u8>>, now: Instant) -> Endpoint {
    let fresh = endpoint(n);
    Endpoint::restore(
        fresh.local,
        Padding::None,
        store.iter().map(|(k, v)| (*k, &v[..])),
        now,
        &none(),
    )
}

#[test]
fn saved_sessions_carry_on_after_a_restart_of_either_side() {
    let mut w = world();
    let (mut alice_disk, mut bob_disk) = (BTreeMap::new(), BTreeMap::new());
    let (id, env) = w.send(b"one");
    w.deliver(id, &env);
    w.acks_back();
    let (id2, env2) = w.send(b"two");
    assert_eq!(env2[1], MSG);
    assert!(
        !save(&mut alice_disk, &mut w.alice),
        "nothing critical before the first save"
    );
    save(&mut bob_disk, &mut w.bob);
    // Bob restarts: the epoch-1 message still opens, and his acknowledgement reaches Alice.
    w.bob = restored(&w.b, &bob_disk, T);
    assert_eq!(w.bob.sessions().2, 1);
    w.deliver(id2, &env2);
    assert_eq!(w.acks_back(), vec![id2]);
    // Alice restarts: she keeps the session, and never repeats a counter.
    let used: BTreeSet<Vec<u8>> = [env2[18..30].to_vec()].into();
    w.alice = restored(&w.a, &alice_disk, T);
    let (id3, env3) = w.send(b"three");
    assert_eq!(env3[1], MSG, "the session survived");
    assert!(!used.contains(&env3[18..30]));
    assert_eq!(u64::from_be_bytes(env3[22..30].try_into().unwrap()), LEASE);
    assert!(
        save(&mut alice_disk, &mut w.alice),
        "a new lease of a saved session is critical"
    );
    w.deliver(id3, &env3);
    assert_eq!(w.acks_back(), vec![id3]);
}

#[test]
fn restored_sessions_whose_peer_is_revoked_or_whose_record_is_damaged_are_dropped() {
    let mut w = world();
    let mut disk = BTreeMap::new();
    let (id, env) = w.send(b"one");
    w.deliver(id, &env);
    save(&mut disk, &mut w.bob);
    let mut damaged = disk.clone();
    for v in damaged.values_mut() {
        v.truncate(v.len() - 1);
    }
    let mut e = restored(&w.b, &damaged, T);
    assert_eq!(e.sessions().2, 0);
    assert_eq!(e.take_changes().delete.len(), 1);
    let mut revoked = Revocations::new();
    let token = crate::device::revocation(&w.a.cell, w.alice_node, T0, &mut w.rng).unwrap();
    revoked
        .insert(&token.verify(T.timestamp(), 60).unwrap())
        .unwrap();
    let fresh = endpoint(&w.b);
    let e = Endpoint::restore(
        fresh.local,
        Padding::None,
        disk.iter().map(|(k, v)| (*k, &v[..])),
        T,
        &revoked,
    );
    assert_eq!(e.sessions().2, 0);
}

#[test]
fn sessions_retire_after_their_lifetime_and_late_acks_still_open() {
    let mut w = world();
    let (id, env) = w.send(b"one");
    w.deliver(id, &env);
    let later = T.plus_millis(SESSION_LIFETIME * 1000);
    let id2 = MsgId::random(&mut w.rng);
    let env2 = w
        .alice
        .seal(&w.bob_device, id2, later, b"two", &mut w.rng)
        .unwrap();
    assert_eq!(env2[1], INIT);
    assert_ne!(env2[2..18], env[2..18], "a new session");
    assert_eq!(w.alice.sessions(), (1, 1, 0));
    // The old session's acknowledgement still opens.
    assert_eq!(w.acks_back(), vec![id]);
    w.alice.expire(later.plus_millis(INBOUND_IDLE * 1000));
    assert_eq!(w.alice.sessions().1, 0);
}

#[test]
fn padding_hides_the_size() {
    let mut w = world();
    w.alice.padding = Padding::PowerOfTwo;
    let (_, short) = w.send(b"a");
    let (_, longer) = w.send(&[7; 200]);
    assert_eq!(short.len(), longer.len());
    let (id, env) = w.send(&[7; 300]);
    assert_eq!(w.deliver(id, &env).messages[0].body.len(), 300);
}

#[test]
fn padding_never_grows_an_envelope_past_the_limit() {
    let mut w = world();
    w.alice.padding = Padding::PowerOfTwo;
    let (id, env) = w.send(&vec![1; 600_000]);
    assert!(env.len() <= crate::relay::MAX_ENVELOPE, "{}", env.len());
    w.deliver(id, &env);
    let (_, env) = w.send(&vec![1; MAX_BODY]);
    assert!(env.len() <= crate::relay::MAX_ENVELOPE, "{}", env.len());
}

#[test]
fn a_lapsed_device_is_left_out_of_a_directory_not_fatal_to_it() {
    let bob = TestNode::new(2, T0);
    let old = bob.sibling(9, T0.minus(400 * 24 * 3600));
    let entry = |n: &TestNode| DirectoryEntry {
        node_token: n.node_token.clone(),
        identity: n.identity.clone(),
    };
    let dir = Directory::verify(
        bob.cell_id(),
        &[entry(&old), entry(&bob)],
        T.timestamp(),
        &none(),
    )
    .unwrap();
    assert_eq!(dir.devices.len(), 1);
    assert_eq!(dir.devices[0].node(), bob.node_id());
}

/// SECURITY.md, "What a relay cannot see" and "Sizes": an acknowledgement is 74 + 16 × ids
/// bytes in epoch 1 and 32 more (the responder's ephemeral key) in epoch 0, and it is never
/// padded; a padded message's plaintext is a power of two of at least 256 bytes.
#[test]
fn acknowledgements_and_padded_messages_have_the_documented_sizes() {
    let mut w = world();
    w.alice.padding = Padding::PowerOfTwo;
    w.bob.padding = Padding::PowerOfTwo;
    let mut epochs = BTreeSet::new();
    let bob = w.bob_device.node();
    for round in 0..3 {
        let sent: Vec<_> = (0..=round).map(|n| w.send(&vec![1; 10 * n])).collect();
        for (id, env) in &sent {
            w.deliver(*id, env);
        }
        for reply in w.bob.poll_acks(&mut w.rng) {
            let epoch = u32::from_be_bytes(reply.envelope[34..38].try_into().unwrap());
            epochs.insert(epoch);
            let opened = w
                .alice
                .open(bob, reply.id, &reply.envelope, T, &none(), &mut w.rng)
                .unwrap();
            let Opened::Acked { ids, .. } = opened else {
                panic!("{opened:?}")
            };
            let ephemeral = if epoch == 0 { 32 } else { 0 };
            assert_eq!(reply.envelope.len(), 74 + 16 * ids.len() + ephemeral);
        }
    }
    assert_eq!(epochs, BTreeSet::from([0, 1]), "both epochs seen");
    // Epoch 1 now: a MSG is 54 bytes of header, times and tag around its plaintext.
    for len in [0, 1, 200, 300, 5000] {
        let (_, env) = w.send(&vec![2; len]);
        assert_eq!(env[1], MSG);
        let plain = env.len() - 54;
        assert!(
            plain.is_power_of_two() && plain >= 256,
            "{len}-byte body: {plain}-byte plaintext"
        );
    }
}

/// SECURITY.md, "What a relay can do": RESET is unauthenticated. Made from nothing but the
/// session id in a message's clear header, it ends the sender's session, and the next
/// message starts a new one in epoch 0; contents stay protected (it opens nothing).
#[test]
fn a_reset_forged_from_the_clear_header_alone_ends_the_session() {
    let mut w = world();
    let (id, env) = w.send(b"one");
    w.deliver(id, &env);
    w.acks_back();
    let (id2, env2) = w.send(b"epoch one");
    assert_eq!(env2[1], MSG);
    let mut forged = vec![E2E_VERSION, RESET];
    forged.extend_from_slice(&env2[2..18]);
    let bob = w.bob_device.node();
    let any_id = MsgId([0x42; 16]);
    assert!(matches!(
        w.alice
            .open(bob, any_id, &forged, T, &none(), &mut w.rng)
            .unwrap(),
        Opened::Reset { from } if from == bob
    ));
    let (_, env3) = w.send(b"again");
    assert_eq!(env3[1], INIT, "a new session, back in epoch 0");
    // Bob still opens the message sealed before the forgery.
    assert_eq!(w.deliver(id2, &env2).messages[0].body, &b"epoch one"[..]);
}

/// SECURITY.md, "What a relay can do": a relay that names the wrong sender in DELIVER makes
/// an INIT fail (`WrongSender`), a MSG look like an unknown session (answered with a RESET
/// to the device it named) and an acknowledgement be dropped: nothing is delivered or
/// acknowledged under the wrong name.
#[test]
fn a_sender_misnamed_by_the_relay_gets_nothing_through() {
    let mut w = world();
    let mallory = TestNode::new(3, T0).node_id();
    let (id, env) = w.send(b"first");
    assert_eq!(
        w.bob
            .open(mallory, id, &env, T, &none(), &mut w.rng)
            .unwrap_err(),
        OpenError::WrongSender
    );
    w.deliver(id, &env);
    let replies = w.bob.poll_acks(&mut w.rng);
    for reply in &replies {
        assert!(
            w.alice
                .open(mallory, reply.id, &reply.envelope, T, &none(), &mut w.rng)
                .is_err(),
            "an acknowledgement under another name is dropped"
        );
    }
    let bob = w.bob_device.node();
    for reply in replies {
        w.alice
            .open(bob, reply.id, &reply.envelope, T, &none(), &mut w.rng)
            .unwrap();
    }
    let (id2, env2) = w.send(b"epoch one");
    assert_eq!(env2[1], MSG);
    let reset = reset_of(w.bob.open(mallory, id2, &env2, T, &none(), &mut w.rng));
    assert_eq!(
        reset.to, mallory,
        "the RESET goes to the device the relay named"
    );
    assert_eq!(reset.envelope[1], RESET);
}

/// SECURITY.md, "Revocation": a recipient that knows a device's revocation refuses its INIT
/// (and keeps nothing of it); one that does not know it opens it.
#[test]
fn an_init_from_a_device_the_recipient_knows_revoked_is_refused() {
    let mut w = world();
    let (id, env) = w.send(b"from a revoked device");
    let mut revoked = Revocations::new();
    let token = crate::device::revocation(&w.a.cell, w.alice_node, T0, &mut w.rng).unwrap();
    revoked
        .insert(&token.verify(T.timestamp(), 60).unwrap())
        .unwrap();
    let refused = w.bob.open(w.alice_node, id, &env, T, &revoked, &mut w.rng);
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(w.bob.sessions().2, 0, "nothing kept");
    assert!(matches!(w.bob_opens(id, &env), Ok(Opened::Messages(_))));
}

/// SECURITY.md, "Forward secrecy": each side erases its ephemeral secret once it has
/// derived epoch 1, in memory and in the next saved form of the session.
#[test]
fn ephemeral_secrets_are_gone_from_memory_and_saved_forms_once_in_epoch_one() {
    let mut w = world();
    let bob = w.bob_device.node();
    let (id, env) = w.send(b"one");
    let alice_secret = w.alice.outbound[&bob]
        .ratchet
        .as_ref()
        .unwrap()
        .secret
        .dangerous_bytes();
    let got = w.deliver(id, &env);
    let key = (w.alice_node, got.ack.session);
    // The INIT carries Alice's ephemeral key: Bob derives epoch 1 as he opens it and keeps
    // no ephemeral secret beyond that (his public key goes out with his replies).
    assert!(w.bob.inbound[&key].ratchet.is_none());
    w.acks_back();
    let (id2, env2) = w.send(b"two");
    assert_eq!(env2[1], MSG, "epoch 1");
    w.deliver(id2, &env2);
    assert!(w.alice.outbound[&bob].ratchet.is_none());
    let saved_alice = w.alice.outbound[&bob].save();
    let holds = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|x| x == needle);
    assert!(!holds(&saved_alice, &alice_secret[..]));
}
