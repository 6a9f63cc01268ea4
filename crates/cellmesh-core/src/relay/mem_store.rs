//! An in-memory relay store that carries out [`StoreOp`]s as the runtime's durable store
//! does, for tests and simulated worlds: a restart keeps it and builds a new
//! [`RelayServer`](super::server::RelayServer) over it.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::server::{StoreEnvelope, StoreOp, StoreResult, Stored, StoredEnvelope};
use super::{MsgId, RefuseCode};
use crate::Timestamp;
use crate::id::{CellId, NodeId};

/// What one device's queue may hold, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemStoreLimits {
    /// Most envelopes queued for one device.
    pub max_messages: usize,
    /// Most envelope bytes queued for one device.
    pub max_bytes: usize,
    /// Seconds a queued envelope is kept.
    pub ttl_secs: u64,
}

impl Default for MemStoreLimits {
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 64 << 20,
            ttl_secs: 7 * 24 * 3600,
        }
    }
}

/// A registration: last seen, node token, identity token.
type Device = (Timestamp, Vec<u8>, Vec<u8>);

struct Entry {
    id: MsgId,
    from: NodeId,
    expires_at: Timestamp,
    envelope: Bytes,
}

/// The store; see the [module docs](self).
#[derive(Default)]
pub struct MemStore {
    limits: MemStoreLimits,
    devices: BTreeMap<(CellId, NodeId), Device>,
    queue: BTreeMap<(NodeId, u64), Entry>,
    /// By recipient and id: each sender's sequence number.
    index: BTreeMap<(NodeId, MsgId), BTreeMap<NodeId, u64>>,
    next_seq: u64,
    /// Revocations kept, by (cell, device).
    revoked: BTreeMap<(CellId, NodeId), Vec<u8>>,
    /// Whether every operation from now on fails (a full disk).
    pub failing: bool,
}

