//! The routing table: up to [`BUCKET_SIZE`] peers per bucket of shared key prefix, the
//! [`NEIGHBOURS`] closest peers always kept, and each entry's link health.
//!
//! What enters: only peers the caller has completed a handshake with, pinned to their node
//! id (the caller's promise, made by calling [`RoutingTable::insert`]; a peer learned from a
//! PIGGY or UPDATE waits outside until then), and only servers: a client (behind NAT,
//! reachable through its relays) is refused with [`Refusal::Client`].
//!
//! What stays, when a bucket is full: the peers already there, as Kademlia keeps its
//! long-lived entries (a flooder with fresh identities cannot push out peers that answer),
//! unless the newcomer is one of the [`NEIGHBOURS`] closest to us (then the bucket's
//! farthest peer that is not a neighbour makes room), or the bucket's slowest peer is more
//! than [`SLOW_FACTOR`] times slower than the newcomer and slower than [`SLOW_FLOOR_MS`].
//! Peers that did not make it wait in the bucket's replacement list ([`REPLACEMENTS`]) and
//! take the place of one that is evicted.
//!
//! Liveness: each entry is pinged at an interval that doubles with every answered ping from
//! [`PING_MIN_MS`] up to [`PING_MAX_MS`] and falls back to the minimum after a miss; a ping
//! unanswered within four smoothed round trips (bounded by [`PONG_TIMEOUT_MIN_MS`] and
//! [`PONG_TIMEOUT_MAX_MS`]) is a miss, and [`MISSES_BEFORE_EVICTION`] misses in a row evict.
//! The round trip is smoothed as TCP's (RFC 6298, gain 1/8); the success rate of pings is an
//! average with the same gain.
//!
//! Bound: [`KEY_BITS`] × ([`BUCKET_SIZE`] + [`REPLACEMENTS`]) peers, 7,168; in a mesh of
//! `n` nodes about `log2(n)` buckets are occupied, so about 380 at 10,000 nodes.
//!
//! Calling order: [`insert`](RoutingTable::insert) after a handshake; each time the clock
//! passes [`poll_timeout`](RoutingTable::poll_timeout), [`handle_timeout`]
//! (RoutingTable::handle_timeout), which returns the evictions, then [`due`]
//! (RoutingTable::due) for the pings to send, each reported with
//! [`ping_sent`](RoutingTable::ping_sent); [`pong`](RoutingTable::pong) when one is answered.
//! Iteration orders depend only on keys and calls, never on a hasher, so the same calls give
//! the same table.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::key::{KEY_BITS, RoutingKey};
use crate::Instant;
use crate::id::NodeId;

/// Peers per bucket (Kademlia's `k`).
pub const BUCKET_SIZE: usize = 20;
/// The closest peers kept whatever their bucket's occupancy.
pub const NEIGHBOURS: usize = 16;
/// Peers waiting per bucket to replace an evicted one.
pub const REPLACEMENTS: usize = 8;
/// Unanswered pings in a row that evict a peer.
pub const MISSES_BEFORE_EVICTION: u8 = 3;
/// Shortest interval between pings to one peer.
pub const PING_MIN_MS: u64 = 2_000;
/// Longest interval between pings to one peer.
pub const PING_MAX_MS: u64 = 60_000;
/// Shortest wait for a PONG.
pub const PONG_TIMEOUT_MIN_MS: u64 = 500;
/// Longest wait for a PONG.
pub const PONG_TIMEOUT_MAX_MS: u64 = 5_000;
/// A full bucket's slowest peer is replaced by a newcomer this many times faster...
pub const SLOW_FACTOR: u32 = 4;
/// ...if it is also slower than this.
pub const SLOW_FLOOR_MS: u32 = 100;

const SUCCESS_FULL: u32 = 1024;

/// Whether a node takes part in routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It listens and routes: it can be in routing tables.
    Server,
    /// It cannot be reached (behind NAT): reachable only through the nodes it links to.
    Client,
}

/// A peer the caller completed a handshake with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its node id (pinned by the handshake).
    pub node: NodeId,
    /// Its position, derived from `node`.
    pub key: RoutingKey,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Peer {
    /// A peer at `addr`; its key is derived from its id.
    pub fn new(node: NodeId, addr: SocketAddr) -> Self {
        Self {
            node,
            key: RoutingKey::of_node(&node),
            addr,
        }
    }
}

