//! The one error type of the crate.
//!
//! [`StoreError`] is `Clone` on purpose: the group-commit writer resolves
//! every submission of a failed window with the same error, so I/O errors are
//! kept behind an `Arc`.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in the store or the writer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the files failed (disk full, permissions, I/O
    /// error). The batch that saw it may or may not be durable.
    #[error("storage I/O error: {0}")]
    Io(#[source] Arc<io::Error>),

    /// Another process (normally a running broker) holds the store's lock.
    #[error(
        "the store at {path} is locked by another process (a running broker?); \
         use the broker's admin endpoint instead"
    )]
    Locked { path: PathBuf },

    /// The store was written by a newer Tern with a schema this build does
    /// not know. Nothing was changed.
    #[error(
        "the store has schema version {found}, newer than the {supported} this build \
         supports; upgrade Tern (the store was left untouched)"
    )]
    NewerSchema { found: u32, supported: u32 },

    /// The directory holds data but no Tern schema version key.
    #[error("the store holds data but no schema version key: not a Tern store")]
    NotATernStore,

    /// The store holds fewer writes than were synced before: its engine
    /// stopped reading at a damaged record and left out what came after it
    /// (see `synced_commit.rs`). The engine's recovery has already cut its
    /// log at the damage.
    #[error(
        "the store at {path} is damaged: it ends at commit {found}, but commits up to \
         {synced} were synced to disk before; the storage engine stopped reading at a \
         damaged record and left out the {lost} commit(s) after it",
        lost = synced.saturating_sub(*found)
    )]
    Damaged {
        path: PathBuf,
        /// The last commit the witness says was durable.
        synced: u64,
        /// The last commit the store holds.
        found: u64,
    },

    /// The storage engine failed while reading its files at open (sled
    /// 0.34 panics on some damage, e.g. a bad record in an older log
    /// segment or a damaged snapshot); the panic is caught and reported
    /// here. The files are damaged beyond what the engine can recover.
    #[error(
        "the store at {path} cannot be read: its storage engine failed on damaged files ({detail})"
    )]
    Unreadable { path: PathBuf, detail: String },

    /// A stored value could not be decoded.
    #[error("corrupt record under key {key:?}: {reason}")]
    Corrupt { key: String, reason: &'static str },

    /// The batch is invalid as a whole (for example a queue entry that
    /// references a message that is neither stored nor in the batch).
    /// Nothing of the batch was applied.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),

    /// The storage engine reported an error that is not plain I/O.
    #[error("storage engine error: {0}")]
    Engine(String),

    /// The writer has stopped (its thread ended); nothing was applied.
    #[error("the store writer has stopped")]
    WriterClosed,

    /// A write to a store opened only to read what its damage left
    /// ([`OnDamage::Inspect`](crate::OnDamage::Inspect)): nothing was
    /// applied, so that the next start still finds the damage.
    #[error(
        "the store is open read-only, to look at what its damage left: nothing may be \
         written to it"
    )]
    ReadOnly,

    /// A failure injected by [`FailingStore`](crate::FailingStore).
    #[error("injected failure: {0}")]
    Injected(&'static str),
}

impl StoreError {
    /// True when the error is the batch's own fault (nothing to do with the
    /// disk): retrying the same batch fails the same way, other batches are
    /// unaffected.
    pub fn is_invalid_batch(&self) -> bool {
        matches!(self, StoreError::InvalidBatch(_))
    }

    /// True when the disk is full (or over quota): the broker answers with
    /// "quota exceeded" rather than "implementation specific error".
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
            ),
            _ => false,
        }
    }

    pub(crate) fn corrupt(key: &[u8], reason: &'static str) -> StoreError {
        StoreError::Corrupt {
            key: crate::keys::describe(key),
            reason,
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => StoreError::Io(Arc::new(io)),
            sled::Error::Corruption { at, .. } => StoreError::Corrupt {
                key: format!("sled log at {at:?}"),
                reason: "sled detected corruption in its files",
            },
            other => StoreError::Engine(other.to_string()),
        }
    }
}
