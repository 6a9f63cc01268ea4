use std::collections::BTreeSet;

use proptest::prelude::*;
use rand_core::SeedableRng as _;

use super::*;
use crate::device;
use crate::testing::{START, TestNode};

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn drain(state: &mut NodeState) -> Vec<Action> {
    std::iter::from_fn(|| state.poll_action()).collect()
}

fn events(actions: &[Action]) -> Vec<&NodeEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn closes(actions: &[Action]) -> Vec<(ConnId, &'static str)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { conn, reason, .. } => Some((*conn, *reason)),
            _ => None,
        })
        .collect()
}

fn me() -> TestNode {
    TestNode::new(1, START.timestamp())
}

/// Default rules but for `limits`.
fn limited(limits: NodeLimits) -> NodeRules {
    NodeRules {
        limits,
        ..NodeRules::default()
    }
}

fn state(rules: NodeRules) -> NodeState {
    NodeState::new(me().node_id(), rules, START)
}

/// An inbound connection from `from` that joins as `peer` at `now`.
fn join_inbound(state: &mut NodeState, from: &str, peer: &TestNode, now: Instant) -> ConnId {
    let conn = state.accept(addr(from)).expect("accepted");
    state.admit(conn, &peer.binding(), now).expect("admitted");
    state.joined(conn, &peer.binding(), now);
    conn
}

#[test]
fn inbound_connections_are_held_to_the_unauthenticated_limits_until_they_join() {
    let mut s = state(limited(NodeLimits {
        max_unauthenticated: 3,
        max_unauthenticated_per_ip: 2,
        ..NodeLimits::default()
    }));
    let a1 = s.accept(addr("10.0.0.1:1")).unwrap();
    let _a2 = s.accept(addr("10.0.0.1:2")).unwrap();
    assert_eq!(s.accept(addr("10.0.0.1:3")), Err(NoRoom::Busy));
    let actions = drain(&mut s);
    assert!(matches!(
        events(&actions)[..],
        [NodeEvent::Failed { reason, .. }] if reason == "connection limit reached"
    ));
    let _b1 = s.accept(addr("10.0.0.2:1")).unwrap();
    assert_eq!(
        s.accept(addr("10.0.0.3:1")),
        Err(NoRoom::Busy),
        "total limit"
    );
    // Joining gives the slot back; so does an end before joining.
    let peer = TestNode::new(2, START.timestamp());
    s.admit(a1, &peer.binding(), START).unwrap();
    s.joined(a1, &peer.binding(), START);
    let c = s.accept(addr("10.0.0.3:1")).unwrap();
    s.abandoned(c, "TLS handshake failed".into(), START);
    assert!(s.accept(addr("10.0.0.3:2")).is_ok());
}

#[test]
fn the_connection_limit_counts_dials_and_accepts_together() {
    let mut s = state(limited(NodeLimits {
        max_connections: 2,
        ..NodeLimits::default()
    }));
    let d = s.dial(addr("10.0.0.9:1")).unwrap();
    s.accept(addr("10.0.0.1:1")).unwrap();
    assert_eq!(s.dial(addr("10.0.0.9:2")), Err(NoRoom::Busy));
    assert_eq!(s.accept(addr("10.0.0.2:1")), Err(NoRoom::Busy));
    s.closed(d, "peer closed the connection".into());
    assert!(s.dial(addr("10.0.0.9:2")).is_ok());
}

#[test]
fn joins_are_held_to_rates_and_caps_and_a_node_joining_again_is_let_in() {
    let mut s = state(limited(NodeLimits {
        max_joined_per_cell: 1,
        ..NodeLimits::default()
    }));
    let a = TestNode::new(2, START.timestamp());
    let a2 = a.sibling(3, START.timestamp());
    let first = join_inbound(&mut s, "10.0.0.1:1", &a, START);
    let c = s.accept(addr("10.0.0.1:2")).unwrap();
    let refusal = s.admit(c, &a2.binding(), START).unwrap_err();
    assert_eq!(refusal.code, NackCode::Busy);
    assert!(refusal.reason.contains("cell"));
    // The same device again: its old connection is to be replaced, so the cap is waived.
    let again = s.accept(addr("10.0.0.1:3")).unwrap();
    s.admit(again, &a.binding(), START).unwrap();
    s.joined(again, &a.binding(), START.plus_millis(SIMULTANEOUS_MS));
    let actions = drain(&mut s);
    assert_eq!(
        closes(&actions),
        vec![(first, "replaced by a newer connection")]
    );
    s.closed(first, "closed: replaced by a newer connection".into());
    assert!(events(&drain(&mut s)).is_empty(), "the device has not left");
    assert_eq!(s.peer(&a.node_id()).map(|p| p.0), Some(again));
    s.closed(again, "peer closed the connection".into());
    assert!(matches!(
        events(&drain(&mut s))[..],
        [NodeEvent::Left { .. }]
    ));
    // Both slots are back: the sibling gets in now.
    let c = s.accept(addr("10.0.0.1:4")).unwrap();
    s.admit(c, &a2.binding(), START).unwrap();
}

