//! [`SledStore::rewrite`]: compaction of a stopped broker's store by
//! copying it into fresh files.
//!
//! sled 0.34 cannot compact on demand. Its segment cleaner reclaims space
//! only as later writes go on, so a store whose live data shrank (a large
//! retained set cleared, many sessions ended) keeps its size on disk: 40 MB
//! for 0.3 MB of live data was seen after 20,000 retained messages of 1 KB
//! were set and cleared. A rewrite copies every key into a new database
//! beside the store's directory (sled's own `export`/`import`), checks the
//! copy against the original (sled's checksum of every key and value), and
//! swaps the two directories with one atomic rename (`renameat2` with
//! `RENAME_EXCHANGE`, Linux only).
//!
//! What a crash leaves: before the swap, the store as it was, and a partial
//! copy beside it, removed by the next rewrite; after it, the new store,
//! and the old one beside it. The store's lock is held throughout: the old
//! database stays open until the new one is in place, so a broker started
//! meanwhile either waits for the lock or opens the new files.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::StoreError;
use crate::sled_store::{
    dir_size, free_bytes, panic_message, sled_config, sync_dir, SledStore, LOCK_WAIT,
};
use crate::synced_commit;
use crate::Store;

/// The name the copy takes beside the store's directory: the directory's
/// own name with this appended.
pub const REWRITE_SUFFIX: &str = ".rewrite";

/// Free space a rewrite leaves on the file system at least, beyond the
/// copy (counted as twice the live data, for sled's log and its
/// snapshot): the broker and sled's own files still need room.
const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// An I/O error on `path`, saying which path.
fn at(path: &Path, e: io::Error) -> StoreError {
    StoreError::Engine(format!("{}: {e}", path.display()))
}

/// Removes what is at `path`: a directory with its contents, or a file or
/// link (not what it points to).
fn remove(path: &Path) -> Result<(), StoreError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(|e| at(path, e))
}

impl SledStore {
    /// Copies the store into fresh files, which hold only its live data,
    /// and puts them in its place (see the module documentation). Fails
    /// without a change to the store on a read-only store, when the copy
    /// does not match, or where directories cannot be swapped atomically
    /// (outside Linux).
    pub fn rewrite(&mut self) -> Result<(), StoreError> {
        if self.is_read_only() {
            return Err(StoreError::ReadOnly);
        }
        self.sync()?;
        // The real directory: a symbolic link would be swapped itself,
        // leaving the store where it was, and `data` has no parent to sync
        // but the current directory.
        let dir = fs::canonicalize(self.path()).map_err(|e| at(self.path(), e))?;
        let beside = beside(&dir)?;
        let parent = dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        if fs::symlink_metadata(&beside).is_ok() {
            // What an earlier rewrite left: a partial copy, or the old store.
            remove(&beside)?;
        }
        let stats = self.stats()?;
        let needed = stats.live_bytes.saturating_mul(2) + MIN_FREE_BYTES;
        if let Some(free) = free_bytes(&parent).filter(|&free| free < needed) {
            return Err(StoreError::Engine(format!(
                "not enough free space beside {} for its copy: {free} bytes free, about {needed} needed",
                dir.display()
            )));
        }
        let copied = self.copy_to(&beside).and_then(|()| {
            let witness = dir.join(synced_commit::FILE_NAME);
            if witness.exists() {
                fs::copy(&witness, beside.join(synced_commit::FILE_NAME))
                    .map_err(|e| at(&beside, e))?;
            }
            sync_tree(&beside).map_err(|e| at(&beside, e))?;
            dir_size(&beside).map_err(|e| at(&beside, e))
        });
        let copy_bytes = match copied {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = fs::remove_dir_all(&beside);
                return Err(e);
            }
        };
        if copy_bytes >= stats.disk_bytes {
            // Nothing to give back (a store whose data is all live): the
            // store stays as it is.
            tracing::info!(path = %dir.display(), store_bytes = stats.disk_bytes, copy_bytes, "the store's copy is no smaller: kept as it is");
            return remove(&beside);
        }
        exchange(&dir, &beside).map_err(|e| at(&beside, e))?;
        sync_dir(&parent).map_err(|e| at(&parent, e))?;
        // The new files are the store now; the old ones, beside it, are
        // dropped with the handle that still holds them.
        let fresh = SledStore::open(&dir)?;
        drop(std::mem::replace(self, fresh));
        if wait_unlocked(&beside.join("db")) {
            if let Err(e) = fs::remove_dir_all(&beside) {
                tracing::warn!(path = %beside.display(), error = %e, "the store was rewritten, but its old files could not be removed");
            }
        }
        Ok(())
    }

    /// Writes a copy of the database into the new directory `to` and checks
    /// it: the same keys and values, by sled's checksum of them all. The
    /// copy is closed (its lock released) when this returns.
    fn copy_to(&self, to: &Path) -> Result<(), StoreError> {
        let copied = self.with_sled(|db| {
            let copy = sled_config(to).open()?;
            // sled's export and import panic on an I/O error (a full disk).
            let imported = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                copy.import(db.export());
            }));
            if let Err(panic) = imported {
                return Err(StoreError::Engine(format!(
                    "copying the store into {} failed: {}",
                    to.display(),
                    panic_message(panic.as_ref())
                )));
            }
            copy.flush()?;
            let (original, copied) = (db.checksum()?, copy.checksum()?);
            if original != copied {
                return Err(StoreError::Engine(format!(
                    "the copy of the store does not match it (checksum {copied:08x}, not {original:08x})"
                )));
            }
            Ok(())
        });
        if !wait_unlocked(&to.join("db")) {
            return Err(StoreError::Locked {
                path: to.to_path_buf(),
            });
        }
        copied
    }
}

/// Where the copy of the store in `dir` is written: beside it, on the same
/// file system, so that the two can be swapped by a rename.
fn beside(dir: &Path) -> Result<PathBuf, StoreError> {
    let name = dir
        .file_name()
        .ok_or_else(|| StoreError::Engine(format!("{} names no directory", dir.display())))?;
    let mut name = name.to_os_string();
    name.push(REWRITE_SUFFIX);
    Ok(dir.with_file_name(name))
}

/// Waits up to [`LOCK_WAIT`] until nobody holds sled's lock on the database
/// file `db` (sled's I/O threads let go of it a moment after the database
/// is dropped); false if somebody still does.
#[cfg(unix)]
fn wait_unlocked(db: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        let Ok(file) = fs::File::open(db) else {
            return true;
        };
        // SAFETY: `file` is an open descriptor for the whole call; a lock
        // taken here goes with it when it is closed.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if taken || Instant::now() >= deadline {
            return taken;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(not(unix))]
fn wait_unlocked(_db: &Path) -> bool {
    true
}

/// Swaps the directories `a` and `b` in one atomic rename.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let swapped = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if swapped == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "rewriting the store needs an atomic swap of two directories (Linux)",
    ))
}

/// Syncs every file under `dir`, then the directories themselves.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}
