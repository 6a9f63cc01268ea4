//! Routing keys: positions in the mesh's 256-bit space.
//!
//! ```text
//! key = BLAKE2b-256("cellmesh routing key v1" || 0x00 || domain || input)
//!   domain 0x01 node     input = the node's Ed25519 key (32 bytes)
//!   domain 0x02 cell     input = the cell's Ed25519 key (32 bytes)
//!   domain 0x03 subject  input = the subject's name, UTF-8, any length
//! ```
//!
//! A node's key is derived from its node key, not from a token's fingerprint: tokens are
//! renewed, the node key stays, so a node keeps its place across renewals and restarts.
//! The domain byte keeps the three kinds apart: a cell whose identity key equals some
//! node's key (one device can be both) does not land on that node's position, and no
//! subject name can be chosen to hash onto a given node's key without a preimage.

use std::cmp::Ordering;
use std::fmt;

use blake2::Digest;

use crate::id::{Blake2b256, CellId, NodeId};

/// Length of a routing key in bytes.
pub const KEY_BYTES: usize = 32;
/// Length of a routing key in bits: the number of buckets a table can have.
pub const KEY_BITS: usize = KEY_BYTES * 8;

const CONTEXT: &[u8] = b"cellmesh routing key v1\0";
const NODE: u8 = 0x01;
const CELL: u8 = 0x02;
const SUBJECT: u8 = 0x03;

/// A position in the mesh's key space.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutingKey([u8; KEY_BYTES]);

impl RoutingKey {
    /// The position of a node (from its node key).
    pub fn of_node(node: &NodeId) -> Self {
        Self::derive(NODE, node.key().as_bytes())
    }

    /// The position of a cell (from its identity key).
    pub fn of_cell(cell: &CellId) -> Self {
        Self::derive(CELL, cell.key().as_bytes())
    }

    /// The position of a subject (from its name).
    pub fn of_subject(name: &str) -> Self {
        Self::derive(SUBJECT, name.as_bytes())
    }

    /// A key given as bytes (keys travel on the wire as their 32 bytes).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    fn derive(domain: u8, input: &[u8]) -> Self {
        let mut hash = Blake2b256::new();
        hash.update(CONTEXT);
        hash.update([domain]);
        hash.update(input);
        Self(hash.finalize().into())
    }

    /// XOR distance to `other`.
    pub fn distance(&self, other: &RoutingKey) -> Distance {
        let mut d = [0u8; KEY_BYTES];
        for (i, byte) in d.iter_mut().enumerate() {
            *byte = self.0[i] ^ other.0[i];
        }
        Distance(d)
    }

    /// How many leading bits `self` and `other` share: the index of the bucket `other`
    /// falls in in `self`'s table. `None` when the keys are equal.
    pub fn common_prefix(&self, other: &RoutingKey) -> Option<usize> {
        self.distance(other).leading_zeros()
    }
}

impl fmt::Debug for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("…")
    }
}

impl fmt::Display for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// An XOR distance, ordered as a 256-bit big-endian number.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Distance([u8; KEY_BYTES]);

impl Distance {
    /// Leading zero bits; `None` for the zero distance.
    pub fn leading_zeros(&self) -> Option<usize> {
        let first = self.0.iter().position(|&b| b != 0)?;
        Some(first * 8 + self.0[first].leading_zeros() as usize)
    }

    /// The distance's bytes, most significant first.
    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl Ord for Distance {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}

impl PartialOrd for Distance {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> RoutingKey {
        RoutingKey::from_bytes([b; KEY_BYTES])
    }

    #[test]
    fn the_three_domains_give_three_positions_for_one_key() {
        let public = crate::keys::SigningSecret::from_seed(&[7; 32]).public();
        let node = RoutingKey::of_node(&NodeId::from_key(public));
        let cell = RoutingKey::of_cell(&CellId::from_key(public));
        assert_ne!(node, cell);
        let bytes: String = public.as_bytes().iter().map(|b| *b as char).collect();
        assert_ne!(RoutingKey::of_subject(&bytes), node);
    }

    #[test]
    fn distance_orders_by_the_first_differing_bit() {
        let me = key(0);
        let mut far = [0u8; KEY_BYTES];
        far[0] = 0x80;
        let mut near = [0u8; KEY_BYTES];
        near[31] = 0xff;
        let far = RoutingKey::from_bytes(far);
        let near = RoutingKey::from_bytes(near);
        assert!(me.distance(&near) < me.distance(&far));
        assert_eq!(me.common_prefix(&far), Some(0));
        assert_eq!(me.common_prefix(&near), Some(248));
        assert_eq!(me.common_prefix(&me), None);
    }

    proptest! {
        #[test]
        fn xor_distance_is_a_metric(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), c in any::<[u8; 32]>()) {
            let (a, b, c) = (RoutingKey(a), RoutingKey(b), RoutingKey(c));
            prop_assert_eq!(a.distance(&b), b.distance(&a));
            prop_assert_eq!(a.distance(&b) == a.distance(&a), a == b);
            // XOR's stronger form of the triangle inequality: d(a,c) <= d(a,b) xor d(b,c).
            let ab = a.distance(&b);
            let bc = b.distance(&c);
            let sum: [u8; 32] = std::array::from_fn(|i| ab.0[i] ^ bc.0[i]);
            prop_assert_eq!(a.distance(&c), Distance(sum));
        }

        #[test]
        fn one_key_per_distance_from_a_point(a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), c in any::<[u8; 32]>()) {
            let (a, b, c) = (RoutingKey(a), RoutingKey(b), RoutingKey(c));
            prop_assert_eq!(a.distance(&b) == a.distance(&c), b == c);
        }

        #[test]
        fn the_common_prefix_is_the_count_of_equal_leading_bits(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            let (ka, kb) = (RoutingKey(a), RoutingKey(b));
            let bit = |k: &[u8; 32], i: usize| (k[i / 8] >> (7 - i % 8)) & 1;
            let expected = (0..KEY_BITS).position(|i| bit(&a, i) != bit(&b, i));
            prop_assert_eq!(ka.common_prefix(&kb), expected);
        }
    }

    #[test]
    fn vectors() {
        // The node and cell of the all-sevens seed, and the subject "chat/general".
        let public = crate::keys::SigningSecret::from_seed(&[7; 32]).public();
        let node = RoutingKey::of_node(&NodeId::from_key(public));
        let cell = RoutingKey::of_cell(&CellId::from_key(public));
        let subject = RoutingKey::of_subject("chat/general");
        assert_eq!(
            hex::encode(public.as_bytes()),
            "ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c"
        );
        assert_eq!(
            node.to_string(),
            "c995ae913ccdf786576b92030c9303857bbd124ae2f85cc11e95915fa3b04aaf"
        );
        assert_eq!(
            cell.to_string(),
            "76c5701be1c6312b6ef3613b5bb6a97de61ae523d3edcb5d5a6b3a60695a44d2"
        );
        assert_eq!(
            subject.to_string(),
            "c91133709eb1e414fc1c0fb94a51fc09736c5a9bef8e1ca22e6079dd5319a62d"
        );
    }
}
