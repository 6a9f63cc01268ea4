//! Known-answer vectors: the same values `docs/PROTOCOL.md` publishes. If one of these
//! changes, every existing cell's ID changes with it: that is a wire break, not a refactor.

use cellmesh_core::Timestamp;
use cellmesh_core::id::{CellId, NodeId};
use cellmesh_core::keys::SigningSecret;
use cellmesh_core::mnemonic::Mnemonic;
use cellmesh_core::testing::{vector_identity_token, vector_revocation_token};
use cellmesh_core::token::{Token, attr};

struct CellVector {
    mnemonic: &'static str,
    passphrase: &'static str,
    ed25519: &'static str,
    x25519: &'static str,
    cell_id: &'static str,
}

const CELLS: &[CellVector] = &[
    CellVector {
        mnemonic: "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
        passphrase: "",
        ed25519: "d396bfd0fae3ae4a117385e85f5a62aff348ead5ca521957f83f72864bf8a0bd",
        x25519: "c23712c4446360db2e6bf74048a28ff2a900e9a368f726a1ff944f747ac4495d",
        cell_id: "cell12oll7uh24oxeueltqxuf6wtcv7zur2wvzjjbsv7yh5zims7yuc67kpmc",
    },
    CellVector {
        mnemonic: "legal winner thank year wave sausage worth useful legal winner thank yellow",
        passphrase: "",
        ed25519: "0ea911460765d36536a2997e3344f53a2e5ed5bd232493a226ff4753a8e6adb6",
        x25519: "e9d699b6b74d9fe173e65afc2ea2d87238a765a6f6a006cc579c23162177af5a",
        cell_id: "cell1b2urcrqhmxjwknvctf7dgrhvhixf5vn5emsjhirg75dvhkhgvw3pajvd",
    },
    CellVector {
        mnemonic: "letter advice cage absurd amount doctor acoustic avoid letter advice cage above",
        passphrase: "",
        ed25519: "ae6b3ed27f38a97a1054fd6a0341a5a1675e19b6d54a241eb5cf1daac7b7f662",
        x25519: "b603b806f927f716768a67aaa8f92607737183f9f0139c743af03830b38ade15",
        cell_id: "cell1vzvt5ut7hcuxuecu7vvagqnfuftv4gnw2vfcihvvz4o2vr5x6zrhrbvi",
    },
    CellVector {
        mnemonic: "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
        passphrase: "TREZOR",
        ed25519: "8c153f92648fdd07e709fd7d286e202e8062e9bbff97af124c3bc7fe35588cf2",
        x25519: "f66f0467ff76d601a0c694abbad9fcf3438ca20fe6ee8f2b993adc9503356a39",
        cell_id: "cell1rqkt7eter7oqpzyj7v6sq3raf2agf2n376l26esmhpd74nkyrtzcfkud",
    },
    CellVector {
        mnemonic: "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about",
        // BIP39's Japanese vectors' passphrase, as published (NFC): `㍍ガバヴァぱばぐゞちぢ十人十色`.
        passphrase: JAPANESE_PASSPHRASE,
        ed25519: "998cdf7ea40425187987487687d314dbc9393ff2776ff9ccf27f95655b9fcff0",
        x25519: "16a24c5a706ba2653f089e098ceada0dc96cc44d96fac6e8561e38192320ac43",
        cell_id: "cell1tggn67veaqsrq6mhjb3ipuyu3petsp7so5x7tthsp6kwkw47z7yhn22r",
    },
];

/// The passphrase of the BIP39 reference's Japanese vectors (trezor/python-mnemonic
/// `vectors.json`, from bip32JP), NFC as published. NFKD changes it: `㍍` becomes `メートル`
/// and every voiced kana splits into kana + U+3099/U+309A.
const JAPANESE_PASSPHRASE: &str = "\u{334d}\u{30ac}\u{30d0}\u{30f4}\u{30a1}\u{3071}\u{3070}\u{3050}\u{309e}\u{3061}\u{3062}\u{5341}\u{4eba}\u{5341}\u{8272}";
/// Its NFKD form, which is what PBKDF2 hashes.
const JAPANESE_PASSPHRASE_NFKD: &str = "\u{30e1}\u{30fc}\u{30c8}\u{30eb}\u{30ab}\u{3099}\u{30cf}\u{3099}\u{30a6}\u{3099}\u{30a1}\u{306f}\u{309a}\u{306f}\u{3099}\u{304f}\u{3099}\u{309d}\u{3099}\u{3061}\u{3061}\u{3099}\u{5341}\u{4eba}\u{5341}\u{8272}";

