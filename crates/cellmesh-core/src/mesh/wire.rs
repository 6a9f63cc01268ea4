//! The mesh's messages, carried in a session as message types 9 to 12 (PROTOCOL 15.4).
//!
//! ```text
//! contact = node key:32 || family:u8 (4 | 6) || address:4|16 || port:u16
//! 9  PIGGY  count:u8 || contact × count            (count <= MAX_CONTACTS)
//! 10 FIND   query:u64 || target:32
//! 11 FOUND  query:u64 || count:u8 || contact × count
//! 12 LEAVE  count:u8 || contact × count            (the leaver's replacements for the receiver)
//! ```
//!
//! A decoder refuses a count over [`MAX_CONTACTS`], a family other than 4 or 6, a node key
//! that is not a valid Ed25519 point, truncation and trailing bytes. Nothing here is trusted
//! because it decoded: a contact is a rumour until a handshake pinned to its node id
//! succeeds (PROTOCOL 15.2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::codec::{DecodeError, Reader, check_len};
use crate::id::NodeId;
use crate::keys::PublicKey;

use super::key::{KEY_BYTES, RoutingKey};
use super::lookup::LOOKUP_RESULTS;
use super::table::Peer;

/// Contacts one message carries at most.
pub const MAX_CONTACTS: usize = LOOKUP_RESULTS;

/// Message type of PIGGY.
pub const PIGGY: u8 = 9;
/// Message type of FIND.
pub const FIND: u8 = 10;
/// Message type of FOUND.
pub const FOUND: u8 = 11;
/// Message type of LEAVE.
pub const LEAVE: u8 = 12;

/// One of the mesh's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshMessage {
    /// Peers the sender knows (rows or neighbours of its table), sent now and then.
    Piggy(Vec<Peer>),
    /// Which nodes do you know closest to `target`?
    Find {
        /// Matches the FOUND to the FIND.
        query: u64,
        /// The key looked up.
        target: RoutingKey,
    },
    /// The answer to a FIND.
    Found {
        /// The FIND's `query`.
        query: u64,
        /// The closest nodes the sender knows, closest first.
        peers: Vec<Peer>,
    },
    /// The sender leaves the mesh; these may take its place in the receiver's table.
    Leave(Vec<Peer>),
}

impl MeshMessage {
    /// Appends the encoding, type byte first. Lists longer than [`MAX_CONTACTS`] are cut.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Piggy(peers) => {
                out.push(PIGGY);
                put_contacts(out, peers);
            }
            Self::Find { query, target } => {
                out.push(FIND);
                out.extend_from_slice(&query.to_be_bytes());
                out.extend_from_slice(target.as_bytes());
            }
            Self::Found { query, peers } => {
                out.push(FOUND);
                out.extend_from_slice(&query.to_be_bytes());
                put_contacts(out, peers);
            }
            Self::Leave(peers) => {
                out.push(LEAVE);
                put_contacts(out, peers);
            }
        }
    }

    /// Decodes one whole message, type byte first.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let msg = match r.u8()? {
            PIGGY => Self::Piggy(contacts(&mut r)?),
            FIND => Self::Find {
                query: r.u64()?,
                target: RoutingKey::from_bytes(r.array()?),
            },
            FOUND => Self::Found {
                query: r.u64()?,
                peers: contacts(&mut r)?,
            },
            LEAVE => Self::Leave(contacts(&mut r)?),
            _ => return Err(DecodeError::Invalid("mesh message type")),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_contacts(out: &mut Vec<u8>, peers: &[Peer]) {
    let peers = &peers[..peers.len().min(MAX_CONTACTS)];
    out.push(peers.len() as u8);
    for peer in peers {
        out.extend_from_slice(peer.node.key().as_bytes());
        match peer.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&peer.addr.port().to_be_bytes());
    }
}

