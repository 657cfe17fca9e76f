//! Retained messages a session's SUBSCRIBEs found that its queues had no
//! room for yet, and the broker-wide bound on them.
//!
//! A SUBSCRIBE to `#` over a store of 100,000 retained messages finds them
//! all at once. What the session's queues can take goes in at once; the
//! rest waits in its [`RetainedBacklog`], 24 bytes a message
//! ([`WaitingRetained`]), and becomes a delivery as the client reads
//! (`Session::refill_retained`), QoS 0 ones never more than
//! [`RETAINED_REFILL_BYTES`] in its connection's outbound queue at a
//! time. One session holds at most `limits.max_pending_retained` waiting. All sessions together hold at
//! most `limits.max_waiting_retained` ([`WaitingRetainedBudget`]): without
//! that bound, a thousand clients reconnecting at once and each
//! subscribing to `#` would make the broker hold 2.4 GB of waiting entries,
//! and keep alive every message replaced meanwhile that an entry points
//! to.
//!
//! What a bound leaves out is dropped and counted
//! (`messages_dropped_queue_full`, and for the broker-wide one also
//! `retained_waiting_refused`), as a message beyond a full queue is; the
//! client finds the topics' values again with a new SUBSCRIBE.
//!
//! Invariant: the budget counts exactly the entries held in backlogs. A
//! backlog reserves before it takes entries, releases one for each that
//! leaves it, and releases what it still holds when it is dropped (the
//! client left, the session ended).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::WaitingRetained;

/// The found messages a backlog takes are shrunk to their number when
/// their allocation has room for more than one in this many again: a
/// SUBSCRIBE's vector grows by doubling, and one cut to a bound keeps its
/// whole allocation (2.4 MB for a hundred thousand found) for as long as
/// what is kept waits. Shrinking costs a copy of what is kept, once.
const SLACK_KEPT: usize = 8;

/// Allocations of fewer entries than this are not shrunk as a backlog
/// drains: 1.5 KiB, less than the copy would save in work.
const SHRINK_FROM: usize = 64;

/// Waiting QoS 0 retained messages move into a connection's outbound queue only
/// while it holds less than this (as `Link::charged` counts it), and the
/// rest follows as its writer takes from it: they are in memory already,
/// and staging more of them gains a reading client nothing. Each byte
/// staged counts against the broker's outbound budget, and a client that
/// does not read would hold it there: a hundred clients subscribing to `#`
/// over a large store, each queue filled to its 4 MiB bound, held 400 MB
/// against the 64 MiB budget, and the broker stopped reading from every
/// client until the sweep exempted their queues. At 64 KiB, one such
/// client holds at most twice this (the queue and the batch its writer is
/// stuck with), and a reading one is sent its messages 64 KiB per write.
/// QoS 1/2 ones are bounded by the in-flight window (`limits.max_inflight`,
/// `max_inflight_bytes`) instead, as any QoS 1/2 delivery is.
pub const RETAINED_REFILL_BYTES: usize = 64 * 1024;

/// Retained messages waiting in all sessions, against
/// `limits.max_waiting_retained`.
#[derive(Debug)]
pub struct WaitingRetainedBudget {
    waiting: AtomicUsize,
    limit: usize,
}

impl WaitingRetainedBudget {
    /// A bound of `limit` waiting messages across the broker.
    pub fn new(limit: usize) -> WaitingRetainedBudget {
        WaitingRetainedBudget {
            waiting: AtomicUsize::new(0),
            limit,
        }
    }

