use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::keys::PublicKey;
use crate::mesh::key::KEY_BYTES;

fn node(n: u32) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    NodeId::from_key(PublicKey::from_bytes_unchecked(&bytes))
}

fn addr(n: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 7000))
}

/// A peer at a chosen position: `prefix` leading bits equal to ours (all zero), then a one,
/// then `rest` in the last four bytes.
fn at(n: u32, prefix: usize, rest: u32) -> Peer {
    let mut key = [0u8; KEY_BYTES];
    key[prefix / 8] |= 0x80 >> (prefix % 8);
    key[28..].copy_from_slice(&rest.to_be_bytes());
    Peer {
        node: node(n),
        key: RoutingKey::from_bytes(key),
        addr: addr(n),
    }
}

fn table() -> RoutingTable {
    RoutingTable::new(RoutingKey::from_bytes([0; KEY_BYTES]))
}

const T0: Instant = Instant(1_000_000);

/// A table whose `NEIGHBOURS` closest peers sit deep, in bucket `depth` (ids 1000 and up),
/// so that the buckets a test fills hold no neighbour.
fn with_neighbours_at(depth: usize, rtt_ms: Option<u32>) -> RoutingTable {
    let mut t = table();
    for i in 0..NEIGHBOURS as u32 {
        assert_eq!(
            t.insert(at(1000 + i, depth, i), Role::Server, rtt_ms, T0),
            Insert::Added
        );
    }
    t
}

#[test]
fn clients_and_ourselves_are_refused() {
    let mut t = table();
    assert_eq!(
        t.insert(at(1, 0, 0), Role::Client, None, T0),
        Insert::Refused(Refusal::Client)
    );
    let me = Peer {
        node: node(2),
        key: t.me(),
        addr: addr(2),
    };
    assert_eq!(
        t.insert(me, Role::Server, None, T0),
        Insert::Refused(Refusal::Myself)
    );
    assert!(t.is_empty());
}

#[test]
fn a_full_bucket_keeps_the_peers_it_has_and_newcomers_wait() {
    // Bucket 0 is the far half of the space: a neighbour never falls in it while the deep
    // buckets hold NEIGHBOURS peers.
    let mut t = with_neighbours_at(200, None);
    for i in 0..BUCKET_SIZE as u32 {
        assert_eq!(
            t.insert(at(i, 0, i), Role::Server, Some(50), T0),
            Insert::Added
        );
    }
    // A flood of fresh identities, even faster ones, does not push out peers that answer.
    for i in 0..100 {
        let newcomer = at(100 + i, 0, 1000 + i);
        assert_eq!(
            t.insert(newcomer, Role::Server, Some(20), T0),
            Insert::Waiting
        );
    }
    assert_eq!(t.len(), NEIGHBOURS + BUCKET_SIZE);
    assert_eq!(t.waiting(), REPLACEMENTS);
    for i in 0..BUCKET_SIZE as u32 {
        assert!(t.get(&node(i)).is_some());
    }
}

#[test]
fn a_slow_peer_gives_way_to_a_much_faster_one_and_waits() {
    let mut t = with_neighbours_at(200, None);
    for i in 0..BUCKET_SIZE as u32 {
        let rtt = if i == 7 { 900 } else { 60 };
        t.insert(at(i, 0, i), Role::Server, Some(rtt), T0);
    }
    // 900 ms is not four times slower than 250 ms...
    assert_eq!(
        t.insert(at(50, 0, 50), Role::Server, Some(250), T0),
        Insert::Waiting
    );
    // ...but 900 ms against 30 ms is.
    assert_eq!(
        t.insert(at(51, 0, 51), Role::Server, Some(30), T0),
        Insert::Replaced(node(7))
    );
    assert!(t.get(&node(7)).is_none());
    assert!(t.get(&node(51)).is_some());
}

#[test]
fn one_of_the_closest_always_gets_in() {
    let mut t = table();
    // Bucket 3 full of peers; the table holds nothing closer, so they are the neighbours
    // until closer ones in the same bucket arrive.
    for i in 0..BUCKET_SIZE as u32 {
        t.insert(at(i, 3, 1_000_000 + i), Role::Server, Some(10), T0);
    }
    let close = at(99, 3, 5);
    match t.insert(close, Role::Server, None, T0) {
        Insert::Replaced(out) => assert_eq!(out, node(BUCKET_SIZE as u32 - 1), "the farthest"),
        other => panic!("{other:?}"),
    }
    assert!(t.neighbours().iter().any(|e| e.peer.node == node(99)));
}