#[test]
fn the_join_rate_of_one_address_refuses_its_joins_but_not_others() {
    let mut s = state(limited(NodeLimits {
        join_rate_per_ip: Rate::new(1, 2),
        max_unauthenticated_per_ip: 64,
        ..NodeLimits::default()
    }));
    let peers: Vec<TestNode> = (10..14)
        .map(|n| TestNode::new(n, START.timestamp()))
        .collect();
    let mut outcomes = Vec::new();
    for (i, p) in peers.iter().take(3).enumerate() {
        let c = s.accept(addr(&format!("10.0.0.1:{}", i + 1))).unwrap();
        outcomes.push(s.admit(c, &p.binding(), START).is_ok());
    }
    assert_eq!(outcomes, [true, true, false]);
    let c = s.accept(addr("10.0.0.2:1")).unwrap();
    assert!(s.admit(c, &peers[3].binding(), START).is_ok());
}

#[test]
fn a_refusal_by_the_admit_check_takes_no_slot() {
    let deny: Check = Arc::new(|_| Err(Refusal::new(NackCode::Unauthorized, "not registered")));
    let mut s = state(NodeRules {
        limits: NodeLimits {
            max_joined_per_cell: 1,
            ..NodeLimits::default()
        },
        admit: Some(deny),
        ..NodeRules::default()
    });
    let a = TestNode::new(2, START.timestamp());
    let c = s.accept(addr("10.0.0.1:1")).unwrap();
    assert_eq!(
        s.admit(c, &a.binding(), START).unwrap_err().code,
        NackCode::Unauthorized
    );
    s.rules.admit = None;
    let c2 = s.accept(addr("10.0.0.1:2")).unwrap();
    assert!(
        s.admit(c2, &a.sibling(3, START.timestamp()).binding(), START)
            .is_ok()
    );
}

/// Two nodes that dial each other at once: whatever order each sees the two joins in, both
/// keep the link the lower node id dialed, and close the other.
#[test]
fn simultaneous_dials_converge_on_the_link_the_lower_node_dialed() {
    let (x, y) = (
        TestNode::new(1, START.timestamp()),
        TestNode::new(2, START.timestamp()),
    );
    let lower_is_x = x.node_id() < y.node_id();
    for (x_first, y_first) in [(true, true), (true, false), (false, true), (false, false)] {
        let mut sx = NodeState::new(x.node_id(), NodeRules::default(), START);
        let mut sy = NodeState::new(y.node_id(), NodeRules::default(), START);
        // Link 1: x dialed y. Link 2: y dialed x.
        let x_out = sx.dial(addr("10.0.0.2:7000")).unwrap();
        let y_in = sy.accept(addr("10.0.0.1:50000")).unwrap();
        let y_out = sy.dial(addr("10.0.0.1:7000")).unwrap();
        let x_in = sx.accept(addr("10.0.0.2:50001")).unwrap();
        sy.admit(y_in, &x.binding(), START).unwrap();
        sx.admit(x_in, &y.binding(), START).unwrap();
        let t = START.plus_millis(3);
        let run = |s: &mut NodeState, out, inn, peer: &TestNode, out_first| {
            let order = if out_first { [out, inn] } else { [inn, out] };
            for c in order {
                s.joined(c, &peer.binding(), t);
            }
            let actions = drain(s);
            let closed: Vec<ConnId> = closes(&actions).iter().map(|c| c.0).collect();
            (s.peer(&peer.node_id()).map(|p| p.0), closed)
        };
        let (x_kept, x_closed) = run(&mut sx, x_out, x_in, &y, x_first);
        let (y_kept, y_closed) = run(&mut sy, y_out, y_in, &x, y_first);
        let (x_want, y_want) = if lower_is_x {
            (x_out, y_in)
        } else {
            (x_in, y_out)
        };
        assert_eq!(
            (x_kept, y_kept),
            (Some(x_want), Some(y_want)),
            "{x_first} {y_first}"
        );
        let other = |want, a, b| if want == a { b } else { a };
        assert_eq!(x_closed, vec![other(x_want, x_out, x_in)]);
        assert_eq!(y_closed, vec![other(y_want, y_out, y_in)]);
    }
}

