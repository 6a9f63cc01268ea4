//! Two connections on an in-memory link and a virtual clock: the handshake, join, session and
//! timers, with frames dropped, replayed, reordered and tampered with.

use std::collections::BTreeSet;
use std::sync::Arc;

use cellmesh_core::connection::{Authorization, Check, Connection, Event, Refusal};
use cellmesh_core::device::{self, Revocations};
use cellmesh_core::handshake::{HandshakeError, PeerChecks, authenticate_peer};
use cellmesh_core::keys::SigningSecret;
use cellmesh_core::peers::PeerTable;
use cellmesh_core::testing::{Pair, START, Side, TestNode};
use cellmesh_core::token::{Name, RealmAnchor, Token, TokenKind};
use cellmesh_core::wire::{CloseCode, NackCode};
use cellmesh_core::{Instant, Timestamp};

fn t0() -> Timestamp {
    START.timestamp()
}

fn nodes() -> (TestNode, TestNode) {
    (TestNode::new(1, t0()), TestNode::new(2, t0()))
}

fn joined(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Joined(_)))
}

fn closed(events: &[Event]) -> Option<(CloseCode, String)> {
    events.iter().find_map(|e| match e {
        Event::Closed { code, reason, .. } => Some((*code, reason.clone())),
        _ => None,
    })
}

#[test]
fn handshake_and_join_succeed_and_data_flows_both_ways() {
    let (a, b) = nodes();
    let mut p = Pair::new(a.config(), b.config(), 1);
    p.drive();
    assert!(joined(&p.a_events) && joined(&p.b_events));
    assert_eq!(p.a.peer().unwrap().cell(), b.cell_id());
    assert_eq!(p.a.peer().unwrap().node(), b.node_id());
    assert_eq!(p.b.peer().unwrap().cell(), a.cell_id());
    p.send(Side::A, b"hello b");
    p.send(Side::B, b"hello a");
    p.drive();
    assert_eq!(p.received(Side::B), vec![b"hello b".to_vec()]);
    assert_eq!(p.received(Side::A), vec![b"hello a".to_vec()]);
}

/// Runs a handshake in which frame `index` (0 hello, 1 response, 2 finish) has byte `at`
/// flipped; returns whether either side joined.
fn handshake_with_flip(index: usize, at: usize) -> (bool, usize) {
    let (a, b) = nodes();
    let mut p = Pair::new(a.config(), b.config(), 7);
    let mut seen = 0;
    let mut len = 0;
    p.drive_with(|_, mut f| {
        if seen == index {
            len = f.len();
            if at < f.len() {
                f[at] ^= 0x01;
            }
        }
        seen += 1;
        vec![f]
    });
    p.advance(10_000);
    (joined(&p.a_events) || joined(&p.b_events), len)
}

#[test]
fn flipping_any_byte_of_any_handshake_message_makes_it_fail() {
    for index in 0..3 {
        let (ok, len) = handshake_with_flip(index, usize::MAX);
        assert!(ok, "an unaltered handshake must succeed");
        assert!(len > 0);
        for at in 0..len {
            let (ok, _) = handshake_with_flip(index, at);
            assert!(
                !ok,
                "flip of byte {at} of handshake message {index} was accepted"
            );
        }
    }
}

#[test]
fn replayed_and_reordered_handshake_messages_fail() {
    let (a, b) = nodes();
    // Record a genuine handshake.
    let mut recorded = Vec::new();
    let mut p = Pair::new(a.config(), b.config(), 3);
    p.drive_with(|side, f| {
        recorded.push((side, f.clone()));
        vec![f]
    });
    assert!(joined(&p.b_events));
    let hello = recorded[0].1.clone();
    let response = recorded[1].1.clone();
    let finish = recorded[2].1.clone();

    // The recorded hello and finish replayed to a fresh responder: it answers, but the
    // finish belongs to another handshake and fails.
    let cfg = Arc::new(b.config());
    let mut rng = rand_chacha_rng();
    let mut responder = Connection::accept(Arc::clone(&cfg), START);
    responder.handle_input(&hello, START, &mut rng);
    assert!(responder.poll_transmit().is_some());
    responder.handle_input(&finish, START, &mut rng);
    let events: Vec<_> = std::iter::from_fn(|| responder.poll_event()).collect();
    assert!(!joined(&events));
    assert!(responder.is_closed());

    // A recorded response replayed to a new initiator fails.
    let mut initiator = Connection::connect(Arc::new(a.config()), START, &mut rng);
    initiator.handle_input(&response, START, &mut rng);
    let events: Vec<_> = std::iter::from_fn(|| initiator.poll_event()).collect();
    assert!(!joined(&events) && initiator.is_closed());

    // Reordered: finish before hello.
    let mut responder = Connection::accept(cfg, START);
    responder.handle_input(&finish, START, &mut rng);
    assert!(responder.is_closed());
}

