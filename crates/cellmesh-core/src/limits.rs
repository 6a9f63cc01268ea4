//! Small pure structures for the limits a node and a relay keep against their own peers: rates
//! ([`TokenBucket`], [`Buckets`]), the address groups limits count by ([`AddrGroup`]), capped
//! counts ([`Slots`]), bytes held for others ([`ByteBudget`]) and a relay's registrations
//! ([`Registrations`]).
//!
//! Nothing here reads a clock or touches a socket: every method that depends on time takes the
//! current [`Instant`] or [`Timestamp`], so the runtime, tests and a simulator drive the same
//! code. Ordered maps only, so the same inputs give the same outputs in the same order (the
//! simulator replays histories by seed). Every structure is bounded: keyed maps forget what no longer matters (a full bucket, a
//! count of zero) and refuse to grow past a size when nothing can be forgotten.
//!
//! ```text
//!  join ─► Buckets<AddrGroup> (per address) ─► TokenBucket (node-wide) ─► Slots<CellId>,
//!          Slots<AddrGroup> (joined connections) ─► Registrations (relay directory) ─► ACK
//!  FORWARD to an online device ─► ByteBudget (device, cell, relay) ─► pushed, or else queued
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use crate::id::{CellId, NodeId};
use crate::{Instant, Timestamp};

/// A rate: so many events a second sustained (in thousandths, so that slow rates, one every
/// ten seconds, are exact too), `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Events per 1,000 seconds, sustained.
    milli_per_second: u64,
    /// Events at once (the bucket's size).
    burst: u32,
}

impl Rate {
    /// No limit worth the name.
    pub const UNLIMITED: Self = Self {
        milli_per_second: u32::MAX as u64 * 1000,
        burst: u32::MAX,
    };

    /// `per_second` sustained, `burst` at once.
    pub const fn new(per_second: u32, burst: u32) -> Self {
        Self {
            milli_per_second: per_second as u64 * 1000,
            burst,
        }
    }

    /// One event every `ms` milliseconds sustained (0 counts as 1), `burst` at once.
    pub const fn every(ms: u64, burst: u32) -> Self {
        let ms = if ms == 0 { 1 } else { ms };
        Self {
            milli_per_second: 1_000_000 / ms,
            burst,
        }
    }

    /// Events a second, sustained (rounded down).
    pub const fn per_second(self) -> u64 {
        self.milli_per_second / 1000
    }

    /// Events at once.
    pub const fn burst(self) -> u32 {
        self.burst
    }
}

/// A token bucket: `burst` tokens when made, refilled at the rate, one taken per event.
/// The rate is passed to each call rather than kept, so a map of buckets stores only this.
///
/// The one rate limiter of the core (link UPDATEs, new end-to-end sessions, a relay's
/// FORWARDs, LOOKUPs and joins). Integer arithmetic in millionths of a token: a millisecond
/// adds exactly the rate's thousandths per second, so refill is exact however often it is
/// asked, and the same inputs always give the same answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Millionths of a token.
    micro: u64,
    at: Instant,
}

const MICRO: u64 = 1_000_000;

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self {
            micro: u64::from(rate.burst) * MICRO,
            at: now,
        }
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.micro >= MICRO {
            self.micro -= MICRO;
            true
        } else {
            false
        }
    }

    /// Milliseconds from `now` until a token is there (0: one is there now).
    pub fn wait_ms(&self, rate: Rate, now: Instant) -> u64 {
        let mut b = *self;
        b.refill(rate, now);
        if b.micro >= MICRO {
            return 0;
        }
        if rate.milli_per_second == 0 {
            return u64::MAX;
        }
        // Rounded up: asking again after this long finds the token.
        (MICRO - b.micro).div_ceil(rate.milli_per_second)
    }

    /// Whether the bucket is full at `now` (it then says nothing a fresh one would not).
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.micro >= u64::from(rate.burst) * MICRO
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let ms = now.millis_since(self.at);
        if ms > 0 {
            let cap = u64::from(rate.burst) * MICRO;
            let added = ms.saturating_mul(rate.milli_per_second);
            self.micro = self.micro.saturating_add(added).min(cap);
            self.at = now;
        }
    }
}

