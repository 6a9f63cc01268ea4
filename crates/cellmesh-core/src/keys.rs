//! Key types. Public keys are checked once when made; secrets are zeroized on drop, print as
//! `..` in `Debug`, implement neither `Display` nor serialization, and expose their bytes only
//! through methods named `dangerous_*`.

use std::fmt;

use ed25519_dalek::Signer as _;
use rand_core::CryptoRngCore;
use thiserror::Error;
use zeroize::Zeroizing;

/// Length of an Ed25519 public key, an X25519 public key and every secret key here.
pub const KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// A byte string is not a valid key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a valid Ed25519 public key")]
pub struct InvalidKey;

/// A signature did not verify. Carries no detail on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("signature verification failed")]
pub struct BadSignature;

/// An Ed25519 public (verifying) key: identifies a cell or a node and checks its signatures.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// Parses 32 bytes, refusing encodings that are not points on the curve, points of
    /// small order (which would let anyone forge signatures for that key), and encodings that
    /// are not the canonical one of their point (y >= p, or the x sign bit set with x = 0).
    /// The last matters because a key's bytes *are* its Cell or Node ID: a second encoding
    /// of one key would be a second ID, which a revocation of the first would not name.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, InvalidKey> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| InvalidKey)?;
        if key.is_weak() {
            return Err(InvalidKey);
        }
        // Decompression reduces y mod p and takes the sign bit as given, so it accepts
        // y + p (for y < 19) and -0; compressing the point again gives the one canonical
        // encoding.
        if key.to_edwards().compress().as_bytes() != bytes {
            return Err(InvalidKey);
        }
        Ok(Self(*bytes))
    }

    /// Wraps 32 bytes without checking that they are a point of large order, which costs a
    /// point decompression (tens of microseconds). Only for identifiers in routing fields
    /// that are compared with keys checked elsewhere; [`PublicKey::verify`] still refuses any
    /// signature under a key that is not a valid point of large order.
    pub fn from_bytes_unchecked(bytes: &[u8; KEY_LEN]) -> Self {
        Self(*bytes)
    }

    /// The 32-byte encoding.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Checks `signature` over `context || message` with strict (non-malleable) verification.
    pub fn verify(
        &self,
        context: &[u8],
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), BadSignature> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0).map_err(|_| BadSignature)?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        let msg = [context, message].concat();
        key.verify_strict(&msg, &sig).map_err(|_| BadSignature)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex_prefix(&self.0))
    }
}

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; SIGNATURE_LEN]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex_prefix(&self.0))
    }
}

/// An Ed25519 signing key.
pub struct SigningSecret(ed25519_dalek::SigningKey);

impl SigningSecret {
    /// Draws a fresh key from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut seed = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// Rebuilds the key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; KEY_LEN]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `context || message`. Every signature in cellmesh carries a context string so a
    /// signature made for one purpose is never valid for another.
    pub fn sign(&self, context: &[u8], message: &[u8]) -> Signature {
        let msg = Zeroizing::new([context, message].concat());
        Signature(self.0.sign(&msg).to_bytes())
    }

    /// The 32-byte seed. Only for sealing into the keystore.
    pub fn dangerous_seed(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(..)")
    }
}

/// A byte string is not an acceptable X25519 public key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a canonical X25519 public key of large order")]
pub struct InvalidAgreementKey;

/// An X25519 public key, used for key agreement (handshakes, end-to-end sessions).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AgreementPublicKey([u8; KEY_LEN]);

impl AgreementPublicKey {
    /// Parses 32 bytes, refusing the u-coordinates of points of small order (with them every
    /// Diffie-Hellman result is all zeros, or one of a few values anyone can compute) and
    /// encodings that are not canonical (u >= p, or bit 255 set, which X25519 ignores). This
    /// is the check for keys a token names: a certified key is used for every session with
    /// its holder, and it has one encoding.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, InvalidAgreementKey> {
        if !is_canonical_u(bytes) || SMALL_ORDER_U.contains(bytes) {
            return Err(InvalidAgreementKey);
        }
        Ok(Self(*bytes))
    }

    /// Wraps 32 bytes unchecked: for ephemeral keys read off the wire, which go straight into
    /// [`AgreementSecret::diffie_hellman`], and that refuses small order itself.
    pub fn from_bytes_unchecked(bytes: &[u8; KEY_LEN]) -> Self {
        Self(*bytes)
    }

    /// The 32-byte encoding.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for AgreementPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgreementPublicKey({})", hex_prefix(&self.0))
    }
}

