//! Prints the handshake and join vectors `docs/PROTOCOL.md` publishes and
//! `tests/handshake_vectors.rs` asserts (both come from `testing::vector_link`).
//!
//! `cargo run -p cellmesh-core --features testing --example handshake_vectors`

fn main() {
    let link = cellmesh_core::testing::vector_link();
    for (name, frame) in [
        ("hello", &link.hello),
        ("response", &link.response),
        ("finish", &link.finish),
        ("join", &link.join),
        ("ack", &link.ack),
    ] {
        println!("{name}: {}", hex::encode(frame));
    }
    println!("handshake_hash: {}", hex::encode(link.handshake_hash));
}
