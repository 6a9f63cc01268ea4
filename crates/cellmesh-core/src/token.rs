//! The one signed token format used for nodes, cell identities, revocations and (later)
//! intents.
//!
//! A token is a set of [`Claims`] (the seed's fields: realm, subject, issuer, audience, uuid,
//! issued_at, not_before, expires_at, public keys, attributes), signed by the issuer over a
//! canonical binary encoding of those claims (the *core*), and optionally co-signed by a
//! realm's issuer. Its [`Fingerprint`] is BLAKE2b-256 of the core, so co-signing a token does
//! not change its fingerprint.
//!
//! Wire layout (all integers big-endian; `str8` is a `u8` length then bytes):
//!
//! ```text
//! core   = version:u8(=1) kind:u8 realm:str8 subject:str8 issuer:[32]
//!          audience_flag:u8 [audience:[32]] uuid:[16]
//!          issued_at:u64 not_before:u64 expires_at:u64
//!          key:[32] agreement_flag:u8 [agreement_key:[32]]
//!          attr_count:u8 { attr_key:str8 attr_value:u16-length bytes }*
//! token  = core signature:[64] cosig_flag:u8 [cosigner:[32] cosignature:[64]]
//! signature   = Ed25519(issuer,   "cellmesh token v1\0" || core)
//! cosignature = Ed25519(cosigner, "cellmesh token co-signature v1\0" || core || signature)
//! ```
//!
//! Decoding is the only way to get a [`Token`] from bytes, and it rejects anything that is not
//! the one canonical encoding of some claims: unknown version or kind, flags other than 0/1,
//! an empty realm, strings that are not UTF-8, attribute keys out of order or repeated,
//! Ed25519 keys that are not the canonical encoding of a point of large order, an agreement
//! key that is not the canonical encoding of an X25519 point of large order, a validity period
//! that ends before it starts, truncated input, trailing bytes and anything over
//! [`MAX_TOKEN_LEN`].

use std::collections::BTreeMap;
use std::fmt;

use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::Timestamp;
use crate::codec::{DecodeError, Reader, check_len, put_bytes8, put_bytes16};
use crate::id::Fingerprint;
use crate::keys::{AgreementPublicKey, BadSignature, KEY_LEN, PublicKey, Signature, SigningSecret};

/// Wire version of the token format.
pub const TOKEN_VERSION: u8 = 1;
/// Largest encoded token accepted.
pub const MAX_TOKEN_LEN: usize = 8192;
/// Most attributes a token may carry.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute value.
pub const MAX_ATTR_VALUE: usize = 1024;
/// Longest realm name and attribute key.
pub const MAX_NAME: usize = 64;
/// Longest subject.
pub const MAX_SUBJECT: usize = 255;

/// Clock skew a verifier tolerates by default, in seconds.
pub const DEFAULT_SKEW: u64 = 60;
/// The most skew [`Token::verify`] will tolerate, whatever it is asked for.
pub const MAX_SKEW: u64 = 600;

const SIGN_CONTEXT: &[u8] = b"cellmesh token v1\0";
const COSIGN_CONTEXT: &[u8] = b"cellmesh token co-signature v1\0";

/// Names of the attributes cellmesh itself sets.
pub mod attr {
    /// On a node token: the key (32 bytes) of the cell this node serves.
    pub const CELL: &str = "cell";
    /// On an identity or revocation token: the key (32 bytes) of the node it certifies or
    /// revokes.
    pub const NODE: &str = "node";
    /// Node extension: host name where the node listens (UTF-8).
    pub const HOSTNAME: &str = "hostname";
    /// Node extension: port where the node listens (`u16`, big-endian).
    pub const PORT: &str = "port";
}

/// What a token is for. Part of the signed core, so one kind can never pass for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenKind {
    /// A node (device) token, self-signed by the node key.
    Node,
    /// A cell identity token: the cell certifies one of its nodes.
    Identity,
    /// A cell revokes one of its nodes.
    Revocation,
}