/// One [`TokenBucket`] per key, all at the same rate, at most `max_keys` of them. A key whose
/// bucket is full is forgotten when room is needed (a fresh bucket is the same); when every
/// bucket is in use, a new key is refused, so the map never outgrows its bound.
#[derive(Clone, Debug)]
pub struct Buckets<K> {
    rate: Rate,
    max_keys: usize,
    map: BTreeMap<K, TokenBucket>,
}

impl<K: Ord + Copy> Buckets<K> {
    /// Buckets at `rate`, for at most `max_keys` keys at once.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            map: BTreeMap::new(),
        }
    }

    /// The rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes a token from `key`'s bucket at `now`.
    pub fn take(&mut self, key: K, now: Instant) -> bool {
        let rate = self.rate;
        if !self.map.contains_key(&key) && self.map.len() >= self.max_keys {
            self.map.retain(|_, b| !b.is_full(rate, now));
            if self.map.len() >= self.max_keys {
                return false;
            }
        }
        self.map
            .entry(key)
            .or_insert_with(|| TokenBucket::full(rate, now))
            .take(rate, now)
    }

    /// Milliseconds from `now` until `key` has a token (0 for a key without a bucket).
    pub fn wait_ms(&self, key: K, now: Instant) -> u64 {
        self.map.get(&key).map_or(0, |b| b.wait_ms(self.rate, now))
    }

    /// Keys with a bucket (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// What per-address limits count by: an IPv4 address, or an IPv6 address's /64 (the usual
/// allocation of one subscriber, who can use any of its 2^64 addresses). An IPv4-mapped IPv6
/// address counts as the IPv4 address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrGroup(Group);

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Group {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl From<IpAddr> for AddrGroup {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(Group::V4(v4.octets())),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(Group::V4(v4.octets())),
                None => {
                    let mut prefix = [0; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Self(Group::V6(prefix))
                }
            },
        }
    }
}

impl fmt::Display for AddrGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Group::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(o)),
            Group::V6(p) => {
                let mut o = [0; 16];
                o[..8].copy_from_slice(&p);
                write!(f, "{}/64", Ipv6Addr::from(o))
            }
        }
    }
}

impl fmt::Debug for AddrGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AddrGroup({self})")
    }
}

/// Which cap refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The key's own cap.
    Key,
    /// The cap over all keys.
    Total,
}

/// Counts held per key and in all, each under a cap. A key whose count falls to zero is
/// forgotten, so the map holds only keys that hold something.
#[derive(Clone, Debug)]
pub struct Slots<K> {
    per_key: usize,
    total_cap: usize,
    held: BTreeMap<K, usize>,
    total: usize,
}

impl<K: Ord + Copy> Slots<K> {
    /// At most `per_key` for one key and `total` in all.
    pub fn new(per_key: usize, total: usize) -> Self {
        Self {
            per_key,
            total_cap: total,
            held: BTreeMap::new(),
            total: 0,
        }
    }

    /// Takes one for `key`, unless that would pass a cap.
    pub fn take(&mut self, key: K) -> Result<(), Full> {
        if self.total >= self.total_cap {
            return Err(Full::Total);
        }
        let held = self.held.entry(key).or_insert(0);
        if *held >= self.per_key {
            if *held == 0 {
                self.held.remove(&key);
            }
            return Err(Full::Key);
        }
        *held += 1;
        self.total += 1;
        Ok(())
    }

    /// Takes one for `key` whatever the caps (for a holder the caller lets in regardless).
    pub fn add(&mut self, key: K) {
        *self.held.entry(key).or_insert(0) += 1;
        self.total += 1;
    }

    /// Gives one back for `key` (nothing if it holds none).
    pub fn release(&mut self, key: K) {
        if let Some(held) = self.held.get_mut(&key) {
            *held -= 1;
            self.total -= 1;
            if *held == 0 {
                self.held.remove(&key);
            }
        }
    }

    /// What `key` holds.
    pub fn held(&self, key: K) -> usize {
        self.held.get(&key).copied().unwrap_or(0)
    }

