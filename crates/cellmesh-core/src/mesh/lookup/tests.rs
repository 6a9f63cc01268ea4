use std::collections::BTreeMap;
use std::net::SocketAddr;

use proptest::prelude::*;

use super::*;
use crate::keys::PublicKey;
use crate::mesh::table::{Role, RoutingTable};

fn node(n: u32) -> NodeId {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    NodeId::from_key(PublicKey::from_bytes_unchecked(&bytes))
}

fn peer(n: u32) -> Peer {
    Peer::new(
        node(n),
        SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 7000)),
    )
}

const T0: Instant = Instant(5_000);

/// A mesh of `n` nodes whose tables each hold every other node they have room for.
struct Mesh {
    tables: BTreeMap<NodeId, RoutingTable>,
    peers: Vec<Peer>,
}

impl Mesh {
    fn new(n: u32) -> Self {
        let peers: Vec<Peer> = (0..n).map(peer).collect();
        let mut tables = BTreeMap::new();
        for p in &peers {
            let mut t = RoutingTable::new(p.key);
            for q in &peers {
                t.insert(*q, Role::Server, Some(10), T0);
            }
            tables.insert(p.node, t);
        }
        Self { tables, peers }
    }

    fn truly_closest(&self, target: &RoutingKey, except: &NodeId) -> Vec<NodeId> {
        let mut all: Vec<&Peer> = self.peers.iter().filter(|p| p.node != *except).collect();
        all.sort_by_key(|p| p.key.distance(target));
        all.iter().take(LOOKUP_RESULTS).map(|p| p.node).collect()
    }

    /// Runs a lookup from `from`, with `answer` standing for each asked node.
    fn lookup(
        &self,
        from: &Peer,
        target: RoutingKey,
        mut answer: impl FnMut(&Peer) -> Option<Vec<Peer>>,
    ) -> Lookup {
        let seeds = self.tables[&from.node]
            .closest(&target, LOOKUP_RESULTS)
            .into_iter()
            .map(|e| e.peer);
        let mut lookup = Lookup::new(from.node, target, seeds, T0);
        let mut now = T0;
        while !lookup.is_done(now) {
            let mut asked = Vec::new();
            while let Some(p) = lookup.poll_query(now) {
                asked.push(p);
            }
            if asked.is_empty() {
                // Every slot waits for a silent node: the clock moves to its timeout.
                now = lookup.poll_timeout().expect("a deadline").max(now);
                lookup.handle_timeout(now);
            }
            for p in asked {
                if let Some(peers) = answer(&p) {
                    lookup.answered(&p.node, &peers);
                }
            }
        }
        lookup
    }

    fn honest(&self, target: &RoutingKey) -> impl FnMut(&Peer) -> Option<Vec<Peer>> + '_ {
        let target = *target;
        move |p| {
            Some(
                self.tables[&p.node]
                    .closest(&target, LOOKUP_RESULTS)
                    .into_iter()
                    .map(|e| e.peer)
                    .collect(),
            )
        }
    }
}

fn mesh() -> &'static Mesh {
    static MESH: std::sync::OnceLock<Mesh> = std::sync::OnceLock::new();
    MESH.get_or_init(|| Mesh::new(300))
}

#[test]
fn a_lookup_finds_the_closest_nodes_of_the_mesh() {
    let mesh = mesh();
    let mut queries = Vec::new();
    for i in 0..40u32 {
        let from = mesh.peers[(i * 7) as usize];
        let target = RoutingKey::of_subject(&format!("subject {i}"));
        let lookup = mesh.lookup(&from, target, mesh.honest(&target));
        let found: Vec<NodeId> = lookup.result().iter().map(|p| p.node).collect();
        assert_eq!(found, mesh.truly_closest(&target, &from.node), "target {i}");
        assert!(lookup.queries() <= LOOKUP_MAX_QUERIES);
        queries.push(lookup.queries());
    }
    queries.sort();
    // Every one of the 20 closest is asked, and a few more on the way.
    assert!(queries[queries.len() / 2] < 40, "{queries:?}");
}

