//! The schema version key and the upgrade rule.
//!
//! The store holds its schema version under `0x00 "schema"`. At open:
//!
//! - no version key and no data: a new store; the current version is written;
//! - no version key but data: refused ([`StoreError::NotATernStore`]);
//! - a newer version than [`SCHEMA_VERSION`]: refused
//!   ([`StoreError::NewerSchema`]), nothing is written;
//! - an older version: the migrations from that version up run in order at
//!   open, each one a single atomic write that also bumps the version key, so
//!   a crash mid-upgrade leaves a store at some valid version and the next
//!   open resumes. Every change to the key layout or value encoding bumps the
//!   version and adds its migration here; a downgrade is never supported.

use crate::encoding as enc;
use crate::engine::{Engine, Writes};
use crate::error::StoreError;
use crate::keys;

/// The schema this build reads and writes.
///
/// - 1: the first.
/// - 2: session records end with a `connected` flag (see
///   `SessionRecord::connected`). Version 1 records are valid version 2
///   records without it (read as not connected), so the upgrade only
///   bumps the version key.
/// - 3: session records end with their owner (see `SessionRecord::owner`).
///   Version 2 records are valid version 3 records without one (read as
///   none): again only the version key changes.
/// - 4: every write carries the commit number (`keys::COMMIT`, see
///   `synced_commit.rs`). A version 3 store has none, read as 0: only the
///   version key changes. The bump keeps a version 3 build away from a
///   version 4 store: writing without the commit number, it would leave the
///   store behind its witness, and the next version 4 start would report
///   the store damaged.
/// - 5: queue entries end with a trailer: their weight
///   (`QueueEntry::weight`) and the shared group they came through
///   (`QueueEntry::shared`). Version 4 entries are valid version 5 entries
///   without it (read as none; the broker reads their message to weigh
///   them): only the version key changes. The bump keeps a version 4 build, which refuses the
///   longer entries as damaged, away from a version 5 store.
/// - 6: a message referenced once has no reference count key (`keys::REFS`):
///   an absent count of a stored message is 1, no longer 0. A version 5
///   store keeps a count key for every stored message, and those remain
///   right (a key present still holds the count): only the version key
///   changes. The bump keeps a version 5 build away from a version 6 store,
///   where it would read every message referenced once as unreferenced.
pub const SCHEMA_VERSION: u32 = 6;

/// Checks the store's schema version, and unless the store is only to be
/// read (`writable` false), writes it into a new store or upgrades an
/// older one. A store only read is read as it is: an older record is a
/// valid newer one without what came later.
pub(crate) fn check_or_init<E: Engine>(engine: &E, writable: bool) -> Result<(), StoreError> {
    match engine.get(keys::SCHEMA)? {
        Some(v) => {
            let found = enc::decode_u32(keys::SCHEMA, &v)?;
            if found > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            let mut version = found;
            while writable && version < SCHEMA_VERSION {
                version = migrate(engine, version)?;
            }
            Ok(())
        }
        None => {
            if !engine.scan(&[], None, 1)?.is_empty() {
                return Err(StoreError::NotATernStore);
            }
            if !writable {
                return Ok(());
            }
            let mut w = Writes::new();
            w.insert(keys::SCHEMA.to_vec(), Some(enc::encode_u32(SCHEMA_VERSION)));
            engine.write(w)?;
            engine.sync()
        }
    }
}

/// Upgrades the store from `from` to the next version and returns it. Each
/// step writes its changes and the new version key in one atomic write.
fn migrate<E: Engine>(engine: &E, from: u32) -> Result<u32, StoreError> {
    if (1..=5).contains(&from) {
        // Nothing to rewrite (see SCHEMA_VERSION).
        let mut w = Writes::new();
        w.insert(keys::SCHEMA.to_vec(), Some(enc::encode_u32(from + 1)));
        engine.write(w)?;
        engine.sync()?;
        return Ok(from + 1);
    }
    // No schema older than 1 ever existed: version 0 is not a valid store.
    Err(StoreError::Corrupt {
        key: keys::describe(keys::SCHEMA),
        reason: if from == 0 {
            "schema version 0 does not exist"
        } else {
            "no migration for this schema version"
        },
    })
}
