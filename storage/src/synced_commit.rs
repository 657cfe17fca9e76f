//! [`SyncedCommit`]: a record, outside the store's own files, of how far the
//! store is known to be durable, so that damage which silently shortens the
//! store is found at the next start.
//!
//! # Why
//!
//! sled replays its log at start-up and stops at the first record that fails
//! its checksum. After a crash that record is the torn tail of the last write
//! and stopping there is right. But a few damaged bytes in the *middle* of the
//! log (a bad sector, a stray write) look exactly the same to it: it stops
//! there, drops every later record and opens without a word, losing
//! acknowledged messages. Only a witness kept apart from the log can tell the
//! two cases apart.
//!
//! # How
//!
//! Every write the store applies carries a **commit number** (key
//! `0x00 "commit"`, one more per write, in the same atomic write). After each
//! successful sync, the number of the last write applied before the sync
//! began is written to the file `synced-commit` in the store's directory:
//! every write up to it is durable. At open, a store whose commit number is
//! lower than the file's has lost writes that were durable: it is damaged.
//!
//! The file is written in place and not synced itself: after a power loss
//! it may be older than the store (which only makes the check weaker, never
//! wrong), and it can never be newer, because it is written after the sync
//! it reports returned, and that sync ends with an `fdatasync` of the log
//! (`SledEngine::sync`; sled's own flush, `sync_file_range` on Linux, would
//! leave the log's new size and the drive's cache behind). Its 16 bytes are the number and its bitwise complement, so a
//! torn or foreign file reads as absent rather than as a false alarm.
//!
//! # What it cannot see
//!
//! sled replays older log segments differently: a bad record near the end
//! of one ends that segment's replay and sled goes on with the next. The
//! newest commit number survives, so writes lost that way pass the check.
//! Other damage makes sled panic as it recovers; `SledStore::open` reports
//! that as [`StoreError::Unreadable`](crate::StoreError::Unreadable).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// The file's name in the store's directory.
pub(crate) const FILE_NAME: &str = "synced-commit";

/// The open witness file and the highest number written to it.
pub(crate) struct SyncedCommit {
    path: PathBuf,
    /// Locked only to write the file (one positioned write, no sync), never
    /// across an await.
    state: Mutex<State>,
}

struct State {
    file: File,
    /// The number the file holds.
    held: u64,
    /// The last write of the file failed (and was logged).
    failing: bool,
}

impl SyncedCommit {
    /// Opens (or creates) the witness in `dir` and returns it with the
    /// number it holds (`None`: no file yet, or one that is not a witness).
    pub(crate) fn open(dir: &Path) -> io::Result<(SyncedCommit, Option<u64>)> {
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::with_capacity(16);
        file.by_ref().take(17).read_to_end(&mut bytes)?;
        let held = decode(&bytes);
        if held.is_none() {
            // Empty, torn or foreign: start it afresh at 16 bytes.
            file.set_len(0)?;
        }
        let witness = SyncedCommit {
            path,
            state: Mutex::new(State {
                file,
                held: held.unwrap_or(0),
                failing: false,
            }),
        };
        Ok((witness, held))
    }

    /// The number the witness in `dir` holds, read without opening it for
    /// writing (`None`: no file, or one that is not a witness), for a store
    /// opened only to be read.
    pub(crate) fn read(dir: &Path) -> io::Result<Option<u64>> {
        let mut bytes = Vec::with_capacity(16);
        match File::open(dir.join(FILE_NAME)) {
            Ok(file) => file.take(17).read_to_end(&mut bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(decode(&bytes))
    }

    /// The number the file holds: every write up to it was durable.
    pub(crate) fn held(&self) -> u64 {
        self.state.lock().held
    }

    /// Records that every write up to `commit` is durable. A number not
    /// above the one held is ignored (two syncs may finish out of order).
    ///
    /// A failure is logged (once until it works again), not returned: the
    /// store itself is fine, only the check at the next start is weaker.
    pub(crate) fn record(&self, commit: u64) {
        let mut state = self.state.lock();
        if commit <= state.held {
            return;
        }
        match write_at_start(&state.file, &encode(commit)) {
            Ok(()) => {
                state.held = commit;
                if std::mem::take(&mut state.failing) {
                    tracing::info!(path = %self.path.display(), "recording the synced commit works again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut state.failing, true) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "could not record the synced commit: damage to the store may go unnoticed at the next start"
                    );
                }
            }
        }
    }

    /// Sets the witness to `commit` even when it is lower, and syncs it:
    /// used when a damaged store is accepted as it is, so that the next
    /// start checks against what the store holds now.
    pub(crate) fn reset(&self, commit: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        write_at_start(&state.file, &encode(commit))?;
        state.file.sync_all()?;
        state.held = commit;
        Ok(())
    }
}

fn encode(commit: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&commit.to_be_bytes());
    out[8..].copy_from_slice(&(!commit).to_be_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<u64> {
    let bytes: &[u8; 16] = bytes.try_into().ok()?;
    let commit = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    let check = u64::from_be_bytes(bytes[8..].try_into().expect("8 bytes"));
    (check == !commit).then_some(commit)
}

#[cfg(unix)]
fn write_at_start(file: &File, bytes: &[u8; 16]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, 0)
}

#[cfg(not(unix))]
fn write_at_start(mut file: &File, bytes: &[u8; 16]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(0))?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_comes_back_and_only_rises() {
        let dir = tempfile::tempdir().unwrap();
        let (w, held) = SyncedCommit::open(dir.path()).unwrap();
        assert_eq!(held, None);
        w.record(7);
        w.record(5);
        drop(w);
        let (w, held) = SyncedCommit::open(dir.path()).unwrap();
        assert_eq!(held, Some(7));
        w.reset(3).unwrap();
        drop(w);
        assert_eq!(SyncedCommit::open(dir.path()).unwrap().1, Some(3));
    }

    #[test]
    fn a_torn_or_foreign_file_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut torn = encode(1 << 40);
        torn[3] ^= 0xFF;
        for bytes in [&torn[..], &encode(9)[..8], b"hello, world, this is long"] {
            std::fs::write(&path, bytes).unwrap();
            let (w, held) = SyncedCommit::open(dir.path()).unwrap();
            assert_eq!(held, None);
            w.record(2);
            drop(w);
            assert_eq!(SyncedCommit::open(dir.path()).unwrap().1, Some(2));
        }
    }
}
