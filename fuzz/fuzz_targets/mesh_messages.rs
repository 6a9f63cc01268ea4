//! `MeshMessage::decode` on arbitrary bytes: it must never panic, and whatever it accepts
//! must be the one canonical encoding, and a lookup fed the decoded peers stays bounded.
#![no_main]

use cellmesh_core::Instant;
use cellmesh_core::mesh::MeshMessage;
use cellmesh_core::mesh::key::RoutingKey;
use cellmesh_core::mesh::lookup::{LOOKUP_MAX_QUERIES, Lookup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = MeshMessage::decode(data) else {
        return;
    };
    let mut out = Vec::new();
    msg.encode(&mut out);
    assert_eq!(out, data, "decode accepted a non-canonical encoding");
    if let MeshMessage::Found { peers, .. } | MeshMessage::Piggy(peers) = &msg {
        let Some(first) = peers.first() else { return };
        let mut lookup = Lookup::new(first.node, RoutingKey::from_bytes([0; 32]), peers.iter().copied(), Instant(0));
        while let Some(p) = lookup.poll_query(Instant(0)) {
            lookup.answered(&p.node, peers);
        }
        assert!(lookup.queries() <= LOOKUP_MAX_QUERIES);
    }
});
