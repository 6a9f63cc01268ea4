//! An iterative lookup: the [`LOOKUP_RESULTS`] nodes closest to a key.
//!
//! Iterative (the asking node asks each step itself, as Kademlia does) rather than
//! recursive (each hop forwards to the next): the asker sees every answer, so it can bound
//! what it asks ([`LOOKUP_MAX_QUERIES`], [`LOOKUP_PARALLELISM`] at a time), a peer that lies
//! can slow a lookup down but not steer where it ends, and the result holds only nodes that
//! answered the asker themselves. A client behind NAT can run one too: it only dials out.
//!
//! What an answer can do: it comes only from a node that was asked and has not answered;
//! at most [`LOOKUP_RESULTS`] peers of each answer count; a peer's position is derived from
//! its node id here (an answer cannot place a peer at a key of its choice); candidates
//! beyond the [`LOOKUP_CANDIDATES`] closest are forgotten.
//!
//! Calling order: [`Lookup::poll_query`] until it returns `None`, sending each query; on an
//! answer [`Lookup::answered`], on a closed link [`Lookup::failed`]; when the clock passes
//! [`Lookup::poll_timeout`], [`Lookup::handle_timeout`]; then `poll_query` again. Done when
//! [`Lookup::is_done`]; [`Lookup::result`] gives the closest nodes that answered.

use std::collections::{BTreeMap, BTreeSet};

use super::key::{Distance, RoutingKey};
use super::table::{BUCKET_SIZE, Peer};
use crate::Instant;
use crate::id::NodeId;

/// Queries in flight at once (Kademlia's alpha).
pub const LOOKUP_PARALLELISM: usize = 3;
/// Nodes a lookup returns, and peers an answer may name.
pub const LOOKUP_RESULTS: usize = BUCKET_SIZE;
/// Candidates kept, closest first.
pub const LOOKUP_CANDIDATES: usize = 3 * LOOKUP_RESULTS;
/// Queries one lookup sends at most.
pub const LOOKUP_MAX_QUERIES: usize = 64;
/// How long one query is awaited.
pub const LOOKUP_QUERY_TIMEOUT_MS: u64 = 2_000;
/// How long a whole lookup may take.
pub const LOOKUP_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    New,
    Asked(Instant),
    Answered,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    peer: Peer,
    state: State,
}

/// One lookup in progress.
#[derive(Clone, Debug)]
pub struct Lookup {
    me: NodeId,
    target: RoutingKey,
    candidates: BTreeMap<Distance, Candidate>,
    failed: BTreeSet<Distance>,
    queries: usize,
    deadline: Instant,
}

impl Lookup {
    /// A lookup by node `me` for `target`, starting from `seeds` (its table's closest
    /// entries). `me` is never asked nor returned: the caller compares its own distance.
    pub fn new(
        me: NodeId,
        target: RoutingKey,
        seeds: impl IntoIterator<Item = Peer>,
        now: Instant,
    ) -> Self {
        let mut lookup = Self {
            me,
            target,
            candidates: BTreeMap::new(),
            failed: BTreeSet::new(),
            queries: 0,
            deadline: now.plus_millis(LOOKUP_TIMEOUT_MS),
        };
        for seed in seeds {
            lookup.learn(Peer::new(seed.node, seed.addr));
        }
        lookup
    }

    /// The key looked up.
    pub fn target(&self) -> RoutingKey {
        self.target
    }

    /// Queries sent so far.
    pub fn queries(&self) -> usize {
        self.queries
    }

    /// The next node to ask, if one should be asked now.
    pub fn poll_query(&mut self, now: Instant) -> Option<Peer> {
        if self.is_done(now)
            || self.in_flight() >= LOOKUP_PARALLELISM
            || self.queries >= LOOKUP_MAX_QUERIES
        {
            return None;
        }
        let next = self
            .candidates
            .values()
            .take(LOOKUP_RESULTS)
            .find(|c| c.state == State::New)
            .map(|c| c.peer)?;
        let distance = next.key.distance(&self.target);
        if let Some(c) = self.candidates.get_mut(&distance) {
            c.state = State::Asked(now.plus_millis(LOOKUP_QUERY_TIMEOUT_MS));
        }
        self.queries += 1;
        Some(next)
    }

    /// `from` answered with the peers it knows closest to the target.
    pub fn answered(&mut self, from: &NodeId, peers: &[Peer]) {
        let distance = RoutingKey::of_node(from).distance(&self.target);
        match self.candidates.get_mut(&distance) {
            Some(c) if matches!(c.state, State::Asked(_)) => c.state = State::Answered,
            _ => return,
        }
        for peer in peers.iter().take(LOOKUP_RESULTS) {
            self.learn(Peer::new(peer.node, peer.addr));
        }
    }

    /// `from` cannot answer (its link closed or it refused): it is dropped, and not taken
    /// again from a later answer.
    pub fn failed(&mut self, from: &NodeId) {
        let distance = RoutingKey::of_node(from).distance(&self.target);
        if self
            .candidates
            .get(&distance)
            .is_some_and(|c| c.state != State::Answered)
        {
            self.fail(distance);
        }
    }

    fn fail(&mut self, distance: Distance) {
        self.candidates.remove(&distance);
        self.failed.insert(distance);
    }

    /// When the next query times out, or the lookup does.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.candidates
            .values()
            .filter_map(|c| match c.state {
                State::Asked(deadline) => Some(deadline),
                _ => None,
            })
            .chain([self.deadline])
            .min()
    }

    /// Counts queries unanswered by `now` as failed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<Distance> = self
            .candidates
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Asked(deadline) if deadline <= now))
            .map(|(d, _)| *d)
            .collect();
        for distance in late {
            self.fail(distance);
        }
    }

    /// Whether the lookup has ended: the closest nodes known have all answered (or could
    /// not), or it ran out of queries or time.
    pub fn is_done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let waiting = self.in_flight() > 0;
        let unasked = self
            .candidates
            .values()
            .take(LOOKUP_RESULTS)
            .any(|c| c.state == State::New);
        !waiting && (!unasked || self.queries >= LOOKUP_MAX_QUERIES)
    }

    /// The closest nodes that answered, closest first.
    pub fn result(&self) -> Vec<Peer> {
        self.candidates
            .values()
            .filter(|c| c.state == State::Answered)
            .take(LOOKUP_RESULTS)
            .map(|c| c.peer)
            .collect()
    }

    fn in_flight(&self) -> usize {
        self.candidates
            .values()
            .filter(|c| matches!(c.state, State::Asked(_)))
            .count()
    }

    fn learn(&mut self, peer: Peer) {
        if peer.node == self.me {
            return;
        }
        let distance = peer.key.distance(&self.target);
        if self.failed.contains(&distance) {
            return;
        }
        self.candidates.entry(distance).or_insert(Candidate {
            peer,
            state: State::New,
        });
        while self.candidates.len() > LOOKUP_CANDIDATES {
            self.candidates.pop_last();
        }
    }
}

#[cfg(test)]
mod tests;
