//! Prints the known-answer vectors that `docs/PROTOCOL.md` and `tests/vectors.rs` carry:
//! mnemonic → keys → Cell ID, and claims → token bytes → fingerprint.
//!
//! `cargo run -p cellmesh-core --example vectors`

use cellmesh_core::Timestamp;
use cellmesh_core::id::NodeId;
use cellmesh_core::keys::SigningSecret;
use cellmesh_core::mnemonic::Mnemonic;
use cellmesh_core::token::{Claims, Name, TokenKind, attr};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    for (entropy, passphrase) in [
        ([0x00; 16], ""),
        ([0x7f; 16], ""),
        ([0x80; 16], ""),
        ([0x00; 16], "TREZOR"),
    ] {
        let m = Mnemonic::from_entropy(&entropy);
        let cell = m.derive(passphrase);
        println!("mnemonic:   {}", m.phrase().as_str());
        println!("passphrase: {passphrase:?}");
        println!("ed25519:    {}", hex(cell.signing().public().as_bytes()));
        println!("x25519:     {}", hex(cell.agreement().public().as_bytes()));
        println!("cell id:    {}", cell.cell_id());
        println!("short:      {}\n", cell.cell_id().short());
    }

    let cell = Mnemonic::from_entropy(&[0; 16]).derive("");
    let node = SigningSecret::from_seed(&[0x42; 32]);
    let key = cell.signing().public();
    let mut claims = Claims {
        kind: TokenKind::Identity,
        realm: Some(Name::new("example.org").expect("valid name")),
        subject: "cellmesh cell".into(),
        issuer: key,
        audience: None,
        uuid: [0x11; 16],
        issued_at: Timestamp(1_800_000_000),
        not_before: Timestamp(1_800_000_000),
        expires_at: Timestamp(1_831_536_000),
        key,
        agreement_key: Some(cell.agreement().public()),
        attributes: Default::default(),
    };
    claims = claims
        .with_attribute(attr::NODE, node.public().as_bytes().to_vec())
        .expect("valid attribute");
    let mut token = claims.sign(cell.signing()).expect("claims within limits");
    println!("node id:     {}", NodeId::from_key(node.public()));
    println!("token:       {}", hex(&token.to_bytes()));
    println!("fingerprint: {}", token.fingerprint());
    token
        .co_sign(&SigningSecret::from_seed(&[0x99; 32]))
        .expect("token names a realm");
    println!("co-signed:   {}", hex(&token.to_bytes()));
}