/// An X25519 static secret.
pub struct AgreementSecret(x25519_dalek::StaticSecret);

impl AgreementSecret {
    /// Draws a fresh key from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_bytes(&bytes)
    }

    /// Rebuilds the key from its 32 bytes (clamped on use, per RFC 7748).
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self(x25519_dalek::StaticSecret::from(*bytes))
    }

    /// The matching public key.
    pub fn public(&self) -> AgreementPublicKey {
        AgreementPublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// X25519 with `theirs`; `None` when their key is of small order (the result would be
    /// all zeros, contributing nothing secret).
    pub fn diffie_hellman(&self, theirs: &AgreementPublicKey) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let shared = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(theirs.0));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }

    /// The 32 secret bytes. Only for sealing into the keystore and for handing to a
    /// handshake implementation.
    pub fn dangerous_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }
}

impl fmt::Debug for AgreementSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgreementSecret(..)")
    }
}

/// A signing key and an agreement key that belong together: a cell's, or a node's.
#[derive(Debug)]
pub struct KeyPair {
    /// Signs tokens.
    pub signing: SigningSecret,
    /// Agrees on keys.
    pub agreement: AgreementSecret,
}

impl KeyPair {
    /// Draws both keys from `rng` (how each device makes its node keys).
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        Self {
            signing: SigningSecret::generate(rng),
            agreement: AgreementSecret::generate(rng),
        }
    }

    /// A second copy of the secrets (for a running node that must re-sign its tokens).
    pub fn dangerous_clone(&self) -> Self {
        Self {
            signing: SigningSecret::from_seed(&self.signing.dangerous_seed()),
            agreement: AgreementSecret::from_bytes(&self.agreement.dangerous_bytes()),
        }
    }
}

/// p = 2^255 - 19, little-endian.
const P: [u8; KEY_LEN] = {
    let mut p = [0xff; KEY_LEN];
    p[0] = 0xed;
    p[31] = 0x7f;
    p
};

