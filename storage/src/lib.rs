//! Tern's durable state.
//!
//! # What this crate owns
//!
//! The durable records of the broker: persistent sessions (with their will),
//! their subscriptions, application messages, per-session queues of
//! outgoing QoS 1/2 deliveries (offline queue and in-flight window alike),
//! incoming QoS 2 packet ids awaiting PUBREL, and retained messages. It
//! offers them through the [`Store`] trait, implemented on disk by
//! [`SledStore`] and in memory by [`MemoryStore`], and the group-commit
//! [`StoreWriter`] that the hot path submits [`Batch`]es to.
//!
//! # Invariants
//!
//! - A [`Batch`] is applied atomically and in order: after a crash all of it
//!   is there or none of it.
//! - A message is stored once, whatever the number of queues that reference
//!   it. The store counts references (queue entries and retained records)
//!   and deletes a message in the same batch that drops its last reference;
//!   a message put without any reference by the end of its batch is not kept.
//!   A message referenced once, the common case, has no count key: its
//!   record and its one reference are all that is written for it.
//! - A queue iterates in `seq` order; recovery reads stream in chunks of
//!   [`SCAN_CHUNK`] keys and fetch payloads one message at a time, so a
//!   million queued messages are never loaded at once.
//! - Every store carries a schema version ([`SCHEMA_VERSION`]); a newer one
//!   is refused at open, an older one is migrated (see `schema.rs`).
//! - With [`Durability::Fsync`], a submission resolves `Ok` only after the
//!   batch is synced to disk.
//! - A disk store never opens silently shorter than it was synced: every
//!   write carries a commit number, every sync records the last one outside
//!   the engine's files, and a store found behind that record is refused as
//!   damaged ([`StoreError::Damaged`]) unless the caller accepts the damage
//!   (see `synced_commit.rs`).
//!
//! # What it must never do
//!
//! - Know MQTT framing: records hold topics, payloads and QoS numbers; the
//!   broker serialises MQTT 5 properties itself and stores them as opaque
//!   bytes.
//! - Block an async task on disk I/O: store calls are synchronous and run on
//!   the writer's own thread (or, for admin and recovery reads, on a thread
//!   the caller provides, e.g. `spawn_blocking`).
//! - Hold a lock across an await.
//!
//! # Layout
//!
//! `records.rs` (the records), `batch.rs` (operations), `store.rs` (the
//! trait), `engine.rs` (the shared implementation over an ordered key-value
//! engine), `keys.rs` and `encoding.rs` (the on-disk format), `schema.rs`
//! (version and upgrade rule), `sled_store.rs`, `memory.rs`, `writer.rs`
//! (group commit), `netting.rs` (what a window leaves out), `recent_deletes.rs` (deletions
//! that overtook their insertion), `synced_commit.rs` (the witness of the
//! last durable write, which finds a store shortened by damage), `fault.rs`
//! (failure injection for tests), `error.rs`.

mod batch;
mod encoding;
mod engine;
mod error;
mod error_log;
mod fault;
mod inbox;
mod keys;
mod memory;
mod netting;
mod recent_deletes;
mod records;
mod schema;
mod sled_rewrite;
mod sled_store;
mod store;
mod synced_commit;
mod writer;

pub use batch::{Batch, Op, INLINE_OPS};
pub use error::StoreError;
pub use fault::FailingStore;
pub use memory::MemoryStore;
pub use records::{
    DeliveryState, MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SharedGroupRecord,
    SubscriptionRecord, WillRecord,
};
pub use schema::SCHEMA_VERSION;
pub use sled_rewrite::REWRITE_SUFFIX;
pub use sled_store::{
    OnDamage, SledStore, LOCK_WAIT, REOPEN_FIRST_WAIT, REOPEN_FREE_BYTES, REOPEN_MAX_WAIT,
    SLED_CACHE_BYTES,
};
pub use store::{RecordIter, SessionSummary, Store, StoreStats};
pub use writer::{
    Completion, Durability, StoreWriter, WriterConfig, WriterStats, DEFAULT_MAX_DELAY,
    DEFAULT_MAX_OPS, DEFAULT_SYNC_INTERVAL,
};

/// Keys read per engine call by the recovery and admin iterators. Large
/// enough that a scan costs few calls, small enough that a chunk of queue
/// entries (tens of bytes each) or sessions stays a few hundred KiB.
pub const SCAN_CHUNK: usize = 1024;
