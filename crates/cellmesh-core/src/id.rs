//! Identifiers: [`CellId`], [`NodeId`] and [`Fingerprint`].
//!
//! A Cell ID *is* the cell's Ed25519 identity key, so it is self-certifying: whoever holds an
//! ID and a token checks that the token's key equals the key in the ID, and no directory or
//! relay can substitute another. The same holds for a [`NodeId`] and a device's node key.
//!
//! Text form, chosen to survive copy-paste (one word, lowercase, no punctuation, so a double
//! click selects all of it, and a typo is caught by a checksum):
//!
//! ```text
//! cell1 || base32(key[32] || check[3])        check = BLAKE2b-256("cellmesh id v1" || hrp || key)[0..3]
//! node1 || ...                                 (same, with hrp "node")
//! ```
//!
//! base32 is RFC 4648's alphabet in lowercase without padding; 35 bytes make exactly 56
//! characters. The short form for display is the prefix and the first 10 characters.

use std::fmt;
use std::str::FromStr;

use blake2::{Blake2b, Digest, digest::consts::U32};
use thiserror::Error;

use crate::keys::{InvalidKey, KEY_LEN, PublicKey};

const CHECK_LEN: usize = 3;
const BODY_CHARS: usize = 56;
const SHORT_CHARS: usize = 10;

/// 32-byte BLAKE2b.
pub(crate) type Blake2b256 = Blake2b<U32>;

/// A text identifier could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// It does not start with the expected prefix (`cell1` or `node1`).
    #[error("expected an id starting with `{expected}`")]
    WrongPrefix {
        /// The prefix that was expected.
        expected: &'static str,
    },
    /// Wrong number of characters after the prefix.
    #[error("expected {BODY_CHARS} characters after the prefix, found {0}")]
    WrongLength(usize),
    /// A character outside `a-z2-7`.
    #[error("invalid character (ids use only a-z and 2-7)")]
    BadCharacter,
    /// The checksum does not match: a character was mistyped or lost.
    #[error("checksum mismatch: the id was mistyped or truncated")]
    BadChecksum,
    /// The embedded key is not a valid Ed25519 key.
    #[error(transparent)]
    InvalidKey(#[from] InvalidKey),
}

macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident, $hrp:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(PublicKey);

        impl $name {
            /// Text prefix of this kind of id.
            pub const PREFIX: &'static str = concat!($hrp, "1");

            /// The id of `key`.
            pub fn from_key(key: PublicKey) -> Self {
                Self(key)
            }

            /// The key this id names.
            pub fn key(&self) -> PublicKey {
                self.0
            }

            /// Short form for display (not unique enough to address anything).
            pub fn short(&self) -> String {
                let full = self.to_string();
                full[..Self::PREFIX.len() + SHORT_CHARS].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&encode_id($hrp, &self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                decode_id($hrp, Self::PREFIX, s).map(Self)
            }
        }
    };
}

key_id!(
    /// A cell's identity: its Ed25519 identity public key.
    CellId,
    "cell"
);
key_id!(
    /// A device's identity: its node's Ed25519 public key.
    NodeId,
    "node"
);

/// BLAKE2b-256 over a token's signed core (see [`crate::token`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// BLAKE2b-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Blake2b256::digest(bytes).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_string()[..16])
    }
}

fn checksum(hrp: &str, key: &[u8; KEY_LEN]) -> [u8; CHECK_LEN] {
    let digest = Blake2b256::new()
        .chain_update(b"cellmesh id v1")
        .chain_update(hrp.as_bytes())
        .chain_update(key)
        .finalize();
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&digest[..CHECK_LEN]);
    out
}

fn encode_id(hrp: &str, key: &PublicKey) -> String {
    let mut body = Vec::with_capacity(KEY_LEN + CHECK_LEN);
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(&checksum(hrp, key.as_bytes()));
    format!("{hrp}1{}", base32().encode(&body))
}

fn decode_id(hrp: &str, prefix: &'static str, s: &str) -> Result<PublicKey, ParseIdError> {
    let s = s.trim().to_ascii_lowercase();
    let body = s
        .strip_prefix(prefix)
        .ok_or(ParseIdError::WrongPrefix { expected: prefix })?;
    if body.len() != BODY_CHARS {
        return Err(ParseIdError::WrongLength(body.len()));
    }
    let bytes = base32()
        .decode(body.as_bytes())
        .map_err(|_| ParseIdError::BadCharacter)?;
    let (key, check) = bytes.split_at(KEY_LEN);
    let key: [u8; KEY_LEN] = key.try_into().map_err(|_| ParseIdError::BadCharacter)?;
    if check != checksum(hrp, &key) {
        return Err(ParseIdError::BadChecksum);
    }
    Ok(PublicKey::from_bytes(&key)?)
}

fn base32() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.encoding()
        .unwrap_or_else(|_| unreachable!("the base32 specification is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningSecret;

    fn cell() -> CellId {
        CellId::from_key(SigningSecret::from_seed(&[1; 32]).public())
    }

    #[test]
    fn text_round_trips_and_is_one_lowercase_word() {
        let id = cell();
        let text = id.to_string();
        assert_eq!(text.len(), 5 + BODY_CHARS);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        );
        assert_eq!(text.parse::<CellId>().unwrap(), id);
        assert_eq!(
            format!("  {}\n", text.to_uppercase())
                .parse::<CellId>()
                .unwrap(),
            id
        );
        assert!(id.short().starts_with("cell1") && id.short().len() == 15);
    }

    #[test]
    fn a_non_canonical_key_encoding_is_no_id() {
        // y = p + 3 decodes to the point of y = 3: with a valid checksum it would be a second
        // Node ID for one key.
        let mut canonical = [0u8; 32];
        canonical[0] = 3;
        let key = PublicKey::from_bytes(&canonical).unwrap();
        let text = encode_id("node", &key);
        assert_eq!(text.parse::<NodeId>().unwrap().key(), key);
        let mut alias = [0xff; 32];
        (alias[0], alias[31]) = (0xf0, 0x7f);
        let alias = PublicKey::from_bytes_unchecked(&alias);
        assert_eq!(
            encode_id("node", &alias).parse::<NodeId>(),
            Err(ParseIdError::InvalidKey(InvalidKey))
        );
        assert_eq!(
            encode_id("cell", &alias).parse::<CellId>(),
            Err(ParseIdError::InvalidKey(InvalidKey))
        );
    }

    #[test]
    fn typos_and_kind_confusion_are_caught() {
        let text = cell().to_string();
        let mut typo = text.clone().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).unwrap();
        assert!(matches!(
            typo.parse::<CellId>(),
            Err(ParseIdError::BadChecksum | ParseIdError::InvalidKey(_))
        ));
        assert_eq!(
            text[..text.len() - 1].parse::<CellId>(),
            Err(ParseIdError::WrongLength(BODY_CHARS - 1))
        );
        assert!(matches!(
            text.parse::<NodeId>(),
            Err(ParseIdError::WrongPrefix { .. })
        ));
        let as_node = format!("node1{}", &text[5..]);
        assert_eq!(as_node.parse::<NodeId>(), Err(ParseIdError::BadChecksum));
        let bad_char = format!("{}1", &text[..text.len() - 1]);
        assert_eq!(bad_char.parse::<CellId>(), Err(ParseIdError::BadCharacter));
    }
}
