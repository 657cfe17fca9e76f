//! [`StoreWriter`]: the group-commit writer.
//!
//! The hot path hands batches to one writer thread and awaits the returned
//! future (or has a completion called). The thread takes every batch that is
//! waiting (up to `max_ops` operations), applies them as **one** store batch
//! and, in [`Durability::Fsync`] mode, syncs **once** for all of them before
//! resolving them. While one window is being synced the next one
//! accumulates, so under load one fsync serves many clients.
//!
//! Before a batch is written it is netted against the batches behind it
//! (`netting.rs`): a queue entry inserted and deleted again never reaches
//! the engine. In fsync and interval modes a batch that inserts an in-flight
//! entry is held for up to `max_delay` (from when the writer takes it) so
//! that its deletion can arrive; it leaves as soon as every such entry is
//! deleted.
//!
//! The store is only ever called on the writer's own `std` thread: an async
//! task never blocks on disk I/O, and no lock is held across an await.
//! Batches apply in the order `submit` was called (the inbox, `inbox.rs`,
//! is FIFO and `submit` enqueues before returning its future).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tokio::sync::oneshot;

use crate::batch::Batch;
use crate::error::StoreError;
use crate::error_log::ErrorLog;
use crate::inbox::{CloseOnExit, Inbox};
use crate::netting::HeldQueue;
use crate::store::Store;

/// Default most operations merged into one window. Bounds the memory and the
/// latency of one engine batch; a single larger batch still goes whole (it
/// is never split, that would break its atomicity).
pub const DEFAULT_MAX_OPS: usize = 4096;

/// Default longest time, in fsync mode, that a submission inserting an
/// in-flight queue entry is held for the entry's deletion (the subscriber's
/// acknowledgement), so that the pair nets away before reaching the disk
/// (see `netting.rs`). A held submission leaves as soon as its entries are
/// acknowledged, so this bounds the extra PUBACK latency only for a
/// subscriber slower than this; it is long enough for acknowledgements
/// from busy subscribers on a loaded machine (measured on a saturated
/// 2-core machine: with 2 ms, 6% of the deliveries still reached the disk;
/// with 10 ms, 0.3%).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(10);

/// Longest sleep of the writer while the oldest submission is held for its
/// acknowledgements: how late a netted window may leave, traded against
/// waking the writer for every submission.
const HOLD_POLL: Duration = Duration::from_micros(100);

/// How long after the last submission an idle writer keeps polling (every
/// [`HOLD_POLL`]) before it blocks on its channel. A blocked writer costs
/// each submitter a wake-up system call; under load submissions come far
/// more often than this, and when idle the writer blocks after this long.
const BUSY_POLL_FOR: Duration = Duration::from_millis(2);

/// Default sync period of [`Durability::Interval`] for configurations that
/// give none: the loss window after a crash.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);

/// When a submission resolves, and so what a crash can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Resolves after the batch is applied **and synced**: once `submit`
    /// resolved `Ok`, the batch survives a crash (process or machine).
    Fsync,
    /// Resolves after the batch is applied; the writer syncs at most this
    /// long after the first unsynced batch was applied (and when the last
    /// handle is dropped). A crash, of the process or the machine, loses at
    /// most the batches applied in the last period (sled keeps recent writes
    /// in its own buffers until a sync); it never loses a synced batch nor
    /// leaves part of a batch.
    Interval(Duration),
    /// Resolves after the batch is applied; never syncs. For a
    /// [`MemoryStore`](crate::MemoryStore): nothing survives the process.
    Memory,
}

/// Tunables of the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterConfig {
    /// Most operations merged into one window (at least one batch per window).
    pub max_ops: usize,
    /// Longest hold of a submission that inserts an in-flight queue entry
    /// (fsync and interval modes; see [`DEFAULT_MAX_DELAY`]).
    pub max_delay: Duration,
    pub mode: Durability,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_ops: DEFAULT_MAX_OPS,
            max_delay: DEFAULT_MAX_DELAY,
            mode: Durability::Fsync,
        }
    }
}

/// Counters of a writer, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches submitted.
    pub submitted: u64,
    /// Windows applied (merged store batches).
    pub windows: u64,
    /// Store syncs.
    pub syncs: u64,
    /// Submissions resolved with an error.
    pub failed: u64,
    /// Operations left out because others in the same window cancelled
    /// them (see `netting.rs`).
    pub netted: u64,
    /// Insertions of queue entries dropped because the entry's deletion
    /// reached the writer first (see `recent_deletes.rs`).
    pub late_inserts: u64,
}

