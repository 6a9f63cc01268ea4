//! The sends a mailbox keeps until every device of their recipient cell has answered, found
//! by envelope id without hashing it, and their saved form.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use aes::cipher::{BlockDecrypt as _, BlockEncrypt as _, KeyInit as _};
use bytes::Bytes;
use zeroize::Zeroizing;

use crate::codec::{DecodeError, Reader};
use crate::e2e::RemoteDevice;
use crate::id::{CellId, NodeId};
use crate::keys::PublicKey;
use crate::relay::{MsgId, RefuseCode};
use crate::{Instant, Timestamp};

use super::Token;

/// Where one device of the recipient cell stands for one envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DevState {
    /// To be sealed (a send restored from disk, whose device is not looked up yet).
    Unsealed,
    /// Forwarded; no answer from the relay yet.
    Sent,
    /// Refused for a reason that may pass; send again at the instant.
    Retry(Instant),
    /// On the device's live link; no acknowledgement yet.
    Pushed,
    /// In the relay's store; no acknowledgement yet.
    Queued,
    /// Refused for good.
    Refused(RefuseCode),
    /// Acknowledged end to end.
    Acked,
}

impl DevState {
    /// Whether the relay's answer or the device's acknowledgement is still awaited for the
    /// outcome (queued counts as an answer).
    pub(super) fn waiting(self) -> bool {
        matches!(
            self,
            Self::Unsealed | Self::Sent | Self::Retry(_) | Self::Pushed
        )
    }

    /// Whether nothing more will happen for this device.
    pub(super) fn settled(self) -> bool {
        matches!(self, Self::Acked | Self::Refused(_))
    }
}

/// One device of the recipient cell, for one envelope.
pub(super) struct DeviceSend {
    pub(super) node: NodeId,
    /// `None` for a send restored from disk until its cell is looked up again.
    pub(super) device: Option<Arc<RemoteDevice>>,
    /// The sealed envelope (empty until sealed).
    pub(super) envelope: Bytes,
    pub(super) state: DevState,
}

/// What the application was told of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Told {
    Nothing,
    Queued,
    Delivered,
    /// No answer within the acknowledgement timeout.
    Unknown,
}

/// One envelope's worth of messages to one cell: a single message (whose id is the
/// envelope's) or a bundle of messages submitted together (each with its own id).
pub(super) struct PendingSend {
    /// The envelope's id, in every FORWARD and acknowledgement of it.
    pub(super) id: MsgId,
    pub(super) cell: CellId,
    pub(super) messages: Vec<(MsgId, Bytes)>,
    pub(super) devices: Vec<DeviceSend>,
    /// Who waits for the outcome: one token per message (the same token may wait for a
    /// retried id twice).
    pub(super) tokens: Vec<(Token, MsgId)>,
    pub(super) told: Told,
    /// Whether a saved form was handed out (so the store has one to update or delete).
    pub(super) saved: bool,
    /// When it was made: kept until [`super::RETAIN`] after.
    pub(super) created: Timestamp,
}

impl PendingSend {
    /// The saved form: what a restarted mailbox needs to finish the send.
    ///
    /// ```text
    /// 1:u8 id:[16] cell:[32] created:u64 count:u16 { id:[16] len:u32 body }*
    /// devices:u8 { node:[32] state:u8 }*        state 0 pending, 1 queued, 2 acked, 3 refused
    /// ```
    pub(super) fn save(&self) -> Zeroizing<Vec<u8>> {
        let bodies: usize = self.messages.iter().map(|(_, b)| 20 + b.len()).sum();
        let mut out = Zeroizing::new(Vec::with_capacity(60 + bodies + 33 * self.devices.len()));
        out.push(1);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(self.cell.key().as_bytes());
        out.extend_from_slice(&self.created.0.to_be_bytes());
        out.extend_from_slice(&(self.messages.len() as u16).to_be_bytes());
        for (id, body) in &self.messages {
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(body);
        }
        out.push(self.devices.len() as u8);
        for d in &self.devices {
            out.extend_from_slice(d.node.key().as_bytes());
            out.push(match d.state {
                DevState::Queued => 1,
                DevState::Acked => 2,
                DevState::Refused(_) => 3,
                _ => 0,
            });
        }
        out
    }

