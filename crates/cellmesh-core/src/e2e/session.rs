//! The two halves of a session, their keys and counters, and their saved form.
//!
//! # Counters and leases
//!
//! A sending key's counters are handed out under a *lease*: `lease_end` is the first counter
//! not yet covered. When sealing reaches it, the lease grows by [`LEASE`]; a session that was
//! ever saved is then marked *critical*: the grown lease must be on disk before anything
//! sealed under it leaves, because a restored session starts at its saved `lease_end`. So a
//! restart skips at most one lease of counters and never repeats one. A session never saved
//! cannot be restored, so its keys can never be used again, and it needs no such care.
//!
//! # Saved form
//!
//! ```text
//! outbound = 1:u8 session:[16] started:u64 node_token:bytes16 identity:bytes16
//!            init:u32-length bytes  send:key  reply_base:[32]
//!            responder_flag:u8 [instance:[16] recv1_flag:u8 [key:[32]]]
//!            ratchet_flag:u8 [secret:[32] salt:[32]]
//! inbound  = 2:u8 session:[16] instance:[16] last_used:u64 node_token:bytes16 identity:bytes16
//!            recv0:[32] send0:key recv1_flag:u8 [key:[32]] send1_flag:u8 [key]
//!            ratchet_flag:u8 [secret:[32] salt:[32]] announce_flag:u8 [public:[32]]
//! key      = epoch:u32 key:[32] lease_end:u64
//! ```
//!
//! These records hold secrets: the runtime encrypts them at rest.

use zeroize::Zeroizing;

use crate::Timestamp;
use crate::codec::{DecodeError, Reader, put_bytes16};
use crate::device::Revocations;
use crate::keys::{AgreementPublicKey, AgreementSecret, KEY_LEN};
use crate::token::{MAX_TOKEN_LEN, Token};

use super::envelope::SealKey;
use super::schedule::Secret;
use super::{RemoteDevice, SessionId};

/// Counters covered by one lease (see the module docs).
pub const LEASE: u64 = 1 << 16;

const OUTBOUND: u8 = 1;
const INBOUND: u8 = 2;

/// A sending key: its AES key, its epoch, the next counter and the end of its lease.
pub(super) struct SendKey {
    pub(super) key: SealKey,
    raw: Secret,
    pub(super) epoch: u32,
    next: u64,
    lease_end: u64,
}

impl SendKey {
    pub(super) fn new(raw: Secret, epoch: u32) -> Self {
        Self {
            key: SealKey::new(&raw),
            raw,
            epoch,
            next: 0,
            lease_end: 0,
        }
    }

    /// The next counter, and whether the lease had to grow for it.
    pub(super) fn take(&mut self) -> (u64, bool) {
        let counter = self.next;
        self.next += 1;
        let grew = counter >= self.lease_end;
        if grew {
            self.lease_end = counter.saturating_add(LEASE);
        }
        (counter, grew)
    }

    #[cfg(test)]
    pub(super) fn key_bytes(&self) -> [u8; 32] {
        *self.raw
    }

    fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.raw[..]);
        out.extend_from_slice(&self.lease_end.to_be_bytes());
    }

    fn load(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let epoch = r.u32()?;
        let raw = secret(r)?;
        let lease_end = r.u64()?;
        Ok(Self {
            key: SealKey::new(&raw),
            raw,
            epoch,
            next: lease_end,
            lease_end,
        })
    }
}

/// A receiving key.
pub(super) struct RecvKey {
    pub(super) key: SealKey,
    raw: Secret,
}

impl RecvKey {
    pub(super) fn new(raw: Secret) -> Self {
        Self {
            key: SealKey::new(&raw),
            raw,
        }
    }
}

/// This side's ephemeral key pair for epoch 1, and the salt it is mixed with.
pub(super) struct Ratchet {
    pub(super) secret: AgreementSecret,
    /// Its public key, computed once (it is sent with every epoch-0 envelope).
    pub(super) public: AgreementPublicKey,
    pub(super) salt: Secret,
}

impl Ratchet {
    pub(super) fn new(salt: Secret, rng: &mut impl rand_core::CryptoRngCore) -> Self {
        Self::from_secret(AgreementSecret::generate(rng), salt)
    }

