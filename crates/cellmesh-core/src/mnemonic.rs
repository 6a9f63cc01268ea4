//! The 12-word recovery phrase and the derivation of a cell's keys from it.
//!
//! ```text
//! entropy (128 bits, from the caller's RNG)
//!   └─ BIP39 English mnemonic, 12 words (the last word carries a 4-bit checksum)
//!        └─ seed = PBKDF2-HMAC-SHA512(NFKD(words), "mnemonic" || NFKD(passphrase), 2048)   (BIP39)
//!             ├─ HKDF-SHA512(salt = "cellmesh v1", ikm = seed, info = "cell signing ed25519")   → Ed25519 seed
//!             └─ HKDF-SHA512(salt = "cellmesh v1", ikm = seed, info = "cell agreement x25519")  → X25519 secret
//! ```
//!
//! The two keys come from one seed with different `info` strings, so neither reveals the
//! other and both are restored from the same words. The optional passphrase is BIP39's
//! "25th word": the same words with another passphrase are another cell. Both the typed
//! phrase and the passphrase are NFKD-normalized first, as BIP39 requires, so an accent typed
//! precomposed on one system and as a combining mark on another restores the same cell.

use std::fmt;

use bip39::Language;
use hkdf::Hkdf;
use rand_core::CryptoRngCore;
use sha2::Sha512;
use thiserror::Error;
use unicode_normalization::UnicodeNormalization as _;
use zeroize::Zeroizing;

use crate::id::CellId;
use crate::keys::{AgreementSecret, KEY_LEN, KeyPair, SigningSecret};

/// Number of words in a cellmesh recovery phrase.
pub const WORDS: usize = 12;
const ENTROPY_LEN: usize = 16;
const HKDF_SALT: &[u8] = b"cellmesh v1";
const INFO_SIGNING: &[u8] = b"cell signing ed25519";
const INFO_AGREEMENT: &[u8] = b"cell agreement x25519";

/// Why a phrase was refused. Each names the problem so a user can fix it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MnemonicError {
    /// Not 12 words.
    #[error("expected {WORDS} words, got {0}")]
    WordCount(usize),
    /// A word that is not in the BIP39 English list (1-based position). The word itself is
    /// not kept: a mistyped word is nearly a real one, and errors end up in logs.
    #[error("word {position} is not in the BIP39 English word list")]
    UnknownWord {
        /// 1-based position of the word.
        position: usize,
    },
    /// All words are valid but the checksum does not match: a word is wrong or out of order.
    #[error("checksum mismatch: a word is wrong or the words are out of order")]
    Checksum,
}

/// A 12-word BIP39 English recovery phrase. Zeroized on drop; `Debug` does not print it.
pub struct Mnemonic(bip39::Mnemonic);

impl Mnemonic {
    /// A new phrase from 128 bits drawn from `rng`.
    pub fn generate(rng: &mut impl CryptoRngCore) -> Self {
        let mut entropy = Zeroizing::new([0u8; ENTROPY_LEN]);
        rng.fill_bytes(entropy.as_mut());
        Self::from_entropy(&entropy)
    }

    /// The phrase that encodes `entropy` (used by test vectors).
    pub fn from_entropy(entropy: &[u8; ENTROPY_LEN]) -> Self {
        let m = bip39::Mnemonic::from_entropy_in(Language::English, entropy)
            .unwrap_or_else(|_| unreachable!("16 bytes is a valid BIP39 entropy length"));
        Self(m)
    }

    /// Parses a phrase as typed: NFKD-normalized (so fullwidth letters are letters), any
    /// case, any whitespace between words. Verifies the checksum.
    pub fn parse(phrase: &str) -> Result<Self, MnemonicError> {
        let phrase = nfkd(phrase);
        let words = Zeroizing::new(
            phrase
                .split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>(),
        );
        let normalized = Zeroizing::new(words.join(" "));
        let count = normalized.split(' ').filter(|w| !w.is_empty()).count();
        if count != WORDS {
            return Err(MnemonicError::WordCount(count));
        }
        if let Some(i) = normalized
            .split(' ')
            .position(|w| Language::English.find_word(w).is_none())
        {
            return Err(MnemonicError::UnknownWord { position: i + 1 });
        }
        bip39::Mnemonic::parse_in_normalized(Language::English, &normalized)
            .map(Self)
            .map_err(|e| match e {
                bip39::Error::BadWordCount(n) => MnemonicError::WordCount(n),
                _ => MnemonicError::Checksum,
            })
    }

    /// The words separated by single spaces. Show once, never store.
    pub fn phrase(&self) -> Zeroizing<String> {
        Zeroizing::new(self.0.to_string())
    }

    /// The individual words.
    pub fn words(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.words()
    }

    /// Derives the cell's keys. `passphrase` is the optional BIP39 passphrase (empty if none),
    /// as typed: it is NFKD-normalized here.
    pub fn derive(&self, passphrase: &str) -> CellSecrets {
        CellSecrets::from_bip39_seed(&self.dangerous_bip39_seed(passphrase))
    }

    /// The 64-byte BIP39 seed of NFKD(`passphrase`) (exposed for known-answer tests against
    /// BIP39's own vectors).
    pub fn dangerous_bip39_seed(&self, passphrase: &str) -> Zeroizing<[u8; 64]> {
        // The words are from the English list, ASCII and so already NFKD; the passphrase is
        // whatever the user's keyboard produced. bip39's `to_seed` would normalize too, but
        // into a copy nobody zeroizes.
        Zeroizing::new(self.0.to_seed_normalized(&nfkd(passphrase)))
    }
}