impl TokenKind {
    fn code(self) -> u8 {
        match self {
            Self::Node => 1,
            Self::Identity => 2,
            Self::Revocation => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Node,
            2 => Self::Identity,
            3 => Self::Revocation,
            _ => return None,
        })
    }
}

/// A realm name or attribute key: 1 to 64 bytes of `a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// Checks and wraps `s`.
    pub fn new(s: &str) -> Result<Self, TokenError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'));
        if !ok {
            return Err(TokenError::InvalidName(s.chars().take(MAX_NAME).collect()));
        }
        Ok(Self(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A locally built token could not be signed, or a token could not be used. The caller is at
/// fault (local misuse).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TokenError {
    /// A realm or attribute name outside `a-z0-9._-` or of the wrong length.
    #[error("invalid name {0:?}: use 1 to 64 characters of a-z, 0-9, '.', '_', '-'")]
    InvalidName(String),
    /// The claims do not fit the format's limits.
    #[error("claims exceed the format's limits: {0}")]
    TooLarge(&'static str),
    /// `expires_at` is before `not_before`.
    #[error("the validity period ends before it starts")]
    EmptyValidity,
    /// The signing key is not the issuer named in the claims.
    #[error("the signing key is not the token's issuer")]
    WrongIssuerKey,
    /// Only tokens that name a realm can be co-signed.
    #[error("only a token that names a realm can be co-signed")]
    NoRealm,
    /// The agreement key is of small order or not canonically encoded (possible only through
    /// [`AgreementPublicKey::from_bytes_unchecked`]); no decoder would accept the token.
    #[error("the agreement key is not a canonical X25519 key of large order")]
    InvalidAgreementKey,
}

/// Why a token was refused by a verifier.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The issuer's signature, or a co-signature, does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `now` is after `expires_at` plus the allowed skew.
    #[error("token expired at {expires_at} (now {now})")]
    Expired {
        /// When it expired.
        expires_at: Timestamp,
        /// The verifier's time.
        now: Timestamp,
    },
    /// `now` is before `not_before` minus the allowed skew.
    #[error("token not valid before {not_before} (now {now})")]
    NotYetValid {
        /// When it becomes valid.
        not_before: Timestamp,
        /// The verifier's time.
        now: Timestamp,
    },
    /// The token does not belong to the realm the verifier requires.
    #[error("token is not in realm {0}")]
    WrongRealm(Name),
    /// The realm requires a co-signature by its issuer, and there is none, or another key's.
    #[error("token is not co-signed by the realm's issuer")]
    NotCoSigned,
}

impl From<BadSignature> for VerifyError {
    fn from(_: BadSignature) -> Self {
        Self::BadSignature
    }
}

/// The claims of a token: everything the signature covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// What the token is for.
    pub kind: TokenKind,
    /// The realm the token belongs to, if any.
    pub realm: Option<Name>,
    /// Free-form subject (UTF-8, at most 255 bytes).
    pub subject: String,
    /// The key that signs the token.
    pub issuer: PublicKey,
    /// Whom the token is meant for (a fingerprint or id), if restricted.
    pub audience: Option<[u8; 32]>,
    /// Unique id of this token.
    pub uuid: [u8; 16],
    /// When it was made.
    pub issued_at: Timestamp,
    /// Not valid before this time.
    pub not_before: Timestamp,
    /// Not valid after this time.
    pub expires_at: Timestamp,
    /// The subject's signing key.
    pub key: PublicKey,
    /// The subject's key-agreement key, if it has one.
    pub agreement_key: Option<AgreementPublicKey>,
    /// Extensions and user attributes, ordered by key.
    pub attributes: BTreeMap<Name, Vec<u8>>,
}

