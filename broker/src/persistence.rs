//! The bridge between the broker's in-memory state and its durable store.
//!
//! Sessions, queues and retained messages live in memory, where the hot path
//! works on them; every change that must survive a crash is also described
//! as store operations and handed to the group-commit writer of
//! `tern-storage`. This module owns that hand-off:
//!
//! - [`Persistence`]: the open store, its writer and the message id counter.
//! - [`Journal`]: the operations one broker action produces (a PUBLISH routed
//!   to many sessions, an acknowledgement, a SUBSCRIBE), plus what to do once
//!   they are durable (send the PUBACK, release a QoS 2 PUBLISH). One journal
//!   is one atomic store batch.
//! - The conversions between broker values (`Message`, `Will`, `Instant`)
//!   and store records (Unix time, serialised properties).
//!
//! # Durability rule
//!
//! Whatever a client is told was accepted or finished (PUBACK, PUBREC,
//! PUBCOMP, SUBACK, UNSUBACK) is sent from a journal's completion, so in
//! `fsync` mode it leaves only after the batch holding that state is
//! synced. Changes nobody waits for (an
//! acknowledgement from a subscriber, a session going offline) are committed
//! without a completion; losing one in a crash only means a message is
//! delivered again (QoS 1) or a PUBREL is sent again (QoS 2).
//!
//! Completions run on the writer thread, in submission order: they only
//! queue packets and take session locks, never block.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smallvec::SmallVec;
use tern_codec::{QoS, Will};
use tern_storage::{
    Batch, Completion, MessageRecord, OnDamage, Op, SledStore, Store, StoreError, StoreWriter,
    WillRecord, WriterConfig,
};

use crate::message::Message;

