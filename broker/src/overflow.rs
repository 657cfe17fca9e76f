//! A full-queue episode of one connected client, and when it stops holding
//! publishers up.
//!
//! When a delivery finds a connected client's queue at its bound (the
//! session queue for QoS 1/2, the connection's outbound bytes for QoS 0),
//! the client is either *outpaced*, a subscriber that keeps taking but is
//! slower than its publishers together (a fan-in), or *slow*: stuck, gone
//! quiet, or reading on purpose at a pace no publisher should follow. An
//! outpaced client makes its publishers wait (they are not read from, and
//! TCP slows them down), so nothing already acknowledged to them is lost.
//! A slow one holds nobody up: what overflows its queues is dropped and
//! counted until it has emptied them.
//!
//! An [`Overflow`] is that verdict for one episode, from the delivery that
//! found the queue full until the queue has drained (see
//! `Session::note_drained`). The client counts as slow once either:
//!
//! - the episode has lasted `queue_full_wait_ms`, whatever the client did;
//! - the client has made no progress for [`STALL_WINDOW`]: its writer came
//!   back for no PUBLISH (it is still writing the last batch, or has none)
//!   and it acknowledged no delivery (PUBACK, PUBREC, PUBCOMP).
//!
//! The verdict sticks for the rest of the episode. The second rule is what
//! keeps a subscriber that stops reading from holding every publisher of
//! its topics for the whole `queue_full_wait_ms`: a client that subscribes
//! widely and stalls (once, or over and over) now costs them at most
//! [`STALL_WINDOW`] per episode.

use std::time::{Duration, Instant};

/// How long a client in a full-queue episode may take nothing (no batch
/// taken by its writer, no acknowledgement) before it counts as slow. A
/// subscriber that keeps up with a fan-in acknowledges or drains every few
/// milliseconds, even on a loaded 2-core machine where another process
/// takes its CPU for a few milliseconds at a time; one that is silent for
/// a quarter of a second has stopped, and its publishers should not wait
/// the rest of `queue_full_wait_ms` to find out.
pub const STALL_WINDOW: Duration = Duration::from_millis(250);

/// One full-queue episode. See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Overflow {
    /// When the queue was first found full.
    since: Instant,
    /// The client's last progress in this episode (`since` until any).
    progress_at: Instant,
    /// The client counts as slow; kept until the episode ends.
    slow: bool,
}

impl Overflow {
    /// An episode that begins at `now`.
    pub fn begin(now: Instant) -> Overflow {
        Overflow {
            since: now,
            progress_at: now,
            slow: false,
        }
    }

    /// The client took something at `now` (its writer took a batch, or it
    /// acknowledged a message). A client already silent past its deadline
    /// was stalled, whether or not anyone looked: it stays slow.
    pub fn progress(&mut self, now: Instant, wait: Duration) {
        self.outpaced(now, wait);
        self.progress_at = self.progress_at.max(now);
    }

    /// Whether the client is still only outpaced at `now`, so publishers
    /// wait for it; false once it counts as slow, for the rest of the
    /// episode. `wait` is `queue_full_wait_ms`.
    pub fn outpaced(&mut self, now: Instant, wait: Duration) -> bool {
        if !self.slow && now >= self.deadline(wait) {
            self.slow = true;
        }
        !self.slow
    }

    /// When the client will count as slow unless it makes progress first.
    pub fn deadline(&self, wait: Duration) -> Instant {
        (self.since + wait).min(self.progress_at + STALL_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    #[test]
    fn a_client_that_takes_nothing_is_slow_after_the_stall_window() {
        let t0 = Instant::now();
        let mut episode = Overflow::begin(t0);
        assert!(episode.outpaced(t0 + STALL_WINDOW / 2, WAIT));
        assert_eq!(episode.deadline(WAIT), t0 + STALL_WINDOW);
        assert!(!episode.outpaced(t0 + STALL_WINDOW, WAIT));
    }

    #[test]
    fn a_client_that_keeps_taking_is_outpaced_until_the_wait_ends() {
        let t0 = Instant::now();
        let mut episode = Overflow::begin(t0);
        let step = STALL_WINDOW / 2;
        let mut now = t0;
        while now + step < t0 + WAIT {
            now += step;
            episode.progress(now, WAIT);
            assert!(episode.outpaced(now, WAIT));
        }
        assert_eq!(episode.deadline(WAIT), t0 + WAIT);
        assert!(!episode.outpaced(t0 + WAIT, WAIT));
    }

    #[test]
    fn the_slow_verdict_sticks_for_the_episode() {
        let t0 = Instant::now();
        let mut episode = Overflow::begin(t0);
        assert!(!episode.outpaced(t0 + STALL_WINDOW, WAIT));
        // Taking again does not make its publishers wait again: the
        // episode ends only when the queue is empty.
        let later = t0 + STALL_WINDOW + Duration::from_millis(1);
        episode.progress(later, WAIT);
        assert!(!episode.outpaced(later, WAIT));
    }

    #[test]
    fn taking_again_after_a_silence_nobody_looked_at_is_still_slow() {
        let t0 = Instant::now();
        let mut episode = Overflow::begin(t0);
        episode.progress(t0 + STALL_WINDOW * 2, WAIT);
        assert!(!episode.outpaced(t0 + STALL_WINDOW * 2, WAIT));
    }

    #[test]
    fn a_progress_stamp_never_goes_back() {
        let t0 = Instant::now();
        let mut episode = Overflow::begin(t0 + STALL_WINDOW);
        episode.progress(t0, WAIT);
        assert_eq!(episode.deadline(WAIT), t0 + 2 * STALL_WINDOW);
    }
}
