//! The key layout: every record kind lives in one keyspace (one sled tree)
//! under its own one-byte prefix, so one engine batch covers any mix of
//! records and is atomic.
//!
//! | prefix | key | value |
//! | --- | --- | --- |
//! | `0x00` | `0x00 "schema"` | schema version, `u32` big-endian |
//! | `0x00` | `0x00 "commit"` | commit number of the last write, `u64` (see `synced_commit.rs`) |
//! | `S` | `S client_id` | session |
//! | `U` | `U len16 client_id filter` | subscription |
//! | `Q` | `Q len16 client_id seq64` | queue entry |
//! | `I` | `I len16 client_id packet_id16` | (empty): incoming QoS 2 id |
//! | `M` | `M id64` | message |
//! | `R` | `R id64` | reference count of message `id`, `u32`, when 2 or more (absent: 1 for a stored message) |
//! | `T` | `T topic` | retained: message id |
//!
//! Integers are big-endian so byte order is numeric order: queue entries of
//! a client iterate in `seq` order, messages in id order. A client id is
//! length-prefixed (`len16`) so that one client's prefix never matches
//! another's ("a" vs "ab").

use std::sync::Arc;

use crate::error::StoreError;

pub(crate) const SCHEMA: &[u8] = b"\x00schema";
pub(crate) const COMMIT: &[u8] = b"\x00commit";
pub(crate) const SESSION: u8 = b'S';
pub(crate) const SUBSCRIPTION: u8 = b'U';
pub(crate) const QUEUE: u8 = b'Q';
pub(crate) const INCOMING: u8 = b'I';
pub(crate) const MESSAGE: u8 = b'M';
pub(crate) const REFS: u8 = b'R';
pub(crate) const RETAINED: u8 = b'T';

/// `prefix len16 client_id`: the start of every per-client key.
pub(crate) fn client_prefix(kind: u8, client_id: &str) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(client_id.len()).map_err(|_| {
        StoreError::InvalidBatch(format!(
            "client id of {} bytes is longer than MQTT allows",
            client_id.len()
        ))
    })?;
    let mut k = Vec::with_capacity(3 + client_id.len() + 8);
    k.push(kind);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(client_id.as_bytes());
    Ok(k)
}

pub(crate) fn session(client_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + client_id.len());
    k.push(SESSION);
    k.extend_from_slice(client_id.as_bytes());
    k
}

pub(crate) fn subscription(client_id: &str, filter: &str) -> Result<Vec<u8>, StoreError> {
    let mut k = client_prefix(SUBSCRIPTION, client_id)?;
    k.extend_from_slice(filter.as_bytes());
    Ok(k)
}

pub(crate) fn queue(client_id: &str, seq: u64) -> Result<Vec<u8>, StoreError> {
    let mut k = client_prefix(QUEUE, client_id)?;
    k.extend_from_slice(&seq.to_be_bytes());
    Ok(k)
}

pub(crate) fn incoming(client_id: &str, packet_id: u16) -> Result<Vec<u8>, StoreError> {
    let mut k = client_prefix(INCOMING, client_id)?;
    k.extend_from_slice(&packet_id.to_be_bytes());
    Ok(k)
}

pub(crate) fn message(id: u64) -> [u8; 9] {
    let mut k = [MESSAGE; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn refs(id: u64) -> [u8; 9] {
    let mut k = [REFS; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(crate) fn retained(topic: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + topic.len());
    k.push(RETAINED);
    k.extend_from_slice(topic.as_bytes());
    k
}

/// The text after a one-byte prefix (session and retained keys).
pub(crate) fn text_after(key: &[u8], skip: usize) -> Result<String, StoreError> {
    String::from_utf8(key.get(skip..).unwrap_or_default().to_vec())
        .map_err(|_| StoreError::corrupt(key, "key is not UTF-8"))
}

/// Splits a per-client key into (client id, rest).
pub(crate) fn split_client(key: &[u8]) -> Result<(Arc<str>, &[u8]), StoreError> {
    let bad = || StoreError::corrupt(key, "truncated per-client key");
    let len = usize::from(u16::from_be_bytes(
        key.get(1..3)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ));
    let id = key.get(3..3 + len).ok_or_else(bad)?;
    let id =
        std::str::from_utf8(id).map_err(|_| StoreError::corrupt(key, "client id is not UTF-8"))?;
    Ok((Arc::from(id), &key[3 + len..]))
}

/// The big-endian `u64` at the end of a key (message id, queue seq).
pub(crate) fn trailing_u64(key: &[u8]) -> Result<u64, StoreError> {
    let at = key
        .len()
        .checked_sub(8)
        .ok_or_else(|| StoreError::corrupt(key, "key too short"))?;
    Ok(u64::from_be_bytes(key[at..].try_into().expect("8 bytes")))
}

/// A printable form of a key for error messages.
pub(crate) fn describe(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
