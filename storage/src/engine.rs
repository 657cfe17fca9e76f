//! The shared implementation of [`Store`] over an ordered key-value
//! [`Engine`]: key layout, reference counting, recovery scans and stats live
//! here once; [`SledStore`](crate::SledStore) and
//! [`MemoryStore`](crate::MemoryStore) only provide the engine.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use fxhash::FxHashMap;
use parking_lot::Mutex;

use crate::batch::{Batch, Op};
use crate::encoding as enc;
use crate::error::StoreError;
use crate::keys;
use crate::records::{
    DeliveryState, MessageRecord, QueueEntry, RetainedRecord, SessionRecord, SubscriptionRecord,
};
use crate::store::{RecordIter, SessionSummary, StoreStats};
use crate::synced_commit::SyncedCommit;
use crate::SCAN_CHUNK;

/// Pending writes of one batch: `None` deletes the key.
pub(crate) type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Key-value pairs read from an engine, in key order.
pub(crate) type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value engine with atomic multi-key writes.
pub(crate) trait Engine: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn contains(&self, key: &[u8]) -> Result<bool, StoreError>;
    /// Up to `limit` pairs whose key starts with `prefix` and is greater
    /// than `after` (when given), in key order.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs, StoreError>;
    /// The greatest key starting with `prefix`.
    fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies all writes atomically (crash-atomic for a disk engine).
    fn write(&self, writes: Writes) -> Result<(), StoreError>;
    fn sync(&self) -> Result<(), StoreError>;
    fn disk_bytes(&self) -> Result<u64, StoreError>;
    fn compact(&self) -> Result<(), StoreError>;
    /// Opens the engine again if it failed in a way that lasts until then
    /// (sled after an I/O error): returns true when it did, so that the
    /// caller reads again what it keeps of the engine's state, and the
    /// error that keeps it failed while it cannot yet. An engine that never
    /// fails so has nothing to do.
    fn recover(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// The record-level store over an engine.
pub(crate) struct Core<E> {
    pub(crate) engine: E,
    /// Serialises `apply`: reference counts are read-modify-write, so two
    /// batches must not interleave. Held only on the calling (blocking)
    /// thread, never across an await.
    apply_lock: Mutex<()>,
    /// The commit number of the last write applied (stored with it under
    /// `keys::COMMIT`). Written under `apply_lock`, after the write.
    commit: AtomicU64,
    /// Where a disk store records the commit each sync made durable.
    witness: Option<SyncedCommit>,
    /// Set for a store opened only to be read: writes fail.
    read_only: bool,
}

impl<E: Engine> Core<E> {
    /// Wraps an engine after checking (or writing) the schema version; one
    /// not `writable` is only ever read (every write fails with [`StoreError::ReadOnly`]).
    pub(crate) fn open(engine: E, writable: bool) -> Result<Core<E>, StoreError> {
        crate::schema::check_or_init(&engine, writable)?;
        let commit = stored_commit(&engine)?;
        Ok(Core {
            engine,
            apply_lock: Mutex::new(()),
            commit: AtomicU64::new(commit),
            witness: None,
            read_only: !writable,
        })
    }

    /// The commit number of the last write applied: 0 for a store never
    /// written.
    pub(crate) fn commit(&self) -> u64 {
        self.commit.load(Ordering::Acquire)
    }

    /// Opens the engine again if it failed in a way that lasts (see
    /// [`Engine::recover`]), then takes its commit number from what it
    /// holds: the writes applied since its last sync that did not reach
    /// the disk are gone (their submissions were told they failed), and a
    /// sync must not record commits the engine no longer holds. Called
    /// with `apply_lock` held.
    fn recover(&self) -> Result<(), StoreError> {
        if self.engine.recover()? {
            let found = stored_commit(&self.engine)?;
            let synced = self.witness.as_ref().map_or(0, SyncedCommit::held);
            if found < synced {
                // What a sync covered is on the disk, unless the disk
                // lost it: the same check as at open (synced_commit.rs).
                tracing::error!(
                    found,
                    synced,
                    "the store opened again after its failure holds fewer writes than were synced: the disk lost some; check it"
                );
            }
            self.commit.store(found, Ordering::Release);
        }
        Ok(())
    }

    /// From now on, every successful sync records its commit in `witness`.
    pub(crate) fn set_witness(&mut self, witness: SyncedCommit) {
        self.witness = Some(witness);
    }

    pub(crate) fn apply_all(&self, batches: &[&Batch]) -> Result<(), StoreError> {
        if batches.iter().all(|b| b.is_empty()) {
            return Ok(());
        }
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        let _guard = self.apply_lock.lock();
        self.recover()?;
        let mut tx = Tx {
            engine: &self.engine,
            writes: Writes::new(),
            counts: FxHashMap::default(),
        };
        for op in batches.iter().flat_map(|b| &b.ops) {
            tx.op(op)?;
        }
        tx.write_counts();
        let commit = self.commit() + 1;
        let mut writes = tx.writes;
        writes.insert(keys::COMMIT.to_vec(), Some(enc::encode_u64(commit)));
        self.engine.write(writes)?;
        self.commit.store(commit, Ordering::Release);
        Ok(())
    }

    /// Makes every write applied so far durable, then records the last of
    /// them in the witness: everything up to it was applied before the
    /// engine's sync began, so the sync covers it.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        if !self.read_only {
            let _guard = self.apply_lock.lock();
            self.recover()?;
        }
        let upto = self.commit();
        self.engine.sync()?;
        if let Some(witness) = &self.witness {
            witness.record(upto);
        }
        Ok(())
    }

    pub(crate) fn session(&self, client_id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let key = keys::session(client_id);
        self.engine
            .get(&key)?
            .map(|v| enc::decode_session(&key, &v))
            .transpose()
    }

    pub(crate) fn sessions(&self) -> RecordIter<'_, SessionRecord> {
        self.iter(vec![keys::SESSION], None, enc::decode_session)
    }

    pub(crate) fn subscriptions(&self, client_id: &str) -> RecordIter<'_, SubscriptionRecord> {
        match keys::client_prefix(keys::SUBSCRIPTION, client_id) {
            Ok(prefix) => self.iter(prefix, None, enc::decode_subscription),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    pub(crate) fn queue(
        &self,
        client_id: &str,
        after_seq: Option<u64>,
    ) -> RecordIter<'_, QueueEntry> {
        let start = |prefix: Vec<u8>| -> Result<_, StoreError> {
            let after = after_seq.map(|s| keys::queue(client_id, s)).transpose()?;
            Ok(self.iter(prefix, after, enc::decode_queue_entry))
        };
        match keys::client_prefix(keys::QUEUE, client_id).and_then(start) {
            Ok(it) => it,
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    pub(crate) fn incoming_qos2(&self, client_id: &str) -> Result<Vec<u16>, StoreError> {
        let prefix = keys::client_prefix(keys::INCOMING, client_id)?;
        let mut out = Vec::new();
        for (k, _) in scan_all(&self.engine, &prefix)? {
            let tail: [u8; 2] = k[prefix.len()..]
                .try_into()
                .map_err(|_| StoreError::corrupt(&k, "bad incoming QoS 2 key"))?;
            out.push(u16::from_be_bytes(tail));
        }
        Ok(out)
    }

    pub(crate) fn message(&self, id: u64) -> Result<Option<MessageRecord>, StoreError> {
        let key = keys::message(id);
        self.engine
            .get(&key)?
            .map(|v| enc::decode_message(&key, &v))
            .transpose()
    }

    /// A stored message's reference count: its `R` key, or 1 without one
    /// (see `keys.rs`); 0 for a message not stored.
    pub(crate) fn message_refs(&self, id: u64) -> Result<u32, StoreError> {
        let key = keys::refs(id);
        Ok(match self.engine.get(&key)? {
            Some(v) => enc::decode_u32(&key, &v)?,
            None => u32::from(self.engine.contains(&keys::message(id))?),
        })
    }

    pub(crate) fn last_message_id(&self) -> Result<Option<u64>, StoreError> {
        self.engine
            .last(&[keys::MESSAGE])?
            .map(|k| keys::trailing_u64(&k))
            .transpose()
    }

    pub(crate) fn last_seq(&self, client_id: &str) -> Result<Option<u64>, StoreError> {
        let prefix = keys::client_prefix(keys::QUEUE, client_id)?;
        self.engine
            .last(&prefix)?
            .map(|k| keys::trailing_u64(&k))
            .transpose()
    }

    pub(crate) fn retained(&self, topic_prefix: &str) -> RecordIter<'_, RetainedRecord> {
        self.iter(keys::retained(topic_prefix), None, |k, v| {
            Ok(RetainedRecord {
                topic: keys::text_after(k, 1)?,
                message_id: enc::decode_u64(k, v)?,
            })
        })
    }

    pub(crate) fn session_summary(
        &self,
        client_id: &str,
    ) -> Result<Option<SessionSummary>, StoreError> {
        let Some(session) = self.session(client_id)? else {
            return Ok(None);
        };
        let subscriptions = self
            .subscriptions(client_id)
            .collect::<Result<Vec<_>, _>>()?;
        let (mut queue_depth, mut inflight) = (0, 0);
        for entry in self.queue(client_id, None) {
            queue_depth += 1;
            if entry?.state != DeliveryState::Pending {
                inflight += 1;
            }
        }
        let incoming_qos2 = self.incoming_qos2(client_id)?.len() as u64;
        Ok(Some(SessionSummary {
            session,
            subscriptions,
            queue_depth,
            inflight,
            incoming_qos2,
        }))
    }

    pub(crate) fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats {
            disk_bytes: self.engine.disk_bytes()?,
            ..StoreStats::default()
        };
        let mut after: Option<Vec<u8>> = None;
        loop {
            let chunk = self.engine.scan(&[], after.as_deref(), SCAN_CHUNK)?;
            for (k, v) in &chunk {
                s.keys += 1;
                s.live_bytes += (k.len() + v.len()) as u64;
                match k.first() {
                    Some(&keys::SESSION) => s.sessions += 1,
                    Some(&keys::SUBSCRIPTION) => s.subscriptions += 1,
                    Some(&keys::MESSAGE) => s.messages += 1,
                    Some(&keys::QUEUE) => s.queue_entries += 1,
                    Some(&keys::RETAINED) => s.retained += 1,
                    _ => {}
                }
            }
            if chunk.len() < SCAN_CHUNK {
                return Ok(s);
            }
            after = chunk.into_iter().last().map(|(k, _)| k);
        }
    }

    /// Whether the store was opened only to be read.
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn compact(&self) -> Result<StoreStats, StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        self.engine.compact()?;
        self.stats()
    }

    fn iter<T: 'static>(
        &self,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        decode: fn(&[u8], &[u8]) -> Result<T, StoreError>,
    ) -> RecordIter<'_, T> {
        Box::new(PrefixIter {
            engine: &self.engine,
            prefix,
            after,
            buf: VecDeque::new(),
            done: false,
            decode,
        })
    }
}