fn contacts(r: &mut Reader<'_>) -> Result<Vec<Peer>, DecodeError> {
    let count = usize::from(r.u8()?);
    check_len("contacts", count, MAX_CONTACTS)?;
    let mut peers = Vec::with_capacity(count);
    for _ in 0..count {
        let key: [u8; KEY_BYTES] = r.array()?;
        let key = PublicKey::from_bytes(&key).map_err(|_| DecodeError::Invalid("node key"))?;
        let ip = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(DecodeError::Invalid("address family")),
        };
        let port = r.u16()?;
        peers.push(Peer::new(NodeId::from_key(key), SocketAddr::new(ip, port)));
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::keys::SigningSecret;

    fn peer(seed: u8, addr: SocketAddr) -> Peer {
        let key = SigningSecret::from_seed(&[seed; 32]).public();
        Peer::new(NodeId::from_key(key), addr)
    }

    fn any_peer() -> impl Strategy<Value = Peer> {
        (any::<u8>(), any::<bool>(), any::<[u8; 16]>(), any::<u16>()).prop_map(
            |(seed, v4, ip, port)| {
                let ip = if v4 {
                    IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
                } else {
                    IpAddr::V6(Ipv6Addr::from(ip))
                };
                peer(seed, SocketAddr::new(ip, port))
            },
        )
    }

    fn any_message() -> impl Strategy<Value = MeshMessage> {
        let peers = || prop::collection::vec(any_peer(), 0..=MAX_CONTACTS);
        prop_oneof![
            peers().prop_map(MeshMessage::Piggy),
            (any::<u64>(), any::<[u8; 32]>()).prop_map(|(query, t)| MeshMessage::Find {
                query,
                target: RoutingKey::from_bytes(t)
            }),
            (any::<u64>(), peers()).prop_map(|(query, peers)| MeshMessage::Found { query, peers }),
            peers().prop_map(MeshMessage::Leave),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn messages_round_trip(msg in any_message()) {
            let mut out = Vec::new();
            msg.encode(&mut out);
            prop_assert_eq!(MeshMessage::decode(&out), Ok(msg));
        }

        #[test]
        fn truncated_or_extended_messages_are_refused(msg in any_message(), cut in any::<prop::sample::Index>(), extra in 1u8..) {
            let mut out = Vec::new();
            msg.encode(&mut out);
            let n = cut.index(out.len());
            prop_assert!(MeshMessage::decode(&out[..n]).is_err());
            out.push(extra);
            prop_assert!(MeshMessage::decode(&out).is_err());
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(msg) = MeshMessage::decode(&bytes) {
                let mut out = Vec::new();
                msg.encode(&mut out);
                prop_assert_eq!(out, bytes, "only the canonical encoding is accepted");
            }
        }
    }

    #[test]
    fn lists_are_cut_on_encoding_and_refused_over_the_bound_on_decoding() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let many = vec![peer(1, addr); MAX_CONTACTS + 5];
        let mut out = Vec::new();
        MeshMessage::Piggy(many).encode(&mut out);
        assert_eq!(out[1] as usize, MAX_CONTACTS);
        let mut over = vec![PIGGY, MAX_CONTACTS as u8 + 1];
        over.extend(std::iter::repeat_n(0u8, 39 * (MAX_CONTACTS + 1)));
        assert!(matches!(
            MeshMessage::decode(&over),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_bad_family_or_key_is_refused() {
        let addr = SocketAddr::from(([10, 1, 2, 3], 7000));
        let mut out = Vec::new();
        MeshMessage::Leave(vec![peer(3, addr)]).encode(&mut out);
        let mut bad_family = out.clone();
        bad_family[2 + 32] = 5;
        assert_eq!(
            MeshMessage::decode(&bad_family),
            Err(DecodeError::Invalid("address family"))
        );
        // y = 2 is not on the curve.
        let mut bad_key = out.clone();
        bad_key[2..34].copy_from_slice(&[2; 32]);
        assert_eq!(
            MeshMessage::decode(&bad_key),
            Err(DecodeError::Invalid("node key"))
        );
    }

    #[test]
    fn vector() {
        let msg = MeshMessage::Found {
            query: 0x0102030405060708,
            peers: vec![peer(7, SocketAddr::from(([192, 0, 2, 1], 7411)))],
        };
        let mut out = Vec::new();
        msg.encode(&mut out);
        assert_eq!(
            hex::encode(&out),
            "0b010203040506070801\
             ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c\
             04c00002011cf3"
        );
    }
}
