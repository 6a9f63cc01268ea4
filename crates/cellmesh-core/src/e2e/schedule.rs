//! The key schedule of an end-to-end session: HPKE setup, the epoch-0 keys it exports, the
//! responder instance's own reply keys, and epoch 1 from two ephemeral keys.
//!
//! ```text
//! (enc, ctx)   = HPKE SetupAuthS(pkR, info, skS)                 info = label ‖ session ‖ binding
//! i2r[0] ‖ base = ctx.Export("cellmesh e2e v2 keys", 64)
//! salt          = ctx.Export("cellmesh e2e v2 ratchet", 32)
//! r2i[0]        = HKDF-SHA256(salt = instance, ikm = base, "cellmesh e2e v2 reply", 32)
//! i2r[1] ‖ r2i[1] = HKDF-SHA256(salt, X25519(e_i, e_r), "cellmesh e2e v2 epoch 1" ‖ instance, 64)
//! ```
//!
//! Every inbound instance (each time a device builds a session from an INIT) draws its own
//! `instance`, so two instances never share a reply key, and so never a (key, nonce) pair.

use hkdf::Hkdf;
use hpke::{Deserializable, Serializable};
use rand_core::CryptoRngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::keys::{AgreementPublicKey, AgreementSecret, KEY_LEN};

use super::SessionId;

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type ExportOnly = hpke::aead::ExportOnlyAead;

const INFO_PREFIX: &[u8] = b"cellmesh e2e v2 session";
const EXPORT_KEYS: &[u8] = b"cellmesh e2e v2 keys";
const EXPORT_RATCHET: &[u8] = b"cellmesh e2e v2 ratchet";
const REPLY_INFO: &[u8] = b"cellmesh e2e v2 reply";
const EPOCH1_INFO: &[u8] = b"cellmesh e2e v2 epoch 1";

/// A 32-byte key, wiped when dropped.
pub(super) type Secret = Zeroizing<[u8; 32]>;

/// What HPKE gives both sides: the initiator's epoch-0 key, the base of the responder's reply
/// keys, and the salt of epoch 1.
pub(super) struct Exported {
    pub(super) i2r: Secret,
    pub(super) reply_base: Secret,
    pub(super) salt: Secret,
}

/// The initiator's side of HPKE: `enc` to send, and the exports.
pub(super) fn setup_sender(
    local: &AgreementSecret,
    peer: &AgreementPublicKey,
    session: SessionId,
    binding: &[u8; 128],
    rng: &mut impl CryptoRngCore,
) -> Option<([u8; KEY_LEN], Exported)> {
    let info = info(session, binding);
    let sk = hpke_secret(local).ok()?;
    let pk = hpke_public(&local.public()).ok()?;
    let pk_recip = hpke_public(peer).ok()?;
    let (enc, ctx) = hpke::setup_sender::<ExportOnly, Kdf, Kem, _>(
        &hpke::OpModeS::Auth((sk, pk)),
        &pk_recip,
        &info,
        &mut RngAdapter(rng),
    )
    .ok()?;
    let exported = exports(|label, out| ctx.export(label, out)).ok()?;
    let mut bytes = [0; KEY_LEN];
    bytes.copy_from_slice(&enc.to_bytes());
    Some((bytes, exported))
}

/// The responder's side of HPKE, from the initiator's `enc`.
pub(super) fn setup_receiver(
    local: &AgreementSecret,
    peer: &AgreementPublicKey,
    session: SessionId,
    binding: &[u8; 128],
    enc: &[u8; KEY_LEN],
) -> Option<Exported> {
    let info = info(session, binding);
    let sk = hpke_secret(local).ok()?;
    let pk_sender = hpke_public(peer).ok()?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).ok()?;
    let ctx = hpke::setup_receiver::<ExportOnly, Kdf, Kem>(
        &hpke::OpModeR::Auth(pk_sender),
        &sk,
        &enc,
        &info,
    )
    .ok()?;
    exports(|label, out| ctx.export(label, out)).ok()
}

/// The reply key (responder → initiator, epoch 0) of one responder instance.
pub(super) fn reply_key(base: &[u8; 32], instance: &[u8; 16]) -> Secret {
    let hk = Hkdf::<Sha256>::new(Some(instance), base);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(REPLY_INFO, &mut out[..])
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
    out
}

/// The epoch-1 keys (initiator → responder, responder → initiator) of a session and instance,
/// from our ephemeral secret and their public key; `None` when theirs is of small order.
pub(super) fn epoch1(
    ours: &AgreementSecret,
    theirs: &[u8; KEY_LEN],
    salt: &[u8; 32],
    instance: &[u8; 16],
) -> Option<(Secret, Secret)> {
    // Small order is refused by the Diffie-Hellman itself (its result would be all zero).
    let shared = ours.diffie_hellman(&AgreementPublicKey::from_bytes_unchecked(theirs))?;
    let hk = Hkdf::<Sha256>::new(Some(&salt[..]), &shared[..]);
    let mut okm = Zeroizing::new([0u8; 64]);
    hk.expand_multi_info(&[EPOCH1_INFO, instance], &mut okm[..])
        .unwrap_or_else(|_| unreachable!("64 bytes is a valid HKDF-SHA256 length"));
    let (mut i2r, mut r2i) = (Zeroizing::new([0; 32]), Zeroizing::new([0; 32]));
    i2r.copy_from_slice(&okm[..32]);
    r2i.copy_from_slice(&okm[32..]);
    Some((i2r, r2i))
}

fn info(session: SessionId, binding: &[u8; 128]) -> Vec<u8> {
    [INFO_PREFIX, &session.0, binding].concat()
}

fn exports(
    export: impl Fn(&[u8], &mut [u8]) -> Result<(), hpke::HpkeError>,
) -> Result<Exported, hpke::HpkeError> {
    let mut keys = Zeroizing::new([0u8; 64]);
    export(EXPORT_KEYS, &mut keys[..])?;
    let mut salt = Zeroizing::new([0u8; 32]);
    export(EXPORT_RATCHET, &mut salt[..])?;
    let (mut i2r, mut reply_base) = (Zeroizing::new([0; 32]), Zeroizing::new([0; 32]));
    i2r.copy_from_slice(&keys[..32]);
    reply_base.copy_from_slice(&keys[32..]);
    Ok(Exported {
        i2r,
        reply_base,
        salt,
    })
}

fn hpke_secret(s: &AgreementSecret) -> Result<<Kem as hpke::Kem>::PrivateKey, hpke::HpkeError> {
    <Kem as hpke::Kem>::PrivateKey::from_bytes(&s.dangerous_bytes()[..])
}

fn hpke_public(p: &AgreementPublicKey) -> Result<<Kem as hpke::Kem>::PublicKey, hpke::HpkeError> {
    <Kem as hpke::Kem>::PublicKey::from_bytes(p.as_bytes())
}

/// hpke 0.12 takes `rand_core` 0.6's `CryptoRng + RngCore`; this passes our RNG through.
struct RngAdapter<'a, R: CryptoRngCore>(&'a mut R);

impl<R: CryptoRngCore> rand_core::RngCore for RngAdapter<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.0.try_fill_bytes(dest)
    }
}

impl<R: CryptoRngCore> rand_core::CryptoRng for RngAdapter<'_, R> {}
