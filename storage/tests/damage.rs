//! A store that lost writes it had synced (damage in the middle of sled's
//! log, which sled's recovery takes for the torn end of a crash and stops
//! at) is refused at open, not served silently shorter; accepting the
//! damage opens it with what it holds, once; inspecting it opens it
//! read-only and leaves it refused.

mod common;

use std::path::Path;

use common::{entry, message};
use tern_storage::{Batch, OnDamage, SledStore, Store, StoreError};

const WITNESS: &str = "synced-commit";

/// Applies one batch (a message and its queue entry) and syncs it.
fn put_synced(store: &SledStore, id: u64) {
    put(store, id);
    store.sync().unwrap();
}

/// Applies one batch: message `id` and its queue entry.
fn put(store: &SledStore, id: u64) {
    let mut b = Batch::new();
    b.put_message(message(id, 200))
        .put_queue_entry(entry("c", id, id));
    store.apply(&b).unwrap();
}

/// A store in `dir` with writes 1 to `writes`, synced after every
/// `sync_every`-th.
fn fill(dir: &Path, writes: u64, sync_every: u64) {
    let store = SledStore::open(dir).unwrap();
    for id in 1..=writes {
        put(&store, id);
        if id % sync_every == 0 {
            store.sync().unwrap();
        }
    }
}

fn queued(store: &SledStore) -> Vec<u64> {
    store.queue("c", None).map(|e| e.unwrap().seq).collect()
}

/// Copies every file of sled's (not the witness) from `from` to `to`,
/// after removing sled's files from `to`.
fn replace_engine_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(to).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == WITNESS {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    copy_tree(from, to, true);
}

fn copy_tree(from: &Path, to: &Path, skip_witness: bool) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if skip_witness && name == WITNESS {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &to.join(name), false);
        } else {
            std::fs::copy(&path, to.join(name)).unwrap();
        }
    }
}

#[test]
fn a_store_that_lost_synced_writes_is_refused_until_the_loss_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let early = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = SledStore::open(&data).unwrap();
        put_synced(&store, 1);
    }
    // The engine's files as they were after the first write.
    copy_tree(&data, early.path(), true);
    {
        let store = SledStore::open(&data).unwrap();
        for id in 2..=5 {
            put_synced(&store, id);
        }
        assert_eq!(queued(&store), [1, 2, 3, 4, 5]);
    }
    // The engine comes back holding only the first write, as when its
    // recovery stopped at damage right after it.
    replace_engine_files(early.path(), &data);

    match SledStore::open(&data) {
        Err(StoreError::Damaged { synced, found, .. }) => {
            assert_eq!((synced, found), (5, 1));
        }
        other => panic!("a store missing synced writes opened as {other:?}"),
    }
    // Refusing changed nothing: it is refused again.
    assert!(matches!(
        SledStore::open(&data),
        Err(StoreError::Damaged { .. })
    ));

    let witness = std::fs::read(data.join(WITNESS)).unwrap();
    {
        // Opened to look at: what it holds can be read, nothing written,
        // and the damage is still reported after.
        let store = SledStore::open_with(&data, OnDamage::Inspect).unwrap();
        assert_eq!(queued(&store), [1]);
        let mut b = Batch::new();
        b.delete_session("c");
        assert!(matches!(store.apply(&b), Err(StoreError::ReadOnly)));
        assert!(matches!(store.compact(), Err(StoreError::ReadOnly)));
        store.sync().unwrap();
    }
    assert_eq!(std::fs::read(data.join(WITNESS)).unwrap(), witness);
    assert!(matches!(
        SledStore::open(&data),
        Err(StoreError::Damaged { .. })
    ));

    {
        let store = SledStore::open_with(&data, OnDamage::Accept).unwrap();
        assert_eq!(queued(&store), [1]);
        put_synced(&store, 6);
    }
    // Accepted once: what the store holds is the new reference.
    let store = SledStore::open(&data).unwrap();
    assert_eq!(queued(&store), [1, 6]);
}

