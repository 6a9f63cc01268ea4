//! Sealing a device's secrets at rest: Argon2id stretches the passphrase into a key, and
//! ChaCha20-Poly1305 encrypts the secrets under it. Pure functions; the runtime writes the
//! result to disk.
//!
//! ```text
//! key        = Argon2id(passphrase, salt[16], m = memory_kib, t = iterations, p = lanes) → 32 bytes
//! ciphertext = ChaCha20-Poly1305(key, nonce[12], aad = "cellmesh keystore v1\0" || header, secrets)
//! secrets    = version:u8(=1) cell_signing[32] cell_agreement[32] node_signing[32] node_agreement[32]
//! ```
//!
//! Every seal draws a new salt, so every seal uses a new key, and the random nonce is never
//! reused under a key. `header` is whatever public data the caller stores beside the
//! ciphertext (the runtime binds the Cell ID and node ID), so swapping that data is detected
//! on open. A wrong passphrase and a corrupted file are indistinguishable on purpose.

use std::fmt;

use rand_core::CryptoRngCore;
use ring::aead;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::Reader;
use crate::keys::{AgreementSecret, KEY_LEN, KeyPair, SigningSecret};
use crate::mnemonic::CellSecrets;

/// Length of the Argon2id salt.
pub const SALT_LEN: usize = 16;
/// Length of the AEAD nonce.
pub const NONCE_LEN: usize = 12;
const SECRETS_VERSION: u8 = 1;
const SECRETS_LEN: usize = 1 + 4 * KEY_LEN;
const AAD_CONTEXT: &[u8] = b"cellmesh keystore v1\0";

/// Argon2id cost parameters. Stored beside the ciphertext so they can be raised later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Degree of parallelism.
    pub lanes: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane: RFC 9106's second recommended setting with one lane. A
    /// guess costs an attacker 64 MiB and about a fifth of a second of one core.
    pub const DEFAULT: Self = Self {
        memory_kib: 64 * 1024,
        iterations: 3,
        lanes: 1,
    };
    /// Upper bounds accepted from a keystore file, so a tampered file cannot make `open`
    /// allocate without limit.
    const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    const MAX_ITERATIONS: u32 = 64;
    const MAX_LANES: u32 = 16;
}

/// Sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeystoreError {
    /// The passphrase is wrong, or the keystore was altered. Deliberately no more detail.
    #[error("wrong passphrase, or the keystore is damaged")]
    WrongPassphraseOrCorrupt,
    /// The stored Argon2id parameters are out of range.
    #[error("keystore has unsupported key-derivation parameters")]
    BadParams,
    /// The decrypted secrets are not in a known format.
    #[error("keystore secrets are in an unknown format")]
    UnknownFormat,
    /// The passphrase is empty.
    #[error("the passphrase must not be empty")]
    EmptyPassphrase,
}

/// A passphrase. Zeroized on drop, never printed.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Wraps `s`.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The passphrase text.
    pub fn dangerous_as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

/// What one device keeps secret: its cell's keys and its own node keys.
#[derive(Debug)]
pub struct DeviceSecrets {
    /// The cell's keys, derived from the mnemonic.
    pub cell: CellSecrets,
    /// This device's node keys, random.
    pub node: KeyPair,
}

impl DeviceSecrets {
    /// A second copy of the secrets (for a running node that must re-sign its tokens).
    pub fn dangerous_clone(&self) -> Self {
        Self {
            cell: CellSecrets::from_keys(KeyPair {
                signing: SigningSecret::from_seed(&self.cell.signing().dangerous_seed()),
                agreement: AgreementSecret::from_bytes(&self.cell.agreement().dangerous_bytes()),
            }),
            node: self.node.dangerous_clone(),
        }
    }
}

/// Sealed secrets, ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Argon2id parameters.
    pub params: KdfParams,
    /// Argon2id salt.
    pub salt: [u8; SALT_LEN],
    /// AEAD nonce.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// Encrypts `secrets` under `passphrase`, binding `header`.
pub fn seal(
    secrets: &DeviceSecrets,
    passphrase: &Passphrase,
    params: KdfParams,
    header: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Sealed, KeystoreError> {
    if passphrase.0.is_empty() {
        return Err(KeystoreError::EmptyPassphrase);
    }
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut salt);
    rng.fill_bytes(&mut nonce);
    let key = stretch(&normalize(passphrase), &salt, params)?;
    let mut buf = encode_secrets(secrets);
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::from(aad(header)),
        &mut *buf,
    )
    .map_err(|_| KeystoreError::WrongPassphraseOrCorrupt)?;
    Ok(Sealed {
        params,
        salt,
        nonce,
        ciphertext: buf.to_vec(),
    })
}

