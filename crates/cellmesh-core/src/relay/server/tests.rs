//! The relay server on virtual time over the in-memory store.

use bytes::Bytes;

use super::*;
use crate::relay::harness::RelayHarness as Bench;
use crate::testing::{START, TestNode};

fn devices() -> (TestNode, TestNode) {
    let now = START.timestamp();
    (TestNode::new(1, now), TestNode::new(2, now))
}

fn delivered(rs: &[Record]) -> Vec<MsgId> {
    rs.iter()
        .filter_map(|r| match r {
            Record::Deliver { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn answers(rs: &[Record]) -> Vec<(MsgId, Result<Accepted, RefuseCode>)> {
    rs.iter()
        .filter_map(|r| match r {
            Record::Accepted { id, status, .. } => Some((*id, Ok(*status))),
            Record::Refused { id, code, .. } => Some((*id, Err(*code))),
            _ => None,
        })
        .collect()
}

#[test]
fn a_forward_to_a_receiving_device_is_pushed_and_answered_pushed() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    r.forward(&a, &b, 1);
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Ok(Accepted::Pushed))]
    );
    assert_eq!(r.server.stats().pushed, 1);
}

#[test]
fn queued_is_answered_only_once_the_store_has_committed() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    r.hold = true;
    r.forward(&a, &b, 1);
    assert!(
        answers(&r.take(&a)).is_empty(),
        "no answer before the commit"
    );
    assert!(matches!(r.held.last(), Some((_, StoreOp::Enqueue { .. }))));
    r.commit();
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Ok(Accepted::Queued))]
    );
}

#[test]
fn a_store_that_fails_refuses_as_unavailable_and_queues_nothing() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    r.store.failing = true;
    r.forward(&a, &b, 1);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Err(RefuseCode::Unavailable))]
    );
    assert!(
        r.events
            .iter()
            .any(|e| matches!(e, ServerEvent::StoreFailed { .. }))
    );
}

#[test]
fn a_forward_to_a_device_never_seen_is_refused() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.forward(&a, &b, 1);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Err(RefuseCode::UnknownDevice))]
    );
}

#[test]
fn a_device_that_comes_back_is_drained_after_receive_and_its_delivered_empties_the_queue() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    for id in 1..=3 {
        r.forward(&a, &b, id);
    }
    assert_eq!(r.store.queued(b.node_id()), 3);
    r.join(&b);
    assert!(delivered(&r.take(&b)).is_empty(), "nothing before RECEIVE");
    r.send(&b, &[Record::Receive]);
    let ids = delivered(&r.take(&b));
    assert_eq!(ids.len(), 3);
    r.send(&b, &[Record::Delivered(ids)]);
    assert_eq!(r.store.queued(b.node_id()), 0);
    // Asked again after the removal, the queue is empty: nothing is handed twice.
    assert!(delivered(&r.take(&b)).is_empty());
}

#[test]
fn what_was_pushed_and_not_acknowledged_survives_a_departure_and_a_restart() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    r.forward(&a, &b, 1);
    assert_eq!(delivered(&r.take(&b)).len(), 1);
    r.leave(&b);
    assert_eq!(r.store.queued(b.node_id()), 1);
    let mut r = r.restart();
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
}

#[test]
fn a_link_that_takes_no_messages_gets_only_answers() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.forward(&a, &b, 1);
    assert!(delivered(&r.take(&b)).is_empty());
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Ok(Accepted::Queued))]
    );
    let reply = Bytes::from(vec![crate::e2e::E2E_VERSION, 0x04, 9, 9]);
    r.send(
        &a,
        &[Record::Forward {
            to: b.node_id(),
            id: MsgId([2; 16]),
            envelope: reply,
        }],
    );
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([2; 16])]);
}

#[test]
fn a_device_that_does_not_read_is_disconnected_and_what_it_sends_after_is_ignored() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    r.links.waiting.insert(a.node_id(), 4 << 20);
    r.forward(&a, &b, 1);
    assert_eq!(
        r.disconnected,
        vec![(a.node_id(), "does not read what it is sent")]
    );
    r.take(&b);
    r.forward(&a, &b, 2);
    assert!(delivered(&r.take(&b)).is_empty());
}

