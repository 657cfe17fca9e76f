//! Queues whose client has stopped taking from them, and why what they hold
//! is then copied out of the read buffers it arrived in.
//!
//! A decoded PUBLISH's topic and payload are slices of the pooled buffer it
//! was read into (the zero-copy path), and that buffer's memory lives as
//! long as any of its slices. While subscribers keep up this costs nothing:
//! the messages of one read leave together, within milliseconds. When one
//! subscriber stops reading, each message queued for it keeps its whole
//! buffer (4 KiB or more) alive long after the other messages of that read
//! have gone, while the queue's bounds count only what the message holds.
//! A subscriber of one topic among 64 in a dense stream held 50 MB of
//! buffers behind a queue whose bound counted 4 MiB.
//!
//! So a queue that has held something for [`STALLED_AFTER_MS`] without its
//! client taking anything from it is *stalled*. When a queue is found so,
//! everything the session holds for its client (the connection's outbound
//! queue, the in-flight window, the QoS 1/2 queue) is replaced by copies
//! that own their bytes (`Message::detached`: one copy per message, however
//! many queues hold it), and so is each message queued while it stays
//! stalled. Taking anything from the queue ends that.
//!
//! Two queues of a connected client can stall: its connection's outbound
//! queue (its writer takes from it) and its session's QoS 1/2 queue behind
//! a full in-flight window (acknowledgements make room). An offline
//! session's queue copies every message as it is queued (session/deliver.rs). The
//! check costs one load of the [`CoarseClock`](crate::clock::CoarseClock)
//! per message queued behind others, so queues that keep moving (a fan-in
//! subscriber's is never empty, but taken from every few milliseconds) copy
//! nothing.

use crate::keep_alive::SWEEP_INTERVAL;
use crate::overflow::STALL_WINDOW;

/// How long a queue may hold something its client takes nothing of before
/// it is stalled, on the coarse clock: [`STALL_WINDOW`], after which a
/// client in a full-queue episode counts as slow, plus one sweep interval,
/// so that the real time is never less than that window.
pub const STALLED_AFTER_MS: u64 = (STALL_WINDOW.as_millis() + SWEEP_INTERVAL.as_millis()) as u64;

/// Messages queued behind others between two looks at the clock (see
/// [`StallWatch::queued`]).
pub const CHECK_EVERY: usize = 16;

/// What [`StallWatch::queued`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The queue moves: the message may stay on its read buffer.
    Briefly,
    /// The queue has just been found stalled: detach everything held for
    /// the client, this message included.
    NewlyStalled,
    /// The queue was already stalled: detach this message.
    Stalled,
}

/// When one queue's client last took from it. The owning session's lock is
/// held for every call.
///
/// Eight bytes, in every session and every connection's queue: the clock
/// is kept as its low 32 bits, and spans are taken modulo 2^32 ms (49
/// days), which only a queue untouched for that long could misread, as
/// briefly waiting.
#[derive(Debug, Clone, Copy, Default)]
pub struct StallWatch {
    /// Coarse-clock milliseconds (low 32 bits) of the client's last take, or
    /// of the item that found the queue empty, whichever is later.
    since_ms: u32,
    stalled: bool,
}

impl StallWatch {
    /// A watch whose wait starts at `now_ms` (a new connection's queue).
    pub fn new(now_ms: u64) -> StallWatch {
        StallWatch {
            since_ms: now_ms as u32,
            stalled: false,
        }
    }

    /// The client took from the queue at `now_ms`.
    pub fn taken(&mut self, now_ms: u64) {
        self.since_ms = now_ms as u32;
        self.stalled = false;
    }

    /// Milliseconds since the client last took from the queue (or since
    /// a message found it empty), as of `now_ms` on the coarse clock.
    pub fn idle_ms(&self, now_ms: u64) -> u64 {
        u64::from((now_ms as u32).wrapping_sub(self.since_ms))
    }