const TOKEN_HEX: &str = "01020b6578616d706c652e6f72670d63656c6c6d6573682063656c6cd396bfd0fae3ae4a117385e85f5a62aff348ead5ca521957f83f72864bf8a0bd0011111111111111111111111111111111000000006b49d200000000006b49d200000000006d2b0580d396bfd0fae3ae4a117385e85f5a62aff348ead5ca521957f83f72864bf8a0bd01c23712c4446360db2e6bf74048a28ff2a900e9a368f726a1ff944f747ac4495d01046e6f646500202152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db12b1b8767e796ebd082db7a123b721bdccd18db9468e598d568bbf9f2bcb212d36f89c14fc5a8d9e641f079a8929d724e0e68f1879063a177a576a46ea7261650b00";
const TOKEN_FINGERPRINT: &str = "a4e4aac18630005d24a77348f69ad15ece93b4ff157fe50d08b81650d384595e";
/// PROTOCOL.md 13.7: the cell of `abandon ×11 about` revokes the node of `0x42` × 32.
const REVOCATION_HEX: &str = "0103001363656c6c6d657368207265766f636174696f6ed396bfd0fae3ae4a117385e85f5a62aff348ead5ca521957f83f72864bf8a0bd0022222222222222222222222222222222000000006b49d200000000006b49d200ffffffffffffffffd396bfd0fae3ae4a117385e85f5a62aff348ead5ca521957f83f72864bf8a0bd0001046e6f646500202152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db122bc1f6c07f6289c74125395c16098cebd4e2944aab2511beb9ea2f691f4b4239a700a16d4f48555b648666163c364bcc39f5a26b3bf7fc9b615d24c2c020c30a00";
const REVOCATION_FINGERPRINT: &str =
    "082fc85d326d1ea027faf1465f2742d9f05f02b1e0f8251544b4d2d152c4e819";
const NODE_ID: &str = "node1efjprum3peosirjsilqv6lvlns3476t3njpngaexsyhangeb3mjopaaz";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn bip39_seed_matches_the_bip39_reference_vector() {
    // From the BIP39 reference vectors (trezor/python-mnemonic vectors.json).
    let m = Mnemonic::parse(CELLS[3].mnemonic).unwrap();
    assert_eq!(
        hex(m.dangerous_bip39_seed("TREZOR").as_ref()),
        "c55257c360c07c72029aebc1b53c05ed0362ada38ead3e3e9efa3708e53495531f09a6987599d18264c1e1c92f2cf141630c7a3c4ab7c81b2f001698e7463b04"
    );
}

#[test]
fn bip39_seed_with_a_non_ascii_passphrase_hashes_its_nfkd_form() {
    // PBKDF2-HMAC-SHA512("abandon ×11 about", "mnemonic" || NFKD(passphrase), 2048), computed
    // independently with Python's hashlib and unicodedata (which reproduce the reference's
    // Japanese vectors with this passphrase); no published vector pairs English words with a
    // non-ASCII passphrase.
    let m = Mnemonic::parse(CELLS[4].mnemonic).unwrap();
    let seed = "ba553eedefe76e67e2602dc20184c564010859faada929a090dd2c57aacb204ceefd15404ab50ef3e8dbeae5195aeae64b0def4d2eead1cdc728a33ced520ffd";
    assert_eq!(
        hex(m.dangerous_bip39_seed(JAPANESE_PASSPHRASE).as_ref()),
        seed
    );
    assert_eq!(
        hex(m.dangerous_bip39_seed(JAPANESE_PASSPHRASE_NFKD).as_ref()),
        seed
    );
    assert_eq!(
        m.derive(JAPANESE_PASSPHRASE_NFKD).cell_id().to_string(),
        CELLS[4].cell_id
    );
}