#[test]
fn a_malformed_record_disconnects_its_device() {
    let (a, _) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.server.records(
        r.now,
        [(
            a.node_id(),
            a.cell_id(),
            Bytes::from_static(&[0, 0, 0, 1, 0x99]),
        )],
        &r.links,
    );
    r.run();
    assert_eq!(
        r.disconnected,
        vec![(a.node_id(), "malformed relay record")]
    );
}

#[test]
fn lookups_over_their_rate_wait_for_their_turn_and_are_answered_from_the_store() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    let lookup = |n| Record::Lookup {
        request: n,
        cell: b.cell_id(),
    };
    r.send(&a, &[lookup(1), lookup(2), lookup(3)]);
    let first: Vec<u32> = r
        .take(&a)
        .iter()
        .filter_map(|x| match x {
            Record::Directory {
                request, devices, ..
            } => {
                assert_eq!(devices.len(), 1);
                assert_eq!(devices[0].node_token, b.node_token);
                Some(*request)
            }
            _ => None,
        })
        .collect();
    assert_eq!(first, vec![1, 2]);
    assert!(r.server.poll_timeout() <= r.now.plus_millis(RETRY_MS));
    r.advance(600);
    assert!(matches!(
        &r.take(&a)[..],
        [Record::Directory { request: 3, .. }]
    ));
}

#[test]
fn an_envelope_over_the_device_s_memory_bound_goes_to_the_store() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    let big = Bytes::from(vec![crate::e2e::E2E_VERSION; 600 << 10]);
    for id in 1..=2u8 {
        r.send(
            &a,
            &[Record::Forward {
                to: b.node_id(),
                id: MsgId([id; 16]),
                envelope: big.clone(),
            }],
        );
    }
    assert_eq!(
        answers(&r.take(&a)),
        vec![
            (MsgId([1; 16]), Ok(Accepted::Pushed)),
            (MsgId([2; 16]), Ok(Accepted::Queued))
        ]
    );
    assert_eq!(r.store.queued(b.node_id()), 1);
}

#[test]
fn the_same_inputs_give_the_same_actions() {
    let trace = || {
        let (a, b) = devices();
        let mut r = Bench::new();
        r.join(&a);
        r.join(&b);
        r.leave(&b);
        for id in 0..20 {
            r.forward(&a, &b, id);
        }
        r.join(&b);
        r.send(&b, &[Record::Receive]);
        format!("{:?} {:?}", r.sent.values().collect::<Vec<_>>(), r.events)
    };
    assert_eq!(trace(), trace());
}

// ---------------------------------------------------------------------------------------------
// Revocations (issue 10, finding 10)
// ---------------------------------------------------------------------------------------------

fn revoked(rs: &[Record]) -> Vec<(u32, Result<(), RefuseCode>)> {
    rs.iter()
        .filter_map(|r| match r {
            Record::Revoked { request, result } => Some((*request, *result)),
            _ => None,
        })
        .collect()
}

fn revoke(by: &TestNode, node: NodeId) -> Token {
    let mut rng = <rand_chacha::ChaCha20Rng as rand_core::SeedableRng>::from_seed([9; 32]);
    crate::device::revocation(&by.cell, node, START.timestamp(), &mut rng).unwrap()
}