impl Claims {
    /// Claims of `kind` about `key`, issued by `issuer`, valid from `now` for `lifetime`
    /// seconds, with a fresh uuid from `rng`.
    pub fn new(
        kind: TokenKind,
        issuer: PublicKey,
        key: PublicKey,
        now: Timestamp,
        lifetime: u64,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        let mut uuid = [0u8; 16];
        rng.fill_bytes(&mut uuid);
        Self {
            kind,
            realm: None,
            subject: String::new(),
            issuer,
            audience: None,
            uuid,
            issued_at: now,
            not_before: now,
            expires_at: now.plus(lifetime),
            key,
            agreement_key: None,
            attributes: BTreeMap::new(),
        }
    }

    /// Sets attribute `key` (a [`Name`]) to `value`.
    pub fn with_attribute(
        mut self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<Self, TokenError> {
        self.attributes.insert(Name::new(key)?, value.into());
        Ok(self)
    }

    /// The value of attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&[u8]> {
        self.attributes
            .iter()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Attribute `key` read as a public key.
    pub fn key_attribute(&self, key: &str) -> Option<PublicKey> {
        let bytes: &[u8; KEY_LEN] = self.attribute(key)?.try_into().ok()?;
        PublicKey::from_bytes(bytes).ok()
    }

    /// Signs the claims with the issuer's key.
    pub fn sign(self, issuer: &SigningSecret) -> Result<Token, TokenError> {
        if issuer.public() != self.issuer {
            return Err(TokenError::WrongIssuerKey);
        }
        self.check_limits()?;
        let core = self.encode_core();
        let signature = issuer.sign(SIGN_CONTEXT, &core);
        let token = Token {
            fingerprint: Fingerprint::of(&core),
            claims: self,
            core,
            signature,
            co_signature: None,
        };
        if token.encoded_len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge("token"));
        }
        Ok(token)
    }

    fn check_limits(&self) -> Result<(), TokenError> {
        if self.subject.len() > MAX_SUBJECT {
            return Err(TokenError::TooLarge("subject"));
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(TokenError::TooLarge("attribute count"));
        }
        if self.attributes.values().any(|v| v.len() > MAX_ATTR_VALUE) {
            return Err(TokenError::TooLarge("attribute value"));
        }
        if self.expires_at < self.not_before {
            return Err(TokenError::EmptyValidity);
        }
        if let Some(key) = &self.agreement_key
            && AgreementPublicKey::from_bytes(key.as_bytes()).is_err()
        {
            return Err(TokenError::InvalidAgreementKey);
        }
        Ok(())
    }

    fn encode_core(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.push(TOKEN_VERSION);
        out.push(self.kind.code());
        put_bytes8(
            &mut out,
            self.realm.as_ref().map_or(&[][..], |r| r.0.as_bytes()),
        );
        put_bytes8(&mut out, self.subject.as_bytes());
        out.extend_from_slice(self.issuer.as_bytes());
        put_optional(&mut out, self.audience.as_ref());
        out.extend_from_slice(&self.uuid);
        for t in [self.issued_at, self.not_before, self.expires_at] {
            out.extend_from_slice(&t.0.to_be_bytes());
        }
        out.extend_from_slice(self.key.as_bytes());
        put_optional(&mut out, self.agreement_key.as_ref().map(|k| k.as_bytes()));
        out.push(self.attributes.len() as u8);
        for (k, v) in &self.attributes {
            put_bytes8(&mut out, k.0.as_bytes());
            put_bytes16(&mut out, v);
        }
        out
    }

    fn decode_core(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let version = r.u8()?;
        if version != TOKEN_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = TokenKind::from_code(r.u8()?).ok_or(DecodeError::Invalid("token kind"))?;
        let realm = match r.bytes8("realm", MAX_NAME)? {
            [] => None,
            bytes => Some(decode_name(bytes, "realm")?),
        };
        let subject = std::str::from_utf8(r.bytes8("subject", MAX_SUBJECT)?)
            .map_err(|_| DecodeError::Invalid("subject"))?
            .to_string();
        let issuer = read_key(r, "issuer")?;
        let audience = if r.flag("audience flag")? {
            Some(r.array()?)
        } else {
            None
        };
        let uuid = r.array()?;
        let issued_at = Timestamp(r.u64()?);
        let not_before = Timestamp(r.u64()?);
        let expires_at = Timestamp(r.u64()?);
        if expires_at < not_before {
            return Err(DecodeError::Invalid("validity period"));
        }
        let key = read_key(r, "key")?;
        let agreement_key = if r.flag("agreement flag")? {
            Some(
                AgreementPublicKey::from_bytes(&r.array()?)
                    .map_err(|_| DecodeError::Invalid("agreement key"))?,
            )
        } else {
            None
        };
        let count = usize::from(r.u8()?);
        check_len("attribute count", count, MAX_ATTRIBUTES)?;
        let mut attributes = BTreeMap::new();
        let mut previous: Option<Name> = None;
        for _ in 0..count {
            let name = decode_name(r.bytes8("attribute key", MAX_NAME)?, "attribute key")?;
            let value = r.bytes16("attribute value", MAX_ATTR_VALUE)?.to_vec();
            if previous.as_ref().is_some_and(|p| *p >= name) {
                return Err(DecodeError::Invalid("attribute order"));
            }
            previous = Some(name.clone());
            attributes.insert(name, value);
        }
        Ok(Self {
            kind,
            realm,
            subject,
            issuer,
            audience,
            uuid,
            issued_at,
            not_before,
            expires_at,
            key,
            agreement_key,
            attributes,
        })
    }
}