#[test]
fn mnemonic_to_keys_to_cell_id() {
    for v in CELLS {
        let cell = Mnemonic::parse(v.mnemonic).unwrap().derive(v.passphrase);
        assert_eq!(
            hex(cell.signing().public().as_bytes()),
            v.ed25519,
            "{}",
            v.mnemonic
        );
        assert_eq!(hex(cell.agreement().public().as_bytes()), v.x25519);
        assert_eq!(cell.cell_id().to_string(), v.cell_id);
        assert_eq!(v.cell_id.parse::<CellId>().unwrap(), cell.cell_id());
    }
}

#[test]
fn claims_to_token_bytes_to_fingerprint() {
    let node = SigningSecret::from_seed(&[0x42; 32]);
    assert_eq!(NodeId::from_key(node.public()).to_string(), NODE_ID);
    let token = vector_identity_token();
    let cell = Mnemonic::parse(CELLS[0].mnemonic).unwrap().derive("");
    assert_eq!(token.claims().issuer, cell.signing().public());
    assert_eq!(
        token.claims().key_attribute(attr::NODE),
        Some(node.public())
    );
    assert_eq!(hex(&token.to_bytes()), TOKEN_HEX);
    assert_eq!(token.fingerprint().to_string(), TOKEN_FINGERPRINT);
    let decoded = Token::decode(&hex::decode(TOKEN_HEX).unwrap()).unwrap();
    assert_eq!(decoded, token);
    assert!(decoded.verify(Timestamp(1_800_000_000), 0).is_ok());
}

/// The end-to-end envelopes of PROTOCOL.md section 14.9 (HPKE Auth setup, epoch-0 INIT, the
/// acknowledgement carrying the responder's ephemeral key, an epoch-1 message and a bundle).
#[test]
fn end_to_end_envelopes_match_the_published_vectors() {
    let v = cellmesh_core::testing::vector_e2e();
    assert_eq!(
        hex::encode(&v.envelope),
        "0201f400927857aaf64114f561baacb379707fe038829fc2a9fce958db99f1a65b4dd5c63272dae5c9788c594d2d62c0f70501040101000d63656c6c6d657368206e6f64654d4b18062f8502598de045ca7b69f067f59f93b16e3af8733a988adc2341f5c80001274dd1ee5216c204fb698daea45b52000000006b49d200000000006b49d200000000006b4b23804d4b18062f8502598de045ca7b69f067f59f93b16e3af8733a988adc2341f5c801091e876575795f5fced43ff7ce5ae652db21e3453c6b1ec5d3bd23b1ec410655010463656c6c002077a353cefcb9e28358235d45cedb381a5ad2b50168483d318e9b510e0f87d414668d63573c14b41937b9f84ee4ef9c081f70a731f7e147d0ae182286a1648bc820b99faac59ed5c9b0e71f94fb125b88cd2c134b367361bc0a09d0a5eec233070001040102000d63656c6c6d6573682063656c6c77a353cefcb9e28358235d45cedb381a5ad2b50168483d318e9b510e0f87d41400e98b6f0fdd046dcc3a86bb079e36f024000000006b49d200000000006b49d200000000006d2b058077a353cefcb9e28358235d45cedb381a5ad2b50168483d318e9b510e0f87d4140120b3db554611be1510190de31f8cf5740a37b8b54ad630f298cc582dc5793b1201046e6f646500204d4b18062f8502598de045ca7b69f067f59f93b16e3af8733a988adc2341f5c8fbdfaa1192398c65bd55131be59b07720ba14ede62e114d44074b15d44c0426516db1d27844d1a4bb171a59da54a12548f70e9d182c4aba7f5b55bfa2ba9e60000000000000000000000000000000000006b49d2642ed5e71cb82d7ce63a521918aea01035fba8678406499122e88862fb9bb17b639bfe713fa8b4907c86600b7b0fa02300d8333b3d794253c278ff1e"
    );
    assert_eq!(v.ack.id.to_hex(), "c2be6756184ff1346102aa1a537271de");
    assert_eq!(
        hex::encode(&v.ack.envelope),
        "0204f400927857aaf64114f561baacb37970b6ea14d411fcc53dea4f44c9bb4d7408000000000000000000000000000000000000000094414aa5d9b29c1dc3b97fbcea38d2250353d76e2e0421ff69e09ffd632f318623afbb493400c2e9339321ce5bc4bf6e4862b398cfcb503ac037bf26f94b36c1036d0e1d"
    );
    assert_eq!(
        hex::encode(&v.second),
        "0202f400927857aaf64114f561baacb37970000000010000000000000000000000006b49d264f79c0467b5c61eeba28ef7d64c8d6454fcf7ecfaaa2a17b3e286df"
    );
    assert_eq!(
        hex::encode(&v.bundle),
        "0202f400927857aaf64114f561baacb37970000000010000000000000001000000006b49d2648fc79c01bb6f31436526b431c4b12ba1cb643c35ab8f634aff28131d403d130decfed014e0535316713314fd37d779d8723f9b7e64bc8a73f1ae10ed75587aa1b425"
    );
}