#[test]
fn a_revocation_is_kept_the_device_dropped_refused_and_listed_no_more() {
    let (a, b) = devices();
    let phone = a.sibling(3, START.timestamp());
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.join(&phone);
    r.send(&phone, &[Record::Receive]);
    // Queued for the phone while it is away, then it is back and online.
    r.leave(&phone);
    r.forward(&b, &phone, 1);
    assert_eq!(r.store.queued(phone.node_id()), 1);
    r.join(&phone);
    r.take(&b);
    let token = revoke(&a, phone.node_id());
    r.hold = true;
    r.send(
        &a,
        &[Record::Revoke {
            request: 5,
            revocation: Box::new(token.clone()),
        }],
    );
    assert!(
        revoked(&r.take(&a)).is_empty(),
        "no answer before the store has it"
    );
    r.commit();
    assert_eq!(revoked(&r.take(&a)), vec![(5, Ok(()))]);
    assert_eq!(
        r.disconnected,
        vec![(phone.node_id(), "revoked by its cell")]
    );
    assert!(r.events.iter().any(|e| matches!(
        e,
        ServerEvent::Revoked { node, messages: 1, .. } if *node == phone.node_id()
    )));
    assert_eq!(r.store.queued(phone.node_id()), 0);
    // Refused from now on, forwarded to no more, listed no more, its revocation handed out.
    assert_eq!(
        r.server.check_join(r.now, phone.cell_id(), phone.node_id()),
        Err(crate::limits::RegistrationRefused::Revoked)
    );
    r.forward(&b, &phone, 2);
    assert_eq!(
        answers(&r.take(&b)),
        vec![(MsgId([2; 16]), Err(RefuseCode::UnknownDevice))]
    );
    r.send(
        &b,
        &[Record::Lookup {
            request: 1,
            cell: a.cell_id(),
        }],
    );
    let dir = r.take(&b);
    let Some(Record::Directory {
        devices,
        revocations,
        ..
    }) = dir.iter().find(|r| matches!(r, Record::Directory { .. }))
    else {
        panic!("no directory: {dir:?}")
    };
    assert_eq!(devices.len(), 1);
    assert_eq!(revocations, &vec![token.clone()]);
    // Offered again: known, answered at once. And after a restart the relay still knows.
    r.send(
        &a,
        &[Record::Revoke {
            request: 6,
            revocation: Box::new(token),
        }],
    );
    assert_eq!(revoked(&r.take(&a)), vec![(6, Ok(()))]);
    let mut r = r.restart();
    assert_eq!(
        r.server.check_join(r.now, phone.cell_id(), phone.node_id()),
        Err(crate::limits::RegistrationRefused::Revoked)
    );
    assert!(r.server.is_revoked(phone.cell_id(), phone.node_id()));
}

#[test]
fn refused_revocations_are_answered_with_their_code_and_a_failed_store_keeps_none() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    // A cell revoking another cell's device: not_allowed. Not a revocation at all: invalid.
    r.send(
        &a,
        &[
            Record::Revoke {
                request: 1,
                revocation: Box::new(revoke(&a, b.node_id())),
            },
            Record::Revoke {
                request: 2,
                revocation: Box::new(a.identity.clone()),
            },
        ],
    );
    assert_eq!(
        revoked(&r.take(&a)),
        vec![
            (1, Err(RefuseCode::NotAllowed)),
            (2, Err(RefuseCode::Invalid))
        ]
    );
    // The store fails: unavailable, and nothing is kept (it may be sent again).
    let other = a.sibling(4, START.timestamp());
    r.store.failing = true;
    r.send(
        &a,
        &[Record::Revoke {
            request: 3,
            revocation: Box::new(revoke(&a, other.node_id())),
        }],
    );
    assert_eq!(
        revoked(&r.take(&a)),
        vec![(3, Err(RefuseCode::Unavailable))]
    );
    assert!(!r.server.is_revoked(a.cell_id(), other.node_id()));
    assert!(r.disconnected.is_empty());
}

#[test]
fn a_device_that_revokes_itself_hears_the_answer_and_is_not_cut_off_before() {
    let (a, _) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.send(
        &a,
        &[Record::Revoke {
            request: 1,
            revocation: Box::new(revoke(&a, a.node_id())),
        }],
    );
    assert_eq!(revoked(&r.take(&a)), vec![(1, Ok(()))]);
    assert!(r.disconnected.is_empty());
    assert_eq!(
        r.server.check_join(r.now, a.cell_id(), a.node_id()),
        Err(crate::limits::RegistrationRefused::Revoked)
    );
}

// ---------------------------------------------------------------------------------------------
// Review: unexpected orders and a failing store
// ---------------------------------------------------------------------------------------------

fn join_unchecked(r: &mut Bench, d: &TestNode) {
    r.server.joined(
        r.now,
        d.cell_id(),
        d.node_id(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 4000)),
        d.node_token.to_bytes(),
        d.identity.to_bytes(),
    );
    r.run();
}

