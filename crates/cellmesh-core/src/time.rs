//! Time as the protocol sees it: whole seconds since the Unix epoch, passed in by the caller.

use std::fmt;

/// Seconds since 1970-01-01T00:00:00Z. The core never reads a clock; callers pass one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp `secs` seconds later, saturating at the end of time.
    pub fn plus(self, secs: u64) -> Self {
        Self(self.0.saturating_add(secs))
    }

    /// The timestamp `secs` seconds earlier, saturating at the epoch.
    pub fn minus(self, secs: u64) -> Self {
        Self(self.0.saturating_sub(secs))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Milliseconds since the Unix epoch: the time connection state machines run on. Callers
/// pass it in; tests and simulators pass virtual time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(pub u64);

impl Instant {
    /// The instant `ms` milliseconds later, saturating.
    pub fn plus_millis(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The whole second this instant falls in, as tokens count time.
    pub fn timestamp(self) -> Timestamp {
        Timestamp(self.0 / 1000)
    }
}