    /// What all keys hold.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Bounds on bytes a relay holds in memory on behalf of devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteLimits {
    /// For one device.
    pub per_device: usize,
    /// For all devices of one cell together.
    pub per_cell: usize,
    /// For the whole relay, with what the caller holds elsewhere (see [`ByteBudget::charge`]).
    pub total: usize,
}

/// Bytes held for devices, per device, per cell and in all, each under its [`ByteLimits`].
#[derive(Clone, Debug)]
pub struct ByteBudget {
    limits: ByteLimits,
    devices: BTreeMap<NodeId, usize>,
    cells: BTreeMap<CellId, usize>,
    total: usize,
}

impl ByteBudget {
    /// An empty budget.
    pub fn new(limits: ByteLimits) -> Self {
        Self {
            limits,
            devices: BTreeMap::new(),
            cells: BTreeMap::new(),
            total: 0,
        }
    }

    /// The limits.
    pub fn limits(&self) -> ByteLimits {
        self.limits
    }

    /// Holds `bytes` for `device` of `cell` if that keeps the device, its cell and the whole
    /// (this budget's total plus `elsewhere`, bytes the caller holds outside it that count
    /// against the same total) within the limits. Nothing is held when it returns false.
    pub fn charge(&mut self, device: NodeId, cell: CellId, bytes: usize, elsewhere: usize) -> bool {
        let d = self.devices.get(&device).copied().unwrap_or(0);
        let c = self.cells.get(&cell).copied().unwrap_or(0);
        let fits = |held: usize, limit: usize| held.saturating_add(bytes) <= limit;
        if !(fits(d, self.limits.per_device)
            && fits(c, self.limits.per_cell)
            && fits(self.total.saturating_add(elsewhere), self.limits.total))
        {
            return false;
        }
        self.devices.insert(device, d + bytes);
        self.cells.insert(cell, c + bytes);
        self.total += bytes;
        true
    }

    /// Releases `bytes` held for `device` of `cell` (never below zero).
    pub fn release(&mut self, device: NodeId, cell: CellId, bytes: usize) {
        fn sub<K: Ord>(map: &mut BTreeMap<K, usize>, key: K, bytes: usize) -> usize {
            let Some(held) = map.get_mut(&key) else {
                return 0;
            };
            let taken = bytes.min(*held);
            *held -= taken;
            if *held == 0 {
                map.remove(&key);
            }
            taken
        }
        let taken = sub(&mut self.devices, device, bytes);
        sub(&mut self.cells, cell, taken);
        self.total -= taken.min(self.total);
    }

    /// What is held for `device`.
    pub fn device(&self, device: NodeId) -> usize {
        self.devices.get(&device).copied().unwrap_or(0)
    }

    /// What is held for the devices of `cell`.
    pub fn cell(&self, cell: CellId) -> usize {
        self.cells.get(&cell).copied().unwrap_or(0)
    }

    /// What is held in all.
    pub fn total(&self) -> usize {
        self.total
    }
}

/// Bounds on a relay's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistrationLimits {
    /// Devices of one cell.
    pub per_cell: usize,
    /// Devices in all.
    pub total: usize,
    /// Seconds a device may stay away before its registration (and its queue) is dropped.
    pub ttl_secs: u64,
}

/// How a join stands with the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// The device was registered before.
    Known,
    /// The device is new, and is now registered.
    New,
}

/// Why a new device could not register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistrationRefused {
    /// Its cell has as many devices registered as the relay allows one cell.
    #[error("its cell has the most devices this relay registers for one cell")]
    CellFull,
    /// The relay has as many devices registered as it allows.
    #[error("this relay has registered as many devices as it holds")]
    RelayFull,
    /// The device's cell has revoked it (a NACK `revoked`, not `busy`).
    #[error("the device has been revoked by its cell")]
    Revoked,
}

/// A relay's registered devices as its limits see them: which cell each belongs to, when it was
/// last seen, and how many each cell has. The directory's tokens live in the store.
#[derive(Clone, Debug)]
pub struct Registrations {
    limits: RegistrationLimits,
    devices: BTreeMap<NodeId, Registration>,
    per_cell: BTreeMap<CellId, usize>,
}