/// The canonical u-coordinates (little-endian) of every point of small order on Curve25519
/// and on its twist: the curve's torsion is Z/8 (u = 0 of order 2, u = 1 of order 4, two u of
/// order 8), the twist's Z/4 (u = 0, and u = p - 1 of order 4). Non-canonical encodings of
/// them (p, p + 1, bit 255 set) are refused as non-canonical.
const SMALL_ORDER_U: [[u8; KEY_LEN]; 5] = [
    [0; KEY_LEN],
    {
        let mut one = [0; KEY_LEN];
        one[0] = 1;
        one
    },
    {
        let mut minus_one = P;
        minus_one[0] = 0xec;
        minus_one
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
];

/// Whether the little-endian `u` is below p (which also means bit 255 is clear).
fn is_canonical_u(u: &[u8; KEY_LEN]) -> bool {
    // Compare from the most significant byte down; public data, so no need for constant time.
    u.iter().rev().cmp(P.iter().rev()) == std::cmp::Ordering::Less
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        + ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_bound_to_their_context() {
        let key = SigningSecret::from_seed(&[7; 32]);
        let sig = key.sign(b"ctx-a", b"hello");
        assert!(key.public().verify(b"ctx-a", b"hello", &sig).is_ok());
        assert!(key.public().verify(b"ctx-b", b"hello", &sig).is_err());
        assert!(key.public().verify(b"ctx-a", b"hellO", &sig).is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let key = SigningSecret::from_seed(&[7; 32]);
        assert_eq!(format!("{key:?}"), "SigningSecret(..)");
        let a = AgreementSecret::from_bytes(&[9; 32]);
        assert_eq!(format!("{a:?}"), "AgreementSecret(..)");
    }

    #[test]
    fn small_order_public_keys_are_refused() {
        // The identity point and a point of order 2.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(InvalidKey));
        let mut order2 = [0u8; 32];
        order2[0] = 0xec;
        order2[1..31].fill(0xff);
        order2[31] = 0x7f;
        assert_eq!(PublicKey::from_bytes(&order2), Err(InvalidKey));
    }

    /// The 32-byte encoding of y = p + `k` (p = 2^255 - 19), sign bit clear: for k < 19 it is
    /// below 2^255, so it fits the encoding and names the same y as `k`.
    fn p_plus(k: u8) -> [u8; 32] {
        let mut bytes = [0xff; 32];
        bytes[0] = 0xed + k;
        bytes[31] = 0x7f;
        bytes
    }

    #[test]
    fn non_canonical_encodings_are_refused_so_one_key_has_one_id() {
        // y = 3 is the y of two points of large order (one per sign of x); y = p + 3 is a
        // second encoding of each, which curve25519-dalek's decompression accepts.
        for sign in [0, 0x80] {
            let mut canonical = [0u8; 32];
            canonical[0] = 3;
            canonical[31] |= sign;
            assert!(PublicKey::from_bytes(&canonical).is_ok());
            let mut alias = p_plus(3);
            alias[31] |= sign;
            assert!(ed25519_dalek::VerifyingKey::from_bytes(&alias).is_ok());
            assert_eq!(PublicKey::from_bytes(&alias), Err(InvalidKey));
        }
        // Every y in [p, 2^255), either sign: refused whether or not it is a point.
        for k in 0..19 {
            for sign in [0, 0x80] {
                let mut alias = p_plus(k);
                alias[31] |= sign;
                assert_eq!(
                    PublicKey::from_bytes(&alias),
                    Err(InvalidKey),
                    "y = p + {k}"
                );
            }
        }
        // The sign bit set with x = 0 (y = 1 and y = -1): the same points as with it clear.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        identity[31] = 0x80;
        assert_eq!(PublicKey::from_bytes(&identity), Err(InvalidKey));
        let mut minus_one = p_plus(0);
        minus_one[0] = 0xec;
        minus_one[31] = 0xff;
        assert_eq!(PublicKey::from_bytes(&minus_one), Err(InvalidKey));
    }

    #[test]
    fn agreement_keys_of_small_order_are_exactly_those_diffie_hellman_refuses() {
        let ours = AgreementSecret::from_bytes(&[5; 32]);
        for u in SMALL_ORDER_U {
            assert_eq!(AgreementPublicKey::from_bytes(&u), Err(InvalidAgreementKey));
            let theirs = AgreementPublicKey::from_bytes_unchecked(&u);
            assert!(ours.diffie_hellman(&theirs).is_none(), "{u:02x?}");
            // The same points encoded with bit 255 set (which X25519 ignores).
            let mut high = u;
            high[31] |= 0x80;
            assert_eq!(
                AgreementPublicKey::from_bytes(&high),
                Err(InvalidAgreementKey)
            );
        }
        let real = AgreementSecret::from_bytes(&[9; 32]).public();
        assert_eq!(AgreementPublicKey::from_bytes(real.as_bytes()), Ok(real));
        assert!(ours.diffie_hellman(&real).is_some());
    }

    #[test]
    fn non_canonical_agreement_keys_are_refused() {
        // u in [p, 2^255) and bit 255 set are other encodings of u mod 2^255 mod p.
        for k in 0..19 {
            assert_eq!(
                AgreementPublicKey::from_bytes(&p_plus(k)),
                Err(InvalidAgreementKey),
                "u = p + {k}"
            );
        }
        let mut below_p = P;
        below_p[0] -= 1;
        assert!(AgreementPublicKey::from_bytes(&below_p).is_err()); // p - 1: small order
        below_p[0] -= 1;
        assert!(AgreementPublicKey::from_bytes(&below_p).is_ok()); // p - 2
        let mut high = *AgreementSecret::from_bytes(&[9; 32]).public().as_bytes();
        high[31] |= 0x80;
        assert_eq!(
            AgreementPublicKey::from_bytes(&high),
            Err(InvalidAgreementKey)
        );
    }

    proptest::proptest! {
        #[test]
        fn a_canonical_agreement_key_is_accepted_iff_diffie_hellman_contributes(
            mut u in proptest::prelude::any::<[u8; 32]>(),
            pick in 0usize..8,
        ) {
            u[31] &= 0x7f;
            // Mostly random keys, sometimes a small-order one.
            if let Some(small) = SMALL_ORDER_U.get(pick) {
                u = *small;
            }
            let ours = AgreementSecret::from_bytes(&[5; 32]);
            let contributes = ours
                .diffie_hellman(&AgreementPublicKey::from_bytes_unchecked(&u))
                .is_some();
            proptest::prop_assert_eq!(
                AgreementPublicKey::from_bytes(&u).is_ok(),
                contributes && is_canonical_u(&u)
            );
        }
    }

    #[test]
    fn off_curve_public_keys_are_refused() {
        // y = 2 is not the y-coordinate of any point on edwards25519.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert_eq!(PublicKey::from_bytes(&bytes), Err(InvalidKey));
    }
}
