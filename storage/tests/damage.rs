//! A store that lost writes it had synced (damage in the middle of sled's
//! log, which sled's recovery takes for the torn end of a crash and stops
//! at) is refused at open, not served silently shorter; accepting the
//! damage opens it with what it holds, once.

mod common;

use std::path::Path;

use common::{entry, message};
use tern_storage::{Batch, OnDamage, SledStore, Store, StoreError};

const WITNESS: &str = "synced-commit";

/// Applies one batch (a message and its queue entry) and syncs it.
fn put_synced(store: &SledStore, id: u64) {
    let mut b = Batch::new();
    b.put_message(message(id, 200))
        .put_queue_entry(entry("c", id, id));
    store.apply(&b).unwrap();
    store.sync().unwrap();
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
#[test]
fn bytes_damaged_in_the_middle_of_the_log_are_never_served_silently() {
    const WRITES: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SledStore::open(dir.path()).unwrap();
        for id in 1..=WRITES {
            put_synced(&store, id);
        }
    }
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