    /// Messages waiting now, in all sessions.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Reserves places for up to `wanted` messages; returns how many it
    /// reserved (fewer when the bound is near).
    fn reserve(&self, wanted: usize) -> usize {
        let mut granted = 0;
        let _ = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waiting| {
                granted = wanted.min(self.limit.saturating_sub(waiting));
                (granted > 0).then(|| waiting + granted)
            });
        granted
    }

    /// Records `count` fewer waiting.
    fn release(&self, count: usize) {
        if count > 0 {
            self.waiting.fetch_sub(count, Ordering::Relaxed);
        }
    }

    /// Records `count` more waiting, beyond the bound if need be: entries
    /// taken out of a backlog and put back.
    fn charge(&self, count: usize) {
        if count > 0 {
            self.waiting.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// The retained messages waiting in one session, in the order found, each
/// counted in the broker's [`WaitingRetainedBudget`] while it is here.
#[derive(Debug)]
pub(super) struct RetainedBacklog {
    queue: VecDeque<WaitingRetained>,
    budget: Arc<WaitingRetainedBudget>,
}

impl RetainedBacklog {
    /// An empty backlog counted in `budget`.
    pub(super) fn new(budget: Arc<WaitingRetainedBudget>) -> RetainedBacklog {
        RetainedBacklog {
            queue: VecDeque::new(),
            budget,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes as many of `found` as the broker-wide bound has room for,
    /// behind those waiting already (an empty backlog takes `found`'s
    /// allocation as it is); returns how many it left out, dropped with
    /// what remains of `found`.
    pub(super) fn admit(&mut self, mut found: VecDeque<WaitingRetained>) -> usize {
        let kept = self.budget.reserve(found.len());
        let refused = found.len() - kept;
        found.truncate(kept);
        if self.queue.is_empty() {
            if found.capacity() - found.len() > found.len() / SLACK_KEPT {
                // What was cut off (or the SUBSCRIBE's doubling left
                // unused) would be held, uncounted, as long as the rest
                // waits.
                found.shrink_to_fit();
            }
            self.queue = found;
        } else {
            self.queue.append(&mut found);
        }
        refused
    }

    /// Lets `take` remove entries from the front (or put one back) and
    /// counts the difference. A backlog drained to a quarter of its
    /// allocation gives half of it back, so that what it holds stays within
    /// four times what the budget counts (a copy of what is left, paid for
    /// by the entries taken since the last one).
    pub(super) fn take_with(&mut self, take: impl FnOnce(&mut VecDeque<WaitingRetained>)) {
        let before = self.queue.len();
        take(&mut self.queue);
        let after = self.queue.len();
        self.budget.release(before.saturating_sub(after));
        self.budget.charge(after.saturating_sub(before));
        if self.queue.capacity() > SHRINK_FROM.max(4 * after) {
            self.queue.shrink_to(2 * after);
        }
    }
}

impl Drop for RetainedBacklog {
    fn drop(&mut self) {
        self.budget.release(self.queue.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use bytes::Bytes;
    use tern_codec::QoS;
    use tern_router::SubscriptionOptions;

    fn found(n: usize) -> VecDeque<WaitingRetained> {
        let message = Message::new(
            Bytes::from_static(b"t"),
            Bytes::from_static(b"v"),
            QoS::AtMostOnce,
            true,
            Default::default(),
            0,
        );
        (0..n)
            .map(|_| WaitingRetained {
                message: Arc::clone(&message),
                options: SubscriptionOptions::default(),
            })
            .collect()
    }

    #[test]
    fn backlogs_together_hold_at_most_the_limit_and_release_what_leaves() {
        let budget = Arc::new(WaitingRetainedBudget::new(10));
        let mut first = RetainedBacklog::new(Arc::clone(&budget));
        let mut second = RetainedBacklog::new(Arc::clone(&budget));
        assert_eq!(first.admit(found(6)), 0);
        assert_eq!(second.admit(found(6)), 2, "two beyond the bound");
        assert_eq!((first.len(), second.len(), budget.waiting()), (6, 4, 10));
        // Three taken from the first, one of them put back.
        first.take_with(|queue| {
            for _ in 0..3 {
                queue.pop_front();
            }
        });
        assert_eq!(budget.waiting(), 7);
        first.take_with(|queue| queue.push_front(found(1).pop_front().unwrap()));
        assert_eq!((first.len(), budget.waiting()), (4, 8));
        assert_eq!(second.admit(found(5)), 3, "room for two more");
        assert_eq!(second.len(), 6);
        drop(first);
        assert_eq!(budget.waiting(), 6);
        // What is cut off does not stay allocated.
        let mut third = RetainedBacklog::new(Arc::clone(&budget));
        let mut many = found(1000);
        many.reserve(1000);
        assert_eq!(third.admit(many), 996);
        assert_eq!(third.len(), 4);
        assert!(third.queue.capacity() < 8, "{}", third.queue.capacity());
        drop(third);
        // A long backlog drained to a few gives its allocation back.
        let long_budget = Arc::new(WaitingRetainedBudget::new(10_000));
        let mut fourth = RetainedBacklog::new(Arc::clone(&long_budget));
        assert_eq!(fourth.admit(found(1000)), 0);
        fourth.take_with(|queue| queue.truncate(990));
        assert!(fourth.queue.capacity() >= 990, "a small step keeps it");
        fourth.take_with(|queue| queue.drain(..980).for_each(drop));
        assert_eq!((fourth.len(), long_budget.waiting()), (10, 10));
        assert!(
            fourth.queue.capacity() <= SHRINK_FROM,
            "{}",
            fourth.queue.capacity()
        );
        drop(fourth);
        assert_eq!(long_budget.waiting(), 0);
        drop(second);
        assert_eq!(budget.waiting(), 0);
    }
}
