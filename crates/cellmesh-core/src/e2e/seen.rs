//! Which envelopes a device has delivered: the duplicate memory that makes "never delivered
//! twice" hold across restarts.
//!
//! An envelope is remembered by (sending cell, envelope id) with its authenticated `time`.
//! Envelopes older than [`MAX_AGE`] are refused outright (see [`super::Endpoint::open`]), so
//! entries older than that are forgotten. The memory is bounded per sending cell
//! ([`SEEN_PER_CELL`]) and in all ([`SEEN_TOTAL`]); to make room it forgets a whole second
//! of the oldest entries of the cell that holds the most, and raises that cell's *floor*:
//! envelopes of that cell older than its floor are refused as too old, since whether they
//! were delivered can no longer be told. Forgetting thus never lets a replay through; at
//! worst it refuses a very late envelope of a cell that sent more than the bound since.
//!
//! Pure state: the caller persists what [`Seen::take_changes`] returns and hands it back to
//! [`Seen::restore`] after a restart.

use std::collections::{BTreeMap, BTreeSet};

use crate::Timestamp;
use crate::id::CellId;
use crate::relay::MsgId;

use super::MAX_AGE;

/// Most envelopes remembered per sending cell: more than a relay lets envelopes be reordered
/// (a drained queue of 10,000 overtaken by those in flight).
pub const SEEN_PER_CELL: usize = 1 << 17;
/// Most envelopes remembered in all.
pub const SEEN_TOTAL: usize = 1 << 19;

/// Whether an envelope was delivered before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen: deliver it.
    New,
    /// Delivered before.
    Seen,
    /// Older than what is remembered of its cell: cannot be told, so refused.
    TooOld,
}

/// What changed, for the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeenChange {
    /// Remember this envelope.
    Put {
        /// The sending cell.
        cell: CellId,
        /// The envelope id.
        id: MsgId,
        /// Its authenticated time.
        time: Timestamp,
    },
    /// Forget this envelope (its cell's floor moved past it).
    Forget {
        /// The sending cell.
        cell: CellId,
        /// The envelope id.
        id: MsgId,
        /// Its time, as put.
        time: Timestamp,
    },
    /// Envelopes of `cell` older than `floor` are refused.
    Floor {
        /// The sending cell.
        cell: CellId,
        /// Seconds: times below it are too old.
        floor: Timestamp,
    },
    /// Everything put with a time below this is forgotten (older than [`MAX_AGE`]).
    ExpireBefore(Timestamp),
}

#[derive(Default)]
struct Cell {
    ids: BTreeMap<MsgId, u64>,
    by_time: BTreeMap<u64, Vec<MsgId>>,
    floor: u64,
}

/// The duplicate memory. Ordered maps only: the same inputs forget the same entries.
#[derive(Default)]
pub struct Seen {
    cells: BTreeMap<CellId, Cell>,
    /// (entries, cell), to find the cell that holds the most.
    sizes: BTreeSet<(usize, CellId)>,
    len: usize,
    changes: Vec<SeenChange>,
}

impl Seen {
    /// An empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the memory from what was persisted (puts not forgotten, and floors).
    pub fn restore(
        entries: impl IntoIterator<Item = (CellId, MsgId, Timestamp)>,
        floors: impl IntoIterator<Item = (CellId, Timestamp)>,
    ) -> Self {
        let mut seen = Self::default();
        for (cell, floor) in floors {
            let c = seen.cells.entry(cell).or_default();
            c.floor = c.floor.max(floor.0);
        }
        for (cell, id, time) in entries {
            seen.add(cell, id, time.0);
        }
        seen.changes.clear();
        seen.make_room();
        seen
    }

    /// Whether the envelope `id` of `cell` with time `time` was delivered before.
    pub fn check(&self, cell: CellId, id: MsgId, time: Timestamp) -> Verdict {
        match self.cells.get(&cell) {
            Some(c) if c.ids.contains_key(&id) => Verdict::Seen,
            Some(c) if time.0 < c.floor => Verdict::TooOld,
            _ => Verdict::New,
        }
    }

    /// Remembers a delivered envelope (a no-op if it is remembered already).
    pub fn insert(&mut self, cell: CellId, id: MsgId, time: Timestamp) {
        if self.add(cell, id, time.0) {
            self.changes.push(SeenChange::Put { cell, id, time });
            self.make_room();
        }
    }

    /// Forgets what is older than [`MAX_AGE`] at `now`: envelopes that old are refused anyway.
    pub fn expire(&mut self, now: Timestamp) {
        let before = now.minus(MAX_AGE).0;
        let mut any = false;
        let cells: Vec<CellId> = self.cells.keys().copied().collect();
        for cell in cells {
            let old = self.len_of(cell);
            let Some(c) = self.cells.get_mut(&cell) else {
                continue;
            };
            let keep = c.by_time.split_off(&before);
            for ids in std::mem::replace(&mut c.by_time, keep).into_values() {
                for id in ids {
                    c.ids.remove(&id);
                    self.len -= 1;
                    any = true;
                }
            }
            if c.floor < before {
                c.floor = 0;
            }
            self.resize(cell, old);
        }
        if any {
            self.changes
                .push(SeenChange::ExpireBefore(Timestamp(before)));
        }
    }

    /// Envelopes remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What changed since the last call, in order.
    pub fn take_changes(&mut self) -> Vec<SeenChange> {
        std::mem::take(&mut self.changes)
    }