fn rand_chacha_rng() -> impl rand_core::CryptoRngCore {
    use rand_core::SeedableRng as _;
    rand_chacha::ChaCha20Rng::seed_from_u64(99)
}

fn refused_handshake(
    a: &TestNode,
    b_config: cellmesh_core::connection::ConnectionConfig,
) -> String {
    let mut p = Pair::new(a.config(), b_config, 5);
    p.drive();
    assert!(!joined(&p.a_events) && !joined(&p.b_events));
    assert!(p.b.is_closed());
    closed(&p.b_events).expect("the responder closed").1
}

#[test]
fn expired_not_yet_valid_and_revoked_tokens_fail() {
    let b = TestNode::new(2, t0());
    let expired = TestNode::new(1, Timestamp(t0().0 - 2 * 24 * 3600));
    assert!(refused_handshake(&expired, b.config()).contains("expired"));
    let early = TestNode::new(1, Timestamp(t0().0 + 3600));
    assert!(refused_handshake(&early, b.config()).contains("not valid before"));

    let a = TestNode::new(1, t0());
    let mut rng = rand_chacha_rng();
    let revocation = device::revocation(&a.cell, a.node_id(), t0(), &mut rng).unwrap();
    let mut config = b.config();
    config
        .revocations
        .insert(&revocation.verify(t0(), 0).unwrap())
        .unwrap();
    assert!(refused_handshake(&a, config).contains("revoked"));

    // A realm's issuer revoking the whole cell also counts for a node in that realm.
    let realm_key = SigningSecret::from_seed(&[0x77; 32]);
    let realm_rev = device::realm_revocation(&realm_key, a.cell_id(), t0(), &mut rng).unwrap();
    let mut config = b.config();
    config.realm = Some(RealmAnchor {
        name: Name::new("acme").unwrap(),
        issuer: realm_key.public(),
    });
    config
        .revocations
        .insert(&realm_rev.verify(t0(), 0).unwrap())
        .unwrap();
    assert!(refused_handshake(&a, config).contains("revoked"));
}

#[test]
fn a_token_naming_another_key_than_the_exchanged_one_fails() {
    let (a, b) = nodes();
    let none = Revocations::new();
    let checks = PeerChecks {
        now: t0(),
        skew: 60,
        revocations: &none,
        realm_issuer: None,
    };
    // A's token presented with B's static key (as a thief of A's token would have to).
    let stolen = a.node_token.to_bytes();
    assert_eq!(
        authenticate_peer(&stolen, *b.node.agreement.public().as_bytes(), &checks),
        Err(HandshakeError::KeyMismatch)
    );
    assert!(authenticate_peer(&stolen, *a.node.agreement.public().as_bytes(), &checks).is_ok());
    // An identity token is not a node token.
    let identity = a.identity.to_bytes();
    assert_eq!(
        authenticate_peer(&identity, *a.node.agreement.public().as_bytes(), &checks),
        Err(HandshakeError::NotANodeToken)
    );
}

