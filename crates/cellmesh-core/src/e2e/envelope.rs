//! The envelope: its clear header, sealing in place under a session key, and opening.
//!
//! ```text
//! envelope = version:u8(=2) kind:u8 session:[16] rest
//!   kind 1 INIT   enc:[32] node_token:bytes16 identity:bytes16 sealed
//!   kind 2 MSG    sealed
//!   kind 3 RESET                                               (exactly 18 bytes)
//!   kind 4 REPLY  instance:[16] sealed
//! sealed = epoch:u32 counter:u64 time:u64 AES-256-GCM(key, epoch ‖ counter, aad, plain) tag[16]
//! aad    = "cellmesh e2e v2" ‖ every byte before the ciphertext ‖ sender cell ‖ sender node
//!          ‖ recipient cell ‖ recipient node ‖ envelope id
//! ```

use bytes::Bytes;
use ring::aead;
use zeroize::Zeroize as _;

use crate::Timestamp;
use crate::codec::{DecodeError, Reader};
use crate::id::{CellId, NodeId};
use crate::relay::MsgId;

use super::{E2E_VERSION, OpenError, SessionId};

pub(super) const INIT: u8 = 1;
pub(super) const MSG: u8 = 2;
pub(super) const RESET: u8 = 3;
pub(super) const REPLY: u8 = 4;
pub(super) const PLAIN_MESSAGE: u8 = 1;
pub(super) const PLAIN_ACK: u8 = 2;
pub(super) const PLAIN_BUNDLE: u8 = 3;
pub(super) const TAG_LEN: usize = 16;
pub(super) const SEALED_HEADER: usize = 4 + 8 + 8;

const CONTEXT: &[u8] = b"cellmesh e2e v2";

/// The clear part of an envelope before its sealed part.
pub(super) struct Header<'a> {
    pub(super) kind: u8,
    pub(super) session: SessionId,
    /// INIT fields, a REPLY's instance, or nothing.
    pub(super) extra: &'a [u8],
    pub(super) time: Timestamp,
}

/// One direction's AES-256-GCM key.
pub(super) struct SealKey(aead::LessSafeKey);

impl SealKey {
    pub(super) fn new(key: &[u8; 32]) -> Self {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key)
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
        Self(aead::LessSafeKey::new(unbound))
    }
}

/// Builds an envelope: the header, then the plaintext `write` appends, sealed in place (so
/// the plaintext is never in a second buffer). `counter` must never have been used with
/// `key` and `epoch` before: the caller's lease guarantees it.
#[allow(clippy::too_many_arguments)]
pub(super) fn seal_envelope(
    header: Header<'_>,
    key: &SealKey,
    epoch: u32,
    counter: u64,
    binding: &[u8; 128],
    id: MsgId,
    plain_len: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Bytes {
    let mut out = Vec::with_capacity(18 + header.extra.len() + SEALED_HEADER + plain_len + TAG_LEN);
    out.extend_from_slice(&[E2E_VERSION, header.kind]);
    out.extend_from_slice(&header.session.0);
    out.extend_from_slice(header.extra);
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&counter.to_be_bytes());
    out.extend_from_slice(&header.time.0.to_be_bytes());
    let sealed_at = out.len();
    write(&mut out);
    let (clear, plain) = out.split_at_mut(sealed_at);
    let tag = with_aad(clear, binding, id, |aad| {
        key.0
            .seal_in_place_separate_tag(nonce(epoch, counter), aead::Aad::from(aad), plain)
    })
    .unwrap_or_else(|_| unreachable!("AES-GCM seals any length under 64 GiB"));
    out.extend_from_slice(tag.as_ref());
    Bytes::from(out)
}

/// The epoch of the sealed part that starts at `header_len`.
pub(super) fn sealed_epoch(envelope: &[u8], header_len: usize) -> Result<u32, OpenError> {
    let mut r = Reader::new(envelope.get(header_len..).unwrap_or_default());
    Ok(r.u32()?)
}

/// Opens the sealed part of `envelope` (which starts at `header_len`): time and plaintext.
pub(super) fn open_envelope(
    key: &SealKey,
    envelope: &[u8],
    header_len: usize,
    binding: &[u8; 128],
    id: MsgId,
) -> Result<(Timestamp, Vec<u8>), OpenError> {
    let sealed_at = header_len + SEALED_HEADER;
    if envelope.len() < sealed_at + TAG_LEN {
        return Err(DecodeError::Truncated.into());
    }
    let mut r = Reader::new(&envelope[header_len..sealed_at]);
    let epoch = r.u32()?;
    let counter = r.u64()?;
    let time = Timestamp(r.u64()?);
    // The plaintext is the application's message, handed over as it is (not zeroized);
    // whatever a failed open leaves in the buffer is wiped.
    let mut buf = envelope[sealed_at..].to_vec();
    let opened = with_aad(&envelope[..sealed_at], binding, id, |aad| {
        key.0
            .open_in_place(nonce(epoch, counter), aead::Aad::from(aad), &mut buf)
            .map(|p| p.len())
    });
    match opened {
        Ok(len) => {
            buf.truncate(len);
            Ok((time, buf))
        }
        Err(_) => {
            buf.zeroize();
            Err(OpenError::Unauthentic)
        }
    }
}

/// Calls `f` with the associated data: context, clear header, binding, envelope id. On the
/// stack when it fits (every MSG and REPLY), on the heap for INIT's long header.
fn with_aad<R>(header: &[u8], binding: &[u8; 128], id: MsgId, f: impl FnOnce(&[u8]) -> R) -> R {
    const STACK: usize = 256;
    let len = CONTEXT.len() + header.len() + 128 + 16;
    let fill = |buf: &mut [u8]| {
        let (a, rest) = buf.split_at_mut(CONTEXT.len());
        a.copy_from_slice(CONTEXT);
        let (b, rest) = rest.split_at_mut(header.len());
        b.copy_from_slice(header);
        let (c, d) = rest.split_at_mut(128);
        c.copy_from_slice(binding);
        d.copy_from_slice(&id.0);
    };
    if len <= STACK {
        let mut buf = [0u8; STACK];
        fill(&mut buf[..len]);
        f(&buf[..len])
    } else {
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        f(&buf)
    }
}

fn nonce(epoch: u32, counter: u64) -> aead::Nonce {
    let mut n = [0; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Sender cell, sender node, recipient cell, recipient node.
pub(super) fn binding(
    from_cell: CellId,
    from_node: NodeId,
    to_cell: CellId,
    to_node: NodeId,
) -> [u8; 128] {
    let mut b = [0; 128];
    b[..32].copy_from_slice(from_cell.key().as_bytes());
    b[32..64].copy_from_slice(from_node.key().as_bytes());
    b[64..96].copy_from_slice(to_cell.key().as_bytes());
    b[96..].copy_from_slice(to_node.key().as_bytes());
    b
}

/// The binding seen from the other direction (replies: the recipient is the sender).
pub(super) fn reversed(b: &[u8; 128]) -> [u8; 128] {
    let mut r = [0; 128];
    r[..64].copy_from_slice(&b[64..]);
    r[64..].copy_from_slice(&b[..64]);
    r
}

pub(super) fn reset_envelope(session: SessionId) -> Bytes {
    let mut out = Vec::with_capacity(18);
    out.extend_from_slice(&[E2E_VERSION, RESET]);
    out.extend_from_slice(&session.0);
    Bytes::from(out)
}
