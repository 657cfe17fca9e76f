//! [`SledStore`]: the store on disk, in sled 0.34.
//!
//! Every record kind lives in **one** sled tree under its own key prefix
//! (see `keys.rs`) rather than one tree per kind. A batch is then a single
//! `Tree::apply_batch`, which sled makes atomic, crash-atomic included; with
//! one tree per kind, atomicity across trees would need sled's
//! `Transactional` over a tuple of trees, whose closures may be re-run on
//! conflict and whose arity is fixed at compile time. One tree is the
//! simpler correct choice; prefixes keep per-kind scans just as cheap.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::engine::{store_via_core, Core, Engine, Pairs, Writes};
use crate::error::StoreError;
use crate::synced_commit::SyncedCommit;

/// sled's page cache. sled's default (1 GiB) is sized for a database that
/// serves reads from cache; the broker keeps its hot state in its own memory
/// and reads the store only at recovery and for admin views.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// How long [`SledStore::open`] keeps trying a locked directory before it
/// reports [`StoreError::Locked`]. sled releases its file lock when the last
/// of its background I/O threads lets go of the database, a moment after
/// the `Db` is dropped; a reopen in the same process (tests, a restart)
/// must not mistake that moment for another owner. A real owner (a running
/// broker) is reported after this wait.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What [`SledStore::open_with`] does with a store that holds fewer writes
/// than were synced before ([`StoreError::Damaged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDamage {
    /// Refuse to open it (sled's recovery has already cut its log at the
    /// damage): whoever runs the broker decides (restore a backup, or
    /// accept the loss).
    #[default]
    Refuse,
    /// Open it with what it still holds, log the loss at error level, and
    /// take what it holds as the new reference, so that the next start does
    /// not report the same damage again.
    Accept,
    /// Open it with what it still holds, to look at, not to change: every
    /// write fails with [`StoreError::ReadOnly`] and the record of the
    /// last synced commit is left as it is, so the next start still
    /// reports the damage, and an older schema is read without being
    /// upgraded. (Opening is not free of writes all the same: sled's
    /// recovery has cut its log at the damage, as a refused start does.)
    /// For `tern admin --read-damaged`.
    Inspect,
}