/// An entry's link health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    srtt_ms: Option<u32>,
    success: u32,
    misses: u8,
    streak: u8,
    awaiting: Option<Instant>,
    next_ping: Instant,
}

impl Health {
    fn new(rtt_ms: Option<u32>, now: Instant) -> Self {
        Self {
            srtt_ms: rtt_ms,
            success: SUCCESS_FULL,
            misses: 0,
            streak: 0,
            awaiting: None,
            next_ping: now.plus_millis(PING_MIN_MS),
        }
    }

    /// The smoothed round trip, once one was measured.
    pub fn srtt_ms(&self) -> Option<u32> {
        self.srtt_ms
    }

    /// Share of pings answered, in thousandths (a moving average).
    pub fn success_per_mille(&self) -> u32 {
        self.success * 1000 / SUCCESS_FULL
    }

    /// Unanswered pings in a row.
    pub fn misses(&self) -> u8 {
        self.misses
    }

    fn interval_ms(&self) -> u64 {
        if self.misses > 0 {
            PING_MIN_MS
        } else {
            (PING_MIN_MS << self.streak.min(8)).min(PING_MAX_MS)
        }
    }

    fn pong_timeout_ms(&self) -> u64 {
        let rtt = self
            .srtt_ms
            .map_or(PONG_TIMEOUT_MAX_MS, |r| 4 * u64::from(r));
        rtt.clamp(PONG_TIMEOUT_MIN_MS, PONG_TIMEOUT_MAX_MS)
    }

    fn answered(&mut self, rtt_ms: u32, now: Instant) {
        self.srtt_ms = Some(match self.srtt_ms {
            Some(s) => s - s / 8 + rtt_ms / 8,
            None => rtt_ms,
        });
        self.success = self.success - self.success / 8 + SUCCESS_FULL / 8;
        self.misses = 0;
        self.streak = self.streak.saturating_add(1);
        self.awaiting = None;
        self.next_ping = now.plus_millis(self.interval_ms());
    }

    fn missed(&mut self, now: Instant) {
        self.success -= self.success / 8;
        self.misses = self.misses.saturating_add(1);
        self.streak = 0;
        self.awaiting = None;
        self.next_ping = now.plus_millis(self.interval_ms());
    }

    fn slower_than(&self, rtt_ms: Option<u32>) -> bool {
        match (self.srtt_ms, rtt_ms) {
            (Some(mine), Some(theirs)) => {
                mine > SLOW_FLOOR_MS && mine > theirs.saturating_mul(SLOW_FACTOR)
            }
            _ => false,
        }
    }
}

/// A peer in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Who.
    pub peer: Peer,
    /// How its link does.
    pub health: Health,
    /// When it entered.
    pub since: Instant,
}

/// What [`RoutingTable::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insert {
    /// The peer is in the table.
    Added,
    /// It was already there; its address and round trip were updated.
    Updated,
    /// It took the place of this peer, which now waits among the replacements.
    Replaced(NodeId),
    /// Its bucket is full: it waits among the bucket's replacements.
    Waiting,
    /// It cannot be in the table.
    Refused(Refusal),
}

/// Why a peer cannot be in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It has our own key.
    Myself,
    /// It is a client, reachable only through its relays.
    Client,
}

/// A peer [`RoutingTable::handle_timeout`] evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    /// The peer that stopped answering.
    pub node: NodeId,
    /// The replacement that took its place, if its bucket had one waiting.
    pub promoted: Option<NodeId>,
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    peer: Peer,
    rtt_ms: Option<u32>,
}

/// The routing table of one node.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    me: RoutingKey,
    entries: BTreeMap<NodeId, Entry>,
    buckets: Vec<Vec<NodeId>>,
    replacements: Vec<Vec<Waiting>>,
}

impl RoutingTable {
    /// An empty table for the node at `me`.
    pub fn new(me: RoutingKey) -> Self {
        Self {
            me,
            entries: BTreeMap::new(),
            buckets: vec![Vec::new(); KEY_BITS],
            replacements: vec![Vec::new(); KEY_BITS],
        }
    }

    /// Our own position.
    pub fn me(&self) -> RoutingKey {
        self.me
    }

    /// Peers in the table (not counting replacements).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Peers waiting among the replacements.
    pub fn waiting(&self) -> usize {
        self.replacements.iter().map(Vec::len).sum()
    }

    /// The entry of `node`.
    pub fn get(&self, node: &NodeId) -> Option<&Entry> {
        self.entries.get(node)
    }