#[test]
fn three_missed_pings_evict_and_a_waiting_peer_takes_the_place() {
    let mut t = with_neighbours_at(200, Some(10));
    for i in 0..BUCKET_SIZE as u32 {
        t.insert(at(i, 0, i), Role::Server, Some(10), T0);
    }
    assert_eq!(
        t.insert(at(77, 0, 77), Role::Server, Some(10), T0),
        Insert::Waiting
    );

    let mut evicted = Vec::new();
    for _ in 0..20 {
        let mut now = t.poll_timeout().expect("a ping is due");
        evicted.extend(t.handle_timeout(now));
        for n in t.due(now) {
            if n == node(3) {
                t.ping_sent(&n, now);
            } else {
                t.pong(&n, 10, now);
            }
        }
        now = now.plus_millis(PONG_TIMEOUT_MIN_MS);
        evicted.extend(t.handle_timeout(now));
    }
    assert_eq!(
        evicted,
        vec![Evicted {
            node: node(3),
            promoted: Some(node(77))
        }]
    );
    assert!(t.get(&node(3)).is_none());
    assert!(t.get(&node(77)).is_some());
}

#[test]
fn ping_intervals_double_with_each_answer_and_fall_back_after_a_miss() {
    let mut t = table();
    t.insert(at(1, 0, 1), Role::Server, Some(40), T0);
    let mut now = T0;
    let mut intervals = Vec::new();
    for _ in 0..8 {
        let due = t.poll_timeout().expect("due");
        intervals.push(due.millis_since(now));
        now = due;
        t.ping_sent(&node(1), now);
        t.pong(&node(1), 40, now);
    }
    assert_eq!(
        intervals,
        vec![2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
    );
    // The PONG is awaited four round trips, at least PONG_TIMEOUT_MIN_MS.
    let due = t.poll_timeout().expect("due");
    t.ping_sent(&node(1), due);
    assert_eq!(t.poll_timeout(), Some(due.plus_millis(PONG_TIMEOUT_MIN_MS)));
    assert!(
        t.handle_timeout(due.plus_millis(PONG_TIMEOUT_MIN_MS))
            .is_empty()
    );
    let health = t.get(&node(1)).expect("kept").health;
    assert_eq!(health.misses(), 1);
    assert!(health.success_per_mille() < 900);
    assert_eq!(
        t.poll_timeout(),
        Some(due.plus_millis(PONG_TIMEOUT_MIN_MS + PING_MIN_MS))
    );
}

#[test]
fn the_round_trip_is_smoothed() {
    let mut t = table();
    t.insert(at(1, 0, 1), Role::Server, Some(80), T0);
    t.pong(&node(1), 160, T0);
    assert_eq!(t.get(&node(1)).expect("in").health.srtt_ms(), Some(90));
}

#[test]
fn the_next_hop_is_closer_to_the_target_and_prefers_peers_that_answer() {
    let mut t = table();
    let far = at(1, 0, 0);
    let nearer = at(2, 1, 0);
    let nearest = at(3, 1, 1);
    for p in [far, nearer, nearest] {
        t.insert(p, Role::Server, Some(10), T0);
    }
    let target = nearest.key;
    assert_eq!(t.next_hop(&target).map(|e| e.peer.node), Some(node(3)));
    // Our own position: nobody is closer.
    assert!(t.next_hop(&t.me()).is_none());
    // The nearest misses a ping: the next one is chosen while it does.
    let due = t.poll_timeout().expect("due");
    for n in t.due(due) {
        t.ping_sent(&n, due);
        if n != node(3) {
            t.pong(&n, 10, due);
        }
    }
    t.handle_timeout(due.plus_millis(PONG_TIMEOUT_MAX_MS));
    assert_eq!(t.next_hop(&target).map(|e| e.peer.node), Some(node(2)));
}

#[test]
fn a_removed_neighbour_is_replaced_by_the_closest_waiting_peer() {
    let mut t = table();
    // 20 peers in bucket 3 (the neighbours are its 16 closest), and 8 more waiting.
    for i in 0..BUCKET_SIZE as u32 {
        t.insert(at(i, 3, 100 + i), Role::Server, None, T0);
    }
    for i in 0..REPLACEMENTS as u32 {
        assert_eq!(
            t.insert(at(500 + i, 3, 1_000 + i), Role::Server, None, T0),
            Insert::Waiting
        );
    }
    for i in 0..BUCKET_SIZE as u32 {
        t.remove(&node(i), T0);
    }
    let closest: BTreeSet<NodeId> = t.neighbours().iter().map(|e| e.peer.node).collect();
    let expected: BTreeSet<NodeId> = (500..500 + REPLACEMENTS as u32).map(node).collect();
    assert_eq!(closest, expected);
}

#[test]
fn a_waiting_peer_that_becomes_one_of_the_closest_takes_a_farther_peer_s_place() {
    let mut t = with_neighbours_at(10, None);
    for i in 0..BUCKET_SIZE as u32 {
        t.insert(at(i, 3, 100 + i), Role::Server, None, T0);
    }
    // Closer than every peer of bucket 3, but 16 are closer still: it waits.
    assert_eq!(
        t.insert(at(99, 3, 1), Role::Server, None, T0),
        Insert::Waiting
    );
    for i in 0..NEIGHBOURS as u32 {
        t.remove(&node(1000 + i), T0);
    }
    assert!(t.get(&node(99)).is_some(), "now the closest peer known");
    assert_eq!(t.len(), BUCKET_SIZE);
}

#[derive(Clone, Debug)]
enum Op {
    Insert {
        n: u32,
        client: bool,
        rtt: Option<u32>,
    },
    Remove(u32),
    Pong {
        n: u32,
        rtt: u32,
    },
    Ping(u32),
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u32..160, prop::bool::weighted(0.05), prop::option::of(1u32..2_000))
            .prop_map(|(n, client, rtt)| Op::Insert { n, client, rtt }),
        3 => (0u32..160).prop_map(Op::Remove),
        2 => (0u32..160, 1u32..2_000).prop_map(|(n, rtt)| Op::Pong { n, rtt }),
        2 => (0u32..160).prop_map(Op::Ping),
        1 => (0u64..20_000).prop_map(Op::Tick),
    ]
}

