//! The broker-wide budget for messages waiting to be written to clients.
//!
//! Every delivery placed in a connection's outbound queue is charged what it
//! holds in memory (session/delivery.rs's `queued_cost`: topic, payload, properties,
//! a header allowance, its queue slot, and the shared message once) and
//! released once the writer has written it (`Link::writing`). One slow subscriber can only fill its own bounded queue; but when
//! the total across all connections passes the limit, the broker stops
//! reading from clients until writers have drained below it. A queue that
//! reached its connection's bound stops counting here until its writer takes
//! from it (see `Link::exempt` in session/link.rs): its bound limits it already, and
//! subscribers that never read would otherwise hold the budget over its limit
//! for as long as they stay connected, pausing every reader. For the same
//! reason, while the budget is over, the queues are swept when a reader
//! pauses for it and at every keep alive sweep after
//! (`Broker::exempt_stalled_queues`): one whose writer has taken nothing for
//! `queue_full_wait_ms` stops counting too, even below its bound, so that
//! subscribers that stop reading pause the others for that long after they
//! stopped, plus up to half a second. Publishers are
//! thereby slowed by TCP back-pressure instead of the broker queueing without
//! bound or dropping what every subscriber could still take.

use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::Notify;

/// Bytes charged per delivery on top of topic and payload: the fixed header,
/// packet id and properties a PUBLISH usually needs.
pub const HEADER_ALLOWANCE: usize = 8;

/// Queued outbound bytes, against a limit.
///
/// Signed: a connection's reader charges what it queued once per read (see
/// `wake_batch.rs`), so a writer that drained part of it in the meantime
/// may release bytes before they are charged; the total is then briefly
/// below the truth, never wrapped.
#[derive(Debug)]
pub struct OutboundBudget {
    queued: AtomicI64,
    limit: i64,
    below: Notify,
    /// Bytes of queues that no longer count towards the limit (see
    /// `Link::exempt` in session/link.rs): not part of the budget, but memory
    /// all the same, reported beside it.
    exempt: AtomicI64,
}

/// `bytes` as a signed amount (queues never come near `i64::MAX`).
fn signed(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl OutboundBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> OutboundBudget {
        OutboundBudget {
            queued: AtomicI64::new(0),
            limit: signed(limit),
            below: Notify::new(),
            exempt: AtomicI64::new(0),
        }
    }

    /// Records `bytes` more queued.
    pub fn charge(&self, bytes: usize) {
        if bytes > 0 {
            self.queued.fetch_add(signed(bytes), Ordering::AcqRel);
        }
    }

    /// Records `bytes` taken from a queue; wakes waiting readers when the
    /// total falls back under the limit.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bytes = signed(bytes);
        let before = self.queued.fetch_sub(bytes, Ordering::AcqRel);
        if before >= self.limit && before - bytes < self.limit {
            self.below.notify_waiters();
        }
    }

    /// Records `bytes` more in queues exempted from the budget.
    pub fn add_exempt(&self, bytes: usize) {
        self.exempt.fetch_add(signed(bytes), Ordering::Relaxed);
    }

    /// Records `bytes` fewer in queues exempted from the budget.
    pub fn remove_exempt(&self, bytes: usize) {
        self.exempt.fetch_sub(signed(bytes), Ordering::Relaxed);
    }

    /// Bytes in queues exempted from the budget (a queue at its
    /// connection's bound, or one no writer took from for a sweep period).
    pub fn exempt_queued(&self) -> usize {
        usize::try_from(self.exempt.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// The signed total: what was charged minus what was released. Briefly
    /// negative while releases are ahead of deferred charges; once every
    /// queue is empty and every read's charges are in, exactly 0 (tests
    /// check it: an over-release would leave it negative, which
    /// [`queued`](Self::queued) would hide as 0).
    pub fn balance(&self) -> i64 {
        self.queued.load(Ordering::Acquire)
    }

    /// Bytes queued now (0 while releases are ahead of deferred charges).
    pub fn queued(&self) -> usize {
        usize::try_from(self.queued.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// True while the total is at or above the limit.
    pub fn is_over(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= self.limit
    }

    /// Waits until the total is under the limit.
    pub async fn wait_until_below(&self) {
        loop {
            let notified = self.below.notified();
            tokio::pin!(notified);
            // Register before checking, so a release in between is not missed.
            notified.as_mut().enable();
            if !self.is_over() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn readers_wait_until_writers_release() {
        let budget = Arc::new(OutboundBudget::new(100));
        budget.charge(150);
        assert!(budget.is_over());
        let waiter = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.wait_until_below().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        budget.release(60);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(budget.queued(), 90);
    }

    #[test]
    fn a_release_ahead_of_its_charge_does_not_wrap() {
        let budget = OutboundBudget::new(100);
        budget.release(40);
        assert_eq!(budget.queued(), 0);
        assert!(!budget.is_over());
        budget.charge(140);
        assert_eq!(budget.queued(), 100);
        assert!(budget.is_over());
    }
}