/// A [`Store`](crate::Store) in a sled database directory.
pub struct SledStore {
    core: Core<SledEngine>,
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`, checking the schema
    /// version. Fails with [`StoreError::Locked`] if another owner (a
    /// running broker) still has it open after [`LOCK_WAIT`].
    ///
    /// sled's own periodic flush is turned off: when data becomes durable is
    /// decided by whoever calls [`Store::sync`](crate::Store::sync) (the
    /// writer, according to its durability mode), so the modes mean exactly
    /// what they say. Dropping the store flushes it.
    ///
    /// A store that holds fewer writes than were synced before (damage in
    /// the middle of sled's log, which sled's recovery takes for the torn
    /// end of a crash) is refused with [`StoreError::Damaged`]; see
    /// [`SledStore::open_with`].
    pub fn open(path: impl AsRef<Path>) -> Result<SledStore, StoreError> {
        SledStore::open_with(path, OnDamage::Refuse)
    }

    /// [`SledStore::open`], saying what to do with a damaged store.
    pub fn open_with(path: impl AsRef<Path>, on_damage: OnDamage) -> Result<SledStore, StoreError> {
        let path = path.as_ref().to_path_buf();
        // sled 0.34 panics on some damage as it recovers (a bad record in an
        // older segment, a damaged snapshot): report it as an error of the
        // store rather than let it unwind through the caller.
        let writable = on_damage != OnDamage::Inspect;
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_core(&path, writable)));
        let mut core = match opened {
            Ok(core) => core?,
            Err(panic) => {
                let detail = panic_message(panic.as_ref());
                return Err(StoreError::Unreadable { path, detail });
            }
        };
        let (witness, synced) = if writable {
            let (witness, synced) = SyncedCommit::open(&path)?;
            (Some(witness), synced)
        } else {
            (None, SyncedCommit::read(&path)?)
        };
        let found = core.commit();
        if synced.is_none() && found > 0 {
            tracing::warn!(
                path = %path.display(),
                commit = found,
                "the record of the last synced commit ({}) is missing or unreadable: damage to the store cannot be checked at this start",
                crate::synced_commit::FILE_NAME
            );
        }
        if let Some(synced) = synced.filter(|&synced| synced > found) {
            let damage = StoreError::Damaged {
                path,
                synced,
                found,
            };
            match on_damage {
                OnDamage::Refuse => return Err(damage),
                OnDamage::Accept => {
                    tracing::error!(error = %damage, "opening the damaged store with what it holds, as asked");
                    if let Some(witness) = &witness {
                        witness.reset(found)?;
                    }
                }
                OnDamage::Inspect => {
                    tracing::warn!(error = %damage, "opening the damaged store read-only, as asked");
                }
            }
        }
        if let Some(witness) = witness {
            core.set_witness(witness);
        }
        Ok(SledStore { core })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.core.engine.path
    }

    /// Whether it was opened only to be read (`OnDamage::Inspect`).
    pub(crate) fn is_read_only(&self) -> bool {
        self.core.is_read_only()
    }

    /// Runs `f` on the sled database (for `sled_rewrite.rs`).
    pub(crate) fn with_sled<T>(
        &self,
        f: impl FnOnce(&sled::Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.core.engine.with_db(|o| f(&o.db))
    }
}

/// What a caught panic of sled's said (sled panics on some damage, and on
/// I/O errors in `import`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "it panicked".into())
}

/// How the store opens sled in `path`: a page cache of
/// [`SLED_CACHE_BYTES`], a log that favours space over speed, and no flush
/// of its own (see [`SledStore::open`]).
pub(crate) fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(None)
}

/// Opens sled in `path` (waiting up to [`LOCK_WAIT`] for its lock) and the
/// record-level store over it (only to be read unless `writable`).
fn open_core(path: &Path, writable: bool) -> Result<Core<SledEngine>, StoreError> {
    let engine = SledEngine {
        open: RwLock::new(Some(OpenSled::open(path)?)),
        path: path.to_path_buf(),
        synced_blobs: Mutex::new(HashSet::new()),
        failure: Mutex::new(None),
    };
    Core::open(engine, writable)
}

impl OpenSled {
    /// Opens sled in `path`, waiting up to [`LOCK_WAIT`] for its lock, and
    /// its log file.
    fn open(path: &Path) -> Result<OpenSled, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            let opened = sled_config(path).open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(other) => return Err(StoreError::from(other)),
            }
        };
        // The directory's entries (sled's files, created at the first open)
        // must be as durable as what the files hold.
        sync_dir(path)?;
        Ok(OpenSled {
            log: File::open(path.join("db"))?,
            db,
        })
    }
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.core.engine.path)
            .finish()
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        if let Err(e) = self.core.sync() {
            tracing::error!(error = %e, "flushing the store on close failed");
        }
    }
}

store_via_core!(SledStore);

/// How long after sled failed with an I/O error the store is first opened
/// again (see [`SledEngine::recover`]): a full disk rarely has room again
/// at once, and each try reads sled's whole log.
pub const REOPEN_FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between two tries to open the store again; each try
/// that fails doubles the wait up to this.
pub const REOPEN_MAX_WAIT: Duration = Duration::from_secs(30);

/// Space the store's file system must have free before the store is opened
/// again after an I/O error: two of sled's 512 KiB log segments. With
/// less, the open would most likely fail too, and a store closed for a
/// reopen that fails can no longer be read either.
pub const REOPEN_FREE_BYTES: u64 = 1024 * 1024;

/// An open sled database and its log file.
struct OpenSled {
    db: sled::Db,
    /// sled's log file, for the sync sled's own flush leaves out (see
    /// [`Engine::sync`] below).
    log: File,
}

/// sled under the store, opened again after an I/O error.
///
/// sled 0.34 keeps failing every write after one I/O error (its "global
/// error", cleared only when the database is opened again): a disk that
/// was full once would refuse every write until the broker restarted,
/// however much room was made. So a write or sync that fails with an I/O
/// error records the failure, and a later write or sync opens sled again
/// ([`recover`](Engine::recover)), once [`REOPEN_FIRST_WAIT`] has passed
/// and the disk has [`REOPEN_FREE_BYTES`] free, backing off up to
/// [`REOPEN_MAX_WAIT`] while it cannot. sled's recovery then reads what
/// reached the disk: every write a successful sync covered, and none, or
/// some, of those whose sync failed (their submissions were told so).
///
/// Lock order: `open` before `failure`. `open` is taken for writing only
/// to replace the database.
pub(crate) struct SledEngine {
    /// The database: `None` only after it was closed to be opened again
    /// and that open failed, until one succeeds (reads and writes fail
    /// meanwhile with the error that keeps it closed).
    open: RwLock<Option<OpenSled>>,
    path: PathBuf,
    /// The blob files (sled's values too large for the log, one file each,
    /// named by id) known synced. Locked only by `sync`.
    synced_blobs: Mutex<HashSet<u64>>,
    /// Set by an I/O error of sled's: what failed and when to try to open
    /// it again.
    failure: Mutex<Option<Failure>>,
}

/// A lasting failure of sled's, until the store is opened again.
struct Failure {
    /// What every read or write answers while the database is closed.
    error: StoreError,
    /// When to try to open it again.
    retry_at: Instant,
    /// The wait after the next try, if that fails.
    backoff: Duration,
}

impl SledEngine {
    /// Runs `f` on the open database; fails with what keeps it closed, if
    /// it is.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&OpenSled) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let open = self.open.read();
        match open.as_ref() {
            Some(opened) => f(opened),
            None => Err(self.failure_error()),
        }
    }

    /// The error of the failure that closed the database.
    fn failure_error(&self) -> StoreError {
        self.failure.lock().as_ref().map_or_else(
            || StoreError::Engine("the store is closed".into()),
            |f| f.error.clone(),
        )
    }

    /// Runs a write or sync `f`, recording an I/O error it fails with:
    /// sled fails every later write until it is opened again.
    fn writing<T>(
        &self,
        f: impl FnOnce(&OpenSled) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.with_db(f);
        if let Err(error @ StoreError::Io(_)) = &result {
            let mut failure = self.failure.lock();
            if failure.is_none() {
                tracing::error!(%error, "the store failed: it is opened again once the disk has room, to take writes again");
                *failure = Some(Failure {
                    error: error.clone(),
                    retry_at: Instant::now() + REOPEN_FIRST_WAIT,
                    backoff: REOPEN_FIRST_WAIT,
                });
            }
        }
        result
    }

    /// Syncs the blob files sled wrote since the last sync, then the blob
    /// directory (their entries). sled writes a blob file without syncing
    /// it or its directory. Ids are not taken in order (a blob is written
    /// when its page is reserved), so every file not yet synced is, not
    /// just the ones above a mark. Returns how many files it synced.
    fn sync_new_blobs(&self) -> io::Result<usize> {
        let dir = self.path.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced_blobs.lock();
        let mut present = HashSet::with_capacity(synced.len());
        let mut added = 0;
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            present.insert(id);
            if synced.contains(&id) {
                continue;
            }
            match File::open(entry.path()) {
                Ok(file) => file.sync_data()?,
                // Removed since the listing: its page was rewritten.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            added += 1;
        }
        if added > 0 {
            sync_dir(&dir)?;
        }
        // Forget the files sled has removed.
        *synced = present;
        Ok(added)
    }
}

/// Makes a directory's entries durable (fsync on the directory).
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

impl Engine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|o| Ok(o.db.get(key)?.map(|v| v.to_vec())))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        self.with_db(|o| Ok(o.db.contains_key(key)?))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        self.with_db(|o| {
            let mut out = Vec::new();
            for item in o.db.range::<&[u8], _>((start, Bound::Unbounded)) {
                let (k, v) = item?;
                if !k.starts_with(prefix) || out.len() == limit {
                    break;
                }
                out.push((k.to_vec(), v.to_vec()));
            }
            Ok(out)
        })
    }

    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|o| match o.db.scan_prefix(prefix).next_back() {
            Some(item) => Ok(Some(item?.0.to_vec())),
            None => Ok(None),
        })
    }

    fn write(&self, writes: Writes) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.writing(|o| Ok(o.db.apply_batch(batch)?))
    }

    /// sled's `flush` writes the log and, on Linux, waits with
    /// `sync_file_range`, which leaves out what a power loss needs: the
    /// file's new size and blocks (sled grows the log by writing past its
    /// end) and the drive's write cache. So the blobs are synced, then the
    /// log with `fdatasync`: only then is a write that `flush` covered
    /// durable, and the synced commit recorded after this true.
    fn sync(&self) -> Result<(), StoreError> {
        self.writing(|o| {
            o.db.flush()?;
            self.sync_new_blobs()?;
            o.log.sync_data()?;
            Ok(())
        })
    }

    fn disk_bytes(&self) -> Result<u64, StoreError> {
        Ok(dir_size(&self.path)?)
    }

    /// sled 0.34 has no on-demand compaction: its segment cleaner rewrites
    /// fragmented segments in the background as writes go on. A flush makes
    /// the cleaner's finished work (and freed segments) visible on disk.
    fn compact(&self) -> Result<(), StoreError> {
        self.writing(|o| Ok(o.db.flush().map(|_| ())?))
    }

    /// Opens sled again after an I/O error (see [`SledEngine`]), when its
    /// wait has passed and the disk has room.
    fn recover(&self) -> Result<bool, StoreError> {
        {
            let failure = self.failure.lock();
            let Some(failure) = failure.as_ref() else {
                return Ok(false);
            };
            if Instant::now() < failure.retry_at {
                return Err(failure.error.clone());
            }
        }
        if free_bytes(&self.path).is_some_and(|free| free < REOPEN_FREE_BYTES) {
            return Err(self.retry_later(None));
        }
        let mut open = self.open.write();
        // sled's lock on the directory goes with the last handle of the
        // database: this one is dropped before the open waits for it.
        drop(open.take());
        match OpenSled::open(&self.path) {
            Ok(opened) => {
                *open = Some(opened);
                *self.failure.lock() = None;
                tracing::warn!(path = %self.path.display(), "the store was opened again after its failure, and takes writes again");
                Ok(true)
            }
            Err(error) => Err(self.retry_later(Some(error))),
        }
    }
}

impl SledEngine {
    /// Puts the next try to open the store again off by the failure's
    /// backoff (doubled, up to [`REOPEN_MAX_WAIT`]), with `error` as what
    /// keeps it failed if given; returns that error.
    fn retry_later(&self, error: Option<StoreError>) -> StoreError {
        let mut guard = self.failure.lock();
        let Some(failure) = guard.as_mut() else {
            return error.unwrap_or_else(|| StoreError::Engine("the store is closed".into()));
        };
        if let Some(error) = error {
            tracing::warn!(%error, retry_in = ?failure.backoff, "the store could not be opened again yet");
            failure.error = error;
        }
        failure.retry_at = Instant::now() + failure.backoff;
        failure.backoff = (failure.backoff * 2).min(REOPEN_MAX_WAIT);
        failure.error.clone()
    }
}

/// Bytes free to an unprivileged writer on the file system of `path`;
/// `None` if that cannot be told.
#[cfg(unix)]
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` a buffer of the
    // right type, which `statvfs` fills when it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: filled, as `statvfs` returned 0.
    let stat = unsafe { stat.assume_init() };
    // The fields are 32 bits wide on some targets.
    #[allow(clippy::useless_conversion)]
    let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
    Some(blocks.saturating_mul(size))
}