/// A realm issuer's endorsement of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoSignature {
    /// The realm issuer's key.
    pub signer: PublicKey,
    /// Its signature over the core and the issuer's signature.
    pub signature: Signature,
}

/// A signed token, as made by [`Claims::sign`] or [`Token::decode`]. Holding one proves
/// nothing: call [`Token::verify`] to get a [`VerifiedToken`].
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    claims: Claims,
    core: Vec<u8>,
    fingerprint: Fingerprint,
    signature: Signature,
    co_signature: Option<CoSignature>,
}

impl Token {
    /// The claims, unverified.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// BLAKE2b-256 of the signed core.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The realm issuer's co-signature, if any.
    pub fn co_signature(&self) -> Option<&CoSignature> {
        self.co_signature.as_ref()
    }

    /// Adds (or replaces) the co-signature of a realm's issuer.
    pub fn co_sign(&mut self, realm_issuer: &SigningSecret) -> Result<(), TokenError> {
        if self.claims.realm.is_none() {
            return Err(TokenError::NoRealm);
        }
        let signature = realm_issuer.sign(COSIGN_CONTEXT, &self.cosigned_message());
        self.co_signature = Some(CoSignature {
            signer: realm_issuer.public(),
            signature,
        });
        Ok(())
    }

    /// Checks the issuer's signature, any co-signature, and that `now` lies within
    /// `[not_before - skew, expires_at + skew]`, with `skew` capped at [`MAX_SKEW`].
    pub fn verify(&self, now: Timestamp, skew: u64) -> Result<VerifiedToken, VerifyError> {
        let skew = skew.min(MAX_SKEW);
        let c = &self.claims;
        if now.plus(skew) < c.not_before {
            return Err(VerifyError::NotYetValid {
                not_before: c.not_before,
                now,
            });
        }
        if now.minus(skew) > c.expires_at {
            return Err(VerifyError::Expired {
                expires_at: c.expires_at,
                now,
            });
        }
        c.issuer.verify(SIGN_CONTEXT, &self.core, &self.signature)?;
        if let Some(co) = &self.co_signature {
            co.signer
                .verify(COSIGN_CONTEXT, &self.cosigned_message(), &co.signature)?;
        }
        Ok(VerifiedToken(self.clone()))
    }