    /// Every entry, in node id order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Puts a peer the caller has just completed a handshake with into the table;
    /// `rtt_ms` is the handshake's round trip if it was measured.
    pub fn insert(&mut self, peer: Peer, role: Role, rtt_ms: Option<u32>, now: Instant) -> Insert {
        if role == Role::Client {
            return Insert::Refused(Refusal::Client);
        }
        let Some(bucket) = self.me.common_prefix(&peer.key) else {
            return Insert::Refused(Refusal::Myself);
        };
        if let Some(entry) = self.entries.get_mut(&peer.node) {
            entry.peer.addr = peer.addr;
            if let Some(rtt) = rtt_ms {
                entry.health.answered(rtt, now);
            }
            return Insert::Updated;
        }
        if self.buckets[bucket].len() < BUCKET_SIZE {
            self.admit(bucket, peer, rtt_ms, now);
            return Insert::Added;
        }
        let out = if self.is_neighbour(&peer.key) {
            self.farthest_non_neighbour(bucket, &self.neighbour_ids())
        } else if self.buckets[bucket]
            .iter()
            .any(|n| self.entries[n].health.slower_than(rtt_ms))
        {
            let neighbours = self.neighbour_ids();
            self.buckets[bucket]
                .iter()
                .filter(|n| !neighbours.contains(n))
                .filter(|n| self.entries[*n].health.slower_than(rtt_ms))
                .max_by_key(|n| self.entries[*n].health.srtt_ms)
                .copied()
        } else {
            None
        };
        match out {
            Some(out) => {
                if let Some(old) = self.take(bucket, &out) {
                    self.wait(bucket, old);
                }
                self.admit(bucket, peer, rtt_ms, now);
                Insert::Replaced(out)
            }
            None => {
                self.wait(bucket, Waiting { peer, rtt_ms });
                Insert::Waiting
            }
        }
    }

    /// Removes `node` (its link closed, it left, or it was revoked); a waiting replacement
    /// takes its place, and is returned.
    pub fn remove(&mut self, node: &NodeId, now: Instant) -> Option<NodeId> {
        let entry = self.entries.get(node)?;
        let bucket = self.bucket_of(&entry.peer.key);
        self.take(bucket, node);
        let promoted = self.promote(bucket, now);
        self.rebalance(now);
        promoted
    }

    /// Forgets `node` among the replacements too.
    pub fn forget(&mut self, node: &NodeId, now: Instant) -> Option<NodeId> {
        for list in &mut self.replacements {
            list.retain(|w| w.peer.node != *node);
        }
        self.remove(node, now)
    }