#[test]
fn an_emptied_store_directory_with_its_witness_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = SledStore::open(&data).unwrap();
        put_synced(&store, 1);
        put_synced(&store, 2);
    }
    // Every engine file gone (as when recovery found nothing readable): a
    // fresh empty store must not be taken for a new one.
    let empty = tempfile::tempdir().unwrap();
    replace_engine_files(empty.path(), &data);
    match SledStore::open(&data) {
        Err(StoreError::Damaged { synced, found, .. }) => assert_eq!((synced, found), (2, 0)),
        other => panic!("an emptied store opened as {other:?}"),
    }
}

#[test]
fn a_store_closed_after_unsynced_writes_opens_with_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        put_synced(&store, 1);
        let mut b = Batch::new();
        b.put_message(message(2, 10))
            .put_queue_entry(entry("c", 2, 2));
        store.apply(&b).unwrap();
    }
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(queued(&store), [1, 2]);
}

/// Real damage: bytes inverted in the middle of sled's log. The store must
/// either be refused (damaged or corrupt) or hold every synced write.
/// (`damage_anywhere_in_the_log_is_refused_or_harmless` tries many places.)
#[test]
fn bytes_damaged_in_the_middle_of_the_log_are_never_served_silently() {
    const WRITES: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), WRITES, 1);
    let log = dir.path().join("db");
    let mut bytes = std::fs::read(&log).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).unwrap();
    for b in &mut bytes[used / 2..used / 2 + 4] {
        *b ^= 0xFF;
    }
    std::fs::write(&log, &bytes).unwrap();

    match SledStore::open(dir.path()) {
        Err(StoreError::Damaged { synced, found, .. }) => {
            assert_eq!(synced, WRITES);
            assert!(found < WRITES);
        }
        Err(StoreError::Corrupt { .. }) => {}
        Err(other) => panic!("unexpected error: {other}"),
        Ok(store) => {
            let n = queued(&store).len() as u64;
            assert_eq!(
                n, WRITES,
                "the damaged store was served holding {n} of {WRITES} writes"
            );
        }
    }
}

/// 16 bytes inverted at each twentieth of sled's log in turn. At every
/// place the open either refuses the store with an error (sled's own panics
/// on damage included: they must not unwind out of `open`) or gives a store
/// that holds every write and every message they reference. Which places
/// give which depends on sled's layout; none may give a panic or a store
/// that is silently shorter.
#[test]
fn damage_anywhere_in_the_log_is_refused_or_harmless() {
    const WRITES: u64 = 3000;
    let pristine = tempfile::tempdir().unwrap();
    fill(pristine.path(), WRITES, 10);
    let log = std::fs::read(pristine.path().join("db")).unwrap();
    let used = log.iter().rposition(|&b| b != 0).unwrap();
    let mut outcomes = Vec::new();
    for twentieth in 1..20 {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(pristine.path(), dir.path(), false);
        let mut damaged = log.clone();
        let at = used * twentieth / 20;
        for b in &mut damaged[at..at + 16] {
            *b ^= 0xFF;
        }
        std::fs::write(dir.path().join("db"), &damaged).unwrap();
        let opened = std::panic::catch_unwind(|| SledStore::open(dir.path()));
        let outcome = match opened {
            Err(_) => panic!("opening the store damaged at {at} of {used} panicked"),
            Ok(Err(StoreError::Damaged { .. })) => "damaged",
            Ok(Err(StoreError::Unreadable { .. })) => "unreadable",
            Ok(Err(StoreError::Corrupt { .. })) => "corrupt",
            Ok(Err(other)) => panic!("unexpected error: {other}"),
            Ok(Ok(store)) => {
                assert_eq!(
                    queued(&store).len() as u64,
                    WRITES,
                    "damaged at {at} of {used}"
                );
                for id in 1..=WRITES {
                    assert!(
                        store.message(id).unwrap().is_some(),
                        "damaged at {at} of {used}: message {id} is gone"
                    );
                }
                "harmless"
            }
        };
        outcomes.push(outcome);
    }
    // The refusals this test is about do happen.
    assert!(outcomes.contains(&"damaged"), "{outcomes:?}");
    assert!(outcomes.contains(&"unreadable"), "{outcomes:?}");
}
