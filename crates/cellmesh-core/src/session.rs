//! An established session: per-direction AES-256-GCM keys, counter nonces, rekeying, and
//! refusal of replayed, reordered or forged frames.
//!
//! ```text
//! session frame body = epoch:u32 || counter:u64 || AES-256-GCM(key[epoch], nonce = 0u32 || counter,
//!                                                              aad = 0x10 || epoch || counter, plaintext)
//! key[0]     = the handshake's split key for this direction
//! key[e + 1] = HKDF-SHA256(ikm = key[e], salt = none, info = "cellmesh rekey v1")   (key[e] is then erased)
//! ```
//!
//! Counters start at 0 and grow by one per frame across epochs, so no nonce repeats under any
//! key. Sessions run over ordered transports, so the replay window has width one: a frame is
//! accepted only if its counter is exactly the next one expected. A replayed frame (an old
//! counter), a reordered frame (a future counter) or one that fails authentication is not
//! delivered, and the caller counts it against the peer. A sender moves to the next epoch after
//! [`SessionConfig::rekey_after_frames`] frames or [`SessionConfig::rekey_after_ms`]; the
//! receiver follows when it sees epoch + 1 authenticate, and erases the old key.

use hkdf::Hkdf;
use ring::aead;
use sha2::Sha256;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::Instant;
use crate::codec::Reader;
use crate::handshake::SessionKeys;
use crate::keys::KEY_LEN;
use crate::wire::{FrameType, Message, put_frame_header};

/// Bytes a session frame adds around its plaintext (epoch, counter, tag).
pub const SESSION_OVERHEAD: usize = 4 + 8 + TAG_LEN;
const TAG_LEN: usize = 16;
const REKEY_INFO: &[u8] = b"cellmesh rekey v1";

/// When to rekey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Frames per key before moving to the next.
    pub rekey_after_frames: u64,
    /// Milliseconds per key before moving to the next.
    pub rekey_after_ms: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            rekey_after_frames: 1 << 24,
            rekey_after_ms: 10 * 60 * 1000,
        }
    }
}

/// A frame was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameRejected {
    /// The body is too short to be a session frame.
    #[error("session frame malformed")]
    Malformed,
    /// The counter is not the next one expected (a replay, or frames reordered or dropped).
    #[error("frame counter {got}, expected {expected}")]
    OutOfOrder {
        /// Counter in the frame.
        got: u64,
        /// Counter expected.
        expected: u64,
    },
    /// The epoch is neither the current one nor the next.
    #[error("frame epoch {0} out of range")]
    BadEpoch(u32),
    /// Authentication failed. No further detail on purpose.
    #[error("frame failed authentication")]
    Unauthentic,
}

/// The sending side has used up its nonces (after 2^64 frames). Unreachable in practice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("session nonces exhausted")]
pub struct Exhausted;

struct Direction {
    key: aead::LessSafeKey,
    secret: Zeroizing<[u8; KEY_LEN]>,
    epoch: u32,
    counter: u64,
    epoch_frames: u64,
    epoch_started: Instant,
}

impl Direction {
    fn new(secret: Zeroizing<[u8; KEY_LEN]>, now: Instant) -> Self {
        Self {
            key: aead_key(&secret),
            secret,
            epoch: 0,
            counter: 0,
            epoch_frames: 0,
            epoch_started: now,
        }
    }

    fn advance(&mut self, now: Instant) {
        self.secret = next_secret(&self.secret);
        self.key = aead_key(&self.secret);
        self.epoch = self.epoch.wrapping_add(1);
        self.epoch_frames = 0;
        self.epoch_started = now;
    }
}

/// Both directions of an established session.
pub struct Session {
    send: Direction,
    recv: Direction,
    config: SessionConfig,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("send_epoch", &self.send.epoch)
            .field("send_counter", &self.send.counter)
            .field("recv_epoch", &self.recv.epoch)
            .field("recv_counter", &self.recv.counter)
            .finish()
    }
}

impl Session {
    /// A session on the handshake's keys.
    pub fn new(keys: SessionKeys, now: Instant, config: SessionConfig) -> Self {
        let (send, recv) = keys.into_parts();
        Self {
            send: Direction::new(send, now),
            recv: Direction::new(recv, now),
            config,
        }
    }

