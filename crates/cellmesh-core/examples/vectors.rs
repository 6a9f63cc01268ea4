//! Prints the known-answer vectors that `docs/PROTOCOL.md` and `tests/vectors.rs` carry:
//! mnemonic → keys → Cell ID, and claims → token bytes → fingerprint.
//!
//! `cargo run -p cellmesh-core --features testing --example vectors`

use cellmesh_core::id::NodeId;
use cellmesh_core::keys::SigningSecret;
use cellmesh_core::mnemonic::Mnemonic;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    for (entropy, passphrase) in [
        ([0x00; 16], ""),
        ([0x7f; 16], ""),
        ([0x80; 16], ""),
        ([0x00; 16], "TREZOR"),
        // BIP39's Japanese vectors' passphrase (NFC); PBKDF2 hashes its NFKD form.
        (
            [0x00; 16],
            "\u{334d}\u{30ac}\u{30d0}\u{30f4}\u{30a1}\u{3071}\u{3070}\u{3050}\u{309e}\u{3061}\u{3062}\u{5341}\u{4eba}\u{5341}\u{8272}",
        ),
    ] {
        let m = Mnemonic::from_entropy(&entropy);
        let cell = m.derive(passphrase);
        println!("mnemonic:   {}", m.phrase().as_str());
        println!("passphrase: {passphrase:?}");
        println!(
            "bip39 seed: {}",
            hex(m.dangerous_bip39_seed(passphrase).as_ref())
        );
        println!("ed25519:    {}", hex(cell.signing().public().as_bytes()));
        println!("x25519:     {}", hex(cell.agreement().public().as_bytes()));
        println!("cell id:    {}", cell.cell_id());
        println!("short:      {}\n", cell.cell_id().short());
    }

    let node = SigningSecret::from_seed(&[0x42; 32]);
    let mut token = cellmesh_core::testing::vector_identity_token();
    println!("node id:     {}", NodeId::from_key(node.public()));
    println!("token:       {}", hex(&token.to_bytes()));
    println!("fingerprint: {}", token.fingerprint());
    token
        .co_sign(&SigningSecret::from_seed(&[0x99; 32]))
        .expect("token names a realm");
    println!("co-signed:   {}", hex(&token.to_bytes()));
}