#[test]
fn a_device_let_in_before_its_revocation_was_kept_is_cut_off_when_its_join_arrives() {
    let (a, b) = devices();
    let phone = a.sibling(3, START.timestamp());
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.join(&phone);
    r.leave(&phone);
    // The phone's join passes its check on the node's task...
    r.server
        .check_join(r.now, phone.cell_id(), phone.node_id())
        .expect("not revoked yet");
    // ...and before the relay's loop hears that it joined, its cell's REVOKE is kept.
    r.send(
        &a,
        &[Record::Revoke {
            request: 1,
            revocation: Box::new(revoke(&a, phone.node_id())),
        }],
    );
    assert_eq!(revoked(&r.take(&a)), vec![(1, Ok(()))]);
    join_unchecked(&mut r, &phone);
    assert!(
        r.disconnected.iter().any(|(n, _)| *n == phone.node_id()),
        "a revoked device that joined is cut off: {:?}",
        r.disconnected
    );
    // Nothing is pushed to it, and it is not put back in the directory.
    r.send(&phone, &[Record::Receive]);
    r.take(&b);
    r.forward(&b, &phone, 1);
    assert!(delivered(&r.take(&phone)).is_empty());
    assert_eq!(
        answers(&r.take(&b)),
        vec![(MsgId([1; 16]), Err(RefuseCode::UnknownDevice))]
    );
    let cell = phone.cell_id();
    r.send(&b, &[Record::Lookup { request: 2, cell }]);
    let dir = r.take(&b);
    let Some(Record::Directory { devices, .. }) =
        dir.iter().find(|r| matches!(r, Record::Directory { .. }))
    else {
        panic!("no directory: {dir:?}")
    };
    assert_eq!(devices.len(), 1, "only a is listed");
}

#[test]
fn a_forward_to_a_device_whose_revocation_is_being_kept_is_not_queued_for_it() {
    let (a, b) = devices();
    let phone = a.sibling(3, START.timestamp());
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.join(&phone);
    r.leave(&phone);
    r.take(&b);
    r.hold = true;
    r.send(
        &a,
        &[Record::Revoke {
            request: 1,
            revocation: Box::new(revoke(&a, phone.node_id())),
        }],
    );
    // The store has not kept the revocation yet when b sends to the phone.
    r.forward(&b, &phone, 1);
    r.commit();
    assert_eq!(revoked(&r.take(&a)), vec![(1, Ok(()))]);
    assert_eq!(
        answers(&r.take(&b)),
        vec![(MsgId([1; 16]), Err(RefuseCode::UnknownDevice))],
        "b is not told `queued` for a device that is revoked"
    );
    assert_eq!(r.store.queued(phone.node_id()), 0);
}

#[test]
fn a_failed_removal_does_not_stop_what_follows_in_the_queue_from_being_drained() {
    let (a, b) = devices();
    // Each read of the queue takes one envelope (a quarter of the outlet).
    let config = ServerConfig {
        outlet_bytes: 4 * crate::relay::harness::message(0).len(),
        ..crate::relay::harness::config()
    };
    let mut r = Bench::over(
        crate::relay::mem_store::MemStore::new(Default::default()),
        config,
    );
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    r.forward(&a, &b, 1);
    r.forward(&a, &b, 2);
    assert_eq!(r.store.queued(b.node_id()), 2);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
    // The disk is full for the removal of what b took, then has room again.
    r.store.failing = true;
    r.send(&b, &[Record::Delivered(vec![MsgId([1; 16])])]);
    r.store.failing = false;
    let mut got = Vec::new();
    for _ in 0..20 {
        r.advance(RETRY_MS);
        let ids = delivered(&r.take(&b));
        if !ids.is_empty() {
            r.send(&b, &[Record::Delivered(ids.clone())]);
        }
        got.extend(ids);
    }
    assert!(
        got.contains(&MsgId([2; 16])),
        "message 2 reaches b while it stays online: {got:?}"
    );
    assert_eq!(r.store.queued(b.node_id()), 0);
}