#[test]
fn an_unauthorized_join_gets_a_nack_and_leaves_nothing() {
    let (a, b) = nodes();
    let mut config = b.config();
    config.policy.authorize = Authorization::AllowCells(BTreeSet::from([b.cell_id()]));
    let mut p = Pair::new(a.config(), config, 11);
    p.drive();
    let refused = p.a_events.iter().find_map(|e| match e {
        Event::JoinRefused {
            code,
            by_peer: true,
            ..
        } => Some(*code),
        _ => None,
    });
    assert_eq!(refused, Some(NackCode::Unauthorized));
    assert!(p.b_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused {
            code: NackCode::Unauthorized,
            by_peer: false,
            ..
        }
    )));
    assert!(p.a.is_closed() && p.b.is_closed());
    assert!(p.b.peer().is_none());
    // A peer table fed with B's events holds nobody.
    let mut table = PeerTable::new();
    for e in &p.b_events {
        if let Event::Joined(binding) = e {
            table.joined(0u32, (**binding).clone());
        }
    }
    assert!(table.is_empty());
}

#[test]
fn authenticate_callback_can_refuse_and_allow_list_can_admit() {
    let (a, b) = nodes();
    let mut config = b.config();
    let deny: Check = Arc::new(|_| Err(Refusal::new(NackCode::Unauthenticated, "not today")));
    config.policy.authenticate = Some(deny);
    let mut p = Pair::new(a.config(), config, 12);
    p.drive();
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused { code: NackCode::Unauthenticated, reason, .. } if reason == "not today"
    )));

    let mut config = b.config();
    config.policy.authorize = Authorization::AllowCells(BTreeSet::from([a.cell_id()]));
    let mut p = Pair::new(a.config(), config, 13);
    p.drive();
    assert!(joined(&p.b_events));
}

#[test]
fn a_realm_node_accepts_only_co_signed_identities() {
    let (a, b) = nodes();
    let realm_key = SigningSecret::from_seed(&[0x55; 32]);
    let anchor = RealmAnchor {
        name: Name::new("acme").unwrap(),
        issuer: realm_key.public(),
    };
    let mut config = b.config();
    config.realm = Some(anchor.clone());
    let mut p = Pair::new(a.config(), config, 21);
    p.drive();
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused {
            code: NackCode::NotInRealm,
            ..
        }
    )));

    // The realm's issuer co-signs an identity token of A's cell in the realm.
    let mut claims = a.identity.claims().clone();
    claims.realm = Some(anchor.name.clone());
    let mut member: Token = claims.sign(a.cell.signing()).unwrap();
    member.co_sign(&realm_key).unwrap();
    let mut a_config = a.config();
    a_config.identity = member;
    let mut config = b.config();
    config.realm = Some(anchor);
    let mut p = Pair::new(a_config, config, 22);
    p.drive();
    assert!(joined(&p.b_events) && joined(&p.a_events));
}

fn joined_pair(seed: u64) -> Pair {
    let (a, b) = nodes();
    let mut p = Pair::new(a.config(), b.config(), seed);
    p.drive();
    assert!(p.a.is_joined() && p.b.is_joined());
    p
}

#[test]
fn replayed_reordered_and_tampered_session_frames_are_never_delivered() {
    // Replay: every frame is sent twice.
    let mut p = joined_pair(31);
    for m in [&b"one"[..], b"two", b"three"] {
        p.send(Side::A, m);
    }
    p.drive_with(|_, f| vec![f.clone(), f]);
    assert_eq!(
        p.received(Side::B),
        vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
    );

    // Reorder: the first two frames swapped; the later one is refused, the earlier delivered.
    let mut p = joined_pair(32);
    p.send(Side::A, b"first");
    p.send(Side::A, b"second");
    let frames = p.transmit(Side::A);
    p.deliver(Side::B, &frames[1]);
    p.deliver(Side::B, &frames[0]);
    assert_eq!(p.received(Side::B), vec![b"first".to_vec()]);

    // Tamper: any flipped byte in the ciphertext or header.
    let mut p = joined_pair(33);
    p.send(Side::A, b"secret");
    let frame = p.transmit(Side::A).remove(0);
    for at in 5..frame.len() {
        let mut bad = frame.clone();
        bad[at] ^= 0x80;
        let mut q = joined_pair(33);
        q.send(Side::A, b"secret");
        let _ = q.transmit(Side::A);
        q.deliver(Side::B, &bad);
        assert!(
            q.received(Side::B).is_empty(),
            "tampered byte {at} delivered"
        );
    }

    // A peer that keeps sending bad frames is dropped.
    let mut p = joined_pair(34);
    for _ in 0..4 {
        p.send(Side::A, b"x");
    }
    let frames = p.transmit(Side::A);
    for f in &frames {
        let mut bad = f.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        p.deliver(Side::B, &bad);
    }
    assert_eq!(closed(&p.b_events).map(|c| c.0), Some(CloseCode::BadFrames));
}

