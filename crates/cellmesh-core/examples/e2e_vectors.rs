//! Prints the end-to-end envelope vectors `docs/PROTOCOL.md` publishes (section 14.9): one
//! message from the device of `TestNode::new(1, ..)` to the device of `TestNode::new(2, ..)`,
//! the acknowledgement it gets back, a second message, which the acknowledgement moved to
//! epoch 1, and a bundle of two messages; then the key schedule's values in between.
//!
//! `cargo run -p cellmesh-core --features testing --example e2e_vectors`

use cellmesh_core::testing::vector_e2e;

/// Hex, 90 digits a line, as `docs/PROTOCOL.md` prints it.
fn wrapped(bytes: &[u8]) -> String {
    let hex = hex::encode(bytes);
    let lines: Vec<&str> = hex
        .as_bytes()
        .chunks(90)
        .map(|c| std::str::from_utf8(c).expect("hex is ASCII"))
        .collect();
    lines.join("\n")
}

fn main() {
    let v = vector_e2e();
    println!("sender cell:    {}", v.alice.cell_id());
    println!("sender node:    {}", v.alice.node_id());
    println!("recipient cell: {}", v.bob.cell_id());
    println!("recipient node: {}", v.bob.node_id());
    println!("message id:     {}", "11".repeat(16));
    println!(
        "envelope ({} bytes):\n{}",
        v.envelope.len(),
        wrapped(&v.envelope)
    );
    println!("ack id:         {}", v.ack.id);
    println!(
        "ack ({} bytes):\n{}",
        v.ack.envelope.len(),
        wrapped(&v.ack.envelope)
    );
    println!("second id:      {}", "22".repeat(16));
    println!("second ({} bytes):\n{}", v.second.len(), wrapped(&v.second));
    println!("bundle id:      {}", "33".repeat(16));
    println!("bundle ({} bytes):\n{}", v.bundle.len(), wrapped(&v.bundle));
    let k = &v.keys;
    println!();
    for (name, value) in [
        ("session id", &k.session.0[..]),
        ("enc", &k.enc[..]),
        ("i2r[0]", &k.i2r0[..]),
        ("reply base", &k.reply_base[..]),
        ("salt", &k.salt[..]),
        ("E_i", &k.e_i[..]),
        ("instance", &k.instance[..]),
        ("r2i[0]", &k.r2i0[..]),
        ("E_r", &k.e_r[..]),
        ("i2r[1]", &k.i2r1[..]),
        ("r2i[1]", &k.r2i1[..]),
    ] {
        println!("{:<12}{}", format!("{name}:"), hex::encode(value));
    }
}