    /// Reads a saved send back: its devices to seal again (pending ones), or to wait for
    /// (queued ones); the application was told delivered or queued before.
    pub(super) fn load(record: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(record);
        if r.u8()? != 1 {
            return Err(DecodeError::Invalid("saved send version"));
        }
        let id = MsgId(r.array()?);
        let cell = CellId::from_key(PublicKey::from_bytes_unchecked(&r.array()?));
        let created = Timestamp(r.u64()?);
        let count = r.u16()? as usize;
        let mut messages = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let mid = MsgId(r.array()?);
            let len = r.u32()? as usize;
            messages.push((mid, Bytes::copy_from_slice(r.bytes(len)?)));
        }
        let n = r.u8()? as usize;
        let mut devices = Vec::with_capacity(n);
        let (mut acked, mut queued) = (false, false);
        for _ in 0..n {
            let node = NodeId::from_key(PublicKey::from_bytes_unchecked(&r.array()?));
            let state = match r.u8()? {
                0 => DevState::Unsealed,
                1 => {
                    queued = true;
                    DevState::Queued
                }
                2 => {
                    acked = true;
                    DevState::Acked
                }
                3 => DevState::Refused(RefuseCode::Other(0)),
                _ => return Err(DecodeError::Invalid("saved device state")),
            };
            devices.push(DeviceSend {
                node,
                device: None,
                envelope: Bytes::new(),
                state,
            });
        }
        r.finish()?;
        if messages.is_empty() {
            return Err(DecodeError::Invalid("saved send without messages"));
        }
        Ok(Self {
            id,
            cell,
            messages,
            devices,
            tokens: Vec::new(),
            // What the application was told follows from the devices: a send saved when its
            // outcome was unknown has neither an acknowledgement nor a queued copy.
            told: if acked {
                Told::Delivered
            } else if queued {
                Told::Queued
            } else {
                Told::Unknown
            },
            saved: true,
            created,
        })
    }
}

/// Sends kept by position before the oldest still kept move to a map.
const RECENT: usize = 1 << 17;

/// The sends a mailbox keeps, found by envelope id without hashing it.
///
/// An id this mailbox makes is a secret permutation (AES-128 under a key it drew) of seven
/// zero bytes, a domain byte and a sequence number: to everyone else ids look random and
/// cannot be predicted, while this mailbox reads the sequence number back and finds the send
/// by its position. Answers and acknowledgements come back in about the order the sends went
/// out, so the sends they touch sit next to each other in memory. Sends under ids chosen
/// elsewhere (by the application, or restored from an earlier run) are kept in an ordered
/// map beside them.
pub(super) struct Sends {
    ids: aes::Aes128,
    next: u64,
    /// The next bundled message's number (domain 1, so never taken for a send's).
    next_message: u64,
    /// Sends from sequence `base` on, by position; `None` once forgotten.
    recent: VecDeque<Option<PendingSend>>,
    base: u64,
    /// Sends older than `recent` reaches.
    old: BTreeMap<u64, PendingSend>,
    /// Sends under ids this mailbox did not make.
    foreign: BTreeMap<MsgId, PendingSend>,
    /// The envelope of each message of a kept bundle, by the message's id (an application
    /// that sends a message again under its id finds the bundle it went in).
    by_message: BTreeMap<MsgId, MsgId>,
    len: usize,
}

impl Sends {
    pub(super) fn new(key: &[u8; 16]) -> Self {
        Self {
            ids: aes::Aes128::new(&(*key).into()),
            next: 0,
            next_message: 0,
            recent: VecDeque::new(),
            base: 0,
            old: BTreeMap::new(),
            foreign: BTreeMap::new(),
            by_message: BTreeMap::new(),
            len: 0,
        }
    }