/// The durable store of a running broker.
pub struct Persistence {
    store: Arc<dyn Store>,
    writer: StoreWriter,
    next_message_id: AtomicU64,
    /// The runtime whose blocking pool runs store reads after start-up.
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl Persistence {
    /// Opens (creating if needed) the sled store in `dir` and starts its
    /// writer. Blocks on the disk: call it from a blocking context. A store
    /// found damaged is refused ([`StoreError::Damaged`]) unless `on_damage`
    /// accepts it.
    pub fn open(
        dir: &std::path::Path,
        config: WriterConfig,
        on_damage: OnDamage,
    ) -> Result<Arc<Persistence>, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(Arc::new(e)))?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open_with(dir, on_damage)?);
        Persistence::with_store(store, config)
    }

    /// Runs over any store (tests use `MemoryStore` and `FailingStore`).
    pub fn with_store(
        store: Arc<dyn Store>,
        config: WriterConfig,
    ) -> Result<Arc<Persistence>, StoreError> {
        let next = store.last_message_id()?.map_or(1, |id| id + 1);
        let writer = StoreWriter::spawn(Arc::clone(&store), config)?;
        Ok(Arc::new(Persistence {
            store,
            writer,
            next_message_id: AtomicU64::new(next),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }))
    }

    /// The store, for recovery and the admin endpoint (reads only; all
    /// writes go through the writer).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Hands a journal to the writer. Its completions run once the batch is
    /// durable (per the durability mode) or failed. Never blocks; callers
    /// must not hold a lock that a completion takes (if the writer has
    /// stopped, completions run at once on this thread).
    pub fn commit(&self, journal: Journal) {
        let Journal {
            batch,
            mut after,
            depends_on,
            ..
        } = journal;
        if let Some(earlier) = depends_on.filter(|_| !after.is_empty()) {
            let own = std::mem::take(&mut after);
            after.push(Box::new(move |result| {
                let result = match earlier.failure() {
                    Some(e) => Err(e.clone()),
                    None => result,
                };
                for f in own {
                    f(result.clone());
                }
            }));
        }
        if after.len() > 1 {
            let all: Completion = Box::new(move |result| {
                for f in after {
                    f(result.clone());
                }
            });
            self.writer.submit_then(batch, all);
            return;
        }
        match after.pop() {
            Some(done) => self.writer.submit_then(batch, done),
            None if batch.is_empty() => {}
            None => self.writer.submit_detached(batch),
        }
    }

    /// Commits `journal` like [`commit`](Self::commit), and returns what
    /// becomes of it, for a journal committed later to
    /// [`depend_on`](Journal::depend_on).
    pub fn commit_tracked(&self, mut journal: Journal) -> Arc<Outcome> {
        let outcome = Arc::new(Outcome::default());
        let record = Arc::clone(&outcome);
        journal.after(move |result| {
            if let Err(e) = result {
                let _ = record.0.set(e.clone());
            }
        });
        self.commit(journal);
        outcome
    }

    /// Resolves once everything committed before is durable (shutdown).
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.writer.sync().await
    }

    /// Runs a store read off the async threads, `after` from now: on the
    /// runtime's blocking pool (or a thread of its own without a runtime).
    /// The wait is a timer, not a blocking thread put to sleep, so reads
    /// waiting to be retried do not hold the pool's threads.
    pub fn spawn_read(&self, after: Duration, read: impl FnOnce() + Send + 'static) {
        match &self.runtime {
            Some(handle) if after.is_zero() => {
                handle.spawn_blocking(read);
            }
            Some(handle) => {
                let blocking = handle.clone();
                handle.spawn(async move {
                    tokio::time::sleep(after).await;
                    blocking.spawn_blocking(read);
                });
            }
            None => {
                std::thread::spawn(move || {
                    std::thread::sleep(after);
                    read();
                });
            }
        }
    }

    /// Writer counters (windows, syncs, and `failed`: the submissions that
    /// failed, whose clients got an error code instead of an
    /// acknowledgement).
    pub fn writer_stats(&self) -> tern_storage::WriterStats {
        self.writer.stats()
    }

    /// Whether the store writer still runs (see
    /// [`StoreWriter::is_running`]).
    pub fn writer_running(&self) -> bool {
        self.writer.is_running()
    }

    /// The id `message` has in the store, given now if it has none yet.
    /// Copies made afterwards (`Message::detached`) keep it, so that they
    /// and the message are one stored record.
    pub fn store_id(&self, message: &Message) -> u64 {
        *message
            .store_id
            .get_or_init(|| self.next_message_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// The store operations of one broker action and what follows their commit.
/// See the module documentation.
#[derive(Default)]
pub struct Journal {
    batch: Batch,
    /// Usually none (nobody waits) or one (the acknowledgement): inline.
    after: SmallVec<[Completion; 1]>,
    /// Messages already put in this batch (a message is written once per
    /// batch, however many queue entries reference it).
    stored: SmallVec<[u64; 2]>,
    /// Completes only after every journal committed before it, even with
    /// an empty batch; see [`Journal::after_earlier`].
    after_earlier: bool,
    /// A journal committed before this one whose failure is this one's
    /// too; see [`Journal::depend_on`].
    depends_on: Option<Arc<Outcome>>,
}

/// What became of a journal committed with [`Persistence::commit_tracked`]:
/// its error once it failed; empty while pending or once stored.
#[derive(Debug, Default)]
pub struct Outcome(std::sync::OnceLock<StoreError>);

impl Outcome {
    fn failure(&self) -> Option<&StoreError> {
        self.0.get()
    }
}

impl Journal {
    pub fn new() -> Journal {
        Journal::default()
    }

    /// True when the journal changes nothing in the store.
    pub fn has_changes(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Whether an acknowledgement of this journal must go through the
    /// store writer: it changes something, or it must wait for earlier
    /// journals ([`after_earlier`](Self::after_earlier)).
    pub fn must_wait(&self) -> bool {
        self.has_changes() || self.after_earlier || self.depends_on.is_some()
    }

    /// Part of what this journal's completions acknowledge was committed
    /// before it, in a journal of its own (`outcome`, from
    /// [`Persistence::commit_tracked`]): if that one failed, they are told
    /// so. It was resolved first (the writer resolves in submission
    /// order), so this journal waits for it as well.
    pub fn depend_on(&mut self, outcome: Arc<Outcome>) {
        self.depends_on = Some(outcome);
    }

    /// Its completions wait for every journal committed before it (the
    /// writer resolves submissions in order), even if this one changes
    /// nothing: for an acknowledgement of state that another connection's
    /// journal stored, such as a QoS 2 PUBLISH sent again on a new
    /// connection while the first copy's batch is still being written.
    pub fn after_earlier(&mut self) {
        self.after_earlier = true;
    }

    pub fn push(&mut self, op: Op) {
        self.batch.push(op);
    }

    /// Runs `f` once this journal's batch is durable or failed.
    pub fn after(&mut self, f: impl FnOnce(&Result<(), StoreError>) + Send + 'static) {
        self.after.push(Box::new(move |result| f(&result)));
    }

    /// The store id of `message`, putting the message in this batch unless
    /// it already is. Call it for every new reference (queue entry,
    /// retained record): the message may have been deleted from the store
    /// since an earlier batch, when its last reference went. Call it too
    /// for an entry that may not be stored yet: a delivery sent from a
    /// subscriber's queue (for QoS 1 the race below is real). Its insertion is submitted by the publisher's
    /// connection after the read that routed it, while the subscriber's
    /// connection may already have sent it and submitted the replacement;
    /// the replacement then creates the entry, and the late insertion is
    /// dropped (tern-storage's `recent_deletes.rs`). Where the message is
    /// stored, the store keeps its record and the put writes nothing, or the
    /// put nets away with the entry. (A QoS 2 delivery to a durable session is sent only
    /// once its entry is durable, so its PUBREC never overtakes it.)
    pub fn reference(&mut self, persistence: &Persistence, message: &Message) -> u64 {
        let id = persistence.store_id(message);
        if !self.stored.contains(&id) {
            self.stored.push(id);
            self.batch.push(Op::PutMessage(message_record(message, id)));
        }
        id
    }
}

/// Now, in Unix seconds.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Now, in Unix milliseconds.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An `Instant` deadline as Unix milliseconds (for a record).
fn deadline_to_unix_millis(at: Instant) -> u64 {
    let left = at.saturating_duration_since(Instant::now());
    unix_millis().saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
}

/// Unix milliseconds from a record as an `Instant` deadline (in the past if
/// it already passed).
pub fn unix_millis_to_deadline(at: u64) -> Instant {
    let now = Instant::now();
    let now_ms = unix_millis();
    if at >= now_ms {
        now + Duration::from_millis(at - now_ms)
    } else {
        now.checked_sub(Duration::from_millis(now_ms - at))
            .unwrap_or(now)
    }
}

/// The record of a message.
pub fn message_record(message: &Message, id: u64) -> MessageRecord {
    MessageRecord {
        id,
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: message.qos as u8,
        retain: message.retain,
        properties: tern_codec::encode_publish_properties(message.properties()).unwrap_or_default(),
        expires_at: message.expires_at.map(deadline_to_unix_millis),
    }
}

/// A message read back from the store. `None` when the record cannot be
/// used (its properties do not decode, or its QoS is out of range).
pub fn message_from_record(record: MessageRecord) -> Option<Arc<Message>> {
    let properties = if record.properties.is_empty() {
        None
    } else {
        Some(Box::new(
            tern_codec::decode_publish_properties(record.properties).ok()?,
        ))
    };
    let qos = QoS::from_u8(record.qos)?;
    let expires_at = record.expires_at.map(unix_millis_to_deadline);
    let message = Message::restored(
        record.topic,
        record.payload,
        qos,
        record.retain,
        properties,
        expires_at,
        record.id,
    );
    Some(message)
}

/// The record of a will.
pub fn will_record(will: &Will) -> WillRecord {
    WillRecord {
        topic: will.topic.clone(),
        payload: will.payload.clone(),
        qos: will.qos as u8,
        retain: will.retain,
        delay_interval: will.properties.will_delay_interval.unwrap_or(0),
        properties: tern_codec::encode_will_properties(&will.properties).unwrap_or_default(),
    }
}

/// A will read back from the store.
pub fn will_from_record(record: WillRecord) -> Option<Will> {
    let properties = if record.properties.is_empty() {
        Default::default()
    } else {
        tern_codec::decode_will_properties(record.properties).ok()?
    };
    Some(Will {
        topic: record.topic,
        payload: record.payload,
        qos: QoS::from_u8(record.qos)?,
        retain: record.retain,
        properties,
    })
}