/// The values in between of PROTOCOL.md section 14.9, and that they are what sections 14.2,
/// 14.3 and 14.5 say: each recomputed here from the published inputs with the primitives
/// themselves (HPKE, HKDF, X25519 and AES-256-GCM, not the endpoint's code), and each key
/// opens its envelope to the published plaintext.
#[test]
fn end_to_end_key_schedule_matches_the_published_values() {
    use hkdf::Hkdf;
    use hpke::{Deserializable as _, Kem as _, Serializable as _};
    use rand_core::{RngCore as _, SeedableRng as _};
    use ring::aead;
    use sha2::Sha256;

    type Kem = hpke::kem::X25519HkdfSha256;

    let v = cellmesh_core::testing::vector_e2e();
    let k = &v.keys;
    let published = [
        (
            "session id",
            &k.session.0[..],
            "f400927857aaf64114f561baacb37970",
        ),
        (
            "enc",
            &k.enc[..],
            "7fe038829fc2a9fce958db99f1a65b4dd5c63272dae5c9788c594d2d62c0f705",
        ),
        (
            "i2r[0]",
            &k.i2r0[..],
            "589722c8a29a6b9fd391c06c5e8198e94d4195ece3049f2df3bb053b460fd8c8",
        ),
        (
            "reply base",
            &k.reply_base[..],
            "c9aa561c6ab8b2583ce691abef1ce64ce456161cd8d22a8a9d4b52436270e77d",
        ),
        (
            "salt",
            &k.salt[..],
            "c940e65c6414165c3fc2f2b0687466fb7016d515adf86659f9177479c429bb2d",
        ),
        (
            "E_i",
            &k.e_i[..],
            "d463ae9c75e166f8e011e7ede47241bdf03ca3a4f4e9e80873b5c9facb7b916e",
        ),
        (
            "instance",
            &k.instance[..],
            "b6ea14d411fcc53dea4f44c9bb4d7408",
        ),
        (
            "r2i[0]",
            &k.r2i0[..],
            "6231accd134dccc9e16c12986ba73c4c6f3bd3020cf4b38d61f7b758d2bcef40",
        ),
        (
            "E_r",
            &k.e_r[..],
            "a9e8e1563c3056fdc47cb0e4f33c8d88b345986cdedb96a780b5f531abc8fd7a",
        ),
        (
            "i2r[1]",
            &k.i2r1[..],
            "df3e23cd049aaec614af8f7fc0aaaab7b279f33ec205c14c9651720db061b4a8",
        ),
        (
            "r2i[1]",
            &k.r2i1[..],
            "19b1ccb96a4ab99709b381d897b0cdb9ad9e12e39d3f553b9c20e0dfa20a7d4b",
        ),
    ];
    for (name, value, hex_value) in published {
        assert_eq!(hex::encode(value), hex_value, "{name}");
    }

    // The random draws, in the published order.
    let mut rng = rand_chacha::ChaCha20Rng::from_seed([7; 32]);
    let mut draw = |n: usize| {
        let mut b = vec![0u8; n];
        rng.fill_bytes(&mut b);
        b
    };
    let (session, hpke_ikm, e_i, instance, e_r, ack_id) =
        (draw(16), draw(32), draw(32), draw(16), draw(32), draw(16));
    assert_eq!(session, k.session.0);
    assert_eq!(instance, k.instance);
    assert_eq!(hex::encode(&ack_id), v.ack.id.to_hex());
    let (_, eph) = Kem::derive_keypair(&hpke_ikm);
    assert_eq!(
        eph.to_bytes()[..],
        k.enc,
        "enc = DeriveKeyPair(32 drawn bytes)"
    );

    // 14.2: HPKE Auth mode, the recipient's side, and the exports.
    let (alice, bob) = (&v.alice, &v.bob);
    let binding = [
        alice.cell_id().key().as_bytes().as_slice(),
        alice.node_id().key().as_bytes(),
        bob.cell_id().key().as_bytes(),
        bob.node_id().key().as_bytes(),
    ]
    .concat();
    let info = [b"cellmesh e2e v2 session".as_slice(), &session, &binding].concat();
    assert_eq!(info.len(), 167);
    let ctx = hpke::setup_receiver::<hpke::aead::ExportOnlyAead, hpke::kdf::HkdfSha256, Kem>(
        &hpke::OpModeR::Auth(
            <Kem as hpke::Kem>::PublicKey::from_bytes(alice.node.agreement.public().as_bytes())
                .unwrap(),
        ),
        &<Kem as hpke::Kem>::PrivateKey::from_bytes(&bob.node.agreement.dangerous_bytes()[..])
            .unwrap(),
        &<Kem as hpke::Kem>::EncappedKey::from_bytes(&k.enc).unwrap(),
        &info,
    )
    .unwrap();
    let mut keys = [0u8; 64];
    ctx.export(b"cellmesh e2e v2 keys", &mut keys).unwrap();
    let mut salt = [0u8; 32];
    ctx.export(b"cellmesh e2e v2 ratchet", &mut salt).unwrap();
    assert_eq!(keys[..32], k.i2r0);
    assert_eq!(keys[32..], k.reply_base);
    assert_eq!(salt, k.salt);

    // The instance's reply key.
    let mut r2i0 = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&instance), &k.reply_base)
        .expand(b"cellmesh e2e v2 reply", &mut r2i0)
        .unwrap();
    assert_eq!(r2i0, k.r2i0);

    // 14.3: epoch 1 from the two ephemerals (clamped drawn bytes), mixed with the instance.
    let secret = |b: &[u8]| x25519_dalek::StaticSecret::from(<[u8; 32]>::try_from(b).unwrap());
    let (e_i, e_r) = (secret(&e_i), secret(&e_r));
    assert_eq!(x25519_dalek::PublicKey::from(&e_i).as_bytes(), &k.e_i);
    assert_eq!(x25519_dalek::PublicKey::from(&e_r).as_bytes(), &k.e_r);
    let shared = e_i.diffie_hellman(&x25519_dalek::PublicKey::from(k.e_r));
    assert_eq!(
        shared.as_bytes(),
        e_r.diffie_hellman(&x25519_dalek::PublicKey::from(k.e_i))
            .as_bytes()
    );
    let mut okm = [0u8; 64];
    Hkdf::<Sha256>::new(Some(&k.salt), shared.as_bytes())
        .expand_multi_info(&[b"cellmesh e2e v2 epoch 1", &instance], &mut okm)
        .unwrap();
    assert_eq!(okm[..32], k.i2r1);
    assert_eq!(okm[32..], k.r2i1);

    // 14.5: each key opens its envelope (nonce = epoch ‖ counter; aad = label ‖ the clear
    // bytes ‖ sender cell, node ‖ recipient cell, node ‖ envelope id) to the published text.
    let reversed = [&binding[64..], &binding[..64]].concat();
    let open = |key: &[u8; 32], envelope: &[u8], sealed_at: usize, binding: &[u8], id: [u8; 16]| {
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).unwrap());
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&envelope[sealed_at - 20..sealed_at - 8]);
        let aad = [
            b"cellmesh e2e v2".as_slice(),
            &envelope[..sealed_at],
            binding,
            &id,
        ]
        .concat();
        let mut buf = envelope[sealed_at..].to_vec();
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(&aad),
                &mut buf,
            )
            .expect("the published key opens its envelope");
        (aad.len(), plain.to_vec())
    };
    let tokens = 4 + alice.node_token.to_bytes().len() + alice.identity.to_bytes().len();
    let (aad_len, init) = open(
        &k.i2r0,
        &v.envelope,
        18 + 32 + tokens + 20,
        &binding,
        [0x11; 16],
    );
    assert_eq!(aad_len, 753, "the INIT's aad");
    assert_eq!(
        init,
        [&[1][..], &k.e_i, &[1, 0, 0, 0, 5], b"hello"].concat()
    );
    let (aad_len, ack) = open(
        &k.r2i0,
        &v.ack.envelope,
        18 + 16 + 20,
        &reversed,
        v.ack.id.0,
    );
    assert_eq!(aad_len, 213, "a REPLY's aad");
    assert_eq!(ack, [&[1][..], &k.e_r, &[2, 0, 1], &[0x11; 16]].concat());
    let (aad_len, second) = open(&k.i2r1, &v.second, 18 + 20, &binding, [0x22; 16]);
    assert_eq!(aad_len, 197, "a MSG's aad");
    assert_eq!(second, [&[0, 1, 0, 0, 0, 5][..], b"again"].concat());
    let (_, bundle) = open(&k.i2r1, &v.bundle, 18 + 20, &binding, [0x33; 16]);
    let bundle_plain = [
        &[0, 3, 0, 2][..],
        &[0x44; 16],
        &[0, 0, 0, 3],
        b"one",
        &[0x55; 16],
        &[0, 0, 0, 3],
        b"two",
    ]
    .concat();
    assert_eq!(bundle, bundle_plain);
}