    /// The id the next send gets.
    pub(super) fn next_id(&self) -> MsgId {
        self.permute(0, self.next)
    }

    /// An id for a message in a bundle.
    pub(super) fn message_id(&mut self) -> MsgId {
        self.next_message += 1;
        self.permute(1, self.next_message - 1)
    }

    fn permute(&self, domain: u8, seq: u64) -> MsgId {
        let mut block = [0u8; 16];
        block[7] = domain;
        block[8..].copy_from_slice(&seq.to_be_bytes());
        let mut block = block.into();
        self.ids.encrypt_block(&mut block);
        MsgId(block.into())
    }

    /// The sequence number of an id this mailbox made for a send.
    fn seq(&self, id: &MsgId) -> Option<u64> {
        let mut block = id.0.into();
        self.ids.decrypt_block(&mut block);
        let block: [u8; 16] = block.into();
        let (zero, seq) = block.split_at(8);
        zero.iter()
            .all(|&b| b == 0)
            .then(|| u64::from_be_bytes(seq.try_into().unwrap_or_default()))
            .filter(|&s| s < self.next)
    }

    /// Keeps `send`: under its position if its id is [`Sends::next_id`], else aside.
    pub(super) fn insert(&mut self, send: PendingSend) {
        self.len += 1;
        for (m, _) in send.messages.iter().filter(|(m, _)| *m != send.id) {
            self.by_message.insert(*m, send.id);
        }
        if send.id != self.next_id() {
            self.foreign.insert(send.id, send);
            return;
        }
        self.next += 1;
        if self.recent.is_empty() {
            self.base = self.next - 1;
        }
        self.recent.push_back(Some(send));
        if self.recent.len() > RECENT {
            if let Some(Some(oldest)) = self.recent.pop_front() {
                self.old.insert(self.base, oldest);
            }
            self.base += 1;
            self.trim();
        }
    }

    pub(super) fn get(&self, id: &MsgId) -> Option<&PendingSend> {
        let Some(seq) = self.seq(id) else {
            return self.foreign.get(id);
        };
        if seq < self.base {
            return self.old.get(&seq);
        }
        let at = usize::try_from(seq - self.base).ok()?;
        self.recent.get(at)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, id: &MsgId) -> Option<&mut PendingSend> {
        let Some(seq) = self.seq(id) else {
            return self.foreign.get_mut(id);
        };
        if seq < self.base {
            return self.old.get_mut(&seq);
        }
        let at = usize::try_from(seq - self.base).ok()?;
        self.recent.get_mut(at)?.as_mut()
    }

    pub(super) fn contains(&self, id: &MsgId) -> bool {
        self.get(id).is_some()
    }

    /// The envelope id of the kept send that carries message `id` (itself, or a bundle).
    pub(super) fn envelope_of(&self, id: &MsgId) -> Option<MsgId> {
        if self.contains(id) {
            return Some(*id);
        }
        self.by_message.get(id).copied()
    }

    pub(super) fn remove(&mut self, id: &MsgId) -> Option<PendingSend> {
        let removed = self.remove_kept(id);
        if let Some(send) = &removed {
            for (m, _) in &send.messages {
                self.by_message.remove(m);
            }
        }
        removed
    }

    fn remove_kept(&mut self, id: &MsgId) -> Option<PendingSend> {
        let removed = match self.seq(id) {
            None => self.foreign.remove(id),
            Some(seq) if seq < self.base => self.old.remove(&seq),
            Some(seq) => {
                let at = usize::try_from(seq - self.base).ok()?;
                let removed = self.recent.get_mut(at)?.take();
                self.trim();
                removed
            }
        };
        self.len -= usize::from(removed.is_some());
        removed
    }

