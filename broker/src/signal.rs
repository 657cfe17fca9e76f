//! A wake-up call for the one task that waits for it.
//!
//! A connection's reader and writer each wait for their own signal (new
//! items queued, close now, replies drained), and nothing else ever waits
//! on it. `tokio::sync::Notify` serves any number of waiters, and pays for
//! it: each wait is a 64-byte future holding an intrusive list node (part of
//! every connection's task, for its whole life), and each notification takes
//! a lock when a task waits. [`Signal`] is a flag and an `AtomicWaker`: a
//! wait is a pointer, a notification is two atomic operations.
//!
//! Semantics are those of `Notify::notify_one` with one waiter: a signal
//! raised while nobody waits is kept, and the next wait returns at once
//! (waits may also return after a raise they already consumed, so a waiter
//! re-checks its condition, as with any notification).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// A wake-up call for a single waiting task.
#[derive(Debug, Default)]
pub struct Signal {
    raised: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    /// Wakes the waiting task, or lets its next wait return at once.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Waits until the signal is raised, and lowers it. Only one task may
    /// wait at a time (a second would take the first one's place).
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.raised.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Raised between the check and the registration: its wake went
            // to the previous waker, so look again.
            if self.raised.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_raise_before_the_wait_is_kept_once() {
        let signal = Signal::default();
        signal.raise();
        signal.raise();
        signal.wait().await;
        let again = tokio::time::timeout(Duration::from_millis(20), signal.wait()).await;
        assert!(again.is_err(), "two raises before a wait make one wake-up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raise_from_another_thread_wakes_the_waiter() {
        let signal = Arc::new(Signal::default());
        for _ in 0..1000 {
            let waiter = tokio::spawn({
                let signal = Arc::clone(&signal);
                async move { signal.wait().await }
            });
            tokio::task::yield_now().await;
            signal.raise();
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("the waiter was woken")
                .unwrap();
        }
    }
}