/// Decrypts sealed secrets. A wrong passphrase or any altered byte (including of `header`)
/// fails with [`KeystoreError::WrongPassphraseOrCorrupt`].
pub fn open(
    sealed: &Sealed,
    passphrase: &Passphrase,
    header: &[u8],
) -> Result<DeviceSecrets, KeystoreError> {
    let normalized = normalize(passphrase);
    // Sealed before passphrases were normalized: the text as typed, if that differs.
    let earlier = (normalized[..] != *passphrase.0.as_bytes()).then(|| passphrase.0.as_bytes());
    for text in std::iter::once(&normalized[..]).chain(earlier) {
        let key = stretch(text, &sealed.salt, sealed.params)?;
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        if let Ok(plain) = key.open_in_place(
            aead::Nonce::assume_unique_for_key(sealed.nonce),
            aead::Aad::from(aad(header)),
            &mut buf,
        ) {
            return decode_secrets(plain);
        }
    }
    Err(KeystoreError::WrongPassphraseOrCorrupt)
}

/// The passphrase as it is stretched: NFKD-normalized UTF-8, as BIP39 treats its own, so that
/// one typed with an accent opens the keystore whichever way a keyboard composes it.
fn normalize(passphrase: &Passphrase) -> Zeroizing<Vec<u8>> {
    use unicode_normalization::UnicodeNormalization as _;
    let mut out = Zeroizing::new(Vec::with_capacity(passphrase.0.len()));
    let mut buf = [0u8; 4];
    for c in passphrase.0.nfkd() {
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out
}

fn aad(header: &[u8]) -> Vec<u8> {
    [AAD_CONTEXT, header].concat()
}

fn stretch(
    passphrase: &[u8],
    salt: &[u8; SALT_LEN],
    p: KdfParams,
) -> Result<aead::LessSafeKey, KeystoreError> {
    if p.memory_kib > KdfParams::MAX_MEMORY_KIB
        || p.iterations > KdfParams::MAX_ITERATIONS
        || p.lanes > KdfParams::MAX_LANES
    {
        return Err(KeystoreError::BadParams);
    }
    let params = argon2::Params::new(p.memory_kib, p.iterations, p.lanes, Some(KEY_LEN))
        .map_err(|_| KeystoreError::BadParams)?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    argon
        .hash_password_into(passphrase, salt, key.as_mut())
        .map_err(|_| KeystoreError::BadParams)?;
    let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, key.as_ref())
        .map_err(|_| KeystoreError::BadParams)?;
    Ok(aead::LessSafeKey::new(unbound))
}

fn encode_secrets(s: &DeviceSecrets) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(SECRETS_LEN + 16));
    out.push(SECRETS_VERSION);
    out.extend_from_slice(s.cell.signing().dangerous_seed().as_ref());
    out.extend_from_slice(s.cell.agreement().dangerous_bytes().as_ref());
    out.extend_from_slice(s.node.signing.dangerous_seed().as_ref());
    out.extend_from_slice(s.node.agreement.dangerous_bytes().as_ref());
    out
}