    fn len_of(&self, cell: CellId) -> usize {
        self.cells.get(&cell).map_or(0, |c| c.ids.len())
    }

    /// Adds without recording a change; false if it was there.
    fn add(&mut self, cell: CellId, id: MsgId, time: u64) -> bool {
        let old = self.len_of(cell);
        let c = self.cells.entry(cell).or_default();
        if c.ids.insert(id, time).is_some() {
            return false;
        }
        c.by_time.entry(time).or_default().push(id);
        self.len += 1;
        self.resize(cell, old);
        true
    }

    fn resize(&mut self, cell: CellId, old: usize) {
        self.sizes.remove(&(old, cell));
        let new = self.len_of(cell);
        if new > 0 {
            self.sizes.insert((new, cell));
        } else if self.cells.get(&cell).is_some_and(|c| c.floor == 0) {
            self.cells.remove(&cell);
        }
    }

    /// Forgets the oldest second of the largest cell while over a bound.
    fn make_room(&mut self) {
        loop {
            let Some(&(largest, cell)) = self.sizes.last() else {
                return;
            };
            if largest <= SEEN_PER_CELL && self.len <= SEEN_TOTAL {
                return;
            }
            self.forget_oldest_second(cell);
        }
    }

    fn forget_oldest_second(&mut self, cell: CellId) {
        let old = self.len_of(cell);
        let Some(c) = self.cells.get_mut(&cell) else {
            return;
        };
        let Some((time, ids)) = c.by_time.pop_first() else {
            return;
        };
        for id in ids {
            c.ids.remove(&id);
            self.len -= 1;
            self.changes.push(SeenChange::Forget {
                cell,
                id,
                time: Timestamp(time),
            });
        }
        c.floor = c.floor.max(time + 1);
        self.changes.push(SeenChange::Floor {
            cell,
            floor: Timestamp(c.floor),
        });
        self.resize(cell, old);
    }
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen")
            .field("cells", &self.cells.len())
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(n: u8) -> CellId {
        CellId::from_key(crate::keys::PublicKey::from_bytes_unchecked(&[n; 32]))
    }

    fn id(n: u32) -> MsgId {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        MsgId(b)
    }

    #[test]
    fn remembers_by_cell_and_id() {
        let mut s = Seen::new();
        let t = Timestamp(1_800_000_000);
        assert_eq!(s.check(cell(1), id(1), t), Verdict::New);
        s.insert(cell(1), id(1), t);
        assert_eq!(s.check(cell(1), id(1), t), Verdict::Seen);
        // Another cell's envelope with the same id is another envelope.
        assert_eq!(s.check(cell(2), id(1), t), Verdict::New);
        assert_eq!(
            s.take_changes(),
            vec![SeenChange::Put {
                cell: cell(1),
                id: id(1),
                time: t
            }]
        );
        s.insert(cell(1), id(1), t);
        assert!(s.take_changes().is_empty(), "nothing new to persist");
    }

    #[test]
    fn a_flood_forgets_only_its_own_and_raises_its_floor() {
        let mut s = Seen::new();
        let t = 1_800_000_000u64;
        s.insert(cell(9), id(0), Timestamp(t));
        // One cell sends far more than the bound, one envelope a second.
        for n in 0..(SEEN_PER_CELL as u32 + 10) {
            s.insert(cell(1), id(n), Timestamp(t + u64::from(n)));
        }
        assert_eq!(s.len_of(cell(1)), SEEN_PER_CELL);
        // The honest cell's entry is untouched.
        assert_eq!(s.check(cell(9), id(0), Timestamp(t)), Verdict::Seen);
        // The flooder's forgotten envelopes are now too old, not new: no replay gets in.
        assert_eq!(s.check(cell(1), id(3), Timestamp(t + 3)), Verdict::TooOld);
        assert_eq!(s.check(cell(1), id(10), Timestamp(t + 10)), Verdict::Seen);
        // Restored from its changes, it says the same.
        let mut puts = Vec::new();
        let mut floors = Vec::new();
        let changes = s.take_changes();
        for c in &changes {
            match c {
                SeenChange::Put { cell, id, time } => puts.push((*cell, *id, *time)),
                SeenChange::Forget { cell, id, .. } => puts.retain(|p| (p.0, p.1) != (*cell, *id)),
                SeenChange::Floor { cell, floor } => floors.push((*cell, *floor)),
                SeenChange::ExpireBefore(_) => {}
            }
        }
        let r = Seen::restore(puts, floors);
        assert_eq!(r.len(), s.len());
        assert_eq!(r.check(cell(1), id(3), Timestamp(t + 3)), Verdict::TooOld);
        assert_eq!(r.check(cell(9), id(0), Timestamp(t)), Verdict::Seen);
    }

    #[test]
    fn old_entries_expire() {
        let mut s = Seen::new();
        let t = Timestamp(1_800_000_000);
        s.insert(cell(1), id(1), t);
        s.insert(cell(1), id(2), t.plus(MAX_AGE + 10));
        s.take_changes();
        s.expire(t.plus(MAX_AGE + 5));
        assert_eq!(s.len(), 1);
        assert_eq!(s.take_changes(), vec![SeenChange::ExpireBefore(t.plus(5))]);
        assert_eq!(s.check(cell(1), id(2), t.plus(MAX_AGE + 10)), Verdict::Seen);
    }
}
