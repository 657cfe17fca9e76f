//! The [`Store`] trait: what the broker and `tern admin` need from durable
//! storage, in batches, with recovery reads that never load every payload.

use crate::batch::Batch;
use crate::error::StoreError;
use crate::records::{
    MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SubscriptionRecord,
};

/// A lazy iterator over stored records. It reads the store in chunks of
/// [`SCAN_CHUNK`](crate::SCAN_CHUNK) keys; it is not a point-in-time snapshot,
/// so iterate while nothing writes (recovery, a stopped broker, admin views
/// that tolerate a moving target).
pub type RecordIter<'a, T> = Box<dyn Iterator<Item = Result<T, StoreError>> + Send + 'a>;

/// Durable storage of Tern's records.
///
/// Implementations are synchronous and may block on disk I/O: call them from
/// a blocking thread (the [`StoreWriter`](crate::StoreWriter) does), never
/// directly from an async task.
///
/// # Message references
///
/// A message is stored once ([`Op::PutMessage`](crate::Op::PutMessage)) and
/// referenced by queue entries and retained records; the store counts the
/// references and deletes the message, atomically with the batch, when the
/// count reaches zero at the end of a batch.
pub trait Store: Send + Sync {
    /// Applies every operation of `batches`, in order, as **one** atomic
    /// batch: after a crash either all of it is there or none of it. On
    /// `Err` nothing was applied ([`StoreError::InvalidBatch`]) or, for I/O
    /// errors, the engine may be unusable; it is never half-applied. The
    /// writer passes a whole window this way without merging the batches
    /// into one; they are borrowed so that it can retry them one by one
    /// after an invalid one failed the window.
    fn apply_all(&self, batches: &[&Batch]) -> Result<(), StoreError>;

    /// Applies one batch atomically (see [`apply_all`](Self::apply_all)).
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.apply_all(&[batch])
    }

    /// Makes everything applied so far durable (fsync).
    fn sync(&self) -> Result<(), StoreError>;

    /// One session by client id.
    fn session(&self, client_id: &str) -> Result<Option<SessionRecord>, StoreError>;

    /// Every session, ordered by client id.
    fn sessions(&self) -> RecordIter<'_, SessionRecord>;

    /// The subscriptions of one session, ordered by filter.
    fn subscriptions(&self, client_id: &str) -> RecordIter<'_, SubscriptionRecord>;

    /// The queue of one session in `seq` order, starting after `after_seq`
    /// (or at the start). Entries carry message ids, not payloads: fetch
    /// those with [`message`](Self::message) when they are about to be sent.
    fn queue(&self, client_id: &str, after_seq: Option<u64>) -> RecordIter<'_, QueueEntry>;

    /// Incoming QoS 2 packet ids awaiting PUBREL for one session, ascending.
    fn incoming_qos2(&self, client_id: &str) -> Result<Vec<u16>, StoreError>;

    /// One message by id.
    fn message(&self, id: u64) -> Result<Option<MessageRecord>, StoreError>;

    /// How many queue entries and retained records reference message `id`.
    fn message_refs(&self, id: u64) -> Result<u32, StoreError>;

    /// The highest stored message id, to continue allocating after a restart.
    fn last_message_id(&self) -> Result<Option<u64>, StoreError>;

    /// The highest queue seq of one session, to continue after a restart.
    fn last_seq(&self, client_id: &str) -> Result<Option<u64>, StoreError>;

    /// Retained records whose topic starts with `topic_prefix` (`""` for all),
    /// ordered by topic. Filter with wildcards on top of this (admin) or load
    /// them all into the router's retained store (recovery).
    fn retained(&self, topic_prefix: &str) -> RecordIter<'_, RetainedRecord>;

    /// A session with its subscriptions and queue counts, for `tern admin`.
    fn session_summary(&self, client_id: &str) -> Result<Option<SessionSummary>, StoreError>;

    /// Key and byte counts (walks the whole store: an admin operation).
    fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Asks the engine to reclaim space now, then returns fresh statistics.
    fn compact(&self) -> Result<StoreStats, StoreError>;

    /// Deletes a session and everything it references, atomically (a batch
    /// holding [`Op::DeleteSession`](crate::Op::DeleteSession)). Meant for
    /// `tern admin` on a stopped broker; a running broker submits the same
    /// operation through its writer.
    fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        let mut b = Batch::new();
        b.delete_session(client_id);
        self.apply(&b)
    }
}

/// A session as `tern admin` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSummary {
    pub session: SessionRecord,
    pub subscriptions: Vec<SubscriptionRecord>,
    /// Queue entries in total.
    pub queue_depth: u64,
    /// Entries with a PUBLISH on the wire (awaiting PUBACK/PUBREC or PUBCOMP).
    pub inflight: u64,
    /// Incoming QoS 2 ids awaiting PUBREL.
    pub incoming_qos2: u64,
}

/// Counts and sizes of the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreStats {
    /// Every key, including reference counts and the store's own keys
    /// (schema version, commit number).
    pub keys: u64,
    /// Sum of key and value lengths: the data a perfect engine would keep.
    pub live_bytes: u64,
    /// Bytes of every file in the store's directory (0 in memory).
    pub disk_bytes: u64,
    pub sessions: u64,
    pub subscriptions: u64,
    pub messages: u64,
    pub queue_entries: u64,
    pub retained: u64,
}

impl StoreStats {
    /// Space amplification: bytes on disk / live bytes. `None` when there is
    /// no live data or no disk (memory store).
    pub fn space_amplification(&self) -> Option<f64> {
        if self.live_bytes == 0 || self.disk_bytes == 0 {
            None
        } else {
            Some(self.disk_bytes as f64 / self.live_bytes as f64)
        }
    }
}
