//! Deferred writer wake-ups: each subscriber's writer is woken once per read
//! of its publisher, not once per message.
//!
//! A connection handles every packet of one read before it reads again, and
//! each PUBLISH it handles may queue a delivery for many subscribers. If the
//! first delivery to an idle subscriber wakes that subscriber's writer at
//! once, the writer runs on another worker thread while the publisher is
//! still fanning out, finds one or two messages, writes them, and sleeps
//! again: one wake-up and one `writev` per message or two. On a many-core
//! machine the broker then spends its time in wake-ups and system calls
//! (measured, 1 -> 100 fan-out: 6.7 deliveries per `writev` on 8 worker
//! threads against 170 on 2, and fewer deliveries per second on 8 than on 2).
//!
//! While a [`WakeBatch`] is open on a thread, [`queued`] records the writer
//! to wake instead of waking it; the batch wakes every recorded writer once
//! when it is flushed or dropped. Likewise [`charge`] adds the bytes queued
//! to the broker's outbound budget once per batch instead of once per
//! delivery: the budget is one atomic that every writer also updates, and a
//! 1 -> 1000 fan-out would otherwise fetch its cache line from another core
//! for most of its deliveries. The reader opens one around the packets of
//! each read, and flushes early when the deliveries queued since the last
//! flush pass [`MAX_DEFERRED_DELIVERIES`], which bounds the delay the first
//! subscriber of a large fan-out can see. Outside a batch (timers, takeovers,
//! the store's completions) [`queued`] wakes at once.
//!
//! Invariants:
//! - A batch is `!Send`: it cannot be held across an `.await` in a spawned
//!   task, so it is opened and flushed on the same thread, and the
//!   thread-local list it uses belongs to one connection at a time.
//! - Batches do not nest (a second `open` on a thread is a bug and panics in
//!   debug builds; in release it joins the open batch).
//! - Every recorded wake-up happens, on every exit path: `Drop` flushes.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::Arc;

use crate::budget::OutboundBudget;
use crate::session::ConnectionControl;

/// Deliveries queued under one batch before it wakes its writers anyway.
/// A publisher's thread queues a delivery in about 60 ns (a 1 -> 1000
/// fan-out delivered 17M a second on 2 cores), so this bounds what the
/// first subscribers of a burst wait for to about 2 ms; a single message
/// to fewer subscribers than this is never split. Smaller, each writer of
/// a 1 -> 1000 fan-out is woken for a few messages at a time, and the
/// wake-ups cost more than the deliveries: 8192 (8 messages per wake-up)
/// delivered 30% fewer messages per CPU-second on 2 cores than 32,768,
/// 16,384 half-way; 65,536 no more than 32,768 (docs/performance.md).
/// Since a read's QoS 0 messages reach each subscriber as one queue entry
/// (message_batch.rs), what is counted is queue entries, each a delivery
/// or a batch: the cost of queueing one does not grow with its messages.
pub const MAX_DEFERRED_DELIVERIES: usize = 32_768;

/// The thread's open batch: writers to wake, how much was queued, and the
/// bytes not yet charged to the budget they belong to.
struct Pending {
    open: bool,
    queued: usize,
    writers: Vec<Arc<ConnectionControl>>,
    uncharged: Option<(Arc<OutboundBudget>, usize)>,
}

thread_local! {
    static PENDING: RefCell<Pending> = const {
        RefCell::new(Pending { open: false, queued: 0, writers: Vec::new(), uncharged: None })
    };
}

/// Wake-ups deferred on this thread until the batch is flushed or dropped.
pub struct WakeBatch {
    /// `!Send` and `!Sync`: the batch belongs to the thread that opened it.
    _thread_bound: PhantomData<*const ()>,
}

impl WakeBatch {
    /// Opens a batch on this thread.
    pub fn open() -> WakeBatch {
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            debug_assert!(!p.open, "wake batches do not nest");
            p.open = true;
        });
        WakeBatch {
            _thread_bound: PhantomData,
        }
    }

    /// Flushes if more than [`MAX_DEFERRED_DELIVERIES`] were queued since
    /// the last flush.
    pub fn flush_if_due(&self) {
        let due = PENDING.with(|p| p.borrow().queued >= MAX_DEFERRED_DELIVERIES);
        if due {
            self.flush();
        }
    }

    /// Wakes every writer recorded so far; the batch stays open.
    pub fn flush(&self) {
        // Take the list out before waking: a wake-up runs no code of ours,
        // but the borrow must not be held while anything else might run.
        let (writers, uncharged) = PENDING.with(|p| {
            let mut p = p.borrow_mut();
            p.queued = 0;
            (std::mem::take(&mut p.writers), p.uncharged.take())
        });
        // Charge before waking: a woken writer releases what it drains.
        if let Some((budget, bytes)) = uncharged {
            budget.charge(bytes);
        }
        for control in &writers {
            control.wake_writer.raise();
        }
        // Give the (now empty) allocation back for the next batch.
        let mut writers = writers;
        writers.clear();
        PENDING.with(|p| {
            let mut p = p.borrow_mut();
            if p.writers.capacity() < writers.capacity() {
                p.writers = writers;
            }
        });
    }
}