#[test]
fn rekeying_keeps_the_session_alive() {
    let (a, b) = nodes();
    let (mut ca, mut cb) = (a.config(), b.config());
    ca.session.rekey_after_frames = 3;
    cb.session.rekey_after_frames = 3;
    ca.session.rekey_after_ms = 5_000;
    let mut p = Pair::new(ca, cb, 41);
    p.drive();
    let mut sent = Vec::new();
    for i in 0..25u32 {
        let m = i.to_be_bytes().to_vec();
        p.send(Side::A, &m);
        p.send(Side::B, &m);
        sent.push(m);
        if i % 5 == 0 {
            p.advance(6_000);
        }
        p.drive();
    }
    assert_eq!(p.received(Side::B), sent);
    assert_eq!(p.received(Side::A), sent);
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn keepalives_hold_a_quiet_session_and_silence_closes_it() {
    let mut p = joined_pair(51);
    for _ in 0..10 {
        p.advance(15_000);
    }
    assert!(
        p.a.is_joined() && p.b.is_joined(),
        "keepalives keep it up for 150 s"
    );
    // Now B goes silent: everything it sends is lost.
    for _ in 0..5 {
        p.now = p.now.plus_millis(15_000);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        let _ = p.transmit(Side::B);
        let frames = p.transmit(Side::A);
        for f in frames {
            p.deliver(Side::B, &f);
        }
        p.a_events.extend(std::iter::from_fn(|| p.a.poll_event()));
    }
    assert_eq!(closed(&p.a_events).map(|c| c.0), Some(CloseCode::Idle));
}

#[test]
fn a_silent_peer_is_dropped_at_the_setup_deadline() {
    let (a, b) = nodes();
    let mut p = Pair::new(a.config(), b.config(), 61);
    let _ = p.transmit(Side::A); // the hello is lost
    p.now = p.now.plus_millis(9_999);
    p.a.handle_timeout(p.now);
    assert!(!p.a.is_closed());
    assert_eq!(p.a.poll_timeout(), Some(Instant(START.0 + 10_000)));
    p.now = p.now.plus_millis(1);
    p.a.handle_timeout(p.now);
    assert!(p.a.is_closed());
}

#[test]
fn existing_peers_get_an_update_about_a_new_node() {
    // Hub H; B joins, then C joins; H's table says to tell B about C.
    let hub = TestNode::new(1, t0());
    let b = TestNode::new(2, t0());
    let c = TestNode::new(3, t0());
    let mut hb = Pair::new(b.config(), hub.config(), 71);
    hb.drive();
    let mut hc = Pair::new(c.config(), hub.config(), 72);
    hc.drive();
    let mut table = PeerTable::new();
    for (conn, events) in [(Side::A, &hb.b_events), (Side::B, &hc.b_events)] {
        for e in events {
            if let Event::Joined(binding) = e {
                let result = table.joined(conn, (**binding).clone());
                if conn == Side::B {
                    assert_eq!(result.notify, vec![Side::A]);
                }
            }
        }
    }
    assert_eq!(table.len(), 2);
    let about_c = table.get(&c.node_id()).unwrap().binding.clone();
    hb.b.send_update(&about_c, hb.now).unwrap();
    hb.drive();
    let learned = hb.a_events.iter().find_map(|e| match e {
        Event::Update(binding) => Some((**binding).clone()),
        _ => None,
    });
    let learned = learned.expect("B learned of C");
    assert_eq!(learned.node(), c.node_id());
    assert_eq!(learned.cell(), c.cell_id());
    assert_eq!(learned.node_token().claims().kind, TokenKind::Node);
}

fn realm_member(node: &TestNode, anchor: &RealmAnchor, issuer: &SigningSecret) -> Token {
    let mut claims = node.identity.claims().clone();
    claims.realm = Some(anchor.name.clone());
    let mut member = claims.sign(node.cell.signing()).unwrap();
    member.co_sign(issuer).unwrap();
    member
}

#[test]
fn a_realm_node_refuses_outsiders_as_responders_and_in_updates() {
    let (a, b) = nodes();
    let outsider = TestNode::new(3, t0());
    let realm_key = SigningSecret::from_seed(&[0x56; 32]);
    let anchor = RealmAnchor {
        name: Name::new("acme").unwrap(),
        issuer: realm_key.public(),
    };
    let in_realm = |n: &TestNode| {
        let mut c = n.config();
        c.identity = realm_member(n, &anchor, &realm_key);
        c.realm = Some(anchor.clone());
        c
    };

    // A realm node dialing an outsider does not accept its ACK.
    let mut p = Pair::new(in_realm(&a), outsider.config(), 81);
    p.drive();
    assert!(!joined(&p.a_events));
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused { code: NackCode::NotInRealm, by_peer: false, reason, .. }
            if reason.contains("not in realm acme")
    )));
    assert!(p.a.is_closed());

    // Two members join; an UPDATE about the outsider is ignored, one about a member is not.
    let mut p = Pair::new(in_realm(&a), in_realm(&b), 82);
    p.drive();
    assert!(joined(&p.a_events) && joined(&p.b_events));
    let verified = |t: &Token| t.verify(t0(), 60).unwrap();
    let none = Revocations::new();
    let about_outsider = device::bind(
        &verified(&outsider.node_token),
        &verified(&outsider.identity),
        &none,
    )
    .unwrap();
    p.b.send_update(&about_outsider, p.now).unwrap();
    let member = TestNode::new(4, t0());
    let member_identity = realm_member(&member, &anchor, &realm_key);
    let about_member = device::bind(
        &verified(&member.node_token),
        &verified(&member_identity),
        &none,
    )
    .unwrap();
    p.b.send_update(&about_member, p.now).unwrap();
    p.drive();
    let learned: Vec<_> = p
        .a_events
        .iter()
        .filter_map(|e| match e {
            Event::Update(b) => Some(b.node()),
            _ => None,
        })
        .collect();
    assert_eq!(learned, vec![member.node_id()]);
}

