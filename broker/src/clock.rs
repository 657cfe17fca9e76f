//! The broker's coarse clock: milliseconds since the broker started, as of
//! the last keep alive sweep (keep_alive.rs advances it every
//! [`SWEEP_INTERVAL`](crate::keep_alive::SWEEP_INTERVAL)).
//!
//! Reading it is one relaxed load, cheap enough for the paths that run per
//! packet or per delivery (stamping a connection's last packet, noticing a
//! queue its client stopped taking from), where `Instant::now()` would cost
//! a system clock read each time. It is never ahead of real time and at
//! most one sweep interval behind it, so a span measured on it can be up to
//! one interval shorter or longer than the real one: a check that must not
//! fire early adds one interval to its limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// See the module documentation.
#[derive(Debug)]
pub struct CoarseClock {
    origin: Instant,
    /// Milliseconds since `origin` at the last [`advance`](Self::advance).
    now_ms: AtomicU64,
}

impl Default for CoarseClock {
    fn default() -> Self {
        CoarseClock {
            origin: Instant::now(),
            now_ms: AtomicU64::new(0),
        }
    }
}

impl CoarseClock {
    /// The clock as of its last advance, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Sets the clock to the real time and returns it.
    pub fn advance(&self) -> u64 {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.now_ms.store(now, Ordering::Relaxed);
        now
    }
}