    /// Drops forgotten positions at the front.
    fn trim(&mut self) {
        while let Some(None) = self.recent.front() {
            self.recent.pop_front();
            self.base += 1;
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// In a fixed order: foreign ids, then old, then recent ones.
    pub(super) fn iter(&self) -> impl Iterator<Item = &PendingSend> {
        self.foreign
            .values()
            .chain(self.old.values())
            .chain(self.recent.iter().flatten())
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut PendingSend> {
        self.foreign
            .values_mut()
            .chain(self.old.values_mut())
            .chain(self.recent.iter_mut().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: MsgId) -> PendingSend {
        PendingSend {
            id,
            cell: CellId::from_key(PublicKey::from_bytes_unchecked(&[1; 32])),
            messages: vec![(id, Bytes::from_static(b"x"))],
            devices: Vec::new(),
            tokens: Vec::new(),
            told: Told::Nothing,
            saved: false,
            created: Timestamp(0),
        }
    }

    #[test]
    fn sends_are_found_by_id_and_forgotten_in_any_order() {
        let mut sends = Sends::new(&[7; 16]);
        let ids: Vec<MsgId> = (0..10)
            .map(|_| {
                let id = sends.next_id();
                sends.insert(pending(id));
                id
            })
            .collect();
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), 10, "ids differ");
        assert_eq!(sends.len(), 10);
        assert!(
            ids.iter()
                .all(|id| sends.get_mut(id).is_some_and(|s| s.id == *id))
        );
        assert_eq!(sends.remove(&ids[3]).map(|s| s.id), Some(ids[3]));
        assert!(sends.remove(&ids[3]).is_none());
        assert!(!sends.contains(&ids[3]));
        assert_eq!(sends.remove(&ids[0]).map(|s| s.id), Some(ids[0]));
        assert!(sends.contains(&ids[1]) && sends.contains(&ids[9]));
        assert_eq!(sends.len(), 8);
        // An id this mailbox did not make (another run's, another device's) is not found,
        // unless kept aside under it.
        assert!(sends.get_mut(&MsgId([7; 16])).is_none());
        let other = Sends::new(&[8; 16]);
        assert!(!sends.contains(&other.next_id()));
        sends.insert(pending(MsgId([7; 16])));
        assert!(sends.contains(&MsgId([7; 16])));
        assert_eq!(sends.iter().count(), 9);
    }

    #[test]
    fn sends_kept_long_move_aside_and_stay_found() {
        let mut sends = Sends::new(&[7; 16]);
        let first = sends.next_id();
        sends.insert(pending(first));
        let mut last = first;
        for _ in 0..RECENT + 10 {
            last = sends.next_id();
            sends.insert(pending(last));
            sends.remove(&last);
        }
        assert_eq!(sends.len(), 1);
        assert!(sends.recent.len() <= RECENT);
        assert!(sends.contains(&first));
        assert!(!sends.contains(&last));
        assert_eq!(sends.remove(&first).map(|s| s.id), Some(first));
        assert_eq!(sends.len(), 0);
    }

    #[test]
    fn a_saved_send_reads_back() {
        let mut s = pending(MsgId([3; 16]));
        s.messages = vec![
            (MsgId([4; 16]), Bytes::from_static(b"a")),
            (MsgId([5; 16]), Bytes::new()),
        ];
        let node = |n| NodeId::from_key(PublicKey::from_bytes_unchecked(&[n; 32]));
        for (n, state) in [
            (1, DevState::Pushed),
            (2, DevState::Queued),
            (3, DevState::Acked),
        ] {
            s.devices.push(DeviceSend {
                node: node(n),
                device: None,
                envelope: Bytes::new(),
                state,
            });
        }
        let back = PendingSend::load(&s.save()).unwrap();
        assert_eq!(back.id, s.id);
        assert_eq!(back.messages, s.messages);
        let states: Vec<_> = back.devices.iter().map(|d| (d.node, d.state)).collect();
        assert_eq!(
            states,
            vec![
                (node(1), DevState::Unsealed),
                (node(2), DevState::Queued),
                (node(3), DevState::Acked)
            ]
        );
        assert_eq!(back.told, Told::Delivered);
        let saved = s.save();
        for n in 0..saved.len() {
            assert!(PendingSend::load(&saved[..n]).is_err(), "cut at {n}");
        }
    }
}
