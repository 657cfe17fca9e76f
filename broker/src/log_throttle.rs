//! Log lines that a client can cause, limited per line of code.
//!
//! Every refused connection, protocol error and refused subscription is
//! counted in [`metrics`](crate::metrics) and logged. The count is exact and
//! cheap; a log line is neither. A client that repeats a mistake thousands
//! of times a second (reconnecting with a bad password, a malformed CONNECT,
//! a SUBSCRIBE over its quota) must not fill the disk with the same line, or
//! cost the broker the formatting and the write of each.
//!
//! So each such call site ([`throttled!`]) logs at most
//! [`LINES_PER_WINDOW`] lines per [`WINDOW_SECS`]; the others are only
//! counted here, and the next line that the site does log carries
//! `suppressed = N`: the lines it left out since its previous one. Nothing
//! is lost from the metrics, and a reader of the log still sees the first
//! lines of every burst and how large it was.
//!
//! A site whose lines differ by a small key, such as the reason code a
//! connection is closed with, is limited per key ([`throttled_by!`]): one
//! client's storm of one mistake then does not hide other clients'
//! different ones.
//!
//! The state is one atomic word per call site and key (the window's start
//! and the lines logged in it) and one counter of suppressed lines; nothing
//! is locked and nothing allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines one call site may log per window. Enough to show the variety in a
/// burst (a few peers, a few client ids), few enough that a flood from one
/// client costs a few kilobytes of log a second.
pub const LINES_PER_WINDOW: u32 = 20;

/// The window's length. A second: a person reading a live log sees a
/// persistent fault within one, and a burst is summarised as soon as the
/// next line after it is logged.
pub const WINDOW_SECS: u64 = 1;

/// The limit of one call site. See the module documentation.
#[derive(Debug)]
pub struct LogThrottle {
    /// The current window's number (high 32 bits) and the lines logged in
    /// it (low 32 bits).
    window_and_lines: AtomicU64,
    /// Lines left out since a line was last logged.
    suppressed: AtomicU64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LogThrottle {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        LogThrottle {
            window_and_lines: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)`, with `n` the lines left
    /// out since the previous one, or `None` when this one is left out (and
    /// counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_in(current_window())
    }

    /// [`admit`](Self::admit) in the given window (its number counts
    /// windows since the process started).
    fn admit_in(&self, window: u32) -> Option<u64> {
        if take_line(&self.window_and_lines, window, LINES_PER_WINDOW) {
            // Every suppressed line is reported once: by the first line
            // admitted after it, or by one admitted at the same time (the
            // swap takes whatever others added before it).
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Takes one of `quota` lines in `window` from `word` (the window's number
/// in the high 32 bits, the lines taken in it in the low 32), if one is
/// left; the first line of a new window starts it.
fn take_line(word: &AtomicU64, window: u32, quota: u32) -> bool {
    let mut seen = word.load(Ordering::Relaxed);
    loop {
        let (seen_window, lines) = ((seen >> 32) as u32, seen as u32);
        let next = if seen_window != window {
            (u64::from(window) << 32) | 1
        } else if lines < quota {
            seen + 1
        } else {
            return false;
        };
        match word.compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => seen = now,
        }
    }
}

/// Lines one keyed call site may log per window over all its keys: a
/// client cycling through mistakes cannot make each key's quota add up to
/// hundreds of lines a second.
pub const KEYED_LINES_PER_WINDOW: u32 = 5 * LINES_PER_WINDOW;

/// One [`LogThrottle`] per key, for a call site whose lines differ by a key
/// (a reason code), within [`KEYED_LINES_PER_WINDOW`] for the site. Keys
/// are taken modulo `N`: keys that share a slot share its limit.
#[derive(Debug)]
pub struct KeyedLogThrottle<const N: usize> {
    slots: [LogThrottle; N],
    /// The site's window (high 32 bits) and lines logged in it (low 32).
    site: AtomicU64,
}

impl<const N: usize> Default for KeyedLogThrottle<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> KeyedLogThrottle<N> {
    /// A call site that has logged nothing yet.
    pub const fn new() -> Self {
        KeyedLogThrottle {
            slots: [const { LogThrottle::new() }; N],
            site: AtomicU64::new(0),
        }
    }

    /// [`LogThrottle::admit`] for the lines of `key`.
    pub fn admit(&self, key: usize) -> Option<u64> {
        self.admit_in(key, current_window())
    }

    /// [`admit`](Self::admit) in the given window. A line its key admits
    /// but the site's quota does not is counted among that key's
    /// suppressed lines.
    fn admit_in(&self, key: usize, window: u32) -> Option<u64> {
        let slot = &self.slots[key % N];
        let suppressed = slot.admit_in(window)?;
        if take_line(&self.site, window, KEYED_LINES_PER_WINDOW) {
            Some(suppressed)
        } else {
            // Those it would have reported are reported by the next one.
            slot.suppressed.fetch_add(suppressed + 1, Ordering::Relaxed);
            None
        }
    }
}

/// The number of the current window since the process started (it wraps
/// after 136 years of uptime, and a wrap only starts a window early).
fn current_window() -> u32 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let elapsed = ORIGIN.get_or_init(Instant::now).elapsed().as_secs();
    (elapsed / WINDOW_SECS) as u32
}

/// `tracing::event!` at `Level::$level` for a line a client can cause: at
/// most [`LINES_PER_WINDOW`] per window from this call site, the next one
/// logged after a gap saying how many were left out (`suppressed = N`).
/// A level that is not enabled costs no budget.
///
/// ```ignore
/// throttled!(INFO, %peer, ?code, "connection refused");
/// ```
macro_rules! throttled {
    ($level:ident, $($arg:tt)+) => {{
        static THROTTLE: $crate::log_throttle::LogThrottle =
            $crate::log_throttle::LogThrottle::new();
        if tracing::enabled!(tracing::Level::$level) {
            match THROTTLE.admit() {
                Some(0) => tracing::event!(tracing::Level::$level, $($arg)+),
                Some(suppressed) => tracing::event!(tracing::Level::$level, suppressed, $($arg)+),
                None => {}
            }
        }
    }};
}
pub(crate) use throttled;

/// [`throttled!`] limited per `key` (a `usize`) rather than per call site:
/// [`LINES_PER_WINDOW`] lines per window for each of up to 64 keys (keys
/// are taken modulo 64; MQTT reason codes from 0x80 to 0xBF each have their
/// own), and [`KEYED_LINES_PER_WINDOW`] for the site.
///
/// ```ignore
/// throttled_by!(code as usize, WARN, %peer, ?code, "closing connection");
/// ```
macro_rules! throttled_by {
    ($key:expr, $level:ident, $($arg:tt)+) => {{
        static THROTTLE: $crate::log_throttle::KeyedLogThrottle<64> =
            $crate::log_throttle::KeyedLogThrottle::new();
        if tracing::enabled!(tracing::Level::$level) {
            match THROTTLE.admit($key) {
                Some(0) => tracing::event!(tracing::Level::$level, $($arg)+),
                Some(suppressed) => tracing::event!(tracing::Level::$level, suppressed, $($arg)+),
                None => {}
            }
        }
    }};
}
pub(crate) use throttled_by;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_its_quota_then_counts_the_rest() {
        let throttle = LogThrottle::new();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(throttle.admit_in(7), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(throttle.admit_in(7), None);
        }
        // The first line of the next window reports the five left out, and
        // only it does.
        assert_eq!(throttle.admit_in(8), Some(5));
        assert_eq!(throttle.admit_in(8), Some(0));
    }

    #[test]
    fn each_key_has_its_own_quota() {
        let throttle = KeyedLogThrottle::<64>::new();
        let admit = |key: usize| throttle.admit_in(key, 9);
        // One key's storm: its quota, then nothing more from it...
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(admit(0x87), Some(0));
        }
        assert_eq!(admit(0x87), None);
        // ...while other keys still log.
        assert_eq!(admit(0x8D), Some(0));
        assert_eq!(admit(0x82), Some(0));
        assert_eq!(admit(0x87), None);
    }