/// The commit number of the last write `engine` holds: 0 for one never
/// written.
fn stored_commit<E: Engine>(engine: &E) -> Result<u64, StoreError> {
    match engine.get(keys::COMMIT)? {
        Some(v) => enc::decode_u64(keys::COMMIT, &v),
        None => Ok(0),
    }
}

/// Every pair under `prefix` (used for one client's keys, which are few).
fn scan_all<E: Engine + ?Sized>(engine: &E, prefix: &[u8]) -> Result<Pairs, StoreError> {
    let mut out = Vec::new();
    loop {
        let after = out.last().map(|(k, _): &(Vec<u8>, Vec<u8>)| k.clone());
        let chunk = engine.scan(prefix, after.as_deref(), SCAN_CHUNK)?;
        let n = chunk.len();
        out.extend(chunk);
        if n < SCAN_CHUNK {
            return Ok(out);
        }
    }
}

struct PrefixIter<'a, E, T> {
    engine: &'a E,
    prefix: Vec<u8>,
    after: Option<Vec<u8>>,
    buf: VecDeque<(Vec<u8>, Vec<u8>)>,
    done: bool,
    decode: fn(&[u8], &[u8]) -> Result<T, StoreError>,
}

impl<E: Engine, T> Iterator for PrefixIter<'_, E, T> {
    type Item = Result<T, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() && !self.done {
            match self
                .engine
                .scan(&self.prefix, self.after.as_deref(), SCAN_CHUNK)
            {
                Ok(chunk) => {
                    self.done = chunk.len() < SCAN_CHUNK;
                    self.after = chunk.last().map(|(k, _)| k.clone());
                    self.buf.extend(chunk);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        let (k, v) = self.buf.pop_front()?;
        Some((self.decode)(&k, &v))
    }
}

/// One window of batches being applied: reads see its own earlier writes.
///
/// Reference counts are kept here while the window is applied and written
/// once at its end ([`Tx::write_counts`]): a message referenced once has no
/// `R` key at all (see `keys.rs`), so a message stored for one subscriber
/// costs its record and its queue entry, and nothing else.
struct Tx<'a, E> {
    engine: &'a E,
    writes: Writes,
    /// The count of every message whose count was read, or that was put, in
    /// this window.
    counts: FxHashMap<u64, Count>,
}