    /// Appends one whole wire frame carrying `msg` to `out`.
    pub fn seal(
        &mut self,
        msg: &Message,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<(), Exhausted> {
        self.seal_with(msg.encoded_len(), now, out, |out| msg.encode(out))
    }

    /// Testing only: appends one whole wire frame whose plaintext is `plaintext` verbatim,
    /// not necessarily a valid [`Message`], so fuzzers can reach the message decoder behind
    /// the AEAD. Never use it to send anything real.
    #[cfg(any(test, feature = "testing"))]
    pub fn seal_raw(
        &mut self,
        plaintext: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<(), Exhausted> {
        self.seal_with(plaintext.len(), now, out, |out| {
            out.extend_from_slice(plaintext)
        })
    }

    /// Seals the `len` plaintext bytes `encode` appends to `out` as one whole wire frame.
    fn seal_with(
        &mut self,
        len: usize,
        now: Instant,
        out: &mut Vec<u8>,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), Exhausted> {
        let s = &mut self.send;
        if s.epoch_frames >= self.config.rekey_after_frames
            || now.millis_since(s.epoch_started) >= self.config.rekey_after_ms
        {
            s.advance(now);
        }
        let counter = s.counter;
        s.counter = counter.checked_add(1).ok_or(Exhausted)?;
        s.epoch_frames += 1;
        out.reserve(crate::wire::LEN_PREFIX + 1 + SESSION_OVERHEAD + len);
        put_frame_header(out, FrameType::Session, SESSION_OVERHEAD + len);
        let header = header(s.epoch, counter);
        out.extend_from_slice(&header[1..]);
        let start = out.len();
        encode(out);
        let tag = s
            .key
            .seal_in_place_separate_tag(nonce(counter), aead::Aad::from(header), &mut out[start..])
            .map_err(|_| Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts a session frame body in place; returns where the plaintext lies in `body`.
    pub fn open(&mut self, body: &mut [u8]) -> Result<std::ops::Range<usize>, FrameRejected> {
        if body.len() < SESSION_OVERHEAD {
            return Err(FrameRejected::Malformed);
        }
        let mut r = Reader::new(&body[..12]);
        let epoch = r.u32().map_err(|_| FrameRejected::Malformed)?;
        let counter = r.u64().map_err(|_| FrameRejected::Malformed)?;
        let d = &mut self.recv;
        if counter != d.counter {
            return Err(FrameRejected::OutOfOrder {
                got: counter,
                expected: d.counter,
            });
        }
        let next = if epoch == d.epoch {
            None
        } else if epoch == d.epoch.wrapping_add(1) {
            Some(next_secret(&d.secret))
        } else {
            return Err(FrameRejected::BadEpoch(epoch));
        };
        let next_key = next.as_ref().map(|s| aead_key(s));
        let key = next_key.as_ref().unwrap_or(&d.key);
        let plain = key
            .open_in_place(
                nonce(counter),
                aead::Aad::from(header(epoch, counter)),
                &mut body[12..],
            )
            .map_err(|_| FrameRejected::Unauthentic)?
            .len();
        d.counter += 1;
        if let (Some(secret), Some(key)) = (next, next_key) {
            d.secret = secret;
            d.key = key;
            d.epoch = epoch;
        }
        Ok(12..12 + plain)
    }

    /// The epoch this side sends in.
    pub fn send_epoch(&self) -> u32 {
        self.send.epoch
    }

    /// The epoch this side receives in.
    pub fn recv_epoch(&self) -> u32 {
        self.recv.epoch
    }
}

fn header(epoch: u32, counter: u64) -> [u8; 13] {
    let mut h = [0u8; 13];
    h[0] = FrameType::Session.code();
    h[1..5].copy_from_slice(&epoch.to_be_bytes());
    h[5..].copy_from_slice(&counter.to_be_bytes());
    h
}

fn nonce(counter: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

fn aead_key(secret: &[u8; KEY_LEN]) -> aead::LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, secret)
        .unwrap_or_else(|_| unreachable!("32 bytes is an AES-256 key"));
    aead::LessSafeKey::new(unbound)
}

fn next_secret(secret: &[u8; KEY_LEN]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut next = Zeroizing::new([0u8; KEY_LEN]);
    let ok = Hkdf::<Sha256>::new(None, secret)
        .expand(REKEY_INFO, next.as_mut())
        .is_ok();
    debug_assert!(ok, "32 bytes is within HKDF-SHA256's output limit");
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn pair(config: SessionConfig) -> (Session, Session) {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        let a = SessionKeys::dangerous_from_bytes(k1, k2);
        let b = SessionKeys::dangerous_from_bytes(k2, k1);
        (
            Session::new(a, Instant(0), config),
            Session::new(b, Instant(0), config),
        )
    }

    fn frame(s: &mut Session, data: &'static [u8], now: u64) -> Vec<u8> {
        let mut out = Vec::new();
        s.seal(
            &Message::Data(Bytes::from_static(data)),
            Instant(now),
            &mut out,
        )
        .unwrap();
        out.split_off(5)
    }

    fn open(s: &mut Session, mut body: Vec<u8>) -> Result<Vec<u8>, FrameRejected> {
        let range = s.open(&mut body)?;
        Ok(body[range].to_vec())
    }

    #[test]
    fn replayed_reordered_and_tampered_frames_are_refused() {
        let (mut a, mut b) = pair(SessionConfig::default());
        let f0 = frame(&mut a, b"zero", 0);
        let f1 = frame(&mut a, b"one", 0);
        let f2 = frame(&mut a, b"two", 0);
        assert!(matches!(
            open(&mut b, f1.clone()),
            Err(FrameRejected::OutOfOrder {
                got: 1,
                expected: 0
            })
        ));
        assert_eq!(open(&mut b, f0.clone()).unwrap()[1..], *b"zero");
        assert!(matches!(
            open(&mut b, f0),
            Err(FrameRejected::OutOfOrder { .. })
        ));
        let mut bad = f1.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(open(&mut b, bad), Err(FrameRejected::Unauthentic));
        assert_eq!(open(&mut b, f1).unwrap()[1..], *b"one");
        assert_eq!(open(&mut b, f2).unwrap()[1..], *b"two");
    }

    #[test]
    fn rekeying_by_count_and_age_keeps_the_session_alive() {
        let config = SessionConfig {
            rekey_after_frames: 3,
            rekey_after_ms: 1000,
        };
        let (mut a, mut b) = pair(config);
        for i in 0..10u64 {
            let f = frame(&mut a, b"x", i * 10);
            assert!(open(&mut b, f).is_ok());
        }
        assert_eq!(a.send_epoch(), 3);
        assert_eq!(b.recv_epoch(), 3);
        let f = frame(&mut a, b"late", 5000);
        assert_eq!(a.send_epoch(), 4);
        assert_eq!(open(&mut b, f).unwrap()[1..], *b"late");
        // A frame from two epochs ahead is refused.
        a.send.advance(Instant(5000));
        a.send.advance(Instant(5000));
        let skipped = frame(&mut a, b"skip", 5000);
        assert_eq!(open(&mut b, skipped), Err(FrameRejected::BadEpoch(6)));
    }

    /// SECURITY.md, "Threat model": a network observer sees each DATA payload's size plus a
    /// fixed 34 bytes (length, type, epoch, counter, message type, tag).
    #[test]
    fn a_data_frame_is_its_payload_plus_34_bytes() {
        let (mut a, _) = pair(SessionConfig::default());
        for len in [0, 1, 53, 1000, 65_536] {
            let mut out = Vec::new();
            let msg = Message::Data(Bytes::from(vec![7; len]));
            a.seal(&msg, Instant(0), &mut out).unwrap();
            assert_eq!(out.len(), len + 34);
        }
    }

    /// SECURITY.md, "Nonces": the counter grows by one per frame across epochs and never
    /// resets; at its end sealing fails, and nothing is written, rather than wrap.
    #[test]
    fn the_counter_runs_on_across_epochs_and_sealing_fails_rather_than_wrap() {
        let config = SessionConfig {
            rekey_after_frames: 2,
            rekey_after_ms: u64::MAX,
        };
        let (mut a, mut b) = pair(config);
        for i in 0..5u64 {
            let f = frame(&mut a, b"x", 0);
            assert_eq!(f[4..12], i.to_be_bytes(), "counter {i}");
            assert!(open(&mut b, f).is_ok());
        }
        assert_eq!(a.send_epoch(), 2);
        a.send.counter = u64::MAX - 1;
        let mut out = Vec::new();
        let msg = Message::Data(Bytes::from_static(b"last"));
        assert!(a.seal(&msg, Instant(0), &mut out).is_ok());
        out.clear();
        assert_eq!(a.seal(&msg, Instant(0), &mut out), Err(Exhausted));
        assert!(out.is_empty(), "nothing sealed under a wrapped counter");
    }
}