    fn from_secret(secret: AgreementSecret, salt: Secret) -> Self {
        Self {
            public: secret.public(),
            secret,
            salt,
        }
    }

    fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.secret.dangerous_bytes()[..]);
        out.extend_from_slice(&self.salt[..]);
    }

    fn load(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let key = AgreementSecret::from_bytes(&*secret(r)?);
        Ok(Self::from_secret(key, secret(r)?))
    }
}

/// The responder instance an outbound session heard from first.
pub(super) struct Responder {
    pub(super) instance: [u8; 16],
    pub(super) recv0: RecvKey,
    pub(super) recv1: Option<RecvKey>,
}

/// A session this device started, to one recipient device.
pub(super) struct Outbound {
    pub(super) id: SessionId,
    pub(super) peer: RemoteDevice,
    /// Sender cell, sender node, recipient cell, recipient node.
    pub(super) binding: [u8; 128],
    /// When it started (by this device's clock): sessions are retired after a while.
    pub(super) started: Timestamp,
    /// INIT fields (enc, tokens), sent until epoch 1.
    pub(super) init: Vec<u8>,
    pub(super) send: SendKey,
    /// Each responder instance's reply key derives from this.
    pub(super) reply_base: Secret,
    pub(super) responder: Option<Responder>,
    pub(super) ratchet: Option<Ratchet>,
    /// Whether a saved form was ever handed out (see the module docs).
    pub(super) saved: bool,
}

/// A session another device started with this one, as this instance holds it.
pub(super) struct Inbound {
    pub(super) peer: RemoteDevice,
    pub(super) binding: [u8; 128],
    pub(super) session: SessionId,
    /// Drawn when this device built the session: it keys this instance's replies.
    pub(super) instance: [u8; 16],
    /// When an envelope last opened in it (by this device's clock).
    pub(super) last_used: Timestamp,
    pub(super) recv0: RecvKey,
    pub(super) send0: SendKey,
    pub(super) recv1: Option<RecvKey>,
    pub(super) send1: Option<SendKey>,
    /// This side's ephemeral secret, until the initiator's ephemeral arrives.
    pub(super) ratchet: Option<Ratchet>,
    /// This side's ephemeral public key, sent until the initiator moves to epoch 1.
    pub(super) announce: Option<[u8; KEY_LEN]>,
    pub(super) saved: bool,
}

impl Outbound {
    pub(super) fn save(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(1200 + self.init.len()));
        out.push(OUTBOUND);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.started.0.to_be_bytes());
        put_peer(&mut out, &self.peer);
        out.extend_from_slice(&(self.init.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.init);
        self.send.save(&mut out);
        out.extend_from_slice(&self.reply_base[..]);
        match &self.responder {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                out.extend_from_slice(&r.instance);
                put_optional_key(&mut out, r.recv1.as_ref());
            }
        }
        put_ratchet(&mut out, self.ratchet.as_ref());
        out
    }
}

impl Inbound {
    pub(super) fn save(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(1200));
        out.push(INBOUND);
        out.extend_from_slice(&self.session.0);
        out.extend_from_slice(&self.instance);
        out.extend_from_slice(&self.last_used.0.to_be_bytes());
        put_peer(&mut out, &self.peer);
        out.extend_from_slice(&self.recv0.raw[..]);
        self.send0.save(&mut out);
        put_optional_key(&mut out, self.recv1.as_ref());
        match &self.send1 {
            None => out.push(0),
            Some(k) => {
                out.push(1);
                k.save(&mut out);
            }
        }
        put_ratchet(&mut out, self.ratchet.as_ref());
        match &self.announce {
            None => out.push(0),
            Some(public) => {
                out.push(1);
                out.extend_from_slice(public);
            }
        }
        out
    }
}

/// A saved session, read back.
pub(super) enum Loaded {
    Outbound(Box<Outbound>),
    Inbound(Box<Inbound>),
}

/// Why a saved session was not restored.
#[derive(Debug)]
pub(super) enum LoadError {
    /// The record does not decode.
    Malformed,
    /// Its peer's tokens no longer verify (revoked, lapsed).
    Peer,
}

impl From<DecodeError> for LoadError {
    fn from(_: DecodeError) -> Self {
        Self::Malformed
    }
}