/// One registered device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Its cell.
    pub cell: CellId,
    /// When it last joined or left.
    pub last_seen: Timestamp,
}

impl Registrations {
    /// An empty directory.
    pub fn new(limits: RegistrationLimits) -> Self {
        Self {
            limits,
            devices: BTreeMap::new(),
            per_cell: BTreeMap::new(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> RegistrationLimits {
        self.limits
    }

    /// Records a device the store already holds (at start), whatever the limits: lowering
    /// them does not drop anyone, it stops new devices until the counts are below them.
    pub fn load(&mut self, cell: CellId, node: NodeId, last_seen: Timestamp) {
        self.insert(node, Registration { cell, last_seen });
    }

    /// A join of `node` of `cell` at `now`: a known device is seen again; a new one is
    /// registered if its cell and the relay have room. A device seen before under another cell
    /// counts as new in this one (and leaves the other).
    pub fn join(
        &mut self,
        cell: CellId,
        node: NodeId,
        now: Timestamp,
    ) -> Result<Registered, RegistrationRefused> {
        if let Some(r) = self.devices.get_mut(&node)
            && r.cell == cell
        {
            r.last_seen = r.last_seen.max(now);
            return Ok(Registered::Known);
        }
        let moving = self.devices.contains_key(&node);
        if !moving && self.devices.len() >= self.limits.total {
            return Err(RegistrationRefused::RelayFull);
        }
        if self.per_cell.get(&cell).copied().unwrap_or(0) >= self.limits.per_cell {
            return Err(RegistrationRefused::CellFull);
        }
        self.insert(
            node,
            Registration {
                cell,
                last_seen: now,
            },
        );
        Ok(Registered::New)
    }

    /// `node` was seen at `now` (it left, or is still online).
    pub fn seen(&mut self, node: NodeId, now: Timestamp) {
        if let Some(r) = self.devices.get_mut(&node) {
            r.last_seen = r.last_seen.max(now);
        }
    }

    /// The registration of `node`.
    pub fn get(&self, node: NodeId) -> Option<Registration> {
        self.devices.get(&node).copied()
    }

    /// Whether `node` is registered.
    pub fn contains(&self, node: NodeId) -> bool {
        self.devices.contains_key(&node)
    }

    /// Devices not seen for longer than the time to live at `now`, leaving out those for which
    /// `online` is true; for the caller to drop (see [`Registrations::remove`]).
    pub fn expired(
        &self,
        now: Timestamp,
        online: impl Fn(NodeId) -> bool,
    ) -> Vec<(CellId, NodeId)> {
        let cutoff = now.minus(self.limits.ttl_secs);
        let mut out: Vec<(CellId, NodeId)> = self
            .devices
            .iter()
            .filter(|(n, r)| r.last_seen < cutoff && !online(**n))
            .map(|(n, r)| (r.cell, *n))
            .collect();
        out.sort_unstable();
        out
    }

    /// Forgets `node`.
    pub fn remove(&mut self, node: NodeId) -> Option<Registration> {
        let r = self.devices.remove(&node)?;
        if let Some(count) = self.per_cell.get_mut(&r.cell) {
            *count -= 1;
            if *count == 0 {
                self.per_cell.remove(&r.cell);
            }
        }
        Some(r)
    }

    /// Registered devices in all.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Registered devices of `cell`.
    pub fn in_cell(&self, cell: CellId) -> usize {
        self.per_cell.get(&cell).copied().unwrap_or(0)
    }

    fn insert(&mut self, node: NodeId, r: Registration) {
        self.remove(node);
        *self.per_cell.entry(r.cell).or_insert(0) += 1;
        self.devices.insert(node, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningSecret;

    fn node(n: u8) -> NodeId {
        NodeId::from_key(SigningSecret::from_seed(&[n; 32]).public())
    }

    fn cell(n: u8) -> CellId {
        CellId::from_key(SigningSecret::from_seed(&[n; 32]).public())
    }

    const T: Instant = Instant(1_000_000);

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let rate = Rate::new(10, 3);
        let mut b = TokenBucket::full(rate, T);
        assert!((0..3).all(|_| b.take(rate, T)));
        assert!(!b.take(rate, T));
        assert_eq!(b.wait_ms(rate, T), 100);
        assert!(!b.take(rate, T.plus_millis(99)));
        assert!(b.take(rate, T.plus_millis(100)));
        // Never more than the burst, however long it waited.
        assert!(b.is_full(rate, T.plus_millis(100_000)));
        let mut later = b;
        assert!((0..3).all(|_| later.take(rate, T.plus_millis(100_000))));
        assert!(!later.take(rate, T.plus_millis(100_000)));
        // A time before the last one adds nothing and takes nothing away.
        assert!(!later.take(rate, T));
        let none = Rate::new(0, 1);
        let mut b = TokenBucket::full(none, T);
        assert!(b.take(none, T));
        assert_eq!(b.wait_ms(none, T), u64::MAX);
    }

    #[test]
    fn slow_rates_are_exact_and_refill_keeps_the_remainder() {
        // One every ten seconds, asked every six: the leftover four count.
        let rate = Rate::every(10_000, 1);
        let mut b = TokenBucket::full(rate, T);
        assert!(b.take(rate, T));
        assert!(!b.take(rate, T.plus_millis(6_000)));
        assert!(b.take(rate, T.plus_millis(10_000)));
        assert_eq!(b.wait_ms(rate, T.plus_millis(10_000)), 10_000);
        assert_eq!(rate.per_second(), 0);
        assert_eq!(Rate::every(50, 256).per_second(), 20);
    }

    proptest::proptest! {
        /// Over any schedule, no more than burst + elapsed × rate tokens are handed out.
        #[test]
        fn never_more_than_the_rate(steps in proptest::collection::vec(0u64..500, 1..200), burst in 1u32..10, per_second in 1u32..300) {
            let rate = Rate::new(per_second, burst);
            let mut b = TokenBucket::full(rate, Instant(0));
            let mut now = Instant(0);
            let mut taken = 0u64;
            for s in steps {
                now = now.plus_millis(s);
                while b.take(rate, now) {
                    taken += 1;
                }
            }
            proptest::prop_assert!(taken <= u64::from(burst) + now.0 * u64::from(per_second) / 1000);
        }
    }

    #[test]
    fn buckets_are_per_key_and_bounded() {
        let mut b = Buckets::new(Rate::new(1, 1), 2);
        assert!(b.take(1u8, T));
        assert!(!b.take(1u8, T));
        assert!(b.take(2u8, T.plus_millis(500)));
        // Both keys busy: a third is refused rather than tracked.
        assert!(!b.take(3u8, T.plus_millis(500)));
        assert_eq!(b.len(), 2);
        // Once key 1's bucket is full again it is forgotten, and 3 gets its place (2's is
        // still refilling).
        assert!(b.take(3u8, T.plus_millis(1000)));
        assert_eq!(b.len(), 2);
        assert!(!b.take(2u8, T.plus_millis(1000)));
        assert_eq!(b.wait_ms(3u8, T.plus_millis(1000)), 1000);
        assert_eq!(b.wait_ms(9u8, T), 0);
    }

    #[test]
    fn addresses_group_by_ipv4_address_and_ipv6_slash_64() {
        let g = |s: &str| AddrGroup::from(s.parse::<IpAddr>().unwrap());
        assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(g("2001:db8:1:2::1"), g("2001:db8:1:3::1"));
        assert_ne!(g("192.0.2.1"), g("192.0.2.2"));
        assert_eq!(g("::ffff:192.0.2.1"), g("192.0.2.1"));
        assert_eq!(g("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(g("192.0.2.1").to_string(), "192.0.2.1");
        assert_eq!(g("::1"), g("::2"));
    }

    #[test]
    fn slots_cap_each_key_and_the_total() {
        let mut s = Slots::new(2, 3);
        assert_eq!(s.take('a'), Ok(()));
        assert_eq!(s.take('a'), Ok(()));
        assert_eq!(s.take('a'), Err(Full::Key));
        assert_eq!(s.take('b'), Ok(()));
        assert_eq!(s.take('c'), Err(Full::Total));
        s.release('a');
        assert_eq!(s.held('a'), 1);
        assert_eq!(s.take('c'), Ok(()));
        s.release('z');
        assert_eq!(s.total(), 3);
        let mut none = Slots::new(0, 10);
        assert_eq!(none.take('a'), Err(Full::Key));
        assert_eq!(none.held('a'), 0);
        assert!(none.held.is_empty());
    }

    #[test]
    fn a_byte_budget_bounds_device_cell_and_total() {
        let limits = ByteLimits {
            per_device: 100,
            per_cell: 150,
            total: 200,
        };
        let mut b = ByteBudget::new(limits);
        let (c1, c2) = (cell(1), cell(2));
        assert!(b.charge(node(1), c1, 100, 0));
        assert!(!b.charge(node(1), c1, 1, 0), "device at its bound");
        assert!(b.charge(node(2), c1, 50, 0));
        assert!(!b.charge(node(3), c1, 1, 0), "cell at its bound");
        assert!(!b.charge(node(4), c2, 51, 0), "total at its bound");
        assert!(b.charge(node(4), c2, 50, 0));
        assert!(!b.charge(node(5), c2, 1, 0));
        b.release(node(1), c1, 60);
        assert_eq!((b.device(node(1)), b.cell(c1), b.total()), (40, 90, 140));
        // What the caller holds elsewhere counts against the total.
        assert!(!b.charge(node(5), c2, 10, 51));
        assert!(b.charge(node(5), c2, 10, 50));
        // Releasing more than held, or for a stranger, never goes below zero.
        b.release(node(1), c1, 1000);
        b.release(node(9), c1, 1000);
        assert_eq!((b.device(node(1)), b.cell(c1), b.total()), (0, 50, 110));
    }

    #[test]
    fn registrations_cap_cells_and_the_relay_and_expire() {
        let limits = RegistrationLimits {
            per_cell: 2,
            total: 3,
            ttl_secs: 100,
        };
        let mut r = Registrations::new(limits);
        let t = Timestamp(10_000);
        assert_eq!(r.join(cell(1), node(1), t), Ok(Registered::New));
        assert_eq!(r.join(cell(1), node(2), t), Ok(Registered::New));
        assert_eq!(
            r.join(cell(1), node(3), t),
            Err(RegistrationRefused::CellFull)
        );
        assert_eq!(r.join(cell(1), node(1), t.plus(5)), Ok(Registered::Known));
        assert_eq!(r.join(cell(2), node(4), t), Ok(Registered::New));
        assert_eq!(
            r.join(cell(3), node(5), t),
            Err(RegistrationRefused::RelayFull)
        );
        assert_eq!((r.len(), r.in_cell(cell(1))), (3, 2));

        // node(2) last seen at t, node(1) at t+5, node(4) at t; node(4) is online.
        let online = |n: NodeId| n == node(4);
        assert!(r.expired(t.plus(100), online).is_empty());
        assert_eq!(r.expired(t.plus(101), online), vec![(cell(1), node(2))]);
        r.seen(node(2), t.plus(50));
        assert!(r.expired(t.plus(101), online).is_empty());
        let mut gone = r.expired(t.plus(200), online);
        gone.sort();
        let mut want = vec![(cell(1), node(1)), (cell(1), node(2))];
        want.sort();
        assert_eq!(gone, want);
        for (_, n) in gone {
            assert!(r.remove(n).is_some());
        }
        assert_eq!((r.len(), r.in_cell(cell(1))), (1, 0));
        assert_eq!(r.join(cell(1), node(3), t), Ok(Registered::New));

        // A device seen under another cell moves, without counting twice against the total.
        assert_eq!(r.join(cell(2), node(3), t), Ok(Registered::New));
        assert_eq!((r.len(), r.in_cell(cell(1)), r.in_cell(cell(2))), (2, 0, 2));
        // Loaded registrations are kept whatever the limits.
        for n in 10..20 {
            r.load(cell(9), node(n), t);
        }
        assert_eq!(r.in_cell(cell(9)), 10);
        assert_eq!(
            r.join(cell(9), node(30), t),
            Err(RegistrationRefused::RelayFull)
        );
        assert_eq!(r.join(cell(9), node(10), t), Ok(Registered::Known));
    }
}