#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    windows: AtomicU64,
    syncs: AtomicU64,
    failed: AtomicU64,
    netted: AtomicU64,
    late_inserts: AtomicU64,
}

/// What the writer calls when a submission is resolved.
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// How a submission learns its outcome: a future, a function the writer
/// thread calls, or not at all (a failure is still counted and logged).
enum Reply {
    Future(oneshot::Sender<Result<(), StoreError>>),
    Callback(Completion),
    Detached,
}

impl Reply {
    fn send(self, result: Result<(), StoreError>) {
        match self {
            Reply::Future(tx) => {
                let _ = tx.send(result);
            }
            Reply::Callback(f) => f(result),
            Reply::Detached => {}
        }
    }
}

/// What became of a window's batches (see [`Worker::apply`]).
enum Applied {
    /// All applied; `wrote` is false when there was nothing to write.
    All { wrote: bool },
    /// None applied.
    None(StoreError),
    /// Applied one by one: the failure of each, by position in the window
    /// (`None` for a sync barrier or a batch that was applied).
    Each {
        each: Vec<Option<StoreError>>,
        wrote: bool,
    },
}

impl Applied {
    fn wrote(&self) -> bool {
        match self {
            Applied::All { wrote } | Applied::Each { wrote, .. } => *wrote,
            Applied::None(_) => false,
        }
    }

    /// The failure of the submission at `position` in the window.
    fn failure(&self, position: usize) -> Option<&StoreError> {
        match self {
            Applied::All { .. } => None,
            Applied::None(e) => Some(e),
            Applied::Each { each, .. } => each.get(position)?.as_ref(),
        }
    }
}

struct Request {
    /// `None`: a sync barrier.
    batch: Option<Batch>,
    reply: Reply,
}

/// A handle to the writer thread; clone it freely. The thread applies what
/// is left, syncs (unless in memory mode) and exits when the last handle is
/// dropped.
pub struct StoreWriter {
    inbox: Arc<Inbox<Request>>,
    counters: Arc<Counters>,
}

impl Clone for StoreWriter {
    fn clone(&self) -> Self {
        self.inbox.add_sender();
        StoreWriter {
            inbox: Arc::clone(&self.inbox),
            counters: Arc::clone(&self.counters),
        }
    }
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        self.inbox.remove_sender();
    }
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter")
            .field("stats", &self.stats())
            .finish()
    }
}

impl StoreWriter {
    /// Starts the writer thread over `store`.
    pub fn spawn(store: Arc<dyn Store>, config: WriterConfig) -> Result<StoreWriter, StoreError> {
        let inbox = Arc::new(Inbox::new());
        let counters = Arc::new(Counters::default());
        let mut worker = Worker {
            store,
            config: WriterConfig {
                max_ops: config.max_ops.max(1),
                ..config
            },
            inbox: Arc::clone(&inbox),
            counters: Arc::clone(&counters),
            dirty_since: None,
            errors: ErrorLog::default(),
        };
        std::thread::Builder::new()
            .name("tern-store-writer".into())
            .spawn(move || worker.run())?;
        Ok(StoreWriter { inbox, counters })
    }

    /// Queues `batch` and returns a future that resolves when it is applied
    /// and, in [`Durability::Fsync`] mode, synced. The batch is queued even
    /// if the future is never polled. Concurrent submissions are merged into
    /// one store batch and one sync.
    pub fn submit(
        &self,
        batch: Batch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        self.request(Some(batch))
    }

    /// Resolves once everything submitted before is applied and synced (in
    /// memory mode: applied). For shutdown, and for interval mode callers
    /// that need a durability point.
    pub fn sync(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        self.request(None)
    }

    /// Queues `batch` like [`submit`](Self::submit), and has the writer
    /// thread call `done` with the outcome. Completions run in submission
    /// order, on the writer thread, so they must be short and must not
    /// block; they may take locks the submitter does not hold while calling
    /// this. If the writer has stopped, `done` runs at once, on the calling
    /// thread, with [`StoreError::WriterClosed`].
    pub fn submit_then(&self, batch: Batch, done: Completion) {
        self.enqueue(batch, Reply::Callback(done));
    }

    /// Queues `batch` like [`submit`](Self::submit) for a submitter that
    /// waits for nothing: a change whose loss in a crash is harmless (an
    /// acknowledgement from a subscriber). A failure is counted in
    /// [`WriterStats::failed`] and logged like any other.
    pub fn submit_detached(&self, batch: Batch) {
        self.enqueue(batch, Reply::Detached);
    }

