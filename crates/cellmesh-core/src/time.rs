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