impl Drop for WakeBatch {
    fn drop(&mut self) {
        self.flush();
        PENDING.with(|p| p.borrow_mut().open = false);
    }
}

/// Something was queued for `control`'s writer; `was_empty` says its queue
/// was empty before (otherwise a wake-up is already due). Wakes the writer,
/// or records it in this thread's open batch.
pub fn queued(control: &Arc<ConnectionControl>, was_empty: bool) {
    let deferred = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if !p.open {
            return false;
        }
        p.queued += 1;
        if was_empty {
            p.writers.push(Arc::clone(control));
        }
        true
    });
    if !deferred && was_empty {
        control.wake_writer.raise();
    }
}

/// `bytes` were queued for a writer: charges them to `budget`, at once or
/// when this thread's open batch is flushed.
pub fn charge(budget: &Arc<OutboundBudget>, bytes: usize) {
    let now = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if !p.open {
            return Some(bytes);
        }
        match &mut p.uncharged {
            Some((b, n)) if Arc::ptr_eq(b, budget) => {
                *n += bytes;
                None
            }
            // Another broker's budget (tests run several in one process):
            // settle the first, defer this one.
            other => other
                .replace((Arc::clone(budget), bytes))
                .map(|(previous, n)| {
                    previous.charge(n);
                    0
                }),
        }
    });
    if let Some(bytes) = now {
        budget.charge(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// True if `control`'s writer has a wake-up waiting.
    fn woken(control: &ConnectionControl) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(20), control.wake_writer.wait())
                .await
                .is_ok()
        })
    }

    #[test]
    fn outside_a_batch_the_first_queued_item_wakes_at_once() {
        let control = Arc::new(ConnectionControl::default());
        queued(&control, true);
        assert!(woken(&control));
        queued(&control, false);
        assert!(
            !woken(&control),
            "a non-empty queue already has its wake-up"
        );
    }

    #[test]
    fn a_batch_wakes_each_writer_once_when_dropped() {
        let a = Arc::new(ConnectionControl::default());
        let b = Arc::new(ConnectionControl::default());
        {
            let _batch = WakeBatch::open();
            queued(&a, true);
            queued(&a, false);
            queued(&b, true);
            assert!(
                !woken(&a) && !woken(&b),
                "nothing is woken while the batch is open"
            );
        }
        assert!(woken(&a) && woken(&b));
        assert!(!woken(&a), "one wake-up, not one per item");
        // Closed: the next item wakes at once again.
        queued(&b, true);
        assert!(woken(&b));
    }

    #[test]
    fn a_batch_charges_the_budget_once_when_flushed() {
        let budget = Arc::new(OutboundBudget::new(1000));
        charge(&budget, 10);
        assert_eq!(budget.queued(), 10, "outside a batch: at once");
        let other = Arc::new(OutboundBudget::new(1000));
        {
            let batch = WakeBatch::open();
            charge(&budget, 100);
            charge(&budget, 200);
            assert_eq!(budget.queued(), 10, "deferred while the batch is open");
            batch.flush();
            assert_eq!(budget.queued(), 310);
            charge(&budget, 1);
            charge(&other, 5);
            assert_eq!(budget.queued(), 311, "a second budget settles the first");
            assert_eq!(other.queued(), 0);
        }
        assert_eq!(other.queued(), 5, "dropping the batch charges the rest");
        assert_eq!(budget.queued(), 311);
    }

    #[test]
    fn a_batch_flushes_early_once_enough_was_queued() {
        let a = Arc::new(ConnectionControl::default());
        let batch = WakeBatch::open();
        queued(&a, true);
        for _ in 1..MAX_DEFERRED_DELIVERIES - 1 {
            queued(&a, false);
        }
        batch.flush_if_due();
        assert!(!woken(&a), "below the bound the batch keeps waiting");
        queued(&a, false);
        batch.flush_if_due();
        assert!(woken(&a));
        queued(&a, true);
        assert!(!woken(&a), "the batch stays open after an early flush");
        drop(batch);
        assert!(woken(&a));
    }
}
