//! The broker-wide budget for messages waiting to be written to clients.
//!
//! Every delivery placed in a connection's outbound queue is charged its size
//! (topic + payload + a small header allowance) and released when the writer
//! takes it. One slow subscriber can only fill its own bounded queue; but when
//! the total across all connections passes the limit, the broker stops
//! reading from clients until writers have drained below it. Publishers are
//! thereby slowed by TCP back-pressure instead of the broker queueing without
//! bound or dropping what every subscriber could still take.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Bytes charged per delivery on top of topic and payload: the fixed header,
/// packet id and properties a PUBLISH usually needs.
pub const HEADER_ALLOWANCE: usize = 8;

/// Queued outbound bytes, against a limit.
#[derive(Debug)]
pub struct OutboundBudget {
    queued: AtomicUsize,
    limit: usize,
    below: Notify,
}

impl OutboundBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> OutboundBudget {
        OutboundBudget {
            queued: AtomicUsize::new(0),
            limit,
            below: Notify::new(),
        }
    }

    /// Records `bytes` more queued.
    pub fn charge(&self, bytes: usize) {
        self.queued.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Records `bytes` taken from a queue; wakes waiting readers when the
    /// total falls back under the limit.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let before = self.queued.fetch_sub(bytes, Ordering::AcqRel);
        if before >= self.limit && before - bytes < self.limit {
            self.below.notify_waiters();
        }
    }

    /// Bytes queued now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// True while the total is at or above the limit.
    pub fn is_over(&self) -> bool {
        self.queued() >= self.limit
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
}
