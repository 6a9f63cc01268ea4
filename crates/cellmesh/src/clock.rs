//! The one clock of the runtime: every time the core is handed comes from here.
//!
//! [`now`] is milliseconds since the Unix epoch as the core counts time
//! ([`cellmesh_core::Instant`]): the wall clock read once, then advanced by the monotonic
//! clock, so that a clock step (NTP) neither closes every session as idle nor stalls timers.
//! [`timestamp`] is the same instant in whole seconds, as tokens and envelopes count time.

use std::sync::OnceLock;
use std::time::{Instant as Monotonic, SystemTime, UNIX_EPOCH};

use cellmesh_core::{Instant, Timestamp};

/// Now, in milliseconds since the Unix epoch (monotonic from the first call on).
pub fn now() -> Instant {
    static ANCHOR: OnceLock<(Monotonic, u64)> = OnceLock::new();
    let (mono, wall) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        (Monotonic::now(), wall)
    });
    let elapsed = u64::try_from(mono.elapsed().as_millis()).unwrap_or(u64::MAX);
    Instant(wall.saturating_add(elapsed))
}

/// Now, in whole seconds since the Unix epoch.
pub fn timestamp() -> Timestamp {
    now().timestamp()
}
