//! [`Inbox`]: the submissions on their way to the writer thread.
//!
//! Many submitters, one consumer. A submitter pushes under a short lock; the
//! writer takes everything waiting in one go by swapping the vector for the
//! empty one it kept from last time. Once both vectors have grown to the
//! usual backlog, neither side allocates. (A channel allocates a block of
//! slots every few dozen messages on the submitting thread and the writer
//! frees it on its own: memory allocated on one thread and freed on another,
//! the expensive case for allocators, on every store write.)
//!
//! # Invariants
//!
//! - `State` is only read or written with the lock held, and the lock is
//!   never held while anything else runs (no user code, no I/O).
//! - Only the consumer waits on `ready`. `waiting` is true only while it
//!   does (or is about to), so a submitter notifies at most once per wait.
//! - Once `closed`, every push fails and the inbox stays empty: the consumer
//!   is gone and nothing would ever take an item.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

pub(crate) struct Inbox<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
}

struct State<T> {
    items: Vec<T>,
    /// Live sending handles; the consumer finishes once none is left and
    /// it has taken everything.
    senders: usize,
    /// The consumer is blocked in [`Inbox::wait`].
    waiting: bool,
    /// The consumer has stopped (see the invariants).
    closed: bool,
}

impl<T> Inbox<T> {
    /// An empty inbox with one sender.
    pub(crate) fn new() -> Inbox<T> {
        Inbox {
            state: Mutex::new(State {
                items: Vec::new(),
                senders: 1,
                waiting: false,
                closed: false,
            }),
            ready: Condvar::new(),
        }
    }

    /// Counts one more sending handle.
    pub(crate) fn add_sender(&self) {
        self.state.lock().senders += 1;
    }

    /// Counts one sending handle less; the last one wakes the consumer.
    pub(crate) fn remove_sender(&self) {
        let mut st = self.state.lock();
        st.senders = st.senders.saturating_sub(1);
        let wake = st.senders == 0 && std::mem::take(&mut st.waiting);
        drop(st);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Adds `item` for the consumer; gives it back if the consumer stopped.
    pub(crate) fn push(&self, item: T) -> Result<(), T> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(item);
        }
        st.items.push(item);
        let wake = std::mem::take(&mut st.waiting);
        drop(st);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves everything waiting into `into`, which must be empty (its
    /// capacity is kept for the next swap). Returns false once no sender is
    /// left: nothing more will arrive after what was taken.
    pub(crate) fn take(&self, into: &mut Vec<T>) -> bool {
        debug_assert!(into.is_empty());
        let mut st = self.state.lock();
        if !st.items.is_empty() {
            std::mem::swap(&mut st.items, into);
        }
        st.senders > 0
    }

    /// Blocks until an item arrives, the last sender goes, or `until`.
    pub(crate) fn wait(&self, until: Option<Instant>) {
        let mut st = self.state.lock();
        if !st.items.is_empty() || st.senders == 0 {
            return;
        }
        st.waiting = true;
        match until {
            Some(t) => {
                self.ready.wait_until(&mut st, t);
            }
            None => self.ready.wait(&mut st),
        }
        st.waiting = false;
    }

    /// Whether the consumer has stopped ([`close`](Self::close)).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// The consumer stops: later pushes fail; what is waiting is dropped
    /// (outside the lock), so futures waiting on it resolve as closed.
    pub(crate) fn close(&self) {
        let left = {
            let mut st = self.state.lock();
            st.closed = true;
            std::mem::take(&mut st.items)
        };
        drop(left);
    }
}

/// Closes an inbox when its consumer's loop ends, however it ends (a panic
/// included), so that producers are told instead of waiting for ever.
pub(crate) struct CloseOnExit<T>(pub(crate) Arc<Inbox<T>>);

impl<T> Drop for CloseOnExit<T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn take_swaps_everything_waiting_in_order() {
        let inbox = Inbox::new();
        for i in 0..5 {
            inbox.push(i).unwrap();
        }
        let mut got = Vec::new();
        assert!(inbox.take(&mut got));
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        got.clear();
        assert!(inbox.take(&mut got));
        assert!(got.is_empty());
    }

    #[test]
    fn a_waiting_consumer_wakes_for_a_push_and_for_the_last_sender() {
        let inbox = Arc::new(Inbox::new());
        inbox.add_sender();
        let consumer = {
            let inbox = Arc::clone(&inbox);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut open = true;
                while open {
                    let mut batch = Vec::new();
                    open = inbox.take(&mut batch);
                    got.extend(batch);
                    if open {
                        inbox.wait(None);
                    }
                }
                got
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        inbox.push(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        inbox.push(2).unwrap();
        inbox.remove_sender();
        inbox.remove_sender();
        assert_eq!(consumer.join().unwrap(), vec![1, 2]);
    }

    #[test]
    fn wait_returns_at_its_deadline() {
        let inbox: Inbox<u8> = Inbox::new();
        let start = Instant::now();
        inbox.wait(Some(start + Duration::from_millis(10)));
        assert!(start.elapsed() >= Duration::from_millis(10));
    }

    #[test]
    fn a_closed_inbox_refuses_pushes_and_drops_what_waited() {
        let inbox = Inbox::new();
        let item = Arc::new(());
        inbox.push(Arc::clone(&item)).unwrap();
        inbox.close();
        assert_eq!(Arc::strong_count(&item), 1);
        assert!(inbox.push(Arc::clone(&item)).is_err());
    }
}
