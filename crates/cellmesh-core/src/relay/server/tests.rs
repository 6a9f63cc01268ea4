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