    fn enqueue(&self, batch: Batch, reply: Reply) {
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            batch: Some(batch),
            reply,
        };
        if let Err(request) = self.inbox.push(request) {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            request.reply.send(Err(StoreError::WriterClosed));
        }
    }

    /// Whether the writer thread still runs. It stops only by a panic
    /// (sled panics on some damaged files); from then on every submission
    /// fails with [`StoreError::WriterClosed`].
    pub fn is_running(&self) -> bool {
        !self.inbox.is_closed()
    }

    pub fn stats(&self) -> WriterStats {
        WriterStats {
            submitted: self.counters.submitted.load(Ordering::Relaxed),
            windows: self.counters.windows.load(Ordering::Relaxed),
            syncs: self.counters.syncs.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            netted: self.counters.netted.load(Ordering::Relaxed),
            late_inserts: self.counters.late_inserts.load(Ordering::Relaxed),
        }
    }

    fn request(
        &self,
        batch: Option<Batch>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .inbox
            .push(Request {
                batch,
                reply: Reply::Future(reply),
            })
            .is_ok();
        async move {
            if !sent {
                return Err(StoreError::WriterClosed);
            }
            rx.await.unwrap_or(Err(StoreError::WriterClosed))
        }
    }
}

struct Worker {
    store: Arc<dyn Store>,
    config: WriterConfig,
    inbox: Arc<Inbox<Request>>,
    counters: Arc<Counters>,
    /// When the oldest applied-but-unsynced batch was applied.
    dirty_since: Option<Instant>,
    errors: ErrorLog,
}

/// Logs the writer thread's end by a panic (in the store, or anywhere in
/// the writer): every change to durable state fails from then on, which a
/// restart of the broker is the way out of.
struct ReportPanic;

impl Drop for ReportPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the store writer stopped after a panic: every change to durable state fails from now on; restart the broker"
            );
        }
    }
}

impl Worker {
    fn run(&mut self) {
        let mut held: HeldQueue<Reply> = HeldQueue::new();
        // Kept between rounds: swapped with the inbox's vector (see
        // `inbox.rs`), so arrivals cost no allocation.
        let mut arrived = Vec::new();
        // Declared after what holds replies, so dropped before it (locals
        // drop in reverse): when a panic unwinds, the inbox is closed and
        // the end logged before any submitter is told `WriterClosed`, so
        // a submitter told so finds `is_running` false.
        let _report = ReportPanic;
        let _close = CloseOnExit(Arc::clone(&self.inbox));
        let mut open = true;
        // When a submission last arrived: for a while after, the writer
        // polls rather than blocks (see `BUSY_POLL_FOR`).
        let mut last_arrival = Instant::now();
        while open || !held.is_empty() {
            open = self.inbox.take(&mut arrived);
            // Arrivals are stamped here, once per round rather than once
            // per submission: a hold counts from when the writer took the
            // submission, at most one poll (or one window) after it came.
            let now = Instant::now();
            if !arrived.is_empty() {
                last_arrival = now;
            }
            for r in arrived.drain(..) {
                held.push(r.batch, r.reply, now);
            }
            let ready = held.ready(now, self.hold(), self.config.max_ops, !open);
            if ready > 0 {
                held.prepare(ready);
                self.counters.netted.store(held.netted(), Ordering::Relaxed);
                self.counters
                    .late_inserts
                    .store(held.late_inserts(), Ordering::Relaxed);
                self.window(&mut held, ready);
                continue;
            }
            if self.next_sync_due().is_some_and(|due| due <= now) {
                self.periodic_sync();
                continue;
            }
            // The front waits for its acknowledgements, or submissions came
            // in lately: poll instead of blocking, so that no submitter pays
            // for waking the writer.
            let poll_until = match held.front_hold_ends(self.hold()) {
                Some(ends) => Some(ends.min(now + HOLD_POLL)),
                None if now < last_arrival + BUSY_POLL_FOR => Some(now + HOLD_POLL),
                None => None,
            };
            match poll_until {
                Some(until) => {
                    let until = self.next_sync_due().map_or(until, |due| until.min(due));
                    std::thread::sleep(until.saturating_duration_since(now));
                }
                None if open => self.inbox.wait(self.next_sync_due()),
                None => {}
            }
        }
        if self.dirty_since.is_some() && self.config.mode != Durability::Memory {
            let _ = self.sync();
        }
    }