/// A message's reference count while a window is applied.
#[derive(Debug, Clone, Copy)]
struct Count {
    /// The count now.
    now: u32,
    /// The count in the engine's `R` key, if it has one.
    keyed: Option<u32>,
    /// Whether this window put the message's record (the engine did not
    /// hold it).
    put: bool,
}

impl<E: Engine> Tx<'_, E> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.engine.get(key),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Every pair under `prefix`, the batch's writes merged over the engine.
    fn scan_all(&self, prefix: &[u8]) -> Result<Pairs, StoreError> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            scan_all(self.engine, prefix)?.into_iter().collect();
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    /// The count of a message the engine stores, read on first use: its
    /// `R` key, or 1 without one.
    fn stored_count(&mut self, id: u64) -> Result<&mut Count, StoreError> {
        use std::collections::hash_map::Entry;
        match self.counts.entry(id) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let key = keys::refs(id);
                let count = match self.engine.get(&key)? {
                    Some(v) => {
                        let n = enc::decode_u32(&key, &v)?;
                        Count {
                            now: n,
                            keyed: Some(n),
                            put: false,
                        }
                    }
                    None => Count {
                        now: 1,
                        keyed: None,
                        put: false,
                    },
                };
                Ok(e.insert(count))
            }
        }
    }

    /// Stores a message unless the engine already holds it: a record never
    /// changes once written, so putting it again would only rewrite the same
    /// bytes. A message new to the engine starts with no references.
    fn put_message(&mut self, r: &MessageRecord) -> Result<(), StoreError> {
        if self.counts.get(&r.id).is_some_and(|c| c.put) {
            return Ok(());
        }
        let key = keys::message(r.id);
        if self.engine.contains(&key)? {
            return Ok(());
        }
        self.put(key.to_vec(), enc::encode_message(r));
        // A count read before this put (a release of an entry whose message
        // was missing) is replaced: the record is new, and so are its
        // references.
        self.counts.insert(
            r.id,
            Count {
                now: 0,
                keyed: self.counts.get(&r.id).and_then(|c| c.keyed),
                put: true,
            },
        );
        Ok(())
    }

    fn acquire(&mut self, id: u64) -> Result<(), StoreError> {
        // Every record this window put has its count here already; a count
        // read by a release says nothing of whether the record exists.
        let put = self.counts.get(&id).is_some_and(|c| c.put);
        if !put && !self.engine.contains(&keys::message(id))? {
            return Err(StoreError::InvalidBatch(format!(
                "message {id} is referenced but neither stored nor put earlier in the batch"
            )));
        }
        let count = self.stored_count(id)?;
        count.now = count.now.saturating_add(1);
        Ok(())
    }

    /// Releases the reference of an entry that holds one, so the message is
    /// stored (or put in this window) and an absent `R` key means 1.
    fn release(&mut self, id: u64) -> Result<(), StoreError> {
        let count = self.stored_count(id)?;
        if count.now == 0 {
            tracing::warn!(
                message_id = id,
                "released a message reference that was not counted"
            );
        }
        count.now = count.now.saturating_sub(1);
        Ok(())
    }

    /// Writes the counts the window changed: a message left without
    /// references goes (one this window put is never written at all), a
    /// count of 1 is the absence of its `R` key, and a greater one is
    /// stored in it.
    fn write_counts(&mut self) {
        for (id, count) in std::mem::take(&mut self.counts) {
            let message = keys::message(id);
            let refs = keys::refs(id);
            match count.now {
                0 if count.put => {
                    self.writes.remove(message.as_slice());
                }
                0 => self.delete(message.to_vec()),
                1 => {}
                n => {
                    if count.keyed != Some(n) {
                        self.put(refs.to_vec(), enc::encode_u32(n));
                    }
                    continue;
                }
            }
            if count.keyed.is_some() {
                self.delete(refs.to_vec());
            }
        }
    }

    fn op(&mut self, op: &Op) -> Result<(), StoreError> {
        match op {
            Op::PutSession(r) => {
                keys::client_prefix(keys::SESSION, &r.client_id)?;
                self.put(keys::session(&r.client_id), enc::encode_session(r));
            }
            Op::DeleteSession { client_id } => {
                self.delete(keys::session(client_id));
                for kind in [keys::SUBSCRIPTION, keys::INCOMING] {
                    let prefix = keys::client_prefix(kind, client_id)?;
                    for (k, _) in self.scan_all(&prefix)? {
                        self.delete(k);
                    }
                }
                let prefix = keys::client_prefix(keys::QUEUE, client_id)?;
                for (k, v) in self.scan_all(&prefix)? {
                    let id = enc::queue_entry_message_id(&k, &v)?;
                    self.release(id)?;
                    self.delete(k);
                }
            }
            Op::PutSubscription(r) => {
                let key = keys::subscription(&r.client_id, &r.filter)?;
                self.put(key, enc::encode_subscription(r));
            }
            Op::DeleteSubscription { client_id, filter } => {
                self.delete(keys::subscription(client_id, filter)?);
            }
            Op::PutMessage(r) => self.put_message(r)?,
            Op::PutQueueEntry(r) | Op::InsertQueueEntry(r) => {
                let key = keys::queue(&r.client_id, r.seq)?;
                let old = match self.get(&key)? {
                    Some(v) => Some(enc::queue_entry_message_id(&key, &v)?),
                    None => None,
                };
                if old != Some(r.message_id) {
                    self.acquire(r.message_id)?;
                    if let Some(old) = old {
                        self.release(old)?;
                    }
                }
                self.put(key, enc::encode_queue_entry(r));
            }
            Op::DeleteQueueEntry { client_id, seq } => {
                let key = keys::queue(client_id, *seq)?;
                if let Some(v) = self.get(&key)? {
                    let id = enc::queue_entry_message_id(&key, &v)?;
                    self.release(id)?;
                    self.delete(key);
                }
            }
            Op::AddIncomingQos2 {
                client_id,
                packet_id,
            } => self.put(keys::incoming(client_id, *packet_id)?, Vec::new()),
            Op::RemoveIncomingQos2 {
                client_id,
                packet_id,
            } => self.delete(keys::incoming(client_id, *packet_id)?),
            Op::PutRetained(r) => {
                let key = keys::retained(&r.topic);
                let old = match self.get(&key)? {
                    Some(v) => Some(enc::decode_u64(&key, &v)?),
                    None => None,
                };
                if old != Some(r.message_id) {
                    self.acquire(r.message_id)?;
                    if let Some(old) = old {
                        self.release(old)?;
                    }
                }
                self.put(key, enc::encode_u64(r.message_id));
            }
            Op::DeleteRetained { topic } => {
                let key = keys::retained(topic);
                if let Some(v) = self.get(&key)? {
                    self.release(enc::decode_u64(&key, &v)?)?;
                    self.delete(key);
                }
            }
            Op::ExpireRetained { topic, message_id } => {
                let key = keys::retained(topic);
                if let Some(v) = self.get(&key)? {
                    if enc::decode_u64(&key, &v)? == *message_id {
                        self.release(*message_id)?;
                        self.delete(key);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Implements [`Store`](crate::Store) for a type with a `core: Core<_>` field.
macro_rules! store_via_core {
    ($ty:ty) => {
        impl $crate::Store for $ty {
            fn apply_all(&self, batches: &[&$crate::Batch]) -> Result<(), $crate::StoreError> {
                self.core.apply_all(batches)
            }
            fn sync(&self) -> Result<(), $crate::StoreError> {
                self.core.sync()
            }
            fn session(
                &self,
                client_id: &str,
            ) -> Result<Option<$crate::SessionRecord>, $crate::StoreError> {
                self.core.session(client_id)
            }
            fn sessions(&self) -> $crate::RecordIter<'_, $crate::SessionRecord> {
                self.core.sessions()
            }
            fn subscriptions(
                &self,
                client_id: &str,
            ) -> $crate::RecordIter<'_, $crate::SubscriptionRecord> {
                self.core.subscriptions(client_id)
            }
            fn queue(
                &self,
                client_id: &str,
                after_seq: Option<u64>,
            ) -> $crate::RecordIter<'_, $crate::QueueEntry> {
                self.core.queue(client_id, after_seq)
            }
            fn incoming_qos2(&self, client_id: &str) -> Result<Vec<u16>, $crate::StoreError> {
                self.core.incoming_qos2(client_id)
            }
            fn message(
                &self,
                id: u64,
            ) -> Result<Option<$crate::MessageRecord>, $crate::StoreError> {
                self.core.message(id)
            }
            fn message_refs(&self, id: u64) -> Result<u32, $crate::StoreError> {
                self.core.message_refs(id)
            }
            fn last_message_id(&self) -> Result<Option<u64>, $crate::StoreError> {
                self.core.last_message_id()
            }
            fn last_seq(&self, client_id: &str) -> Result<Option<u64>, $crate::StoreError> {
                self.core.last_seq(client_id)
            }
            fn retained(
                &self,
                topic_prefix: &str,
            ) -> $crate::RecordIter<'_, $crate::RetainedRecord> {
                self.core.retained(topic_prefix)
            }
            fn session_summary(
                &self,
                client_id: &str,
            ) -> Result<Option<$crate::SessionSummary>, $crate::StoreError> {
                self.core.session_summary(client_id)
            }
            fn stats(&self) -> Result<$crate::StoreStats, $crate::StoreError> {
                self.core.stats()
            }
            fn compact(&self) -> Result<$crate::StoreStats, $crate::StoreError> {
                self.core.compact()
            }
        }
    };
}
pub(crate) use store_via_core;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryEngine;
    use std::sync::atomic::AtomicBool;

    /// An engine in memory whose sync fails while `failing` is set.
    #[derive(Default)]
    struct FailingSync {
        inner: MemoryEngine,
        failing: AtomicBool,
    }

    impl Engine for FailingSync {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
            self.inner.contains(key)
        }
        fn scan(
            &self,
            prefix: &[u8],
            after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Pairs, StoreError> {
            self.inner.scan(prefix, after, limit)
        }
        fn last(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.last(prefix)
        }
        fn write(&self, writes: Writes) -> Result<(), StoreError> {
            self.inner.write(writes)
        }
        fn sync(&self) -> Result<(), StoreError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Injected("sync"));
            }
            self.inner.sync()
        }
        fn disk_bytes(&self) -> Result<u64, StoreError> {
            self.inner.disk_bytes()
        }
        fn compact(&self) -> Result<(), StoreError> {
            self.inner.compact()
        }
    }

    fn witnessed(dir: &std::path::Path) -> Option<u64> {
        SyncedCommit::open(dir).unwrap().1
    }

    /// The witness moves only after a sync succeeded, to the last write
    /// applied before it: a failed sync leaves it where it was.
    #[test]
    fn the_witness_records_only_what_a_successful_sync_covered() {
        let dir = tempfile::tempdir().unwrap();
        let mut core = Core::open(FailingSync::default(), true).unwrap();
        core.set_witness(SyncedCommit::open(dir.path()).unwrap().0);
        let mut batch = Batch::new();
        batch.delete_session("gone");

        core.apply_all(&[&batch]).unwrap();
        core.sync().unwrap();
        assert_eq!(witnessed(dir.path()), Some(1));

        core.apply_all(&[&batch]).unwrap();
        core.engine.failing.store(true, Ordering::SeqCst);
        assert!(core.sync().is_err());
        assert_eq!(witnessed(dir.path()), Some(1));

        core.engine.failing.store(false, Ordering::SeqCst);
        core.sync().unwrap();
        assert_eq!(witnessed(dir.path()), Some(2));
    }
}
