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
//!
//! Where the exact time is needed only sometimes (a PUBACK needs it only
//! when a waiting message may have expired, or a full queue's episode is
//! on), [`LazyInstant`] reads the system clock once, on first use, and not
//! at all when nothing asks.

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

/// `Instant::now()`, read when first asked for and then kept: see the
/// module documentation.
#[derive(Debug, Default)]
pub struct LazyInstant(Option<Instant>);

impl LazyInstant {
    /// The time of the first call.
    pub fn get(&mut self) -> Instant {
        *self.0.get_or_insert_with(Instant::now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lazy_instant_is_read_once_and_kept() {
        let mut lazy = LazyInstant::default();
        assert!(lazy.0.is_none(), "not read before it is asked for");
        let first = lazy.get();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(lazy.get(), first);
    }
}