    /// How long a submission that inserts an in-flight queue entry may wait
    /// for the entry's deletion (see `netting.rs`). Fsync and interval modes
    /// hold: a netted pair saves its writes (and in fsync mode its share of
    /// a sync); without the hold, interval mode wrote every delivery to an
    /// online subscriber and was slower than fsync. Memory mode has nothing
    /// to save, so it writes what is pending at once.
    fn hold(&self) -> Duration {
        match self.config.mode {
            Durability::Fsync | Durability::Interval(_) => self.config.max_delay,
            Durability::Memory => Duration::ZERO,
        }
    }

    /// The interval mode's sync; after a failure the next try is one period
    /// later (no busy retry loop against a failing disk).
    fn periodic_sync(&mut self) {
        if self.sync().is_err() {
            self.dirty_since = Some(Instant::now());
        }
    }

    /// In interval mode with unsynced data, when the next sync is due.
    fn next_sync_due(&self) -> Option<Instant> {
        match (self.config.mode, self.dirty_since) {
            (Durability::Interval(every), Some(since)) => Some(since + every),
            _ => None,
        }
    }

    /// Writes the `n` oldest held submissions (prepared: netted already) as
    /// one window and resolves them, in submission order. The batches stay
    /// where they are: the store reads them in the held queue and they are
    /// dropped as their replies are sent.
    fn window(&mut self, held: &mut HeldQueue<Reply>, n: usize) {
        let (applied, has_barrier) = {
            let group: SmallVec<[Option<&Batch>; 64]> = held.front(n).collect();
            (self.apply(&group), group.iter().any(Option::is_none))
        };
        if applied.wrote() && self.dirty_since.is_none() {
            self.dirty_since = Some(Instant::now());
        }
        // What the applied batches and the sync barriers resolve with.
        let (batches, barriers) = match self.config.mode {
            Durability::Fsync => {
                // A window that netted down to nothing has nothing to sync
                // (every earlier window was synced, or failed and left
                // `dirty_since` set).
                if self.dirty_since.is_some() || has_barrier {
                    let result = self.sync();
                    (result.clone(), result)
                } else {
                    (Ok(()), Ok(()))
                }
            }
            Durability::Interval(every) => {
                if has_barrier {
                    let result = self.sync();
                    if result.is_err() {
                        self.dirty_since = Some(Instant::now());
                    }
                    (Ok(()), result)
                } else {
                    if self.dirty_since.is_some_and(|s| s.elapsed() >= every) {
                        self.periodic_sync();
                    }
                    (Ok(()), Ok(()))
                }
            }
            Durability::Memory => {
                self.dirty_since = None;
                (Ok(()), Ok(()))
            }
        };
        for (i, (is_batch, reply)) in held.drain_front(n).enumerate() {
            let result = match (is_batch, applied.failure(i)) {
                (false, _) => barriers.clone(),
                (true, Some(e)) => Err(e.clone()),
                (true, None) => batches.clone(),
            };
            if result.is_err() {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            reply.send(result);
        }
    }

    /// Applies a window's (netted) batches as one store batch. After an
    /// invalid batch failed the window, each batch is applied on its own so
    /// that only the invalid one fails.
    fn apply(&mut self, group: &[Option<&Batch>]) -> Applied {
        let batches: SmallVec<[&Batch; 64]> = group.iter().flatten().copied().collect();
        if batches.is_empty() {
            return Applied::All { wrote: false };
        }
        self.counters.windows.fetch_add(1, Ordering::Relaxed);
        if batches.iter().all(|b| b.is_empty()) {
            // Netted down to nothing.
            return Applied::All { wrote: false };
        }
        match self.store.apply_all(&batches) {
            Ok(()) => {
                self.errors.ok("apply", Instant::now());
                Applied::All { wrote: true }
            }
            Err(e) if e.is_invalid_batch() && batches.len() > 1 => {
                let mut wrote = false;
                let each = group
                    .iter()
                    .map(|batch| {
                        let batch = (*batch)?;
                        match self.store.apply(batch) {
                            Ok(()) => {
                                wrote = true;
                                None
                            }
                            Err(e) => {
                                self.errors.failed("apply", &e, Instant::now());
                                Some(e)
                            }
                        }
                    })
                    .collect();
                Applied::Each { each, wrote }
            }
            Err(e) => {
                self.errors.failed("apply", &e, Instant::now());
                Applied::None(e)
            }
        }
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        let result = self.store.sync();
        match &result {
            Ok(()) => {
                self.dirty_since = None;
                self.errors.ok("sync", Instant::now());
            }
            Err(e) => self.errors.failed("sync", e, Instant::now()),
        }
        result
    }
}
