//! The mesh: where nodes, cells and subjects sit in one 256-bit key space, and the routing
//! table that finds the nodes closest to a key.
//!
//! Distance is XOR (as in Kademlia), not neuropil's hex-digit prefixes. Both give
//! `O(log n)` hops; XOR is chosen because it is symmetric (`d(a, b) = d(b, a)`), so the peers
//! that contact a node are the peers its table wants, and a lookup's candidates can be
//! ordered by one comparison of 32 bytes. "The node nearest a subject's hash" (a subject's
//! coordinator) is the node whose key has the smallest XOR distance to it; there are no
//! sides in XOR space, so the "neighbours on both sides" of a ring become the
//! [`table::NEIGHBOURS`] closest nodes, kept whatever their buckets' occupancy.
//!
//! Nothing here performs I/O or reads a clock: time enters as [`crate::Instant`].

pub mod key;
pub mod lookup;
pub mod table;
pub mod wire;

pub use key::{Distance, RoutingKey};
pub use lookup::Lookup;
pub use table::{Health, Insert, Peer, Role, RoutingTable};
pub use wire::MeshMessage;
