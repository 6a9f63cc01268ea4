//! Property tests of the token codec and verification rules.

use cellmesh_core::Timestamp;
use cellmesh_core::codec::DecodeError;
use cellmesh_core::keys::{AgreementPublicKey, AgreementSecret, PublicKey, SigningSecret};
use cellmesh_core::token::{
    Claims, MAX_SKEW, MAX_TOKEN_LEN, Name, RealmAnchor, Token, TokenError, TokenKind, VerifyError,
    attr,
};
use proptest::prelude::*;

const NOW: Timestamp = Timestamp(1_800_000_000);

fn issuer() -> SigningSecret {
    SigningSecret::from_seed(&[0x24; 32])
}

fn kind() -> impl Strategy<Value = TokenKind> {
    prop_oneof![
        Just(TokenKind::Node),
        Just(TokenKind::Identity),
        Just(TokenKind::Revocation)
    ]
}

prop_compose! {
    fn claims()(
        kind in kind(),
        realm in proptest::option::of("[a-z0-9._-]{1,64}"),
        subject in "\\PC{0,40}",
        audience in proptest::option::of(any::<[u8; 32]>()),
        uuid in any::<[u8; 16]>(),
        issued_at in any::<u64>(),
        window in (0u64..1 << 40, 0u64..1 << 40),
        key_seed in any::<[u8; 32]>(),
        agreement in proptest::option::of(any::<[u8; 32]>()),
        attributes in proptest::collection::btree_map("[a-z0-9._-]{1,16}", proptest::collection::vec(any::<u8>(), 0..64), 0..8),
    ) -> Claims {
        let issuer = issuer().public();
        Claims {
            kind,
            realm: realm.map(|r| Name::new(&r).unwrap()),
            subject,
            issuer,
            audience,
            uuid,
            issued_at: Timestamp(issued_at),
            not_before: Timestamp(window.0),
            expires_at: Timestamp(window.0 + window.1),
            key: SigningSecret::from_seed(&key_seed).public(),
            agreement_key: agreement.map(|a| AgreementSecret::from_bytes(&a).public()),
            attributes: attributes.into_iter().map(|(k, v)| (Name::new(&k).unwrap(), v)).collect(),
        }
    }
}

fn signed(claims: Claims, co_signed: bool) -> Token {
    let mut token = claims.sign(&issuer()).unwrap();
    if co_signed && token.claims().realm.is_some() {
        token
            .co_sign(&SigningSecret::from_seed(&[0x77; 32]))
            .unwrap();
    }
    token
}