#[test]
fn an_unexpected_frame_is_refused_from_its_header_without_buffering_it() {
    let b = TestNode::new(2, t0());
    let mut rng = rand_chacha_rng();
    let mut responder = Connection::accept(Arc::new(b.config()), START);
    // The header of a 1 MiB session frame, before any handshake: refused at once.
    let mut header = Vec::new();
    cellmesh_core::wire::put_frame_header(
        &mut header,
        cellmesh_core::wire::FrameType::Session,
        cellmesh_core::wire::MAX_PAYLOAD,
    );
    responder.handle_input(&header, START, &mut rng);
    assert!(responder.is_closed());
}

#[test]
fn an_allow_list_also_applies_to_the_nodes_we_dial() {
    let (a, b) = nodes();
    let mut config = a.config();
    config.policy.authorize = Authorization::AllowCells(BTreeSet::from([a.cell_id()]));
    let mut p = Pair::new(config, b.config(), 91);
    p.drive();
    assert!(!joined(&p.a_events));
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused {
            code: NackCode::Unauthorized,
            by_peer: false,
            ..
        }
    )));
    assert!(p.a.is_closed());
}

#[test]
fn a_replayed_update_is_reported_once_and_a_flood_closes_the_link() {
    let hub = TestNode::new(1, t0());
    let b = TestNode::new(2, t0());
    let c = TestNode::new(3, t0());
    let mut p = Pair::new(b.config(), hub.config(), 92);
    p.drive();
    let verified = |t: &Token| t.verify(t0(), 60).unwrap();
    let about_c = device::bind(
        &verified(&c.node_token),
        &verified(&c.identity),
        &Revocations::new(),
    )
    .unwrap();
    for _ in 0..3 {
        p.b.send_update(&about_c, p.now).unwrap();
    }
    p.drive();
    let updates = p
        .a_events
        .iter()
        .filter(|e| matches!(e, Event::Update(_)))
        .count();
    assert_eq!(updates, 1);
    // 300 UPDATEs at once exceed the budget of 256.
    for _ in 0..300 {
        p.b.send_update(&about_c, p.now).unwrap();
    }
    p.drive();
    let (code, reason) = closed(&p.a_events).expect("flood closes the link");
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::ProtocolViolation, "UPDATE flood")
    );
}