impl fmt::Debug for Mnemonic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Mnemonic(..)")
    }
}

/// NFKD of `s`, in a buffer sized up front: a buffer that grew would leave unzeroized copies
/// of a secret behind.
fn nfkd(s: &str) -> Zeroizing<String> {
    let len = s.nfkd().map(char::len_utf8).sum();
    let mut out = Zeroizing::new(String::with_capacity(len));
    out.extend(s.nfkd());
    out
}

/// A cell's secret keys: the identity signing key and the agreement key.
#[derive(Debug)]
pub struct CellSecrets {
    keys: KeyPair,
}

impl CellSecrets {
    /// Derives both keys from a 64-byte BIP39 seed.
    pub fn from_bip39_seed(seed: &[u8; 64]) -> Self {
        let hk = Hkdf::<Sha512>::new(Some(HKDF_SALT), seed);
        let mut signing = Zeroizing::new([0u8; KEY_LEN]);
        let mut agreement = Zeroizing::new([0u8; KEY_LEN]);
        // 32 bytes is far below HKDF-SHA512's 255 * 64 byte limit, so expand cannot fail.
        let ok = hk.expand(INFO_SIGNING, signing.as_mut()).is_ok()
            && hk.expand(INFO_AGREEMENT, agreement.as_mut()).is_ok();
        debug_assert!(ok);
        Self::from_keys(KeyPair {
            signing: SigningSecret::from_seed(&signing),
            agreement: AgreementSecret::from_bytes(&agreement),
        })
    }

    /// Wraps keys restored from the keystore.
    pub fn from_keys(keys: KeyPair) -> Self {
        Self { keys }
    }

    /// The Cell ID: the identity public key.
    pub fn cell_id(&self) -> CellId {
        CellId::from_key(self.keys.signing.public())
    }

    /// The identity signing key.
    pub fn signing(&self) -> &SigningSecret {
        &self.keys.signing
    }

    /// The agreement key for end-to-end sessions.
    pub fn agreement(&self) -> &AgreementSecret {
        &self.keys.agreement
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABANDON: &str = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about";

    #[test]
    fn parse_is_forgiving_about_spacing_and_case_only() {
        let m = Mnemonic::parse(&format!(
            "  {}\n",
            ABANDON.to_uppercase().replace(' ', "\t ")
        ))
        .unwrap();
        assert_eq!(m.phrase().as_str(), ABANDON);
        assert_eq!(Mnemonic::from_entropy(&[0; 16]).phrase().as_str(), ABANDON);
    }

    #[test]
    fn bad_words_count_and_checksum_are_named() {
        assert_eq!(
            Mnemonic::parse("abandon abandon"),
            Err(MnemonicError::WordCount(2))
        );
        let bad = ABANDON.replace("about", "abuot");
        assert_eq!(
            Mnemonic::parse(&bad),
            Err(MnemonicError::UnknownWord { position: 12 })
        );
        let swapped = ABANDON.replace("about", "abandon");
        assert_eq!(Mnemonic::parse(&swapped), Err(MnemonicError::Checksum));
    }

    #[test]
    fn passphrase_makes_another_cell_and_derivation_is_deterministic() {
        let m = Mnemonic::from_entropy(&[0; 16]);
        assert_eq!(m.derive("").cell_id(), m.derive("").cell_id());
        assert_ne!(m.derive("").cell_id(), m.derive("x").cell_id());
        assert_eq!(format!("{m:?}"), "Mnemonic(..)");
    }

    #[test]
    fn passphrase_is_nfkd_normalized_so_every_keyboard_restores_the_same_cell() {
        // `café` typed with a precomposed é (U+00E9) and with e + a combining acute (U+0301):
        // systems compose accents differently, and BIP39 hashes NFKD(passphrase).
        let m = Mnemonic::from_entropy(&[0; 16]);
        let composed = m.derive("caf\u{e9}").cell_id();
        assert_eq!(composed, m.derive("cafe\u{301}").cell_id());
        assert_ne!(composed, m.derive("cafe").cell_id());
        // Compatibility forms fold too (NFKD, not NFD): fullwidth letters are the letters.
        assert_eq!(
            m.derive("\u{ff34}\u{ff32}\u{ff25}\u{ff3a}\u{ff2f}\u{ff32}")
                .cell_id(),
            m.derive("TREZOR").cell_id()
        );
        // The same bytes as bip39's own normalizing path.
        for p in ["", "TREZOR", "caf\u{e9}", "cafe\u{301}", "\u{334d}\u{30ac}"] {
            assert_eq!(*m.dangerous_bip39_seed(p), m.0.to_seed(p), "{p:?}");
        }
    }

    #[test]
    fn words_are_nfkd_normalized_before_lookup() {
        // Fullwidth `ａｂａｎｄｏｎ` (as an IME may type it) and an ideographic space are the
        // ASCII words under NFKD, as BIP39 reads the sentence.
        let fullwidth: String = ABANDON
            .chars()
            .map(|c| match c {
                ' ' => '\u{3000}',
                c => char::from_u32(c as u32 - 0x61 + 0xff41).unwrap(),
            })
            .collect();
        assert_eq!(
            Mnemonic::parse(&fullwidth).unwrap().phrase().as_str(),
            ABANDON
        );
    }

    impl PartialEq for Mnemonic {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
}