#[test]
fn every_joined_peer_is_told_of_a_new_one_unless_joins_are_not_announced() {
    for announce in [true, false] {
        let mut s = state(NodeRules {
            announce_joins: announce,
            ..NodeRules::default()
        });
        let p: Vec<TestNode> = (2..5)
            .map(|n| TestNode::new(n, START.timestamp()))
            .collect();
        let c0 = join_inbound(&mut s, "10.0.0.1:1", &p[0], START);
        let c1 = join_inbound(&mut s, "10.0.0.2:1", &p[1], START);
        drain(&mut s);
        join_inbound(&mut s, "10.0.0.3:1", &p[2], START);
        let told: BTreeSet<ConnId> = drain(&mut s)
            .iter()
            .filter_map(|a| match a {
                Action::Update { conn, about } => {
                    assert_eq!(about.node(), p[2].node_id());
                    Some(*conn)
                }
                _ => None,
            })
            .collect();
        let want = if announce {
            BTreeSet::from([c0, c1])
        } else {
            BTreeSet::new()
        };
        assert_eq!(told, want);
    }
}

#[test]
fn a_dial_reports_its_outcome_once() {
    let mut s = state(NodeRules::default());
    let p = TestNode::new(2, START.timestamp());
    let outcome = |actions: &[Action]| {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::JoinOutcome { result, .. } => Some(result.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let c = s.dial(addr("10.0.0.2:1")).unwrap();
    s.joined(c, &p.binding(), START);
    assert!(matches!(&outcome(&drain(&mut s))[..], [Ok(info)] if info.node == p.node_id()));
    s.closed(c, "peer closed the connection".into());
    assert!(outcome(&drain(&mut s)).is_empty());

    let c = s.dial(addr("10.0.0.2:1")).unwrap();
    let refusal = Refusal::new(NackCode::Unauthorized, "no");
    s.join_refused(c, (p.node_id(), p.cell_id()), refusal, true);
    s.closed(c, "peer closed: refused".into());
    let actions = drain(&mut s);
    assert!(matches!(
        &outcome(&actions)[..],
        [Err(JoinFailure::Refused {
            code: NackCode::Unauthorized,
            ..
        })]
    ));
    assert!(matches!(
        events(&actions)[..],
        [NodeEvent::JoinRefused { by_peer: true, .. }]
    ));

    let c = s.dial(addr("10.0.0.2:1")).unwrap();
    s.closed(c, "handshake failed".into());
    let actions = drain(&mut s);
    assert!(
        matches!(&outcome(&actions)[..], [Err(JoinFailure::Failed(r))] if r == "handshake failed")
    );
    assert!(matches!(events(&actions)[..], [NodeEvent::Failed { .. }]));

    // A dial that never connected is the caller's to report.
    let c = s.dial(addr("10.0.0.2:1")).unwrap();
    s.abandoned(c, "connection refused".into(), START);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn an_unreachable_bootstrap_peer_is_dialed_again_with_backoff_then_reported() {
    let peer = addr("10.0.0.9:7000");
    let mut s = state(NodeRules {
        bootstrap: vec![peer],
        ..NodeRules::default()
    });
    let mut now = START;
    let mut waits = Vec::new();
    loop {
        let actions = drain(&mut s);
        if let [NodeEvent::Failed { addr, reason }] = events(&actions)[..] {
            assert_eq!((*addr, reason.as_str()), (peer, "connection refused"));
            break;
        }
        let [Action::Dial { conn, addr }] = actions[..] else {
            panic!("one dial, got {actions:?}");
        };
        assert_eq!(addr, peer);
        s.abandoned(conn, "connection refused".into(), now);
        if let Some(due) = s.poll_timeout().filter(|&d| d < s.renew_at) {
            waits.push(due.millis_since(now));
            now = due;
            s.handle_timeout(now);
        }
    }
    assert_eq!(waits, [250, 500, 1000, 2000, 4000, 8000]);
    assert_eq!(
        s.poll_timeout(),
        Some(s.renew_at),
        "only the renewal is left"
    );
}

#[test]
fn a_bootstrap_peer_that_joins_or_refuses_is_not_dialed_again() {
    let p = TestNode::new(2, START.timestamp());
    let mut s = state(NodeRules {
        bootstrap: vec![addr("10.0.0.9:7000"), addr("10.0.0.9:7001")],
        ..NodeRules::default()
    });
    let dials: Vec<ConnId> = drain(&mut s)
        .iter()
        .filter_map(|a| match a {
            Action::Dial { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect();
    s.joined(dials[0], &p.binding(), START);
    s.join_refused(
        dials[1],
        (p.node_id(), p.cell_id()),
        Refusal::new(NackCode::Busy, "busy"),
        true,
    );
    s.closed(dials[1], "refused".into());
    let actions = drain(&mut s);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::JoinOutcome { .. }))
    );
    assert_eq!(s.poll_timeout(), Some(s.renew_at));
}

#[test]
fn a_revocation_closes_the_revoked_device_only_and_reconfigures() {
    let mut s = state(NodeRules::default());
    let a = TestNode::new(2, START.timestamp());
    let a2 = a.sibling(3, START.timestamp());
    let b = TestNode::new(4, START.timestamp());
    let ca = join_inbound(&mut s, "10.0.0.1:1", &a, START);
    join_inbound(&mut s, "10.0.0.1:2", &a2, START);
    join_inbound(&mut s, "10.0.0.2:1", &b, START);
    drain(&mut s);
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([7; 32]);
    let token = device::revocation(&a.cell, a.node_id(), START.timestamp(), &mut rng).unwrap();
    s.add_revocation(&token.verify_signatures().unwrap())
        .unwrap();
    let actions = drain(&mut s);
    assert_eq!(actions[0], Action::Reconfigure { renew: false });
    assert_eq!(closes(&actions), vec![(ca, "revoked")]);
    assert!(s.revocations().is_revoked(a.cell_id(), a.node_id()));
    // A cell cannot revoke another cell's device.
    let forged = device::revocation(&a.cell, b.node_id(), START.timestamp(), &mut rng).unwrap();
    s.add_revocation(&forged.verify_signatures().unwrap())
        .unwrap();
    assert!(closes(&drain(&mut s)).is_empty());
}

#[test]
fn shutdown_closes_every_connection_and_takes_no_more() {
    let mut s = state(NodeRules {
        bootstrap: vec![addr("10.0.0.9:7000")],
        ..NodeRules::default()
    });
    let dial = match drain(&mut s)[..] {
        [Action::Dial { conn, .. }] => conn,
        ref other => panic!("{other:?}"),
    };
    let p = TestNode::new(2, START.timestamp());
    let c = join_inbound(&mut s, "10.0.0.1:1", &p, START);
    let pending = s.accept(addr("10.0.0.3:1")).unwrap();
    drain(&mut s);
    s.shutdown();
    let closed: BTreeSet<ConnId> = closes(&drain(&mut s)).iter().map(|c| c.0).collect();
    assert_eq!(closed, BTreeSet::from([dial, c, pending]));
    assert_eq!(s.accept(addr("10.0.0.4:1")), Err(NoRoom::ShuttingDown));
    assert_eq!(s.dial(addr("10.0.0.4:1")), Err(NoRoom::ShuttingDown));
    s.abandoned(dial, "connection refused".into(), START);
    assert_eq!(s.poll_timeout(), None, "no retry, no renewal");
}

#[test]
fn tokens_are_renewed_on_schedule() {
    let mut s = state(NodeRules {
        token_renewal_ms: 1000,
        ..NodeRules::default()
    });
    assert_eq!(s.poll_timeout(), Some(START.plus_millis(1000)));
    s.handle_timeout(START.plus_millis(999));
    assert!(drain(&mut s).is_empty());
    s.handle_timeout(START.plus_millis(1000));
    assert_eq!(drain(&mut s), vec![Action::Reconfigure { renew: true }]);
    assert_eq!(s.poll_timeout(), Some(START.plus_millis(2000)));
}

/// One step of a random history against a node's state.
#[derive(Clone, Debug)]
enum Step {
    Accept(u8),
    Dial,
    /// Admit and join connection number n (mod the open ones) as peer p.
    Join(usize, u8),
    Refuse(usize),
    Close(usize),
    Abandon(usize),
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4).prop_map(Step::Accept),
        Just(Step::Dial),
        (any::<usize>(), 0u8..5).prop_map(|(n, p)| Step::Join(n, p)),
        any::<usize>().prop_map(Step::Refuse),
        any::<usize>().prop_map(Step::Close),
        any::<usize>().prop_map(Step::Abandon),
        (0u16..10_000).prop_map(Step::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever happens in whatever order: every slot held belongs to a live connection, the
    /// table names live joined connections of the right node, a peer leaves at most once per
    /// Joined, and the same history gives the same actions.
    #[test]
    fn the_state_stays_consistent_and_deterministic(steps in proptest::collection::vec(step(), 1..60)) {
        let peers: Vec<TestNode> = (2..7).map(|n| TestNode::new(n, START.timestamp())).collect();
        let run = |steps: &[Step]| {
            let mut s = state(limited(NodeLimits {
                max_connections: 6,
                max_unauthenticated: 4,
                max_unauthenticated_per_ip: 2,
                max_joined_per_cell: 2,
                ..NodeLimits::default()
            }));
            let mut open: Vec<ConnId> = Vec::new();
            let mut now = START;
            let mut log = Vec::new();
            for step in steps {
                let pick = |n: usize, open: &[ConnId]| (!open.is_empty()).then(|| open[n % open.len()]);
                match *step {
                    Step::Accept(ip) => open.extend(s.accept(addr(&format!("10.0.0.{ip}:1"))).ok()),
                    Step::Dial => open.extend(s.dial(addr("10.9.9.9:7000")).ok()),
                    Step::Join(n, p) => if let Some(c) = pick(n, &open) {
                        let b = peers[p as usize].binding();
                        if s.admit(c, &b, now).is_ok() || s.conns[&c].origin != Origin::Inbound {
                            s.joined(c, &b, now);
                        }
                    },
                    Step::Refuse(n) => if let Some(c) = pick(n, &open) {
                        let p = &peers[0];
                        s.join_refused(c, (p.node_id(), p.cell_id()), Refusal::new(NackCode::Busy, "x"), false);
                    },
                    Step::Close(n) => if let Some(c) = pick(n, &open) {
                        open.retain(|&o| o != c);
                        s.closed(c, "closed".into());
                    },
                    Step::Abandon(n) => if let Some(c) = pick(n, &open) {
                        open.retain(|&o| o != c);
                        s.abandoned(c, "gone".into(), now);
                    },
                    Step::Wait(ms) => {
                        now = now.plus_millis(u64::from(ms));
                        s.handle_timeout(now);
                    }
                }
                // Closes are applied by the caller: the connection ends.
                for a in drain(&mut s) {
                    if let Action::Close { conn, .. } = a
                        && open.contains(&conn)
                    {
                        open.retain(|&o| o != conn);
                        s.closed(conn, "closed by us".into());
                        log.extend(drain(&mut s).into_iter().map(|a| format!("{a:?}")));
                    }
                    log.push(format!("{a:?}"));
                }
                // Invariants.
                let live: BTreeSet<ConnId> = s.conns.keys().copied().collect();
                prop_assert_eq!(&live, &open.iter().copied().collect::<BTreeSet<_>>());
                let unauth = s.conns.values().filter(|c| c.unauthenticated).count();
                prop_assert_eq!(s.unauthenticated.total(), unauth);
                let slots = s.conns.values().filter(|c| c.join_slots.is_some()).count();
                prop_assert_eq!(s.joined_cells.total(), slots);
                prop_assert_eq!(s.joined_addrs.total(), slots);
                for (node, conn) in &s.peers {
                    let c = &s.conns[conn];
                    prop_assert_eq!(c.peer.as_ref().map(|p| p.0.node), Some(*node));
                }
            }
            Ok(log)
        };
        let first: Result<Vec<String>, TestCaseError> = run(&steps);
        let second = run(&steps);
        prop_assert_eq!(first?, second?);
    }
}