    /// Checks the signatures only, not the validity period: for a key that was certified at
    /// some time and is used to encrypt to or check a device that may have been offline since
    /// (its short-lived node token expired meanwhile). Prefer [`Token::verify`] everywhere else.
    pub fn verify_signatures(&self) -> Result<VerifiedToken, VerifyError> {
        self.verify(self.claims.not_before, 0)
    }

    /// [`Token::verify`], and also that the token names `realm` and is co-signed by the
    /// realm's issuer: the issuer chain realm issuer → token.
    pub fn verify_in_realm(
        &self,
        realm: &RealmAnchor,
        now: Timestamp,
        skew: u64,
    ) -> Result<VerifiedToken, VerifyError> {
        let verified = self.verify(now, skew)?;
        if self.claims.realm.as_ref() != Some(&realm.name) {
            return Err(VerifyError::WrongRealm(realm.name.clone()));
        }
        match &self.co_signature {
            Some(co) if co.signer == realm.issuer => Ok(verified),
            _ => Err(VerifyError::NotCoSigned),
        }
    }

    /// Exact length of [`Token::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.core.len() + 64 + 1 + self.co_signature.map_or(0, |_| 32 + 64)
    }

    /// Appends the canonical encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.core);
        out.extend_from_slice(&self.signature.0);
        match &self.co_signature {
            None => out.push(0),
            Some(co) => {
                out.push(1);
                out.extend_from_slice(co.signer.as_bytes());
                out.extend_from_slice(&co.signature.0);
            }
        }
    }

    /// The canonical encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }

    /// Decodes exactly one token from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        check_len("token", bytes.len(), MAX_TOKEN_LEN)?;
        let mut r = Reader::new(bytes);
        let claims = Claims::decode_core(&mut r)?;
        let core_len = bytes.len() - r.remaining();
        let core = bytes[..core_len].to_vec();
        let signature = Signature(r.array()?);
        let co_signature = if r.flag("co-signature flag")? {
            Some(CoSignature {
                signer: read_key(&mut r, "co-signer")?,
                signature: Signature(r.array()?),
            })
        } else {
            None
        };
        r.finish()?;
        Ok(Self {
            fingerprint: Fingerprint::of(&core),
            claims,
            core,
            signature,
            co_signature,
        })
    }

    fn cosigned_message(&self) -> Vec<u8> {
        [&self.core[..], &self.signature.0[..]].concat()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("fingerprint", &self.fingerprint)
            .field("claims", &self.claims)
            .field("co_signed", &self.co_signature.is_some())
            .finish()
    }
}

/// A token whose signatures and validity period were checked. Only [`Token::verify`] and
/// [`Token::verify_in_realm`] make one, so code that takes a `VerifiedToken` cannot be
/// reached with an unchecked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken(Token);

impl VerifiedToken {
    /// The verified claims.
    pub fn claims(&self) -> &Claims {
        &self.0.claims
    }

    /// The token's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.0.fingerprint
    }

    /// The token itself (to forward it).
    pub fn token(&self) -> &Token {
        &self.0
    }
}

/// A realm a verifier trusts: its name and its issuer's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealmAnchor {
    /// The realm's name, as tokens carry it.
    pub name: Name,
    /// The key that co-signs the realm's tokens.
    pub issuer: PublicKey,
}

fn put_optional(out: &mut Vec<u8>, value: Option<&[u8; 32]>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(v);
        }
    }
}

fn read_key(r: &mut Reader<'_>, field: &'static str) -> Result<PublicKey, DecodeError> {
    PublicKey::from_bytes(&r.array()?).map_err(|_| DecodeError::Invalid(field))
}

fn decode_name(bytes: &[u8], field: &'static str) -> Result<Name, DecodeError> {
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid(field))?;
    Name::new(s).map_err(|_| DecodeError::Invalid(field))
}