    /// A message is queued behind `ahead` others; `now_ms` reads the
    /// coarse clock. The clock is read only for a message that finds the
    /// queue empty and for every [`CHECK_EVERY`]th behind others: the check
    /// runs per delivery of every fan-out, and a stall is found just as
    /// well a few messages later.
    pub fn queued(&mut self, ahead: usize, now_ms: impl FnOnce() -> u64) -> Waiting {
        if self.stalled {
            Waiting::Stalled
        } else if ahead == 0 {
            self.taken(now_ms());
            Waiting::Briefly
        } else if !ahead.is_multiple_of(CHECK_EVERY) {
            Waiting::Briefly
        } else if self.idle_ms(now_ms()) >= STALLED_AFTER_MS {
            self.stalled = true;
            Waiting::NewlyStalled
        } else {
            Waiting::Briefly
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queues `n` messages behind the `ahead` already queued, at `now_ms`;
    /// returns what the last one found.
    fn queue(watch: &mut StallWatch, ahead: &mut usize, n: usize, now_ms: u64) -> Waiting {
        let mut last = Waiting::Briefly;
        for _ in 0..n {
            last = watch.queued(*ahead, || now_ms);
            *ahead += 1;
            if last == Waiting::NewlyStalled {
                break;
            }
        }
        last
    }

    #[test]
    fn a_queue_is_stalled_once_its_client_took_nothing_for_the_window() {
        let mut watch = StallWatch::default();
        let mut ahead = 0;
        assert_eq!(queue(&mut watch, &mut ahead, 1, 1_000), Waiting::Briefly);
        let late = 1_000 + STALLED_AFTER_MS;
        assert_eq!(
            queue(&mut watch, &mut ahead, 100, late - 1),
            Waiting::Briefly
        );
        // Found within the next `CHECK_EVERY` messages.
        assert_eq!(
            queue(&mut watch, &mut ahead, CHECK_EVERY, late),
            Waiting::NewlyStalled
        );
        assert_eq!(queue(&mut watch, &mut ahead, 1, late), Waiting::Stalled);
    }

    #[test]
    fn taking_ends_the_stall_and_restarts_the_wait() {
        let mut watch = StallWatch::default();
        let mut ahead = 0;
        queue(&mut watch, &mut ahead, 1, 0);
        assert_eq!(
            queue(&mut watch, &mut ahead, CHECK_EVERY, STALLED_AFTER_MS),
            Waiting::NewlyStalled
        );
        watch.taken(STALLED_AFTER_MS + 10);
        let (mut ahead, later) = (1, 2 * STALLED_AFTER_MS);
        assert_eq!(queue(&mut watch, &mut ahead, 100, later), Waiting::Briefly);
        assert_eq!(
            queue(&mut watch, &mut ahead, CHECK_EVERY, later + 10),
            Waiting::NewlyStalled
        );
    }

    #[test]
    fn a_queue_idle_for_long_is_not_stalled_by_the_burst_that_follows() {
        let mut watch = StallWatch::default();
        let mut ahead = 0;
        // Nothing queued for an hour, then a burst: the first finds the
        // queue empty, the rest queue behind it within the same moment.
        assert_eq!(
            queue(&mut watch, &mut ahead, 1_000, 3_600_000),
            Waiting::Briefly
        );
    }

    #[test]
    fn a_span_across_the_32_bit_wrap_is_measured() {
        let start = u64::from(u32::MAX) - 100;
        let mut watch = StallWatch::new(start);
        assert_eq!(watch.queued(CHECK_EVERY, || start + 200), Waiting::Briefly);
        assert_eq!(
            watch.queued(CHECK_EVERY, || start + STALLED_AFTER_MS),
            Waiting::NewlyStalled
        );
    }

    #[test]
    fn the_clock_is_read_only_for_an_empty_queue_and_every_few_messages() {
        let mut watch = StallWatch::default();
        let mut reads = 0;
        for ahead in 0..(10 * CHECK_EVERY) {
            watch.queued(ahead, || {
                reads += 1;
                0
            });
        }
        assert_eq!(reads, 10);
    }
}