/// Decodes and verifies at a time inside the token's window.
fn accept(bytes: &[u8]) -> Result<(), String> {
    let token = Token::decode(bytes).map_err(|e| e.to_string())?;
    let when = token.claims().not_before;
    token.verify(when, 0).map(|_| ()).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip_and_encoded_len(claims in claims(), co in any::<bool>()) {
        let token = signed(claims.clone(), co);
        let bytes = token.to_bytes();
        prop_assert_eq!(bytes.len(), token.encoded_len());
        prop_assert!(bytes.len() <= MAX_TOKEN_LEN);
        let decoded = Token::decode(&bytes).unwrap();
        prop_assert_eq!(decoded.claims(), &claims);
        prop_assert_eq!(decoded.fingerprint(), token.fingerprint());
        prop_assert_eq!(decoded.to_bytes(), bytes.clone());
        prop_assert!(accept(&bytes).is_ok());
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_rejected(claims in claims(), co in any::<bool>(), extra in any::<u8>()) {
        let bytes = signed(claims, co).to_bytes();
        for len in 0..bytes.len() {
            prop_assert!(Token::decode(&bytes[..len]).is_err(), "prefix of {} bytes accepted", len);
        }
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert_eq!(Token::decode(&longer).err(), Some(DecodeError::Trailing(1)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Token::decode(&bytes);
    }
}

proptest! {
    // Each case verifies a signature per bit of the token; fewer cases keep this to seconds.
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn every_single_bit_flip_is_rejected(claims in claims(), co in any::<bool>()) {
        let bytes = signed(claims, co).to_bytes();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(accept(&flipped).is_err(), "flip of bit {} accepted", bit);
        }
    }
}

fn token_at(not_before: u64, expires_at: u64) -> Token {
    let key = issuer().public();
    let mut c = Claims::new(
        TokenKind::Node,
        key,
        key,
        Timestamp(not_before),
        0,
        &mut rand_core::OsRng,
    );
    c.expires_at = Timestamp(expires_at);
    c.sign(&issuer()).unwrap()
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused_within_bounded_skew() {
    let t = token_at(NOW.0, NOW.0 + 100);
    assert!(t.verify(NOW, 0).is_ok());
    assert!(t.verify(NOW.plus(100), 0).is_ok());
    assert_eq!(
        t.verify(NOW.plus(101), 0).err(),
        Some(VerifyError::Expired {
            expires_at: NOW.plus(100),
            now: NOW.plus(101)
        })
    );
    assert!(matches!(
        t.verify(NOW.minus(1), 0),
        Err(VerifyError::NotYetValid { .. })
    ));
    assert!(t.verify(NOW.minus(60), 60).is_ok());
    assert!(t.verify(NOW.plus(160), 60).is_ok());
    // However much skew is asked for, no more than MAX_SKEW is granted.
    assert!(matches!(
        t.verify(NOW.plus(100 + MAX_SKEW + 1), u64::MAX),
        Err(VerifyError::Expired { .. })
    ));
    assert!(matches!(
        t.verify(NOW.minus(MAX_SKEW + 1), u64::MAX),
        Err(VerifyError::NotYetValid { .. })
    ));
}

#[test]
fn issuer_chain_accepted_and_forged_co_signature_refused() {
    let realm_issuer = SigningSecret::from_seed(&[0x77; 32]);
    let anchor = RealmAnchor {
        name: Name::new("acme").unwrap(),
        issuer: realm_issuer.public(),
    };
    let key = issuer().public();
    let mut claims = Claims::new(
        TokenKind::Identity,
        key,
        key,
        NOW,
        60,
        &mut rand_core::OsRng,
    );
    claims.realm = Some(anchor.name.clone());
    let plain = claims.clone().sign(&issuer()).unwrap();

    let mut endorsed = plain.clone();
    endorsed.co_sign(&realm_issuer).unwrap();
    assert!(endorsed.verify_in_realm(&anchor, NOW, 0).is_ok());
    assert_eq!(endorsed.fingerprint(), plain.fingerprint());

    // No co-signature, or one by a key that is not the realm's issuer.
    assert_eq!(
        plain.verify_in_realm(&anchor, NOW, 0).err(),
        Some(VerifyError::NotCoSigned)
    );
    let mut self_endorsed = plain.clone();
    self_endorsed.co_sign(&issuer()).unwrap();
    assert!(self_endorsed.verify(NOW, 0).is_ok());
    assert_eq!(
        self_endorsed.verify_in_realm(&anchor, NOW, 0).err(),
        Some(VerifyError::NotCoSigned)
    );

    // A forged co-signature: the realm issuer's key with someone else's signature bytes.
    let mut bytes = self_endorsed.to_bytes();
    let signer_at = bytes.len() - 96;
    bytes[signer_at..signer_at + 32].copy_from_slice(realm_issuer.public().as_bytes());
    let forged = Token::decode(&bytes).unwrap();
    assert_eq!(
        forged.verify_in_realm(&anchor, NOW, 0).err(),
        Some(VerifyError::BadSignature)
    );

    // A co-signature moved onto another token of the same realm.
    claims.uuid[0] ^= 1;
    let other = claims.sign(&issuer()).unwrap();
    assert_ne!(other.fingerprint(), endorsed.fingerprint());
    let mut grafted = other.to_bytes();
    grafted.pop();
    grafted.push(1);
    grafted.extend_from_slice(&endorsed.to_bytes()[endorsed.encoded_len() - 96..]);
    assert_eq!(
        Token::decode(&grafted)
            .unwrap()
            .verify_in_realm(&anchor, NOW, 0)
            .err(),
        Some(VerifyError::BadSignature)
    );

    // Right issuer, wrong realm.
    let other_anchor = RealmAnchor {
        name: Name::new("other").unwrap(),
        ..anchor
    };
    assert!(matches!(
        endorsed.verify_in_realm(&other_anchor, NOW, 0),
        Err(VerifyError::WrongRealm(_))
    ));
}

/// y = p + 3 (p = 2^255 - 19): a second encoding of the point whose y is 3.
fn non_canonical_key() -> [u8; 32] {
    let mut bytes = [0xff; 32];
    bytes[0] = 0xf0;
    bytes[31] = 0x7f;
    bytes
}

#[test]
fn non_canonical_key_encodings_are_refused() {
    let issuer_key = issuer().public();
    let alias = PublicKey::from_bytes_unchecked(&non_canonical_key());
    // As the subject's key.
    let c = Claims::new(
        TokenKind::Node,
        issuer_key,
        alias,
        NOW,
        60,
        &mut rand_core::OsRng,
    );
    let bytes = c.sign(&issuer()).unwrap().to_bytes();
    assert_eq!(
        Token::decode(&bytes).err(),
        Some(DecodeError::Invalid("key"))
    );
    // As an attribute naming a cell or node: no key.
    let c = Claims::new(
        TokenKind::Node,
        issuer_key,
        issuer_key,
        NOW,
        60,
        &mut rand_core::OsRng,
    )
    .with_attribute(attr::CELL, non_canonical_key().to_vec())
    .unwrap();
    let token = Token::decode(&c.sign(&issuer()).unwrap().to_bytes()).unwrap();
    assert_eq!(token.claims().key_attribute(attr::CELL), None);
}

/// The u-coordinates of every X25519 point of small order (on the curve or its twist), and
/// encodings of them and of a real key that are not canonical: none may be a token's
/// agreement key.
const BAD_AGREEMENT_KEYS: &[&str] = &[
    "0000000000000000000000000000000000000000000000000000000000000000", // 0, order 2
    "0100000000000000000000000000000000000000000000000000000000000000", // 1, order 4
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // p - 1, order 4 (twist)
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800", // order 8
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157", // order 8
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // p = 0
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // p + 1 = 1
    "0000000000000000000000000000000000000000000000000000000000000080", // 0, top bit set
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b880", // order 8, top bit set
];

#[test]
fn small_order_and_non_canonical_agreement_keys_are_refused() {
    let key = issuer().public();
    let real = AgreementSecret::from_bytes(&[9; 32]).public();
    let mut c = Claims::new(TokenKind::Node, key, key, NOW, 60, &mut rand_core::OsRng);
    c.agreement_key = Some(real);
    let good = c.sign(&issuer()).unwrap().to_bytes();
    assert!(Token::decode(&good).is_ok());
    let at = good
        .windows(32)
        .position(|w| w == real.as_bytes())
        .expect("the agreement key is in the encoding");
    let mut real_high = *real.as_bytes();
    real_high[31] |= 0x80;
    for bad in BAD_AGREEMENT_KEYS
        .iter()
        .map(|h| hex::decode(h).unwrap())
        .chain([real_high.to_vec()])
    {
        let mut bytes = good.clone();
        bytes[at..at + 32].copy_from_slice(&bad);
        assert_eq!(
            Token::decode(&bytes).err(),
            Some(DecodeError::Invalid("agreement key")),
            "{}",
            hex::encode(&bad)
        );
    }
}

#[test]
fn local_misuse_is_reported_not_signed() {
    let key = issuer().public();
    let c = Claims::new(TokenKind::Node, key, key, NOW, 60, &mut rand_core::OsRng);
    assert_eq!(
        c.clone().sign(&SigningSecret::from_seed(&[1; 32])).err(),
        Some(TokenError::WrongIssuerKey)
    );
    let mut long = c.clone();
    long.subject = "x".repeat(256);
    assert_eq!(
        long.sign(&issuer()).err(),
        Some(TokenError::TooLarge("subject"))
    );
    let mut backwards = c.clone();
    backwards.expires_at = NOW.minus(1);
    assert_eq!(
        backwards.sign(&issuer()).err(),
        Some(TokenError::EmptyValidity)
    );
    let mut weak = c.clone();
    weak.agreement_key = Some(AgreementPublicKey::from_bytes_unchecked(&[0; 32]));
    assert_eq!(
        weak.sign(&issuer()).err(),
        Some(TokenError::InvalidAgreementKey)
    );
    assert!(Name::new("Upper").is_err() && Name::new("").is_err());
    let mut t = c.sign(&issuer()).unwrap();
    assert_eq!(t.co_sign(&issuer()).err(), Some(TokenError::NoRealm));
}