    /// The `n` entries closest to `target`, closest first.
    pub fn closest(&self, target: &RoutingKey, n: usize) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.values().collect();
        if n == 0 {
            return Vec::new();
        }
        if all.len() > n {
            all.select_nth_unstable_by_key(n - 1, |e| e.peer.key.distance(target));
            all.truncate(n);
        }
        all.sort_by_key(|e| e.peer.key.distance(target));
        all
    }

    /// The peer to forward a message for `target` to: of the entries closer to `target`
    /// than we are, the closest that missed no ping, or the closest at all if every one
    /// missed; `None` when no entry is closer (we are the closest node we know).
    pub fn next_hop(&self, target: &RoutingKey) -> Option<&Entry> {
        let mine = self.me.distance(target);
        let mut closer: Vec<&Entry> = self
            .entries
            .values()
            .filter(|e| e.peer.key.distance(target) < mine)
            .collect();
        closer.sort_by_key(|e| e.peer.key.distance(target));
        closer
            .iter()
            .find(|e| e.health.misses == 0)
            .or(closer.first())
            .copied()
    }

    /// The [`NEIGHBOURS`] entries closest to us.
    pub fn neighbours(&self) -> Vec<&Entry> {
        self.closest(&self.me, NEIGHBOURS)
    }

    /// Records an answered ping with its round trip.
    pub fn pong(&mut self, node: &NodeId, rtt_ms: u32, now: Instant) {
        if let Some(entry) = self.entries.get_mut(node) {
            entry.health.answered(rtt_ms, now);
        }
    }

    /// Entries whose ping is due, in node id order.
    pub fn due(&self, now: Instant) -> Vec<NodeId> {
        self.entries
            .values()
            .filter(|e| e.health.awaiting.is_none() && e.health.next_ping <= now)
            .map(|e| e.peer.node)
            .collect()
    }

    /// Records that a ping to `node` was sent.
    pub fn ping_sent(&mut self, node: &NodeId, now: Instant) {
        if let Some(entry) = self.entries.get_mut(node) {
            entry.health.awaiting = Some(now.plus_millis(entry.health.pong_timeout_ms()));
        }
    }

    /// The next time something is due: a ping to send or a PONG no longer awaited.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.entries
            .values()
            .map(|e| e.health.awaiting.unwrap_or(e.health.next_ping))
            .min()
    }

    /// Counts the pings that went unanswered by `now` as misses, and evicts the peers that
    /// missed [`MISSES_BEFORE_EVICTION`] in a row.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Evicted> {
        let mut dead = Vec::new();
        for entry in self.entries.values_mut() {
            if entry
                .health
                .awaiting
                .is_some_and(|deadline| deadline <= now)
            {
                entry.health.missed(now);
                if entry.health.misses >= MISSES_BEFORE_EVICTION {
                    dead.push(entry.peer.node);
                }
            }
        }
        dead.into_iter()
            .map(|node| Evicted {
                node,
                promoted: self.remove(&node, now),
            })
            .collect()
    }

    fn bucket_of(&self, key: &RoutingKey) -> usize {
        // Entries never hold our own key (insert refuses it).
        self.me.common_prefix(key).unwrap_or(KEY_BITS - 1)
    }

    fn admit(&mut self, bucket: usize, peer: Peer, rtt_ms: Option<u32>, now: Instant) {
        self.replacements[bucket].retain(|w| w.peer.node != peer.node);
        self.buckets[bucket].push(peer.node);
        self.entries.insert(
            peer.node,
            Entry {
                peer,
                health: Health::new(rtt_ms, now),
                since: now,
            },
        );
    }

    fn take(&mut self, bucket: usize, node: &NodeId) -> Option<Waiting> {
        self.buckets[bucket].retain(|n| n != node);
        let entry = self.entries.remove(node)?;
        Some(Waiting {
            peer: entry.peer,
            rtt_ms: entry.health.srtt_ms,
        })
    }

    fn wait(&mut self, bucket: usize, waiting: Waiting) {
        let list = &mut self.replacements[bucket];
        list.retain(|w| w.peer.node != waiting.peer.node);
        if list.len() == REPLACEMENTS {
            list.remove(0);
        }
        list.push(waiting);
    }

    fn promote(&mut self, bucket: usize, now: Instant) -> Option<NodeId> {
        let next = self.replacements[bucket].pop()?;
        self.admit(bucket, next.peer, next.rtt_ms, now);
        Some(next.peer.node)
    }

    fn is_neighbour(&self, key: &RoutingKey) -> bool {
        let d = self.me.distance(key);
        self.entries
            .values()
            .filter(|e| self.me.distance(&e.peer.key) < d)
            .take(NEIGHBOURS)
            .count()
            < NEIGHBOURS
    }

    fn neighbour_ids(&self) -> Vec<NodeId> {
        self.neighbours().iter().map(|e| e.peer.node).collect()
    }

    /// After a removal a waiting peer may have become one of the closest: it takes the
    /// place of its bucket's farthest peer that is not.
    fn rebalance(&mut self, now: Instant) {
        for bucket in 0..KEY_BITS {
            while let Some(closest) = self.replacements[bucket]
                .iter()
                .min_by_key(|w| self.me.distance(&w.peer.key))
                .copied()
            {
                if !self.is_neighbour(&closest.peer.key) {
                    break;
                }
                if self.buckets[bucket].len() < BUCKET_SIZE {
                    self.admit(bucket, closest.peer, closest.rtt_ms, now);
                    continue;
                }
                let neighbours = self.neighbour_ids();
                let Some(out) = self.farthest_non_neighbour(bucket, &neighbours) else {
                    break;
                };
                if let Some(old) = self.take(bucket, &out) {
                    self.wait(bucket, old);
                }
                self.admit(bucket, closest.peer, closest.rtt_ms, now);
            }
        }
    }

    fn farthest_non_neighbour(&self, bucket: usize, neighbours: &[NodeId]) -> Option<NodeId> {
        self.buckets[bucket]
            .iter()
            .filter(|n| !neighbours.contains(n))
            .max_by_key(|n| self.me.distance(&self.entries[*n].peer.key))
            .copied()
    }
}

#[cfg(test)]
mod tests;