impl MemStore {
    /// An empty store.
    pub fn new(limits: MemStoreLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Every registration: cell, device, last seen.
    pub fn registered(&self) -> Vec<(CellId, NodeId, Timestamp)> {
        self.devices
            .iter()
            .map(|((c, n), (seen, _, _))| (*c, *n, *seen))
            .collect()
    }

    /// Every revocation kept (tokens, encoded), for [`RelayServer::load_revocation`](super::server::RelayServer::load_revocation).
    pub fn revocations(&self) -> Vec<Vec<u8>> {
        self.revoked.values().cloned().collect()
    }

    /// The devices with something queued.
    pub fn queued_devices(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = self.queue.keys().map(|(n, _)| *n).collect();
        out.dedup();
        out
    }

    /// How many envelopes are queued for `device`.
    pub fn queued(&self, device: NodeId) -> usize {
        self.range(device).count()
    }

    fn range(&self, device: NodeId) -> impl Iterator<Item = (&(NodeId, u64), &Entry)> {
        self.queue.range((device, 0)..=(device, u64::MAX))
    }

    fn usage(&self, device: NodeId) -> (usize, usize) {
        self.range(device)
            .fold((0, 0), |(n, b), (_, e)| (n + 1, b + e.envelope.len()))
    }

    fn remove_seq(&mut self, device: NodeId, seq: u64) -> bool {
        match self.queue.remove(&(device, seq)) {
            Some(e) => {
                if let Some(by) = self.index.get_mut(&(device, e.id)) {
                    by.remove(&e.from);
                    if by.is_empty() {
                        self.index.remove(&(device, e.id));
                    }
                }
                true
            }
            None => false,
        }
    }

    fn enqueue_one(&mut self, now: Timestamp, e: &StoreEnvelope) -> Result<Stored, RefuseCode> {
        if let Some(&seq) = self.index.get(&(e.to, e.id)).and_then(|by| by.get(&e.from)) {
            let Some(old) = self.queue.get_mut(&(e.to, seq)) else {
                return Err(RefuseCode::Unavailable);
            };
            if old.envelope == e.envelope {
                return Ok(Stored::Duplicate);
            }
            old.envelope = e.envelope.clone();
            return Ok(Stored::Replaced);
        }
        let (n, b) = self.usage(e.to);
        if n >= self.limits.max_messages || b + e.envelope.len() > self.limits.max_bytes {
            return Err(RefuseCode::QueueFull);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.index
            .entry((e.to, e.id))
            .or_default()
            .insert(e.from, seq);
        self.queue.insert(
            (e.to, seq),
            Entry {
                id: e.id,
                from: e.from,
                expires_at: now.plus(self.limits.ttl_secs),
                envelope: e.envelope.clone(),
            },
        );
        Ok(Stored::Stored)
    }

    /// Carries out `op`.
    pub fn apply(&mut self, op: &StoreOp) -> StoreResult {
        if self.failing {
            return StoreResult::Failed("no space left on device".into());
        }
        match op {
            StoreOp::PutDevice {
                cell,
                node,
                node_token,
                identity,
                now,
            } => {
                self.devices
                    .insert((*cell, *node), (*now, node_token.clone(), identity.clone()));
                StoreResult::Done
            }
            StoreOp::Enqueue { now, envelopes } => StoreResult::Enqueued(
                envelopes
                    .iter()
                    .map(|e| self.enqueue_one(*now, e))
                    .collect(),
            ),
            StoreOp::Remove { device, items } => {
                let mut removed = 0;
                for (id, from) in items {
                    let seq = self
                        .index
                        .get(&(*device, *id))
                        .and_then(|by| by.get(from))
                        .copied();
                    if let Some(seq) = seq {
                        removed += usize::from(self.remove_seq(*device, seq));
                    }
                }
                StoreResult::Removed(removed)
            }
            StoreOp::Devices { cell } => StoreResult::Devices(
                self.devices
                    .iter()
                    .filter(|((c, _), _)| c == cell)
                    .map(|(_, (_, nt, id))| (nt.clone(), id.clone()))
                    .collect(),
            ),
            StoreOp::Pending {
                device,
                now,
                limit,
                max_bytes,
            } => {
                let mut out = Vec::new();
                let mut bytes = 0;
                for (_, e) in self.range(*device) {
                    if out.len() == *limit || (bytes >= *max_bytes && !out.is_empty()) {
                        break;
                    }
                    if e.expires_at <= *now {
                        continue;
                    }
                    bytes += e.envelope.len();
                    out.push(StoredEnvelope {
                        id: e.id,
                        from: e.from,
                        envelope: e.envelope.clone(),
                    });
                }
                StoreResult::Pending(out)
            }
            StoreOp::Expire { now } => {
                let expired: Vec<(NodeId, u64)> = self
                    .queue
                    .iter()
                    .filter(|(_, e)| e.expires_at <= *now)
                    .map(|(k, _)| *k)
                    .collect();
                for (d, s) in &expired {
                    self.remove_seq(*d, *s);
                }
                StoreResult::Count(expired.len())
            }
            StoreOp::Revoke {
                cell,
                node,
                revocation,
            } => {
                self.revoked.insert((*cell, *node), revocation.clone());
                self.devices.remove(&(*cell, *node));
                let seqs: Vec<u64> = self.range(*node).map(|((_, s), _)| *s).collect();
                let dropped = seqs
                    .into_iter()
                    .filter(|s| self.remove_seq(*node, *s))
                    .count();
                StoreResult::Count(dropped)
            }
            StoreOp::Sweep { touch, forget, now } => {
                for key in touch {
                    if let Some(d) = self.devices.get_mut(key) {
                        d.0 = *now;
                    }
                }
                let mut dropped = 0;
                for key in forget {
                    self.devices.remove(key);
                    let seqs: Vec<u64> = self.range(key.1).map(|((_, s), _)| *s).collect();
                    for s in seqs {
                        dropped += usize::from(self.remove_seq(key.1, s));
                    }
                }
                StoreResult::Count(dropped)
            }
        }
    }
}
