//! Record builders shared by the integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use tern_storage::{
    DeliveryState, MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SubscriptionRecord,
    WillRecord,
};

pub fn session(client_id: &str) -> SessionRecord {
    SessionRecord {
        client_id: client_id.into(),
        protocol_level: 5,
        expiry_interval: 3600,
        will: Some(WillRecord {
            topic: Bytes::from_static(b"clients/gone"),
            payload: Bytes::from(format!("{client_id} left")),
            qos: 1,
            retain: true,
            delay_interval: 30,
            properties: Bytes::from_static(&[0x01, 0x01]),
        }),
        created_at: 1_700_000_000,
        last_seen: 1_700_000_100,
        connected: false,
        owner: Some("ops".into()),
    }
}

pub fn subscription(client_id: &str, filter: &str) -> SubscriptionRecord {
    SubscriptionRecord {
        client_id: client_id.into(),
        filter: filter.into(),
        qos: 2,
        no_local: true,
        retain_as_published: false,
        retain_handling: 2,
        subscription_id: Some(42),
    }
}

pub fn message(id: u64, payload_len: usize) -> MessageRecord {
    MessageRecord {
        id,
        topic: Bytes::from(format!("sensors/{id}")),
        payload: Bytes::from(vec![(id % 251) as u8; payload_len]),
        qos: 1,
        retain: false,
        properties: Bytes::from_static(&[0x02, 0, 0, 0, 60]),
        expires_at: Some(1_700_000_000_000 + id),
    }
}

pub fn entry(client_id: &str, seq: u64, message_id: u64) -> QueueEntry {
    QueueEntry {
        client_id: client_id.into(),
        seq,
        message_id,
        qos: 1,
        packet_id: None,
        state: DeliveryState::Pending,
        dup: false,
        retain: true,
        subscription_ids: vec![7, 9],
        weight: Some(1000 + message_id as u32),
        shared: None,
    }
}

pub fn retained(topic: &str, message_id: u64) -> RetainedRecord {
    RetainedRecord {
        topic: topic.into(),
        message_id,
    }
}

/// Opens the store's directory with sled itself, to write what another
/// version of Tern would have written or to read what this one left.
///
/// sled lets go of a directory's file lock a moment after the last `Db` on
/// it is dropped (its I/O threads hold it), so an open straight after a
/// store was dropped waits for the lock, as [`tern_storage::SledStore::open`] does.
pub fn raw_sled(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + tern_storage::LOCK_WAIT;
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening {} with sled: {e}", path.display()),
        }
    }
}