#[test]
fn liars_and_silent_nodes_do_not_change_where_a_lookup_ends() {
    let mesh = mesh();
    // One node in five answers with made-up peers (ids no node has), one in ten is silent.
    for i in 0..20u32 {
        let from = mesh.peers[(i * 13) as usize];
        let target = RoutingKey::of_subject(&format!("target {i}"));
        let mut honest = mesh.honest(&target);
        let mut fakes = 1_000_000u32;
        let lookup = mesh.lookup(&from, target, |p| {
            let n = u32::from_be_bytes(p.node.key().as_bytes()[..4].try_into().expect("4"));
            if n >= 1_000_000 || n % 10 == 3 {
                None
            } else if n % 5 == 1 {
                fakes += 100;
                Some((fakes..fakes + 100).map(peer).collect())
            } else {
                honest(p)
            }
        });
        let found: Vec<NodeId> = lookup.result().iter().map(|p| p.node).collect();
        let expected: Vec<NodeId> = mesh
            .truly_closest(&target, &from.node)
            .into_iter()
            .filter(|n| {
                let n = u32::from_be_bytes(n.key().as_bytes()[..4].try_into().expect("4"));
                n % 10 != 3
            })
            .collect();
        for n in &found {
            let v = u32::from_be_bytes(n.key().as_bytes()[..4].try_into().expect("4"));
            assert!(v < 1_000_000);
        }
        let got: std::collections::BTreeSet<_> = found.iter().collect();
        let missing = expected.iter().filter(|n| !got.contains(n)).count();
        // One in five of the nodes lies and one in ten is silent: of the closest honest
        // or lying nodes, at most one is missed, and made-up ids never make the result.
        assert!(missing <= 1, "target {i}: {missing} of the closest missed");
        assert!(lookup.queries() <= LOOKUP_MAX_QUERIES);
    }
}

#[test]
fn answers_from_nodes_not_asked_are_ignored_and_answers_are_cut_to_the_result_size() {
    let target = RoutingKey::of_subject("x");
    let mut lookup = Lookup::new(node(0), target, [peer(1)], T0);
    lookup.answered(&node(2), &[peer(3)]);
    assert_eq!(lookup.candidates.len(), 1);
    let asked = lookup.poll_query(T0).expect("the seed");
    assert_eq!(asked.node, node(1));
    let many: Vec<Peer> = (100..1_100).map(peer).collect();
    lookup.answered(&node(1), &many);
    assert_eq!(lookup.candidates.len(), 1 + LOOKUP_RESULTS);
    // A second answer from the same node counts no more.
    lookup.answered(&node(1), &(2_000..2_020).map(peer).collect::<Vec<_>>());
    assert_eq!(lookup.candidates.len(), 1 + LOOKUP_RESULTS);
    // Our own id in an answer is not a candidate.
    assert!(lookup.candidates.values().all(|c| c.peer.node != node(0)));
}

#[test]
fn a_lookup_ends_by_its_deadline_whatever_happens() {
    let target = RoutingKey::of_subject("y");
    let mut lookup = Lookup::new(node(0), target, (1..10).map(peer), T0);
    assert!(lookup.poll_query(T0).is_some());
    assert!(!lookup.is_done(T0));
    let end = T0.plus_millis(LOOKUP_TIMEOUT_MS);
    assert!(lookup.poll_timeout().expect("a deadline") <= end);
    assert!(lookup.is_done(end));
    assert!(lookup.poll_query(end).is_none());
}

proptest! {
    #[test]
    fn any_answers_keep_a_lookup_bounded_and_it_ends(
        answers in prop::collection::vec(prop::collection::vec(0u32..5_000, 0..40), 0..200),
        silent in prop::collection::vec(any::<bool>(), 0..200),
    ) {
        let target = RoutingKey::of_subject("z");
        let mut lookup = Lookup::new(node(0), target, (1..30).map(peer), T0);
        let mut now = T0;
        let mut round = 0;
        while !lookup.is_done(now) {
            let mut asked = Vec::new();
            while let Some(p) = lookup.poll_query(now) {
                asked.push(p);
            }
            prop_assert!(asked.len() <= LOOKUP_PARALLELISM);
            for p in asked {
                let i = round % answers.len().max(1);
                if silent.get(round).copied().unwrap_or(false) || answers.is_empty() {
                    lookup.failed(&p.node);
                } else {
                    let peers: Vec<Peer> = answers[i].iter().map(|n| peer(*n)).collect();
                    lookup.answered(&p.node, &peers);
                }
                round += 1;
            }
            prop_assert!(lookup.candidates.len() <= LOOKUP_CANDIDATES);
            prop_assert!(lookup.queries() <= LOOKUP_MAX_QUERIES);
            prop_assert!(round <= LOOKUP_MAX_QUERIES, "ran past its bound");
            now = now.plus_millis(1);
        }
        let result = lookup.result();
        prop_assert!(result.len() <= LOOKUP_RESULTS);
        prop_assert!(result.windows(2).all(|w| w[0].key.distance(&target) < w[1].key.distance(&target)));
    }
}