#[cfg(not(unix))]
pub(crate) fn free_bytes(_path: &Path) -> Option<u64> {
    None
}

/// Bytes allocated on disk to the files under `dir` (what `du` reports; sled
/// may leave sparse or preallocated segment files, so lengths would mislead).
pub(crate) fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += dir_size(&entry.path())?;
        } else {
            total += allocated(&meta);
        }
    }
    Ok(total)
}

#[cfg(unix)]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks() * 512
}

#[cfg(not(unix))]
fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Batch, MessageRecord, Store};

    /// A value too large for sled's log goes to a blob file of its own,
    /// which sled neither syncs nor records in a synced directory: the
    /// store's sync does both, once per file.
    #[test]
    fn a_sync_syncs_each_new_blob_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put_message(MessageRecord {
            id: 1,
            topic: bytes::Bytes::from_static(b"big"),
            payload: bytes::Bytes::from(vec![7u8; 512 * 1024]),
            qos: 1,
            retain: true,
            properties: bytes::Bytes::new(),
            expires_at: None,
        })
        .put_retained(crate::RetainedRecord {
            topic: "big".into(),
            message_id: 1,
        });
        store.apply(&b).unwrap();
        store.core.engine.with_db(|o| Ok(o.db.flush()?)).unwrap();
        assert!(store.core.engine.sync_new_blobs().unwrap() >= 1);
        assert_eq!(store.core.engine.sync_new_blobs().unwrap(), 0);
        store.sync().unwrap();
        drop(store);
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.message(1).unwrap().unwrap().payload.len(), 512 * 1024);
    }
}