#[test]
fn a_pinned_initiator_refuses_another_responder_before_revealing_itself() {
    let (a, b) = nodes();
    let meant = TestNode::new(9, t0());
    let mut p = Pair::new(a.config(), b.config(), 95);
    // Replace the initiator with one that dials for `meant`, not for B.
    p.a = Connection::connect_to(
        Arc::new(a.config()),
        Some(meant.node_id()),
        START,
        &mut p.rng,
    );
    let mut finish_sent = false;
    p.drive_with(|side, f| {
        if side == Side::A && f.get(4) == Some(&3) {
            finish_sent = true;
        }
        vec![f]
    });
    assert!(
        !finish_sent,
        "the initiator's token (in finish) must not be sent"
    );
    let (_, reason) = closed(&p.a_events).expect("A gave up");
    assert!(reason.contains("expected node"), "{reason}");
    assert!(
        !p.b_events
            .iter()
            .any(|e| matches!(e, Event::Handshaked { .. }))
    );

    // Pinned to the right node, it joins.
    let mut p = Pair::new(a.config(), b.config(), 96);
    p.a = Connection::connect_to(Arc::new(a.config()), Some(b.node_id()), START, &mut p.rng);
    p.drive();
    assert!(joined(&p.a_events) && joined(&p.b_events));
}

#[test]
fn a_node_that_takes_no_updates_ignores_them_however_many() {
    let hub = TestNode::new(1, t0());
    let b = TestNode::new(2, t0());
    let c = TestNode::new(3, t0());
    let mut device = b.config();
    device.accept_updates = false;
    let mut p = Pair::new(device, hub.config(), 93);
    p.drive();
    let verified = |t: &Token| t.verify(t0(), 60).unwrap();
    let about_c = device::bind(
        &verified(&c.node_token),
        &verified(&c.identity),
        &Revocations::new(),
    )
    .unwrap();
    // More than a flood's worth: nothing reported, and the link stays up.
    for _ in 0..300 {
        p.b.send_update(&about_c, p.now).unwrap();
    }
    p.drive();
    assert!(!p.a_events.iter().any(|e| matches!(e, Event::Update(_))));
    assert!(closed(&p.a_events).is_none() && !p.a.is_closed());
    p.send(Side::B, b"still here");
    p.drive();
    assert_eq!(p.received(Side::A), vec![b"still here".to_vec()]);
}

#[test]
fn a_connection_admission_refuses_a_join_after_the_policy_and_only_for_joiners() {
    let (a, b) = nodes();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let check = |asked: &Arc<std::sync::atomic::AtomicUsize>| -> Check {
        let asked = Arc::clone(asked);
        Arc::new(move |_| {
            asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(Refusal::new(NackCode::Busy, "at capacity"))
        })
    };
    let mut p = Pair::new(a.config(), b.config(), 14);
    p.b.set_admission(check(&asked));
    p.drive();
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused { code: NackCode::Busy, reason, by_peer: true, .. } if reason == "at capacity"
    )));
    assert!(p.a.is_closed() && p.b.is_closed() && p.b.peer().is_none());
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A policy refusal comes first: the admission is not asked.
    let mut config = b.config();
    config.policy.authorize = Authorization::AllowCells(BTreeSet::from([b.cell_id()]));
    let mut p = Pair::new(a.config(), config, 15);
    p.b.set_admission(check(&asked));
    p.drive();
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::JoinRefused {
            code: NackCode::Unauthorized,
            ..
        }
    )));
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);

    // An initiator's admission is not asked about its responder's ACK.
    let mut p = Pair::new(a.config(), b.config(), 16);
    p.a.set_admission(check(&asked));
    p.drive();
    assert!(joined(&p.a_events) && joined(&p.b_events));
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 1);
}
