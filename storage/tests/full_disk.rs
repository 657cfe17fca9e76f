//! A store whose disk filled takes writes again once there is room, without
//! a restart.
//!
//! sled 0.34 fails every write after one I/O error until the database is
//! opened again; the store does that itself (`SledEngine::recover`). The
//! disk is filled here with the file size limit of this process
//! (`RLIMIT_FSIZE`): a write past it fails as one on a full disk does (with
//! `EFBIG` rather than `ENOSPC`), and raising the limit again makes room.
//! The limit is the whole process's, so this file holds one test.

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_storage::{Batch, MessageRecord, RetainedRecord, SledStore, Store, REOPEN_FIRST_WAIT};

/// A retained message of 4 KiB, stored with id `id`.
fn retained(id: u64) -> Batch {
    let mut batch = Batch::new();
    batch
        .put_message(MessageRecord {
            id,
            topic: Bytes::from(format!("t/{id}")),
            payload: Bytes::from(vec![(id % 251) as u8; 4096]),
            qos: 1,
            retain: true,
            properties: Bytes::new(),
            expires_at: None,
        })
        .put_retained(RetainedRecord {
            topic: format!("t/{id}"),
            message_id: id,
        });
    batch
}

/// Applies and syncs, as the writer does before an acknowledgement.
fn store_durably(store: &SledStore, id: u64) -> Result<(), tern_storage::StoreError> {
    store.apply(&retained(id))?;
    store.sync()
}

fn set_file_size_limit(bytes: libc::rlim_t) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit), 0);
        limit.rlim_cur = bytes.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

fn holds(store: &SledStore, id: u64) -> bool {
    store
        .message(id)
        .unwrap()
        .is_some_and(|m| m.payload.len() == 4096 && m.payload[0] == (id % 251) as u8)
}

#[test]
fn a_store_that_filled_its_disk_takes_writes_again_once_there_is_room() {
    // SAFETY: ignoring SIGXFSZ makes a write past the limit fail with EFBIG
    // instead of ending the process.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    set_file_size_limit(4 * 1024 * 1024);
    let mut durable = Vec::new();
    let mut id = 1;
    let error = loop {
        assert!(id < 10_000, "4 MiB of files never filled");
        match store_durably(&store, id) {
            Ok(()) => durable.push(id),
            Err(e) => break e,
        }
        id += 1;
    };
    assert!(matches!(error, tern_storage::StoreError::Io(_)), "{error}");
    assert!(
        durable.len() > 100,
        "{} stored before the disk filled",
        durable.len()
    );
    // Still full: writes keep failing.
    id += 1;
    assert!(store_durably(&store, id).is_err());
    // Room again: the store opens itself again and takes writes, without a
    // restart.
    set_file_size_limit(libc::RLIM_INFINITY);
    std::thread::sleep(REOPEN_FIRST_WAIT);
    let deadline = Instant::now() + Duration::from_secs(10);
    id += 1;
    while let Err(e) = store_durably(&store, id) {
        assert!(Instant::now() < deadline, "still failing: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = id;
    for more in after + 1..after + 50 {
        store_durably(&store, more).unwrap();
    }
    // Everything a sync covered is there, before and after the failure, and
    // after a restart.
    for &id in &durable {
        assert!(holds(&store, id), "message {id}");
    }
    assert!((after..after + 50).all(|id| holds(&store, id)));
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert!(durable.iter().all(|&id| holds(&store, id)));
    assert!((after..after + 50).all(|id| holds(&store, id)));
}
