//! [`FailingStore`]: a wrapper that makes `apply` or `sync` fail on demand,
//! `apply` or queue reads panic as sled does on some damage, or `apply` wait
//! as a slow disk does, to test what the writer and the broker do when the
//! disk fails, fills, lags or holds damaged files.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use crate::batch::Batch;
use crate::error::StoreError;
use crate::records::{
    MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SubscriptionRecord,
};
use crate::store::{RecordIter, SessionSummary, Store, StoreStats};

/// Wraps a store; while a switch is on, the matching call fails with
/// [`StoreError::Injected`] (or a disk-full I/O error) without touching the
/// inner store, or waits ([`stall`](Self::stall)). Counts calls so tests
/// can see how the writer batches.
#[derive(Debug, Default)]
pub struct FailingStore<S> {
    inner: S,
    fail_apply: AtomicBool,
    /// Calls of `apply` still to fail, after which it writes again.
    fail_next_applies: AtomicU64,
    fail_sync: AtomicBool,
    disk_full: AtomicBool,
    panic_apply: AtomicBool,
    panic_reads: AtomicBool,
    /// Panics injected so far (`panic_apply`, `panic_reads`).
    panics: AtomicU64,
    /// While true, `apply` waits on `unstalled`.
    stalled: Mutex<bool>,
    unstalled: Condvar,
    applies: AtomicU64,
    syncs: AtomicU64,
}

impl<S: Store> FailingStore<S> {
    pub fn new(inner: S) -> FailingStore<S> {
        FailingStore {
            inner,
            fail_apply: AtomicBool::new(false),
            fail_next_applies: AtomicU64::new(0),
            fail_sync: AtomicBool::new(false),
            disk_full: AtomicBool::new(false),
            panic_apply: AtomicBool::new(false),
            panic_reads: AtomicBool::new(false),
            panics: AtomicU64::new(0),
            stalled: Mutex::new(false),
            unstalled: Condvar::new(),
            applies: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// While on, `apply` fails with [`StoreError::Injected`].
    pub fn fail_apply(&self, on: bool) {
        self.fail_apply.store(on, Ordering::SeqCst);
    }

    /// The next `n` calls of `apply` fail with [`StoreError::Injected`]; the
    /// ones after write again.
    pub fn fail_next_applies(&self, n: u64) {
        self.fail_next_applies.store(n, Ordering::SeqCst);
    }

    /// While on, `sync` fails with [`StoreError::Injected`].
    pub fn fail_sync(&self, on: bool) {
        self.fail_sync.store(on, Ordering::SeqCst);
    }

    /// While on, `apply` and `sync` fail as a full disk does
    /// (`io::ErrorKind::StorageFull`).
    pub fn disk_full(&self, on: bool) {
        self.disk_full.store(on, Ordering::SeqCst);
    }

    /// While on, `apply` panics, as sled 0.34 does on some damaged files.
    pub fn panic_apply(&self, on: bool) {
        self.panic_apply.store(on, Ordering::SeqCst);
    }

    /// While on, reading a queue panics, as sled 0.34 does reading some
    /// damaged records.
    pub fn panic_reads(&self, on: bool) {
        self.panic_reads.store(on, Ordering::SeqCst);
    }

    /// While on, `apply` waits until it is turned off (a disk that lags),
    /// and then writes. Turn it off before the store is dropped: the
    /// writer's thread waits in it.
    pub fn stall(&self, on: bool) {
        *self.stalled.lock().unwrap_or_else(PoisonError::into_inner) = on;
        if !on {
            self.unstalled.notify_all();
        }
    }

    /// Panics injected so far.
    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::SeqCst)
    }

    /// Calls of `apply` so far (failed ones included).
    pub fn applies(&self) -> u64 {
        self.applies.load(Ordering::SeqCst)
    }

    /// Calls of `sync` so far (failed ones included).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    fn full(&self) -> Result<(), StoreError> {
        if self.disk_full.load(Ordering::SeqCst) {
            Err(
                std::io::Error::new(std::io::ErrorKind::StorageFull, "injected: no space left")
                    .into(),
            )
        } else {
            Ok(())
        }
    }
}

impl<S: Store> Store for FailingStore<S> {
    fn apply_all(&self, batches: &[&Batch]) -> Result<(), StoreError> {
        self.applies.fetch_add(1, Ordering::SeqCst);
        let stalled = self.stalled.lock().unwrap_or_else(PoisonError::into_inner);
        drop(
            self.unstalled
                .wait_while(stalled, |on| *on)
                .unwrap_or_else(PoisonError::into_inner),
        );
        self.full()?;
        if self.panic_apply.load(Ordering::SeqCst) {
            self.panics.fetch_add(1, Ordering::SeqCst);
            panic!("injected: the storage engine panicked in apply");
        }
        let fail_next = self
            .fail_next_applies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail_next || self.fail_apply.load(Ordering::SeqCst) {
            return Err(StoreError::Injected("apply"));
        }
        self.inner.apply_all(batches)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.full()?;
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(StoreError::Injected("sync"));
        }
        self.inner.sync()
    }
    fn session(&self, client_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.session(client_id)
    }
    fn sessions(&self) -> RecordIter<'_, SessionRecord> {
        self.inner.sessions()
    }
    fn subscriptions(&self, client_id: &str) -> RecordIter<'_, SubscriptionRecord> {
        self.inner.subscriptions(client_id)
    }
    fn queue(&self, client_id: &str, after_seq: Option<u64>) -> RecordIter<'_, QueueEntry> {
        if self.panic_reads.load(Ordering::SeqCst) {
            self.panics.fetch_add(1, Ordering::SeqCst);
            panic!("injected: the storage engine panicked reading a queue");
        }
        self.inner.queue(client_id, after_seq)
    }
    fn incoming_qos2(&self, client_id: &str) -> Result<Vec<u16>, StoreError> {
        self.inner.incoming_qos2(client_id)
    }
    fn message(&self, id: u64) -> Result<Option<MessageRecord>, StoreError> {
        self.inner.message(id)
    }
    fn message_refs(&self, id: u64) -> Result<u32, StoreError> {
        self.inner.message_refs(id)
    }
    fn last_message_id(&self) -> Result<Option<u64>, StoreError> {
        self.inner.last_message_id()
    }
    fn last_seq(&self, client_id: &str) -> Result<Option<u64>, StoreError> {
        self.inner.last_seq(client_id)
    }
    fn retained(&self, topic_prefix: &str) -> RecordIter<'_, RetainedRecord> {
        self.inner.retained(topic_prefix)
    }
    fn session_summary(&self, client_id: &str) -> Result<Option<SessionSummary>, StoreError> {
        self.inner.session_summary(client_id)
    }
    fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats()
    }
    fn compact(&self) -> Result<StoreStats, StoreError> {
        self.inner.compact()
    }
}