/// Peers spread over few buckets so that buckets fill: the position's first byte has few
/// bits set.
fn peer(n: u32) -> Peer {
    let p = Peer::new(node(n), addr(n));
    let mut key = *p.key.as_bytes();
    key[0] = 0;
    Peer {
        key: RoutingKey::from_bytes(key),
        ..p
    }
}

fn run(ops: &[Op]) -> RoutingTable {
    let mut t = RoutingTable::new(RoutingKey::from_bytes([0x01; KEY_BYTES]));
    let mut now = T0;
    for op in ops {
        match *op {
            Op::Insert { n, client, rtt } => {
                let role = if client { Role::Client } else { Role::Server };
                t.insert(peer(n), role, rtt, now);
            }
            Op::Remove(n) => {
                t.remove(&node(n), now);
            }
            Op::Pong { n, rtt } => t.pong(&node(n), rtt, now),
            Op::Ping(n) => t.ping_sent(&node(n), now),
            Op::Tick(ms) => {
                now = now.plus_millis(ms);
                t.handle_timeout(now);
            }
        }
    }
    t
}

proptest! {
    #[test]
    fn the_table_keeps_its_bounds_and_its_closest_peers(ops in prop::collection::vec(op(), 1..400)) {
        let t = run(&ops);
        let mut seen = BTreeSet::new();
        for (b, bucket) in t.buckets.iter().enumerate() {
            prop_assert!(bucket.len() <= BUCKET_SIZE);
            prop_assert!(t.replacements[b].len() <= REPLACEMENTS);
            for n in bucket {
                let e = &t.entries[n];
                prop_assert_eq!(t.me.common_prefix(&e.peer.key), Some(b));
                prop_assert!(e.health.misses() < MISSES_BEFORE_EVICTION);
                prop_assert!(seen.insert(*n));
            }
            for w in &t.replacements[b] {
                prop_assert!(!t.entries.contains_key(&w.peer.node));
                prop_assert_eq!(t.me.common_prefix(&w.peer.key), Some(b));
            }
        }
        prop_assert_eq!(seen.len(), t.entries.len());
        // The closest peers known (in the table or waiting) are all in the table.
        let mut known: Vec<Peer> = t.entries.values().map(|e| e.peer).collect();
        known.extend(t.replacements.iter().flatten().map(|w| w.peer));
        known.sort_by_key(|p| t.me.distance(&p.key));
        let neighbours: BTreeSet<NodeId> = t.neighbours().iter().map(|e| e.peer.node).collect();
        for p in known.iter().take(NEIGHBOURS) {
            prop_assert!(neighbours.contains(&p.node), "{:?} is close but not in the table", p.node);
        }
    }

    #[test]
    fn the_same_calls_give_the_same_table(ops in prop::collection::vec(op(), 1..200)) {
        let a = run(&ops);
        let b = run(&ops);
        prop_assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
