//! One integer token bucket for every rate the core bounds: UPDATEs per link, new end-to-end
//! sessions per sending cell, and (in the runtime) FORWARDs per cell at a relay.
//!
//! Time is passed in ([`Instant`], milliseconds); nothing here reads a clock. Refill is exact:
//! the remainder of a partial interval is kept, so a bucket asked often does not refill slower
//! than one asked rarely.

use crate::Instant;

/// `burst` tokens at once, then `refill` more every `every_ms` milliseconds, never more than
/// `burst` saved up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    tokens: u64,
    burst: u64,
    refill: u64,
    every_ms: u64,
    /// The instant up to which refill has been counted.
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`: `burst` tokens, one more every `every_ms` milliseconds (0
    /// counts as 1).
    pub fn new(burst: u64, every_ms: u64, now: Instant) -> Self {
        Self::with_refill(burst, 1, every_ms, now)
    }

    /// A full bucket at `now` that gains `refill` tokens every `every_ms` milliseconds, for
    /// rates above one a millisecond (200,000 a second is 200 every 1 ms).
    pub fn with_refill(burst: u64, refill: u64, every_ms: u64, now: Instant) -> Self {
        Self {
            tokens: burst,
            burst,
            refill: refill.max(1),
            every_ms: every_ms.max(1),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_n(1, now)
    }

    /// Takes `n` tokens if there are that many; otherwise takes none.
    pub fn take_n(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < n {
            return false;
        }
        self.tokens -= n;
        true
    }

    /// Tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens
    }

    /// Whether the bucket is full at `now` (so it may be forgotten: a new one is the same).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.available(now) == self.burst
    }

    fn refill(&mut self, now: Instant) {
        let periods = now.millis_since(self.at) / self.every_ms;
        let add = periods.saturating_mul(self.refill);
        if self.tokens.saturating_add(add) >= self.burst {
            self.tokens = self.burst;
            self.at = now;
        } else if periods > 0 {
            self.tokens += add;
            self.at = self.at.plus_millis(periods * self.every_ms);
        }
        // A clock that went back leaves `at` ahead; refill resumes once it passes it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_exactly() {
        let t0 = Instant(1_000);
        let mut b = TokenBucket::new(3, 100, t0);
        assert!(b.take(t0) && b.take(t0) && b.take(t0));
        assert!(!b.take(t0));
        // Asked every 60 ms: the 40 ms left over each time still count.
        assert!(!b.take(t0.plus_millis(60)));
        assert!(b.take(t0.plus_millis(120)));
        assert!(!b.take(t0.plus_millis(180)));
        assert!(b.take(t0.plus_millis(200)));
        // Never more than the burst saved up.
        assert_eq!(b.available(t0.plus_millis(100_000)), 3);
        assert!(b.is_full(t0.plus_millis(100_000)));
        assert!(!b.take_n(4, t0.plus_millis(100_000)));
        assert!(b.take_n(3, t0.plus_millis(100_000)));
    }

    #[test]
    fn a_clock_that_goes_back_gives_nothing() {
        let t0 = Instant(10_000);
        let mut b = TokenBucket::new(1, 1000, t0);
        assert!(b.take(t0));
        assert!(!b.take(Instant(0)));
        assert!(b.take(t0.plus_millis(1000)));
    }

    proptest::proptest! {
        /// Over any schedule, no more than burst + elapsed / every tokens are handed out.
        #[test]
        fn never_more_than_the_rate(steps in proptest::collection::vec(0u64..500, 1..200), burst in 1u64..10, every in 1u64..200) {
            let t0 = Instant(0);
            let mut b = TokenBucket::new(burst, every, t0);
            let mut now = t0;
            let mut taken = 0;
            for s in steps {
                now = now.plus_millis(s);
                if b.take(now) {
                    taken += 1;
                }
            }
            proptest::prop_assert!(taken <= burst + now.0 / every);
        }

        /// Many tokens a millisecond: the same bound, scaled.
        #[test]
        fn fast_rates_too(steps in proptest::collection::vec(0u64..5, 1..200), refill in 1u64..300) {
            let mut b = TokenBucket::with_refill(1000, refill, 1, Instant(0));
            let mut now = Instant(0);
            let mut taken = 0;
            for s in steps {
                now = now.plus_millis(s);
                while b.take(now) {
                    taken += 1;
                }
            }
            proptest::prop_assert!(taken <= 1000 + now.0 * refill);
        }
    }
}