/// Reads a saved session. `binding` makes the binding from the peer (ours is the caller's);
/// the peer's tokens are checked again at `now`, against `revocations`.
pub(super) fn load(
    record: &[u8],
    now: Timestamp,
    revocations: &Revocations,
    binding: impl Fn(&RemoteDevice, bool) -> [u8; 128],
) -> Result<Loaded, LoadError> {
    let mut r = Reader::new(record);
    match r.u8()? {
        OUTBOUND => {
            let id = SessionId(r.array()?);
            let started = Timestamp(r.u64()?);
            let peer = load_peer(&mut r, now, revocations)?;
            let init_len = r.u32()? as usize;
            let init = r.bytes(init_len)?.to_vec();
            let send = SendKey::load(&mut r)?;
            let reply_base = secret(&mut r)?;
            let responder = match r.flag("responder")? {
                false => None,
                true => {
                    let instance = r.array()?;
                    let recv0 = RecvKey::new(super::schedule::reply_key(&reply_base, &instance));
                    let recv1 = optional_key(&mut r)?;
                    Some(Responder {
                        instance,
                        recv0,
                        recv1,
                    })
                }
            };
            let ratchet = load_ratchet(&mut r)?;
            r.finish()?;
            Ok(Loaded::Outbound(Box::new(Outbound {
                id,
                binding: binding(&peer, true),
                peer,
                started,
                init,
                send,
                reply_base,
                responder,
                ratchet,
                saved: true,
            })))
        }
        INBOUND => {
            let session = SessionId(r.array()?);
            let instance = r.array()?;
            let last_used = Timestamp(r.u64()?);
            let peer = load_peer(&mut r, now, revocations)?;
            let recv0 = RecvKey::new(secret(&mut r)?);
            let send0 = SendKey::load(&mut r)?;
            let recv1 = optional_key(&mut r)?;
            let send1 = match r.flag("send1")? {
                false => None,
                true => Some(SendKey::load(&mut r)?),
            };
            let ratchet = load_ratchet(&mut r)?;
            let announce = match r.flag("announce")? {
                false => None,
                true => Some(r.array()?),
            };
            r.finish()?;
            Ok(Loaded::Inbound(Box::new(Inbound {
                binding: binding(&peer, false),
                peer,
                session,
                instance,
                last_used,
                recv0,
                send0,
                recv1,
                send1,
                ratchet,
                announce,
                saved: true,
            })))
        }
        _ => Err(DecodeError::Invalid("saved session kind").into()),
    }
}

fn put_peer(out: &mut Vec<u8>, peer: &RemoteDevice) {
    put_bytes16(out, &peer.binding.node_token().token().to_bytes());
    put_bytes16(out, &peer.binding.identity().token().to_bytes());
}

fn load_peer(
    r: &mut Reader<'_>,
    now: Timestamp,
    revocations: &Revocations,
) -> Result<RemoteDevice, LoadError> {
    let node_token = Token::decode(r.bytes16("node token", MAX_TOKEN_LEN)?)?;
    let identity = Token::decode(r.bytes16("identity token", MAX_TOKEN_LEN)?)?;
    RemoteDevice::verify(&node_token, &identity, now, revocations).map_err(|_| LoadError::Peer)
}

fn put_optional_key(out: &mut Vec<u8>, key: Option<&RecvKey>) {
    match key {
        None => out.push(0),
        Some(k) => {
            out.push(1);
            out.extend_from_slice(&k.raw[..]);
        }
    }
}

fn optional_key(r: &mut Reader<'_>) -> Result<Option<RecvKey>, DecodeError> {
    Ok(match r.flag("key")? {
        false => None,
        true => Some(RecvKey::new(secret(r)?)),
    })
}

fn put_ratchet(out: &mut Vec<u8>, ratchet: Option<&Ratchet>) {
    match ratchet {
        None => out.push(0),
        Some(ratchet) => {
            out.push(1);
            ratchet.save(out);
        }
    }
}

fn load_ratchet(r: &mut Reader<'_>) -> Result<Option<Ratchet>, DecodeError> {
    Ok(match r.flag("ratchet")? {
        false => None,
        true => Some(Ratchet::load(r)?),
    })
}

fn secret(r: &mut Reader<'_>) -> Result<Secret, DecodeError> {
    let mut s = Zeroizing::new([0u8; 32]);
    s.copy_from_slice(r.bytes(32)?);
    Ok(s)
}
