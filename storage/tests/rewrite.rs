//! `SledStore::rewrite`: a store whose live data shrank gives the space
//! back, keeps every record, and stays a store that opens undamaged.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{message, retained};
use tern_storage::{Batch, SledStore, Store, REWRITE_SUFFIX};

/// A directory of its own under the system's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("tern-rewrite-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    root
}

fn beside(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap().to_os_string();
    name.push(REWRITE_SUFFIX);
    dir.with_file_name(name)
}

/// Retained message `id` (2 KiB) on topic `t/{id}`.
fn put_retained(batch: &mut Batch, id: u64) {
    let mut m = message(id, 2048);
    m.topic = format!("t/{id}").into();
    batch
        .put_message(m)
        .put_retained(retained(&format!("t/{id}"), id));
}

/// A store in `dir` that held 4,000 retained messages of 2 KiB and keeps
/// the first 10; synced.
fn bloated_store(dir: &Path) -> SledStore {
    let store = SledStore::open(dir).unwrap();
    for first in (1..=4000u64).step_by(500) {
        let mut batch = Batch::new();
        for id in first..first + 500 {
            put_retained(&mut batch, id);
        }
        store.apply(&batch).unwrap();
    }
    let mut batch = Batch::new();
    for id in 11..=4000u64 {
        batch.delete_retained(format!("t/{id}"));
    }
    store.apply(&batch).unwrap();
    store.sync().unwrap();
    store
}

/// A store in `dir` holding retained message 1, all of it live.
fn store_of_one(dir: &Path) -> SledStore {
    let store = SledStore::open(dir).unwrap();
    let mut batch = Batch::new();
    put_retained(&mut batch, 1);
    store.apply(&batch).unwrap();
    store
}

#[test]
fn a_rewrite_gives_back_the_space_of_what_was_deleted() {
    let root = scratch("space");
    let dir = root.join("data");
    let mut store = bloated_store(&dir);
    let before = store.stats().unwrap();

    store.rewrite().unwrap();
    let after = store.stats().unwrap();
    assert!(
        after.disk_bytes * 4 < before.disk_bytes,
        "{} bytes on disk before, {} after",
        before.disk_bytes,
        after.disk_bytes
    );
    assert_eq!(
        (after.keys, after.live_bytes, after.retained, after.messages),
        (before.keys, before.live_bytes, 10, 10)
    );
    for id in 1..=10u64 {
        let kept = store.message(id).unwrap().expect("kept");
        assert_eq!(kept, {
            let mut m = message(id, 2048);
            m.topic = format!("t/{id}").into();
            m
        });
    }
    assert!(!beside(&dir).exists(), "the old files are left beside it");

    // It takes writes, and a restart finds them: the record of the last
    // synced commit came along, so the store opens as undamaged.
    let mut batch = Batch::new();
    put_retained(&mut batch, 5000);
    store.apply(&batch).unwrap();
    store.sync().unwrap();
    drop(store);
    let store = SledStore::open(&dir).unwrap();
    assert_eq!(store.stats().unwrap().retained, 11);
    assert!(store.message(5000).unwrap().is_some());
    drop(store);
    let _ = fs::remove_dir_all(&root);
}

#[test]
fn a_rewrite_replaces_what_an_interrupted_one_left() {
    let root = scratch("left");
    let dir = root.join("data");
    let mut store = store_of_one(&dir);
    let left = beside(&dir);
    fs::create_dir_all(left.join("blobs")).unwrap();
    fs::write(left.join("db"), b"half a copy").unwrap();

    store.rewrite().unwrap();
    assert!(store.message(1).unwrap().is_some());
    assert!(!left.exists());
    drop(store);
    let _ = fs::remove_dir_all(&root);
}

/// A store reached through a symbolic link is rewritten where it is: the
/// link stays a link, and the space comes back in its target.
#[cfg(unix)]
#[test]
fn a_store_reached_through_a_link_is_rewritten_where_it_is() {
    let root = scratch("link");
    let real = root.join("real");
    let link = root.join("link");
    drop(bloated_store(&real));
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut store = SledStore::open(&link).unwrap();
    let before = store.stats().unwrap();
    store.rewrite().unwrap();
    drop(store);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let store = SledStore::open(&real).unwrap();
    let after = store.stats().unwrap();
    assert!(after.disk_bytes * 4 < before.disk_bytes, "{after:?}");
    assert_eq!(after.retained, 10);
    assert!(!beside(&real).exists() && !beside(&link).exists());
    drop(store);
    let _ = fs::remove_dir_all(&root);
}

/// A store whose data is all live has nothing to give back: its copy is
/// no smaller, and the store stays as it is, same files.
#[cfg(unix)]
#[test]
fn a_store_with_nothing_to_give_back_stays_as_it_is() {
    use std::os::unix::fs::MetadataExt;
    let root = scratch("dense");
    let dir = root.join("data");
    let mut store = store_of_one(&dir);
    let inode = fs::metadata(&dir).unwrap().ino();
    store.rewrite().unwrap();
    assert_eq!(fs::metadata(&dir).unwrap().ino(), inode);
    assert!(store.message(1).unwrap().is_some());
    assert!(!beside(&dir).exists());
    drop(store);
    let _ = fs::remove_dir_all(&root);
}