fn decode_secrets(plain: &[u8]) -> Result<DeviceSecrets, KeystoreError> {
    let mut r = Reader::new(plain);
    let unknown = |_| KeystoreError::UnknownFormat;
    if r.u8().map_err(unknown)? != SECRETS_VERSION {
        return Err(KeystoreError::UnknownFormat);
    }
    let mut pair = || -> Result<KeyPair, KeystoreError> {
        let signing = Zeroizing::new(r.array::<KEY_LEN>().map_err(unknown)?);
        let agreement = Zeroizing::new(r.array::<KEY_LEN>().map_err(unknown)?);
        Ok(KeyPair {
            signing: SigningSecret::from_seed(&signing),
            agreement: AgreementSecret::from_bytes(&agreement),
        })
    };
    let cell = CellSecrets::from_keys(pair()?);
    let node = pair()?;
    r.finish().map_err(unknown)?;
    Ok(DeviceSecrets { cell, node })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mnemonic::Mnemonic;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const FAST: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
        lanes: 1,
    };

    fn secrets(rng: &mut ChaCha20Rng) -> DeviceSecrets {
        DeviceSecrets {
            cell: Mnemonic::generate(rng).derive(""),
            node: KeyPair::generate(rng),
        }
    }

    /// A passphrase with an accent opens the keystore whichever way it was composed, and a
    /// keystore sealed under the text as typed (before passphrases were normalized) still
    /// opens.
    #[test]
    fn passphrases_are_normalized_and_old_keystores_still_open() {
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let s = secrets(&mut rng);
        let composed = Passphrase::new("caf\u{e9} au lait".into());
        let decomposed = Passphrase::new("cafe\u{301} au lait".into());
        let sealed = seal(&s, &composed, FAST, b"hdr", &mut rng).unwrap();
        assert!(open(&sealed, &decomposed, b"hdr").is_ok());
        assert!(open(&sealed, &composed, b"hdr").is_ok());
        // As an earlier version sealed it: the raw bytes of the composed form.
        let key = stretch("caf\u{e9} au lait".as_bytes(), &sealed.salt, FAST).unwrap();
        let mut buf = encode_secrets(&s).to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(sealed.nonce),
                aead::Aad::from(aad(b"hdr")),
                &mut buf,
            )
            .unwrap();
        buf.extend_from_slice(tag.as_ref());
        let old = Sealed {
            ciphertext: buf,
            ..sealed.clone()
        };
        assert!(open(&old, &composed, b"hdr").is_ok());
        assert_eq!(
            open(&old, &Passphrase::new("other".into()), b"hdr").err(),
            Some(KeystoreError::WrongPassphraseOrCorrupt)
        );
    }

    #[test]
    fn seal_open_round_trip_and_wrong_passphrase_or_header_fails() {
        let mut rng = ChaCha20Rng::from_seed([3; 32]);
        let s = secrets(&mut rng);
        let pass = Passphrase::new("correct horse".into());
        let sealed = seal(&s, &pass, FAST, b"hdr", &mut rng).unwrap();
        let opened = open(&sealed, &pass, b"hdr").unwrap();
        assert_eq!(opened.cell.cell_id(), s.cell.cell_id());
        assert_eq!(opened.node.signing.public(), s.node.signing.public());
        assert_eq!(opened.node.agreement.public(), s.node.agreement.public());
        let wrong = Passphrase::new("Correct horse".into());
        assert_eq!(
            open(&sealed, &wrong, b"hdr").err(),
            Some(KeystoreError::WrongPassphraseOrCorrupt)
        );
        assert_eq!(
            open(&sealed, &pass, b"hdR").err(),
            Some(KeystoreError::WrongPassphraseOrCorrupt)
        );
        let mut flipped = sealed.clone();
        flipped.ciphertext[5] ^= 1;
        assert!(open(&flipped, &pass, b"hdr").is_err());
    }

    /// SECURITY.md, "Nonces": every seal draws a new salt, so a new key; the same secrets
    /// under the same passphrase sealed twice share neither salt nor nonce nor ciphertext.
    #[test]
    fn every_seal_has_a_salt_and_so_a_key_of_its_own() {
        let mut rng = ChaCha20Rng::from_seed([6; 32]);
        let s = secrets(&mut rng);
        let pass = Passphrase::new("pw".into());
        let a = seal(&s, &pass, FAST, b"", &mut rng).unwrap();
        let b = seal(&s, &pass, FAST, b"", &mut rng).unwrap();
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn ciphertext_does_not_contain_the_secrets() {
        let mut rng = ChaCha20Rng::from_seed([4; 32]);
        let s = secrets(&mut rng);
        let pass = Passphrase::new("pw".into());
        let sealed = seal(&s, &pass, FAST, b"", &mut rng).unwrap();
        let seed = s.cell.signing().dangerous_seed();
        assert!(!sealed.ciphertext.windows(32).any(|w| w == seed.as_ref()));
    }

    #[test]
    fn absurd_params_and_empty_passphrase_are_refused() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let s = secrets(&mut rng);
        let pass = Passphrase::new("pw".into());
        let mut sealed = seal(&s, &pass, FAST, b"", &mut rng).unwrap();
        sealed.params.memory_kib = u32::MAX;
        assert_eq!(
            open(&sealed, &pass, b"").err(),
            Some(KeystoreError::BadParams)
        );
        assert_eq!(
            seal(&s, &Passphrase::new(String::new()), FAST, b"", &mut rng).err(),
            Some(KeystoreError::EmptyPassphrase)
        );
    }
}