fn reads(held: &[(OpId, StoreOp)]) -> usize {
    held.iter()
        .filter(|(_, op)| matches!(op, StoreOp::Pending { .. }))
        .count()
}

#[test]
fn a_store_that_fails_a_read_is_asked_again_after_a_pause_not_at_once() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    r.forward(&a, &b, 1);
    r.join(&b);
    r.hold = true;
    r.send(&b, &[Record::Receive]);
    assert_eq!(reads(&r.held), 1, "the drain reads the queue");
    // The read fails (disk error): no other is asked for at once, or a failing store is
    // asked again and again as fast as it can fail.
    for (id, _) in std::mem::take(&mut r.held) {
        r.server.store_done(
            r.now,
            id,
            StoreResult::Failed("input/output error".into()),
            &r.links,
        );
    }
    r.run();
    assert_eq!(reads(&r.held), 0, "not asked again at once");
    r.advance(RETRY_MS);
    assert_eq!(reads(&r.held), 1, "asked again after the pause");
    r.commit();
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
}

#[test]
fn envelopes_on_their_way_to_the_store_are_bounded_in_memory() {
    let (a, b) = devices();
    // Twice the largest envelope: a quarter of it is less than one, which always fits.
    let total = 2 * MAX_ENVELOPE;
    let config = ServerConfig {
        memory: crate::limits::ByteLimits {
            per_device: total,
            per_cell: total,
            total,
        },
        ..crate::relay::harness::config()
    };
    let mut r = Bench::over(
        crate::relay::mem_store::MemStore::new(Default::default()),
        config,
    );
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    // The disk is slow: nothing commits while a sends to the offline b as fast as it can.
    r.hold = true;
    let mut big = vec![crate::e2e::E2E_VERSION, 0x02];
    big.resize(16 << 10, 7);
    let big = Bytes::from(big);
    for i in 0..512u16 {
        let mut id = [0; 16];
        id[..2].copy_from_slice(&i.to_be_bytes());
        r.send(
            &a,
            &[Record::Forward {
                to: b.node_id(),
                id: MsgId(id),
                envelope: big.clone(),
            }],
        );
    }
    let held: usize = r
        .held
        .iter()
        .map(|(_, op)| match op {
            StoreOp::Enqueue { envelopes, .. } => {
                envelopes.iter().map(|e| e.envelope.len()).sum::<usize>()
            }
            _ => 0,
        })
        .sum();
    assert!(
        held <= total,
        "{held} bytes of envelopes wait for the store, over the relay's {total}"
    );
    let refused = answers(&r.take(&a))
        .into_iter()
        .filter(|(_, x)| matches!(x, Err(c) if c.is_transient()))
        .count();
    assert!(refused > 0, "the sender is told to retry later");
}

#[test]
fn a_delivered_for_another_device_s_ids_changes_nothing_for_it() {
    let (a, b) = devices();
    let c = b.sibling(4, START.timestamp());
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.join(&c);
    r.send(&c, &[Record::Receive]);
    r.forward(&a, &c, 1);
    assert_eq!(delivered(&r.take(&c)), vec![MsgId([1; 16])]);
    // Queued for c too, while it is away.
    r.leave(&c);
    r.forward(&a, &c, 2);
    assert_eq!(r.store.queued(c.node_id()), 2);
    let held = r.server.in_flight_bytes();
    // b (of the same cell, even) acknowledges c's ids: nothing of c's is dropped.
    r.send(
        &b,
        &[Record::Delivered(vec![MsgId([1; 16]), MsgId([2; 16])])],
    );
    assert_eq!(r.server.in_flight_bytes(), held);
    assert_eq!(r.store.queued(c.node_id()), 2);
    r.join(&c);
    r.send(&c, &[Record::Receive]);
    let mut ids = delivered(&r.take(&c));
    ids.sort();
    assert_eq!(ids, vec![MsgId([1; 16]), MsgId([2; 16])]);
}

