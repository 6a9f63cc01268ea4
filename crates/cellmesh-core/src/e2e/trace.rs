//! The key schedule's values in between, for the published vector (PROTOCOL.md 14.9): what
//! one session between two devices derives, re-derived with the [`schedule`] functions
//! themselves from the random bytes the endpoints draw, in the order they draw them.
//!
//! Test support only (feature `testing`): it hands secret keys out as plain bytes.

use rand_core::CryptoRngCore;

use crate::keys::{AgreementSecret, KEY_LEN};

use super::envelope::binding;
use super::{LocalDevice, SessionId, schedule};

/// Every value of one session's key schedule (14.2, 14.3), secrets included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTrace {
    /// The session id the initiator drew.
    pub session: SessionId,
    /// The HPKE encapsulation the INIT carries.
    pub enc: [u8; KEY_LEN],
    /// Epoch 0, initiator → responder.
    pub i2r0: [u8; 32],
    /// The base of every responder instance's reply key.
    pub reply_base: [u8; 32],
    /// The salt of epoch 1.
    pub salt: [u8; 32],
    /// The initiator's ephemeral public key.
    pub e_i: [u8; KEY_LEN],
    /// The instance the responder drew when it accepted the session.
    pub instance: [u8; 16],
    /// Epoch 0, responder → initiator, of that instance.
    pub r2i0: [u8; 32],
    /// The responder's ephemeral public key.
    pub e_r: [u8; KEY_LEN],
    /// Epoch 1, initiator → responder.
    pub i2r1: [u8; 32],
    /// Epoch 1, responder → initiator.
    pub r2i1: [u8; 32],
}

/// Re-derives the schedule of a session from `initiator` to `responder`, drawing from `rng`
/// as [`super::Endpoint::seal`] and [`super::Endpoint::open`] do: the session id (16 bytes),
/// the HPKE ephemeral (32), `e_i` (32), then at the responder the instance (16) and `e_r`
/// (32). Both sides compute what they share; `None` if they disagree or HPKE fails.
pub fn dangerous_key_trace(
    initiator: &LocalDevice,
    responder: &LocalDevice,
    rng: &mut impl CryptoRngCore,
) -> Option<KeyTrace> {
    let mut session = [0; 16];
    rng.fill_bytes(&mut session);
    let session = SessionId(session);
    let binding = binding(
        initiator.cell,
        initiator.node,
        responder.cell,
        responder.node,
    );
    let (enc, sent) = schedule::setup_sender(
        &initiator.agreement,
        &responder.agreement.public(),
        session,
        &binding,
        rng,
    )?;
    let e_i = AgreementSecret::generate(rng);
    let got = schedule::setup_receiver(
        &responder.agreement,
        &initiator.agreement.public(),
        session,
        &binding,
        &enc,
    )?;
    let same = |a: &schedule::Secret, b: &schedule::Secret| (**a == **b).then_some(**a);
    let i2r0 = same(&sent.i2r, &got.i2r)?;
    let reply_base = same(&sent.reply_base, &got.reply_base)?;
    let salt = same(&sent.salt, &got.salt)?;
    let mut instance = [0; 16];
    rng.fill_bytes(&mut instance);
    let e_r = AgreementSecret::generate(rng);
    let r2i0 = *schedule::reply_key(&reply_base, &instance);
    let (i2r1, r2i1) = schedule::epoch1(&e_i, e_r.public().as_bytes(), &sent.salt, &instance)?;
    let (i2r1_r, r2i1_r) = schedule::epoch1(&e_r, e_i.public().as_bytes(), &got.salt, &instance)?;
    Some(KeyTrace {
        session,
        enc,
        i2r0,
        reply_base,
        salt,
        e_i: *e_i.public().as_bytes(),
        instance,
        r2i0,
        e_r: *e_r.public().as_bytes(),
        i2r1: same(&i2r1, &i2r1_r)?,
        r2i1: same(&r2i1, &r2i1_r)?,
    })
}