    #[test]
    fn a_site_s_keys_together_stay_within_its_quota() {
        let throttle = KeyedLogThrottle::<64>::new();
        let mut logged = 0;
        for key in 0..64 {
            for _ in 0..LINES_PER_WINDOW {
                logged += u32::from(throttle.admit_in(key, 5).is_some());
            }
        }
        assert_eq!(logged, KEYED_LINES_PER_WINDOW);
        // The next window's first line of a key reports what its key left
        // out: the lines the site's quota refused included.
        let refused_of_last_key = u64::from(LINES_PER_WINDOW);
        assert_eq!(throttle.admit_in(63, 6), Some(refused_of_last_key));
    }

    #[test]
    fn a_quiet_site_logs_every_line() {
        let throttle = LogThrottle::new();
        for window in 0..100 {
            assert_eq!(throttle.admit_in(window), Some(0));
        }
    }

    /// Racing threads: the quota holds, and every line left out is
    /// reported exactly once. Which line reports it may differ: a thread
    /// admitted for the last line of the quota can take, with its own,
    /// the lines the others left out while it was being admitted.
    #[test]
    fn lines_left_out_by_racing_threads_are_all_reported() {
        let throttle = LogThrottle::new();
        let admitted = AtomicU64::new(0);
        let reported = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        if let Some(n) = throttle.admit_in(3) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            reported.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(
            admitted.load(Ordering::Relaxed),
            u64::from(LINES_PER_WINDOW)
        );
        let rest = throttle.admit_in(4).expect("a new window admits");
        assert_eq!(
            reported.load(Ordering::Relaxed) + rest,
            4000 - u64::from(LINES_PER_WINDOW)
        );
        assert_eq!(throttle.admit_in(4), Some(0));
    }
}