/// The review's finding B: DELIVERED named ids only, and the relay deleted every queued
/// envelope with that id whatever its sender. A sender that can guess another's id (an
/// application may choose ids) queued its own under it first; the recipient's DELIVERED for
/// that copy then deleted the other sender's unseen. Now only what the relay handed goes.
#[test]
fn a_delivered_id_removes_only_the_copies_the_relay_handed_not_another_sender_s() {
    let t = START.timestamp();
    let (attacker, recipient) = devices();
    let victim = TestNode::new(3, t);
    let mut r = Bench::new();
    r.join(&attacker);
    r.join(&victim);
    r.join(&recipient);
    r.leave(&recipient);
    let id = MsgId([9; 16]);
    // The attacker's copy is big enough to be a drain's whole first chunk.
    let big = Bytes::from(vec![crate::e2e::E2E_VERSION; 300 << 10]);
    r.send(
        &attacker,
        &[Record::Forward {
            to: recipient.node_id(),
            id,
            envelope: big,
        }],
    );
    r.forward(&victim, &recipient, 9);
    assert_eq!(r.store.queued(recipient.node_id()), 2);
    r.join(&recipient);
    r.send(&recipient, &[Record::Receive]);
    let first = r.take(&recipient);
    assert!(
        matches!(&first[..], [Record::Deliver { from, .. }] if *from == attacker.node_id()),
        "the first chunk is the attacker's copy alone: {first:?}"
    );
    r.send(&recipient, &[Record::Delivered(vec![id])]);
    let next = r.take(&recipient);
    assert!(
        next.iter()
            .any(|x| matches!(x, Record::Deliver { from, id: got, .. } if *from == victim.node_id() && *got == id)),
        "the victim's copy is still handed: {next:?}"
    );
    r.send(&recipient, &[Record::Delivered(vec![id])]);
    assert_eq!(r.store.queued(recipient.node_id()), 0);
}

// ---------------------------------------------------------------------------------------------
// The review of 2026-12-02: A, C and D
// ---------------------------------------------------------------------------------------------

/// Finding A: a pushed envelope the store could not keep when its device left was lost
/// silently, its sender told `pushed` and nothing more. It hears REFUSED now, and sends it
/// again.
#[test]
fn a_pushed_envelope_the_store_cannot_keep_at_its_device_s_departure_is_refused_to_its_sender() {
    let (a, b) = devices();
    let mut r = Bench::new();
    r.join(&a);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    r.forward(&a, &b, 1);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Ok(Accepted::Pushed))]
    );
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
    // b leaves without DELIVERED while the disk is full: the copy cannot be kept.
    r.store.failing = true;
    r.leave(&b);
    assert_eq!(r.store.queued(b.node_id()), 0);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Err(RefuseCode::Unavailable))],
        "the sender told `pushed` hears that it was not kept"
    );
    // The sender sends it again once the disk has room: queued, and b gets it.
    r.store.failing = false;
    r.forward(&a, &b, 1);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([1; 16]), Ok(Accepted::Queued))]
    );
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    assert_eq!(delivered(&r.take(&b)), vec![MsgId([1; 16])]);
}

/// Finding A, the store's own refusal: a queue at its bound cannot keep the pushed copy
/// either, and its sender hears `queue_full` (transient) after `pushed`.
#[test]
fn a_pushed_envelope_a_full_queue_cannot_keep_is_refused_to_its_sender_with_the_store_s_code() {
    let (a, b) = devices();
    let store = crate::relay::mem_store::MemStore::new(crate::relay::mem_store::MemStoreLimits {
        max_messages: 1,
        ..Default::default()
    });
    let mut r = Bench::over(store, crate::relay::harness::config());
    r.join(&a);
    r.join(&b);
    r.leave(&b);
    r.forward(&a, &b, 1);
    r.join(&b);
    r.send(&b, &[Record::Receive]);
    // 1 is drained from the queue (still queued until DELIVERED), 2 is pushed.
    r.forward(&a, &b, 2);
    let mut got = delivered(&r.take(&b));
    got.sort();
    assert_eq!(got, vec![MsgId([1; 16]), MsgId([2; 16])]);
    r.take(&a);
    r.leave(&b);
    assert_eq!(
        answers(&r.take(&a)),
        vec![(MsgId([2; 16]), Err(RefuseCode::QueueFull))]
    );
}
