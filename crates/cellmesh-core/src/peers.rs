//! The peer table: which nodes have joined this node, over which connection, and whom to tell
//! when one more joins (the seed's UPDATE step).
//!
//! Generic over the caller's connection handle `C`, so the runtime, tests and the simulator
//! use the same logic. The table keeps one entry per node: a node that joins again over a new
//! connection replaces its old entry, and the caller is told which connection that was.

use std::collections::BTreeMap;

use crate::device::DeviceBinding;
use crate::id::NodeId;

/// A joined peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer<C> {
    /// Who it is.
    pub binding: DeviceBinding,
    /// The connection it joined over.
    pub conn: C,
}

/// What the caller must do after [`PeerTable::joined`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined<C> {
    /// The connection the same node used before, to be closed.
    pub replaced: Option<C>,
    /// Connections of the other peers, each to be sent an UPDATE about the new node.
    pub notify: Vec<C>,
}

/// The joined peers of one node, ordered by node id.
#[derive(Clone, Debug)]
pub struct PeerTable<C> {
    peers: BTreeMap<NodeId, Peer<C>>,
}

impl<C> Default for PeerTable<C> {
    fn default() -> Self {
        Self {
            peers: BTreeMap::new(),
        }
    }
}

impl<C: Clone + PartialEq> PeerTable<C> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `binding`'s node joined over `conn`.
    pub fn joined(&mut self, conn: C, binding: DeviceBinding) -> Joined<C> {
        let node = binding.node();
        let notify = self
            .peers
            .iter()
            .filter(|(id, _)| **id != node)
            .map(|(_, p)| p.conn.clone())
            .collect();
        let replaced = self
            .peers
            .insert(
                node,
                Peer {
                    binding,
                    conn: conn.clone(),
                },
            )
            .map(|old| old.conn)
            .filter(|old| *old != conn);
        Joined { replaced, notify }
    }

    /// Forgets the peer on `conn`, if any, returning it.
    pub fn left(&mut self, conn: &C) -> Option<Peer<C>> {
        let node = self
            .peers
            .iter()
            .find(|(_, p)| p.conn == *conn)?
            .0
            .to_owned();
        self.peers.remove(&node)
    }

    /// The peer with node id `node`.
    pub fn get(&self, node: &NodeId) -> Option<&Peer<C>> {
        self.peers.get(node)
    }

    /// All peers.
    pub fn iter(&self) -> impl Iterator<Item = &Peer<C>> {
        self.peers.values()
    }

    /// How many peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}