/// The relay records of PROTOCOL.md section 13.7: a REVOKE carrying the revocation vector,
/// the DIRECTORY (0x34) that then carries it, and REVOKED, accepted and refused.
#[test]
fn revocation_records_to_bytes() {
    use bytes::Bytes;
    use cellmesh_core::relay::{Record, RefuseCode};
    use cellmesh_core::revoked::CellRevocation;
    let token = vector_revocation_token();
    let r = CellRevocation::verify(&token).unwrap();
    let cell = Mnemonic::parse(CELLS[0].mnemonic).unwrap().derive("");
    assert_eq!(r.cell(), cell.cell_id());
    assert_eq!(r.node().to_string(), NODE_ID);
    let records = [
        Record::Revoke {
            request: 7,
            revocation: Box::new(token.clone()),
        },
        Record::Directory {
            request: 7,
            cell: cell.cell_id(),
            devices: Vec::new(),
            revocations: vec![token.clone()],
        },
        Record::Revoked {
            request: 7,
            result: Ok(()),
        },
        Record::Revoked {
            request: 8,
            result: Err(RefuseCode::TooMany),
        },
    ];
    let encoded: Vec<String> = records
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            r.encode(&mut out);
            assert_eq!(Record::decode(Bytes::from(out.clone())).unwrap(), *r);
            hex(&out)
        })
        .collect();
    let t = hex(&token.to_bytes());
    let len = format!("{:04x}", token.to_bytes().len());
    assert_eq!(hex(&token.to_bytes()), REVOCATION_HEX);
    assert_eq!(token.fingerprint().to_string(), REVOCATION_FINGERPRINT);
    assert_eq!(encoded[0], format!("2400000007{len}{t}"));
    assert_eq!(
        encoded[1],
        format!(
            "3400000007{}0001{len}{t}",
            hex(cell.signing().public().as_bytes())
        )
    );
    assert_eq!(encoded[2], "350000000700");
    assert_eq!(encoded[3], "350000000808");
}
